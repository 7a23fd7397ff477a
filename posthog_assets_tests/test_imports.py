"""The one-way import rule: the HTTP layer and the stand-in load without Dagster, folders import
one way, and no module imports itself through others. Between the repository's packages: the
stand-in (``posthog_standin``) imports nothing of the library, the library nothing of this
repository's code location (``posthog_project``), the stand-in or the tests, and the benchmarks
nothing of the tests."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "module",
    [
        "posthog_assets.api.client",
        "posthog_assets.api.polling",
        "posthog_assets.exports.runner",
        "posthog_assets.config",
        "posthog_standin.server",
        "posthog_standin.app",
    ],
)
def test_module_imports_without_dagster(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulled in {out.stdout.strip()}"


def test_the_public_api_imports_lazily() -> None:
    """``import posthog_assets`` costs nothing; each public name loads its module when used."""
    code = (
        "import sys, posthog_assets\n"
        "print(sorted(m for m in sys.modules if m.startswith(('dagster', 'posthog_assets.'))))\n"
        "from posthog_assets import PostHogClient\n"
        "print('dagster' in sys.modules)\n"
        "from posthog_assets import (PostHogProjectComponent, PostHogResource,\n"
        "    DagsterPostHogTranslator, build_posthog_assets_definitions, PostHogProject,\n"
        "    ExportConfig, InsightsConfig, GroupsConfig, load_definitions_from_yaml)\n"
        "import dagster as dg\n"
        "assert issubclass(PostHogProjectComponent, dg.Component)\n"
        "assert issubclass(PostHogResource, dg.ConfigurableResource)\n"
        "assert callable(build_posthog_assets_definitions) and DagsterPostHogTranslator\n"
        "assert callable(load_definitions_from_yaml) and PostHogProject and GroupsConfig\n"
        "assert ExportConfig(name='a', insight=1, format='text/csv') and InsightsConfig()\n"
        "print(set(posthog_assets.__all__) <= set(dir(posthog_assets)))\n"
        "try:\n"
        "    posthog_assets.nothing\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "[]",
        "False",
        "True",
        "module 'posthog_assets' has no attribute 'nothing'",
    ]


def test_standin_imports_nothing_from_the_package_runtime() -> None:
    code = (
        "import sys, posthog_standin.server, posthog_standin.app, posthog_standin.__main__\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('posthog_assets', 'posthog_project', 'posthog_assets_tests'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


REPOSITORY = Path(__file__).resolve().parents[1]
#: What each of the repository's folders of Python may not import (at any depth of a file).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "posthog_standin": ("posthog_assets", "posthog_project", "posthog_assets_tests", "bench"),
    "posthog_assets": ("posthog_project", "posthog_standin", "posthog_assets_tests", "bench"),
    "bench": ("posthog_assets_tests",),
}


def _imported_packages(path: Path) -> set[str]:
    """The top-level packages a file imports, anywhere in it (a function body included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_packages_import_one_way(folder: str) -> None:
    """The library is what a user installs: it cannot lean on this repository's code location,
    its stand-in or its tests; the stand-in stays independent of what it stands in for; the
    benchmarks use the library and the stand-in, never the tests' helpers."""
    files = sorted((REPOSITORY / folder).rglob("*.py"))
    assert files, folder
    wrong = [
        f"{path.relative_to(REPOSITORY)} imports {package}"
        for path in files
        for package in sorted(_imported_packages(path) & set(FORBIDDEN[folder]))
    ]
    assert wrong == []


def test_the_one_way_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(
        "def f():\n    from posthog_assets_tests.support import session\n"
    )
    assert _imported_packages(tmp_path / "bad.py") == {"posthog_assets_tests"}


PACKAGE = Path(__file__).resolve().parents[1] / "posthog_assets"
#: Which folders a module may import from, by its own folder (the one-way rule):
#: the HTTP layer <- the Dagster glue <- exports, snapshots <- build, schedules
#: <- the component (which builds what the builder builds, from its stored state or a file).
LAYERS: dict[str, set[str]] = {
    "api": {"api"},
    "glue": {"api", "glue"},
    "exports": {"api", "glue", "exports"},
    "snapshots": {"api", "glue", "snapshots"},
    "top": {"api", "glue", "exports", "snapshots", "top"},
    "component": {"api", "glue", "exports", "snapshots", "top", "component"},
}
#: The top-level modules that compose everything; every other top-level module is glue.
TOP = {"build", "schedules"}


def _layer(module: str) -> str:
    parts = module.split(".")[1:]
    if parts and parts[0] in ("api", "exports", "snapshots", "component"):
        return parts[0]
    return "top" if parts and parts[0] in TOP else "glue"


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Ids of the import nodes under ``if TYPE_CHECKING:`` (never run, so never a cycle)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    return skipped


def _imports() -> dict[str, set[str]]:
    """Every package module and the package modules it imports (at any depth of the file)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        found: set[str] = set()
        tree = ast.parse(path.read_text())
        skipped = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = module.rsplit(".", node.level)[0]
                names = [f"{base}.{node.module}" if node.module else base]
            found |= {n for n in names if n.startswith("posthog_assets.")}
        graph[module] = found
    modules = set(graph)
    return {m: {i for i in deps if i in modules and i != m} for m, deps in graph.items()}


def test_imports_go_one_way_between_folders() -> None:
    wrong = [
        f"{module} imports {dep}"
        for module, deps in _imports().items()
        for dep in deps
        if _layer(dep) not in LAYERS[_layer(module)]
    ]
    assert wrong == []


def test_no_import_cycle() -> None:
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep] if dep in path else [module, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], cycles


def test_the_cycle_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {"posthog_assets.a": {"posthog_assets.b"}, "posthog_assets.b": {"posthog_assets.a"}}
    monkeypatch.setattr(sys.modules[__name__], "_imports", lambda: fake)
    with pytest.raises(AssertionError):
        test_no_import_cycle()

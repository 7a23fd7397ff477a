"""The one-way import rule: the HTTP layer and the stand-in load without Dagster, folders import
one way, and no module imports itself through others."""

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
        "posthog_assets.standin.server",
        "posthog_assets.standin.app",
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
        "    DagsterPostHogTranslator, build_posthog_assets_definitions, ProjectConfig)\n"
        "import dagster as dg\n"
        "assert issubclass(PostHogProjectComponent, dg.Component)\n"
        "assert issubclass(PostHogResource, dg.ConfigurableResource)\n"
        "assert callable(build_posthog_assets_definitions) and DagsterPostHogTranslator\n"
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
        "import sys, posthog_assets.standin.server, posthog_assets.standin.app\n"
        "bad = sorted(m for m in sys.modules if m.startswith('posthog_assets.')"
        " and not m.startswith('posthog_assets.standin'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


PACKAGE = Path(__file__).resolve().parents[1] / "posthog_assets"
#: Which folders a module may import from, by its own folder (the one-way rule):
#: the HTTP layer <- the Dagster glue <- exports, snapshots <- definitions, schedules, local
#: <- the component (which builds what the builder builds, from its stored state).
LAYERS: dict[str, set[str]] = {
    "api": {"api"},
    "glue": {"api", "glue"},
    "exports": {"api", "glue", "exports"},
    "snapshots": {"api", "glue", "snapshots"},
    "top": {"api", "glue", "exports", "snapshots", "top"},
    "local": {"api", "glue", "exports", "snapshots", "top", "local", "standin"},
    "component": {"api", "glue", "exports", "snapshots", "top", "component"},
    "standin": {"standin"},
}
#: The top-level modules that compose everything; every other top-level module is glue.
TOP = {"definitions", "build", "schedules"}


def _layer(module: str) -> str:
    parts = module.split(".")[1:]
    if parts and parts[0] in ("api", "exports", "snapshots", "local", "standin", "component"):
        return parts[0]
    return "top" if parts and parts[0] in TOP else "glue"


def _imports() -> dict[str, set[str]]:
    """Every package module and the package modules it imports (at any depth of the file)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
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

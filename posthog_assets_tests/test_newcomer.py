"""A newcomer's path, exactly as the README's "Configuration" section tells it.

The commands and the ``defs.yaml`` are read from that section and run as written, so the README
cannot drift from what works: the package is built as a wheel from a copy of this repository (a
clone), ``create-dagster`` makes a new project, uv installs the project and the wheel into the
project's own environment (at the pinned versions, from uv's cache), and ``dg`` does the rest
against a local stand-in on a fixed loopback port. The only things the test supplies itself are
the values of the three ``export POSTHOG_...`` lines (the stand-in's), a private ``DAGSTER_HOME``
and rate-limit folder, and the interleaved steps: PostHog stopped (the load needs no HTTP), a
selection that matches nothing, a missing object, and a second project.

The steps share one project (a module fixture) and run in order on one xdist worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import tomllib
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from posthog_standin.server import StandinProcess

pytestmark = pytest.mark.xdist_group("newcomer")

ROOT = Path(__file__).resolve().parents[1]
CLONE = "posthog-assets"  # the README's name for the folder of the clone
COMPONENT = "posthog_assets.PostHogProjectComponent"
ENV_NAMES = ("POSTHOG_HOST", "POSTHOG_PROJECT_ID", "POSTHOG_PERSONAL_API_KEY")
#: A key with exactly the scopes the README lists (the stand-in's own key has them all).
SCOPED_KEY = "phx_newcomer_0123456789abcdef"
#: What a clone would not hold (git's own folder, and what .gitignore keeps out of it).
NOT_IN_A_CLONE = {
    ".git",
    ".venv",
    ".tools",
    ".dagster_home",
    "data",
    "build",
    "dist",
    "test-artifacts",
    "bench/results",
}
CACHES = (
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "*.pyc",
    ".tmp_dagster_home_*",
)
#: The README's last block, each run by a step below.
DG_COMMANDS = ("dg utils refresh-defs-state", "dg check defs", "dg list defs", "dg launch ")
DG_TIMEOUT_S = 240
SETUP_TIMEOUT_S = 540  # a cold uv cache downloads the lot
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# ---------------------------------------------------------------- the README


@dataclass(frozen=True)
class Readme:
    """The Configuration section: prose, then its fenced blocks in order."""

    text: str
    setup: str  # build, create-dagster, venv, install (run from the clone's parent folder)
    exports: dict[str, str]  # the three variables the reader sets to their own values
    scaffold: str  # the rest of the second block (run in the project)
    defs_yaml: str
    commands: list[str]  # refresh, check, list, launch (run in the project)

    @classmethod
    def read(cls) -> Readme:
        readme = (ROOT / "README.md").read_text()
        start = readme.index("## Configuration\n")
        end = readme.index("**State, not calls.**", start)
        text = readme[start:end]
        blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
        kinds = [kind for kind, _ in blocks]
        assert kinds == ["bash", "bash", "yaml", "bash"], (
            "the README's Configuration section should hold, in order: the set-up commands, the "
            "variables and the scaffold, the defs.yaml, the dg commands; it has " + str(kinds)
        )
        exports: dict[str, str] = {}
        scaffold = []
        for line in _commands(blocks[1][1]):
            found = re.match(r"export (\w+)=(\S*)", line)
            if found:
                exports[found[1]] = found[2]
            else:
                scaffold.append(line)
        commands = _commands(blocks[3][1])
        untested = [c for c in commands if not c.startswith(DG_COMMANDS)]
        assert not untested, f"README commands this test does not run: {untested}"
        return cls(
            text=text,
            setup=blocks[0][1],
            exports=exports,
            scaffold="\n".join(scaffold),
            defs_yaml=blocks[2][1],
            commands=commands,
        )

    def command(self, prefix: str) -> str:
        found = [c for c in self.commands if c.startswith(prefix)]
        assert len(found) == 1, f"the README should give `{prefix}` once: {self.commands}"
        return found[0]

    @property
    def project_name(self) -> str:
        found = re.search(r"create-dagster@\S+ project (\w+)", self.setup)
        assert found, f"no `create-dagster@<version> project <name>` in:\n{self.setup}"
        return found[1]

    @property
    def scopes(self) -> list[str]:
        return re.findall(r"`([a-z_]+:(?:read|write))`", self.text)


def _commands(block: str) -> list[str]:
    """Logical lines of a bash block (continuations joined), comment-only lines left out."""
    joined = re.sub(r"\\\n\s*", "", block)
    lines = (line.strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# ---------------------------------------------------------------- processes


def _tail(text: str, limit: int = 6000) -> str:
    text = ANSI.sub("", text)
    return text if len(text) <= limit else "…" + text[-limit:]


def run(
    command: str, cwd: Path, env: dict[str, str], *, ok: bool = True, timeout: float = DG_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """``command`` in bash, as typed in a terminal; fails with both streams when it fails."""
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(f"[{time.monotonic() - started:5.1f}s] {command.splitlines()[0]}")  # with -s
    if ok and done.returncode != 0:
        pytest.fail(
            f"`{command}` failed with exit code {done.returncode} in {cwd}\n"
            f"--- stdout ---\n{_tail(done.stdout)}\n--- stderr ---\n{_tail(done.stderr)}"
        )
    return done


def _uv_dir(folder: Path) -> Path:
    """A folder holding only uv and uvx (``make install`` puts them in .tools/bin), for PATH."""
    bin_dir = folder / "uv-bin"
    bin_dir.mkdir()
    for name in ("uv", "uvx"):
        candidates = [ROOT / ".tools" / "bin" / name, ROOT / ".venv" / "bin" / name]
        tool = next((p for p in candidates if p.exists()), None) or shutil.which(name)
        if tool is None:
            pytest.fail(f"{name} not found (in .tools/bin, .venv/bin or on PATH): `make install`")
        (bin_dir / name).symlink_to(tool)
    return bin_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _refuses(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
    except OSError:
        return True
    return False


class PostHog:
    """The stand-in, run by the project's own Python (the wheel's ``posthog_standin``), on one
    fixed loopback port so that it comes back where it was; ``SCOPED_KEY`` has the README's
    scopes only."""

    def __init__(self, python: Path, scopes: list[str]) -> None:
        self.python = python
        self.scopes = scopes
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: StandinProcess | None = None

    def start(self) -> None:
        if self.proc is not None:
            return
        proc = StandinProcess(
            python=str(self.python),
            groups=20,
            group_types=1,
            extra_args=["--port", str(self.port)],  # the last --port wins
        ).start()
        assert proc.url == self.url, (proc.url, self.url)
        proc.control.add_key(SCOPED_KEY, self.scopes)
        self.proc = proc

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "POSTHOG_HOST": self.url,
            "POSTHOG_PROJECT_ID": "1",
            "POSTHOG_PERSONAL_API_KEY": SCOPED_KEY,
        }

    def get(self, path: str) -> list[dict[str, Any]]:
        """Every result of a PostHog list endpoint of project 1, following ``next``."""
        url: str | None = f"{self.url}/api/projects/1/{path}"
        results: list[dict[str, Any]] = []
        while url:
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {SCOPED_KEY}"})
            with urllib.request.urlopen(request, timeout=30) as response:
                page = json.loads(response.read())
            results += page["results"]
            url = page.get("next")
        return results


# ---------------------------------------------------------------- the newcomer's project


@dataclass
class Newcomer:
    readme: Readme
    folder: Path  # holds the clone and the project
    project: Path
    env: dict[str, str]  # the project's environment active, PostHog's variables set
    posthog: PostHog
    keys: set[str] = field(default_factory=set)  # asset keys of the README's defs.yaml
    loaded: bool = False  # the README's path got as far as a stored state

    @property
    def defs(self) -> Path:
        return self.project / "src" / self.readme.project_name / "defs"

    def dg(self, command: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run(command, self.project, self.env, **kwargs)

    def list_keys(self, command: str) -> tuple[dict[str, Any], str]:
        """``dg list defs --json`` (the README's command, answering in JSON): the definitions
        and the log around them."""
        bare = re.sub(r"\s+#[^'\"]*$", "", command)  # the comment, not the flag, ends it
        done = self.dg(f"{bare} --json")
        return json.loads(done.stdout), ANSI.sub("", done.stderr)

    def state_files(self) -> list[Path]:
        return sorted((self.defs / ".local_defs_state").glob("*/state"))

    def require_state(self) -> None:
        if not self.loaded:
            pytest.fail("the README's path failed before a state was stored (see the test above)")


def _clone(destination: Path) -> None:
    """This repository as a fresh clone has it: no environments, builds, caches or data."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        here = Path(folder).relative_to(ROOT)
        return {
            n
            for n in names
            if (here / n).as_posix() in NOT_IN_A_CLONE or any(Path(n).match(p) for p in CACHES)
        }

    shutil.copytree(ROOT, destination, ignore=ignore, symlinks=True)


def _environment(folder: Path, uv_dir: Path) -> dict[str, str]:
    """A terminal's environment: nothing of this repository's .venv or of the test session's
    PostHog, DAGSTER_HOME or uv interpreter choice (UV_PYTHON would even pick the environment
    `uv pip install` writes to)."""
    dropped = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "DAGSTER_HOME", "CONDA_PREFIX"}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in dropped and not k.startswith(("POSTHOG_", "UV_PYTHON", "UV_PROJECT"))
    }
    ours = (ROOT / ".venv" / "bin").resolve()
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != ours]
    home = folder / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return {
        **env,
        "PATH": os.pathsep.join([str(uv_dir), *path]),
        "UV_PYTHON_DOWNLOADS": "never",
        "DAGSTER_HOME": str(home),
        "POSTHOG_ASSETS_RATE_LIMIT_DIR": str(folder / "gates"),
        "COLUMNS": "250",  # dg's tables unabridged
    }


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Newcomer]:
    """The README's set-up block, run from the folder that holds a clone of this repository."""
    readme = Readme.read()
    folder = tmp_path_factory.mktemp("newcomer")
    _clone(folder / CLONE)
    env = _environment(folder, _uv_dir(folder))
    run(readme.setup, folder, env, timeout=SETUP_TIMEOUT_S)
    project = folder / readme.project_name
    venv = project / ".venv"
    assert (venv / "bin" / "dg").exists(), f"no dg in the project's environment {venv}"
    active = {**env, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}
    posthog = PostHog(venv / "bin" / "python", readme.scopes)
    try:
        yield Newcomer(readme, folder, project, {**active, **posthog.env}, posthog)
    finally:
        posthog.stop()


# ---------------------------------------------------------------- the steps


@pytest.mark.system
@pytest.mark.timeout(600)  # the set-up (the module fixture) runs within the first test
def test_the_wheel_holds_the_library_and_its_standin_only(newcomer: Newcomer) -> None:
    wheels = list((newcomer.folder / CLONE / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"posthog_assets", "posthog_standin"}, tops
    for package in ("posthog_assets", "posthog_standin"):  # no subpackage left behind
        sources = {
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / package).rglob("*.py")
            if "__pycache__" not in p.parts
        }
        assert sources <= set(names), sorted(sources - set(names))
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    registry = zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    assert "[dagster_dg_cli.registry_modules]" in registry and "posthog_assets" in registry
    # installed as files in the project's environment, not as a link to this repository
    site = next((newcomer.project / ".venv" / "lib").glob("python3*/site-packages"))
    assert (site / "posthog_assets" / "component" / "component.py").exists()
    assert (site / "posthog_standin" / "server.py").exists()
    assert not (site / "posthog_project").exists()
    assert str(ROOT) not in "".join(p.read_text() for p in site.glob("*.pth"))


@pytest.mark.system
def test_create_dagster_made_a_dg_project_at_the_pinned_dagster(newcomer: Newcomer) -> None:
    pins = dict(
        re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    )
    used = re.search(r"create-dagster@(\S+)", newcomer.readme.setup)
    assert used and used[1] == pins["dagster"], "the README's create-dagster is not Dagster's pin"
    name = newcomer.readme.project_name
    pyproject = tomllib.loads((newcomer.project / "pyproject.toml").read_text())
    assert pyproject["tool"]["dg"]["directory_type"] == "project"
    assert pyproject["tool"]["dg"]["project"]["root_module"] == name
    package = newcomer.project / "src" / name
    assert (package / "defs" / "__init__.py").exists()
    assert "load_from_defs_folder" in (package / "definitions.py").read_text()
    site = next((newcomer.project / ".venv" / "lib").glob("python3*/site-packages"))
    for dist in ("dagster", "dagster_dg_cli", "dagster_duckdb"):
        pin = pins[dist.replace("_", "-")]
        assert (site / f"{dist}-{pin}.dist-info").exists(), f"{dist} is not at its pin {pin}"


@pytest.mark.system
def test_the_readme_path_loads_from_the_stored_state_even_with_posthog_down(
    newcomer: Newcomer,
) -> None:
    readme, posthog = newcomer.readme, newcomer.posthog
    assert set(readme.exports) == set(ENV_NAMES), readme.exports
    assert {"insight:read", "dashboard:read", "export:write"} <= set(readme.scopes)
    posthog.start()
    newcomer.dg(readme.scaffold)
    written = re.search(r"writes `([^`]+/defs\.yaml)`", readme.text)
    assert written, "the README should say where the scaffold writes defs.yaml"
    path = newcomer.project / written[1]
    assert path.exists(), f"the scaffold did not write {written[1]}"
    scaffolded = yaml.safe_load(path.read_text())
    documented = yaml.safe_load(readme.defs_yaml)
    assert scaffolded["type"] == documented["type"] == COMPONENT
    for section in ("project", "insights"):  # the README shows the scaffold's own settings
        assert scaffolded["attributes"][section] == documented["attributes"][section], section
    assert scaffolded["attributes"]["exports"][0] == documented["attributes"]["exports"][0]
    path.write_text(readme.defs_yaml)

    newcomer.dg(readme.command("dg utils refresh-defs-state"))
    assert len(newcomer.state_files()) == 1
    done = newcomer.dg(readme.command("dg check defs"))
    assert "All definitions loaded successfully" in done.stdout + done.stderr
    defs, _ = newcomer.list_keys(readme.command("dg list defs"))
    keys = {a["asset_key"] for a in defs["assets"]}
    dashboards = {d["id"] for d in posthog.get("dashboards/?limit=100") if not d.get("deleted")}
    favourites = {i["short_id"] for i in posthog.get("insights/?limit=100") if i.get("favorited")}
    assert dashboards and favourites  # the stand-in's seed has both
    expected = {f"posthog/exports/dashboard_{d}_png" for d in dashboards} | {
        f"posthog/exports/insight_{s}_csv" for s in favourites
    }
    assert {k for k in keys if k.startswith("posthog/exports/")} == expected
    assert {"posthog/insights", "posthog/insight_series", "posthog/groups"} <= keys
    assert all(a["owners"] == [{"team": "data"}] for a in defs["assets"])  # translation
    assert {r["name"] for r in defs["resources"]} >= {"posthog", "duckdb"}
    newcomer.keys, newcomer.loaded = keys, True

    posthog.stop()
    assert _refuses(posthog.url)
    done = newcomer.dg(readme.command("dg check defs"))
    assert "All definitions loaded successfully" in done.stdout + done.stderr
    listed = ANSI.sub("", newcomer.dg(readme.command("dg list defs")).stdout)
    missing = [k for k in keys if k not in listed]
    assert not missing, f"`dg list defs` with PostHog down lacks {missing}:\n{_tail(listed)}"


@pytest.mark.system
def test_the_launch_writes_files_and_duckdb_rows(newcomer: Newcomer) -> None:
    newcomer.require_state()
    newcomer.posthog.start()  # PostHog back where it was: the stored state is still its own
    done = newcomer.dg(newcomer.readme.command("dg launch"))
    assert "RUN_SUCCESS" in done.stdout + done.stderr
    assert "`data/exports/`" in newcomer.readme.text
    assert "`data/posthog.duckdb`" in newcomer.readme.text
    exports = newcomer.project / "data" / "exports"
    for key in sorted(k for k in newcomer.keys if k.startswith("posthog/exports/")):
        name = key.rsplit("/", 1)[1]
        files = list((exports / name).glob(f"*.{name.rsplit('_', 1)[1]}"))
        assert len(files) == 1, f"{key}: {files} under {exports}"
        head = files[0].read_bytes()[:8]
        if name.endswith("_png"):
            assert head.startswith(b"\x89PNG"), (key, head)
        else:
            assert head, f"{key}: empty file"
    with duckdb.connect(str(newcomer.project / "data" / "posthog.duckdb"), read_only=True) as db:
        (catalog,) = db.execute("select current_database()").fetchone()
        (rows,) = db.execute(f'select count(*) from "{catalog}".posthog.insights').fetchone()
    assert rows > 0


@pytest.mark.system
def test_a_filter_matching_nothing_warns_and_a_missing_insight_fails(newcomer: Newcomer) -> None:
    newcomer.require_state()
    readme = newcomer.readme
    path = newcomer.defs / "posthog" / "defs.yaml"
    original = path.read_text()
    documented = yaml.safe_load(readme.defs_yaml)
    entries = len(documented["attributes"]["exports"])

    def with_entry(entry: dict[str, Any]) -> None:
        changed = yaml.safe_load(original)
        changed["attributes"]["exports"].append(entry)
        path.write_text(yaml.safe_dump(changed, sort_keys=False))

    try:
        with_entry({"insights": {"tag": "nothing_has_this"}, "format": "text/csv"})
        defs, log = newcomer.list_keys(readme.command("dg list defs"))
        assert {a["asset_key"] for a in defs["assets"]} == newcomer.keys  # none for the entry
        assert f"exports[{entries}] (insights: {{'tag': 'nothing_has_this'}})" in log, log
        assert "builds no asset" in log, log

        with_entry({"insight": "ZZZZZZZZ"})
        done = newcomer.dg(readme.command("dg check defs"), ok=False)
        output = ANSI.sub("", done.stdout + done.stderr)
        assert done.returncode != 0, output
        assert f"exports[{entries}] (insight: ZZZZZZZZ) matches no insight" in output, output
    finally:
        path.write_text(original)


@pytest.mark.system
def test_a_second_project_gets_its_own_name_keys_and_state(newcomer: Newcomer) -> None:
    newcomer.require_state()
    readme = newcomer.readme
    newcomer.posthog.start()
    scaffold = readme.scaffold.replace(f"{COMPONENT} posthog", f"{COMPONENT} staging")
    assert scaffold != readme.scaffold
    folder = newcomer.defs / "staging"
    try:
        newcomer.dg(scaffold)
        staging = folder / "defs.yaml"
        assert yaml.safe_load(staging.read_text())["attributes"]["project"]["name"] == "staging"

        done = newcomer.dg(readme.command("dg utils refresh-defs-state"))
        assert "[staging]" in done.stdout + done.stderr
        assert [p.parent.name for p in newcomer.state_files()] == [
            "PostHogProjectComponent__default__",
            "PostHogProjectComponent__staging__",
        ]
        defs, _ = newcomer.list_keys(readme.command("dg list defs"))
        keys = [a["asset_key"] for a in defs["assets"]]
        assert len(keys) == len(set(keys)), "two assets share a key"
        theirs = {k for k in keys if k.startswith("posthog/staging/")}
        assert set(keys) - theirs == newcomer.keys  # the first project's keys are unchanged
        assert "posthog/staging/insights" in theirs
        assert "posthog/staging/exports/dashboard_1_png" in theirs
        assert {r["name"] for r in defs["resources"]} >= {"posthog", "posthog_staging"}

        staging.write_text(staging.read_text().replace("name: staging", "name: default", 1))
        done = newcomer.dg(readme.command("dg check defs"), ok=False)
        output = ANSI.sub("", done.stdout + done.stderr)
        assert done.returncode != 0, output
        assert "both configure the PostHog project named 'default'" in output, output
        first = newcomer.defs / "posthog"
        assert str(staging) in output and str(first / "defs.yaml") in output, output
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(
            newcomer.defs / ".local_defs_state" / "PostHogProjectComponent__staging__",
            ignore_errors=True,
        )

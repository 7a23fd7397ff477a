"""One real ``dg dev`` (webserver + daemon + code server) shared by the UI and daemon tests.

Why one: a ``dg dev`` start-up costs 20-40 s on two cores, so ``test_ui.py`` and
``test_daemon.py`` share a session-scoped instance. It is started exactly as ``make ui`` starts it
(``python -m posthog_project.ui``), pointed at the session's stand-in and at temporary
``DAGSTER_HOME``/DuckDB/export paths, and stopped with Ctrl-C (SIGINT to its process group) at the
end of the session, when the fixture also checks that no process of it is left behind.

The helpers here discover asset keys, sensors and schedules from ``posthog_project.definitions``
rather than hard-coding names, and talk GraphQL to the webserver for assertions.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import pytest

from posthog_assets.tables import EXPORTS_GROUP
from posthog_assets_tests.support.session import standin_env, with_code_location
from posthog_project.ui import graphql
from posthog_standin.server import StandinProcess

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
#: What the webserver calls a code location loaded from a python module.
REPOSITORY_NAME = "__repository__"
LOCATION_NAME = "posthog_assets"
#: The metadata key holding the DuckDB table an asset writes.
TABLE_KEY = "dagster-posthog/table"
UI_STARTUP_TIMEOUT_S = 240.0
RUN_TIMEOUT_S = 180.0
TERMINAL_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}


def skip_or_fail(reason: str) -> None:
    """Skip where a system part truly cannot be had; in CI (``CI`` set) fail instead.

    Why: CI runs ``make test``, whose ``system-deps`` step installs Chromium and PostgreSQL as
    root, so a missing part there is a broken set-up that a skip would hide.
    """
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must have it: `make system-deps` installs it)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def posthog_all_job() -> dg.JobDefinition:
    """The main job, module-level so ``dg.reconstructable`` can rebuild it in step subprocesses."""
    from posthog_project.definitions import ALL_ASSETS_JOB, defs

    return defs.resolve_job_def(ALL_ASSETS_JOB)


# ---------------------------------------------------------------------- discovery


#: The environment the shipped definitions are imported with in this process (set by the
#: ``dagster_ui`` fixture): a load checks that the stored state is of the project it names.
_SHIPPED_ENV: dict[str, str] = {}


def load_defs() -> dg.Definitions:
    """The shipped definitions, imported in this process once (with :data:`_SHIPPED_ENV`'s
    host and project id set while they load, when a fixture gave them)."""
    if "posthog_project.definitions" not in sys.modules and _SHIPPED_ENV:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("POSTHOG_HOST", "POSTHOG_PROJECT_ID", "POSTHOG_PERSONAL_API_KEY"):
                mp.setenv(name, _SHIPPED_ENV[name])
            mp.delenv("POSTHOG_ASSETS_CONFIG", raising=False)
            import posthog_project.definitions  # noqa: F401
    from posthog_project.definitions import defs

    return defs


def asset_keys_in_group(group: str) -> list[dg.AssetKey]:
    return sorted(
        (spec.key for spec in load_defs().resolve_all_asset_specs() if spec.group_name == group),
        key=lambda k: k.to_user_string(),
    )


def export_asset_key(fmt_suffix: str = "png") -> dg.AssetKey:
    """The first export asset in that format, insight exports first (the config has insight 1)."""
    keys = sorted(
        asset_keys_in_group(EXPORTS_GROUP),
        key=lambda k: "dagster-posthog/insight_id" not in _spec(k).metadata,
    )
    for key in keys:
        spec = _spec(key)
        fmt = str(spec.metadata.get("dagster-posthog/export_format", ""))
        if fmt.endswith(fmt_suffix) or key.path[-1].endswith(f"_{fmt_suffix}"):
            return key
    raise AssertionError(f"no {fmt_suffix} export asset among {keys}")


def insights_asset_key() -> dg.AssetKey:
    """The insight snapshot asset: the one whose config has PostHog's ``refresh`` mode and that
    writes ``posthog.insights`` (its step also writes the tidy tables, each its own asset)."""
    found = []
    defs = load_defs()
    for key in defs.resolve_all_asset_keys():
        schema = defs.resolve_assets_def(key).node_def.config_schema
        fields = getattr(schema.config_type, "fields", None) if schema else None
        if (
            fields
            and "refresh" in fields
            and _spec(key).metadata.get(TABLE_KEY) == "posthog.insights"
        ):
            found.append(key)
    assert len(found) == 1, f"expected one asset with a 'refresh' config field, found {found}"
    return found[0]


def _spec(key: dg.AssetKey) -> dg.AssetSpec:
    for spec in load_defs().resolve_all_asset_specs():
        if spec.key == key:
            return spec
    raise KeyError(key)


def sensor_names() -> list[str]:
    return sorted(s.name for s in load_defs().get_repository_def().sensor_defs)


def schedule_names() -> list[str]:
    return sorted(s.name for s in load_defs().get_repository_def().schedule_defs)


# ---------------------------------------------------------------------- the running UI


@dataclass
class DagsterDevUI:
    """A running ``python -m posthog_project.ui`` and what the tests need to drive it."""

    url: str
    home: Path
    duckdb_path: Path
    export_dir: Path
    env: dict[str, str]
    log_path: Path

    def gql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return graphql(self.url, query, variables)

    def wait_for_run(self, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> dict[str, Any]:
        """Poll until the run ends; return its GraphQL record (status, tags, runConfigYaml)."""
        deadline = time.monotonic() + timeout_s
        run: dict[str, Any] = {}
        while time.monotonic() < deadline:
            run = self.gql(RUN_QUERY, {"runId": run_id})["runOrError"]
            if run.get("status") in TERMINAL_STATUSES:
                return run
            time.sleep(1)
        raise AssertionError(f"run {run_id} not finished after {timeout_s:.0f} s: {run}")

    def wait_for(
        self, what: str, probe: Callable[[], Any], timeout_s: float = RUN_TIMEOUT_S
    ) -> Any:
        """Call ``probe`` until it returns something truthy."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = probe()
            if value:
                return value
            time.sleep(1)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def runs(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.gql(RUNS_QUERY, {"limit": limit})["runsOrError"]["results"]

    def run_failure_text(self, run_id: str) -> str:
        """The error messages of a failed run, to make an assertion message useful."""
        data = self.gql(RUN_EVENTS_QUERY, {"runId": run_id})["logsForRun"]
        lines = [
            f"{e.get('__typename')}: {e.get('message')}"
            + (f" {e['error']['message']}" if e.get("error") else "")
            for e in data.get("events", [])
            if "Failure" in e.get("__typename", "") or e.get("error")
        ]
        return "\n".join(lines[-10:])

    def launch_assets(
        self,
        keys: list[dg.AssetKey],
        *,
        run_config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Launch a run of these assets the way the UI does (``launchRun`` on the asset job)."""
        params: dict[str, Any] = {
            "selector": {
                "repositoryLocationName": LOCATION_NAME,
                "repositoryName": REPOSITORY_NAME,
                "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": list(k.path)} for k in keys],
            },
            "runConfigData": dict(run_config or {}),
            "executionMetadata": {
                "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]
            },
        }
        result = self.gql(LAUNCH_RUN_MUTATION, {"params": params})["launchRun"]
        assert result["__typename"] == "LaunchRunSuccess", result
        return str(result["run"]["runId"])

    def latest_materialization(self, key: dg.AssetKey) -> dict[str, Any] | None:
        variables = {"path": list(key.path)}
        data = self.gql(ASSET_MATERIALIZATION_QUERY, variables)["assetOrError"]
        mats = data.get("assetMaterializations") or []
        return mats[0] if mats else None


def metadata_dict(materialization: Mapping[str, Any]) -> dict[str, Any]:
    """GraphQL metadata entries as {label: value} (path, text, int, float, url, md, json)."""
    out: dict[str, Any] = {}
    for e in materialization.get("metadataEntries", []):
        for field in (
            "path",
            "text",
            "intValue",
            "floatValue",
            "url",
            "mdStr",
            "jsonString",
            "timestamp",
        ):
            if field in e and e[field] is not None:
                out[e["label"]] = e[field]
                break
    return out


RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run {
      runId status runConfigYaml
      tags { key value }
      assetSelection { path }
    }
  }
}
"""

RUNS_QUERY = """
query Runs($limit: Int) {
  runsOrError(limit: $limit) {
    ... on Runs { results { runId status tags { key value } assetSelection { path } } }
  }
}
"""

RUN_EVENTS_QUERY = """
query Events($runId: ID!) {
  logsForRun(runId: $runId) {
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { message }
        ... on ExecutionStepFailureEvent { error { message } }
        ... on RunFailureEvent { error { message } }
      }
    }
  }
}
"""

LAUNCH_RUN_MUTATION = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
  }
}
"""

ASSET_MATERIALIZATION_QUERY = """
query Asset($path: [String!]!) {
  assetOrError(assetKey: {path: $path}) {
    __typename
    ... on Asset {
      assetMaterializations(limit: 1) {
        runId timestamp
        metadataEntries {
          label __typename
          ... on PathMetadataEntry { path }
          ... on TextMetadataEntry { text }
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
          ... on UrlMetadataEntry { url }
          ... on MarkdownMetadataEntry { mdStr }
          ... on JsonMetadataEntry { jsonString }
          ... on TimestampMetadataEntry { timestamp }
        }
      }
    }
  }
}
"""

SET_NUX_SEEN_MUTATION = "mutation { setNuxSeen }"


@pytest.fixture(scope="session")
def dagster_ui(
    standin: StandinProcess, shipped_defs_state: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DagsterDevUI]:
    """``python -m posthog_project.ui`` on a free port, against the session stand-in.

    Its own ``DAGSTER_HOME`` (seeded by the module from the root ``dagster.yaml``, pool limits
    applied), DuckDB file and export folder live in a temp folder. The first-run pop-up is
    dismissed with the ``setNuxSeen`` mutation. At the end: SIGINT to the group, like Ctrl-C in
    a terminal, then every process that belonged to it must be gone.
    """
    tmp = tmp_path_factory.mktemp("dagster_ui")
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    log_path = ARTIFACTS / f"dagster-dev-{port}.log"  # one per session: runs may overlap
    # The shipped component: its stored state was read from the session stand-in, which the
    # environment names (POSTHOG_HOST, POSTHOG_PROJECT_ID), or the load fails.
    # The repository on PYTHONPATH: the module refreshes the stored state with `dg`, which
    # imports the code location (posthog_project, not installed with the package) itself.
    env = with_code_location(
        {
            **{k: v for k, v in os.environ.items() if k != "POSTHOG_ASSETS_CONFIG"},
            "DAGSTER_HOME": str(tmp / "dagster_home"),
            **standin_env(standin, tmp),
            "POSTHOG_PERSONAL_API_KEY": standin.key,
            "POSTHOG_ASSETS_RATE_LIMIT_DIR": str(tmp / "gates"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "posthog_project.ui", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # like a terminal's foreground job: Ctrl-C reaches the group
        )
        ui = DagsterDevUI(
            url=f"http://127.0.0.1:{port}",
            home=tmp / "dagster_home",
            duckdb_path=tmp / "posthog.duckdb",
            export_dir=tmp / "exports",
            env=env,
            log_path=log_path,
        )
        seen: set[int] = set()
        _SHIPPED_ENV.update(env)
        try:
            _wait_until_ready(proc, log_path, ui.url)
            ui.gql(SET_NUX_SEEN_MUTATION)
            seen = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            yield ui
        finally:
            seen |= {p.pid for p in _children(proc.pid)}
            _ctrl_c(proc)
    left = [p for p in seen if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not left, f"processes left after Ctrl-C: {_describe(left)} (log: {log_path})"


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:120]}")
        except psutil.Error:
            continue
    return "; ".join(out)


def _wait_until_ready(proc: subprocess.Popen[bytes], log_path: Path, url: str) -> None:
    """``posthog_project.ui`` prints "Dagster UI: <url>" once the code location has loaded."""
    deadline = time.monotonic() + UI_STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if f"Dagster UI: {url}" in text:
            return
        if proc.poll() is not None:
            raise AssertionError(f"posthog_project.ui exited ({proc.returncode}):\n{text[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"the UI did not start in {UI_STARTUP_TIMEOUT_S:.0f} s; see {log_path}")


def _ctrl_c(proc: subprocess.Popen[bytes]) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the foreground process group. Then wait."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise AssertionError("posthog_project.ui did not stop within 60 s of Ctrl-C") from None
    time.sleep(0.5)  # let the last children be reaped by init


def chromium_path() -> str | None:
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )

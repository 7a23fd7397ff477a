"""Secrets and hostile input: the personal API key never lands anywhere, and a server-chosen file
name never decides where a file is written.

Why: a pipeline's run storage, event log, compute logs, data files and CI output are read by many
more people than the key's owner, and kept for months. After a full successful run AND a failed
one (403) of the real code location, with distinctive keys, every byte of ``DAGSTER_HOME`` (SQLite
databases included), the DuckDB file, the export folder, the rate-limit state and the process's
stdout/stderr is searched for the keys. The UI (GraphQL) must show the key field as secret; the
object-storage hop of a download must never carry it; and a hostile ``filename`` from the server
must stay a plain name inside the asset's folder.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import requests

from posthog_assets_tests.support.config_file import write_config_file
from posthog_assets_tests.support.reliability import (
    all_files,
    api_requests,
    assert_export_folder,
    build_world,
    failure_texts,
    fast_resource,
    materialized,
    warm_python,
    world_document,
)
from posthog_assets_tests.support.session import standin_env
from posthog_standin.server import StandinControl, StandinProcess

# With the other users of the shipped state (one file in the repository): see test_defs.py.
pytestmark = [pytest.mark.system, pytest.mark.xdist_group("dagster_dev")]

SECRET_KEY = f"phx_SeCrEtKeY_{secrets.token_hex(12)}"
LIMITED_KEY = f"phx_LiMiTeDkEy_{secrets.token_hex(12)}"
LITERAL_KEY = f"phx_LiTeRaLkEy_{secrets.token_hex(12)}"
#: Every form a leak could take: the whole key, and its random part on its own.
NEEDLES = [k.encode() for k in (SECRET_KEY, LIMITED_KEY)] + [
    k.rsplit("_", 1)[1].encode() for k in (SECRET_KEY, LIMITED_KEY)
]

RUNNER = r"""
import json, os, sys
import dagster as dg
from posthog_project.definitions import ALL_ASSETS_JOB, defs

job = defs.resolve_job_def(ALL_ASSETS_JOB)
out = []
with dg.DagsterInstance.get() as instance:
    for key in sys.argv[1:]:
        os.environ["POSTHOG_PERSONAL_API_KEY"] = key  # dg.EnvVar: read when the run starts
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        errors = [str(e.event_specific_data.error) for e in result.get_step_failure_events()]
        print("\n".join(errors), file=sys.stderr)
        out.append({"run_id": result.run_id, "success": result.success, "errors": errors})
print(json.dumps(out))
"""

LITERAL_DEFS = f"""
import dagster as dg
from posthog_assets.resources import PostHogResource


@dg.asset
def probe(posthog: PostHogResource) -> None:
    pass


defs = dg.Definitions(
    assets=[probe],
    resources={{"posthog": PostHogResource(
        host="https://us.posthog.com", project_id="1", personal_api_key="{LITERAL_KEY}"
    )}},
)
"""
REAL_DEFS = 'import runpy\n\ndefs = runpy.run_module("posthog_project.definitions")["defs"]\n'
RESOURCE_QUERY = """
query Resource($selector: ResourceSelector!) {
  topLevelResourceDetailsOrError(resourceSelector: $selector) {
    __typename
    ... on ResourceDetails {
      name
      description
      configFields { name description isSecret defaultValueAsJson }
      configuredValues { key value type }
    }
  }
}
"""


@dataclass(frozen=True)
class SecretRuns:
    """Where the two runs left their traces, and what the stand-in saw."""

    root: Path
    home: Path
    stdout: str
    stderr: str
    runs: list[dict[str, Any]]
    log: list[dict[str, Any]]


@pytest.fixture(scope="module")
def secret_runs(standin: StandinProcess, tmp_path_factory: pytest.TempPathFactory) -> SecretRuns:
    """A successful and a failed (403) run of the real code location, downloads via storage.

    Both runs happen in one child process (the key changes between them, as ``dg.EnvVar`` is read
    when a run starts); its stdout and stderr are files in ``root``, searched with the rest.
    """
    root = tmp_path_factory.mktemp("secrets")
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    config = write_config_file(root / "posthog_assets.yaml", world_document(root))
    control = standin.control
    control.reset()
    control.add_key(SECRET_KEY, scopes=["*"])
    control.add_key(LIMITED_KEY, scopes=["insight:read"])  # exports and groups: 403
    control.configure(content_redirect=True)  # as on PostHog Cloud: downloads hop to storage
    env = {
        **os.environ,
        **standin_env(standin, root),
        "POSTHOG_ASSETS_CONFIG": str(config),
        "POSTHOG_ASSETS_RATE_LIMIT_DIR": str(root / "gates"),
        "DAGSTER_HOME": str(home),
    }
    env.pop("POSTHOG_PERSONAL_API_KEY", None)
    code, stdout, stderr = warm_python().run(
        RUNNER, argv=[SECRET_KEY, LIMITED_KEY], env=env, cwd=root, name="runs"
    )
    assert code == 0, stderr[-3000:]
    runs = json.loads(stdout.strip().splitlines()[-1])
    log = control.requests_log()
    control.reset()
    return SecretRuns(root, home, stdout, stderr, runs, log)


def test_runs_really_happened_with_both_keys(secret_runs: SecretRuns) -> None:
    """The traces searched below are real: one success, one 403 failure naming the scope."""
    ok, failed = secret_runs.runs
    assert ok["success"] and not failed["success"]
    assert any("lacks scope export:write" in e for e in failed["errors"])
    assert any("lacks scope group:read" in e for e in failed["errors"])
    compute_logs = [p for p in all_files(secret_runs.home) if "compute_logs" in p.parts]
    assert any(p.stat().st_size > 0 for p in compute_logs), "no compute logs were captured"
    event_logs = b"".join(p.read_bytes() for p in all_files(secret_runs.home / "history"))
    assert b"lacks scope export:write" in event_logs  # the failure is in run storage


def test_key_appears_nowhere_on_disk_or_in_output(secret_runs: SecretRuns) -> None:
    searched = all_files(secret_runs.root)  # DAGSTER_HOME, DuckDB (+ WAL), exports, staging, gates
    assert len(searched) > 10 and any(p.suffix == ".duckdb" for p in searched)
    assert any(p.suffix == ".db" for p in searched)  # the SQLite run and event storage
    leaks = [
        (str(p), needle.decode())
        for p in searched
        for needle in NEEDLES
        if needle in p.read_bytes() or needle.decode() in str(p)
    ]
    assert leaks == []
    for stream in (secret_runs.stdout, secret_runs.stderr):
        assert all(needle.decode() not in stream for needle in NEEDLES)
    assert "PostHog answered 403" in secret_runs.stderr  # the output that was searched is real


def test_downloads_redirected_to_storage_never_carry_the_key(secret_runs: SecretRuns) -> None:
    storage = [r for r in secret_runs.log if r["server"] == "storage"]
    assert len(storage) >= 2  # both exports of the successful run went through the 302
    assert [r["authorization"] for r in storage] == [False] * len(storage)
    assert all(r["status"] == 200 for r in storage)
    assert all(r["authorization"] for r in api_requests(secret_runs.log))  # PostHog itself: yes


@pytest.mark.parametrize(
    ("defs_file", "expected"),
    [
        (REAL_DEFS, {"type": "ENV_VAR", "value": "POSTHOG_PERSONAL_API_KEY"}),
        (LITERAL_DEFS, {"type": "SECRET", "value": "********"}),
    ],
    ids=["real_definitions_env_var", "plain_string_key"],
)
def test_ui_shows_the_key_field_as_secret(
    defs_file: str,
    expected: dict[str, str],
    standin: StandinProcess,
    shipped_defs_state: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the Dagster UI's resource page gets over GraphQL: a secret field, never the value."""
    # Imported here: dagster_graphql is slow to import and only these two tests need it.
    from dagster._core.test_utils import in_process_test_workspace
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster_graphql.test.utils import execute_dagster_graphql, infer_resource_selector

    for name, value in standin_env(standin, tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("POSTHOG_PERSONAL_API_KEY", SECRET_KEY)
    monkeypatch.delenv("POSTHOG_ASSETS_CONFIG", raising=False)
    path = tmp_path / "location.py"
    path.write_text(defs_file)
    origin = LoadableTargetOrigin(
        executable_path=sys.executable, python_file=str(path), attribute="defs",
        working_directory=str(Path(__file__).parent.parent),
    )  # fmt: skip
    with dg.instance_for_test() as instance, in_process_test_workspace(instance, origin) as ctx:
        result = execute_dagster_graphql(
            ctx, RESOURCE_QUERY, {"selector": infer_resource_selector(ctx, "posthog")}
        )
    details = result.data["topLevelResourceDetailsOrError"]
    assert details["__typename"] == "ResourceDetails", details
    secret_fields = [f["name"] for f in details["configFields"] if f["isSecret"]]
    # The Redis URL of the shared rate-limit gate may hold a password: secret too.
    assert secret_fields == ["personal_api_key", "rate_limit_url"]
    shown = {v["key"]: v for v in details["configuredValues"]}["personal_api_key"]
    assert {"type": shown["type"], "value": shown["value"]} == expected
    everything = json.dumps(result.data)
    assert SECRET_KEY not in everything and LITERAL_KEY not in everything


@pytest.mark.parametrize(
    "hostile",
    ["../../escaped-{tag}.png", "{root}/abs-escaped-{tag}.png", "..\\..\\escaped-{tag}\r\n.png"],
    ids=["relative_traversal", "absolute_path", "backslashes_and_newline"],
)
def test_hostile_server_filename_stays_inside_the_asset_folder(
    hostile: str, standin: StandinProcess, control: StandinControl, tmp_path: Path
) -> None:
    """PostHog's ``filename`` comes from the server; it must never choose where bytes land."""
    tag = secrets.token_hex(4)
    name = hostile.format(tag=tag, root=tmp_path)
    attributes = {
        "exports": [{"insight": 1, "format": "image/png", "name": "chart_png"}],
        "insights": {"enabled": False},
        "groups": {"enabled": False},
    }
    world = build_world(tmp_path, attributes=attributes)
    # The stand-in numbers exports in order: create one to learn the id the run will get.
    headers = {"Authorization": f"Bearer {standin.key}"}
    exports_url = f"{standin.url}/api/projects/{standin.project_id}/exports/"
    probe = requests.post(
        exports_url, json={"export_format": "image/png", "insight": 1}, headers=headers, timeout=30
    ).json()
    next_id = int(probe["id"]) + 1
    control.configure(export_post_held=False, export_delay_s=0.2)  # the POST answers "pending"
    control.add_fault(
        match=rf"/exports/{next_id}/?$", method="GET", kind="status", status=200,
        body={**probe, "id": next_id, "has_content": True, "exception": None, "filename": name},
    )  # fmt: skip

    result = world.materialize(
        ["exports"], fast_resource(standin, world.export_dir, poll_interval_s=0.5)
    )

    assert result.success, failure_texts(result)
    md = materialized(result)["chart_png"]
    assert md["export_id"] == next_id and md["filename"] == name  # the hostile answer was used
    assert_export_folder(world.export_dir, world.db, ["chart_png"])
    written = Path(md["path"])
    assert written.parent == world.export_dir / "chart_png"
    assert "/" not in written.name and "\\" not in written.name and ".." not in written.name
    assert not written.name.startswith(".") and written.suffix == ".png"
    outside = [p for p in all_files(tmp_path) if tag in p.name and p != written]
    assert outside == []
    content = requests.get(f"{exports_url}{next_id}/content/", headers=headers, timeout=30)
    assert written.read_bytes() == content.content


LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}
"""


def test_a_cross_site_launch_cannot_send_the_key_elsewhere_nor_leave_it_in_storage(
    standin: StandinProcess,
    shipped_defs_state: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dagster's webserver takes a ``text/plain`` POST whose query sits in the URL, from any
    Origin: a web page in the user's browser can launch a run. That run names a capture server
    as ``host`` and sends back the launchpad's mask for the key; it is refused before any
    request, and neither run storage nor the webserver's debug download holds the key."""
    import gzip
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import PythonFileTarget
    from dagster_webserver.webserver import DagsterWebserver
    from starlette.testclient import TestClient

    seen: list[dict[str, str]] = []

    class Capture(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(dict(self.headers))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    capture = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    Thread(target=capture.serve_forever, daemon=True).start()
    evil_host = f"http://127.0.0.1:{capture.server_address[1]}"
    standin.control.add_key(SECRET_KEY, scopes=["*"])
    for name, value in standin_env(standin, tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("POSTHOG_PERSONAL_API_KEY", SECRET_KEY)
    monkeypatch.delenv("POSTHOG_ASSETS_CONFIG", raising=False)
    location = tmp_path / "location.py"
    location.write_text(REAL_DEFS)
    home = tmp_path / "home"
    home.mkdir()
    params = {
        "selector": {
            "repositoryLocationName": "posthog_assets",
            "repositoryName": "__repository__",
            "jobName": "posthog_insights_snapshot",
        },
        "runConfigData": {
            "resources": {
                "posthog": {
                    "config": {
                        "host": evil_host,
                        "project_id": str(standin.project_id),
                        "personal_api_key": "********",
                    }
                }
            }
        },  # fmt: skip
    }
    try:
        direct = {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}
        with dg.instance_for_test(
            temp_dir=str(home), overrides={"run_coordinator": direct}
        ) as instance:  # runs start at once, as the daemon of `make ui` starts queued ones
            target = PythonFileTarget(
                python_file=str(location), attribute="defs", location_name="posthog_assets",
                working_directory=str(shipped_defs_state),
            )  # fmt: skip
            with WorkspaceProcessContext(instance, target) as context:
                web = TestClient(DagsterWebserver(context).create_asgi_app())
                answer = web.post(
                    "/graphql",
                    params={"query": LAUNCH, "variables": json.dumps({"params": params})},
                    headers={
                        "Content-Type": "text/plain",
                        "Origin": "https://evil.example",
                        "Host": "rebound.evil.example:3000",
                    },
                    content=b"",
                ).json()
                launched = answer["data"]["launchPipelineExecution"]
                assert launched["__typename"] == "LaunchRunSuccess", launched  # Dagster's own
                run_id = launched["run"]["runId"]
                run = poll_finished(instance, run_id)
                messages = "\n".join(repr(e) for e in instance.all_logs(run_id))  # + errors
                debug = gzip.decompress(web.get(f"/download_debug/{run_id}").content)
    finally:
        capture.shutdown()

    assert run.status == dg.DagsterRunStatus.FAILURE
    assert f"this run's config would send the PostHog key to '{evil_host}'" in messages
    assert seen == []  # nothing, key or not, ever reached the capture server
    assert debug and SECRET_KEY.encode() not in debug
    stored = [p for p in all_files(home) if any(n in p.read_bytes() for n in NEEDLES)]
    assert stored == []


def poll_finished(instance: dg.DagsterInstance, run_id: str, timeout_s: float = 120) -> Any:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.is_finished:
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish within {timeout_s}s")

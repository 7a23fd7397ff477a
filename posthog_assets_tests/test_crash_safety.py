"""Crash safety: a materialization process SIGKILLed mid-download and mid-DuckDB-write.

Why: a run worker dies without warning (OOM killer, node drain, power). No ``finally`` runs, so
whatever a killed process leaves behind must be harmless: the DuckDB file must open with the
previous snapshot intact (the write is one transaction), a half-written ``.part`` must never
become a file and must be cleaned up, and re-executing the run must resume the export the killed
process had created instead of asking PostHog for another one.

The killed process is a real, separate process (its own session, forked from a warm interpreter
so it starts in milliseconds) running the real code location (``posthog_project.definitions``
imported afresh with ``POSTHOG_ASSETS_CONFIG``) on a real ``DAGSTER_HOME``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
import requests
from dagster._core.instance.ref import InstanceRef

from posthog_assets.snapshots.results import TIDY_TABLES
from posthog_assets_tests.support.config_file import write_config_file
from posthog_assets_tests.support.reliability import (
    Child,
    all_files,
    assert_export_folder,
    build_world,
    exports_created,
    failure_texts,
    fast_resource,
    materialized,
    select,
    warm_python,
    world_document,
)
from posthog_assets_tests.support.session import standin_env
from posthog_assets_tests.support.snapshots import errors
from posthog_standin.server import StandinControl, StandinProcess

pytestmark = pytest.mark.system

#: The project both the killed child (through its configuration file) and the test run.
CRASH: dict[str, Any] = {
    "exports": [{"insight": 2, "format": "text/csv", "name": "big_csv"}],
    "insights": {"refresh": "blocking", "created_by": [2], "page_size": 100},
    "groups": {"enabled": False},
}
#: ~26 MB of CSV (about 88 bytes a row): caught mid-stream once past 1 MB.
BIG_CSV_ROWS = 300_000

RUNNER = r"""
import json, sys, time
import dagster as dg

family, hook = sys.argv[1], sys.argv[2]
if hook == "pause_in_write":
    # Stop between the INSERT and the COMMIT of the snapshot write, and say so: the test kills
    # the process there, inside an open DuckDB transaction.
    from posthog_assets.snapshots import factory

    real = factory.replace_snapshot

    class Paused:
        def __init__(self, conn):
            self._conn = conn

        def __getattr__(self, name):
            return getattr(self._conn, name)

        def execute(self, sql, *args, **kwargs):
            out = self._conn.execute(sql, *args, **kwargs)
            if sql.lstrip().upper().startswith("INSERT INTO"):
                print("IN_TRANSACTION", flush=True)
                time.sleep(120)
            return out

    factory.replace_snapshot = lambda conn, *a, **k: real(Paused(conn), *a, **k)

from posthog_project.definitions import defs

assets = [
    a for a in defs.assets if a.node_def.name.endswith("__insights") == (family == "insights")
]
with dg.DagsterInstance.get() as instance:
    result = dg.materialize(
        assets, resources=defs.resources, instance=instance, raise_on_error=False,
    )
print(json.dumps({"run_id": result.run_id, "success": result.success}), flush=True)
"""


def _spawn(env: dict[str, str], family: str, hook: str, cwd: Path) -> Child:
    """The runner in a real child process (forked from the warm interpreter, own session)."""
    return warm_python().start(
        RUNNER, argv=[family, hook], env=env, cwd=cwd, name=f"killed_{family}"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_when(child: Child, ready: Callable[[], bool], timeout: float) -> None:
    """SIGKILL ``child`` as soon as ``ready()``; fail if it exits or the time runs out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert _alive(child.pid), f"the run ended before the kill point: {child.errors()[-2000:]}"
        assert time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.01)
    assert child.kill() == -signal.SIGKILL


@pytest.fixture
def crash_env(standin: StandinProcess, tmp_path: Path) -> dict[str, str]:
    """A child environment running the real code location against tmp paths and the stand-in."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    config = write_config_file(tmp_path / "posthog_assets.yaml", world_document(tmp_path, CRASH))
    return {
        **os.environ,
        **standin_env(standin, tmp_path),
        "POSTHOG_PERSONAL_API_KEY": standin.key,
        "POSTHOG_ASSETS_CONFIG": str(config),
        "DAGSTER_HOME": str(home),
        "POSTHOG_ASSETS_RATE_LIMIT_DIR": str(tmp_path / "gates"),
    }


def test_kill_mid_download_then_reexecution_resumes_the_same_export(
    standin: StandinProcess, control: StandinControl, tmp_path: Path, crash_env: dict[str, str]
) -> None:
    control.configure(csv_rows=BIG_CSV_ROWS)
    folder = tmp_path / "exports" / "big_csv"

    def downloading() -> bool:
        parts = list(folder.glob(".*.part")) if folder.exists() else []
        return any(p.stat().st_size > 1 << 20 for p in parts)

    _kill_when(_spawn(crash_env, "exports", "none", tmp_path), downloading, timeout=90)

    # What the killed process left: half a .part, the pending-export marker, no file, no row.
    leftovers = all_files(tmp_path / "exports")
    assert [p.name.endswith(".part") for p in leftovers].count(True) == 1
    assert [p.parent.name for p in leftovers if not p.name.endswith(".part")] == [
        ".posthog-pending"
    ]
    assert exports_created(control.requests_log()) == 1
    instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(crash_env["DAGSTER_HOME"]))
    killed = instance.get_runs(limit=1)[0]
    assert killed.status == dg.DagsterRunStatus.STARTED  # nobody told Dagster it died
    instance.report_run_failed(killed)  # what run monitoring does after a worker vanishes

    # Re-execute the killed run (same root run id), as the UI's "Re-execute" does.
    world = build_world(tmp_path, attributes=CRASH)
    result = dg.materialize(
        world.definitions_for(["exports"], checks=True),
        resources=world.resources(fast_resource(standin, world.export_dir)),
        instance=instance,
        tags={"dagster/root_run_id": killed.run_id, "dagster/parent_run_id": killed.run_id},
        raise_on_error=False,
    )

    assert result.success, failure_texts(result)
    md = materialized(result)["big_csv"]
    assert md["resumed"] is True and md["recreated"] is False
    assert exports_created(control.requests_log()) == 1  # resumed, not created again
    assert_export_folder(world.export_dir, world.db, ["big_csv"])  # the stale .part is gone
    url = f"{standin.url}/api/projects/{standin.project_id}/exports/{md['export_id']}/content/"
    server = requests.get(url, headers={"Authorization": f"Bearer {standin.key}"}, timeout=60)
    assert Path(md["path"]).read_bytes() == server.content
    assert not errors(result.get_asset_check_evaluations())
    instance.dispose()


def test_kill_inside_the_duckdb_transaction_keeps_the_previous_snapshot(
    standin: StandinProcess, control: StandinControl, tmp_path: Path, crash_env: dict[str, str]
) -> None:
    world = build_world(tmp_path, attributes=CRASH)
    resource = fast_resource(standin, world.export_dir)
    first = world.materialize(["insights"], resource, checks=False)
    assert first.success, failure_texts(first)
    before = _insights(world.db)
    assert len(before) > 100 and len({r[0] for r in before}) == len(before)

    child = _spawn(crash_env, "insights", "pause_in_write", tmp_path)
    _kill_when(child, lambda: "IN_TRANSACTION" in child.output(), timeout=90)

    # The file opens, and holds exactly the previous snapshot: no partial, no duplicate rows.
    assert _insights(world.db) == before
    staged = list((tmp_path / ".posthog_staging").rglob("*.ndjson"))
    # the killed run's staged rows (insights and each tidy table): ignored by later runs
    assert sorted(p.name.rsplit("-", 1)[0] for p in staged) == sorted(["insights", *TIDY_TABLES])

    rerun = world.materialize(["insights"], resource, checks=True)
    assert rerun.success, failure_texts(rerun)
    after = _insights(world.db)
    assert [r[0] for r in after] == [r[0] for r in before]  # same insights, each once
    assert {r[1] for r in after} != {r[1] for r in before}  # replaced by the new snapshot
    assert len({r[1] for r in after}) == 1
    checks = rerun.get_asset_check_evaluations()
    assert checks and not errors(checks)
    conn = duckdb.connect(str(world.db))  # and it opens read-write too (no stuck lock or WAL)
    conn.close()


def _insights(db: Path) -> list[tuple[int, str]]:
    return [
        (int(i), str(at))
        for i, at in select(db, "SELECT id, snapshot_at FROM insights ORDER BY id, snapshot_at")
    ]

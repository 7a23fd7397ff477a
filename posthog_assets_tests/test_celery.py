"""The same definitions with their steps on two Celery workers, as ``deploy/celery/`` deploys them.

Real processes throughout: Redis (broker, result backend, rate-limit gate), PostgreSQL (Dagster's
storage and pool slots, ``deploy/celery/dagster.yaml``), the session's stand-in, two workers
started as the README says, each with its own ``HOME``, ``TMPDIR`` and rate-limit folder and an
environment of nothing but what the README lists (two "hosts" sharing only Redis, Postgres and the
folder of exports, DuckDB file and step outputs), and a run worker process with its own
``DAGSTER_HOME`` executing the code location's main job with ``deploy/celery/run_config.yaml``.

1. The main job over a configuration file (four exports in three formats, the insights and groups
   snapshots) succeeds; its steps ran on both workers (each step's ``STEP_START`` pid belongs to
   one worker's process tree, and the worker's own engine event names the same worker); the
   ``duckdb`` pool held across the hosts (no two of its steps overlapped, while other steps did);
   every file equals the stand-in's export and DuckDB holds what the stand-in holds, once.
2. A worker is SIGKILLed while its export step polls PostHog. The run fails within the
   lost-worker timeout (instead of waiting forever for a result that never comes); re-executed
   from failure it completes on the surviving worker, resuming the exports the killed step had
   created: each export POSTed once, materialized once, one file and one log row each.

Everything started here is stopped in ``finally`` (process groups), and checked gone.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import requests

from posthog_assets.pools import DUCKDB_POOL, POOL_LIMITS
from posthog_assets.tables import EXPORTS_GROUP
from posthog_standin.server import StandinControl, StandinProcess

pytestmark = [pytest.mark.system, pytest.mark.xdist_group("celery")]

pytest.register_assert_rewrite("posthog_assets_tests.support.celery")
from posthog_assets_tests.support.celery import (  # noqa: E402
    CeleryWorker,
    Deployment,
    RunWorker,
    StepSpan,
    celery_workers,
    deployment,
    overlapping,
    prepare_instance,
    run_config,
    start_run,
    step_pools,
    step_spans,
)
from posthog_assets_tests.support.postgres import PostgresServer  # noqa: E402
from posthog_assets_tests.support.redis import RedisServer  # noqa: E402
from posthog_assets_tests.support.reliability import (  # noqa: E402
    assert_export_folder,
    duplicates,
    export_post_entries,
    export_records,
    select,
    table_rows,
)

XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
#: The project of the deployment's configuration file (``POSTHOG_ASSETS_CONFIG``).
WORLD: dict[str, Any] = {
    "exports": [
        {"insight": 1, "format": "image/png", "name": "insight_1_png"},
        {"insight": 2, "format": "text/csv", "name": "insight_2_csv"},
        {"insight": 3, "format": XLSX, "name": "insight_3_xlsx"},
        {"dashboard": 1, "name": "dashboard_1_png"},
    ],
    "insights": {"refresh": "blocking", "created_by": [2], "page_size": 100},
    "groups": {"property_values": False},
}
EXPORT_NAMES = ["dashboard_1_png", "insight_1_png", "insight_2_csv", "insight_3_xlsx"]
RUN_TIMEOUT_S = 240.0
OVERLAP_RENDER_S = 3.0
#: Long enough that every export is still rendering when the worker is killed (~1 s after the
#: POSTs), short enough that it is ready when the re-execution resumes it.
EXPORT_DELAY_S = 12.0
#: The test's lost-worker timeout (deploy/celery/run_config.yaml ships 30 s).
LOST_WORKER_TIMEOUT_S = 10.0


@pytest.fixture
def celery_deployment(
    standin: StandinProcess,
    control: StandinControl,
    redis_server: RedisServer,
    postgres: PostgresServer,
    tmp_path: Path,
) -> Deployment:
    redis_server.flush()
    control.clear_requests_log()
    return deployment(
        shared=tmp_path / "shared",
        standin=standin,
        postgres=postgres,
        redis=redis_server,
        attributes=WORLD,
    )


def test_main_job_runs_on_two_celery_workers_with_pools_held_and_complete_data(
    standin: StandinProcess,
    control: StandinControl,
    celery_deployment: Deployment,
    postgres: PostgresServer,
    tmp_path: Path,
) -> None:
    dep = celery_deployment
    # The export step renders for a few seconds, so other steps surely run beside it.
    control.configure(export_delay_s=OVERLAP_RENDER_S)
    instance = prepare_instance(dep, tmp_path / "test_home")
    try:
        with celery_workers(dep, [tmp_path / "host1", tmp_path / "host2"]) as workers:
            run = start_run(dep, tmp_path / "run_host", name="main")
            try:
                outcome = run.result(RUN_TIMEOUT_S)
            finally:
                run.kill()
            assert outcome["success"], _why(instance, outcome["run_id"], workers)
        run_id = outcome["run_id"]
        spans = step_spans(instance, run_id)
        planned = set(step_pools(instance, run_id))
    finally:
        instance.dispose()

    # Every planned step ran once (one STEP_START each), and succeeded.
    assert sorted(s.key for s in spans) == sorted(planned)
    assert all(s.outcome == "STEP_SUCCESS" for s in spans), [s for s in spans if s.end is None]

    # On both workers: each step's process belongs to exactly one worker's tree, and the worker
    # that reported executing it ("Celery worker" of its engine event) is that same worker.
    ran_on = {s.key: _worker_of(s, workers) for s in spans}
    assert set(ran_on.values()) == {"w1", "w2"}, Counter(ran_on.values())
    nodes = {w.name: w.node for w in workers}
    assert {s.key: s.worker for s in spans} == {k: nodes[w] for k, w in ran_on.items()}

    # The duckdb pool (limit 1) held across the two hosts: none of its steps (snapshot writes,
    # the exports log, DuckDB checks) overlapped another, while steps did run side by side.
    duckdb_steps = [s for s in spans if s.pool == DUCKDB_POOL]
    assert len(duckdb_steps) >= 8, [s.key for s in duckdb_steps]
    assert overlapping(duckdb_steps) == []
    assert overlapping(spans), "no two steps ever ran at once: the pool proves nothing"
    with postgres.connect() as conn, conn.cursor() as cur:
        cur.execute('SELECT concurrency_key, "limit" FROM concurrency_limits')
        assert dict(cur.fetchall()) == POOL_LIMITS

    # The data is complete: one file per export, equal to the stand-in's content, logged once;
    # each export created once; DuckDB holds what the stand-in holds, each row once.
    assert_export_folder(dep.export_dir, dep.duckdb, EXPORT_NAMES)
    _assert_files_equal_standin(standin, dep.duckdb)
    posts = export_post_entries(control.requests_log())
    assert [p["status"] for p in posts] == [201] * len(EXPORT_NAMES)
    _assert_snapshots_match_standin(standin, dep.duckdb)


def test_killed_worker_fails_its_step_and_reexecution_completes_on_the_survivor(
    standin: StandinProcess,
    control: StandinControl,
    celery_deployment: Deployment,
    tmp_path: Path,
) -> None:
    dep = celery_deployment
    # PostHog answers the POST at once and renders for EXPORT_DELAY_S: the step polls meanwhile.
    control.configure(export_delay_s=EXPORT_DELAY_S, export_post_held=False)
    config = run_config()
    config["execution"]["config"]["celery"]["lost_worker_timeout"] = LOST_WORKER_TIMEOUT_S
    instance = prepare_instance(dep, tmp_path / "test_home")
    try:
        with celery_workers(dep, [tmp_path / "host1", tmp_path / "host2"]) as workers:
            first = start_run(
                dep, tmp_path / "run1", name="killed", groups=[EXPORTS_GROUP], config=config
            )
            try:
                victim = _worker_polling_exports(instance, control, workers, first)
                victim.kill()
                killed_at = time.monotonic()
                failed = first.result(RUN_TIMEOUT_S)
                failed_after = time.monotonic() - killed_at
            finally:
                first.kill()
            survivor = next(w for w in workers if w is not victim)
            assert survivor.proc.poll() is None, "the surviving worker died too"
            second = start_run(
                dep, tmp_path / "run2", name="reexecution", parent_run_id=failed["run_id"]
            )
            try:
                done = second.result(RUN_TIMEOUT_S)
            finally:
                second.kill()
            assert done["success"], _why(instance, done["run_id"], workers)
        killed_run = instance.get_run_by_id(failed["run_id"])
        rerun = instance.get_run_by_id(done["run_id"])
        first_spans = step_spans(instance, failed["run_id"])
        second_spans = step_spans(instance, done["run_id"])
        failures = _failure_messages(instance, failed["run_id"])
        mats = _materializations(instance, [failed["run_id"], done["run_id"]])
    finally:
        instance.dispose()

    # The killed run failed promptly, with the export step failed by the lost-worker watch.
    assert not failed["success"] and killed_run is not None
    assert killed_run.status == dg.DagsterRunStatus.FAILURE
    # (13 s here: a ping every 5 s, the timeout, then the run's other steps end; never "forever")
    assert failed_after < LOST_WORKER_TIMEOUT_S + 30, f"failed {failed_after:.0f} s after the kill"
    assert any("stopped answering" in m and victim.node in m for m in failures), failures
    [lost] = [s for s in first_spans if s.key == "posthog_exports"]
    assert lost.outcome == "STEP_FAILURE" and _worker_of(lost, workers) == victim.name

    # The re-execution (root = the killed run) ran only on the survivor, and succeeded.
    assert rerun is not None and rerun.root_run_id == failed["run_id"]
    assert second_spans and all(s.outcome == "STEP_SUCCESS" for s in second_spans)
    assert {_worker_of(s, workers) for s in second_spans} == {survivor.name}
    assert "posthog_exports" in {s.key for s in second_spans}

    # No duplicate export: the killed step had created every export; the re-execution resumed
    # them. Each export POSTed once, materialized once (in the re-execution), resumed.
    posts = export_post_entries(control.requests_log())
    assert [p["status"] for p in posts] == [201] * len(EXPORT_NAMES)
    assert Counter(m["asset"] for m in mats) == Counter(EXPORT_NAMES)
    assert {m["run_id"] for m in mats} == {done["run_id"]}
    assert all(m["resumed"] for m in mats), mats
    created = sorted(int(r["export_id"]) for r in export_records(dep.duckdb))
    assert created == sorted(m["export_id"] for m in mats)
    # One file per export (no .part, no pending marker left), equal to PostHog's; one log row each.
    assert_export_folder(dep.export_dir, dep.duckdb, EXPORT_NAMES)
    assert duplicates(table_rows(dep.duckdb, "exports")) == []
    _assert_files_equal_standin(standin, dep.duckdb)


# ---------------------------------------------------------------------------------- helpers


def _worker_of(span: StepSpan, workers: list[CeleryWorker]) -> str:
    owners = [w.name for w in workers if span.pid in w.seen]
    assert len(owners) == 1, f"step {span.key} ran in pid {span.pid}, owned by {owners}"
    return owners[0]


def _worker_polling_exports(
    instance: dg.DagsterInstance,
    control: StandinControl,
    workers: list[CeleryWorker],
    run: RunWorker,
    timeout: float = 120.0,
) -> CeleryWorker:
    """The worker running the export step, once every export is created and rendering."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.alive(), f"the run ended early: {run.child.errors()[-3000:]}"
        posted = [p for p in export_post_entries(control.requests_log()) if p["status"] == 201]
        runs = instance.get_runs(limit=1)
        if len(posted) == len(EXPORT_NAMES) and runs:
            for span in step_spans(instance, runs[0].run_id):
                if span.key == "posthog_exports" and span.end is None:
                    return next(w for w in workers if span.pid in w.pids())
        time.sleep(0.1)
    raise AssertionError("the export step never reached its polling")


def _why(instance: dg.DagsterInstance, run_id: str, workers: list[CeleryWorker]) -> str:
    return "\n".join(
        [*_failure_messages(instance, run_id)]
        + [f"--- {w.name} log tail:\n{w.log()[-3000:]}" for w in workers]
    )


def _failure_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    out = []
    for rec in instance.get_records_for_run(run_id, limit=100_000).records:
        event = rec.event_log_entry.dagster_event
        if event is None or event.event_type_value not in ("STEP_FAILURE", "RUN_FAILURE"):
            continue
        data = event.event_specific_data
        error = getattr(data, "error", None)
        out.append(f"{event.step_key}: {event.message} {error.message if error else ''}")
    return out


def _materializations(instance: dg.DagsterInstance, run_ids: list[str]) -> list[dict[str, Any]]:
    """Every export materialization of the runs: asset, run, export id, resumed."""
    out = []
    for run_id in run_ids:
        records = instance.get_records_for_run(
            run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=10_000
        ).records
        for rec in records:
            mat = rec.event_log_entry.asset_materialization
            assert mat is not None
            md = {k: v.value for k, v in mat.metadata.items()}
            if "export_id" in md:
                out.append(
                    {
                        "asset": mat.asset_key.path[-1],
                        "run_id": run_id,
                        "export_id": int(md["export_id"]),  # type: ignore[arg-type]
                        "resumed": bool(md.get("resumed")),
                    }
                )
    return out


def _get(standin: StandinProcess, path: str) -> requests.Response:
    url = f"{standin.url}/api/projects/{standin.project_id}/{path}"
    response = requests.get(url, headers={"Authorization": f"Bearer {standin.key}"}, timeout=60)
    response.raise_for_status()
    return response


def _assert_files_equal_standin(standin: StandinProcess, db: Path) -> None:
    for record in export_records(db):
        served = _get(standin, f"exports/{record['export_id']}/content/").content
        assert Path(record["path"]).read_bytes() == served, record["asset_name"]


def _assert_snapshots_match_standin(standin: StandinProcess, db: Path) -> None:
    """Row counts equal what the stand-in holds (its API, its seed), and no row twice."""
    insights = _get(standin, "insights/?created_by=2&limit=1").json()["count"]
    group_types = _get(standin, "groups_types/").json()
    project = next(
        p for p in standin.control.seed_info()["projects"] if p["id"] == standin.project_id
    )
    expected = {
        "insights": insights,
        "group_types": len(group_types),
        "groups": len(group_types) * int(project["groups"]),
    }
    counts = {t: select(db, f"SELECT count(*) FROM {t}")[0][0] for t in expected}
    assert counts == expected
    for table in ("insights", "group_types", "groups", "group_property_definitions"):
        rows = table_rows(db, table)
        assert rows and duplicates(rows) == [], table
    for table, key in (("insights", "id"), ("groups", "group_type_index, group_key")):
        (distinct,) = select(db, f"SELECT count(DISTINCT ({key})) FROM {table}")[0]
        assert distinct == expected[table], table

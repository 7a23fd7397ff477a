"""Scale-out storage for real: ``deploy/dagster.yaml`` against a throwaway PostgreSQL server.

A PostgreSQL cluster from Debian's packages is created in a temp folder (``initdb`` as the
``postgres`` user, which refuses root), listens on 127.0.0.1 on a free port with password (SCRAM)
authentication, and is stopped in ``finally`` (fixture ``postgres``, ``support/postgres.py``).
Dagster reads ``deploy/dagster.yaml`` unchanged, the connection coming from the ``DAGSTER_PG_*``
env vars, and runs the main job with the multiprocess executor (each step in its own process, the
way a team deployment runs). The test then reads the runs, materializations and pool limits back
through Dagster and straight from the Postgres tables.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from posthog_assets.pools import POOL_LIMITS, apply_pool_limits

# With the other users of the shipped state (one file in the repository): see test_defs.py.
pytestmark = [pytest.mark.system, pytest.mark.xdist_group("dagster_dev")]

# The UI tests register this module as a plugin; rewriting its asserts whoever imports it first.
pytest.register_assert_rewrite("posthog_assets_tests.support.dagster_dev")
from posthog_assets_tests.support.dagster_dev import ROOT, posthog_all_job  # noqa: E402
from posthog_assets_tests.support.postgres import PostgresServer  # noqa: E402

DEPLOY_CONFIG = ROOT / "deploy" / "dagster.yaml"
#: Each step in its own process, forked from a server that imported Dagster, our definitions and
#: the Postgres storage once: a fresh interpreter per step spends 5-20 s on imports on two busy
#: cores (dagster_postgres alone pulls in 450 modules).
PRELOAD_MODULES = [
    "posthog_project.definitions",
    "posthog_assets_tests.support.dagster_dev",
    "dagster_postgres",
    "psycopg2",
    "openpyxl",
]
MULTIPROCESS_RUN_CONFIG = {
    "execution": {
        "config": {
            "multiprocess": {
                "max_concurrent": 2,
                "start_method": {"forkserver": {"preload_modules": PRELOAD_MODULES}},
            }
        }
    }
}


def test_deploy_config_runs_the_main_job_on_postgres_with_multiprocess(
    postgres: PostgresServer,
    shipped_defs_state: Path,
    posthog_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(DEPLOY_CONFIG, home / "dagster.yaml")
    for name, value in {"DAGSTER_HOME": str(home), **postgres.dagster_env()}.items():
        monkeypatch.setenv(name, value)  # step subprocesses inherit these

    job = posthog_all_job()
    expected_keys = {k for k in job.asset_layer.executable_asset_keys}
    assert expected_keys, "the main job has no assets"

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_monitoring_enabled
        assert instance.run_retries_enabled
        apply_pool_limits(instance)

        result = dg.execute_job(
            dg.reconstructable(posthog_all_job),
            instance=instance,
            run_config=MULTIPROCESS_RUN_CONFIG,
        )
        failures = [e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert result.success, f"run failed: {failures}"
        run_id = result.run_id

        record = instance.get_run_record_by_id(run_id)
        assert record is not None and record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        materialized = {
            k for k in expected_keys if instance.get_latest_materialization_event(k) is not None
        }
        assert materialized == expected_keys

    # Straight from the tables, over TCP with the password, as another Dagster process would read.
    with postgres.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
        assert cur.fetchone() == ("SUCCESS",)
        cur.execute(
            "SELECT asset_key FROM event_logs WHERE run_id = %s "
            "AND dagster_event_type = 'ASSET_MATERIALIZATION'",
            (run_id,),
        )
        keys_in_pg = {dg.AssetKey(json.loads(row[0])) for row in cur.fetchall()}
        assert keys_in_pg == expected_keys
        cur.execute(
            "SELECT count(DISTINCT event::json #>> '{dagster_event,pid}') FROM event_logs "
            "WHERE run_id = %s AND dagster_event_type = 'STEP_START'",
            (run_id,),
        )
        (step_pids,) = cur.fetchone()
        steps = len({s.step_key for s in result.get_step_success_events()})
        assert step_pids == steps, "multiprocess: each step ran in its own process"
        cur.execute('SELECT concurrency_key, "limit" FROM concurrency_limits')
        assert dict(cur.fetchall()) == POOL_LIMITS

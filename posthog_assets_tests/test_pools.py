"""Pool slots: a run that ended without releasing its slot (an interrupt while a step started)
never makes a later run wait; a step waiting on a pool says at INFO which run holds it."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus

from posthog_assets.pools import DUCKDB_POOL, apply_pool_limits
from posthog_project.executor import DEFAULT_EXECUTOR

pytestmark = pytest.mark.integration

IN_PROCESS = {"execution": {"config": {"in_process": {}}}}


@dg.op(pool=DUCKDB_POOL)
def writes_duckdb() -> None:
    """Stands for a snapshot's write step: one slot of the single-writer pool."""


@dg.job(executor_def=DEFAULT_EXECUTOR)
def pool_job() -> None:
    writes_duckdb()


def _holder(instance: dg.DagsterInstance, status: DagsterRunStatus) -> str:
    """A run that claimed the duckdb slot, as an interrupted run leaves it."""
    run = DagsterRun(job_name="posthog_all", run_id=str(uuid.uuid4()), status=status)
    instance.add_run(run)
    instance.event_log_storage.claim_concurrency_slot(DUCKDB_POOL, run.run_id, "write")
    return run.run_id


def _execute(instance: dg.DagsterInstance, timeout_s: float) -> dg.ExecutionResult | None:
    """The job through the code location's executor; None if it is still waiting."""
    done: list[dg.ExecutionResult] = []
    thread = threading.Thread(
        target=lambda: done.append(
            dg.execute_job(dg.reconstructable(pool_job), instance=instance, run_config=IN_PROCESS)
        ),
        daemon=True,
    )
    thread.start()
    thread.join(timeout_s)
    return done[0] if done else None


def test_a_slot_left_by_a_run_that_ended_is_freed_when_the_next_run_starts(
    tmp_path: Path,
) -> None:
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        apply_pool_limits(instance, {DUCKDB_POOL: 1})
        dead = _holder(instance, DagsterRunStatus.FAILURE)

        result = _execute(instance, timeout_s=120)

        assert result is not None, "the run waited on a slot held by a run that had ended"
        assert result.success
        logs = [e.user_message for e in instance.all_logs(result.run_id)]
        assert any(f"Freed 1 pool slot(s) still held by run {dead} (FAILURE)" in m for m in logs)
        assert instance.event_log_storage.get_concurrency_info(DUCKDB_POOL).claimed_slots == []


def test_a_step_waiting_on_a_pool_says_at_info_which_run_holds_it(tmp_path: Path) -> None:
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        apply_pool_limits(instance, {DUCKDB_POOL: 1})
        busy = _holder(instance, DagsterRunStatus.STARTED)  # a run still going: left alone

        assert _execute(instance, timeout_s=8) is None  # it waits, rightly
        deadline = time.monotonic() + 30
        said: list[str] = []
        while time.monotonic() < deadline and not said:
            runs = [r for r in instance.get_runs() if r.job_name == "pool_job"]
            said = [
                e.user_message
                for r in runs
                for e in instance.all_logs(r.run_id)
                if e.level == 20 and "waits for a slot of pool duckdb" in e.user_message
            ]
            time.sleep(0.5)
        assert said and f"held by run(s) {busy} (STARTED)" in said[0]
        instance.event_log_storage.free_concurrency_slots_for_run(busy)  # let the thread end

"""The code location's executor: its modes, the shipped Celery run config, the lost-worker watch.

Why: ``deploy/celery/run_config.yaml`` must stay valid for the main job, the default must stay the
forked multiprocess executor, and the watch that ends a run whose Celery worker died must neither
call a busy worker lost too early nor miss a silent one. (The real thing, with two workers and a
SIGKILL: ``test_celery.py``.)
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pytest
import yaml

from posthog_assets_tests.support.dagster_dev import ROOT
from posthog_project.executor import (
    CELERY,
    ENV_EXECUTOR,
    PRELOAD_MODULES,
    WatchedResult,
    WorkerWatch,
    build_executor,
    default_mode,
)

pytestmark = pytest.mark.unit

RUN_CONFIG = ROOT / "deploy" / "celery" / "run_config.yaml"


@dg.asset
def one() -> int:
    return 1


def _job(env: dict[str, str] | None = None) -> dg.JobDefinition:
    defs = dg.Definitions(
        assets=[one],
        jobs=[dg.define_asset_job("all", selection=[one])],
        executor=build_executor(env or {}),
    )
    return defs.resolve_job_def("all")


def test_default_mode_is_multiprocess_and_the_env_can_choose_celery() -> None:
    assert default_mode({}) == {"multiprocess": {}}
    assert default_mode({ENV_EXECUTOR: "in_process"}) == {"in_process": {}}
    celery = default_mode({ENV_EXECUTOR: "celery"})[CELERY]
    assert celery["broker"] == {"env": "DAGSTER_CELERY_BROKER_URL"}
    assert celery["backend"] == {"env": "DAGSTER_CELERY_BACKEND_URL"}
    with pytest.raises(ValueError, match=ENV_EXECUTOR):
        default_mode({ENV_EXECUTOR: "threads"})


def test_the_shipped_celery_run_config_is_valid_for_the_executor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DAGSTER_CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("DAGSTER_CELERY_BACKEND_URL", "redis://127.0.0.1:1/1")
    config = yaml.safe_load(RUN_CONFIG.read_text())
    job = _job()
    assert dg.validate_run_config(job, config)
    assert dg.validate_run_config(job, {"execution": {"config": {"in_process": {}}}})
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.validate_run_config(job, {"execution": {"config": {"threads": {}}}})


def test_in_process_and_default_multiprocess_still_run() -> None:
    job = _job()
    result = job.execute_in_process()  # in-process regardless of the executor
    assert result.success
    # The multiprocess mode gets the forkserver preload unless the run config picks a method.
    assert job.executor_def.config_schema.default_value == {"multiprocess": {}}
    assert PRELOAD_MODULES == ["posthog_project.definitions"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_watch_calls_a_worker_lost_only_after_the_timeout_without_an_answer() -> None:
    clock, answers, pings = FakeClock(), {"w1@h": True}, []

    def ping(destination: list[str], timeout: float) -> list[dict[str, Any]]:
        pings.append(clock.now)
        return [{d: {"ok": "pong"}} for d in destination if answers.get(d)]

    watch = WorkerWatch(ping, timeout=20, interval=5, ping_timeout=1, clock=clock)
    for t in range(0, 60):
        clock.now = float(t)
        assert not watch.lost("w1@h")  # answering: never lost, however long the step runs
    assert pings == [float(t) for t in range(0, 60, 5)]  # one ping per interval, not per tick
    answers["w1@h"] = False  # the host is gone (last answer at t=55)
    lost_at = None
    for t in range(60, 120):
        clock.now = float(t)
        if watch.lost("w1@h"):
            lost_at = t
            break
    assert lost_at == 75


def test_watch_does_not_blame_the_worker_when_the_broker_is_unreachable() -> None:
    clock = FakeClock()

    def ping(destination: list[str], timeout: float) -> list[dict[str, Any]]:
        raise ConnectionError("broker down")

    watch = WorkerWatch(ping, timeout=1, interval=0, clock=clock)
    clock.now = 100.0
    assert not watch.lost("w1@h")


class FakeAsyncResult:
    def __init__(self, state: str, info: Any = None) -> None:
        self.state, self.info, self.revoked = state, info, False

    def ready(self) -> bool:
        return self.state in ("SUCCESS", "FAILURE")

    def get(self) -> list[str]:
        return ["events"]

    def revoke(self) -> None:
        self.revoked = True


class FixedWatch(WorkerWatch):
    def __init__(self, lost: set[str]) -> None:
        self._lost_hosts = lost

    def lost(self, host: str) -> bool:
        return host in self._lost_hosts


def test_watched_result_fails_the_step_of_a_lost_worker_and_revokes_it() -> None:
    started = FakeAsyncResult("STARTED", {"hostname": "w2@h", "pid": 7})
    watched = WatchedResult(started, FixedWatch({"w2@h"}), lambda host: f"failure on {host}")
    assert watched.ready() and started.revoked
    [event] = watched.get()
    assert "failure on w2@h" in event

    alive = FakeAsyncResult("STARTED", {"hostname": "w1@h", "pid": 8})
    assert not WatchedResult(alive, FixedWatch({"w2@h"}), str).ready()
    queued = FakeAsyncResult("PENDING")  # not started yet: nobody to blame
    assert not WatchedResult(queued, FixedWatch({"w2@h"}), str).ready()
    done = FakeAsyncResult("SUCCESS")
    assert WatchedResult(done, FixedWatch(set()), str).get() == ["events"]


def test_the_celery_instance_config_is_the_deploy_one_plus_shared_storage() -> None:
    """deploy/celery/dagster.yaml must not drift from deploy/dagster.yaml: it only adds where
    Dagster's step outputs and captured logs go (the shared volume)."""
    base = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    celery = yaml.safe_load((ROOT / "deploy" / "celery" / "dagster.yaml").read_text())
    added = {k: v for k, v in celery.items() if k not in base}
    assert {k: v for k, v in celery.items() if k in base} == base
    assert set(added) == {"local_artifact_storage", "compute_logs"}
    for section in added.values():
        assert section["config"]["base_dir"] == {"env": "DAGSTER_STORAGE_DIR"}

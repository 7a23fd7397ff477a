"""The code location's executor: where a run's steps execute.

Three modes, chosen per run in its config (``execution: config: <mode>:``):

- ``multiprocess`` (the default): each step in its own process on the run worker, forked from a
  server that imported Dagster and the definitions once (a fresh interpreter per step spends
  seconds on imports), unless the run config chooses another start method;
- ``in_process``: every step in the run worker itself;
- ``celery``: each step sent to Celery workers (``dagster_celery.celery_executor``, the
  ``celery`` extra; ``deploy/celery/``), the same config as that executor plus
  ``lost_worker_timeout``: a step whose worker stops answering for that long fails (below).

``POSTHOG_ASSETS_EXECUTOR=celery`` on the code location makes Celery the default, so runs from
schedules and sensors (which carry no ``execution`` config) go to the workers too; the broker and
result backend then come from ``DAGSTER_CELERY_BROKER_URL`` and ``DAGSTER_CELERY_BACKEND_URL``.

Why the lost-worker watch: dagster-celery's executor waits for each step's Celery result and has
no notion of a worker that died (host lost, SIGKILL, OOM): the result never comes and the run
waits forever, holding its pool slots. No Celery setting fixes that from the worker side (a time
limit is enforced by the worker that died; ``acks_late`` redelivers only after the broker's
visibility timeout, and a visibility timeout shorter than the longest step runs long steps
twice). So the run worker pings the worker that a started step names (``task_track_started``)
and, when it has not answered for ``lost_worker_timeout`` seconds, fails the step with a
``STEP_FAILURE`` (freeing its pool slot) and revokes the task; the run then fails like any run
with a failed step and is re-executed from failure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dagster as dg
from dagster._core.definitions.executor_definition import (
    ExecutorRequirement,
    multiple_process_executor_requirements,
)

ENV_EXECUTOR = "POSTHOG_ASSETS_EXECUTOR"
ENV_CELERY_BROKER = "DAGSTER_CELERY_BROKER_URL"
ENV_CELERY_BACKEND = "DAGSTER_CELERY_BACKEND_URL"
MULTIPROCESS, IN_PROCESS, CELERY = "multiprocess", "in_process", "celery"
#: Steps a fresh interpreter would spend seconds importing; forked from a server that did once.
PRELOAD_MODULES = ["posthog_project.definitions"]


def _celery_executor() -> dg.ExecutorDefinition | None:
    try:
        from dagster_celery import celery_executor
    except ImportError:  # the `celery` extra is not installed: no `celery` mode
        return None
    return celery_executor


CELERY_EXECUTOR = _celery_executor()


def celery_config_from_env() -> dict[str, Any]:
    """The ``celery`` mode's config with the broker and the result backend read from the env
    (when the run starts, on the run worker)."""
    return {"broker": {"env": ENV_CELERY_BROKER}, "backend": {"env": ENV_CELERY_BACKEND}}


#: Seconds without an answer after which a started step's Celery worker counts as lost.
DEFAULT_LOST_WORKER_TIMEOUT_S = 30.0
#: How often the run worker asks a busy worker whether it is alive, and how long it waits.
PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 2.0


def _modes() -> dict[str, dg.Field]:
    base = dg.multi_or_in_process_executor.config_schema.config_type
    modes = dict(base.fields)  # multiprocess, in_process: Dagster's default executor
    if CELERY_EXECUTOR is not None:
        fields = dict(CELERY_EXECUTOR.config_schema.config_type.fields)
        fields["lost_worker_timeout"] = dg.Field(
            float,
            default_value=DEFAULT_LOST_WORKER_TIMEOUT_S,
            description="Fail a started step whose Celery worker has not answered a ping for "
            "this many seconds (the workers need task_track_started, deploy/celery/).",
        )
        modes[CELERY] = dg.Field(dg.Shape(fields), is_required=False)
    return modes


def default_mode(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """``{multiprocess: {}}``, or what ``POSTHOG_ASSETS_EXECUTOR`` names."""
    mode = env.get(ENV_EXECUTOR, "").strip() or MULTIPROCESS
    if mode == CELERY:
        if CELERY_EXECUTOR is None:
            raise ImportError(
                f"{ENV_EXECUTOR}=celery needs dagster-celery: pip install 'posthog-assets[celery]'"
            )
        return {CELERY: celery_config_from_env()}
    if mode not in (MULTIPROCESS, IN_PROCESS):
        raise ValueError(f"{ENV_EXECUTOR} must be {MULTIPROCESS}, {IN_PROCESS} or {CELERY}")
    return {mode: {}}


def _forkserver_by_default(multiprocess: Mapping[str, Any]) -> dict[str, Any]:
    if multiprocess.get("start_method"):
        return dict(multiprocess)
    start = {"forkserver": {"preload_modules": PRELOAD_MODULES}}
    return {**multiprocess, "start_method": start}


def _requirements(config: Mapping[str, Any]) -> Sequence[ExecutorRequirement]:
    """Steps in other processes read their inputs from storage, not memory."""
    return [] if IN_PROCESS in config else multiple_process_executor_requirements()


def _create(init_context: dg.InitExecutorContext) -> dg.Executor:
    config = init_context.executor_config
    if CELERY in config:
        return PoolWatch(_celery(config[CELERY]))  # type: ignore[arg-type]
    if MULTIPROCESS in config:
        multiprocess = _forkserver_by_default(config[MULTIPROCESS])  # type: ignore[arg-type]
        config = {MULTIPROCESS: multiprocess}
    default = dg.multi_or_in_process_executor
    assert default.executor_creation_fn is not None
    return PoolWatch(default.executor_creation_fn(init_context._replace(executor_config=config)))


_BLOCKED = ("Step blocked by limit for pool ", "Step still blocked by limit for pool ")


class PoolWatch(dg.Executor):
    """An executor that frees the pool slots runs no longer running hold (when the run starts,
    and when a step finds its pool full), and says at INFO which runs hold a pool a step waits
    for: Dagster itself says only "blocked", at DEBUG (:mod:`posthog_assets.pools`)."""

    def __init__(self, inner: dg.Executor) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        """What the inner executor offers besides (dagster-celery asks its ``app_args()``)."""
        return getattr(self.inner, name)

    @property
    def retries(self) -> Any:
        return self.inner.retries

    @property
    def step_dependency_config(self) -> Any:
        return self.inner.step_dependency_config

    def execute(self, plan_context: Any, execution_plan: Any) -> Any:
        from posthog_assets.pools import free_slots_of_ended_runs, slot_holders

        instance = plan_context.instance
        free_slots_of_ended_runs(instance, plan_context.log)
        for event in self.inner.execute(plan_context, execution_plan):
            yield event
            message = event.message or ""
            if event.is_engine_event and message.startswith(_BLOCKED):
                pool = message.rsplit(" ", 1)[-1]
                free_slots_of_ended_runs(instance, plan_context.log)
                held = ", ".join(f"{r} ({s})" for r, s in slot_holders(instance, pool))
                plan_context.log.info(
                    f'Step "{event.step_key}" waits for a slot of pool {pool}, held by run(s) '
                    f"{held or 'none now'}"
                )


# ------------------------------------------------------------------------------------------------
# Celery, with the lost-worker watch


def _celery(config: Mapping[str, Any]) -> dg.Executor:
    """dagster-celery's executor as ``celery_executor`` builds it, its results watched. Relies on
    dagster-celery 0.29.27 (pinned): the execution loop takes the function that submits a step,
    and only calls ``ready``, ``get`` and ``revoke`` on what it returns."""
    from dagster._core.execution.retries import RetryMode
    from dagster_celery.executor import CeleryExecutor

    class WatchedCeleryExecutor(CeleryExecutor):
        """dagster-celery's executor; each step's result is watched for a lost worker."""

        lost_worker_timeout = float(config["lost_worker_timeout"])

        def execute(self, plan_context: Any, execution_plan: Any) -> Any:
            from dagster_celery.core_execution_loop import core_celery_execution_loop
            from dagster_celery.executor import _submit_task

            watch: list[WorkerWatch] = []

            def submit(app: Any, context: Any, step: Any, *args: Any) -> WatchedResult:
                if not watch:
                    watch.append(WorkerWatch(app.control.ping, self.lost_worker_timeout))
                result = _submit_task(app, context, step, *args)
                return WatchedResult(result, watch[0], lambda host: _lost(context, step, host))

            return core_celery_execution_loop(plan_context, execution_plan, submit)

    return WatchedCeleryExecutor(
        broker=config.get("broker"),
        backend=config.get("backend"),
        config_source=config.get("config_source"),
        include=config.get("include"),
        retries=RetryMode.from_config(config["retries"]),  # type: ignore[arg-type]
    )


class WorkerWatch:
    """Which Celery workers answer a ping; a worker silent for ``timeout`` seconds is lost."""

    def __init__(
        self,
        ping: Callable[..., list[dict[str, Any]]],
        timeout: float,
        *,
        interval: float = PING_INTERVAL_S,
        ping_timeout: float = PING_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ping, self._timeout, self._interval = ping, timeout, interval
        self._ping_timeout, self._clock = ping_timeout, clock
        self._last_answer: dict[str, float] = {}
        self._last_ping: dict[str, float] = {}

    def lost(self, host: str) -> bool:
        now = self._clock()
        self._last_answer.setdefault(host, now)  # first seen busy: alive until proven silent
        if now - self._last_ping.get(host, float("-inf")) >= self._interval:
            self._last_ping[host] = now
            try:
                replies = self._ping(destination=[host], timeout=self._ping_timeout)
            except Exception:  # the broker is unreachable: that says nothing about the worker
                return False
            if any(host in reply for reply in replies or []):
                self._last_answer[host] = self._clock()
        return self._clock() - self._last_answer[host] >= self._timeout


class WatchedResult:
    """A Celery ``AsyncResult`` that becomes ready, with a step failure, when the worker that
    started the step is lost (what the execution loop calls: ``ready``, ``get``, ``revoke``)."""

    def __init__(self, result: Any, watch: WorkerWatch, failure: Callable[[str], Any]) -> None:
        self._result, self._watch, self._failure = result, watch, failure
        self._lost: str | None = None

    def ready(self) -> bool:
        if self._lost is not None or self._result.ready():
            return True
        if self._result.state == "STARTED":  # the worker records itself when it starts the step
            host = (self._result.info or {}).get("hostname")
            if host and self._watch.lost(host):
                self._lost = host
                self._result.revoke()  # should the message ever come back, it is dropped
                return True
        return False

    def get(self) -> Any:
        if self._lost is not None:
            from dagster._serdes import serialize_value

            return [serialize_value(self._failure(self._lost))]
        return self._result.get()

    def revoke(self) -> None:
        self._result.revoke()


def _lost(plan_context: Any, step: Any, host: str) -> dg.DagsterEvent:
    """The step's failure, reported by the run worker (written to the event log now)."""
    from dagster._core.events import StepFailureData
    from dagster._utils.error import SerializableErrorInfo

    message = (
        f'Celery worker {host} stopped answering while it ran step "{step.key}" (host lost, '
        "process killed?): the step is failed so that the run ends and can be re-executed "
        "from failure."
    )
    error = SerializableErrorInfo(message=message, stack=[], cls_name="CeleryWorkerLost")
    return dg.DagsterEvent.step_failure_event(
        step_context=plan_context.for_step(step),
        step_failure_data=StepFailureData(error=error, user_failure_data=None),
    )


def build_executor(env: Mapping[str, str] = os.environ) -> dg.ExecutorDefinition:
    """The executor, its default mode taken from ``env`` (see the module docstring)."""
    return dg.ExecutorDefinition(
        name="posthog_executor",
        config_schema=dg.Field(dg.Selector(_modes()), default_value=default_mode(env)),
        executor_creation_fn=_create,
        requirements=_requirements,
        description=(
            "Each step in its own process (multiprocess, the default), all in the run worker "
            "(in_process), or on Celery workers (celery)."
        ),
    )


DEFAULT_EXECUTOR = build_executor()

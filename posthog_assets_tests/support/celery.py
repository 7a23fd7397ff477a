"""Steps on Celery workers for real: workers as separate processes, "hosts" of their own.

A deployment here is what ``deploy/celery/`` describes, on one machine:

- PostgreSQL (Dagster's runs, event log, pool slots) and Redis (the Celery broker, the result
  backend and the PostHog rate-limit gate, each in its own database number);
- a shared folder standing for the volume every host mounts: export files, the DuckDB file,
  Dagster's step outputs (``DAGSTER_STORAGE_DIR``) and the configuration file
  (``POSTHOG_ASSETS_CONFIG``, naming the paths through ``POSTHOG_ASSETS_DUCKDB`` and
  ``POSTHOG_ASSETS_EXPORT_DIR``);
- Celery workers started exactly as the README says (``celery -A dagster_celery.app worker`` with
  ``deploy/celery`` on ``PYTHONPATH``), each in its own process group with its own ``HOME``,
  ``TMPDIR`` and rate-limit folder, and an environment built from nothing but what the README
  lists (and the repository on ``PYTHONPATH``: the code location's source, which a deployment
  ships to every host): a worker sees no other worker's files and nothing of the test process;
- a run worker: a separate process (forked from the warm interpreter) with its own
  ``DAGSTER_HOME`` holding ``deploy/celery/dagster.yaml``, executing the job with
  ``deploy/celery/run_config.yaml``, as the run launcher's process would.

Also here: reading step timings and process ids back from the event log, and the check that
nothing a test started is left running. Used by ``test_celery.py`` (``bench/celery.py`` has its
own, in ``bench/harness.py``: the benchmarks import nothing of the tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import yaml

from posthog_assets.pools import apply_pool_limits
from posthog_assets_tests.support.config_file import project_document, write_config_file
from posthog_assets_tests.support.dagster_dev import ROOT
from posthog_assets_tests.support.postgres import PostgresServer
from posthog_assets_tests.support.redis import RedisServer
from posthog_assets_tests.support.reliability import Child, warm_python
from posthog_assets_tests.support.session import with_code_location
from posthog_standin.server import StandinProcess

CELERY_DIR = ROOT / "deploy" / "celery"
RUN_CONFIG = CELERY_DIR / "run_config.yaml"
INSTANCE_CONFIG = CELERY_DIR / "dagster.yaml"
WORKER_READY_TIMEOUT_S = 120.0
#: The job the run worker executes: the code location's main job.
JOB_NAME = "posthog_all"
#: Tag of every run a test launches, to find it in the event log while it runs.
TEST_TAG = "posthog-assets-test/celery"

#: What the run worker executes: the code location's job from its module (the pointer a code
#: server hands the run launcher), on the instance of ``DAGSTER_HOME``; a re-execution when a
#: parent run id is given. Prints the run id and the outcome as one JSON line.
RUN_SCRIPT = r"""
import json, sys
import dagster as dg
from dagster._core.definitions.reconstruct import ReconstructableRepository

args = json.loads(sys.argv[1])
repo = ReconstructableRepository.for_module("posthog_project.definitions", "defs")
job = repo.get_reconstructable_job(args["job"])
selection = None
if args.get("groups"):
    from posthog_project.definitions import defs

    specs = defs.resolve_all_asset_specs()
    selection = [spec.key for spec in specs if spec.group_name in args["groups"]]
with dg.DagsterInstance.get() as instance:
    options = None
    if args.get("parent_run_id"):
        options = dg.ReexecutionOptions.from_failure(args["parent_run_id"], instance)
        selection = None  # the parent run's selection
    result = dg.execute_job(
        job,
        instance=instance,
        run_config=args["run_config"],
        tags=args["tags"],
        reexecution_options=options,
        asset_selection=selection,
    )
    print(json.dumps({"run_id": result.run_id, "success": result.success}), flush=True)
"""


def run_config() -> dict[str, Any]:
    """``deploy/celery/run_config.yaml``, as shipped."""
    return yaml.safe_load(RUN_CONFIG.read_text())


def host_env(root: Path) -> dict[str, str]:
    """What a fresh host has: a ``PATH`` to the same Python, a home and a temp folder of its own."""
    for name in ("home", "tmp"):
        (root / name).mkdir(parents=True, exist_ok=True)
    path = os.environ.get("PATH", "/usr/bin:/bin")
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{path}",
        "LANG": "C.UTF-8",
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class Deployment:
    """What every host of the deployment shares, and the env each of them needs."""

    shared: Path
    env: dict[str, str]

    @property
    def export_dir(self) -> Path:
        return Path(self.env["POSTHOG_ASSETS_EXPORT_DIR"])

    @property
    def duckdb(self) -> Path:
        return Path(self.env["POSTHOG_ASSETS_DUCKDB"])


def deployment(
    *,
    shared: Path,
    standin: StandinProcess,
    postgres: PostgresServer,
    redis: RedisServer,
    attributes: Mapping[str, Any],
) -> Deployment:
    """The env of every host (deploy/celery/README.md lists it), pointing into ``shared``; the
    project (``attributes`` of its configuration file: exports, insights, groups) with its DuckDB
    file and export folder named through the env, as the README's table has them."""
    shared.mkdir(parents=True, exist_ok=True)
    config = write_config_file(shared / "posthog_assets.yaml", project_document(**attributes))
    base = redis.url.rsplit("/", 1)[0]
    env = {
        **postgres.dagster_env(),
        "DAGSTER_CELERY_BROKER_URL": f"{base}/0",
        "DAGSTER_CELERY_BACKEND_URL": f"{base}/1",
        "POSTHOG_ASSETS_RATE_LIMIT_URL": f"{base}/2",
        "DAGSTER_STORAGE_DIR": str(shared / "dagster"),
        "POSTHOG_HOST": standin.url,
        "POSTHOG_PROJECT_ID": str(standin.project_id),
        "POSTHOG_PERSONAL_API_KEY": standin.key,
        "POSTHOG_ASSETS_CONFIG": str(config),
        "POSTHOG_ASSETS_DUCKDB": str(shared / "posthog.duckdb"),
        "POSTHOG_ASSETS_EXPORT_DIR": str(shared / "exports"),
    }
    return Deployment(shared=shared, env=env)


# ------------------------------------------------------------------------------------------------
# Workers


@dataclass
class CeleryWorker:
    """``celery -A dagster_celery.app worker`` in its own process group, on its own "host"."""

    name: str
    root: Path
    proc: subprocess.Popen[bytes]
    seen: set[int] = field(default_factory=set)

    @property
    def node(self) -> str:
        """Celery's node name, as the step's engine event records it ("Celery worker")."""
        return f"{self.name}@{socket.gethostname()}"

    @property
    def log_path(self) -> Path:
        return self.root / "worker.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pids(self) -> set[int]:
        """The worker's process and its pool processes now (remembered for the final check)."""
        try:
            main = psutil.Process(self.proc.pid)
            now = {main.pid, *(p.pid for p in main.children(recursive=True))}
        except psutil.Error:
            now = set()
        self.seen |= now
        return now

    def kill(self) -> None:
        """SIGKILL to the whole group: the host is gone, no handler runs."""
        self.pids()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL to the group if it lingers."""
        self.pids()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # pool processes left behind, if any
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)


def start_worker(
    name: str,
    dep: Deployment,
    root: Path,
    *,
    concurrency: int = 1,
    extra_env: Mapping[str, str] | None = None,
) -> CeleryWorker:
    """One worker as the README starts it; ``root`` is its host (home, temp, gates, log)."""
    env = {
        **host_env(root),
        **dep.env,
        "POSTHOG_ASSETS_RATE_LIMIT_DIR": str(root / "gates"),
        "PYTHONPATH": str(CELERY_DIR),  # dagster_celery_config.py
        **(extra_env or {}),
    }
    env = with_code_location(env)
    cmd = [
        sys.executable, "-m", "celery", "-A", "dagster_celery.app", "worker",
        "--hostname", f"{name}@%h", "--queues", "dagster",
        "--concurrency", str(concurrency), "--prefetch-multiplier", "1",
        "--include", "posthog_project.definitions",
        "--without-gossip", "--without-mingle", "--loglevel", "INFO",
    ]  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    with (root / "worker.log").open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = CeleryWorker(name=name, root=root, proc=proc)
    worker.pids()
    return worker


def wait_ready(workers: Sequence[CeleryWorker], timeout: float = WORKER_READY_TIMEOUT_S) -> None:
    """Until each worker logs "<node> ready." (connected, pool started, definitions imported)."""
    deadline = time.monotonic() + timeout
    pending = list(workers)
    while pending:
        for worker in list(pending):
            if f"{worker.node} ready." in worker.log():
                worker.pids()
                pending.remove(worker)
            elif worker.proc.poll() is not None:
                code, tail = worker.proc.returncode, worker.log()[-3000:]
                raise AssertionError(f"worker {worker.name} exited ({code}):\n{tail}")
        if pending and time.monotonic() > deadline:
            raise AssertionError(
                f"workers not ready after {timeout:.0f} s: "
                + "; ".join(f"{w.name}: {w.log()[-1500:]}" for w in pending)
            )
        time.sleep(0.2)


def leftovers(pids: Iterable[int]) -> list[str]:
    """Processes of ``pids`` still running (zombies waiting for a parent's wait() excluded)."""
    left = []
    for pid in sorted(set(pids)):
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid}: {' '.join(proc.cmdline())[:120]}")
        except psutil.Error:
            continue
    return left


@contextmanager
def celery_workers(
    dep: Deployment, roots: Sequence[Path], *, concurrency: int = 1
) -> Iterator[list[CeleryWorker]]:
    """Workers ``w1``, ``w2``, ... (one per root), ready; all stopped on the way out, whatever
    happened, and then none of their processes may be left."""
    workers: list[CeleryWorker] = []
    try:
        for i, root in enumerate(roots, start=1):
            workers.append(start_worker(f"w{i}", dep, root, concurrency=concurrency))
        wait_ready(workers)
        yield workers
    finally:
        for worker in workers:
            worker.stop()
        seen = {pid for w in workers for pid in w.seen}
        deadline = time.monotonic() + 10
        while leftovers(seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = leftovers(seen)
        assert not left, f"worker processes left: {left}"


# ------------------------------------------------------------------------------------------------
# The run worker


@dataclass
class RunWorker:
    """A run in its own process; ``home`` is that process's ``DAGSTER_HOME``."""

    child: Child
    home: Path

    def result(self, timeout: float) -> dict[str, Any]:
        """The run's id and outcome, once the process has finished."""
        code = self.child.wait(timeout)
        lines = [ln for ln in self.child.output().splitlines() if ln.startswith("{")]
        out, err = self.child.output()[-2000:], self.child.errors()[-4000:]
        assert code == 0 and lines, f"run worker exited {code}:\n{out}\n{err}"
        return json.loads(lines[-1])

    def alive(self) -> bool:
        try:
            os.kill(self.child.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        if self.alive():
            self.child.kill()


def instance_home(root: Path) -> Path:
    """A ``DAGSTER_HOME`` with ``deploy/celery/dagster.yaml``, unchanged."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(INSTANCE_CONFIG, root / "dagster.yaml")
    return root


def start_run(
    dep: Deployment,
    root: Path,
    *,
    name: str,
    parent_run_id: str | None = None,
    config: Mapping[str, Any] | None = None,
    groups: Sequence[str] = (),
    tags: Mapping[str, str] | None = None,
) -> RunWorker:
    """The job (only the assets of ``groups``, if given) on the Celery workers, orchestrated
    from a separate process with its own host; a re-execution from failure of
    ``parent_run_id`` if given."""
    home = instance_home(root / "dagster_home")
    env = with_code_location({**host_env(root), **dep.env, "DAGSTER_HOME": str(home)})
    args = {
        "job": JOB_NAME,
        # A re-execution runs with its parent's config unless told otherwise (as the UI's).
        "run_config": dict(config)
        if config is not None
        else (None if parent_run_id else run_config()),
        "tags": {TEST_TAG: name, **(tags or {})},
        "parent_run_id": parent_run_id,
        "groups": list(groups),
    }
    child = warm_python().start(
        RUN_SCRIPT, argv=[json.dumps(args)], env=env, cwd=root, name=f"run_{name}"
    )
    return RunWorker(child=child, home=home)


def open_instance(dep: Deployment, root: Path) -> dg.DagsterInstance:
    """The deployment's instance from the test process (env from ``dep``, not os.environ)."""
    from dagster._core.instance.ref import InstanceRef

    home = instance_home(root)
    saved = {k: os.environ.get(k) for k in dep.env}
    os.environ.update(dep.env)
    try:
        instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
        instance.run_storage  # noqa: B018  (connect while the env is set)
        instance.event_log_storage  # noqa: B018
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return instance


def prepare_instance(dep: Deployment, root: Path) -> dg.DagsterInstance:
    """The instance with the package's pool limits stored (``python -m posthog_assets.pools``)."""
    instance = open_instance(dep, root)
    apply_pool_limits(instance)
    return instance


# ------------------------------------------------------------------------------------------------
# What the event log says


@dataclass(frozen=True)
class StepSpan:
    """One step attempt: where it ran and when (event log timestamps)."""

    key: str
    pid: int
    start: float
    end: float | None
    outcome: str
    pool: str | None
    worker: str | None


def step_spans(instance: dg.DagsterInstance, run_id: str) -> list[StepSpan]:
    """Every step attempt of the run, in order: STEP_START (pid, time) to its STEP_SUCCESS or
    STEP_FAILURE, the Celery worker that reported "Executing steps ... in celery worker", and
    the step's pool (from the plan)."""
    records = instance.get_records_for_run(run_id, limit=100_000).records
    pools = step_pools(instance, run_id)
    open_spans: dict[str, dict[str, Any]] = {}
    workers: dict[str, str] = {}
    spans: list[StepSpan] = []

    def close(key: str, end: float | None, outcome: str) -> None:
        span = open_spans.pop(key)
        spans.append(
            StepSpan(key, span["pid"], span["start"], end, outcome, pools.get(key), span["worker"])
        )

    for rec in records:
        entry = rec.event_log_entry
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        key, kind = event.step_key, event.event_type_value
        if kind == "ENGINE_EVENT" and "in celery worker" in (event.message or ""):
            md = event.engine_event_data.metadata if event.engine_event_data else {}
            if "Celery worker" in md:
                workers[key] = str(md["Celery worker"].value)
        elif kind == "STEP_START":
            if key in open_spans:
                close(key, None, "RESTARTED")
            open_spans[key] = {
                "pid": int(event.pid or 0),
                "start": entry.timestamp,
                "worker": workers.get(key),
            }
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE") and key in open_spans:
            close(key, entry.timestamp, kind)
    for key in list(open_spans):
        close(key, None, "RUNNING")
    return sorted(spans, key=lambda s: s.start)


def step_pools(instance: dg.DagsterInstance, run_id: str) -> dict[str, str | None]:
    """Step key -> pool, from the run's execution plan snapshot."""
    run = instance.get_run_by_id(run_id)
    assert run is not None and run.execution_plan_snapshot_id
    plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
    return {step.key: step.pool for step in plan.steps}


def overlapping(spans: Sequence[StepSpan]) -> list[tuple[str, str]]:
    """Pairs of finished spans whose [start, end] intervals intersect."""
    done = sorted((s for s in spans if s.end is not None), key=lambda s: s.start)
    pairs = []
    for i, a in enumerate(done):
        for b in done[i + 1 :]:
            assert a.end is not None
            if b.start < a.end:
                pairs.append((a.key, b.key))
    return pairs

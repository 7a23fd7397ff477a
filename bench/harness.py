"""What the benchmarks share, built on the package and its stand-in only (never the test suite).

- A *world* (``bench/chaos.py``): a project's export, insights and group assets built with the
  package's own factories, wired to one DuckDB file and one export folder; what a run left behind
  (DuckDB rows without the columns that legitimately differ between two runs, files), the
  stand-in's request log, and seeded chaos rules.
- A *deployment* (``bench/celery.py``): what ``deploy/celery/`` describes, on one machine:
  PostgreSQL (Debian's server binaries) and Redis, a shared folder, Celery workers started as the
  README says, each its own "host" (home, temp and rate-limit folders), and a run worker process
  with its own ``DAGSTER_HOME`` executing the code location's job with ``run_config.yaml``.

Import it from a script in this folder (``python bench/<name>.py`` puts the folder on the path).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import yaml
from dagster_duckdb import DuckDBResource

from posthog_assets.config import ExportConfig, GroupsConfig, InsightsConfig, PostHogProject
from posthog_assets.exports.assets import build_posthog_export_assets
from posthog_assets.exports.checks import build_posthog_export_checks
from posthog_assets.exports.log import build_posthog_exports_log_asset
from posthog_assets.pools import apply_pool_limits
from posthog_assets.resources import PostHogResource
from posthog_assets.snapshots.definitions import build_posthog_snapshot_definitions
from posthog_assets.tables import open_read_only, table_columns
from posthog_standin.server import StandinProcess

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------
# A world of assets (chaos)

EXPORTS = "exports"
SNAPSHOT_NAMES = (
    "insights",
    "group_types",
    "groups",
    "group_property_definitions",
    "group_property_values",
    "tracked_groups",
)
#: What a run materializes: the export step (and its DuckDB log), each snapshot asset.
ALL_FAMILIES = (EXPORTS, *SNAPSHOT_NAMES)
#: Table each family writes.
FAMILY_TABLE = {EXPORTS: "exports", **{name: name for name in SNAPSHOT_NAMES}}
#: Columns that legitimately differ between two correct runs.
VOLATILE_COLUMNS: dict[str, frozenset[str]] = {
    "insights": frozenset({"snapshot_at", "last_refresh", "cache_target_age", "is_cached"}),
    "exports": frozenset(
        {
            "export_id",
            "filename",
            "path",
            "created_at",
            "expires_after",
            "downloaded_at",
            "run_id",
            "event_storage_id",
            "sha256",
            "bytes",
        }  # fmt: skip
    ),
}
DEFAULT_VOLATILE = frozenset({"snapshot_at"})


@dataclass
class World:
    """One project's assets, wired to one DuckDB file and one export folder."""

    project: PostHogProject
    db: Path
    export_dir: Path
    step_retry: dg.RetryPolicy | None

    def definitions(self) -> list[Any]:
        """Every asset and check: the export step (with the bench's step retry), its log, the
        snapshot assets."""
        assets = build_posthog_export_assets(project=self.project, retry_policy=self.step_retry)
        keys = [k for a in assets for k in a.keys]
        log = build_posthog_exports_log_asset(project=self.project, export_keys=keys)
        checks = build_posthog_export_checks(project=self.project, export_assets=assets)
        snapshot = build_posthog_snapshot_definitions([self.project])
        return [
            *assets, log, *checks, *(snapshot.assets or []), *(snapshot.asset_checks or [])
        ]  # fmt: skip

    def materialize(self, posthog: PostHogResource) -> dg.ExecuteInProcessResult:
        """One real run of everything (never raises on a failed step)."""
        return dg.materialize(
            self.definitions(),
            resources={"posthog": posthog, "duckdb": DuckDBResource(database=str(self.db))},
            raise_on_error=False,
        )


def build_world(
    root: Path, attributes: Mapping[str, Any], step_retry: dg.RetryPolicy | None
) -> World:
    """The world under ``root`` (``posthog.duckdb``, ``exports/``) of a project given as a
    ``defs.yaml`` gives one: ``exports`` (each with a ``name``), ``insights``, ``groups``."""
    root.mkdir(parents=True, exist_ok=True)
    resource = PostHogResource(
        host=dg.EnvVar("POSTHOG_HOST"),
        project_id=dg.EnvVar("POSTHOG_PROJECT_ID"),
        personal_api_key=dg.EnvVar("POSTHOG_PERSONAL_API_KEY"),
        export_dir=str(root / "exports"),
    )
    project = PostHogProject(
        resource=resource,
        exports=tuple(ExportConfig.model_validate(e) for e in attributes.get("exports", ())),
        insights=InsightsConfig.model_validate(attributes.get("insights") or {}),
        groups=GroupsConfig.model_validate(attributes.get("groups") or {}),
        duckdb_path=str(root / "posthog.duckdb"),
    )
    return World(project, root / "posthog.duckdb", root / "exports", step_retry)


def fast_resource(standin: StandinProcess, export_dir: Path, **overrides: Any) -> PostHogResource:
    """The stand-in's project with fast retries and polls (fractions of a second)."""
    fields: dict[str, Any] = {
        "host": standin.url,
        "project_id": str(standin.project_id),
        "personal_api_key": standin.key,
        "export_dir": str(export_dir),
        "max_attempts": 4,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.3,
        "retry_budget_s": 20.0,
        "poll_interval_s": 0.05,
        "poll_max_interval_s": 0.3,
        "poll_timeout_s": 20.0,
        "read_timeout_s": 10.0,
        **overrides,
    }
    return PostHogResource(**fields)


def table_rows(db: Path, table: str) -> list[tuple[Any, ...]]:
    """All rows of ``posthog.<table>`` without the volatile columns, sorted (duplicates kept);
    ``[]`` when the file or the table is missing."""
    if not db.exists():
        return []
    conn = open_read_only(db)
    try:
        conn.execute("SET schema = 'posthog'")
        skip = VOLATILE_COLUMNS.get(table, DEFAULT_VOLATILE)
        cols = [c for c in table_columns(conn, table) if c not in skip]
        if not cols:
            return []
        select = ", ".join(f'CAST("{c}" AS VARCHAR)' for c in cols)
        rows = conn.execute(f'SELECT {select} FROM "{table}"').fetchall()
    finally:
        conn.close()
    return sorted(rows, key=lambda r: tuple("" if v is None else v for v in r))


def compare_worlds(
    reference: World, other: World, families: Sequence[str]
) -> dict[str, dict[str, int]]:
    """Rows lost, extra and duplicated per snapshot table (other vs reference)."""
    out: dict[str, dict[str, int]] = {}
    for family in families:
        if family == EXPORTS:
            continue
        want = Counter(table_rows(reference.db, FAMILY_TABLE[family]))
        got = Counter(table_rows(other.db, FAMILY_TABLE[family]))
        out[family] = {
            "rows": sum(want.values()),
            "lost": sum((want - got).values()),
            "extra": sum((got - want).values()),
            "duplicated": sum(n - 1 for n in got.values() if n > 1),
        }
    return out


def all_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, hidden ones (``.part``, pending markers) included."""
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def failure_texts(result: dg.ExecuteInProcessResult) -> list[str]:
    """Every failed step's message (error text plus the ``dg.Failure`` description)."""
    texts = []
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        parts = [data.error.message if data.error else ""]
        if data.user_failure_data is not None and data.user_failure_data.description:
            parts.append(data.user_failure_data.description)
        texts.append("\n".join(parts))
    return texts


def materialized(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    """Asset name -> raw metadata values of its last materialization in this run."""
    out: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        out[mat.asset_key.path[-1]] = {k: v.value for k, v in mat.metadata.items()}
    return out


def api_requests(log: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in log if r.get("server") == "api" and str(r["path"]).startswith("/api/")]


def exports_created(log: Iterable[Mapping[str, Any]]) -> int:
    """POSTs to ``/exports/`` that PostHog acted on (answered 201, even if the answer was cut)."""
    return sum(
        1
        for r in api_requests(log)
        if r["method"] == "POST"
        and str(r["path"]).rstrip("/").endswith("/exports")
        and r["status"] == 201
    )


#: The fault kinds of a chaos run: throttling, server errors, and connections that break.
CHAOS_KINDS: tuple[dict[str, Any], ...] = (
    {"kind": "status", "status": 429},
    {"kind": "status", "status": 500},
    {"kind": "status", "status": 502},
    {"kind": "status", "status": 503},
    {"kind": "drop"},
    {"kind": "drop_mid_body"},
)


def chaos_rules(fault_rate: float, seed: int) -> list[dict[str, Any]]:
    """Seeded rules that fault ``fault_rate`` of all API requests, spread over the kinds (the
    stand-in applies the first rule that fires: each gets ``p``, ``1 - (1 - p) ** n == rate``)."""
    p = 1 - (1 - fault_rate) ** (1 / len(CHAOS_KINDS))
    return [
        {"match": r"^/api/", "probability": p, "seed": seed * 100 + i, **kind}
        for i, kind in enumerate(CHAOS_KINDS)
    ]


@dataclass(frozen=True)
class ChaosReport:
    requests: int
    faulted: int
    by_kind: dict[str, int]
    exports_created: int


def chaos_report(log: Sequence[Mapping[str, Any]]) -> ChaosReport:
    """What the stand-in saw during a run."""
    kinds: Counter[str] = Counter()
    api = api_requests(log)
    for r in api:
        if r.get("fault"):
            kinds[f"{r['fault']} {r['status']}" if r["fault"] == "status" else r["fault"]] += 1
    return ChaosReport(
        len(api), sum(kinds.values()), dict(sorted(kinds.items())), exports_created(log)
    )


# ------------------------------------------------------------------------------------------------
# A deployment on Celery (deploy/celery/)

CELERY_DIR = ROOT / "deploy" / "celery"
RUN_CONFIG = CELERY_DIR / "run_config.yaml"
INSTANCE_CONFIG = CELERY_DIR / "dagster.yaml"
JOB_NAME = "posthog_all"
WORKER_READY_TIMEOUT_S = 120.0
PG_USER, PG_PASSWORD, PG_DB = "dagster", "dagster-bench-password", "dagster"
COMPONENT = "posthog_assets.PostHogProjectComponent"

#: The run worker: the code location's job (only the assets of ``groups``), on the instance of
#: ``DAGSTER_HOME``; prints the run id and the outcome as one JSON line.
RUN_SCRIPT = r"""
import json, sys
import dagster as dg
from dagster._core.definitions.reconstruct import ReconstructableRepository

args = json.loads(sys.argv[1])
repo = ReconstructableRepository.for_module("posthog_project.definitions", "defs")
job = repo.get_reconstructable_job(args["job"])
from posthog_project.definitions import defs

specs = defs.resolve_all_asset_specs()
selection = [s.key for s in specs if s.group_name in args["groups"]] if args["groups"] else None
with dg.DagsterInstance.get() as instance:
    result = dg.execute_job(
        job, instance=instance, run_config=args["run_config"], tags=args["tags"],
        asset_selection=selection,
    )
    print(json.dumps({"run_id": result.run_id, "success": result.success}), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_code_location(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the repository on ``PYTHONPATH``: the code location (``posthog_project``) is
    this repository's source, shipped to every host of a deployment."""
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


@dataclass
class RedisServer:
    """Debian's ``redis-server`` on a loopback port, nothing persisted."""

    folder: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (Debian package redis-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "redis.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
                "--save", "", "--appendonly", "no", "--protected-mode", "yes",
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.exceptions.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("redis-server did not start") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def flush(self) -> None:
        import redis

        with redis.Redis.from_url(self.url) as client:
            client.flushall()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class PostgresServer:
    """A throwaway cluster from Debian's server binaries (``initdb`` as ``postgres`` under root),
    on 127.0.0.1 with password authentication, as Dagster reaches it in a deployment."""

    bindir: Path
    root: Path
    port: int
    run_as: list[str]

    def dagster_env(self) -> dict[str, str]:
        return {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_DB": PG_DB,
            "DAGSTER_PG_USERNAME": PG_USER,
            "DAGSTER_PG_PASSWORD": PG_PASSWORD,
        }

    def _run(self, *cmd: str) -> None:
        done = subprocess.run([*self.run_as, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed: {done.stdout}{done.stderr}")

    @classmethod
    def start(cls) -> PostgresServer:
        import psycopg2

        dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: Path(d).parent.name)
        found = [Path(d) for d in dirs if (Path(d) / "initdb").exists()]
        if not found:
            raise SystemExit("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        run_as: list[str] = []
        if os.geteuid() == 0:
            pwd.getpwnam("postgres")  # initdb refuses root: run it as postgres
            run_as = ["runuser", "-u", "postgres", "--"]
        root = Path(tempfile.mkdtemp(prefix="posthog-bench-pg-"))
        (root / "sock").mkdir()
        if run_as:
            for path in (root, root / "sock"):
                shutil.chown(path, "postgres", "postgres")
        server = cls(bindir=found[-1], root=root, port=free_port(), run_as=run_as)
        (root / "pwfile").write_text("superuser-unused\n")
        data, log = str(root / "data"), str(root / "postgres.log")
        server._run(
            str(server.bindir / "initdb"), "-D", data, "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256", f"--pwfile={root / 'pwfile'}", "--no-sync",
        )  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root / 'sock'} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        server._run(
            str(server.bindir / "pg_ctl"), "-D", data, "-l", log, "-o", options, "-w", "start"
        )
        conn = psycopg2.connect(
            host=str(root / "sock"), port=server.port, user="postgres", dbname="postgres"
        )
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE ROLE {PG_USER} LOGIN PASSWORD %s", (PG_PASSWORD,))
                cur.execute(f"CREATE DATABASE {PG_DB} OWNER {PG_USER}")
        finally:
            conn.close()
        return server

    def remove(self) -> None:
        try:
            if (self.root / "data" / "postmaster.pid").exists():
                self._run(
                    str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "stop"
                )
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def host_env(root: Path) -> dict[str, str]:
    """What a fresh host has: the same Python on ``PATH``, a home and a temp folder of its own."""
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
    shared: Path
    env: dict[str, str]


def deployment(
    *,
    shared: Path,
    standin: StandinProcess,
    postgres: PostgresServer,
    redis: RedisServer,
    attributes: Mapping[str, Any],
) -> Deployment:
    """The env of every host (deploy/celery/README.md lists it), pointing into ``shared``, and
    the configuration file (``POSTHOG_ASSETS_CONFIG``, ``defs.yaml``'s format) of the project
    ``attributes`` describe, its paths named through the env as the README has them."""
    shared.mkdir(parents=True, exist_ok=True)
    document = {
        "type": COMPONENT,
        "attributes": {
            "project": {"export_dir": "{{ env('POSTHOG_ASSETS_EXPORT_DIR', 'data/exports') }}"},
            "duckdb_path": "{{ env('POSTHOG_ASSETS_DUCKDB', 'data/posthog.duckdb') }}",
            **attributes,
        },
    }
    config = shared / "posthog_assets.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
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


@dataclass
class CeleryWorker:
    """``celery -A dagster_celery.app worker`` in its own process group, on its own "host"."""

    name: str
    root: Path
    proc: subprocess.Popen[bytes]
    seen: set[int] = field(default_factory=set)

    @property
    def node(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    def log(self) -> str:
        path = self.root / "worker.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pids(self) -> set[int]:
        """The worker's process and its pool processes now (all remembered in ``seen``)."""
        try:
            main = psutil.Process(self.proc.pid)
            now = {main.pid, *(p.pid for p in main.children(recursive=True))}
        except psutil.Error:
            now = set()
        self.seen |= now
        return now

    def stop(self) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL to the group if it lingers."""
        self.pids()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)


def _start_worker(name: str, dep: Deployment, root: Path) -> CeleryWorker:
    root.mkdir(parents=True, exist_ok=True)
    env = with_code_location(
        {
            **host_env(root),
            **dep.env,
            "POSTHOG_ASSETS_RATE_LIMIT_DIR": str(root / "gates"),
            "PYTHONPATH": str(CELERY_DIR),  # dagster_celery_config.py
        }
    )
    cmd = [
        sys.executable, "-m", "celery", "-A", "dagster_celery.app", "worker",
        "--hostname", f"{name}@%h", "--queues", "dagster", "--concurrency", "1",
        "--prefetch-multiplier", "1", "--include", "posthog_project.definitions",
        "--without-gossip", "--without-mingle", "--loglevel", "INFO",
    ]  # fmt: skip
    with (root / "worker.log").open("wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    worker = CeleryWorker(name=name, root=root, proc=proc)
    worker.pids()
    return worker


@contextmanager
def celery_workers(dep: Deployment, roots: Sequence[Path]) -> Iterator[list[CeleryWorker]]:
    """Workers ``w1``, ``w2``, ... (one per root), ready; all stopped on the way out."""
    workers: list[CeleryWorker] = []
    try:
        for i, root in enumerate(roots, start=1):
            workers.append(_start_worker(f"w{i}", dep, root))
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        for worker in workers:
            while f"{worker.node} ready." not in worker.log():
                if worker.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"worker {worker.name} did not start:\n{worker.log()[-3000:]}")
                time.sleep(0.2)
            worker.pids()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def _instance_home(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(INSTANCE_CONFIG, root / "dagster.yaml")
    return root


def prepare_instance(dep: Deployment, root: Path) -> dg.DagsterInstance:
    """The deployment's instance from this process, the pool limits stored in it."""
    from dagster._core.instance.ref import InstanceRef

    saved = {k: os.environ.get(k) for k in dep.env}
    os.environ.update(dep.env)
    try:
        instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(_instance_home(root))))
        instance.run_storage  # noqa: B018  (connect while the env is set)
        instance.event_log_storage  # noqa: B018
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    apply_pool_limits(instance)
    return instance


@dataclass
class RunWorker:
    """A run in its own process, with its own host and ``DAGSTER_HOME``."""

    proc: subprocess.Popen[str]
    root: Path

    def result(self, timeout: float) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=timeout)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if self.proc.returncode != 0 or not lines:
            err = (self.root / "run.stderr").read_text(errors="replace")[-4000:]
            raise SystemExit(f"run worker exited {self.proc.returncode}:\n{out[-2000:]}\n{err}")
        return json.loads(lines[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def start_run(dep: Deployment, root: Path, *, name: str, groups: Sequence[str] = ()) -> RunWorker:
    """The job (only the assets of ``groups``, if given) on the Celery workers, with
    ``deploy/celery/run_config.yaml``, orchestrated from a separate process."""
    home = _instance_home(root / "dagster_home")
    env = with_code_location({**host_env(root), **dep.env, "DAGSTER_HOME": str(home)})
    args = {
        "job": JOB_NAME,
        "run_config": yaml.safe_load(RUN_CONFIG.read_text()),
        "tags": {"posthog-assets-bench/celery": name},
        "groups": list(groups),
    }
    stderr = (root / "run.stderr").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, json.dumps(args)],
        cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
        text=True, start_new_session=True,
    )  # fmt: skip
    return RunWorker(proc=proc, root=root)


@dataclass(frozen=True)
class StepSpan:
    """One step attempt: where it ran and when (event log timestamps)."""

    key: str
    pid: int
    start: float
    end: float | None


def step_spans(instance: dg.DagsterInstance, run_id: str) -> list[StepSpan]:
    """Every step attempt of the run: STEP_START (pid, time) to its STEP_SUCCESS/FAILURE."""
    records = instance.get_records_for_run(run_id, limit=100_000).records
    started: dict[str, tuple[int, float]] = {}
    spans: list[StepSpan] = []
    for rec in records:
        entry = rec.event_log_entry
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        key, kind = event.step_key, event.event_type_value
        if kind == "STEP_START":
            started[key] = (int(event.pid or 0), entry.timestamp)
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE") and key in started:
            pid, start = started.pop(key)
            spans.append(StepSpan(key, pid, start, entry.timestamp))
    spans += [StepSpan(key, pid, start, None) for key, (pid, start) in started.items()]
    return sorted(spans, key=lambda s: s.start)

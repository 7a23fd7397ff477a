"""Shared helpers for the reliability tests (faults, chaos, rate limits, crash safety, secrets).

Why a "world": every reliability test materializes the same small but complete configuration
(two exports, an insights snapshot, the group snapshots: :data:`WORLD`, written as the
configuration file a child process running the code location reads, and resolved by the
component's own model) built by the package's own factories, so
an outcome under faults can be compared with the outcome of a fault-free run of the same assets.
Comparisons ignore only what legitimately differs between two runs (snapshot time, cache hit or
miss, export ids and the file names PostHog stamps with the creation time); everything else must
be identical, row for row, duplicates included.

Also here: reading what a run left (DuckDB rows, files, the stand-in's request log, Dagster's
events), seeded chaos rules, the session's fault-free reference run (``shared_reference``), and a
warm interpreter that forks real child processes cheaply (``warm_python``). Used by the tests
(``bench/chaos.py`` has its own world, in ``bench/harness.py``); not a test module itself.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
from dagster_duckdb import DuckDBResource

from posthog_assets.config import PostHogProject
from posthog_assets.exports.assets import build_posthog_export_assets
from posthog_assets.exports.checks import build_posthog_export_checks
from posthog_assets.exports.log import build_posthog_exports_log_asset
from posthog_assets.resources import PostHogResource
from posthog_assets.snapshots.definitions import build_posthog_snapshot_definitions
from posthog_assets.tables import open_read_only, table_columns, table_exists
from posthog_assets_tests.support.config_file import (
    project_document,
    resolve_document,
    write_config_file,
)
from posthog_assets_tests.support.resources import make_resource
from posthog_assets_tests.support.snapshots import asset_name
from posthog_standin.server import StandinControl, StandinProcess

#: The repository: its code location (``posthog_project``) is imported from here.
ROOT = Path(__file__).resolve().parents[2]
#: Two exports (PNG, CSV), a filtered blocking insights snapshot (4 pages), every group asset:
#: the attributes of one project, as its configuration file (``POSTHOG_ASSETS_CONFIG``) holds them.
WORLD: dict[str, Any] = {
    "exports": [
        {"insight": 1, "format": "image/png", "name": "insight_1_png"},
        {"insight": 2, "format": "text/csv", "name": "insight_2_csv"},
    ],
    "insights": {"refresh": "blocking", "created_by": [2], "page_size": 100},
    "groups": {
        "property_values": True,
        "tracked": [{"group_type_index": 0, "group_key": "organization-3"}],
    },
}
WORLD_EXPORTS = ("insight_1_png", "insight_2_csv")
#: In-run step retries that take fractions of a second (the package default waits ~10 s).
FAST_STEP_RETRY = dg.RetryPolicy(max_retries=2, delay=0.05)
#: Families a test can materialize: the export step (+ its DuckDB log) or one snapshot asset.
EXPORTS = "exports"
SNAPSHOT_NAMES = (
    "insights",
    "group_types",
    "groups",
    "group_property_definitions",
    "group_property_values",
    "tracked_groups",
)
ALL_FAMILIES = (EXPORTS, *SNAPSHOT_NAMES)

#: Columns that legitimately differ between two correct runs (time of the snapshot, whether
#: PostHog served a result from cache, ids and stamps of a new export).
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
        }
    ),
}
DEFAULT_VOLATILE = frozenset({"snapshot_at"})
#: Table each family writes.
FAMILY_TABLE = {EXPORTS: "exports", **{name: name for name in SNAPSHOT_NAMES}}


@dataclass
class World:
    """The reliability world's assets, wired to one DuckDB file and one export folder."""

    project: PostHogProject
    config: Path
    db: Path
    export_dir: Path
    step_retry: dg.RetryPolicy | None = FAST_STEP_RETRY
    snapshot: dg.Definitions = field(init=False)

    def __post_init__(self) -> None:
        self.snapshot = build_posthog_snapshot_definitions([self.project])

    def export_assets(self) -> list[dg.AssetsDefinition]:
        """The export step (built per call so a test can pick its step retry policy)."""
        assets = build_posthog_export_assets(project=self.project, retry_policy=self.step_retry)
        keys = [k for a in assets for k in a.keys]
        log = build_posthog_exports_log_asset(project=self.project, export_keys=keys)
        return [*assets, log]

    def definitions_for(self, families: Sequence[str], *, checks: bool = True) -> list[Any]:
        """Assets (and their checks) of the given families, ready for ``dg.materialize``."""
        unknown = set(families) - set(ALL_FAMILIES)
        assert not unknown, f"unknown families {unknown}"
        out: list[Any] = []
        if EXPORTS in families:
            assets = self.export_assets()
            out += assets
            if checks:
                out += build_posthog_export_checks(project=self.project, export_assets=assets[:-1])
        names = [f for f in families if f != EXPORTS]
        for asset in self.snapshot.assets or []:
            if asset_name(asset) in names:
                out.append(asset)
        for check in self.snapshot.asset_checks or [] if checks else []:
            if any(k.asset_key.path[-1] in names for k in check.check_keys):
                out.append(check)
        return out

    def resources(self, posthog: PostHogResource) -> dict[str, Any]:
        return {"posthog": posthog, "duckdb": DuckDBResource(database=str(self.db))}

    def materialize(
        self,
        families: Sequence[str],
        posthog: PostHogResource,
        *,
        run_config: Mapping[str, Any] | None = None,
        instance: dg.DagsterInstance | None = None,
        checks: bool = True,
    ) -> dg.ExecuteInProcessResult:
        """One real run of the families (never raises on a failed step: tests assert on it)."""
        return dg.materialize(
            self.definitions_for(families, checks=checks),
            resources=self.resources(posthog),
            run_config=dict(run_config or {}),
            raise_on_error=False,
            instance=instance,
        )


def world_document(root: Path, attributes: Mapping[str, Any] = WORLD) -> dict[str, Any]:
    """The world's project as a document of its configuration file: DuckDB and exports under
    ``root``; host, project id and key from the environment (read when a run starts)."""
    return project_document(
        duckdb_path=root / "posthog.duckdb", export_dir=root / "exports", **attributes
    )


def build_world(
    root: Path,
    *,
    attributes: Mapping[str, Any] = WORLD,
    step_retry: dg.RetryPolicy | None = FAST_STEP_RETRY,
) -> World:
    """The world under ``root``: its configuration file (``posthog_assets.yaml``, what a child
    process running the code location reads through ``POSTHOG_ASSETS_CONFIG``), resolved here
    by the component's own model into the project whose assets the tests materialize, with
    ``posthog.duckdb`` and ``exports/``."""
    root.mkdir(parents=True, exist_ok=True)
    document = world_document(root, attributes)
    config = write_config_file(root / "posthog_assets.yaml", document)
    return World(
        project=resolve_document(document, config),
        config=config,
        db=root / "posthog.duckdb",
        export_dir=root / "exports",
        step_retry=step_retry,
    )


def fast_resource(standin: StandinProcess, export_dir: Path, **overrides: Any) -> PostHogResource:
    """The tests' resource (fast retries and polls) for the reliability world."""
    return make_resource(standin, export_dir, **overrides)


# ------------------------------------------------------------------------------------------------
# What a run left behind


@contextmanager
def _read_posthog(db: Path) -> Iterator[duckdb.DuckDBPyConnection | None]:
    """A read-only connection with ``posthog`` as the schema, or None when there is no file."""
    if not db.exists():
        yield None
        return
    conn = open_read_only(db)
    try:
        conn.execute("SET schema = 'posthog'")
        yield conn
    finally:
        conn.close()


def table_rows(db: Path, table: str, ignore: Iterable[str] = ()) -> list[tuple[Any, ...]]:
    """All rows of ``posthog.<table>`` without the volatile columns, sorted (duplicates kept).

    An absent file or table gives ``[]``: "nothing written" is a comparable outcome.
    """
    with _read_posthog(db) as conn:
        if conn is None:
            return []
        skip = VOLATILE_COLUMNS.get(table, DEFAULT_VOLATILE) | set(ignore)
        cols = [c for c in table_columns(conn, table) if c not in skip]
        if not cols:
            return []
        select = ", ".join(f'CAST("{c}" AS VARCHAR)' for c in cols)
        rows = conn.execute(f'SELECT {select} FROM "{table}"').fetchall()
    return sorted(rows, key=lambda r: tuple("" if v is None else v for v in r))


def family_rows(db: Path, families: Iterable[str]) -> dict[str, list[tuple[Any, ...]]]:
    return {f: table_rows(db, FAMILY_TABLE[f]) for f in families}


def duplicates(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [row for row, n in Counter(rows).items() if n > 1]


def all_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, hidden ones (``.part``, pending markers) included."""
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def export_records(db: Path) -> list[dict[str, Any]]:
    """Rows of ``posthog.exports`` as dicts (empty when nothing was logged)."""
    with _read_posthog(db) as conn:
        if conn is None or not table_exists(conn, "exports"):
            return []
        cur = conn.execute("SELECT * FROM exports ORDER BY asset_name")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def assert_export_folder(export_dir: Path, db: Path, expected_assets: Iterable[str]) -> None:
    """Exactly one file per expected export, in its asset's folder, equal to what DuckDB logged.

    No ``.part`` leftovers, no pending markers, no stray files; every ``posthog.exports`` row
    points at a file whose size and sha256 match, and no export is logged twice.
    """
    expected = sorted(expected_assets)
    files = all_files(export_dir)
    assert [p.parent.name for p in files] == expected, f"files in export folder: {files}"
    assert all(not p.name.startswith(".") and not p.name.endswith(".part") for p in files)
    records = export_records(db)
    assert sorted(r["asset_name"] for r in records) == expected, records
    by_asset = {p.parent.name: p for p in files}
    for rec in records:
        path = Path(rec["path"])
        assert path == by_asset[rec["asset_name"]], (path, by_asset)
        assert path.stat().st_size == rec["bytes"] and sha256_of(path) == rec["sha256"]
    assert len({r["export_id"] for r in records}) == len(records)


# ------------------------------------------------------------------------------------------------
# What the stand-in saw


def api_requests(log: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in log if r.get("server") == "api" and str(r["path"]).startswith("/api/")]


def export_post_entries(log: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [
        r
        for r in api_requests(log)
        if r["method"] == "POST" and str(r["path"]).rstrip("/").endswith("/exports")
    ]


def exports_created(log: Iterable[Mapping[str, Any]]) -> int:
    """POSTs to ``/exports/`` that PostHog acted on (answered 201, even if the answer was cut)."""
    return sum(1 for r in export_post_entries(log) if r["status"] == 201)


def wait_violations(
    log: Sequence[Mapping[str, Any]], retry_after_s: float, grace_s: float = 0.15
) -> list[tuple[float, Mapping[str, Any]]]:
    """Requests that reached PostHog while the last 429 said to wait.

    After a 429 at ``t`` (arrival time) with ``Retry-After: retry_after_s``, a request arriving
    in ``(t + grace_s, t + retry_after_s)`` was sent by a client that had been told to wait.
    ``grace_s`` covers requests already on the wire when the 429 was being answered.
    """
    entries = sorted(api_requests(log), key=lambda r: r["ts"])
    throttled = [r["ts"] for r in entries if r["status"] == 429]
    bad = []
    for t in throttled:
        for r in entries:
            if t + grace_s < r["ts"] < t + retry_after_s - 0.01:
                bad.append((t, r))
    return bad


# ------------------------------------------------------------------------------------------------
# What Dagster recorded


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


def step_retries(result: dg.ExecuteInProcessResult) -> int:
    return sum(1 for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY")


def materialized(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    """Asset name -> raw metadata values of its last materialization in this run."""
    out: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        out[mat.asset_key.path[-1]] = {k: v.value for k, v in mat.metadata.items()}
    return out


def reset(control: StandinControl) -> None:
    control.reset()
    control.clear_requests_log()


# ------------------------------------------------------------------------------------------------
# Chaos

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
    """Seeded rules that fault ``fault_rate`` of all API requests, spread over the kinds.

    The stand-in applies the first rule that fires, so each rule gets ``p`` with
    ``1 - (1 - p) ** n == fault_rate``.
    """
    p = 1 - (1 - fault_rate) ** (1 / len(CHAOS_KINDS))
    return [
        {"match": r"^/api/", "probability": p, "seed": seed * 100 + i, **kind}
        for i, kind in enumerate(CHAOS_KINDS)
    ]


@dataclass(frozen=True)
class ChaosReport:
    """What the stand-in saw during a run."""

    requests: int
    faulted: int
    by_kind: dict[str, int]
    exports_created: int


def chaos_report(log: Sequence[Mapping[str, Any]]) -> ChaosReport:
    api = api_requests(log)
    kinds: Counter[str] = Counter()
    for r in api:
        if r.get("fault"):
            kinds[f"{r['fault']} {r['status']}" if r["fault"] == "status" else r["fault"]] += 1
    return ChaosReport(
        requests=len(api),
        faulted=sum(kinds.values()),
        by_kind=dict(sorted(kinds.items())),
        exports_created=exports_created(log),
    )


def compare_worlds(
    reference: World, other: World, families: Sequence[str]
) -> dict[str, dict[str, int]]:
    """Rows lost and duplicated per family's table (other vs reference; all zero = identical)."""
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


# ------------------------------------------------------------------------------------------------
# The fault-free reference (one run per session, shared by the fault matrix and the chaos test)


@dataclass(frozen=True)
class Reference:
    """A fault-free run of the whole world: its DuckDB file, rows per family, export facts."""

    world: World
    rows: dict[str, list[tuple[Any, ...]]]
    csv_sha256: str
    insight_ids: list[int]

    @property
    def db(self) -> Path:
        return self.world.db


def run_reference(standin: StandinProcess, root: Path) -> Reference:
    """Materialize the whole world with no fault and sanity-check what it wrote."""
    reset(standin.control)
    world = build_world(root)
    # Its own request log (in memory): the tests' per-test gate folders do not exist yet here.
    resource = fast_resource(standin, world.export_dir, shared_rate_limit=False)
    result = world.materialize(ALL_FAMILIES, resource, checks=False)
    assert result.success, failure_texts(result)
    rows = family_rows(world.db, ALL_FAMILIES)
    assert all(rows[f] and not duplicates(rows[f]) for f in ALL_FAMILIES), rows.keys()
    assert_export_folder(world.export_dir, world.db, WORLD_EXPORTS)
    ids = [int(i) for (i,) in select(world.db, "SELECT id FROM insights ORDER BY id")]
    csv = materialized(result)["insight_2_csv"]
    return Reference(world=world, rows=rows, csv_sha256=csv["sha256"], insight_ids=ids)


def select(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = duckdb.connect(str(db), read_only=True)
    try:
        conn.execute("SET schema = 'posthog'")
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


_REFERENCES: dict[str, Reference] = {}


def shared_reference(
    standin: StandinProcess, tmp_path_factory: pytest.TempPathFactory
) -> Reference:
    """The session's fault-free run, made once per stand-in and shared by every test module."""
    if standin.url not in _REFERENCES:
        _REFERENCES[standin.url] = run_reference(standin, tmp_path_factory.mktemp("fault_free"))
    return _REFERENCES[standin.url]


# ------------------------------------------------------------------------------------------------
# Real child processes without paying Dagster's import time for each

WARM_SERVER = r"""
import json, os, sys, traceback
# The repository root (argv[1]), for this repository's own code location (posthog_project, not
# installed): `python -c` would look in the current folder, which each child changes. Appended:
# Dagster takes sys.path[0] (the script's folder) out while it imports a code location.
sys.path.append(sys.argv[1])
# The slow part of starting a code location: Dagster, pandas, DuckDB and the package's modules.
# posthog_project.definitions itself is NOT imported here: it reads the environment of each child.
import dagster  # noqa: F401
import posthog_assets.exports.definitions  # noqa: F401
import posthog_assets.resources  # noqa: F401
import posthog_assets.snapshots.definitions  # noqa: F401

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.environ.clear()
        os.environ.update(job["env"])
        os.chdir(job["cwd"])
        sys.argv = ["-c", *job["argv"]]
        code = 0
        try:
            exec(compile(job["script"], "<script>", "exec"), {"__name__": "__main__"})
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@dataclass
class Child:
    """A script running in its own process (own session), forked from the warm interpreter."""

    pid: int
    stdout: Path
    stderr: Path
    server: WarmPython

    def wait(self, timeout: float = 240.0) -> int:
        """The exit code (negative signal number if killed)."""
        return self.server.result(self.pid, timeout)

    def kill(self) -> int:
        os.killpg(self.pid, signal.SIGKILL)
        return self.wait(30)

    def output(self) -> str:
        return self.stdout.read_text() if self.stdout.exists() else ""

    def errors(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""


class WarmPython:
    """One interpreter with Dagster and the package imported, forking a real child per script.

    Why: importing Dagster and the package takes seconds of CPU. Tests that need a real separate
    process (to SIGKILL it, to load the code location with another environment, to capture its
    output) get one in milliseconds: a fork of this interpreter that runs the script as
    ``python -c`` would, with its own environment, working directory, stdout and stderr files.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WARM_SERVER, str(ROOT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True, name="warm-python").start()
        self._lock = threading.Lock()
        #: Exit codes read before anyone asked (a child a failed test left unwaited).
        self._codes: dict[int, int] = {}

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            return json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"warm interpreter silent for {timeout}s") from None

    def start(
        self,
        script: str,
        *,
        argv: Sequence[str] = (),
        env: Mapping[str, str],
        cwd: Path,
        name: str,
    ) -> Child:
        """Fork a child running ``script`` (one at a time; ``wait`` for it before the next)."""
        with self._lock:
            stdout, stderr = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
            job = {
                "script": script, "argv": list(argv), "env": dict(env), "cwd": str(cwd),
                "stdout": str(stdout), "stderr": str(stderr),
            }  # fmt: skip
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            pid = int(self._started(timeout=120)["pid"])
        return Child(pid=pid, stdout=stdout, stderr=stderr, server=self)

    def _started(self, timeout: float) -> dict[str, Any]:
        """The next child's start line; an earlier child's exit code read on the way is kept."""
        while True:
            answer = self._next(timeout)
            if "code" not in answer:
                return answer
            self._codes[int(answer["pid"])] = int(answer["code"])

    def result(self, pid: int, timeout: float) -> int:
        """The child's exit code (a test that failed before waiting for its child leaves that
        child's code in the stream: it is kept, never taken for another child's)."""
        while pid not in self._codes:
            answer = self._next(timeout)
            assert "code" in answer, answer
            self._codes[int(answer["pid"])] = int(answer["code"])
        return self._codes.pop(pid)

    def run(self, script: str, **kw: Any) -> tuple[int, str, str]:
        """Run ``script`` to the end: (exit code, stdout, stderr)."""
        child = self.start(script, **kw)
        code = child.wait()
        return code, child.output(), child.errors()

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_WARM: list[WarmPython] = []


def warm_python() -> WarmPython:
    """The session's warm interpreter (started on first use, stopped when pytest exits)."""
    if not _WARM or _WARM[0].proc.poll() is not None:
        _WARM[:] = [WarmPython()]
        atexit.register(_WARM[0].stop)
    return _WARM[0]

"""Benchmark: the ``posthog/events`` asset (one UTC day, keyset pages over HogQL) vs a plain
``requests`` + ``duckdb`` script vs dlt's ``rest_api`` source.

Run from the project root::

    python bench/events.py                      # 1,000,000 events (and 100,000 for RSS)
    python bench/events.py --events 200000 --small 20000
    python bench/events.py --dlt-python /tmp/dlt-venv/bin/python   # dlt from another venv
    python bench/events.py --profile            # + top functions of package and baseline

What is read: a stand-in seeded with ``--events`` events over ONE day (the day before it
started), every column of ``events`` (``uuid, event, timestamp, distinct_id, person_id,
properties, elements_chain, created_at``, about 900 bytes a row as JSON) in pages of 50,000 (the
most PostHog returns), keyset on ``(timestamp, uuid)`` with ``refresh: force_blocking``. The
stand-in seeds bursts of 40 events sharing one timestamp across every 50,000th position, so a
keyset on ``timestamp`` alone would lose rows at page boundaries.

The variants, each in its own fresh subprocess (so its peak RSS is that run's own):

- ``package``: ``build_posthog_assets_definitions(...)`` with only ``events`` on, the job
  ``posthog_events`` run with ``execute_in_process(partition_key=day)`` on a test instance, as a
  user runs it: PostHog's ``count()`` of the day, the pages staged to NDJSON, one DuckDB
  ``INSERT ... SELECT read_json(...)``, and the job's non-blocking count check;
- ``baseline``: what a person would write by hand: the same SQL pages with ``requests``, each
  page written as NDJSON to a temp file and inserted with ``INSERT ... SELECT ... FROM
  read_json(...)`` (``--baseline-write pandas``: a DataFrame per page instead);
- ``dlt``: dlt's ``rest_api`` source into DuckDB. It has no declarative paginator for this API
  (the cursor is the last row's ``(timestamp, uuid)``, not a field of the answer, and it goes
  inside the SQL text of the JSON body), so it gets a ~20-line ``BasePaginator`` subclass, and
  ``jsonl`` load files (its DuckDB default, ``insert_values``, took 18 s and 1.5 GB to load
  100,000 of these rows). dlt is the ``bench`` extra; when this interpreter lacks it,
  ``--dlt-python`` names one that has it.

How it is timed: the subprocess imports everything and does a warm-up against the same stand-in
(the package: the job for an event name that does not exist; the others: a one-row page into a
throw-away DuckDB file), clears the stand-in's request log, then times only the real run with
``time.perf_counter()``; ``cpu_s`` is the subprocess's own CPU time over that run (user +
system, every thread), which another load on the machine disturbs less than wall time (the
stand-in's time to answer is not in it). ``process_s`` is the subprocess's whole life.
The package and the baseline run ``--repeat`` times (default 3) on the big day, interleaved, and
the run of median time is reported (with the highest peak RSS of the runs); the small day and dlt
run once. The stand-in's simulated query latency is set to 0 (it would add the same 50 ms to
every query of every variant) and its throttles are off: at ~22 queries a run they would not
bind anyway.

Figures (``name=value``): per variant and size ``seconds``, ``requests`` (``/query/`` requests
the stand-in saw, checks included), ``rows`` and ``distinct_uuids`` in DuckDB, ``peak_rss_mb``
(``VmHWM``, see :func:`_rss_mb`) and ``rss_before_run_mb`` (after imports and warm-up); the
package's own materialization metadata (``requests``, ``pages``, ``bytes``, ``rows``); then
``uuids_missing`` / ``uuids_extra`` (package vs baseline, every package run; vs dlt),
``rows_differing`` (every column compared as text), ``time_ratio_package_vs_baseline`` (goal
<= 1.2) and ``package_rss_ratio_<big>_vs_<small>`` (goal: flat, ~1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAGE_SIZE = 50_000
COLUMNS = {
    "uuid": "UUID",
    "event": "VARCHAR",
    "timestamp": "TIMESTAMPTZ",
    "distinct_id": "VARCHAR",
    "person_id": "UUID",
    "properties": "JSON",
    "elements_chain": "VARCHAR",
    "created_at": "TIMESTAMPTZ",
}
#: The package's table (schema ``posthog``) and the others' (dlt: dataset ``posthog_dlt``).
TABLES = {"package": "posthog.events", "baseline": "main.events", "dlt": "posthog_dlt.events"}
WARMUP_EVENT = "__bench_warmup_no_such_event__"
#: Persons seeded per event (the stand-in's default ratio is 1:10).
PERSONS_PER_EVENT = 0.1
PROFILE_TOP = 15
#: dlt's load files. Its default for DuckDB (``insert_values``: SQL INSERT statements) took 18 s
#: and 1.5 GB to load 100,000 of these rows; ``jsonl`` loads them in ~1 s.
DLT_FILE_FORMAT = "jsonl"


# ------------------------------------------------------------------------------------------------
# What every child shares (stdlib only: the dlt child may run in another interpreter)


def _clear_request_log(args: argparse.Namespace) -> None:
    """The stand-in's ``DELETE /_standin/requests`` (warm-up requests are not the run's)."""
    request = urllib.request.Request(
        f"{args.url}/_standin/requests",
        method="DELETE",
        headers={"X-Standin-Token": args.control_token, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def _rss_mb() -> float:
    """This process's peak RSS so far: Linux's ``VmHWM``. Not ``ru_maxrss``, which a child
    started by fork + exec inherits from its parent (the parent's RSS at the fork counts)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Clock:
    """Times the run (``time.perf_counter``), under cProfile when asked; notes RSS before."""

    def __init__(self, profile: bool) -> None:
        self.profiler: Any = None
        if profile:
            import cProfile

            self.profiler = cProfile.Profile()
        self.seconds = 0.0
        self.cpu_s = 0.0
        self.rss_before_mb = 0.0

    def __enter__(self) -> Clock:
        self.rss_before_mb = _rss_mb()
        self._cpu = _cpu_s()
        self._started = time.perf_counter()
        if self.profiler is not None:
            self.profiler.enable()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.profiler is not None:
            self.profiler.disable()
        self.seconds = time.perf_counter() - self._started
        self.cpu_s = _cpu_s() - self._cpu

    def figures(self, **more: Any) -> dict[str, Any]:
        out = {
            "seconds": self.seconds,
            "cpu_s": self.cpu_s,
            "rss_before_run_mb": self.rss_before_mb,
            **more,
        }
        if self.profiler is not None:
            out["profile"] = _profile_text(self.profiler)
        return out


def _cpu_s() -> float:
    """CPU seconds of this process (every thread: DuckDB's too), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _profile_text(profiler: Any) -> str:
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(PROFILE_TOP)
    stats.sort_stats("cumulative").print_stats("posthog_assets|bench/events", PROFILE_TOP)
    return text.getvalue()


def _literal(moment: datetime) -> str:
    return f"toDateTime64('{moment.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S.%f')}', 6, 'UTC')"


def page_sql(day: str, after: tuple[str, str] | None, limit: int = PAGE_SIZE) -> str:
    """One keyset page of the day's events, the same shape as the package's query."""
    start = datetime.fromisoformat(day).replace(tzinfo=UTC)
    where = f"timestamp >= {_literal(start)} AND timestamp < {_literal(start + timedelta(days=1))}"
    if after is not None:
        ts = _literal(datetime.fromisoformat(after[0].replace("Z", "+00:00")))
        where += f" AND (timestamp > {ts} OR (timestamp = {ts} AND uuid > toUUID('{after[1]}')))"
    return (
        f"SELECT {', '.join(COLUMNS)} FROM events WHERE {where} "
        f"ORDER BY timestamp ASC, uuid ASC LIMIT {limit}"
    )


def query_body(sql: str) -> dict[str, Any]:
    return {"query": {"kind": "HogQLQuery", "query": sql}, "refresh": "force_blocking"}


def _last_key(rows: list[list[Any]]) -> tuple[str, str]:
    return rows[-1][2], rows[-1][0]  # (timestamp, uuid) as PostHog returned them


def _count(db: str, table: str) -> tuple[int, int]:
    import duckdb

    conn = duckdb.connect(db, read_only=True)
    try:
        rows, distinct = conn.execute(
            f"SELECT count(*), count(DISTINCT uuid) FROM {table}"
        ).fetchone()
    finally:
        conn.close()
    return int(rows), int(distinct)


# ------------------------------------------------------------------------------------------------
# Children


def child_package(args: argparse.Namespace) -> dict[str, Any]:
    """The job ``posthog_events`` for the day, in-process, as a user runs it."""
    import dagster as dg

    from posthog_assets import PostHogResource, build_posthog_assets_definitions

    work = Path(args.workdir)
    os.environ["POSTHOG_PERSONAL_API_KEY"] = args.key
    os.environ["POSTHOG_ASSETS_RATE_LIMIT_DIR"] = str(work / "gates")

    def job(db: Path, events: dict[str, Any]) -> Any:
        defs = build_posthog_assets_definitions(
            PostHogResource(
                host=args.url, project_id=str(args.project_id),
                personal_api_key=dg.EnvVar("POSTHOG_PERSONAL_API_KEY"), poll_interval_s=0.05,
            ),
            insights={"enabled": False}, groups={"enabled": False},
            events={"start_date": args.day, **events}, duckdb_path=str(db),
        )  # fmt: skip
        return defs.resolve_job_def("posthog_events")

    with dg.instance_for_test() as instance:  # warm-up: every code path, no rows
        warm = job(work / "warmup" / "warmup.duckdb", {"event_names": [WARMUP_EVENT]})
        assert warm.execute_in_process(partition_key=args.day, instance=instance).success
    _clear_request_log(args)

    db = Path(args.db)
    events_job = job(db, {})
    with dg.instance_for_test() as instance, Clock(args.profile) as clock:
        result = events_job.execute_in_process(partition_key=args.day, instance=instance)
    if not result.success:
        raise SystemExit("the events job failed")
    metadata: dict[str, Any] = {}
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        if mat.asset_key.path[-1] == "events":
            metadata = {k: v.value for k, v in mat.metadata.items()}
    rows, distinct = _count(str(db), TABLES["package"])
    wanted = ("requests", "pages", "bytes", "rows", "posthog_count")
    return clock.figures(
        rows=rows, distinct_uuids=distinct, metadata={k: metadata.get(k) for k in wanted}
    )


def _write_ndjson(conn: Any, table: str, rows: list[list[Any]], path: Path) -> None:
    names = list(COLUMNS)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(dict(zip(names, row, strict=True)), separators=(",", ":")))
            fh.write("\n")
    # HogQL answers properties as a JSON string: read it as text, cast it (as the package does).
    types = ", ".join(f"'{c}': '{'VARCHAR' if t == 'JSON' else t}'" for c, t in COLUMNS.items())
    select = ", ".join(f"CAST({c} AS JSON)" if t == "JSON" else c for c, t in COLUMNS.items())
    conn.execute(
        f"INSERT INTO {table} SELECT {select} FROM read_json(?, format = 'newline_delimited', "
        f"columns = {{{types}}}, maximum_object_size = 16777216)",
        [str(path)],
    )


def _write_pandas(conn: Any, table: str, rows: list[list[Any]], path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    conn.register("page_frame", frame)
    select = ", ".join(f"CAST({c} AS {t})" for c, t in COLUMNS.items())
    conn.execute(f"INSERT INTO {table} SELECT {select} FROM page_frame")
    conn.unregister("page_frame")


def child_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """requests pages, each written into DuckDB as it arrives."""
    import duckdb
    import requests

    if args.baseline_write == "pandas":
        import pandas  # noqa: F401  (imported before the clock starts)
    write = _write_pandas if args.baseline_write == "pandas" else _write_ndjson
    work = Path(args.workdir)
    url = f"{args.url}/api/projects/{args.project_id}/query/"
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {args.key}"
    ddl = "CREATE TABLE events (" + ", ".join(f"{c} {t}" for c, t in COLUMNS.items()) + ")"

    warm = duckdb.connect(str(work / "warmup.duckdb"))  # warm-up: one row, thrown away
    warm.execute(ddl)
    resp = session.post(url, json=query_body(page_sql(args.day, None, limit=1)), timeout=300)
    resp.raise_for_status()
    write(warm, "events", resp.json()["results"], work / "warmup.ndjson")
    warm.close()
    _clear_request_log(args)

    with Clock(args.profile) as clock:
        fetched = _baseline_run(args, session, url, ddl, write, work / "page.ndjson")
    rows_in_db, distinct = _count(args.db, TABLES["baseline"])
    return clock.figures(rows=rows_in_db, distinct_uuids=distinct, fetched=fetched)


def _baseline_run(
    args: argparse.Namespace, session: Any, url: str, ddl: str, write: Any, page_file: Path
) -> int:
    """Every page of the day, each inserted as it arrives; returns the rows fetched."""
    import duckdb

    conn = duckdb.connect(args.db)
    conn.execute(ddl)
    after: tuple[str, str] | None = None
    fetched = 0
    while True:
        resp = session.post(url, json=query_body(page_sql(args.day, after)), timeout=300)
        resp.raise_for_status()
        rows = resp.json()["results"]
        if rows:
            write(conn, "events", rows, page_file)
        fetched += len(rows)
        if len(rows) < PAGE_SIZE:
            break
        after = _last_key(rows)
    conn.close()
    return fetched


def _dlt_source(args: argparse.Namespace, *, warmup: bool) -> Any:
    """dlt's rest_api source over ``POST /query/``: a paginator of our own (rest_api has none
    that puts a cursor taken from the last row into SQL inside the JSON body)."""
    from dlt.sources.helpers.rest_client.paginators import BasePaginator
    from dlt.sources.rest_api import rest_api_source

    limit = 1 if warmup else PAGE_SIZE

    class HogQLKeysetPaginator(BasePaginator):
        def __init__(self) -> None:
            super().__init__()
            self.after: tuple[str, str] | None = None

        def init_request(self, request: Any) -> None:
            request.json = query_body(page_sql(args.day, None, limit))

        def update_state(self, response: Any, data: list[Any] | None = None) -> None:
            if warmup or not data or len(data) < limit:
                self._has_next_page = False
            else:
                self.after = _last_key(data)

        def update_request(self, request: Any) -> None:
            request.json = query_body(page_sql(args.day, self.after, limit))

    names = list(COLUMNS)
    return rest_api_source(
        {
            "client": {
                "base_url": f"{args.url}/api/projects/{args.project_id}/",
                "auth": {"type": "bearer", "token": args.key},
            },
            "resources": [
                {
                    "name": "events",
                    "write_disposition": "replace",
                    "primary_key": "uuid",
                    "endpoint": {
                        "path": "query/",
                        "method": "POST",
                        "data_selector": "results",
                        "paginator": HogQLKeysetPaginator(),
                    },
                    "processing_steps": [
                        {"map": lambda row: dict(zip(names, row, strict=True))}  # type: ignore[dict-item]
                    ],
                }
            ],
        }
    )


def child_dlt(args: argparse.Namespace) -> dict[str, Any]:
    """dlt's rest_api source into DuckDB, dlt's defaults otherwise (extract, normalize, load)."""
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
    import dlt

    work = Path(args.workdir)

    def pipeline(name: str, db: Path) -> Any:
        return dlt.pipeline(
            pipeline_name=name,
            destination=dlt.destinations.duckdb(str(db)),
            dataset_name="posthog_dlt",
            pipelines_dir=str(work / "dlt_pipelines"),
        )

    pipeline("events_warmup", work / "warmup.duckdb").run(
        _dlt_source(args, warmup=True), loader_file_format=DLT_FILE_FORMAT
    )
    _clear_request_log(args)

    with Clock(args.profile) as clock:
        pipeline("events_bench", Path(args.db)).run(
            _dlt_source(args, warmup=False), loader_file_format=DLT_FILE_FORMAT
        )
    rows, distinct = _count(args.db, TABLES["dlt"])
    return clock.figures(rows=rows, distinct_uuids=distinct, dlt_version=dlt.__version__)


CHILDREN = {"package": child_package, "baseline": child_baseline, "dlt": child_dlt}


def run_child(args: argparse.Namespace) -> None:
    result = CHILDREN[args.child](args)
    result["peak_rss_mb"] = _rss_mb()
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# Parent


def measure(
    variant: str,
    standin: Any,
    day: str,
    folder: Path,
    *,
    python: str = sys.executable,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One variant in a fresh subprocess; adds the stand-in's count of ``/query/`` requests."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dagster_home").mkdir(exist_ok=True)
    cmd = [
        python, __file__, "--child", variant, "--url", standin.url, "--key", standin.key,
        "--project-id", str(standin.project_id), "--control-token", standin.control_token,
        "--day", day, "--db", str(folder / f"{variant}.duckdb"), "--workdir", str(folder),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DAGSTER_HOME": str(folder / "dagster_home")}
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    process_s = time.perf_counter() - started
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(
            f"{variant} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n"
            f"{done.stderr[-6000:]}"
        )
    result = json.loads(line.removeprefix("BENCH_RESULT "))
    result["process_s"] = process_s
    result["db"] = str(folder / f"{variant}.duckdb")
    log = standin.control.requests_log()
    result["requests"] = sum(
        1 for r in log if r.get("server") == "api" and "/query/" in str(r.get("path"))
    )
    return result


def compare(package_db: str, other_db: str, other_table: str) -> dict[str, int]:
    """uuids in one table but not the other, and rows whose columns differ (as text)."""
    import duckdb

    conn = duckdb.connect()
    try:
        conn.execute(f"ATTACH '{package_db}' AS p (READ_ONLY)")
        conn.execute(f"ATTACH '{other_db}' AS o (READ_ONLY)")
        p, o = f"p.{TABLES['package']}", f"o.{other_table}"

        def one(sql: str) -> int:
            return int(conn.execute(sql).fetchone()[0])

        text = ", ".join(
            f"CAST(CAST({c} AS {t}) AS VARCHAR)" if t != "JSON" else f"CAST({c} AS VARCHAR)"
            for c, t in COLUMNS.items()
        )
        return {
            "uuids_missing": one(
                f"SELECT count(*) FROM (SELECT uuid FROM {o} EXCEPT SELECT uuid FROM {p})"
            ),
            "uuids_extra": one(
                f"SELECT count(*) FROM (SELECT uuid FROM {p} EXCEPT SELECT uuid FROM {o})"
            ),
            "rows_differing": one(
                f"SELECT count(*) FROM (SELECT {text} FROM {p} EXCEPT SELECT {text} FROM {o})"
            ),
        }
    finally:
        conn.close()


def dlt_interpreter(requested: str | None) -> tuple[str | None, str]:
    """The interpreter that runs the dlt child, or None and why."""
    python = requested or sys.executable
    probe = subprocess.run(
        [python, "-c", "import dlt, duckdb, requests; print(dlt.__version__)"],
        capture_output=True,
        text=True,
    )
    if probe.returncode == 0:
        return python, probe.stdout.strip()
    return None, (
        f"dlt is not importable from {python} (pip install '.[bench]', or pass --dlt-python "
        "with a venv that has dlt[duckdb] and requests)"
    )


def run_standin(events: int, persons: int) -> Any:
    from posthog_standin.server import StandinProcess

    return StandinProcess(
        events=events, persons=persons, event_days=1, insights=1, groups=1, group_types=1,
        dashboards=1, rate_limits=False, startup_timeout=600,
    )  # fmt: skip


def print_variant(name: str, r: dict[str, Any]) -> None:
    print(f"{name}_seconds={r['seconds']:.2f}")
    if "all_seconds" in r:
        print(f"{name}_runs_s={r['all_seconds']}")
    print(f"{name}_cpu_s={r['cpu_s']:.2f}")
    print(f"{name}_process_s={r['process_s']:.2f}")
    print(f"{name}_requests={r['requests']}")
    print(f"{name}_rows={r['rows']}")
    print(f"{name}_distinct_uuids={r['distinct_uuids']}")
    print(f"{name}_rows_per_s={r['rows'] / r['seconds']:.0f}")
    print(f"{name}_peak_rss_mb={r['peak_rss_mb']:.1f}")
    print(f"{name}_rss_before_run_mb={r['rss_before_run_mb']:.1f}")
    for key, value in (r.get("metadata") or {}).items():
        print(f"{name}_metadata_{key}={value}")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median time (the highest peak RSS of all runs), every run's time kept."""
    chosen = dict(sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2])
    chosen["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    chosen["all_seconds"] = [round(r["seconds"], 2) for r in runs]
    return chosen


def print_profile(name: str, run: dict[str, Any]) -> None:
    print(f"{name}_profiled_seconds={run['seconds']:.2f}")
    for line in run["profile"].splitlines():
        if line.strip():
            print(f"  {line.rstrip()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events of the big day")
    parser.add_argument("--small", type=int, default=100_000, help="events of the small day")
    parser.add_argument(
        "--repeat", type=int, default=3,
        help="runs of package and baseline on the big day, interleaved; the median is reported",
    )  # fmt: skip
    parser.add_argument("--skip-dlt", action="store_true")
    parser.add_argument("--dlt-python", help="an interpreter with dlt[duckdb] (default: this)")
    parser.add_argument(
        "--baseline-write", choices=("ndjson", "pandas"), default="ndjson",
        help="how the baseline writes a page into DuckDB",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true",
        help="one more package and baseline run on the big day, under cProfile",
    )  # fmt: skip
    parser.add_argument("--child", choices=sorted(CHILDREN))
    for name in ("--url", "--key", "--control-token", "--day", "--db", "--workdir"):
        parser.add_argument(name)
    parser.add_argument("--project-id", type=int)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return 0

    big_n, small_n = args.events, args.small
    baseline_extra = ("--baseline-write", args.baseline_write)
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {"package": [], "baseline": []}
    diffs: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="posthog_bench_events_") as tmp:
        work = Path(tmp)
        for size in (small_n, big_n):
            started = time.perf_counter()
            with run_standin(size, max(1, int(size * PERSONS_PER_EVENT))) as standin:
                control = standin.control
                control.configure_queries(query_latency_s=0)
                day = control.events_info()["first_day"]
                print(f"standin_{size}_day={day}")
                print(f"standin_{size}_seed_s={time.perf_counter() - started:.1f}")
                if size == small_n:
                    _progress(f"package {size}")
                    results["small"] = measure("package", standin, day, work / "package_small")
                    print_variant(f"package_{size}", results["small"])
                    continue
                for attempt in range(max(1, args.repeat)):
                    for variant in ("package", "baseline"):  # interleaved: drift hits both
                        _progress(f"{variant} {size} ({attempt + 1}/{args.repeat})")
                        folder = work / f"{variant}_{attempt}"
                        extra = baseline_extra if variant == "baseline" else ()
                        runs[variant].append(measure(variant, standin, day, folder, extra=extra))
                results["package"] = median_run(runs["package"])
                results["baseline"] = median_run(runs["baseline"])
                print_variant(f"package_{size}", results["package"])
                print_variant(f"baseline_{size}", results["baseline"])
                print(f"baseline_write={args.baseline_write}")
                if not args.skip_dlt:
                    python, why = dlt_interpreter(args.dlt_python)
                    if python is None:
                        print(f"dlt_rest_api=not measured: {why}")
                    else:
                        _progress(f"dlt {size}")
                        results["dlt"] = measure("dlt", standin, day, work / "dlt", python=python)
                        print(f"dlt_version={why}")
                        print(
                            "dlt_rest_api=measured: rest_api with a custom BasePaginator (none "
                            "of its paginators puts a cursor taken from the last row into the "
                            f"SQL of the JSON body); loader_file_format={DLT_FILE_FORMAT}"
                        )
                        print_variant(f"dlt_{size}", results["dlt"])
                else:
                    print("dlt_rest_api=skipped (--skip-dlt)")
                if args.profile:
                    for variant in ("package", "baseline"):
                        _progress(f"{variant} {size} under cProfile")
                        extra = ("--profile", *(baseline_extra if variant == "baseline" else ()))
                        folder = work / f"{variant}_profile"
                        profiled = measure(variant, standin, day, folder, extra=extra)
                        print_profile(f"{variant}_{size}", profiled)

        # The comparisons last: they load the parent, and nothing is measured after them.
        reference = runs["baseline"][0]["db"]
        for run in runs["package"]:  # every package run vs the first baseline run
            for name, n in compare(run["db"], reference, TABLES["baseline"]).items():
                diffs.setdefault("baseline", {}).setdefault(name, 0)
                diffs["baseline"][name] += n
        if "dlt" in results:
            first = runs["package"][0]["db"]
            diffs["dlt"] = compare(first, results["dlt"]["db"], TABLES["dlt"])

    for other, figures in diffs.items():
        for name, n in figures.items():
            print(f"package_vs_{other}_{name}={n}")
    big, small, base = results["package"], results["small"], results["baseline"]
    ratio = big["seconds"] / base["seconds"]
    print(f"time_ratio_package_vs_baseline={ratio:.3f}")
    print(f"time_ratio_goal_met={'yes' if ratio <= 1.2 else 'no'} (goal <= 1.2)")
    print(f"cpu_ratio_package_vs_baseline={big['cpu_s'] / base['cpu_s']:.3f}")
    if "dlt" in results:
        print(f"time_ratio_dlt_vs_package={results['dlt']['seconds'] / big['seconds']:.3f}")
    print(f"rss_ratio_package_vs_baseline={big['peak_rss_mb'] / base['peak_rss_mb']:.3f}")
    print(f"package_rss_ratio_{big_n}_vs_{small_n}={big['peak_rss_mb'] / small['peak_rss_mb']:.3f}")
    grown = [r["peak_rss_mb"] - r["rss_before_run_mb"] for r in (big, small)]
    print(f"package_run_rss_growth_mb_{big_n}={grown[0]:.1f}")
    print(f"package_run_rss_growth_mb_{small_n}={grown[1]:.1f}")
    return 0


def _progress(what: str) -> None:
    print(f"... {what}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

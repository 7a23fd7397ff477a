"""Benchmark: this package's insight + group snapshot vs a plain requests+duckdb script vs dlt.

Run from the project root::

    python bench/snapshots.py            # 10,000 insights + 50,000 groups (5 types x 10,000)
    python bench/snapshots.py --quick    # 1,000 insights + 5,000 groups

One stand-in serves the comparison; before each variant its state is reset (insight caches cold),
so every variant does the same server-side work: list every insight with ``refresh=blocking``
(100 per page), list every group of every type (cursor pages of 100), and write both into DuckDB.
The comparison turns the stand-in's throttles off: it measures the package's own overhead.

Request economy (PostHog allows 1,200 insight requests an hour per key), with throttles ON and
the package's defaults (``refresh=async``): ``requests_per_1000_insights`` for a snapshot of 1,000
insights of which ~45% are stale or cold, and ``scale_2000_async_s`` for 2,000 insights with the
same mix (every result must be present); and the same 2,000 when each background query takes
about 20 s: ``slow_queries_20s_requests_per_1000_insights`` and its wall time.

How it is timed: each variant runs in its own subprocess. The subprocess first imports
everything, builds its pipeline and does a tiny warm-up run (one insight, into a throw-away DuckDB
file) so lazy imports are loaded; then it resets the stand-in and times only the real run with
``time.perf_counter()``: for this package that is one ``dg.materialize([insights, groups])`` call
(Dagster run machinery, fetch ops, write ops; no checks), for the plain script the fetch+insert
loop, for dlt ``pipeline.run(source)`` (extract, normalize, load). Python and Dagster start-up
are excluded. Peak RSS is sampled with psutil every 20 ms over the subprocess (and its children)
for its whole life, and cross-checked with the child's own ``ru_maxrss``.

Timing noise: ours and plain run ``--repeat`` times (default 3), interleaved, and the median
run is reported; dlt runs once (it is an order of magnitude slower).

RSS scaling: the package runs once more against a second stand-in with 10x the data (100,000
insights + 500,000 groups; ``--quick``: 10,000 + 50,000), started after the first one stops.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH_KEY = "phx_bench_key_0123456789"
GROUP_TYPES = 5
SAMPLE_INTERVAL_S = 0.02
#: How long the stand-in's background recalculations take in the request-economy runs.
ASYNC_RECALC_S = 2.0
#: ... and in the slow-queries run (background queries of about 20 s over 2,000 insights).
SLOW_RECALC_S = 20.0
#: Share of insights whose cache is stale or cold in the request-economy runs.
STALE_SHARE = 0.45

INSIGHT_COLUMNS = {
    "id": "BIGINT",
    "short_id": "VARCHAR",
    "name": "VARCHAR",
    "derived_name": "VARCHAR",
    "description": "VARCHAR",
    "last_refresh": "TIMESTAMPTZ",
    "cache_target_age": "TIMESTAMPTZ",
    "is_cached": "BOOLEAN",
    "result": "JSON",
    "query": "JSON",
    "filters": "JSON",
    "query_error": "VARCHAR",
    "dashboards": "JSON",
    "tags": "JSON",
    "created_at": "TIMESTAMPTZ",
    "updated_at": "TIMESTAMPTZ",
}
GROUP_COLUMNS = {
    "group_type_index": "INTEGER",
    "group_key": "VARCHAR",
    "group_properties": "JSON",
    "created_at": "TIMESTAMPTZ",
}


# ------------------------------------------------------------------------------------------------
# Children (each runs in its own process)


def _child_env(args: argparse.Namespace) -> None:
    os.environ.update(
        POSTHOG_HOST=args.url,
        POSTHOG_PROJECT_ID=str(args.project_id),
        POSTHOG_PERSONAL_API_KEY=args.key,
    )


def _first_short_id(args: argparse.Namespace) -> str:
    import requests

    resp = requests.get(
        f"{args.url}/api/projects/{args.project_id}/insights/",
        params={"basic": "true", "limit": 1, "order": "id"},
        headers={"Authorization": f"Bearer {args.key}"},
        timeout=30,
    )
    resp.raise_for_status()
    return resp.json()["results"][0]["short_id"]


def _reset(args: argparse.Namespace) -> None:
    from posthog_standin.server import StandinControl

    StandinControl(args.url, token=args.control_token).reset()


def _count(db: Path, sql: str) -> int:
    import duckdb

    conn = duckdb.connect(str(db), read_only=True)
    try:
        return int(conn.execute(sql).fetchall()[0][0])
    finally:
        conn.close()


def child_ours(args: argparse.Namespace) -> dict[str, Any]:
    """The package: one dg.materialize of the insights and groups assets, in-process."""
    import dagster as dg
    from dagster_duckdb import DuckDBResource

    from posthog_assets.config import GroupsConfig, InsightsConfig, PostHogProject
    from posthog_assets.resources import PostHogResource
    from posthog_assets.snapshots.definitions import build_posthog_snapshot_definitions

    work = Path(args.workdir)
    _child_env(args)
    # The comparison runs without throttles: measure the package, not PostHog's rate limits.
    posthog = PostHogResource(
        host=args.url, project_id=str(args.project_id), personal_api_key=args.key,
        export_dir=str(work / "exports"), pace_requests=False,
    )  # fmt: skip
    project = PostHogProject(
        resource=posthog,
        insights=InsightsConfig(refresh="blocking", page_size=100),
        groups=GroupsConfig(property_values=False),
        duckdb_path=args.db,
    )
    defs = build_posthog_snapshot_definitions([project])
    by_name = {a.node_def.name.rsplit("__", 1)[-1]: a for a in defs.assets or []}
    assets = [by_name["insights"], by_name["groups"]]
    resources = {"posthog": posthog, "duckdb": DuckDBResource(database=args.db)}

    warm = {**resources, "duckdb": DuckDBResource(database=str(work / "warmup.duckdb"))}
    node = by_name["insights"].node_def.name
    dg.materialize(
        [by_name["insights"]],
        resources=warm,
        run_config={"ops": {node: {"config": {"short_id": _first_short_id(args)}}}},
    )
    _reset(args)

    with dg.DagsterInstance.ephemeral() as instance:
        started = time.perf_counter()
        result = dg.materialize(assets, resources=resources, instance=instance)
        seconds = time.perf_counter() - started
    assert result.success
    db = Path(args.db)
    return {
        "seconds": seconds,
        "insights": _count(db, "SELECT count(*) FROM posthog.insights"),
        "groups": _count(db, "SELECT count(*) FROM posthog.groups"),
    }


def _plain_pages(session: Any, url: str, params: dict[str, Any] | None) -> Any:
    """Follow ``next`` links, yielding each page's results."""
    next_url: str | None = url
    while next_url:
        resp = session.get(next_url, params=params, timeout=60)
        resp.raise_for_status()
        page = resp.json()
        params = None
        yield page["results"]
        next_url = page.get("next")


def _plain_insert(conn: Any, table: str, columns: dict[str, str], rows: list[Any]) -> int:
    """One DataFrame, one INSERT ... SELECT (the fast way to bulk-load DuckDB from Python)."""
    import pandas as pd

    names = list(columns)
    select = ", ".join(
        f"CAST({n} AS {t})" if t in ("TIMESTAMPTZ", "JSON") else n for n, t in columns.items()
    )
    frame = pd.DataFrame(rows, columns=names)
    conn.register("rows_frame", frame)
    conn.execute(f"INSERT INTO {table} ({', '.join(names)}) SELECT {select} FROM rows_frame")
    conn.unregister("rows_frame")
    return len(rows)


def child_plain(args: argparse.Namespace) -> dict[str, Any]:
    """What a person would write by hand: requests pages into lists, one DataFrame per table."""
    import duckdb
    import pandas  # noqa: F401  (imported before the clock starts, like dagster for ours)
    import requests

    def insight_row(i: dict[str, Any]) -> tuple[Any, ...]:
        dumps = json.dumps
        return (
            i["id"], i.get("short_id"), i.get("name"), i.get("derived_name"),
            i.get("description"), i.get("last_refresh"), i.get("cache_target_age"),
            i.get("is_cached"), dumps(i.get("result")), dumps(i.get("query")),
            dumps(i.get("filters")),
            ((i.get("query_status") or {}).get("error_message")),
            dumps(i.get("dashboards")), dumps(i.get("tags")),
            i.get("created_at"), i.get("updated_at"),
        )  # fmt: skip

    def group_row(g: dict[str, Any]) -> tuple[Any, ...]:
        return (
            g["group_type_index"],
            g["group_key"],
            json.dumps(g.get("group_properties")),
            g.get("created_at"),
        )

    base = f"{args.url}/api/projects/{args.project_id}"
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {args.key}"
    # warm-up: one small page into a throw-away database
    warm = duckdb.connect(str(Path(args.workdir) / "warmup.duckdb"))
    warm.execute(
        "CREATE TABLE i (" + ", ".join(f"{c} {t}" for c, t in INSIGHT_COLUMNS.items()) + ")"
    )
    page = next(_plain_pages(session, f"{base}/insights/", {"limit": 1, "refresh": "blocking"}))
    _plain_insert(warm, "i", INSIGHT_COLUMNS, [insight_row(i) for i in page])
    warm.close()
    _reset(args)

    # The straightforward script: collect every row, then one bulk insert per table.
    started = time.perf_counter()
    insights = [
        insight_row(i)
        for page in _plain_pages(
            session, f"{base}/insights/", {"refresh": "blocking", "limit": 100, "order": "id"}
        )
        for i in page
    ]
    types = session.get(f"{base}/groups_types/", timeout=60).json()
    groups = [
        group_row(g)
        for t in types
        for page in _plain_pages(
            session, f"{base}/groups/", {"group_type_index": t["group_type_index"]}
        )
        for g in page
    ]
    conn = duckdb.connect(args.db)
    conn.execute("CREATE SCHEMA IF NOT EXISTS plain")
    conn.execute(
        "CREATE OR REPLACE TABLE plain.insights ("
        + ", ".join(f"{c} {t}" for c, t in INSIGHT_COLUMNS.items())
        + ")"
    )
    conn.execute(
        "CREATE OR REPLACE TABLE plain.groups ("
        + ", ".join(f"{c} {t}" for c, t in GROUP_COLUMNS.items())
        + ")"
    )
    n_insights = _plain_insert(conn, "plain.insights", INSIGHT_COLUMNS, insights)
    n_groups = _plain_insert(conn, "plain.groups", GROUP_COLUMNS, groups)
    conn.close()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "insights": n_insights, "groups": n_groups}


def _dlt_config(args: argparse.Namespace, *, warmup: bool = False) -> dict[str, Any]:
    base = f"{args.url}/api/projects/{args.project_id}/"
    insights: dict[str, Any] = {
        "name": "insights",
        "endpoint": {
            "path": "insights/",
            "params": {"refresh": "blocking", "order": "id"},
            "data_selector": "results",
            "paginator": {
                "type": "offset",
                "limit": 1 if warmup else 100,
                "offset_param": "offset",
                "limit_param": "limit",
                "total_path": "count",
                **({"maximum_offset": 1} if warmup else {}),
            },
        },
    }
    resources: list[Any] = [insights]
    if not warmup:
        resources += [
            {
                "name": "group_types",
                "endpoint": {
                    "path": "groups_types/",
                    "data_selector": "$",
                    "paginator": "single_page",
                },
            },
            {
                "name": "groups",
                "endpoint": {
                    "path": "groups/",
                    "params": {"group_type_index": "{resources.group_types.group_type_index}"},
                    "data_selector": "results",
                    "paginator": {"type": "json_link", "next_url_path": "next"},
                },
            },
        ]
    return {
        "client": {"base_url": base, "auth": {"type": "bearer", "token": args.key}},
        "resource_defaults": {"write_disposition": "replace"},
        "resources": resources,
    }


def child_dlt(args: argparse.Namespace) -> dict[str, Any]:
    """dlt's rest_api source with its defaults (nested JSON normalised into child tables)."""
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
    try:
        import dlt
        from dlt.sources.rest_api import rest_api_source
    except ImportError as exc:
        return {"unavailable": f"dlt is not installed ({exc}); pip install '.[bench]'"}
    work = Path(args.workdir)

    def pipeline(name: str, db: Path) -> Any:
        return dlt.pipeline(
            pipeline_name=name,
            destination=dlt.destinations.duckdb(str(db)),
            dataset_name="posthog_dlt",
            pipelines_dir=str(work / "dlt_pipelines"),
        )

    pipeline("posthog_warmup", work / "warmup.duckdb").run(
        rest_api_source(_dlt_config(args, warmup=True))
    )
    _reset(args)

    started = time.perf_counter()
    p = pipeline("posthog_bench", Path(args.db))
    p.run(rest_api_source(_dlt_config(args)))
    seconds = time.perf_counter() - started
    counts = p.last_trace.last_normalize_info.row_counts
    return {
        "seconds": seconds,
        "insights": int(counts.get("insights", 0)),
        "groups": int(counts.get("groups", 0)),
        "tables": len(counts),
    }


CHILDREN = {"ours": child_ours, "plain": child_plain, "dlt": child_dlt}


def run_child(args: argparse.Namespace) -> None:
    result = CHILDREN[args.child](args)
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# Parent


def measure(variant: str, standin: Any, workdir: Path) -> dict[str, Any]:
    """Run one variant in a subprocess, sampling the RSS of its process tree with psutil."""
    import psutil

    folder = workdir / variant
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, __file__, "--child", variant, "--url", standin.url,
        "--key", standin.key, "--project-id", str(standin.project_id),
        "--control-token", standin.control_token,
        "--db", str(folder / "bench.duckdb"), "--workdir", str(folder),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DAGSTER_HOME": str(folder / "dagster_home")}
    (folder / "dagster_home").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        time.sleep(SAMPLE_INTERVAL_S)
    out, err = proc.communicate()
    line = next((x for x in out.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}):\n{err[-4000:]}")
    result = json.loads(line.removeprefix("BENCH_RESULT "))
    result["peak_rss_mb"] = peak / (1 << 20)
    return result


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else str(value)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median time and median peak RSS over the runs; every run's time is kept for the table."""
    chosen = dict(runs[0])
    for key in ("seconds", "peak_rss_mb", "ru_maxrss_mb"):
        chosen[key] = statistics.median(r[key] for r in runs)
    chosen["all_seconds"] = [round(r["seconds"], 2) for r in runs]
    return chosen


def request_economy(
    insights: int, workdir: Path, recalc_s: float = ASYNC_RECALC_S
) -> dict[str, Any]:
    """One default (async) snapshot under PostHog's throttles, ~45% of insights stale or cold,
    whose background recalculations take ``recalc_s`` seconds each.

    Runs in this process: what is measured is requests and wall time of the snapshot itself.
    """
    import dagster as dg
    import duckdb
    from dagster_duckdb import DuckDBResource

    from posthog_assets.config import GroupsConfig, PostHogProject
    from posthog_assets.resources import PostHogResource
    from posthog_assets.snapshots.definitions import build_posthog_snapshot_definitions
    from posthog_standin.server import StandinProcess

    folder = workdir / f"economy_{insights}_{recalc_s:g}"
    folder.mkdir(parents=True, exist_ok=True)
    with StandinProcess(key=BENCH_KEY, insights=insights, rate_limits=True) as standin:
        control = standin.control
        control.configure(async_delay_s=recalc_s)
        control.set_insight_cache(None, "fresh")
        stale = int(insights * STALE_SHARE)
        for k in range(stale):  # every other one of the stale share cold, the rest stale
            control.set_insight_cache(1 + k * insights // stale, "cold" if k % 2 else "stale")
        os.environ.update(
            POSTHOG_PERSONAL_API_KEY=standin.key,
            POSTHOG_ASSETS_RATE_LIMIT_DIR=str(folder / "gates"),
        )
        # The default snapshot (async), no groups; the key read from the env, as deployed.
        posthog = PostHogResource(
            host=standin.url,
            project_id=str(standin.project_id),
            personal_api_key=dg.EnvVar("POSTHOG_PERSONAL_API_KEY"),
            export_dir=str(folder / "exports"),
        )
        duckdb_path = str(folder / "economy.duckdb")
        project = PostHogProject(
            resource=posthog, groups=GroupsConfig(enabled=False), duckdb_path=duckdb_path
        )
        defs = build_posthog_snapshot_definitions([project])
        control.clear_requests_log()
        started = time.perf_counter()
        with dg.DagsterInstance.ephemeral() as instance:
            result = dg.materialize(
                list(defs.assets or []),
                resources={"posthog": posthog, "duckdb": DuckDBResource(database=duckdb_path)},
                instance=instance,
            )
        seconds = time.perf_counter() - started
        assert result.success
        log = [r for r in control.requests_log() if r["server"] == "api"]
        throttled = sum(1 for r in log if r["status"] == 429)
    conn = duckdb.connect(str(folder / "economy.duckdb"), read_only=True)
    try:
        rows, with_result = conn.execute(
            "SELECT count(*), count(result) FROM posthog.insights"
        ).fetchall()[0]
    finally:
        conn.close()
    return {
        "insights": insights,
        "stale_or_cold": stale,
        "requests": len(log),
        "throttled_429": throttled,
        "seconds": seconds,
        "rows": int(rows),
        "with_result": int(with_result),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 insights + 5,000 groups")
    parser.add_argument("--skip-10x", action="store_true", help="skip the RSS scaling run")
    parser.add_argument(
        "--economy-only", action="store_true", help="only the request-economy figures"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of ours and plain, interleaved; the median is reported (dlt runs once)",
    )
    parser.add_argument("--child", choices=sorted(CHILDREN))
    parser.add_argument("--url")
    parser.add_argument("--key")
    parser.add_argument("--control-token")
    parser.add_argument("--project-id", type=int)
    parser.add_argument("--db")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return 0

    from posthog_standin.server import StandinProcess

    insights, groups = (1_000, 5_000) if args.quick else (10_000, 50_000)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="posthog_bench_") as tmp:
        workdir = Path(tmp)
        print("Request economy: async snapshots under PostHog's throttles, 45% stale or cold")
        economy = {n: request_economy(n, workdir) for n in (1_000, 2_000)}
        economy[-2_000] = request_economy(2_000, workdir, SLOW_RECALC_S)
        for n, e in economy.items():
            print(
                f"  {abs(n):>5} insights, {'slow' if n < 0 else 'fast'} queries: "
                f"{e['requests']} requests, {e['throttled_429']} x 429, "
                f"{e['seconds']:.1f}s, {e['with_result']}/{e['rows']} rows with a result"
            )
        if args.economy_only:
            _print_economy(economy)
            return 0
        print(f"Stand-in: {insights:,} insights + {groups:,} groups ({GROUP_TYPES} types)")
        with StandinProcess(
            key=BENCH_KEY,
            insights=insights,
            groups=groups // GROUP_TYPES,
            group_types=GROUP_TYPES,
            rate_limits=False,
        ) as standin:
            control = standin.control
            runs: dict[str, list[dict[str, Any]]] = {"ours": [], "plain": []}
            for attempt in range(max(1, args.repeat)):
                for variant in ("ours", "plain"):  # interleaved, so load drifts hit both
                    control.reset()
                    print(f"  running {variant} ({attempt + 1}/{args.repeat}) ...", flush=True)
                    folder = workdir / f"{variant}_1x_{attempt}"
                    runs[variant].append(measure(variant, standin, folder))
            rows["ours (1x)"] = _median_run(runs["ours"])
            rows["plain (1x)"] = _median_run(runs["plain"])
            control.reset()
            print("  running dlt ...", flush=True)
            rows["dlt (1x)"] = measure("dlt", standin, workdir / "dlt_1x")
        if not args.skip_10x:
            print(f"Stand-in: {10 * insights:,} insights + {10 * groups:,} groups (RSS scaling)")
            with StandinProcess(
                key=BENCH_KEY,
                insights=10 * insights,
                groups=10 * groups // GROUP_TYPES,
                group_types=GROUP_TYPES,
                rate_limits=False,
            ) as standin:
                print("  running ours (10x) ...", flush=True)
                rows["ours (10x)"] = measure("ours", standin, workdir / "ours_10x")

    print()
    header = f"{'variant':<12} {'seconds':>9} {'insights':>9} {'groups':>9} "
    header += f"{'peak RSS MB':>12} {'ru_maxrss MB':>13}  runs (s)"
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        if "unavailable" in r:
            print(f"{name:<12} unavailable: {r['unavailable']}")
            continue
        print(
            f"{name:<12} {_fmt(r['seconds'], '9.2f')} {_fmt(r['insights'], '9d')} "
            f"{_fmt(r['groups'], '9d')} {_fmt(r['peak_rss_mb'], '12.1f')} "
            f"{_fmt(r['ru_maxrss_mb'], '13.1f')}  {r.get('all_seconds', '')}"
        )
    print()
    ours, plain, dlt_row = rows["ours (1x)"], rows["plain (1x)"], rows["dlt (1x)"]
    print(f"vs_plain_ratio={ours['seconds'] / plain['seconds']:.3f}")
    if "unavailable" in dlt_row:
        print("vs_dlt_speedup=unavailable")
    else:
        print(f"vs_dlt_speedup={dlt_row['seconds'] / ours['seconds']:.3f}")
    if "ours (10x)" in rows:
        print(f"rss_growth_10x={rows['ours (10x)']['peak_rss_mb'] / ours['peak_rss_mb']:.3f}")
    else:
        print("rss_growth_10x=skipped")
    _print_economy(economy)
    return 0


def _print_economy(economy: dict[int, dict[str, Any]]) -> None:
    one, two, slow = economy[1_000], economy[2_000], economy[-2_000]
    print(f"requests_per_1000_insights={one['requests'] * 1000 / one['insights']:.0f}")
    complete = two["with_result"] == two["rows"] == two["insights"]
    print(f"scale_2000_async_s={two['seconds']:.1f}")
    print(f"scale_2000_async_complete={'yes' if complete else 'no'}")
    per_1000 = slow["requests"] * 1000 / slow["insights"]
    print(f"slow_queries_{SLOW_RECALC_S:g}s_requests_per_1000_insights={per_1000:.0f}")
    print(f"slow_queries_{SLOW_RECALC_S:g}s_wall_s={slow['seconds']:.1f}")
    complete = slow["with_result"] == slow["rows"] == slow["insights"]
    print(f"slow_queries_complete={'yes' if complete else 'no'}")


if __name__ == "__main__":
    sys.exit(main())

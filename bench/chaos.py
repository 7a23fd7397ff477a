"""Chaos benchmark: the whole pipeline under 20% random API faults, several seeded rounds.

The longer variant of the test suite's chaos test: six exports (PNG, CSV, XLSX, a
dashboard), every insight of the stand-in (blocking, pages of 25) and every group asset. One
fault-free run is the reference; each chaos round materializes everything again into a fresh
DuckDB file and export folder while seeded rules fault ``--rate`` of all API requests (429,
500, 502, 503, dropped connection, connection cut mid-body), then compares:

- DuckDB: every table's rows (content; snapshot time, cache hits and export ids ignored) against
  the reference: rows lost, extra, duplicated;
- files: exactly one file per export (none lost, none duplicated, no ``.part`` or marker left),
  each equal to PostHog's content of its export; the CSV byte-identical to the reference run's;
- exports: how many PostHog created beyond one per asset (duplicates).

Run from the repository root: ``python bench/chaos.py [--rounds 5] [--rate 0.2] [--quick]``.
Besides the table it prints machine-readable lines: ``chaos_fault_kinds=``,
``chaos_requests=``, ``chaos_requests_faulted=``, ``chaos_rows_lost=``, ``chaos_rows_duplicated=``,
``chaos_files_lost=``, ``chaos_files_duplicated=``, ``chaos_duplicate_exports=``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg
import requests
from harness import (
    ALL_FAMILIES,
    CHAOS_KINDS,
    World,
    all_files,
    build_world,
    chaos_report,
    chaos_rules,
    compare_worlds,
    exports_created,
    failure_texts,
    fast_resource,
    materialized,
)

from posthog_standin.server import StandinProcess

KEY = "phx_bench_chaos_key"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
#: The project, as a ``defs.yaml`` (or its configuration file) gives it.
BENCH: dict[str, Any] = {
    "exports": [
        {"insight": 1, "format": "image/png", "name": "insight_1_png"},
        {"insight": 2, "format": "text/csv", "name": "insight_2_csv"},
        {"insight": 3, "format": XLSX, "name": "insight_3_xlsx"},
        {"dashboard": 1, "format": "image/png", "name": "dashboard_1_png"},
        {"insight": 4, "format": "text/csv", "name": "insight_4_csv"},
        {"insight": 5, "format": "image/png", "name": "insight_5_png"},
    ],
    "insights": {"refresh": "blocking", "page_size": 25},
    "groups": {
        "property_values": True,
        "tracked": [{"group_type_index": 0, "group_key": "organization-3"}],
    },
}
QUICK: dict[str, Any] = {
    **BENCH,
    "insights": {"refresh": "blocking", "page_size": 100, "created_by": [2]},
}
EXPORT_NAMES = [e["name"] for e in BENCH["exports"]]
CHAOS_CLIENT = {"max_attempts": 8, "backoff_initial_s": 0.02, "backoff_max_s": 0.2}
CHAOS_STEP_RETRY = dg.RetryPolicy(max_retries=4, delay=0.05)


def progress(message: str) -> None:
    print(f"[chaos] {message}", file=sys.stderr, flush=True)


def run_world(
    standin: StandinProcess, root: Path, attributes: dict[str, Any], **client: Any
) -> tuple[World, dg.ExecuteInProcessResult, float]:
    world = build_world(root, attributes, step_retry=CHAOS_STEP_RETRY)
    started = time.monotonic()
    result = world.materialize(fast_resource(standin, world.export_dir, **client))
    return world, result, time.monotonic() - started


def file_findings(
    world: World, result: dg.ExecuteInProcessResult, standin: StandinProcess
) -> dict[str, Any]:
    """Files lost or duplicated, and whether each equals PostHog's content of its export."""
    files = all_files(world.export_dir)
    per_asset = Counter(p.parent.name for p in files)
    lost = sum(1 for name in EXPORT_NAMES if per_asset[name] == 0)
    extra = sum(max(0, per_asset[name] - 1) for name in EXPORT_NAMES)
    stray = sum(n for name, n in per_asset.items() if name not in EXPORT_NAMES)
    metadata = materialized(result)
    headers = {"Authorization": f"Bearer {standin.key}"}
    corrupt = 0
    for name in EXPORT_NAMES:
        md = metadata.get(name)
        if md is None:
            continue
        url = f"{standin.url}/api/projects/{standin.project_id}/exports/{md['export_id']}/content/"
        server = requests.get(url, headers=headers, timeout=120).content
        corrupt += int(Path(md["path"]).read_bytes() != server)
    return {
        "lost": lost,
        "duplicated": extra + stray,
        "corrupt": corrupt,
        "csv_sha": {n: metadata[n]["sha256"] for n in EXPORT_NAMES if n.endswith("_csv")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=float, default=0.2, help="fraction of requests faulted")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer insights, one round")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    attributes = QUICK if args.quick else BENCH

    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="posthog-chaos-") as tmp,
        StandinProcess(key=KEY, insights=1200, groups=1200, group_types=3) as standin,
    ):
        control = standin.control
        control.reset()
        progress("fault-free reference run")
        ref, result, ref_wall = run_world(standin, Path(tmp) / "reference", attributes)
        if not result.success:
            print("\n".join(failure_texts(result)), file=sys.stderr)
            return 1
        ref_files = file_findings(ref, result, standin)
        ref_requests = chaos_report(control.requests_log()).requests

        for n in range(rounds):
            seed = args.seed + n
            control.reset()
            for rule in chaos_rules(args.rate, seed):
                control.add_fault(**rule)
            progress(f"chaos round {n + 1}/{rounds} (seed {seed}, {args.rate:.0%} faulted)")
            world, result, wall = run_world(
                standin, Path(tmp) / f"chaos{n}", attributes, **CHAOS_CLIENT
            )
            log = control.requests_log()
            control.clear_faults()
            report = chaos_report(log)
            diff = compare_worlds(ref, world, ALL_FAMILIES)
            files = file_findings(world, result, standin)
            rows.append(
                {
                    "seed": seed,
                    "success": result.success,
                    "wall": wall,
                    "requests": report.requests,
                    "faulted": report.faulted,
                    "by_kind": report.by_kind,
                    "rows": sum(d["rows"] for d in diff.values()),
                    "rows_lost": sum(d["lost"] for d in diff.values()),
                    "rows_extra": sum(d["extra"] for d in diff.values()),
                    "rows_duplicated": sum(d["duplicated"] for d in diff.values()),
                    "files_lost": files["lost"],
                    "files_duplicated": files["duplicated"],
                    "files_corrupt": files["corrupt"],
                    "csv_identical": files["csv_sha"] == ref_files["csv_sha"],
                    "duplicate_exports": exports_created(log) - len(EXPORT_NAMES),
                    "errors": failure_texts(result),
                }
            )

    print()
    print(f"Reference (no faults): {ref_requests} API requests, {ref_wall:.1f}s")
    header = (
        f"{'seed':>5} {'ok':>3} {'wall s':>7} {'requests':>8} {'faulted':>8} {'rows':>7} "
        f"{'lost':>5} {'extra':>5} {'dup':>4} {'files lost':>10} {'files dup':>9} "
        f"{'corrupt':>7} {'csv same':>8} {'dup exports':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['seed']:>5} {'yes' if r['success'] else 'NO':>3} {r['wall']:>7.1f} "
            f"{r['requests']:>8} {r['faulted']:>8} {r['rows']:>7} {r['rows_lost']:>5} "
            f"{r['rows_extra']:>5} {r['rows_duplicated']:>4} {r['files_lost']:>10} "
            f"{r['files_duplicated']:>9} {r['files_corrupt']:>7} "
            f"{'yes' if r['csv_identical'] else 'NO':>8} {r['duplicate_exports']:>11}"
        )
        print(f"      faults by kind: {r['by_kind']}")
        for error in r["errors"]:
            print(f"      FAILED STEP: {error.splitlines()[0]}")
    total = {
        k: sum(r[k] for r in rows)
        for k in ("requests", "faulted", "rows_lost", "rows_extra", "rows_duplicated",
                  "files_lost", "files_duplicated", "files_corrupt", "duplicate_exports")
    }  # fmt: skip
    print()
    print(f"chaos_fault_kinds={len(CHAOS_KINDS)}")
    print(f"chaos_rounds={len(rows)}")
    print(f"chaos_requests={total['requests']}")
    print(f"chaos_requests_faulted={total['faulted']}")
    print(f"chaos_rows_lost={total['rows_lost'] + total['rows_extra']}")
    print(f"chaos_rows_duplicated={total['rows_duplicated']}")
    print(f"chaos_files_lost={total['files_lost'] + total['files_corrupt']}")
    print(f"chaos_files_duplicated={total['files_duplicated']}")
    print(f"chaos_duplicate_exports={total['duplicate_exports']}")
    ok = all(r["success"] and r["csv_identical"] for r in rows) and not any(
        total[k] for k in total if k not in ("requests", "faulted")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

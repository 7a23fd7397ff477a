"""Celery benchmark: an exports job on one Celery worker versus two.

Twenty exports (PNG, CSV, XLSX of insights 1-20) whose rendering takes 3 s each on the stand-in,
materialized by the code location's exports group (the export step, the exports log, the export
checks) with ``deploy/celery/run_config.yaml``, on a deployment as ``deploy/celery/`` describes it
(PostgreSQL, Redis, workers started as its README says, a run worker with its own
``DAGSTER_HOME``: ``bench/harness.py``).

Expect little difference: the package runs all of a project's exports in ONE step with a thread
per export, so a second worker has nothing of the export step to take; only the log and the
checks could run elsewhere, and they wait for the export step anyway.

Each configuration gets fresh workers, one warm-up run (not counted) and ``--rounds`` measured
runs; figures are medians. Run from the repository root: ``python bench/celery.py``. Besides a
table it prints ``celery_<n>w_run_s=``, ``celery_<n>w_wall_s=``, ``celery_<n>w_export_step_s=``,
``celery_<n>w_workers_used=`` for n = 1 and 2, and ``celery_2w_vs_1w_run_ratio=``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    PostgresServer,
    RedisServer,
    celery_workers,
    deployment,
    prepare_instance,
    start_run,
    step_spans,
)

from posthog_assets.tables import EXPORTS_GROUP
from posthog_standin.server import StandinProcess

EXPORTS = 20
RENDER_S = 3.0
FORMATS = (
    ("png", "image/png"),
    ("csv", "text/csv"),
    ("xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
)
RUN_TIMEOUT_S = 300.0


def world() -> dict[str, Any]:
    """The project of the deployment's configuration file: exports of insights 1-20 only."""
    exports = []
    for i in range(1, EXPORTS + 1):
        ext, mime = FORMATS[i % len(FORMATS)]
        exports.append({"insight": i, "format": mime, "name": f"insight_{i}_{ext}"})
    return {"exports": exports, "insights": {"enabled": False}, "groups": {"enabled": False}}


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def measure(
    n_workers: int,
    rounds: int,
    root: Path,
    standin: StandinProcess,
    postgres: PostgresServer,
    redis: RedisServer,
) -> dict[str, float]:
    dep = deployment(
        shared=root / "shared",
        standin=standin,
        postgres=postgres,
        redis=redis,
        attributes=world(),
    )
    instance = prepare_instance(dep, root / "bench_home")
    runs: list[dict[str, float]] = []
    try:
        hosts = [root / f"host{i}" for i in range(1, n_workers + 1)]
        with celery_workers(dep, hosts) as workers:
            for n in range(rounds + 1):
                started = time.monotonic()
                run = start_run(
                    dep, root / f"run{n}", name=f"{n_workers}w-{n}", groups=[EXPORTS_GROUP]
                )
                try:
                    outcome = run.result(RUN_TIMEOUT_S)
                finally:
                    run.kill()
                wall = time.monotonic() - started
                assert outcome["success"], f"run {outcome['run_id']} failed"
                record = instance.get_run_record_by_id(outcome["run_id"])
                assert record is not None and record.start_time and record.end_time
                spans = step_spans(instance, outcome["run_id"])
                export_step = next(s for s in spans if s.key.endswith("exports"))
                assert export_step.end is not None
                used = {w.name for w in workers for s in spans if s.pid in w.pids() | w.seen}
                figures = {
                    "wall_s": wall,
                    "run_s": record.end_time - record.start_time,
                    "export_step_s": export_step.end - export_step.start,
                    "workers_used": float(len(used)),
                }
                progress(
                    f"{n_workers} worker(s), {'warm-up' if n == 0 else f'round {n}'}: "
                    + ", ".join(f"{k}={v:.2f}" for k, v in figures.items())
                )
                if n:  # the first run warms the workers' pool processes up
                    runs.append(figures)
    finally:
        instance.dispose()
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="posthog-bench-celery-"))
    progress(f"working in {tmp}")
    redis = RedisServer(tmp / "redis").start()
    postgres = PostgresServer.start()
    standin = StandinProcess(export_delay=RENDER_S).start()
    results: dict[int, dict[str, float]] = {}
    try:
        standin.control.reset()
        standin.control.configure(export_delay_s=RENDER_S)
        for n_workers in (1, 2):
            redis.flush()
            results[n_workers] = measure(
                n_workers, args.rounds, tmp / f"{n_workers}w", standin, postgres, redis
            )
    finally:
        standin.stop()
        postgres.remove()
        redis.stop()

    print(f"{EXPORTS} exports x {RENDER_S:.0f} s render, medians of {args.rounds} runs")
    print(f"{'workers':<8} {'run s':>7} {'wall s':>7} {'export step s':>14} {'workers used':>13}")
    for n, r in results.items():
        print(
            f"{n:<8} {r['run_s']:>7.2f} {r['wall_s']:>7.2f} {r['export_step_s']:>14.2f} "
            f"{r['workers_used']:>13.0f}"
        )
    for n, r in results.items():
        for key, value in r.items():
            print(
                f"celery_{n}w_{key}={value:.3f}"
                if key != "workers_used"
                else f"celery_{n}w_{key}={value:.0f}"
            )
    print(f"celery_2w_vs_1w_run_ratio={results[2]['run_s'] / results[1]['run_s']:.3f}")


if __name__ == "__main__":
    main()

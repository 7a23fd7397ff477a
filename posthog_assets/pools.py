"""Concurrency pool limits for this package, applied to a Dagster instance, and slots that runs
no longer running still hold.

``dagster.yaml`` can only set a default pool limit; per-pool limits live in the instance's storage,
so the commands (demo, UI) apply them with this module: ``python -m posthog_assets.pools``.

A run interrupted while a step was starting (a Ctrl-C at the wrong moment) can end without
releasing the slot that step claimed. Only the daemon frees such slots, and only when the
instance sets ``run_monitoring.free_slots_after_run_end_seconds``; ``dg launch`` runs no daemon,
so the next run would wait on that slot for ever, at DEBUG level. So the package frees the slots
of finished runs when a run starts and whenever a step finds its pool full.
"""

from __future__ import annotations

import logging
from typing import Any

import dagster as dg
from dagster._core.storage.dagster_run import FINISHED_STATUSES

POSTHOG_API_POOL = "posthog_api"
DUCKDB_POOL = "duckdb"
#: API steps may overlap (each also bounds its own threads); DuckDB allows one writer at a time.
POOL_LIMITS: dict[str, int] = {POSTHOG_API_POOL: 4, DUCKDB_POOL: 1}


def apply_pool_limits(instance: dg.DagsterInstance, limits: dict[str, int] | None = None) -> None:
    for pool, limit in (limits or POOL_LIMITS).items():
        instance.event_log_storage.set_concurrency_slots(pool, limit)


def free_slots_of_ended_runs(instance: dg.DagsterInstance, log: Any = None) -> int:
    """Free the pool slots held by runs that have finished (or that storage no longer knows);
    return how many were freed. Slots of runs still going are left alone."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return 0
    holders = storage.get_concurrency_run_ids()
    if not holders:
        return 0
    claimed = [
        slot.run_id
        for pool in storage.get_concurrency_keys()
        for slot in storage.get_concurrency_info(pool).claimed_slots
    ]
    freed = 0
    for run_id in sorted(holders):
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status not in FINISHED_STATUSES:
            continue
        storage.free_concurrency_slots_for_run(run_id)
        count = claimed.count(run_id)
        freed += count
        status = run.status.value if run is not None else "unknown to this instance"
        (log or logging.getLogger(__name__)).info(
            "Freed %d pool slot(s) still held by run %s (%s): it ended without releasing them",
            count, run_id, status,
        )  # fmt: skip
    return freed


def slot_holders(instance: dg.DagsterInstance, pool: str) -> list[tuple[str, str]]:
    """(run id, status) of the runs holding slots of ``pool``."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    found = []
    for run_id in sorted({slot.run_id for slot in info.claimed_slots}):
        run = instance.get_run_by_id(run_id)
        found.append((run_id, run.status.value if run is not None else "unknown"))
    return found


if __name__ == "__main__":
    with dg.DagsterInstance.get() as inst:
        apply_pool_limits(inst)
        print(", ".join(f"{k}={v}" for k, v in POOL_LIMITS.items()))

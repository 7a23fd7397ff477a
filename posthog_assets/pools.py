"""Concurrency pool limits for this package, applied to a Dagster instance.

``dagster.yaml`` can only set a default pool limit; per-pool limits live in the instance's storage,
so the commands (demo, UI) apply them with this module: ``python -m posthog_assets.pools``.
"""

from __future__ import annotations

import dagster as dg

POSTHOG_API_POOL = "posthog_api"
DUCKDB_POOL = "duckdb"
#: API steps may overlap (each also bounds its own threads); DuckDB allows one writer at a time.
POOL_LIMITS: dict[str, int] = {POSTHOG_API_POOL: 4, DUCKDB_POOL: 1}


def apply_pool_limits(instance: dg.DagsterInstance, limits: dict[str, int] | None = None) -> None:
    for pool, limit in (limits or POOL_LIMITS).items():
        instance.event_log_storage.set_concurrency_slots(pool, limit)


if __name__ == "__main__":
    with dg.DagsterInstance.get() as inst:
        apply_pool_limits(inst)
        print(", ".join(f"{k}={v}" for k, v in POOL_LIMITS.items()))

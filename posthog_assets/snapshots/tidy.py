"""The tidy tables beside ``posthog.insights``: their columns, keys, and the stager that fills
them from each page of insights as it is staged.

They are written in the same transaction as the insights snapshot they come from (see
:func:`posthog_assets.snapshots.writer.replace_snapshot`), so a table never holds rows of another
snapshot than ``posthog.insights`` does, and re-running a day replaces that day's rows in all six.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from posthog_assets.snapshots.results import (
    FUNNEL_STEPS,
    INSIGHT_ROWS,
    PATH_EDGES,
    RETENTION_CELLS,
    SERIES,
    TIDY_TABLES,
    flatten_insight,
)
from posthog_assets.snapshots.staging import StagedRows
from posthog_assets.snapshots.writer import SnapshotTable

_SNAPSHOT_COLUMNS = {
    "project_id": "VARCHAR",
    "snapshot_date": "DATE",
    "snapshot_at": "TIMESTAMPTZ",
    "insight_id": "BIGINT",
}
_BY_DAY = {
    "scope": ("project_id", "snapshot_date"),
    "constants": ("project_id", "snapshot_date", "snapshot_at"),
}

TIDY_COLUMNS: dict[str, dict[str, str]] = {
    SERIES: {
        "kind": "VARCHAR",
        "series_index": "INTEGER",
        "point_index": "INTEGER",
        "label": "VARCHAR",
        "breakdown_value": "VARCHAR",
        "compare_label": "VARCHAR",
        "status": "VARCHAR",
        "day": "DATE",
        "x": "VARCHAR",
        "value": "DOUBLE",
    },
    FUNNEL_STEPS: {
        "breakdown_value": "VARCHAR",
        "step_order": "INTEGER",
        "step_name": "VARCHAR",
        "count": "BIGINT",
        "conversion_from_first": "DOUBLE",
        "conversion_from_previous": "DOUBLE",
        "average_conversion_time_s": "DOUBLE",
        "median_conversion_time_s": "DOUBLE",
    },
    RETENTION_CELLS: {
        "breakdown_value": "VARCHAR",
        "cohort_index": "INTEGER",
        "cohort_label": "VARCHAR",
        "cohort_date": "DATE",
        "period": "INTEGER",
        "count": "BIGINT",
    },
    PATH_EDGES: {
        "edge_index": "INTEGER",
        "source": "VARCHAR",
        "target": "VARCHAR",
        "value": "BIGINT",
        "average_conversion_time_s": "DOUBLE",
    },
    INSIGHT_ROWS: {"row_index": "INTEGER", "row": "JSON"},
}

#: What identifies a row within one day's snapshot of a project (checked for duplicates).
TIDY_KEYS: dict[str, tuple[str, ...]] = {
    SERIES: ("insight_id", "series_index", "point_index"),
    FUNNEL_STEPS: ("insight_id", "breakdown_value", "step_order"),
    RETENTION_CELLS: ("insight_id", "breakdown_value", "cohort_index", "period"),
    PATH_EDGES: ("insight_id", "edge_index"),
    INSIGHT_ROWS: ("insight_id", "row_index"),
}

TIDY_DESCRIPTIONS: dict[str, str] = {
    SERIES: "One row per data point of every Trends, Stickiness and Lifecycle insight (and of "
    "funnel trends and time-to-convert views), per daily snapshot, in DuckDB.",
    FUNNEL_STEPS: "One row per step of every funnel (per breakdown value), with counts, "
    "conversion rates and times, per daily snapshot, in DuckDB.",
    RETENTION_CELLS: "One row per cohort and period of every retention insight, per daily "
    "snapshot, in DuckDB.",
    PATH_EDGES: "One row per edge of every paths insight, per daily snapshot, in DuckDB.",
    INSIGHT_ROWS: "One row per result row of every HogQL/DataTable insight (a JSON object keyed "
    "by column name), per daily snapshot, in DuckDB.",
}

TIDY_SNAPSHOT_TABLES: dict[str, SnapshotTable] = {
    name: SnapshotTable(name=name, columns={**_SNAPSHOT_COLUMNS, **TIDY_COLUMNS[name]}, **_BY_DAY)
    for name in TIDY_TABLES
}


class TidyStager:
    """Flattens each staged insight into the tidy tables' staging files (thread-safe).

    Counts what it could not flatten by kind: a result is never dropped (its raw JSON stays in
    ``posthog.insights``) and never fails the run.
    """

    def __init__(self, staging: Mapping[str, StagedRows]) -> None:
        self.staging = staging
        self.unflattened: Counter[str] = Counter()
        self.flattened: Counter[str] = Counter()
        self.reasons: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, insights: Iterable[Mapping[str, Any]]) -> None:
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in self.staging}
        for insight in insights:
            flat = flatten_insight(insight)
            with self._lock:
                if flat.unflattened:
                    self.unflattened[flat.kind or "unknown"] += 1
                    self.reasons.setdefault(flat.kind or "unknown", flat.unflattened)
                elif flat.rows:
                    self.flattened[flat.kind or "unknown"] += 1
            base = {"insight_id": insight.get("id")}
            for table, table_rows in flat.rows.items():
                extra = {**base, "kind": flat.kind} if table == SERIES else base
                rows[table].extend({**extra, **row} for row in table_rows)
        for table, table_rows in rows.items():
            self.staging[table].write(table_rows)

    def figures(self) -> dict[str, Any]:
        """For the insights materialization: what was flattened, and what was not (and why)."""
        return {
            "flattened_insights": sum(self.flattened.values()),
            "flattened_by_kind": dict(sorted(self.flattened.items())),
            "unflattened_insights": sum(self.unflattened.values()),
            **(
                {"unflattened_by_kind": dict(sorted(self.unflattened.items()))}
                if self.unflattened
                else {}
            ),
            **({"unflattened_reasons": dict(sorted(self.reasons.items()))} if self.reasons else {}),
        }

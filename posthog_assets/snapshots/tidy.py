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
    #: The insight's recalculation failed or did not finish: these rows come from the result
    #: PostHog had before (``posthog.insights.query_error`` says why).
    "result_is_stale": "BOOLEAN",
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
        "series_order": "INTEGER",
        "label": "VARCHAR",
        "custom_name": "VARCHAR",
        "math": "VARCHAR",
        "math_property": "VARCHAR",
        "breakdown_value": "VARCHAR",
        "breakdown_kind": "VARCHAR",
        "compare_label": "VARCHAR",
        "status": "VARCHAR",
        "day": "DATE",
        "period_start": "TIMESTAMP",
        "x": "VARCHAR",
        "value": "DOUBLE",
    },
    FUNNEL_STEPS: {
        "breakdown_value": "VARCHAR",
        "breakdown_kind": "VARCHAR",
        "step_order": "INTEGER",
        "step_name": "VARCHAR",
        "is_optional": "BOOLEAN",
        "count": "BIGINT",
        "conversion_from_first": "DOUBLE",
        "conversion_from_previous": "DOUBLE",
        "average_conversion_time_s": "DOUBLE",
        "median_conversion_time_s": "DOUBLE",
    },
    RETENTION_CELLS: {
        "breakdown_value": "VARCHAR",
        "breakdown_kind": "VARCHAR",
        "cohort_index": "INTEGER",
        "cohort_label": "VARCHAR",
        "cohort_date": "DATE",
        "cohort_start": "TIMESTAMPTZ",
        "period": "INTEGER",
        "period_label": "VARCHAR",
        "count": "BIGINT",
        "aggregation_value": "DOUBLE",
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

TIDY_SNAPSHOT_TABLES: dict[str, SnapshotTable] = {
    name: SnapshotTable(name=name, columns={**_SNAPSHOT_COLUMNS, **TIDY_COLUMNS[name]}, **_BY_DAY)
    for name in TIDY_TABLES
}


class TidyStager:
    """Flattens each staged insight into the tidy tables' staging files (thread-safe).

    Every insight is counted once: flattened (by kind), or unflattened with its reason (no
    result, an empty one, an unknown kind or shape, a display the tables do not hold). A result
    is never dropped (its raw JSON stays in ``posthog.insights``) and never fails the run; a
    stale result (its recalculation failed or did not finish) is flattened and its rows marked.
    """

    def __init__(self, staging: Mapping[str, StagedRows]) -> None:
        self.staging = staging
        self.flattened: Counter[str] = Counter()
        self.unflattened: Counter[str] = Counter()
        self.unflattened_by_reason: Counter[str] = Counter()
        self.stale_flattened = 0
        self._lock = threading.Lock()

    def add(self, insights: Iterable[tuple[Mapping[str, Any], bool]]) -> None:
        """Flatten ``(insight, result_is_stale)`` pairs and stage their rows."""
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in self.staging}
        for insight, stale in insights:
            flat = flatten_insight(insight)
            kind = flat.kind or "unknown"
            with self._lock:
                if flat.unflattened:
                    self.unflattened[kind] += 1
                    self.unflattened_by_reason[flat.unflattened] += 1
                else:
                    self.flattened[kind] += 1
                    self.stale_flattened += int(stale)
            base = {"insight_id": insight.get("id"), "result_is_stale": stale}
            for table, table_rows in flat.rows.items():
                extra = {**base, "kind": flat.kind} if table == SERIES else base
                rows[table].extend({**extra, **row} for row in table_rows)
        for table, table_rows in rows.items():
            self.staging[table].write(table_rows)

    def figures(self) -> dict[str, Any]:
        """For the insights materialization: flattened + unflattened = insights staged."""
        return {
            "flattened_insights": sum(self.flattened.values()),
            "flattened_by_kind": dict(sorted(self.flattened.items())),
            "stale_results_flattened": self.stale_flattened,
            "unflattened_insights": sum(self.unflattened.values()),
            "unflattened_by_kind": dict(sorted(self.unflattened.items())),
            "unflattened_by_reason": dict(sorted(self.unflattened_by_reason.items())),
        }

"""The tidy tables computed from ``posthog.insights``: their declarations, and the stager that
fills them from each page of insights as it is staged.

They are written in the same transaction as the insights snapshot they come from (see
:func:`posthog_assets.snapshots.writer.replace_snapshot`), so a table never holds rows of another
snapshot than ``posthog.insights`` does, and re-running a day replaces that day's rows in all six.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from posthog_assets.snapshots.results import (
    FUNNEL_STEPS,
    INSIGHT_ROWS,
    PATH_EDGES,
    RETENTION_CELLS,
    SERIES,
    flatten_insight,
)
from posthog_assets.snapshots.staging import StagedRows
from posthog_assets.tables import INSIGHTS_GROUP, Column, Table, columns

#: What every tidy row says about the insight it comes from (columns of ``posthog.insights``).
_FROM_INSIGHT = columns("""
    insight_id       BIGINT   The insight the row comes from. <- id
    result_is_stale  BOOLEAN  The insight's recalculation failed or did not finish: the row comes
                              from the result PostHog had before (posthog.insights.query_error
                              says why). <- result_is_stale
""")
_BREAKDOWN = columns("""
    breakdown_value  VARCHAR  The breakdown value as PostHog's CSV export shows it (null: no
                              breakdown; PostHog's sentinels as 'None (i.e. no value)' and 'Other
                              (i.e. all remaining values)').
    breakdown_kind   VARCHAR  value, null (the property was not set) or other (the values beyond
                              the breakdown limit); null without a breakdown.
""")


def _tidy(name: str, description: str, key: tuple[str, ...], *parts: tuple[Column, ...]) -> Table:
    """A table flattened from the insights' results: a column without lineage comes from
    ``posthog.insights.result``."""
    return Table(
        name=name,
        description=description + " Per daily snapshot, written with posthog.insights.",
        group=INSIGHTS_GROUP,
        daily=True,
        upstream="insights",
        key=("insight_id", *key),
        columns=tuple(
            c if c.lineage else replace(c, lineage=("result",))
            for c in (*_FROM_INSIGHT, *(c for part in parts for c in part))
        ),
    )


TIDY_SNAPSHOT_TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        _tidy(
            SERIES,
            "Every data point of Trends, Stickiness and Lifecycle insights (and of funnel "
            "trends and time to convert), one row each.",
            ("series_index", "point_index"),
            columns("""
                kind           VARCHAR    The insight's kind (trends, stickiness, lifecycle,
                                          funnel_trends, funnel_time_to_convert). <- query, filters
                series_index   INTEGER    The series' position in the result.
                point_index    INTEGER    The point's position in its series.
                series_order   INTEGER    The series' position in the query (null: a formula).
                label          VARCHAR    The series' label as PostHog shows it.
                custom_name    VARCHAR    The name the query gives the series.
                math           VARCHAR    The series' aggregation (total, dau, sum, ...).
                math_property  VARCHAR    The property the aggregation is over.
            """),
            _BREAKDOWN,
            columns("""
                compare_label  VARCHAR    current or previous, comparing to the previous period.
                status         VARCHAR    Lifecycle status (new, returning, resurrecting, dormant).
                day            DATE       The point's date.
                period_start   TIMESTAMP  The point's start (with the hour when hourly).
                x              VARCHAR    The point's label on the x axis (a date, an interval, a
                                          bin's start in seconds).
                value          DOUBLE     The point's value (total-value displays: the total).
            """),
        ),
        _tidy(
            FUNNEL_STEPS,
            "Every funnel step (per breakdown value) with its count, conversion rates and times.",
            ("breakdown_value", "step_order"),
            _BREAKDOWN,
            columns("""
                step_order                 INTEGER  The step's position (0: the first).
                step_name                  VARCHAR  The step's custom name, else its event.
                is_optional                BOOLEAN  Marked optionalInFunnel in the query. <- query
                count                      BIGINT   People (or groups) who reached the step.
                conversion_from_first      DOUBLE   count / the first step's count.
                conversion_from_previous   DOUBLE   count / the count of the last step before it
                                                    that is not optional (as PostHog's UI computes
                                                    it). <- result, query
                average_conversion_time_s  DOUBLE   Average seconds from the previous step.
                median_conversion_time_s   DOUBLE   Median seconds from the previous step.
            """),
        ),
        _tidy(
            RETENTION_CELLS,
            "Every cohort x period count of retention insights.",
            ("breakdown_value", "cohort_index", "period"),
            _BREAKDOWN,
            columns("""
                cohort_index       INTEGER      The cohort's position (per breakdown value).
                cohort_label       VARCHAR      The cohort's label as PostHog shows it.
                cohort_date        DATE         The cohort's first day.
                cohort_start       TIMESTAMPTZ  The cohort's start (with the hour when hourly).
                period             INTEGER      The period's position (a bracket's, with custom
                                                brackets).
                period_label       VARCHAR      PostHog's label of the period (e.g. 'Day 1-7').
                count              BIGINT       People (or groups) of the cohort retained then.
                aggregation_value  DOUBLE       The metric of a sum or average retention.
            """),
        ),
        _tidy(
            PATH_EDGES,
            "Every edge of paths insights.",
            ("edge_index",),
            columns("""
                edge_index                 INTEGER  The edge's position in the result.
                source                     VARCHAR  The step the edge leaves (with its position).
                target                     VARCHAR  The step the edge reaches.
                value                      BIGINT   People who went from source to target.
                average_conversion_time_s  DOUBLE   Average seconds from source to target.
            """),
        ),
        _tidy(
            INSIGHT_ROWS,
            "Every result row of SQL (HogQL) and data-table insights, as a JSON object keyed "
            "by column name.",
            ("row_index",),
            columns("""
                row_index  INTEGER  The row's position in the result.
                row        JSON     The row, keyed by the result's column names. <- result, columns
            """),
        ),
    )
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

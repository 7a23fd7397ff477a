"""Flattening PostHog's result shapes into tidy rows (no server: payloads as PostHog sends them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from posthog_assets.snapshots.results import (
    EMPTY_RESULT,
    FUNNEL_STEPS,
    INSIGHT_ROWS,
    NO_RESULT,
    PATH_EDGES,
    RETENTION_CELLS,
    SERIES,
    TIDY_TABLES,
    flatten_insight,
    insight_kind,
)
from posthog_assets.snapshots.staging import StagedRows
from posthog_assets.snapshots.tidy import TIDY_SNAPSHOT_TABLES, TidyStager

pytestmark = pytest.mark.unit


def viz(kind: str, **source: Any) -> dict[str, Any]:
    return {"kind": "InsightVizNode", "source": {"kind": kind, "series": [], **source}}


def test_trends_series_with_breakdown_and_compare() -> None:
    days = ["2026-01-01", "2026-01-02", "2026-01-03"]
    result = [
        {
            "label": "$pageview - Chrome",
            "breakdown_value": "Chrome",
            "compare": True,
            "compare_label": "current",
            "data": [3, 4.5, 0],
            "days": days,
            "labels": ["1-Jan-2026", "2-Jan-2026", "3-Jan-2026"],
            "count": 7.5,
            "action": {"id": "$pageview", "order": 0},
        },
        {
            "label": "$pageview - Chrome",
            "breakdown_value": "Chrome",
            "compare": True,
            "compare_label": "previous",
            "data": [1, 1, 1],
            "days": ["2025-12-29", "2025-12-30", "2025-12-31"],
            "labels": ["29-Dec-2025", "30-Dec-2025", "31-Dec-2025"],
            "count": 3.0,
        },
    ]
    flat = flatten_insight({"query": viz("TrendsQuery"), "result": result})

    assert flat.kind == "trends" and flat.unflattened is None
    rows = flat.rows[SERIES]
    assert len(rows) == 6
    assert rows[1] == {
        "series_index": 0,
        "series_order": 0,
        "label": "$pageview - Chrome",
        "custom_name": None,
        "math": None,
        "math_property": None,
        "breakdown_value": "Chrome",
        "breakdown_kind": "value",
        "compare_label": "current",
        "status": None,
        "point_index": 1,
        "day": "2026-01-02",
        "period_start": "2026-01-02 00:00:00",
        "x": "2-Jan-2026",
        "value": 4.5,
    }
    for index, series in enumerate(result):
        values = [r["value"] for r in rows if r["series_index"] == index]
        assert sum(values) == series["count"]
    assert [r["compare_label"] for r in rows] == ["current"] * 3 + ["previous"] * 3


def test_total_value_displays_and_formulas_become_one_point_or_a_series() -> None:
    result = [
        {"label": "signups", "aggregated_value": 42, "data": [], "count": 0, "days": []},
        {"label": "Formula (A/B)", "action": None, "aggregated_value": 0.5, "data": None},
    ]
    flat = flatten_insight({"query": viz("TrendsQuery"), "result": result})
    assert [(r["label"], r["point_index"], r["day"], r["value"]) for r in flat.rows[SERIES]] == [
        ("signups", 0, None, 42.0),
        ("Formula (A/B)", 0, None, 0.5),
    ]


def test_hourly_points_keep_their_hour() -> None:
    result = [{"label": "x", "data": [1], "days": ["2026-01-01 13:00:00"], "labels": ["1 PM"]}]
    [row] = flatten_insight({"query": viz("TrendsQuery"), "result": result}).rows[SERIES]
    assert (row["day"], row["period_start"], row["x"]) == (
        "2026-01-01",
        "2026-01-01 13:00:00",
        "1 PM",
    )


def test_two_series_of_one_event_keep_their_order_custom_name_and_math() -> None:
    """``build_series_response``: the label is the event; ``action`` tells the series apart."""

    def series(order: int, math: str, custom: str | None, value: str) -> dict[str, Any]:
        action = {"id": "$pageview", "order": order, "name": "$pageview", "custom_name": custom,
                  "math": math, "math_property": None}  # fmt: skip
        return {"label": f"$pageview - {value}", "breakdown_value": value, "action": action,
                "data": [1], "days": ["2026-01-01"], "labels": ["1-Jan-2026"]}  # fmt: skip

    result = [
        series(0, "total", "Views", "Chrome"),
        series(1, "dau", "Users", "Chrome"),
        series(0, "total", "Views", "$$_posthog_breakdown_null_$$"),
        series(1, "dau", "Users", "$$_posthog_breakdown_other_$$"),
        {"label": "Formula (A/B)", "action": None, "data": [2.0], "days": ["2026-01-01"]},
    ]
    rows = flatten_insight({"query": viz("TrendsQuery"), "result": result}).rows[SERIES]
    assert [
        (r["series_order"], r["custom_name"], r["math"], r["breakdown_value"], r["breakdown_kind"])
        for r in rows
    ] == [
        (0, "Views", "total", "Chrome", "value"),
        (1, "Users", "dau", "Chrome", "value"),
        (0, "Views", "total", "None (i.e. no value)", "null"),
        (1, "Users", "dau", "Other (i.e. all remaining values)", "other"),
        (None, None, None, None, None),
    ]
    assert len({(r["series_order"], r["math"], r["breakdown_value"]) for r in rows}) == 5


def test_numeric_breakdown_sentinels_and_lists_are_shown_as_posthog_shows_them() -> None:
    from posthog_assets.snapshots.results import _breakdown

    assert _breakdown(9007199254740990) == ("None (i.e. no value)", "null")
    assert _breakdown(9007199254740991) == ("Other (i.e. all remaining values)", "other")
    assert _breakdown(["Chrome", "$$_posthog_breakdown_other_$$"]) == (
        "Chrome::Other (i.e. all remaining values)",
        "other",
    )
    assert _breakdown(["Chrome"]) == ("Chrome", "value")
    assert _breakdown(None) == (None, None)


@pytest.mark.parametrize(
    ("display", "result", "reason"),
    [
        (
            "CalendarHeatmap",
            [
                {
                    "label": "$pageview",
                    "data": [],
                    "aggregated_value": 9,
                    "count": 9,
                    "calendar_heatmap_data": {
                        "data": [{"row": 1, "column": 13, "value": 9}],
                        "rowAggregations": [],
                        "columnAggregations": [],
                        "allAggregations": 9,
                    },
                }
            ],  # fmt: skip
            "CalendarHeatmap display",
        ),
        ("BoxPlot", [], "BoxPlot display"),
        (
            "BoxPlot",
            [
                {
                    "day": "2026-01-01",
                    "label": "1-Jan",
                    "min": 1.0,
                    "p25": 2.0,
                    "median": 3.0,
                    "p75": 4.0,
                    "max": 5.0,
                    "mean": 3.0,
                    "series_index": 0,
                    "series_label": "x",
                }
            ],
            "BoxPlot display",
        ),  # fmt: skip
    ],
)
def test_heatmaps_and_box_plots_are_counted_with_a_reason_never_one_misleading_point(
    display: str, result: Any, reason: str
) -> None:
    flat = flatten_insight(
        {"query": viz("TrendsQuery", trendsFilter={"display": display}), "result": result}
    )
    assert flat.rows == {} and flat.unflattened is not None and reason in flat.unflattened


def test_stickiness_points_are_intervals_not_dates() -> None:
    result = [{"label": "x", "data": [5, 2], "days": [1, 2], "labels": ["1 day", "2 days"]}]
    flat = flatten_insight({"query": viz("StickinessQuery"), "result": result})
    assert flat.kind == "stickiness"
    assert [(r["day"], r["x"], r["value"]) for r in flat.rows[SERIES]] == [
        (None, "1 day", 5.0),
        (None, "2 days", 2.0),
    ]


def test_lifecycle_keeps_each_status_and_negative_dormant_values() -> None:
    result = [
        {"label": f"$pageview - {s}", "status": s, "data": [v], "days": ["2026-01-01"]}
        for s, v in (("new", 3), ("returning", 2), ("resurrecting", 1), ("dormant", -4))
    ]
    flat = flatten_insight({"query": viz("LifecycleQuery"), "result": result})
    assert [(r["status"], r["value"]) for r in flat.rows[SERIES]] == [
        ("new", 3.0),
        ("returning", 2.0),
        ("resurrecting", 1.0),
        ("dormant", -4.0),
    ]


def _steps(counts: list[int], breakdown: list[str] | None = None) -> list[dict[str, Any]]:
    return [
        {
            "order": i,
            "name": f"step {i}",
            "custom_name": "Signed up" if i == 1 else None,
            "count": float(c),
            "average_conversion_time": None if i == 0 else 10.0 * i,
            "median_conversion_time": None if i == 0 else 8.0 * i,
            **({"breakdown": ["$browser"], "breakdown_value": breakdown} if breakdown else {}),
        }
        for i, c in enumerate(counts)
    ]


def test_funnel_steps_with_conversion_rates_and_times() -> None:
    flat = flatten_insight({"query": viz("FunnelsQuery"), "result": _steps([200, 50, 10])})
    assert flat.kind == "funnel_steps"
    rows = flat.rows[FUNNEL_STEPS]
    assert [(r["step_order"], r["step_name"], r["count"]) for r in rows] == [
        (0, "step 0", 200),
        (1, "Signed up", 50),
        (2, "step 2", 10),
    ]
    assert [r["conversion_from_first"] for r in rows] == [1.0, 0.25, 0.05]
    assert [r["conversion_from_previous"] for r in rows] == [1.0, 0.25, 0.2]
    assert [r["average_conversion_time_s"] for r in rows] == [None, 10.0, 20.0]
    assert all(isinstance(r["count"], int) for r in rows)


def test_optional_steps_are_never_the_reference_of_a_conversion() -> None:
    """``funnelUtils.ts``: from previous = count / the last step before that is not optional;
    an optional step counts on its own, so the step after it may count more than it does."""
    query = viz(
        "FunnelsQuery",
        series=[{"event": "a"}, {"event": "b", "optionalInFunnel": True}, {"event": "c"}],
    )
    rows = flatten_insight({"query": query, "result": _steps([100, 20, 60])}).rows[FUNNEL_STEPS]
    assert [r["is_optional"] for r in rows] == [False, True, False]
    assert [r["conversion_from_previous"] for r in rows] == [1.0, 0.2, 0.6]
    assert [r["conversion_from_first"] for r in rows] == [1.0, 0.2, 0.6]
    assert all(r["conversion_from_previous"] <= 1 for r in rows)


def test_funnel_steps_per_breakdown_value() -> None:
    result = [_steps([10, 5], ["Chrome"]), _steps([4, 4], ["Firefox", "Mac"])]
    rows = flatten_insight({"query": viz("FunnelsQuery"), "result": result}).rows[FUNNEL_STEPS]
    assert [(r["breakdown_value"], r["step_order"], r["count"]) for r in rows] == [
        ("Chrome", 0, 10),
        ("Chrome", 1, 5),
        ("Firefox::Mac", 0, 4),
        ("Firefox::Mac", 1, 4),
    ]


def test_funnel_trends_and_time_to_convert_are_series() -> None:
    trends = viz("FunnelsQuery", funnelsFilter={"funnelVizType": "trends"})
    result = [{"count": 2, "data": [50.0, 25.5], "days": ["2026-01-01", "2026-01-02"]}]
    flat = flatten_insight({"query": trends, "result": result})
    assert flat.kind == "funnel_trends"
    assert [(r["day"], r["value"]) for r in flat.rows[SERIES]] == [
        ("2026-01-01", 50.0),
        ("2026-01-02", 25.5),
    ]

    ttc = viz("FunnelsQuery", funnelsFilter={"funnelVizType": "time_to_convert"})
    result = {"bins": [[0, 4], [60, 2], [120, 0]], "average_conversion_time": 45.0}
    flat = flatten_insight({"query": ttc, "result": result})
    assert flat.kind == "funnel_time_to_convert"
    assert [(r["x"], r["value"]) for r in flat.rows[SERIES]] == [
        ("0", 4.0),
        ("60", 2.0),
        ("120", 0.0),
    ]


def test_retention_keeps_every_cell() -> None:
    result = [
        {
            "label": f"Day {c}",
            "date": f"2026-01-0{c + 1}T00:00:00Z",
            "values": [{"count": n, "label": f"Day {k}"} for k, n in enumerate(counts)],
        }
        for c, counts in enumerate([[10, 4, 2], [8, 3, 0]])
    ]
    flat = flatten_insight({"query": viz("RetentionQuery"), "result": result})
    cells = flat.rows[RETENTION_CELLS]
    assert len(cells) == 6
    assert cells[4] == {
        "breakdown_value": None,
        "breakdown_kind": None,
        "cohort_index": 1,
        "cohort_label": "Day 1",
        "cohort_date": "2026-01-02",
        "cohort_start": "2026-01-02 00:00:00+00:00",
        "period": 1,
        "period_label": "Day 1",
        "count": 3,
        "aggregation_value": None,
    }


def test_retention_by_property_with_custom_brackets_per_breakdown_value() -> None:
    """``format_results``: with sum/avg the metric is ``aggregation_value``; custom brackets
    name the periods; cohorts repeat per breakdown value, and hourly cohorts keep their hour."""
    labels = ["Hour 0", "Hour 1", "Hour 2-8"]
    result = [
        {
            "label": f"Hour {c}",
            "date": f"2026-01-01T{10 + c:02d}:00:00Z",
            "breakdown_value": value,
            "values": [
                {"count": n, "aggregation_value": n * 1.5, "label": labels[k]}
                for k, n in enumerate([4 - c, 2, 1])
            ],
        }
        for value in ("Chrome", "$$_posthog_breakdown_other_$$")
        for c in range(2)
    ]
    cells = flatten_insight({"query": viz("RetentionQuery"), "result": result}).rows[
        RETENTION_CELLS
    ]
    assert [(c["breakdown_value"], c["cohort_index"]) for c in cells][::3] == [
        ("Chrome", 0),
        ("Chrome", 1),
        ("Other (i.e. all remaining values)", 0),
        ("Other (i.e. all remaining values)", 1),
    ]
    assert [c["period_label"] for c in cells[:3]] == labels
    assert [c["aggregation_value"] for c in cells[:3]] == [6.0, 3.0, 1.5]
    assert cells[3]["cohort_start"] == "2026-01-01 11:00:00+00:00"
    keys = {(c["breakdown_value"], c["cohort_index"], c["period"]) for c in cells}
    assert len(keys) == len(cells)


def test_paths_edges_with_seconds_from_milliseconds() -> None:
    result = [
        {"source": "1_/home", "target": "2_/pricing", "value": 30, "average_conversion_time": 1500},
        {
            "source": "2_/pricing",
            "target": "3_/signup",
            "value": 7,
            "average_conversion_time": None,
        },
    ]
    edges = flatten_insight({"query": viz("PathsQuery"), "result": result}).rows[PATH_EDGES]
    assert [
        (e["source"], e["target"], e["value"], e["average_conversion_time_s"]) for e in edges
    ] == [
        ("1_/home", "2_/pricing", 30, 1.5),
        ("2_/pricing", "3_/signup", 7, None),
    ]


def test_hogql_rows_are_objects_keyed_by_column_name() -> None:
    insight = {
        "query": {"kind": "DataTableNode", "source": {"kind": "HogQLQuery", "query": "select 1"}},
        "columns": ["event", "day", "count"],
        "result": [["$pageview", "2026-01-01", 3], ["signup", "2026-01-01", 1]],
    }
    rows = flatten_insight(insight).rows[INSIGHT_ROWS]
    assert [r["row_index"] for r in rows] == [0, 1]
    assert rows[1]["row"] == {"event": "signup", "day": "2026-01-01", "count": 1}


def test_legacy_filters_tell_the_kind() -> None:
    assert insight_kind({"filters": {"insight": "TRENDS"}}) == "trends"
    assert insight_kind({"filters": {"events": [{"id": "$pageview"}]}}) == "trends"
    assert insight_kind({"filters": {"insight": "FUNNELS"}}) == "funnel_steps"
    assert insight_kind({"filters": {"insight": "RETENTION"}}) == "retention"
    assert insight_kind({"filters": {}}) is None


@pytest.mark.parametrize(
    ("insight", "reason"),
    [
        ({"query": viz("WebOverviewQuery"), "result": [{"key": "visitors"}]}, "unknown kind"),
        ({"query": viz("TrendsQuery"), "result": [{"label": "x"}]}, "neither data nor"),
        ({"query": viz("FunnelsQuery"), "result": [{"order": 0, "count": 1.5}]}, "whole number"),
        ({"filters": {}, "result": [[1]]}, "no query to tell the kind"),
    ],
)
def test_unknown_kinds_and_shapes_are_reported_not_raised(
    insight: dict[str, Any], reason: str
) -> None:
    flat = flatten_insight(insight)
    assert flat.rows == {}
    assert flat.unflattened is not None and reason in flat.unflattened


def test_no_result_or_an_empty_one_is_counted_with_its_reason() -> None:
    for result, reason in ((None, NO_RESULT), ([], EMPTY_RESULT), ({}, EMPTY_RESULT)):
        flat = flatten_insight({"query": viz("TrendsQuery"), "result": result})
        assert flat.rows == {} and flat.unflattened == reason


def test_the_stager_counts_what_it_could_not_flatten_and_stages_the_rest(tmp_path: Path) -> None:
    staging = {
        t: StagedRows(tmp_path / t, TIDY_SNAPSHOT_TABLES[t].staged_columns) for t in TIDY_TABLES
    }
    stager = TidyStager(staging)
    trends = [{"label": "x", "data": [1, 2], "days": ["2026-01-01", "2026-01-02"]}]
    stager.add(
        [
            ({"id": 1, "query": viz("TrendsQuery"), "result": trends}, False),
            ({"id": 2, "query": viz("WebStatsTableQuery"), "result": [{"a": 1}]}, False),
            ({"id": 3, "query": viz("TrendsQuery"), "result": None}, False),
            ({"id": 4, "query": viz("TrendsQuery"), "result": trends[:1]}, True),
        ]
    )
    for rows in staging.values():
        rows.close()

    figures = stager.figures()
    assert figures["flattened_insights"] == 2 and figures["unflattened_insights"] == 2
    assert figures["stale_results_flattened"] == 1
    assert figures["unflattened_by_kind"] == {"WebStatsTableQuery": 1, "trends": 1}
    reasons = figures["unflattened_by_reason"]
    assert reasons[NO_RESULT] == 1 and sum(reasons.values()) == 2
    assert any("unknown kind" in reason for reason in reasons)
    staged = [
        json.loads(line) for f in staging[SERIES].files for line in Path(f).read_text().splitlines()
    ]
    assert [(r["insight_id"], r["kind"], r["value"], r["result_is_stale"]) for r in staged] == [
        (1, "trends", 1.0, False),
        (1, "trends", 2.0, False),
        (4, "trends", 1.0, True),
        (4, "trends", 2.0, True),
    ]
    assert all(staging[t].rows == 0 for t in TIDY_TABLES if t != SERIES)

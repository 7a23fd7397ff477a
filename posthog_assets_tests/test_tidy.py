"""Insight results as tidy tables: every kind the stand-in seeds, flattened in the same
transaction as the snapshot, checked against what PostHog serves for each insight."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from posthog_assets.snapshots.results import TIDY_TABLES
from posthog_assets_tests.support.snapshots import (
    check_results,
    materialization_metadata,
    materialize_insights,
    query,
)

pytestmark = pytest.mark.integration

#: Insight ids of each kind in the stand-in's seed (index + 1; see its INSIGHT_KIND_RULES).
KIND_IDS = {
    "trends": 1,
    "legacy": 8,
    "hogql": 10,
    "trends_compare": 15,
    "trends_formula": 16,
    "trends_aggregate": 17,
    "funnel_steps": 19,
    "funnel_steps_breakdown": 21,
    "funnel_trends": 22,
    "funnel_time_to_convert": 24,
    "retention": 25,
    "lifecycle": 26,
    "stickiness": 27,
    "paths": 29,
}


@pytest.fixture
def snapshot(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any
) -> dg.ExecuteInProcessResult:
    control.configure(async_delay_s=0.1)
    return materialize_insights(defs, resources)


def _served(client: Any, insight_id: int) -> dict[str, Any]:
    """The insight as PostHog serves it from the cache the snapshot just filled."""
    return client.get_json(f"insights/{insight_id}/", {"refresh": "force_cache"})


def _today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def _tidy(db: Path, table: str, insight_id: int, columns: str) -> list[tuple[Any, ...]]:
    return query(
        db,
        f"SELECT {columns} FROM {table} WHERE insight_id = ? AND snapshot_date = ? ORDER BY ALL",
        [insight_id, _today()],
    )


def test_every_kind_lands_in_its_table_and_nothing_is_left_unflattened(
    snapshot: dg.ExecuteInProcessResult, db: Path
) -> None:
    meta = materialization_metadata(snapshot, "insights")
    assert meta["unflattened_insights"] == 0, meta.get("unflattened_reasons")
    by_kind = meta["flattened_by_kind"]
    assert {
        "trends",
        "funnel_steps",
        "funnel_trends",
        "funnel_time_to_convert",
        "retention",
    } <= set(by_kind)
    assert {"lifecycle", "stickiness", "paths", "rows"} <= set(by_kind)
    for table in TIDY_TABLES:
        tidy = materialization_metadata(snapshot, table)
        counted = query(db, f"SELECT count(*) FROM {table} WHERE snapshot_date = ?", [_today()])
        assert tidy["dagster/row_count"] == meta["rows_by_table"][table] == counted[0][0] > 0
        schema = tidy["dagster/column_schema"]
        assert [c.name for c in schema.columns][:4] == [
            "project_id",
            "snapshot_date",
            "snapshot_at",
            "insight_id",
        ]
        assert tidy["snapshot_at"] == meta["snapshot_at"]
    checks = check_results(snapshot)
    assert {f"{t}_no_duplicates" for t in TIDY_TABLES} <= set(checks)
    assert all(c.passed for c in checks.values())


@pytest.mark.parametrize("kind", ["trends", "legacy", "trends_compare", "trends_formula"])
def test_trend_series_sum_to_the_count_with_one_row_per_day(
    snapshot: dg.ExecuteInProcessResult, db: Path, client: Any, kind: str
) -> None:
    served = _served(client, KIND_IDS[kind])["result"]
    rows = _tidy(db, "insight_series", KIND_IDS[kind], "series_index, point_index, day, x, value")
    assert {r[0] for r in rows} == set(range(len(served)))
    for index, series in enumerate(served):
        points = [r for r in rows if r[0] == index]
        assert len(points) == len(series["days"]) == len(series["data"])
        assert sum(r[4] for r in points) == pytest.approx(series["count"])
        assert [r[2].isoformat() for r in points] == [d[:10] for d in series["days"]]
        assert [r[3] for r in points] == series["labels"]
    if kind == "trends_compare":
        labels = query(
            db,
            "SELECT DISTINCT compare_label FROM insight_series WHERE insight_id = ?",
            [KIND_IDS[kind]],
        )
        assert {r[0] for r in labels} == {"current", "previous"}


def test_total_value_series_keep_their_one_number(
    snapshot: dg.ExecuteInProcessResult, db: Path, client: Any
) -> None:
    served = _served(client, KIND_IDS["trends_aggregate"])["result"]
    rows = _tidy(db, "insight_series", KIND_IDS["trends_aggregate"], "series_index, day, value")
    assert rows == [(i, None, float(s["aggregated_value"])) for i, s in enumerate(served)]


def test_lifecycle_and_stickiness_points(
    snapshot: dg.ExecuteInProcessResult, db: Path, client: Any
) -> None:
    lifecycle = _served(client, KIND_IDS["lifecycle"])["result"]
    rows = _tidy(db, "insight_series", KIND_IDS["lifecycle"], "status, value")
    for series in lifecycle:
        values = [v for s, v in rows if s == series["status"]]
        assert sum(values) == pytest.approx(series["count"])
    assert all(v <= 0 for s, v in rows if s == "dormant")

    stickiness = _served(client, KIND_IDS["stickiness"])["result"]
    rows = _tidy(db, "insight_series", KIND_IDS["stickiness"], "series_index, point_index, day, x")
    assert all(day is None for _, _, day, _ in rows)  # intervals, not dates
    assert [x for i, _, _, x in rows if i == 0] == stickiness[0]["labels"]


@pytest.mark.parametrize("kind", ["funnel_steps", "funnel_steps_breakdown"])
def test_funnel_step_counts_equal_posthogs_and_never_increase(
    snapshot: dg.ExecuteInProcessResult, db: Path, client: Any, kind: str
) -> None:
    served = _served(client, KIND_IDS[kind])["result"]
    funnels = served if isinstance(served[0], list) else [served]
    rows = _tidy(
        db,
        "funnel_steps",
        KIND_IDS[kind],
        "breakdown_value, step_order, count, conversion_from_first, conversion_from_previous, "
        "average_conversion_time_s",
    )
    assert len(rows) == sum(len(f) for f in funnels)
    for steps in funnels:
        breakdown = steps[0].get("breakdown_value")
        label = "::".join(breakdown) if isinstance(breakdown, list) else breakdown
        mine = sorted((r for r in rows if r[0] == label), key=lambda r: r[1])
        assert [r[2] for r in mine] == [s["count"] for s in steps]
        assert all(a[2] >= b[2] for a, b in zip(mine, mine[1:], strict=False))
        assert mine[0][3] == 1.0 and mine[-1][3] == pytest.approx(mine[-1][2] / mine[0][2])
        assert [r[5] for r in mine] == [s["average_conversion_time"] for s in steps]


def test_funnel_trends_and_time_to_convert(
    snapshot: dg.ExecuteInProcessResult, db: Path, client: Any
) -> None:
    trends = _served(client, KIND_IDS["funnel_trends"])["result"]
    rows = _tidy(db, "insight_series", KIND_IDS["funnel_trends"], "kind, series_index, value")
    assert {r[0] for r in rows} == {"funnel_trends"}
    assert len(rows) == sum(len(s["data"]) for s in trends)

    bins = _served(client, KIND_IDS["funnel_time_to_convert"])["result"]["bins"]
    rows = _tidy(db, "insight_series", KIND_IDS["funnel_time_to_convert"], "point_index, x, value")
    assert [(x, v) for _, x, v in rows] == [(str(s), float(c)) for s, c in bins]


def test_retention_keeps_every_cell_and_paths_every_edge(
    snapshot: dg.ExecuteInProcessResult, db: Path, client: Any
) -> None:
    cohorts = _served(client, KIND_IDS["retention"])["result"]
    cells = _tidy(db, "retention_cells", KIND_IDS["retention"], "cohort_index, period, count")
    assert len(cells) == sum(len(c["values"]) for c in cohorts)
    for c_index, cohort in enumerate(cohorts):
        counts = [n for i, _, n in cells if i == c_index]
        assert counts == [v["count"] for v in cohort["values"]]
        assert max(counts) == counts[0]  # nobody returns who was not in the cohort

    edges = _served(client, KIND_IDS["paths"])["result"]
    rows = _tidy(db, "path_edges", KIND_IDS["paths"], "source, target, value")
    assert sorted(rows) == sorted((e["source"], e["target"], e["value"]) for e in edges)


def test_hogql_rows_are_objects_keyed_by_column(
    snapshot: dg.ExecuteInProcessResult, db: Path, client: Any
) -> None:
    served = _served(client, KIND_IDS["hogql"])
    rows = _tidy(db, "insight_rows", KIND_IDS["hogql"], "row_index, row")
    assert [r[0] for r in rows] == list(range(len(served["result"])))
    first = json.loads(rows[0][1])
    assert list(first) == served["columns"]
    assert list(first.values()) == served["result"][0]


def test_a_second_snapshot_the_same_day_replaces_the_tidy_rows(
    snapshot: dg.ExecuteInProcessResult, defs: dg.Definitions, resources: dict[str, Any], db: Path
) -> None:
    def counts() -> dict[str, int]:
        return {t: query(db, f"SELECT count(*) FROM {t}")[0][0] for t in TIDY_TABLES}

    first = counts()
    again = materialize_insights(defs, resources)
    assert counts() == first
    assert materialization_metadata(again, "insights")["rows_by_table"] == first | {
        "insights": materialization_metadata(again, "insights")["dagster/row_count"]
    }
    assert all(c.passed for c in check_results(again).values())

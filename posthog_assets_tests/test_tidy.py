"""Insight results as tidy tables: every kind the stand-in seeds, flattened in the same
transaction as the snapshot, checked against what PostHog serves for each insight."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from posthog_assets.api.client import PostHogClient
from posthog_assets.config import CSV
from posthog_assets.exports.definitions import build_posthog_export_definitions
from posthog_assets.snapshots.results import EMPTY_RESULT, TIDY_TABLES, UNFLATTENED_DISPLAYS
from posthog_assets_tests.support.projects import python_project
from posthog_assets_tests.support.reliability import materialized
from posthog_assets_tests.support.resources import make_resource
from posthog_assets_tests.support.session import TEST_INSIGHTS, TEST_RETRY, standin_env
from posthog_assets_tests.support.snapshots import (
    check_results,
    materialization_metadata,
    materialize_insights,
    query,
    resources_for,
    snapshot_defs,
    snapshot_project,
)
from posthog_standin.server import StandinControl, StandinProcess

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
    "sql_truncated": 31,
    "trends_series_identity": 32,
    "retention_aggregated": 33,
    "funnel_optional": 34,
    "calendar_heatmap": 35,
    "boxplot": 36,
    "empty": 40,
}


@dataclass(frozen=True)
class TidyRun:
    """One snapshot of the seed, the DuckDB file it wrote and PostHog's answer for each kind."""

    result: dg.ExecuteInProcessResult
    db: Path
    served: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def tidy_run(standin: StandinProcess, tmp_path_factory: pytest.TempPathFactory) -> TidyRun:
    """Snapshotted once for the module's read-only tests (a snapshot costs seconds); what
    PostHog serves for each kind is read from the cache the snapshot just filled, before any
    other test resets the stand-in."""
    root = tmp_path_factory.mktemp("tidy")
    control = standin.control
    control.reset()
    control.configure(async_delay_s=0.1)
    env = {**standin_env(standin, root), "POSTHOG_PERSONAL_API_KEY": standin.key}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        db = Path(env["POSTHOG_ASSETS_DUCKDB"])
        defs = snapshot_defs(snapshot_project(env))
        resources = resources_for(make_resource(standin, root / "exports"), db)
        result = materialize_insights(defs, resources)
    client = PostHogClient(standin.url, standin.project_id, standin.key, retry=TEST_RETRY)
    try:
        served = {
            kind: client.get_json(f"insights/{insight_id}/", {"refresh": "force_cache"})
            for kind, insight_id in KIND_IDS.items()
        }
    finally:
        client.close()
    return TidyRun(result, db, served)


def _served(run: TidyRun, kind: str) -> Any:
    """The insight's result as PostHog served it right after the snapshot."""
    return run.served[kind]["result"]


def _today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def _tidy(run: TidyRun, table: str, kind: str, columns: str) -> list[tuple[Any, ...]]:
    """``columns`` of the seed's insight of ``kind`` in ``table``, from today's snapshot."""
    insight_id = KIND_IDS[kind]
    return query(
        run.db,
        f"SELECT {columns} FROM {table} WHERE insight_id = ? AND snapshot_date = ? ORDER BY ALL",
        [insight_id, _today()],
    )


def test_every_insight_is_flattened_or_counted_with_its_reason(tidy_run: TidyRun) -> None:
    """Over the whole seed: flattened + unflattened = the insights stored, and what is not
    flattened says why (an empty result, a display whose data is not a series of points)."""
    meta = materialization_metadata(tidy_run.result, "insights")
    stored = meta["dagster/row_count"]
    assert meta["flattened_insights"] + meta["unflattened_insights"] == stored == TEST_INSIGHTS
    assert sum(meta["flattened_by_kind"].values()) == meta["flattened_insights"]
    reasons = meta["unflattened_by_reason"]
    assert sum(reasons.values()) == meta["unflattened_insights"]
    assert sum(meta["unflattened_by_kind"].values()) == meta["unflattened_insights"]
    per_40 = TEST_INSIGHTS // 40 + (TEST_INSIGHTS % 40 > 35)
    assert reasons[EMPTY_RESULT] >= TEST_INSIGHTS // 40  # the "empty" kind, every 40th
    assert reasons[UNFLATTENED_DISPLAYS["CalendarHeatmap"]] == per_40
    assert reasons[UNFLATTENED_DISPLAYS["BoxPlot"]] == per_40
    assert set(reasons) == {EMPTY_RESULT, *UNFLATTENED_DISPLAYS.values()}
    by_kind = meta["flattened_by_kind"]
    assert {"trends", "funnel_steps", "funnel_trends", "funnel_time_to_convert"} <= set(by_kind)
    assert {"retention", "lifecycle", "stickiness", "paths", "rows"} <= set(by_kind)
    assert meta["stale_results_flattened"] == 0
    in_db = query(
        tidy_run.db,
        "SELECT count(DISTINCT insight_id) FROM (SELECT insight_id FROM insight_series UNION ALL "
        "SELECT insight_id FROM funnel_steps UNION ALL SELECT insight_id FROM retention_cells "
        "UNION ALL SELECT insight_id FROM path_edges UNION ALL SELECT insight_id FROM "
        "insight_rows)",
    )
    assert in_db[0][0] == meta["flattened_insights"]
    for table in TIDY_TABLES:
        tidy = materialization_metadata(tidy_run.result, table)
        counted = query(
            tidy_run.db, f"SELECT count(*) FROM {table} WHERE snapshot_date = ?", [_today()]
        )
        assert tidy["dagster/row_count"] == meta["rows_by_table"][table] == counted[0][0] > 0
        # The column schema is the asset's (its definition), shown by the UI for every run.
        node = tidy_run.result.job_def.asset_layer.asset_graph.get(dg.AssetKey(["posthog", table]))
        schema = node.metadata["dagster/column_schema"]
        assert [c.name for c in schema.columns][:5] == [
            "project_id",
            "snapshot_date",
            "snapshot_at",
            "insight_id",
            "result_is_stale",
        ]
        assert tidy["snapshot_at"] == meta["snapshot_at"]
    checks = check_results(tidy_run.result)
    assert {f"{t}_no_duplicates" for t in TIDY_TABLES} <= set(checks)
    assert all(c.passed for name, c in checks.items() if name != "insights_not_truncated")


def test_a_truncated_sql_insight_says_so_where_an_analyst_looks(tidy_run: TidyRun) -> None:
    """A SQL insight without LIMIT: PostHog serves 100 rows and ``hasMore``; the snapshot
    stores the flag and the columns, counts it, and its check warns naming it."""
    served = tidy_run.served["sql_truncated"]
    assert served["hasMore"] is True and len(served["result"]) == 100
    [(has_more, columns)] = query(
        tidy_run.db,
        "SELECT has_more, columns FROM insights WHERE id = ? AND snapshot_date = ?",
        [KIND_IDS["sql_truncated"], _today()],
    )
    assert has_more is True and json.loads(columns) == served["columns"]
    assert len(_tidy(tidy_run, "insight_rows", "sql_truncated", "row_index")) == 100
    meta = materialization_metadata(tidy_run.result, "insights")
    truncated = [i for i in range(1, TEST_INSIGHTS + 1) if i % 40 == KIND_IDS["sql_truncated"]]
    assert meta["truncated_insights"] == len(truncated) > 0
    check = check_results(tidy_run.result)["insights_not_truncated"]
    assert check.passed is False and check.severity == dg.AssetCheckSeverity.WARN
    assert f"{KIND_IDS['sql_truncated']} (" in check.description and "CSV" in check.description
    plain = query(tidy_run.db, "SELECT count(*) FROM insights WHERE has_more = false")[0][0]
    assert plain > 0  # other SQL insights say they are complete


def test_a_csv_export_of_a_truncated_sql_insight_has_every_row(
    posthog_resource: Any, control: StandinControl, tmp_path: Path
) -> None:
    """What the README tells a user to do for every row: export the insight as CSV (PostHog
    runs its source again under the export's row limit)."""
    project = python_project({"name": "all_rows", "insight": KIND_IDS["sql_truncated"],
                              "format": CSV})  # fmt: skip
    defs = build_posthog_export_definitions([project])
    result = dg.materialize(
        list(defs.assets or []),
        resources=resources_for(posthog_resource, tmp_path / "posthog.duckdb"),
    )
    assert result.success
    md = materialized(result)["all_rows"]
    lines = Path(md["path"]).read_text().splitlines()
    assert lines[0] == "distinct_id,events" and len(lines) - 1 == 250 == md["dagster/row_count"]


def test_two_series_of_one_event_keep_their_identity_and_hour(tidy_run: TidyRun) -> None:
    served = _served(tidy_run, "trends_series_identity")
    rows = _tidy(
        tidy_run,
        "insight_series",
        "trends_series_identity",
        "series_index, series_order, custom_name, math, breakdown_value, breakdown_kind, "
        "period_start, x, value",
    )
    assert len(rows) == sum(len(s["data"]) for s in served)
    for index, series in enumerate(served):
        mine = [r for r in rows if r[0] == index]
        action = series["action"]
        assert {r[1:4] for r in mine} == {(action["order"], action["custom_name"], action["math"])}
        assert [r[6].strftime("%Y-%m-%d %H:%M:%S") for r in mine] == series["days"]
        assert [r[8] for r in mine] == series["data"]
    labels = {(r[2], r[3], r[4]) for r in rows}
    assert len(labels) == len(served)  # no two series look alike any more
    kinds = {(r[4], r[5]) for r in rows}
    assert kinds == {
        ("Chrome", "value"),
        ("None (i.e. no value)", "null"),
        ("Other (i.e. all remaining values)", "other"),
    }
    assert len({r[6].hour for r in rows}) > 1  # hourly points keep their hour


def test_retention_by_property_with_custom_brackets(tidy_run: TidyRun) -> None:
    cohorts = _served(tidy_run, "retention_aggregated")
    cells = _tidy(
        tidy_run,
        "retention_cells",
        "retention_aggregated",
        "breakdown_value, breakdown_kind, cohort_index, cohort_start, period, period_label, "
        "count, aggregation_value",
    )
    assert len(cells) == sum(len(c["values"]) for c in cohorts)
    assert {c[5] for c in cells} == {"Hour 0", "Hour 1", "Hour 2-8"}
    for value, kind in (("Chrome", "value"), ("Other (i.e. all remaining values)", "other")):
        mine = [c for c in cells if c[0] == value]
        assert {c[1] for c in mine} == {kind}
        assert sorted({c[2] for c in mine}) == list(range(4))  # restarts per breakdown value
    served = {
        (c["breakdown_value"], k, p): (v["count"], v["aggregation_value"])
        for c in cohorts
        for k, c in [(int(c["label"].split()[1]), c)]
        for p, v in enumerate(c["values"])
    }
    raw = {"Chrome": "Chrome", "Other (i.e. all remaining values)": "$$_posthog_breakdown_other_$$"}
    assert {(raw[c[0]], c[2], c[4]): (c[6], c[7]) for c in cells} == served
    assert {c[3].hour for c in cells} == {0, 1, 2, 3}  # hourly cohorts keep their time


def test_optional_funnel_steps_convert_as_posthogs_ui_shows_them(tidy_run: TidyRun) -> None:
    steps = _served(tidy_run, "funnel_optional")
    rows = _tidy(
        tidy_run,
        "funnel_steps",
        "funnel_optional",
        "step_order, is_optional, count, conversion_from_first, conversion_from_previous",
    )
    counts = [s["count"] for s in steps]
    assert [r[2] for r in rows] == counts and counts[2] > counts[1]  # later step, more people
    assert [r[1] for r in rows] == [False, True, False]
    assert rows[2][4] == pytest.approx(counts[2] / counts[0])  # against the last required step
    assert all(r[3] <= 1 and r[4] <= 1 for r in rows)


@pytest.mark.parametrize("kind", ["trends", "legacy", "trends_compare", "trends_formula"])
def test_trend_series_sum_to_the_count_with_one_row_per_day(tidy_run: TidyRun, kind: str) -> None:
    served = _served(tidy_run, kind)
    rows = _tidy(tidy_run, "insight_series", kind, "series_index, point_index, day, x, value")
    assert {r[0] for r in rows} == set(range(len(served)))
    for index, series in enumerate(served):
        points = [r for r in rows if r[0] == index]
        assert len(points) == len(series["days"]) == len(series["data"])
        assert sum(r[4] for r in points) == pytest.approx(series["count"])
        assert [r[2].isoformat() for r in points] == [d[:10] for d in series["days"]]
        assert [r[3] for r in points] == series["labels"]
    if kind == "trends_compare":
        labels = query(
            tidy_run.db,
            "SELECT DISTINCT compare_label FROM insight_series WHERE insight_id = ?",
            [KIND_IDS[kind]],
        )
        assert {r[0] for r in labels} == {"current", "previous"}


def test_total_value_series_keep_their_one_number(tidy_run: TidyRun) -> None:
    served = _served(tidy_run, "trends_aggregate")
    rows = _tidy(tidy_run, "insight_series", "trends_aggregate", "series_index, day, value")
    assert rows == [(i, None, float(s["aggregated_value"])) for i, s in enumerate(served)]


def test_lifecycle_and_stickiness_points(tidy_run: TidyRun) -> None:
    lifecycle = _served(tidy_run, "lifecycle")
    rows = _tidy(tidy_run, "insight_series", "lifecycle", "status, value")
    for series in lifecycle:
        values = [v for s, v in rows if s == series["status"]]
        assert sum(values) == pytest.approx(series["count"])
    assert all(v <= 0 for s, v in rows if s == "dormant")

    stickiness = _served(tidy_run, "stickiness")
    rows = _tidy(tidy_run, "insight_series", "stickiness", "series_index, point_index, day, x")
    assert all(day is None for _, _, day, _ in rows)  # intervals, not dates
    assert [x for i, _, _, x in rows if i == 0] == stickiness[0]["labels"]


@pytest.mark.parametrize("kind", ["funnel_steps", "funnel_steps_breakdown"])
def test_required_funnel_step_counts_equal_posthogs_and_never_increase(
    tidy_run: TidyRun, kind: str
) -> None:
    served = _served(tidy_run, kind)
    funnels = served if isinstance(served[0], list) else [served]
    rows = _tidy(
        tidy_run,
        "funnel_steps",
        kind,
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


def test_funnel_trends_and_time_to_convert(tidy_run: TidyRun) -> None:
    trends = _served(tidy_run, "funnel_trends")
    rows = _tidy(tidy_run, "insight_series", "funnel_trends", "kind, series_index, value")
    assert {r[0] for r in rows} == {"funnel_trends"}
    assert len(rows) == sum(len(s["data"]) for s in trends)

    bins = _served(tidy_run, "funnel_time_to_convert")["bins"]
    rows = _tidy(tidy_run, "insight_series", "funnel_time_to_convert", "point_index, x, value")
    assert [(x, v) for _, x, v in rows] == [(str(s), float(c)) for s, c in bins]


def test_retention_keeps_every_cell_and_paths_every_edge(tidy_run: TidyRun) -> None:
    cohorts = _served(tidy_run, "retention")
    cells = _tidy(tidy_run, "retention_cells", "retention", "cohort_index, period, count")
    assert len(cells) == sum(len(c["values"]) for c in cohorts)
    for c_index, cohort in enumerate(cohorts):
        counts = [n for i, _, n in cells if i == c_index]
        assert counts == [v["count"] for v in cohort["values"]]
        assert max(counts) == counts[0]  # nobody returns who was not in the cohort

    edges = _served(tidy_run, "paths")
    rows = _tidy(tidy_run, "path_edges", "paths", "source, target, value")
    assert sorted(rows) == sorted((e["source"], e["target"], e["value"]) for e in edges)


def test_hogql_rows_are_objects_keyed_by_column(tidy_run: TidyRun) -> None:
    served = tidy_run.served["hogql"]
    rows = _tidy(tidy_run, "insight_rows", "hogql", "row_index, row")
    assert [r[0] for r in rows] == list(range(len(served["result"])))
    first = json.loads(rows[0][1])
    assert list(first) == served["columns"]
    assert list(first.values()) == served["result"][0]


def test_a_second_snapshot_the_same_day_replaces_the_tidy_rows(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: StandinControl
) -> None:
    control.configure(async_delay_s=0.1)
    materialize_insights(defs, resources)

    def counts() -> dict[str, int]:
        return {t: query(db, f"SELECT count(*) FROM {t}")[0][0] for t in TIDY_TABLES}

    first = counts()
    again = materialize_insights(defs, resources)
    assert counts() == first
    assert materialization_metadata(again, "insights")["rows_by_table"] == first | {
        "insights": materialization_metadata(again, "insights")["dagster/row_count"]
    }
    checks = check_results(again)
    assert all(c.passed for name, c in checks.items() if name != "insights_not_truncated")

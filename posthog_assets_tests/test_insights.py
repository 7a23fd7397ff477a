"""The insights snapshot against the stand-in: every refresh mode, paging, request economy, errors.

Each test runs a real ``dg.materialize`` over HTTP into a DuckDB file in tmp_path and asserts the
rows in DuckDB. The session stand-in has 500 insights (5 pages of 100), all cold at reset, and
throttles like PostHog Cloud (240 insight requests a minute, 1200 an hour per key).
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest

from posthog_assets.config import DEFAULT_BLOCKING_PAGE_SIZE, REFRESH_MODES, InsightFetchOptions
from posthog_assets.snapshots.insight_fetcher import (
    InsightSnapshotFetcher,
    InsightSnapshotIncomplete,
)
from posthog_assets.snapshots.insights import INSIGHTS_TABLE, InsightsRunConfig
from posthog_assets.snapshots.staging import StagedRows
from posthog_assets_tests.support.resources import with_fields
from posthog_assets_tests.support.session import TEST_INSIGHTS
from posthog_assets_tests.support.snapshots import (
    check_results,
    defs_assets,
    materialization_metadata,
    materialize_insights,
    query,
    resources_for,
    scalar,
    snapshot_defs,
    snapshot_project,
)

pytestmark = pytest.mark.integration

#: created_by=[2] keeps about a third of the insights: enough for several pages of follow-up.
USER_FILTER = [2]


def _rows(db: Path, day: str | None = None) -> list[dict[str, Any]]:
    cols = ["id", "refresh", "is_cached", "result", "query_error", "last_refresh", "query"]
    day = day or dt.datetime.now(dt.UTC).date().isoformat()
    rows = query(
        db, f"SELECT {', '.join(cols)} FROM insights WHERE snapshot_date = ? ORDER BY id", [day]
    )
    return [dict(zip(cols, r, strict=True)) for r in rows]


def _user_insights(client: Any) -> list[dict[str, Any]]:
    return [
        i for page in client.iter_insight_pages(basic=True, created_by=USER_FILTER)
        for i in page.results
    ]  # fmt: skip


def _user_insight_ids(client: Any) -> list[int]:
    return [i["id"] for i in _user_insights(client)]


def _insight_list_requests(control: Any) -> list[dict[str, Any]]:
    return [
        r for r in control.requests_log()
        if r["server"] == "api" and r["path"].rstrip("/").endswith("/insights")
    ]  # fmt: skip


# ---------------------------------------------------------------- the default: async, in bulk


def test_default_async_snapshot_reads_every_insight_in_bulk(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, standin: Any
) -> None:
    """500 cold insights: 5 pages to start them, then a few bulk rounds of cache reads."""
    control.configure(async_delay_s=0.3)
    started = dt.datetime.now(dt.UTC)
    result = materialize_insights(defs, resources)
    meta = materialization_metadata(result, "insights")
    rows = _rows(db)

    assert meta["refresh"] == "async" and meta["page_size"] == 100
    assert len(rows) == TEST_INSIGHTS == meta["dagster/row_count"] == meta["count_reported"]
    assert all(r["result"] is not None and r["query_error"] is None for r in rows)
    assert all(r["last_refresh"] >= started for r in rows)  # new results, not old ones
    pages = TEST_INSIGHTS // 100
    assert meta["pages"] == pages and meta["pending_queries"] == TEST_INSIGHTS
    assert meta["single_rereads"] == 0
    # a quiet round asks about one query, a landing round re-reads at most the 5 pages from
    # the cache: never one request per insight
    assert meta["requests"] == pages + meta["follow_page_requests"] + meta["query_polls"]
    assert 0 < meta["query_polls"] <= meta["follow_rounds"] <= 8, meta
    assert 0 < meta["follow_page_requests"] <= pages * meta["follow_rounds"]
    assert meta["requests"] < TEST_INSIGHTS / 20
    listed = _insight_list_requests(control)
    assert listed and all(r["query"].get("order") == "id" for r in listed)
    checks = check_results(result)
    assert all(c.passed for name, c in checks.items() if name != "insights_not_truncated")
    assert checks["insights_not_truncated"].severity == dg.AssetCheckSeverity.WARN
    assert scalar(db, "SELECT count(*) FROM insights WHERE project_id = ?",
                  [str(standin.project_id)]) == TEST_INSIGHTS  # fmt: skip


def test_stale_results_are_kept_only_until_the_recalculation_lands(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, client: Any
) -> None:
    """A stale insight answers with its old result while PostHog recomputes it; the snapshot
    waits for the new one (last_refresh not older than the query's start)."""
    ids = _user_insight_ids(client)
    control.set_insight_cache(None, "fresh")
    stale = ids[::7]
    for iid in stale:
        control.set_insight_cache(iid, "stale")
    control.configure(async_delay_s=0.4)
    before = {
        i["id"]: i["last_refresh"]
        for page in client.iter_insight_pages(refresh="force_cache", created_by=USER_FILTER)
        for i in page.results
        if i["id"] in stale
    }
    result = materialize_insights(defs, resources, created_by=USER_FILTER)
    meta = materialization_metadata(result, "insights")
    rows = {r["id"]: r for r in _rows(db)}
    assert meta["pending_queries"] == len(stale) == meta["async_completed"]
    for iid in stale:
        assert rows[iid]["last_refresh"] > dt.datetime.fromisoformat(before[iid])
    assert all(r["result"] is not None for r in rows.values())


def test_failed_queries_are_answers_recorded_on_their_insight(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, client: Any
) -> None:
    """A 400 or a 500 from GET /query/:id/ is PostHog saying the query failed: recorded, not
    retried; only the stalled queries are asked about."""
    ids = _user_insight_ids(client)
    failing, crashing, limited = ids[3], ids[5], ids[7]
    control.configure(
        async_delay_s=0.3,
        query_fail_insights={str(failing): "Query failed: column 'x' does not exist"},
        query_crash_insights=[crashing],
        concurrency_limit_insights=[limited],
    )
    result = materialize_insights(defs, resources, created_by=USER_FILTER)
    meta = materialization_metadata(result, "insights")
    rows = _rows(db)
    assert [r["id"] for r in rows] == sorted(ids)
    errors = {r["id"]: r["query_error"] for r in rows if r["query_error"]}
    assert set(errors) == {failing, crashing, limited}
    assert "column 'x' does not exist" in errors[failing]
    assert "HTTP 500" in errors[crashing] or "failed" in errors[crashing]
    assert "concurrency_limit_exceeded" in errors[limited]
    assert meta["async_failed"] == 3
    asked = [(r["path"], r["status"]) for r in control.requests_log() if "/query/" in r["path"]]
    failures = sorted(status for _path, status in asked if status >= 400)
    assert failures == [400, 400, 500]  # each failure asked once: no retry of a 500 answer
    assert len(asked) == meta["query_polls"] <= 3 + meta["follow_rounds"]
    ok = [r for r in rows if r["id"] not in errors]
    assert all(r["result"] is not None for r in ok)


def test_a_failed_recalculation_keeps_its_stale_result_flattened_and_marked(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, client: Any
) -> None:
    """PostHog answers a stale insight with its old result while the new query runs; when that
    query fails, the old result is what there is: stored, flattened, and marked stale."""
    ids = _user_insight_ids(client)
    stale = ids[0]  # a trends insight with a result
    control.set_insight_cache(None, "fresh")
    control.set_insight_cache(stale, "stale")
    control.configure(
        async_delay_s=0.3, query_fail_insights={str(stale): "Query failed: memory limit exceeded"}
    )
    result = materialize_insights(defs, resources, created_by=USER_FILTER)
    meta = materialization_metadata(result, "insights")
    [(error, has_result, marked)] = query(
        db, "SELECT query_error, result IS NOT NULL, result_is_stale FROM insights WHERE id = ?",
        [stale],
    )  # fmt: skip
    assert "memory limit exceeded" in error and has_result and marked
    flags = dict(query(db, "SELECT insight_id = ?, bool_and(result_is_stale) FROM insight_series "
                           "GROUP BY 1", [stale]))  # fmt: skip
    assert flags == {True: True, False: False}  # its rows are there, marked; no other's are
    assert meta["stale_results"] == meta["stale_results_flattened"] == 1
    assert meta["flattened_insights"] + meta["unflattened_insights"] == len(ids)


def test_a_finished_query_whose_result_never_reached_the_cache_is_taken_from_its_status(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, client: Any
) -> None:
    """An overlapping job can leave the cache with an older result (``execute_async.py``);
    ``GET /query/:id/`` still carries the finished response in ``query_status.results``."""
    ids = _user_insight_ids(client)
    uncached = ids[1]
    control.set_insight_cache(None, "fresh")
    control.set_insight_cache(uncached, "stale")
    control.configure(async_delay_s=0.3, uncached_job_insights=[uncached])
    started = dt.datetime.now(dt.UTC)
    result = materialize_insights(defs, resources, created_by=USER_FILTER)
    meta = materialization_metadata(result, "insights")
    row = {r["id"]: r for r in _rows(db)}[uncached]
    assert row["query_error"] is None and row["result"] is not None
    assert row["last_refresh"] >= started  # the new result, not the cached old one
    cached = client.get_insight(uncached, refresh="force_cache")["last_refresh"]
    assert dt.datetime.fromisoformat(cached) < started  # the cache still holds the old one
    assert meta["async_completed"] == meta["pending_queries"] == 1 and meta["async_failed"] == 0


def test_force_async_recomputes_even_a_warm_cache(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, client: Any
) -> None:
    control.configure(async_delay_s=0.2)
    control.set_insight_cache(None, "fresh")
    before = client.get_insight(42, refresh="force_cache")
    result = materialize_insights(
        defs, resources, refresh="force_async", short_id=before["short_id"]
    )
    meta = materialization_metadata(result, "insights")
    assert meta["pending_queries"] == 1 == meta["async_completed"]
    [row] = _rows(db)
    assert row["result"] is not None and row["query_error"] is None
    assert row["last_refresh"] > dt.datetime.fromisoformat(before["last_refresh"])


def test_lazy_async_follows_only_what_is_stale_by_the_lazy_thresholds(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, client: Any
) -> None:
    control.configure(async_delay_s=0.2)
    # stale by the default thresholds; for daily insights not by the lazy ones (12 h vs 6 h),
    # while weekly insights have the same threshold for both and so are recomputed
    control.set_insight_cache(None, "stale_soft")
    listed = _user_insights(client)
    trends = [i for i in listed if (i.get("query") or {}).get("kind") == "InsightVizNode"]
    daily = [i["id"] for i in trends if i["query"]["source"].get("interval") == "day"]
    listed_ids = {i["id"] for i in listed}
    control.set_insight_cache(daily[0], "stale")
    control.set_insight_cache(daily[1], "cold")
    result = materialize_insights(defs, resources, refresh="lazy_async", created_by=USER_FILTER)
    meta = materialization_metadata(result, "insights")
    followed = meta["pending_queries"]
    assert 2 < followed < len(listed_ids) and followed == meta["async_completed"]
    rows = _rows(db)
    assert {r["id"] for r in rows} == listed_ids and all(r["result"] is not None for r in rows)


def test_poll_timeout_is_finite_and_recorded(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, client: Any
) -> None:
    control.configure(async_delay_s=60)
    short_id = client.get_insight(7, basic=True)["short_id"]
    result = materialize_insights(
        defs, resources, refresh="force_async", short_id=short_id, query_poll_timeout_s=0.5
    )
    meta = materialization_metadata(result, "insights")
    assert meta["async_timed_out"] == meta["pending_queries"] == 1
    assert meta["fetch_seconds"] < 10
    [row] = _rows(db)
    assert row["result"] is None and "still computing after 0.5s" in row["query_error"]


# ---------------------------------------------------------------- stable pages, no shortfall


def test_an_unordered_listing_loses_rows_and_the_snapshot_refuses_to_store_them(
    standin: Any, control: Any, client: Any, tmp_path: Path
) -> None:
    """PostHog orders the list by a column that is NULL for almost every insight: without a
    unique ``order`` its pages overlap and skip. The snapshot sends ``order=id``; and a fetch
    that still reads fewer distinct insights than ``count`` fails instead of storing them."""
    unordered = {
        i["id"] for page in client.iter_insight_pages(basic=True, order="") for i in page.results
    }
    assert len(unordered) < TEST_INSIGHTS  # what a client without order=id would store
    ordered = {i["id"] for page in client.iter_insight_pages(basic=True) for i in page.results}
    assert len(ordered) == TEST_INSIGHTS

    options = InsightFetchOptions(refresh="force_cache", order="")  # an unordered client
    with StagedRows(tmp_path / "stage", INSIGHTS_TABLE.staged_columns) as staging:
        fetcher = InsightSnapshotFetcher(client, staging, options)
        with pytest.raises(InsightSnapshotIncomplete, match=f"PostHog reports {TEST_INSIGHTS}"):
            fetcher.run()


def test_an_unknown_order_field_is_a_server_error_not_a_silent_default(client: Any) -> None:
    from posthog_assets.api.errors import PostHogServerError

    with pytest.raises(PostHogServerError, match="500"):
        client.list_insights(limit=1, basic=True, order="no_such_field")


# ---------------------------------------------------------------- snapshots by day


def test_rerunning_the_same_day_replaces_its_rows_and_days_build_history(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, client: Any, control: Any
) -> None:
    control.set_insight_cache(None, "fresh")
    n = len(_user_insight_ids(client))
    materialize_insights(defs, resources, refresh="force_cache", created_by=USER_FILTER)
    first = scalar(db, "SELECT max(snapshot_at) FROM insights")
    # an earlier day's snapshot, as if taken yesterday
    conn = duckdb.connect(str(db))
    try:
        conn.execute(
            "UPDATE posthog.posthog.insights SET snapshot_date = snapshot_date - INTERVAL 1 DAY"
        )
    finally:
        conn.close()
    materialize_insights(defs, resources, refresh="force_cache", created_by=USER_FILTER)
    materialize_insights(defs, resources, refresh="force_cache", created_by=USER_FILTER)
    today = dt.datetime.now(dt.UTC).date()
    counts = dict(query(db, "SELECT snapshot_date, count(*) FROM insights GROUP BY 1"))
    assert counts == {today - dt.timedelta(days=1): n, today: n}
    assert scalar(db, "SELECT max(snapshot_at) FROM insights") > first
    latest = query(db, "SELECT DISTINCT snapshot_date FROM insights_latest")
    assert latest == [(today,)] and scalar(db, "SELECT count(*) FROM insights_latest") == n


def test_the_snapshot_is_not_partitioned_so_no_past_day_can_be_backfilled(
    defs: dg.Definitions,
) -> None:
    """A snapshot records PostHog's state now: the asset offers no partitions to backfill."""
    [asset] = defs_assets(defs, "insights")
    assert asset.partitions_def is None


# ---------------------------------------------------------------- cache-only modes


def test_force_cache_on_a_cold_cache_gives_null_results(
    defs: dg.Definitions, resources: dict[str, Any], db: Path
) -> None:
    result = materialize_insights(defs, resources, refresh="force_cache")
    meta = materialization_metadata(result, "insights")
    rows = _rows(db)
    assert len(rows) == TEST_INSIGHTS and meta["requests"] == TEST_INSIGHTS // 100
    assert all(r["result"] is None and r["last_refresh"] is None for r in rows)
    assert meta["null_results"] == TEST_INSIGHTS
    checks = check_results(result)
    assert checks["insights_results_present"].passed  # null is legitimate outside blocking modes
    assert checks["insights_not_empty"].passed


def test_force_cache_on_a_warm_cache_reads_cached_results(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any
) -> None:
    control.set_insight_cache(None, "fresh")
    result = materialize_insights(defs, resources, refresh="force_cache")
    meta = materialization_metadata(result, "insights")
    assert meta["cached"] == TEST_INSIGHTS and meta["null_results"] == 0
    assert all(r["is_cached"] and r["result"] is not None for r in _rows(db))


def test_async_except_on_cache_miss_is_sent_as_force_cache_and_counts_nulls(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, client: Any
) -> None:
    ids = _user_insight_ids(client)
    control.set_insight_cache(ids[0], "fresh")
    control.clear_requests_log()
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize_insights(
            defs, resources, refresh="async_except_on_cache_miss", created_by=USER_FILTER,
            instance=instance,
        )  # fmt: skip
        logs = [e for e in instance.all_logs(result.run_id) if e.level >= logging.WARNING]
    meta = materialization_metadata(result, "insights")
    assert meta["effective_refresh"] == "force_cache"
    assert meta["null_results"] == len(ids) - 1
    assert {r["refresh"] for r in _rows(db)} == {"async_except_on_cache_miss"}
    listed = _insight_list_requests(control)
    assert listed and all(e["query"].get("refresh") == "force_cache" for e in listed)
    assert any("silently treat it as force_cache" in e.user_message for e in logs)


# ---------------------------------------------------------------- blocking modes


def test_blocking_pages_are_small_so_no_request_holds_many_computations(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, client: Any
) -> None:
    ids = _user_insight_ids(client)
    control.configure(compute_delay_s=0.01)
    result = materialize_insights(defs, resources, refresh="blocking", created_by=USER_FILTER)
    meta = materialization_metadata(result, "insights")
    rows = _rows(db)
    assert [r["id"] for r in rows] == sorted(ids)
    assert all(r["result"] is not None and r["is_cached"] is False for r in rows)
    assert meta["page_size"] == DEFAULT_BLOCKING_PAGE_SIZE
    assert meta["pages"] == -(-len(ids) // DEFAULT_BLOCKING_PAGE_SIZE) == meta["requests"]
    sizes = {
        r["query"].get("limit")
        for r in _insight_list_requests(control)
        if r["query"].get("refresh") == "blocking"
    }
    assert sizes == {str(DEFAULT_BLOCKING_PAGE_SIZE)}


def test_blocking_concurrency_limit_is_retried_then_recorded_and_fails_the_check(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, client: Any
) -> None:
    limited = _user_insight_ids(client)[0]
    control.configure(concurrency_limit_insights=[limited])
    result = materialize_insights(
        defs, resources, refresh="blocking", created_by=USER_FILTER, page_size=100,
        raise_on_error=False,
    )  # fmt: skip
    meta = materialization_metadata(result, "insights")
    assert meta["concurrency_retries"] == 2 and meta["concurrency_limited"] == 1
    errors = {r["id"]: r["query_error"] for r in _rows(db) if r["query_error"]}
    assert errors == {limited: "concurrency_limit_exceeded"}
    check = check_results(result)["insights_results_present"]
    assert not check.passed and str(limited) in check.description


def test_blocking_query_error_costs_one_row_not_the_snapshot(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any
) -> None:
    failing = 150  # on page 2: that page is refused with 400 and re-fetched one by one
    control.configure(query_fail_insights={str(failing): "HogQL error: bad breakdown"})
    result = materialize_insights(
        defs, resources, refresh="blocking", page_size=100, raise_on_error=False
    )
    meta = materialization_metadata(result, "insights")
    rows = _rows(db)
    assert len(rows) == TEST_INSIGHTS
    assert meta["fallback_pages"] == 1
    bad = [r for r in rows if r["result"] is None]
    assert [(r["id"], r["query_error"]) for r in bad] == [(failing, "HogQL error: bad breakdown")]


def test_a_crashing_calculation_is_recorded_from_its_200_answer(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any
) -> None:
    """PostHog answers a crashed calculation with HTTP 200, result null and query_status.error."""
    control.configure(query_crash_insights=[20])
    result = materialize_insights(
        defs, resources, refresh="blocking", page_size=100, raise_on_error=False
    )
    meta = materialization_metadata(result, "insights")
    bad = [r for r in _rows(db) if r["result"] is None]
    assert [r["id"] for r in bad] == [20] and bad[0]["query_error"]
    assert meta["fallback_pages"] == 0 and meta["requests"] == TEST_INSIGHTS // 100


# ---------------------------------------------------------------- filters and config


def test_short_id_and_basic_filters(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, client: Any
) -> None:
    short_id = client.get_insight(42, basic=True)["short_id"]
    materialize_insights(defs, resources, refresh="blocking", short_id=short_id)
    assert query(db, "SELECT id, short_id FROM insights") == [(42, short_id)]

    result = materialize_insights(defs, resources, basic=True, page_size=500)
    meta = materialization_metadata(result, "insights")
    assert meta["pages"] == -(-TEST_INSIGHTS // 500)
    rows = _rows(db)
    assert len(rows) == TEST_INSIGHTS
    assert all(r["refresh"] is None and r["result"] is None for r in rows)


def test_launchpad_config_offers_every_refresh_mode_with_its_meaning(
    posthog_env: dict[str, str], db: Path, posthog_resource: Any
) -> None:
    field = InsightsRunConfig.to_config_schema().as_field().config_type.fields["refresh"]
    choices = {v.config_value for v in field.config_type.inner_type.enum_values}
    assert choices == set(REFRESH_MODES)
    for mode in REFRESH_MODES:
        assert f"{mode}:" in field.description
    # left empty, a run takes the project's mode; given, the run's
    defs = snapshot_defs(snapshot_project(posthog_env, insights={"refresh": "force_cache"}))
    resources = resources_for(posthog_resource, db)
    result = materialize_insights(defs, resources, basic=True, page_size=500)
    assert materialization_metadata(result, "insights")["refresh"] == "force_cache"
    result = materialize_insights(defs, resources, refresh="lazy_async", basic=True, page_size=500)
    assert materialization_metadata(result, "insights")["refresh"] == "lazy_async"


def test_older_tables_keep_their_rows_new_columns_and_the_renamed_date(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, standin: Any
) -> None:
    """A table from an earlier version (``partition`` column, fewer columns) is migrated in
    place: ``partition`` becomes ``snapshot_date``, missing columns are added, rows stay."""
    conn = duckdb.connect(str(db))
    try:
        conn.execute("CREATE SCHEMA posthog.posthog")
        conn.execute(
            'CREATE TABLE posthog.posthog.insights (project_id VARCHAR, "partition" DATE, '
            "id BIGINT, name VARCHAR)"
        )
        conn.execute(
            "INSERT INTO posthog.posthog.insights VALUES (?, DATE '2026-01-02', 7, 'old')",
            [str(standin.project_id)],
        )
    finally:
        conn.close()
    materialize_insights(defs, resources, refresh="force_cache")
    cols = [
        r[0]
        for r in query(
            db,
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'insights' ORDER BY ordinal_position",
        )
    ]
    assert set(cols) == set(INSIGHTS_TABLE.types)
    old = query(db, "SELECT id, name FROM insights WHERE snapshot_date = '2026-01-02'")
    assert old == [(7, "old")]
    assert scalar(db, "SELECT count(*) FROM insights") == TEST_INSIGHTS + 1


def test_fatal_api_errors_fail_fast_without_retry(
    defs: dg.Definitions, posthog_resource: Any, db: Path
) -> None:
    bad = with_fields(posthog_resource, personal_api_key="phx_wrong_key", max_attempts=2)
    result = materialize_insights(defs, resources_for(bad, db), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    text = str(failure.event_specific_data.error.message)
    assert "401" in text and "phx_wrong_key" not in text
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert not (db.parent / ".posthog_staging").exists() or not any(
        (db.parent / ".posthog_staging").rglob("*.ndjson")
    )

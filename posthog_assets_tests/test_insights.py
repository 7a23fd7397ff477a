"""The insights snapshot against the stand-in: every refresh mode, pagination, partitions, errors.

Each test runs a real ``dg.materialize`` over HTTP into a DuckDB file in tmp_path and asserts the
rows in DuckDB. The session stand-in has 1200 insights (12 pages of 100), all cold at reset.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb

from posthog_assets.config import REFRESH_MODES
from posthog_assets.insights import (
    INSIGHTS_TABLE,
    QueryFollower,
    insights_config_class,
)
from posthog_assets.resources import PostHogResource
from posthog_assets_tests.conftest import TEST_INSIGHTS
from posthog_assets_tests.snapshot_support import (
    TEST_PARTITION,
    check_results,
    materialization_metadata,
    materialize_insights,
    query,
    resources_for,
    scalar,
    snapshot_settings,
)

#: created_by=[2] keeps about a third of the insights: enough for many pages of async follow-up.
USER_FILTER = [2]


def _partition_rows(db: Path, partition: str = TEST_PARTITION) -> list[dict[str, Any]]:
    cols = ["id", "refresh", "is_cached", "result", "query_error", "last_refresh", "query"]
    rows = query(
        db,
        f"SELECT {', '.join(cols)} FROM insights WHERE \"partition\" = ? ORDER BY id",
        [partition],
    )
    return [dict(zip(cols, r, strict=True)) for r in rows]


def _user_insight_ids(client: Any) -> list[int]:
    ids = []
    for page in client.iter_insight_pages(basic=True, created_by=USER_FILTER, limit=500):
        ids += [i["id"] for i in page["results"]]
    return ids


# ---------------------------------------------------------------- blocking and pagination


def test_blocking_cold_cache_pages_through_every_insight(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, standin: Any
) -> None:
    result = materialize_insights(defs, resources, refresh="blocking")
    meta = materialization_metadata(result, "insights")
    rows = _partition_rows(db)

    assert len(rows) == TEST_INSIGHTS == meta["dagster/row_count"]
    assert len({r["id"] for r in rows}) == TEST_INSIGHTS
    assert all(r["result"] is not None and r["refresh"] == "blocking" for r in rows)
    assert all(r["is_cached"] is False for r in rows)  # cold cache: computed now
    assert meta["pages_fetched"] == TEST_INSIGHTS // 100
    assert meta["requests"] == TEST_INSIGHTS // 100
    assert meta["null_results"] == 0 and meta["fresh"] == TEST_INSIGHTS and meta["cached"] == 0
    assert meta["seconds"] > 0
    assert all(c.passed for c in check_results(result).values())
    assert scalar(db, "SELECT count(*) FROM insights WHERE project_id = ?",
                  [str(standin.project_id)]) == TEST_INSIGHTS


def test_rerunning_a_partition_replaces_its_rows_and_partitions_build_history(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, client: Any
) -> None:
    n = len(_user_insight_ids(client))
    materialize_insights(defs, resources, refresh="blocking", created_by=USER_FILTER)
    first = scalar(db, "SELECT max(snapshot_at) FROM insights")
    materialize_insights(defs, resources, refresh="blocking", created_by=USER_FILTER)
    assert scalar(db, "SELECT count(*) FROM insights") == n
    assert scalar(db, "SELECT count(DISTINCT snapshot_at) FROM insights") == 1
    assert scalar(db, "SELECT max(snapshot_at) FROM insights") > first
    assert all(r["is_cached"] for r in _partition_rows(db))  # warm now: served from cache

    materialize_insights(
        defs, resources, refresh="blocking", created_by=USER_FILTER, partition="2026-01-06"
    )
    counts = dict(query(db, 'SELECT "partition"::VARCHAR, count(*) FROM insights GROUP BY 1'))
    assert counts == {TEST_PARTITION: n, "2026-01-06": n}
    latest = query(db, 'SELECT DISTINCT "partition"::VARCHAR FROM insights_latest')
    assert latest == [("2026-01-06",)]
    assert scalar(db, "SELECT count(*) FROM insights_latest") == n


# ---------------------------------------------------------------- cache-only modes


def test_force_cache_on_a_cold_cache_gives_null_results(
    defs: dg.Definitions, resources: dict[str, Any], db: Path
) -> None:
    result = materialize_insights(defs, resources, refresh="force_cache")
    meta = materialization_metadata(result, "insights")
    rows = _partition_rows(db)
    assert len(rows) == TEST_INSIGHTS
    assert all(r["result"] is None and r["last_refresh"] is None for r in rows)
    assert all(r["query"] is not None for r in rows)
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
    assert all(r["is_cached"] and r["result"] is not None for r in _partition_rows(db))


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
        )
        logs = [e for e in instance.all_logs(result.run_id) if e.level >= logging.WARNING]
    meta = materialization_metadata(result, "insights")
    assert meta["effective_refresh"] == "force_cache"
    assert meta["null_results"] == len(ids) - 1
    rows = _partition_rows(db)
    assert {r["refresh"] for r in rows} == {"async_except_on_cache_miss"}
    listed = [e for e in control.requests_log() if e["path"].endswith("/insights/")]
    assert listed and all(e["query"].get("refresh") == "force_cache" for e in listed)
    assert any("silently treat it as force_cache" in e.user_message for e in logs)


# ---------------------------------------------------------------- async modes


def test_async_on_a_cold_cache_follows_every_query_and_records_failures(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, client: Any
) -> None:
    ids = _user_insight_ids(client)
    failing, limited = ids[3], ids[7]
    control.configure(
        async_delay_s=0.3,
        query_fail_insights={str(failing): "Query failed: column 'x' does not exist"},
        concurrency_limit_insights=[limited],
    )
    result = materialize_insights(defs, resources, refresh="async", created_by=USER_FILTER)
    meta = materialization_metadata(result, "insights")
    rows = _partition_rows(db)
    assert [r["id"] for r in rows] == sorted(ids)
    ok = [r for r in rows if r["id"] not in (failing, limited)]
    assert all(r["result"] is not None and r["is_cached"] for r in ok)
    assert all(r["query_error"] is None for r in ok)
    errors = {r["id"]: r["query_error"] for r in rows if r["query_error"]}
    assert errors == {
        failing: "Query failed: column 'x' does not exist",
        limited: "concurrency_limit_exceeded",
    }
    assert meta["pending_queries"] == len(ids) == meta["rereads"]
    assert meta["async_completed"] == len(ids) - 2 and meta["async_failed"] == 2
    assert meta["query_errors"] == 2 and meta["dagster/row_count"] == len(ids)
    assert meta["pages_fetched"] == -(-len(ids) // 100)
    # polled together: a handful of rounds, not one wait per insight
    assert 1 <= meta["poll_rounds"] <= 10
    assert meta["polls"] >= len(ids)


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
    [row] = _partition_rows(db)
    assert row["result"] is not None and row["is_cached"]
    assert row["last_refresh"] > dt.datetime.fromisoformat(before["last_refresh"])


def test_lazy_async_follows_only_what_is_stale_by_the_lazy_thresholds(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, client: Any
) -> None:
    control.configure(async_delay_s=0.2)
    # stale by the default thresholds; for daily insights not by the lazy ones (12 h vs 6 h),
    # while weekly insights have the same threshold for both and so are recomputed
    control.set_insight_cache(None, "stale_soft")
    listed = [
        i
        for page in client.iter_insight_pages(basic=True, created_by=USER_FILTER, limit=500)
        for i in page["results"]
    ]
    daily = [i["id"] for i in listed if i["query"]["source"]["interval"] == "day"]
    weekly = [i["id"] for i in listed if i["query"]["source"]["interval"] == "week"]
    control.set_insight_cache(daily[0], "stale")
    control.set_insight_cache(daily[1], "cold")
    result = materialize_insights(defs, resources, refresh="lazy_async", created_by=USER_FILTER)
    meta = materialization_metadata(result, "insights")
    assert meta["pending_queries"] == len(weekly) + 2 == meta["async_completed"]
    rows = _partition_rows(db)
    assert len(rows) == len(listed) and all(r["result"] is not None for r in rows)


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
    [row] = _partition_rows(db)
    assert row["result"] is None and "still running after 0.5s" in row["query_error"]


# ---------------------------------------------------------------- blocking-mode failures


def test_blocking_concurrency_limit_is_retried_then_recorded_and_fails_the_check(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any, client: Any
) -> None:
    limited = _user_insight_ids(client)[0]
    control.configure(concurrency_limit_insights=[limited])
    result = materialize_insights(
        defs, resources, refresh="blocking", created_by=USER_FILTER, raise_on_error=False
    )
    meta = materialization_metadata(result, "insights")
    assert meta["concurrency_retries"] == 2 and meta["concurrency_limited"] == 1
    errors = {r["id"]: r["query_error"] for r in _partition_rows(db) if r["query_error"]}
    assert errors == {limited: "concurrency_limit_exceeded"}
    check = check_results(result)["insights_results_present"]
    assert not check.passed and str(limited) in check.description


def test_blocking_query_error_costs_one_row_not_the_snapshot(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any
) -> None:
    failing = 150  # on page 2: that page is refused with 400 and re-fetched one by one
    control.configure(query_fail_insights={str(failing): "HogQL error: bad breakdown"})
    result = materialize_insights(defs, resources, refresh="blocking", raise_on_error=False)
    meta = materialization_metadata(result, "insights")
    rows = _partition_rows(db)
    assert len(rows) == TEST_INSIGHTS
    assert meta["fallback_pages"] == 1
    bad = [r for r in rows if r["result"] is None]
    assert [(r["id"], r["query_error"]) for r in bad] == [(failing, "HogQL error: bad breakdown")]


# ---------------------------------------------------------------- filters and config


def test_short_id_and_basic_filters(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, client: Any
) -> None:
    short_id = client.get_insight(42, refresh="force_cache")["short_id"]
    materialize_insights(defs, resources, refresh="blocking", short_id=short_id)
    assert query(db, "SELECT id, short_id FROM insights") == [(42, short_id)]

    result = materialize_insights(defs, resources, basic=True, page_size=500)
    meta = materialization_metadata(result, "insights")
    assert meta["pages_fetched"] == 3
    rows = _partition_rows(db)
    assert len(rows) == TEST_INSIGHTS
    assert all(r["refresh"] is None and r["result"] is None for r in rows)


def test_launchpad_config_offers_every_refresh_mode_with_its_meaning(
    posthog_env: dict[str, str], tmp_path: Path
) -> None:
    settings = snapshot_settings(posthog_env, tmp_path, "insights:\n  refresh: lazy_async\n")
    cls = insights_config_class(settings.projects[0])
    field = cls.to_config_schema().as_field().config_type.fields["refresh"]
    choices = {v.config_value for v in field.config_type.enum_values}
    assert choices == set(REFRESH_MODES)
    assert field.default_value == "lazy_async"
    for mode in REFRESH_MODES:
        assert f"{mode}:" in field.description


def test_a_new_column_keeps_existing_rows(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, standin: Any
) -> None:
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
    materialize_insights(defs, resources, refresh="force_cache", short_id=None, page_size=1000)
    cols = [r[0] for r in query(db, "SELECT column_name FROM information_schema.columns "
                                    "WHERE table_name = 'insights' ORDER BY ordinal_position")]
    assert set(cols) == set(INSIGHTS_TABLE.columns)
    old = query(db, "SELECT id, name FROM insights WHERE \"partition\" = '2026-01-02'")
    assert old == [(7, "old")]
    assert scalar(db, "SELECT count(*) FROM insights") == TEST_INSIGHTS + 1


def test_fatal_api_errors_fail_fast_without_retry(
    defs: dg.Definitions, posthog_resource: Any, db: Path
) -> None:
    bad = PostHogResource(
        host=posthog_resource.host,
        project_id=posthog_resource.project_id,
        personal_api_key="phx_wrong_key",
        max_attempts=2,
    )
    result = materialize_insights(defs, resources_for(bad, db), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    text = str(failure.event_specific_data.error.message)
    assert "401" in text and "phx_wrong_key" not in text
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert not (db.parent / ".posthog_staging").exists() or not any(
        (db.parent / ".posthog_staging").rglob("*.ndjson")
    )


# ---------------------------------------------------------------- the follower on its own


def test_query_follower_polls_pending_queries_together(client: Any, control: Any) -> None:
    control.configure(async_delay_s=0.3)
    qids = []
    for iid in range(1, 41):
        status = client.get_insight(iid, refresh="force_async")["query_status"]
        qids.append(status["id"])
    finished: list[tuple[str, str | None]] = []
    follower = QueryFollower(client, interval_s=0.1, max_interval_s=0.2, timeout_s=10, workers=8)
    outcome = follower.follow(qids, lambda q, e: finished.append((q, e)))
    assert outcome.completed == set(qids) and not outcome.failed and not outcome.timed_out
    assert outcome.rounds <= 6  # ~0.3 s of waiting, whatever the number of queries
    assert sorted(q for q, _ in finished) == sorted(qids)

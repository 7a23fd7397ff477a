"""The insights snapshot: every insight with its result, in ``posthog.insights``.

One snapshot a day per project: the rows of a snapshot carry the UTC date it was taken
(``snapshot_date``); taking it again the same day replaces that day's rows, and earlier days stay
as history. The asset is not partitioned: a snapshot records PostHog's state *now*, so there is no
honest way to take "yesterday's" snapshot today, and a partitioned asset would offer exactly that
backfill. How insights are read: :mod:`posthog_assets.snapshots.insight_fetcher`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import dagster as dg
import duckdb
from pydantic import Field

from posthog_assets.config import REFRESH_MODES, PostHogProject
from posthog_assets.snapshots.checks import (
    insights_not_empty,
    insights_not_truncated,
    insights_results_present,
)
from posthog_assets.snapshots.insight_fetcher import InsightSnapshotFetcher
from posthog_assets.snapshots.results import EMPTY_RESULT, NO_RESULT
from posthog_assets.snapshots.source import SnapshotSource, StageRequest
from posthog_assets.snapshots.staging import StagedSnapshot
from posthog_assets.snapshots.tidy import TIDY_SNAPSHOT_TABLES, TidyStager
from posthog_assets.tables import INSIGHTS_GROUP, Table, columns, quote, table_ref

INSIGHTS_LATEST_VIEW = "insights_latest"


def latest_view_sql(conn: duckdb.DuckDBPyConnection) -> str:
    """``posthog.insights_latest``: each insight's newest snapshot, per project.

    The body names ``insights`` unqualified: DuckDB binds a view's tables in the view's own
    schema, so the view keeps working when the file (hence the catalog) is renamed.
    """
    cols = ", ".join(quote(c) for c in INSIGHTS_TABLE.types)
    return (
        f"CREATE OR REPLACE VIEW {table_ref(conn, INSIGHTS_LATEST_VIEW)} AS SELECT {cols} "
        "FROM insights QUALIFY row_number() OVER ("
        "PARTITION BY project_id, id ORDER BY snapshot_date DESC, snapshot_at DESC) = 1"
    )


INSIGHTS_TABLE = Table(
    name="insights",
    description="Daily snapshot of every PostHog insight with its result, in DuckDB "
    "(posthog.insights_latest: each insight's newest snapshot).",
    group=INSIGHTS_GROUP,
    daily=True,
    key=("id",),
    columns=columns("""
        id                BIGINT       PostHog's numeric insight id.
        short_id          VARCHAR      The 8-character id in the insight's URL.
        name              VARCHAR      The name given in PostHog (null when none was given).
        derived_name      VARCHAR      The name PostHog derived from the query.
        description       VARCHAR      The insight's description in PostHog.
        refresh           VARCHAR      The refresh mode asked for (null: metadata only, basic).
        last_refresh      TIMESTAMPTZ  When PostHog computed the result.
        cache_target_age  TIMESTAMPTZ  When PostHog considers the result stale.
        is_cached         BOOLEAN      The result came from PostHog's cache.
        result            JSON         The result as PostHog returned it (its shape depends on the
                                       kind; the tidy tables flatten it).
        has_more          BOOLEAN      PostHog cut the result short (a SQL insight without LIMIT
                                       returns its first 100 rows): export it as CSV for every row.
        columns           JSON         Column names of a SQL or data-table result.
        types             JSON         Column types of a SQL or data-table result.
        result_is_stale   BOOLEAN      The recalculation failed or did not finish: result is the
                                       one PostHog had before (query_error says why).
        query             JSON         The insight's query.
        filters           JSON         Legacy filters, of insights saved before queries.
        query_status_id   VARCHAR      The background query that computed the result.
        query_error       VARCHAR      Why the result is missing or stale (PostHog's error, a
                                       timeout, a refusal).
        dashboards        BIGINT[]     Ids of the dashboards the insight is on.
        tags              JSON         The insight's tags (empty without PostHog's paid tagging).
        created_by_id     BIGINT       The PostHog user who created the insight.
        created_at        TIMESTAMPTZ  When the insight was created.
        updated_at        TIMESTAMPTZ  When the insight was last saved.
        last_modified_at  TIMESTAMPTZ  When the insight's query was last changed.
    """),
    views=(latest_view_sql,),
    checks=(insights_not_empty, insights_results_present, insights_not_truncated),
    renamed={"partition": "snapshot_date"},
)

REFRESH_FIELD_DESCRIPTION = (
    "PostHog refresh mode for this run (empty: the project's insights.refresh). "
    + " | ".join(f"{mode}: {text}" for mode, text in REFRESH_MODES.items())
)


#: PostHog's refresh modes as the launchpad offers them: Dagster shows and takes an enum's member
#: names, so each is named as PostHog spells it (``async`` is a keyword: hence the functional API).
Refresh = Enum("Refresh", [(mode, mode) for mode in REFRESH_MODES], type=str)


class InsightsRunConfig(dg.Config):
    """Per-run overrides of the project's ``insights:`` settings, in the launchpad as
    ``ops: {<prefix>__insights: {config: {refresh: force_blocking}}}``. An empty field keeps the
    project's value."""

    refresh: Refresh | None = Field(  # type: ignore[valid-type]
        default=None, description=REFRESH_FIELD_DESCRIPTION
    )
    short_id: str | None = Field(default=None, description="Only the insight of this short id.")
    created_by: list[int] | None = Field(
        default=None, description="Only insights created by these user ids."
    )
    basic: bool | None = Field(
        default=None, description="Metadata only (basic=true): no results are computed."
    )
    page_size: int | None = Field(default=None, description="Insights per list request.")
    query_poll_timeout_s: float | None = Field(
        default=None, description="Give up following background queries after this long."
    )
    poll_workers: int | None = Field(
        default=None, description="Threads asking about stalled queries at once."
    )
    concurrency_limit_retries: int | None = Field(
        default=None, description="Re-reads of an insight refused with concurrency_limit_exceeded."
    )
    prefetch_pages: int | None = Field(
        default=None, description="Insight pages requested ahead (1: none)."
    )


class InsightsSource(SnapshotSource):
    """``posthog.insights``: one snapshot a day per project, every insight with its result; and
    beside it the tidy tables its results flatten into (see :mod:`posthog_assets.snapshots.tidy`).
    """

    table = INSIGHTS_TABLE
    companions = tuple(TIDY_SNAPSHOT_TABLES.values())
    config_cls = InsightsRunConfig

    def __init__(self, project: PostHogProject) -> None:
        self.project = project

    def stage(self, request: StageRequest) -> dict[str, Any]:
        config = request.config.model_dump(mode="json") if request.config is not None else {}
        options = self.project.insights.merged(config)
        request.log.info(
            "Snapshotting insights of project %s with refresh=%s (snapshot of %s)",
            request.resource.project_id, options.refresh, request.snapshot_at[:10],
        )  # fmt: skip
        tidy = TidyStager(request.companions) if request.companions else None
        fetcher = InsightSnapshotFetcher(
            request.client,
            request.staging,
            options,
            log=request.log,
            tidy=tidy,
            poll=request.resource.poll_policy(options.query_poll_timeout_s),
        )
        stats = fetcher.run()
        if truncated := fetcher.truncated:
            request.log.warning(
                "%d insight result(s) cut short by PostHog (hasMore: a SQL query without LIMIT "
                "returns its first 100 rows), e.g. %s; their tidy rows are incomplete. Export "
                "them as CSV for every row.",
                len(truncated), truncated[:10],
            )  # fmt: skip
        if tidy is not None:
            odd = {
                reason: n
                for reason, n in tidy.unflattened_by_reason.items()
                if reason not in (NO_RESULT, EMPTY_RESULT)
            }
            if odd:
                request.log.warning(
                    "%d insight result(s) not flattened into tidy tables, kept as JSON in "
                    "posthog.insights.result: %s",
                    sum(odd.values()), odd,
                )  # fmt: skip
        return {
            "refresh": options.refresh,
            "effective_refresh": options.effective_refresh,
            "page_size": options.effective_page_size,
            **stats.as_metadata(),
            **(tidy.figures() if tidy is not None else {}),
        }

    def describe(self, conn: duckdb.DuckDBPyConnection, staged: StagedSnapshot) -> dict[str, Any]:
        """Counts over the rows just written (the day's snapshot)."""
        rows = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE result IS NULL), "
            "count(*) FILTER (WHERE is_cached), "
            "count(*) FILTER (WHERE NOT coalesce(is_cached, false) AND result IS NOT NULL), "
            "count(*) FILTER (WHERE query_error IS NOT NULL), "
            "count(*) FILTER (WHERE has_more), count(*) FILTER (WHERE result_is_stale) "
            f"FROM {INSIGHTS_TABLE.ref(conn)} WHERE project_id = ? AND snapshot_date = ?",
            [staged.scope["project_id"], staged.scope["snapshot_date"]],
        ).fetchall()
        total, null_results, cached, fresh, errors, truncated, stale = (int(v) for v in rows[0])
        return {
            "rows": total,
            "null_results": null_results,
            "cached": cached,
            "fresh": fresh,
            "query_errors": errors,
            "stale_results": stale,
            "truncated_insights": truncated,
        }

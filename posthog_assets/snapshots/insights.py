"""The insights snapshot: every insight with its result, in ``posthog.insights``.

One snapshot a day per project: the rows of a snapshot carry the UTC date it was taken
(``snapshot_date``); taking it again the same day replaces that day's rows, and earlier days stay
as history. The asset is not partitioned: a snapshot records PostHog's state *now*, so there is no
honest way to take "yesterday's" snapshot today, and a partitioned asset would offer exactly that
backfill.

How the fetch spends requests (PostHog allows 1,200 insight requests an hour per key):

- the list is read page by page, ``order=id`` (PostHog's default order has ties, so unordered pages
  overlap and skip rows), 100 insights a page in the async and cache modes;
- in the async modes, insights whose result PostHog is still computing are followed in bulk:
  while nothing is landing, a round asks ``GET /query/:id/`` about the query started first (one
  request; a batch started together finishes together); once one is complete, rounds re-read the
  pages that hold pending insights with ``refresh=force_cache`` (100 insights from the cache per
  request, computing nothing), keeping those whose ``last_refresh`` is not older than the query's
  ``start_time``, for as long as that finds new results. A finished query's own answer carries
  its response, which is used as it is; a 400 or 500 there is PostHog's answer that the query
  failed. So N insights cost about ``ceil(N/100) x (landing rounds + 1)`` requests plus one per
  quiet round;
- blocking modes compute every stale insight of a page inside one request, one after another, so
  their pages are small (5 by default).

A failure of one insight is recorded on its row (``query_error``), never left as a bare null. The
snapshot then compares the distinct insights it stored with the ``count`` PostHog reported and
fails when any are missing, before anything is written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import duckdb
import pydantic
from pydantic import Field

from posthog_assets.api.client import PostHogClient, QueryStatus
from posthog_assets.api.errors import (
    PostHogAuthError,
    PostHogError,
    PostHogNotFoundError,
    PostHogPermissionError,
)
from posthog_assets.api.polling import PollPolicy
from posthog_assets.common import parse_time
from posthog_assets.config import (
    ASYNC_REFRESH_MODES,
    BLOCKING_REFRESH_MODES,
    REFRESH_MODES,
    ProjectConfig,
    RefreshMode,
)
from posthog_assets.resources import PostHogResource
from posthog_assets.snapshots.results import EMPTY_RESULT, NO_RESULT
from posthog_assets.snapshots.source import SnapshotSource, StageRequest
from posthog_assets.snapshots.staging import StagedRows, StagedSnapshot
from posthog_assets.snapshots.tidy import TIDY_SNAPSHOT_TABLES, TidyStager
from posthog_assets.snapshots.writer import SnapshotTable
from posthog_assets.tables import quote, table_ref

#: PostHog's insights endpoints silently treat this mode as ``force_cache`` (``posthog/utils.py``,
#: ``refresh_requested_by_client``); only ``POST /query/`` honours it.
ASYNC_EXCEPT_ON_CACHE_MISS = "async_except_on_cache_miss"
CONCURRENCY_LIMIT_MESSAGE = "concurrency_limit_exceeded"
DEFAULT_POLL_WORKERS = 4
DEFAULT_CONCURRENCY_RETRIES = 2
#: Insight pages requested ahead of the one being staged.
DEFAULT_PREFETCH_PAGES = 2
DEFAULT_PAGE_SIZE = 100
#: In a blocking mode PostHog computes each stale insight of a page inside the request, one after
#: another: a few per request keeps each request short.
DEFAULT_BLOCKING_PAGE_SIZE = 5
#: Queries asked about in one round at most once some have finished (one before: a batch
#: started together finishes together); each is asked again after 2, 4, 8 ... rounds.
MAX_ASKS_PER_ROUND = 10

INSIGHTS_TABLE = SnapshotTable(
    name="insights",
    columns={
        "project_id": "VARCHAR",
        "snapshot_date": "DATE",
        "snapshot_at": "TIMESTAMPTZ",
        "id": "BIGINT",
        "short_id": "VARCHAR",
        "name": "VARCHAR",
        "derived_name": "VARCHAR",
        "description": "VARCHAR",
        "refresh": "VARCHAR",
        "last_refresh": "TIMESTAMPTZ",
        "cache_target_age": "TIMESTAMPTZ",
        "is_cached": "BOOLEAN",
        "result": "JSON",
        #: PostHog cut the result short (a SQL insight without LIMIT returns its first 100 rows).
        "has_more": "BOOLEAN",
        "columns": "JSON",
        "types": "JSON",
        #: The recalculation failed or did not finish; ``result`` is the one PostHog had before.
        "result_is_stale": "BOOLEAN",
        "query": "JSON",
        "filters": "JSON",
        "query_status_id": "VARCHAR",
        "query_error": "VARCHAR",
        "dashboards": "BIGINT[]",
        "tags": "JSON",
        "created_by_id": "BIGINT",
        "created_at": "TIMESTAMPTZ",
        "updated_at": "TIMESTAMPTZ",
        "last_modified_at": "TIMESTAMPTZ",
    },
    scope=("project_id", "snapshot_date"),
    constants=("project_id", "snapshot_date", "snapshot_at"),
    renamed={"partition": "snapshot_date"},
)

INSIGHTS_LATEST_VIEW = "insights_latest"


def latest_view_sql(conn: duckdb.DuckDBPyConnection) -> str:
    """``posthog.insights_latest``: each insight's newest snapshot, per project.

    The body names ``insights`` unqualified: DuckDB binds a view's tables in the view's own
    schema, so the view keeps working when the file (hence the catalog) is renamed.
    """
    cols = ", ".join(quote(c) for c in INSIGHTS_TABLE.columns)
    return (
        f"CREATE OR REPLACE VIEW {table_ref(conn, INSIGHTS_LATEST_VIEW)} AS SELECT {cols} "
        "FROM insights QUALIFY row_number() OVER ("
        "PARTITION BY project_id, id ORDER BY snapshot_date DESC, snapshot_at DESC) = 1"
    )


REFRESH_FIELD_DESCRIPTION = (
    "PostHog refresh mode for this run (default: the YAML's insights.refresh). "
    + " | ".join(f"{mode}: {text}" for mode, text in REFRESH_MODES.items())
)


class InsightsSnapshotConfig(dg.Config):
    """Per-run overrides of the YAML ``insights:`` section, set in the launchpad as
    ``ops: {<prefix>__insights: {config: {refresh: async}}}``. Empty fields use the YAML."""

    refresh: RefreshMode = Field(default="async", description=REFRESH_FIELD_DESCRIPTION)
    short_id: str | None = Field(
        default=None, description="Only the insight with this 8-character short id."
    )
    created_by: list[int] | None = Field(
        default=None, description="Only insights created by these user ids."
    )
    basic: bool | None = Field(
        default=None, description="Metadata only (basic=true): no results are computed."
    )
    page_size: int | None = Field(
        default=None,
        description="Insights per list request (default 100; 5 in blocking modes, where PostHog "
        "computes each stale insight of a page inside the request).",
    )
    query_poll_timeout_s: float | None = Field(
        default=None,
        description="Give up following async queries after this many seconds (YAML default).",
    )
    poll_workers: int = Field(
        default=DEFAULT_POLL_WORKERS,
        description="Threads asking about stalled queries (GET /query/:id/) at once.",
    )
    concurrency_limit_retries: int = Field(
        default=DEFAULT_CONCURRENCY_RETRIES,
        description="Re-fetch an insight refused with concurrency_limit_exceeded this many times.",
    )
    prefetch_pages: int = Field(
        default=DEFAULT_PREFETCH_PAGES,
        description="Insight pages requested ahead while the current page is staged (1 = none).",
    )


def insights_config_class(project: ProjectConfig) -> type[InsightsSnapshotConfig]:
    """The run config of one project: the launchpad's default ``refresh`` is its YAML mode."""
    return pydantic.create_model(  # type: ignore[call-overload, no-any-return]
        f"InsightsSnapshotConfig_{project.name}",
        __base__=InsightsSnapshotConfig,
        __doc__=InsightsSnapshotConfig.__doc__,
        refresh=(
            RefreshMode,
            Field(default=project.insights.refresh, description=REFRESH_FIELD_DESCRIPTION),
        ),
    )


@dataclass(frozen=True)
class InsightFetchOptions:
    """Everything the fetch needs, resolved from YAML, run config and the resource."""

    refresh: str
    short_id: str | None = None
    created_by: list[int] | None = None
    basic: bool = False
    page_size: int | None = None
    poll: PollPolicy = PollPolicy(interval_s=1.0, max_interval_s=15.0, timeout_s=300.0)
    poll_workers: int = DEFAULT_POLL_WORKERS
    concurrency_limit_retries: int = DEFAULT_CONCURRENCY_RETRIES
    prefetch_pages: int = DEFAULT_PREFETCH_PAGES
    #: A unique sort field (PostHog's default order has ties); "" sends none.
    order: str = "id"

    @property
    def effective_refresh(self) -> str:
        """What PostHog's insights endpoints actually do with our mode."""
        return "force_cache" if self.refresh == ASYNC_EXCEPT_ON_CACHE_MISS else self.refresh

    @property
    def recorded_refresh(self) -> str | None:
        """The ``refresh`` column: the configured mode, or NULL for metadata-only (basic) runs."""
        return None if self.basic else self.refresh

    @property
    def effective_page_size(self) -> int:
        if self.page_size:
            return self.page_size
        if not self.basic and self.refresh in BLOCKING_REFRESH_MODES:
            return DEFAULT_BLOCKING_PAGE_SIZE
        return DEFAULT_PAGE_SIZE

    @property
    def follows_queries(self) -> bool:
        return not self.basic and self.effective_refresh in ASYNC_REFRESH_MODES

    def filters(self) -> dict[str, Any]:
        return {
            "short_id": self.short_id,
            "created_by": self.created_by or None,
            "order": self.order,
        }


def insight_row(
    insight: Mapping[str, Any], refresh: str | None, query_error: str | None = None
) -> dict[str, Any]:
    """One staged row; a query error in the payload is kept, an explicit one wins. A result
    that came with an error is the one PostHog had before the failed recalculation: stale."""
    status = insight.get("query_status") or {}
    if query_error is None and status.get("error"):
        query_error = status.get("error_message") or "query failed (no message)"
    created_by = insight.get("created_by")
    has_more = insight.get("hasMore")
    return {
        "id": insight.get("id"),
        "short_id": insight.get("short_id"),
        "name": insight.get("name"),
        "derived_name": insight.get("derived_name"),
        "description": insight.get("description"),
        "refresh": refresh,
        "last_refresh": insight.get("last_refresh"),
        "cache_target_age": insight.get("cache_target_age"),
        "is_cached": insight.get("is_cached"),
        "result": insight.get("result"),
        "has_more": has_more if isinstance(has_more, bool) else None,
        "columns": insight.get("columns"),
        "types": insight.get("types"),
        "result_is_stale": query_error is not None and insight.get("result") is not None,
        "query": insight.get("query"),
        "filters": insight.get("filters"),
        "query_status_id": status.get("id"),
        "query_error": query_error,
        "dashboards": insight.get("dashboards"),
        "tags": insight.get("tags"),
        "created_by_id": created_by.get("id") if isinstance(created_by, dict) else None,
        "created_at": insight.get("created_at"),
        "updated_at": insight.get("updated_at"),
        "last_modified_at": insight.get("last_modified_at"),
    }


def _with_response(
    insight: Mapping[str, Any], status: Mapping[str, Any], response: Mapping[str, Any]
) -> dict[str, Any]:
    """The listed insight with the result fields of a finished query's response."""
    return {
        **insight,
        "result": response.get("results"),
        "last_refresh": response.get("last_refresh"),
        "cache_target_age": response.get("cache_target_age"),
        "is_cached": response.get("is_cached"),
        "columns": response.get("columns"),
        "types": response.get("types"),
        "hasMore": response.get("hasMore"),
        "query_status": {k: v for k, v in status.items() if k != "results"},
    }


def _running_query(insight: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``query_status`` of a background job still computing this insight, if any."""
    status = insight.get("query_status") or {}
    if not status or status.get("complete") or status.get("error") or not status.get("id"):
        return None
    return status


def _is_concurrency_limited(insight: Mapping[str, Any]) -> bool:
    status = insight.get("query_status") or {}
    return bool(status.get("error")) and CONCURRENCY_LIMIT_MESSAGE in str(
        status.get("error_message") or ""
    )


class InsightSnapshotIncomplete(PostHogError):
    """Fewer distinct insights were read than PostHog's ``count`` says exist (a step retry may
    read them all: the list can shift while it is read)."""

    retryable = True


@dataclass
class PendingInsight:
    """An insight whose result PostHog is computing in the background."""

    insight: Mapping[str, Any]
    offset: int | None  # the list page it was on; None once it was not found there again
    query_id: str
    started_at: datetime | None
    seen_last_refresh: datetime | None
    asks: int = 0  # times /query/:id/ was asked about this insight's query
    next_ask_round: int = 0
    completed: bool = False  # /query/:id/ said complete, but the cache had not shown it yet

    def finished_in(self, insight: Mapping[str, Any]) -> bool:
        """Whether this cache-only answer holds the new result (not the stale one we saw)."""
        refreshed = parse_time(insight.get("last_refresh"))
        if insight.get("result") is None or refreshed is None:
            return False
        if self.started_at is not None:
            return refreshed >= self.started_at
        return self.seen_last_refresh is None or refreshed > self.seen_last_refresh


@dataclass
class InsightFetchStats:
    pages: int = 0
    fallback_pages: int = 0
    listed: int = 0
    count_reported: int | None = None
    staged: int = 0
    duplicates_skipped: int = 0
    vanished: int = 0
    pending_queries: int = 0
    follow_rounds: int = 0
    follow_page_requests: int = 0
    query_polls: int = 0
    single_rereads: int = 0
    async_completed: int = 0
    async_failed: int = 0
    async_timed_out: int = 0
    concurrency_limited: int = 0
    concurrency_retries: int = 0
    follow_seconds: float = 0.0

    def as_metadata(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class InsightSnapshotFetcher:
    """Lists insights, follows async queries in bulk and stages one row per insight.

    No Dagster here: the asset below and the benchmark both drive it.
    """

    def __init__(
        self,
        client: PostHogClient,
        staging: StagedRows,
        options: InsightFetchOptions,
        *,
        log: logging.Logger | Any = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        tidy: TidyStager | None = None,
    ) -> None:
        self.client = client
        self.staging = staging
        self.tidy = tidy
        self.options = options
        self.log = log or logging.getLogger(__name__)
        self._sleep = sleep
        self._clock = clock
        self.stats = InsightFetchStats()
        self._lock = threading.Lock()
        self._stored: set[int] = set()
        #: Some pending insight has finished: ask about several queries at a time, not one.
        self._finished_any = False
        #: Ids of insights whose result PostHog cut short (``hasMore``).
        self.truncated: list[int] = []

    # ------------------------------------------------------------------ the run

    def run(self) -> InsightFetchStats:
        opts = self.options
        if opts.refresh == ASYNC_EXCEPT_ON_CACHE_MISS:
            self.log.warning(
                "refresh=async_except_on_cache_miss is honoured only by POST /query/: PostHog's "
                "insights endpoints silently treat it as force_cache, so an insight whose cache is "
                "cold comes back with result null. Sending force_cache; the null results are "
                "counted in the metadata (null_results)."
            )
        pending: dict[int, PendingInsight] = {}
        limited: dict[int, Mapping[str, Any]] = {}
        pages = self.client.iter_insight_pages(
            refresh=opts.effective_refresh,
            basic=opts.basic,
            page_size=opts.effective_page_size,
            prefetch=opts.prefetch_pages,
            **opts.filters(),
        )
        for page in pages:
            self.stats.pages += 1
            self.stats.fallback_pages += int(page.fallback)
            self.stats.vanished += page.vanished
            if self.stats.count_reported is None:
                self.stats.count_reported = page.count
            rows = []
            for insight in page.results:
                self.stats.listed += 1
                iid = int(insight["id"])
                if iid in self._stored or iid in pending or iid in limited:
                    self.stats.duplicates_skipped += 1
                    continue
                running = _running_query(insight) if opts.follows_queries else None
                if running is not None:
                    pending[iid] = PendingInsight(
                        insight=insight,
                        offset=page.offset,
                        query_id=str(running["id"]),
                        started_at=parse_time(running.get("start_time")),
                        seen_last_refresh=parse_time(insight.get("last_refresh")),
                    )
                elif _is_concurrency_limited(insight) and opts.concurrency_limit_retries > 0:
                    limited[iid] = insight
                else:
                    self.stats.concurrency_limited += int(_is_concurrency_limited(insight))
                    rows.append(insight)
            self._stage(rows)
        if limited:
            self._retry_concurrency_limited(limited, pending)
        if pending:
            self._follow(pending)
        self._check_complete()
        return self.stats

    def _stage(self, insights: Iterable[Mapping[str, Any]], error: str | None = None) -> None:
        rows, fresh = [], []
        with self._lock:
            for insight in insights:
                iid = int(insight["id"])
                if iid not in self._stored:
                    self._stored.add(iid)
                    row = insight_row(insight, self.options.recorded_refresh, error)
                    rows.append(row)
                    if row["has_more"]:
                        self.truncated.append(iid)
                    fresh.append((insight, bool(row["result_is_stale"])))
        written = self.staging.write(rows)
        if self.tidy is not None:
            self.tidy.add(fresh)
        with self._lock:
            self.stats.staged += written

    def _check_complete(self) -> None:
        """Fail before anything is written when fewer insights were read than PostHog has.

        The count is asked again before failing: insights deleted during the run are not missing.
        """
        reported = self.stats.count_reported
        if reported is None or len(self._stored) >= reported:
            return
        now = self.client.list_insights(limit=1, basic=True, **self.options.filters()).get("count")
        expected = min(reported, now) if isinstance(now, int) else reported
        if len(self._stored) >= expected:
            return
        raise InsightSnapshotIncomplete(
            f"read {len(self._stored)} distinct insights but PostHog reports {expected} "
            f"(count {reported} at the start, {now} at the end); nothing was written. Pages of "
            "the insights list overlapped or skipped rows, or insights were added while the "
            "snapshot ran: run it again."
        )

    # ------------------------------------------------------------------ ClickHouse load

    def _retry_concurrency_limited(
        self, limited: dict[int, Mapping[str, Any]], pending: dict[int, PendingInsight]
    ) -> None:
        """ClickHouse refused these for load: wait a little, ask again, keep the last answer."""
        opts = self.options
        wait_s = opts.poll.interval_s
        for _attempt in range(opts.concurrency_limit_retries):
            if not limited:
                break
            self._sleep(wait_s)
            wait_s = min(wait_s * 2, opts.poll.max_interval_s)
            self.log.info(
                "Retrying %d insight(s) refused with %s", len(limited), CONCURRENCY_LIMIT_MESSAGE
            )
            for iid in list(limited):
                self.stats.concurrency_retries += 1
                try:
                    insight = self.client.get_insight(iid, refresh=opts.effective_refresh)
                except PostHogNotFoundError:
                    self.stats.vanished += 1
                    del limited[iid]
                    continue
                if _is_concurrency_limited(insight):
                    limited[iid] = insight
                    continue
                del limited[iid]
                running = _running_query(insight) if opts.follows_queries else None
                if running is not None:
                    pending[iid] = PendingInsight(
                        insight=insight,
                        offset=None,
                        query_id=str(running["id"]),
                        started_at=parse_time(running.get("start_time")),
                        seen_last_refresh=parse_time(insight.get("last_refresh")),
                    )
                else:
                    self._stage([insight])
        if limited:
            self.stats.concurrency_limited += len(limited)
            self.log.warning(
                "%d insight(s) still refused with %s; recorded in query_error",
                len(limited), CONCURRENCY_LIMIT_MESSAGE,
            )  # fmt: skip
            self._stage(limited.values())

    # ------------------------------------------------------------------ following in bulk

    def _follow(self, pending: dict[int, PendingInsight]) -> None:
        """Rounds until every pending insight has its new result, a failure, or the timeout.

        A re-list costs one request per page holding a pending insight; asking PostHog about
        one query costs one. So while results are landing each round re-lists, and while they
        are not, a round first asks about the query most likely done (the earliest started; a
        few once some have finished, to find failures, which never reach the cache) and
        re-lists only when one answers complete. The waits grow between rounds either way.
        """
        opts = self.options
        started = self._clock()
        deadline = started + opts.poll.timeout_s
        waits = opts.poll.waits()
        landing = False  # the last re-list found new results: re-list again straight away
        self.stats.pending_queries = len({p.query_id for p in pending.values()})
        self.log.info(
            "Following %d insight(s) whose results PostHog is computing (timeout %gs)",
            len(pending), opts.poll.timeout_s,
        )  # fmt: skip
        while pending:
            now = self._clock()
            if now >= deadline:
                break
            self._sleep(min(next(waits), deadline - now))
            self.stats.follow_rounds += 1
            before = len(pending)
            if landing or self._ask(pending):
                asked = len(pending)
                self._reread_pages(pending)
                self._reread_singles(pending)
                landing = len(pending) < asked
                self._finished_any = self._finished_any or landing
            self.log.info(
                "Follow round %d after %.1fs: %d finished, %d still computing",
                self.stats.follow_rounds, self._clock() - started, before - len(pending),
                len(pending),
            )  # fmt: skip
        if pending:
            message = (
                f"still computing after {opts.poll.timeout_s:g}s "
                "(raise insights.query_poll_timeout_s to wait longer)"
            )
            self.stats.async_timed_out += len(pending)
            self._stage([p.insight for p in pending.values()], message)
            self.log.warning("%d insight(s) timed out; recorded in query_error", len(pending))
        self.stats.follow_seconds = round(self._clock() - started, 3)

    def _settle(self, pending: dict[int, PendingInsight], insight: Mapping[str, Any]) -> None:
        """Stage a re-read insight when it holds the new result; else keep waiting (a failed
        query never reaches the cache: only ``/query/:id/`` tells)."""
        iid = int(insight["id"])
        entry = pending.get(iid)
        if entry is not None and entry.finished_in(insight):
            del pending[iid]
            self.stats.async_completed += 1
            self._stage([insight])

    def _reread_pages(self, pending: dict[int, PendingInsight]) -> None:
        """One ``force_cache`` request per page that still holds a pending insight."""
        opts = self.options
        offsets = sorted({p.offset for p in pending.values() if p.offset is not None})
        if not offsets:
            return
        expected = {iid for iid, p in pending.items() if p.offset is not None}
        seen: set[int] = set()
        pages = self.client.iter_insight_pages(
            refresh="force_cache",
            page_size=opts.effective_page_size,
            prefetch=opts.prefetch_pages,
            offsets=offsets,
            **opts.filters(),
        )
        for page in pages:
            self.stats.follow_page_requests += 1
            for insight in page.results:
                if int(insight["id"]) in pending:
                    seen.add(int(insight["id"]))
                    self._settle(pending, insight)
        for iid in expected - seen:  # the list shifted (insights added or deleted meanwhile)
            if iid in pending:
                pending[iid].offset = None

    def _reread_singles(self, pending: dict[int, PendingInsight]) -> None:
        """Insights no longer where they were in the list, or whose query said complete."""
        for iid, entry in list(pending.items()):
            if entry.offset is not None and not entry.completed:
                continue
            self.stats.single_rereads += 1
            try:
                insight = self.client.get_insight(iid, refresh="force_cache")
            except PostHogNotFoundError:
                del pending[iid]
                self.stats.vanished += 1
                continue
            if entry.completed and not entry.finished_in(insight):  # no result in the answer
                del pending[iid]
                self.stats.async_failed += 1
                self._stage(
                    [insight], "query completed but its result was not in the cache on re-read"
                )
                continue
            self._settle(pending, insight)

    def _ask(self, pending: dict[int, PendingInsight]) -> bool:
        """``GET /query/:id/`` for the queries most likely done; True when one said complete.

        One query until any insight has finished (a batch started together finishes together,
        so the earliest started tells for all), then up to :data:`MAX_ASKS_PER_ROUND`, each
        asked again only after 2, 4, 8 ... rounds. A complete answer carries the response in
        ``query_status.results``: it is staged from there, since the cache may not hold it
        (PostHog never caches a response with an error, and an overlapping job can leave an
        older result in the cache). A 400 or 500 is PostHog's answer that the query failed;
        202 means it is merely slow.
        """
        round_no = self.stats.follow_rounds
        most = MAX_ASKS_PER_ROUND if self._finished_any else 1
        due = sorted(
            (e.started_at or datetime.max.replace(tzinfo=UTC), e.asks, iid)
            for iid, e in pending.items()
            if e.next_ask_round <= round_no and not e.completed
        )
        asking: dict[str, list[int]] = {}
        for _started, _asks, iid in due:
            query_id = pending[iid].query_id
            if query_id not in asking and len(asking) >= most:
                continue
            asking.setdefault(query_id, []).append(iid)
        if not asking:
            return False
        workers = max(1, min(self.options.poll_workers, len(asking)))
        with ThreadPoolExecutor(workers, thread_name_prefix="posthog-query") as pool:
            answers = list(pool.map(self._poll, asking))
        self.stats.query_polls += len(asking)
        complete = False
        for (query_id, ids), answer in zip(asking.items(), answers, strict=True):
            for iid in ids:
                entry = pending[iid]
                entry.asks += 1
                entry.next_ask_round = round_no + 2**entry.asks
                if isinstance(answer, str) or answer.failed:
                    message = answer if isinstance(answer, str) else answer.error_message
                    del pending[iid]
                    self.stats.async_failed += 1
                    self._stage([{**entry.insight, "query_status": {"id": query_id}}], message)
                elif answer.complete:
                    complete = self._finished_any = True
                    response = answer.status.get("results")
                    if isinstance(response, Mapping) and "results" in response:
                        del pending[iid]
                        self.stats.async_completed += 1
                        self._stage([_with_response(entry.insight, answer.status, response)])
                    else:
                        entry.completed = True  # read it back from the cache
        return complete

    def _poll(self, query_id: str) -> QueryStatus | str:
        """One status; a query PostHog no longer knows (404) is a failure, not a fault."""
        try:
            return self.client.get_query_status(query_id)
        except (PostHogAuthError, PostHogPermissionError):
            raise
        except PostHogNotFoundError:
            return "query not found (expired or never started)"


# ------------------------------------------------------------------------------------------------
# The source


def resolve_fetch_options(
    project: ProjectConfig, resource: PostHogResource, config: InsightsSnapshotConfig | None
) -> InsightFetchOptions:
    """YAML defaults, overridden per run from the launchpad."""
    yaml_cfg = project.insights
    cfg = config or insights_config_class(project)()
    return InsightFetchOptions(
        refresh=cfg.refresh,
        short_id=cfg.short_id if cfg.short_id is not None else yaml_cfg.short_id,
        created_by=cfg.created_by if cfg.created_by is not None else yaml_cfg.created_by,
        basic=cfg.basic if cfg.basic is not None else yaml_cfg.basic,
        page_size=cfg.page_size or yaml_cfg.page_size,
        poll=resource.poll_policy(cfg.query_poll_timeout_s or yaml_cfg.query_poll_timeout_s),
        poll_workers=cfg.poll_workers,
        concurrency_limit_retries=cfg.concurrency_limit_retries,
        prefetch_pages=cfg.prefetch_pages,
    )


class InsightsSource(SnapshotSource):
    """``posthog.insights``: one snapshot a day per project, every insight with its result; and
    beside it the tidy tables its results flatten into (see :mod:`posthog_assets.snapshots.tidy`).
    """

    name = "insights"
    table = INSIGHTS_TABLE
    views = (latest_view_sql,)
    companions = tuple(TIDY_SNAPSHOT_TABLES.values())

    def __init__(self, project: ProjectConfig) -> None:
        self.project = project
        self.config_cls = insights_config_class(project)

    def scope(self, snapshot_at: str) -> dict[str, Any]:
        return {"snapshot_date": snapshot_at[:10]}

    def stage(self, request: StageRequest) -> dict[str, Any]:
        options = resolve_fetch_options(self.project, request.resource, request.config)
        request.log.info(
            "Snapshotting insights of project %s with refresh=%s (snapshot of %s)",
            request.resource.project_id, options.refresh, request.snapshot_at[:10],
        )  # fmt: skip
        tidy = TidyStager(request.companions) if request.companions else None
        fetcher = InsightSnapshotFetcher(
            request.client, request.staging, options, log=request.log, tidy=tidy
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

"""Reading every insight with its result: the list in pages, background queries followed in bulk.

No Dagster here: the insights snapshot and the benchmark both drive :class:`InsightSnapshotFetcher`.

How the fetch spends requests (PostHog allows 1,200 insight requests an hour per key):

- the list is read page by page, ``order=id`` (PostHog's default order has ties, so unordered pages
  overlap and skip rows), 100 insights a page in the async and cache modes;
- in the async modes, insights whose result PostHog is still computing are followed in bulk
  (:meth:`InsightSnapshotFetcher._follow`): rounds ask ``GET /query/:id/`` about the query most
  likely done and, while results are landing, re-read the pages that hold pending insights with
  ``refresh=force_cache`` (100 insights from the cache per request, computing nothing). So N
  insights cost about ``ceil(N/100) x (landing rounds + 1)`` requests plus one per quiet round;
- blocking modes compute every stale insight of a page inside one request, one after another, so
  their pages are small (5 by default).

A failure of one insight is recorded on its row (``query_error``), never left as a bare null. The
fetch then compares the distinct insights it stored with the ``count`` PostHog reported and
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

from posthog_assets.api.client import PostHogClient, QueryStatus
from posthog_assets.api.errors import (
    PostHogAuthError,
    PostHogError,
    PostHogNotFoundError,
    PostHogPermissionError,
)
from posthog_assets.api.polling import PollPolicy
from posthog_assets.common import parse_time
from posthog_assets.config import ASYNC_EXCEPT_ON_CACHE_MISS, InsightFetchOptions
from posthog_assets.snapshots.staging import StagedRows
from posthog_assets.snapshots.tidy import TidyStager

CONCURRENCY_LIMIT_MESSAGE = "concurrency_limit_exceeded"
#: Queries asked about in one round at most once some have finished (one before: a batch
#: started together finishes together); each is asked again after 2, 4, 8 ... rounds.
MAX_ASKS_PER_ROUND = 10


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
    message = str(status.get("error_message") or "")
    return bool(status.get("error")) and CONCURRENCY_LIMIT_MESSAGE in message


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

    @classmethod
    def of(
        cls, insight: Mapping[str, Any], running: Mapping[str, Any], offset: int | None
    ) -> PendingInsight:
        """The insight, listed at ``offset``, whose ``running`` query computes its result."""
        return cls(
            insight=insight,
            offset=offset,
            query_id=str(running["id"]),
            started_at=parse_time(running.get("start_time")),
            seen_last_refresh=parse_time(insight.get("last_refresh")),
        )

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
    """Lists insights, follows async queries in bulk and stages one row per insight."""

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
        poll: PollPolicy | None = None,
    ) -> None:
        self.client = client
        self.staging = staging
        self.tidy = tidy
        self.options = options
        self.poll = poll or PollPolicy(
            interval_s=1.0, max_interval_s=15.0, timeout_s=options.query_poll_timeout_s
        )
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
                    pending[iid] = PendingInsight.of(insight, running, page.offset)
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
        """Fail before anything is written when fewer insights were read than PostHog has (asked
        again first: insights deleted during the run are not missing)."""
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
        wait_s = self.poll.interval_s
        for _attempt in range(opts.concurrency_limit_retries):
            if not limited:
                break
            self._sleep(wait_s)
            wait_s = min(wait_s * 2, self.poll.max_interval_s)
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
                    pending[iid] = PendingInsight.of(insight, running, None)
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
        """Rounds, with growing waits, until every pending insight has its new result, a
        failure, or the timeout. A re-list costs one request per page holding a pending insight,
        asking about one query one: so while results are landing each round re-lists, and while
        they are not, a round first asks about the queries most likely done (:meth:`_ask`) and
        re-lists only when one answers complete.
        """
        started = self._clock()
        deadline = started + self.poll.timeout_s
        waits = self.poll.waits()
        landing = False  # the last re-list found new results: re-list again straight away
        self.stats.pending_queries = len({p.query_id for p in pending.values()})
        self.log.info(
            "Following %d insight(s) whose results PostHog is computing (timeout %gs)",
            len(pending), self.poll.timeout_s,
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
                f"still computing after {self.poll.timeout_s:g}s "
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
        """``GET /query/:id/`` for the queries most likely done (see :data:`MAX_ASKS_PER_ROUND`);
        True when one said complete.

        A complete answer carries the response in ``query_status.results``: it is staged from
        there, since the cache may not hold it (PostHog never caches a response with an error,
        and an overlapping job can leave an older result in the cache). A 400 or 500 is
        PostHog's answer that the query failed; 202 means it is merely slow.
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

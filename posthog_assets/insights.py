"""The daily insights snapshot: every insight with its result, in ``posthog.insights``.

The fetch step lists insights page by page in the chosen ``refresh`` mode and stages each page's
rows on disk at once. Insights whose result is still being computed (async modes) are followed
through ``GET /query/:id/`` *together*: a poll round asks about every pending query at once on a
small thread pool, rounds back off up to ``poll_max_interval_s``, and the whole follow-up gives up
after a finite timeout. Each insight whose query finished (or failed, or timed out) is then re-read
once with ``refresh=force_cache``; a failure is recorded in ``query_error``, never left as a bare
null. The write step replaces the partition's rows in one DuckDB transaction.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pydantic
from pydantic import Field

from posthog_assets.client import PostHogClient, QueryStatus
from posthog_assets.config import (
    ASYNC_REFRESH_MODES,
    REFRESH_MODES,
    RefreshMode,
    ResolvedProject,
)
from posthog_assets.duckdb_store import quote, table_ref
from posthog_assets.errors import (
    PostHogAuthError,
    PostHogError,
    PostHogNotFoundError,
    PostHogPermissionError,
    PostHogServerError,
    PostHogValidationError,
)
from posthog_assets.resources import PostHogResource
from posthog_assets.snapshot_store import (
    SnapshotTable,
    StagedSnapshot,
    StagingFile,
    build_snapshot_asset,
    project_id_of,
    utc_now_iso,
)
from posthog_assets.translator import (
    DagsterPostHogTranslator,
    PostHogMetadataSet,
    PostHogSnapshotProps,
)

#: PostHog's insights endpoints silently treat this mode as ``force_cache`` (posthog-api.md §8.3).
ASYNC_EXCEPT_ON_CACHE_MISS = "async_except_on_cache_miss"
CONCURRENCY_LIMIT_MESSAGE = "concurrency_limit_exceeded"
DEFAULT_POLL_WORKERS = 8
DEFAULT_CONCURRENCY_RETRIES = 2
#: Insight pages requested ahead of the one being staged (PostHog allows 240 insight calls/min).
DEFAULT_PREFETCH_PAGES = 2

INSIGHTS_TABLE = SnapshotTable(
    name="insights",
    columns={
        "project_id": "VARCHAR",
        "partition": "DATE",
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
    scope=("project_id", "partition"),
    constants=("project_id", "partition", "snapshot_at"),
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
        'PARTITION BY project_id, id ORDER BY "partition" DESC, snapshot_at DESC) = 1'
    )


REFRESH_FIELD_DESCRIPTION = (
    "PostHog refresh mode for this run (default: the YAML's insights.refresh). "
    + " | ".join(f"{mode}: {text}" for mode, text in REFRESH_MODES.items())
)


class InsightsSnapshotConfig(dg.Config):
    """Per-run overrides of the YAML ``insights:`` section, set in the launchpad as
    ``ops: {<prefix>__insights: {config: {refresh: async}}}``. Empty fields use the YAML."""

    refresh: RefreshMode = Field(default="blocking", description=REFRESH_FIELD_DESCRIPTION)
    short_id: str | None = Field(
        default=None, description="Only the insight with this 8-character short id."
    )
    created_by: list[int] | None = Field(
        default=None, description="Only insights created by these user ids."
    )
    basic: bool | None = Field(
        default=None, description="Metadata only (basic=true): no results are computed."
    )
    page_size: int | None = Field(default=None, description="Insights per page (limit).")
    query_poll_timeout_s: float | None = Field(
        default=None,
        description="Give up following async queries after this many seconds (YAML default).",
    )
    poll_workers: int = Field(
        default=DEFAULT_POLL_WORKERS,
        description="Threads polling pending queries and re-reading finished insights.",
    )
    concurrency_limit_retries: int = Field(
        default=DEFAULT_CONCURRENCY_RETRIES,
        description="Re-fetch an insight refused with concurrency_limit_exceeded this many times.",
    )
    prefetch_pages: int = Field(
        default=DEFAULT_PREFETCH_PAGES,
        description="Insight pages requested ahead while the current page is staged (1 = none).",
    )


def insights_config_class(project: ResolvedProject) -> type[InsightsSnapshotConfig]:
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
    page_size: int = 100
    poll_interval_s: float = 1.0
    poll_max_interval_s: float = 15.0
    poll_timeout_s: float = 300.0
    poll_workers: int = DEFAULT_POLL_WORKERS
    concurrency_limit_retries: int = DEFAULT_CONCURRENCY_RETRIES
    prefetch_pages: int = DEFAULT_PREFETCH_PAGES

    @property
    def effective_refresh(self) -> str:
        """What PostHog's insights endpoints actually do with our mode (§8.3)."""
        return "force_cache" if self.refresh == ASYNC_EXCEPT_ON_CACHE_MISS else self.refresh

    @property
    def recorded_refresh(self) -> str | None:
        """The ``refresh`` column: the configured mode, or NULL for metadata-only (basic) runs."""
        return None if self.basic else self.refresh


def insight_row(
    insight: Mapping[str, Any], refresh: str | None, query_error: str | None = None
) -> dict[str, Any]:
    """One staged row; a query error in the payload is kept, an explicit one wins."""
    status = insight.get("query_status") or {}
    if query_error is None and status.get("error"):
        query_error = status.get("error_message") or "query failed (no message)"
    created_by = insight.get("created_by")
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


def _pending_query_id(insight: Mapping[str, Any], refresh: str) -> str | None:
    """The query to follow: a background job still running for this insight, if any."""
    status = insight.get("query_status") or {}
    if not status or status.get("complete") or status.get("error") or not status.get("id"):
        return None
    if refresh in ASYNC_REFRESH_MODES or insight.get("result") is None:
        return str(status["id"])
    return None


def _is_query_failure(exc: PostHogError) -> bool:
    """A 400 (HogQL/ClickHouse user error) or a bare 500 from computing an insight."""
    return isinstance(exc, PostHogValidationError) or (
        isinstance(exc, PostHogServerError) and exc.status == 500
    )


def _is_concurrency_limited(insight: Mapping[str, Any]) -> bool:
    status = insight.get("query_status") or {}
    return bool(status.get("error")) and CONCURRENCY_LIMIT_MESSAGE in str(
        status.get("error_message") or ""
    )


# ------------------------------------------------------------------------------------------------
# Following async queries


@dataclass
class FollowResult:
    """How a batch of pending queries ended."""

    completed: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    timed_out: set[str] = field(default_factory=set)
    rounds: int = 0
    polls: int = 0
    seconds: float = 0.0


class QueryFollower:
    """Polls many pending ``query_status`` ids together until each completes, fails or times out.

    Each round polls every still-pending id once, concurrently on ``workers`` threads, then waits
    ``interval`` (growing 1.5x per round up to ``max_interval_s``) unless the deadline comes
    first. ``on_finished(query_id, error)`` is called as soon as a query ends (``error`` is None
    for success), so callers can re-read results while other queries are still running.
    """

    def __init__(
        self,
        client: PostHogClient,
        *,
        interval_s: float,
        max_interval_s: float,
        timeout_s: float,
        workers: int = DEFAULT_POLL_WORKERS,
        log: logging.Logger | Any = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"query poll timeout must be greater than 0, got {timeout_s}")
        self.client = client
        self.interval_s = max(0.01, interval_s)
        self.max_interval_s = max(self.interval_s, max_interval_s)
        self.timeout_s = timeout_s
        self.workers = max(1, workers)
        self.log = log or logging.getLogger(__name__)
        self._clock = clock
        self._sleep = sleep

    def _poll(self, query_id: str) -> QueryStatus | str:
        """One status; a query PostHog no longer knows (404) or a failed poll is a failure."""
        try:
            return self.client.get_query_status(query_id)
        except (PostHogAuthError, PostHogPermissionError):
            raise
        except PostHogNotFoundError:
            return "query not found (expired or never started)"
        except PostHogError as exc:
            return f"polling failed: {exc}"

    def follow(
        self,
        query_ids: Iterable[str],
        on_finished: Callable[[str, str | None], None] | None = None,
    ) -> FollowResult:
        result = FollowResult()
        pending = list(dict.fromkeys(query_ids))
        if not pending:
            return result
        started = self._clock()
        deadline = started + self.timeout_s
        interval = self.interval_s
        notify = on_finished or (lambda _qid, _err: None)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="posthog-poll") as pool:
            while pending:
                answers = list(pool.map(self._poll, pending))
                result.rounds += 1
                result.polls += len(pending)
                still: list[str] = []
                for qid, answer in zip(pending, answers, strict=True):
                    if isinstance(answer, str):
                        result.failed[qid] = answer
                        notify(qid, answer)
                    elif answer.failed:
                        message = answer.error_message or "query failed"
                        result.failed[qid] = message
                        notify(qid, message)
                    elif answer.complete:
                        result.completed.add(qid)
                        notify(qid, None)
                    else:
                        still.append(qid)
                pending = still
                elapsed = self._clock() - started
                self.log.info(
                    "query_status round %d after %.1fs: %d running, %d complete, %d failed",
                    result.rounds, elapsed, len(pending), len(result.completed),
                    len(result.failed),
                )
                if not pending:
                    break
                now = self._clock()
                if now >= deadline:
                    break
                self._sleep(min(interval, deadline - now))  # one last round at the deadline
                interval = min(interval * 1.5, self.max_interval_s)
        for qid in pending:
            message = (
                f"query {qid} still running after {self.timeout_s:g}s "
                "(raise insights.query_poll_timeout_s to wait longer)"
            )
            result.timed_out.add(qid)
            notify(qid, message)
        result.seconds = round(self._clock() - started, 3)
        return result


# ------------------------------------------------------------------------------------------------
# The fetch


@dataclass
class InsightFetchStats:
    pages: int = 0
    fallback_pages: int = 0
    listed: int = 0
    staged: int = 0
    duplicates_skipped: int = 0
    vanished: int = 0
    pending_queries: int = 0
    async_completed: int = 0
    async_failed: int = 0
    async_timed_out: int = 0
    poll_rounds: int = 0
    polls: int = 0
    rereads: int = 0
    concurrency_limited: int = 0
    concurrency_retries: int = 0

    def as_metadata(self) -> dict[str, int]:
        return dict(self.__dict__)


class InsightSnapshotFetcher:
    """Lists insights, follows async queries and stages one row per insight (no Dagster here)."""

    def __init__(
        self,
        client: PostHogClient,
        staging: StagingFile,
        options: InsightFetchOptions,
        *,
        log: logging.Logger | Any = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.staging = staging
        self.options = options
        self.log = log or logging.getLogger(__name__)
        self._sleep = sleep
        self.stats = InsightFetchStats()
        self._stats_lock = threading.Lock()

    def run(self) -> InsightFetchStats:
        opts = self.options
        if opts.refresh == ASYNC_EXCEPT_ON_CACHE_MISS:
            self.log.warning(
                "refresh=async_except_on_cache_miss is honoured only by POST /query/: PostHog's "
                "insights endpoints silently treat it as force_cache, so an insight whose cache is "
                "cold comes back with result null. Sending force_cache; the null results are "
                "counted in the metadata (null_results)."
            )
        pending: dict[str, list[int]] = {}
        limited: dict[int, Mapping[str, Any]] = {}
        seen: set[int] = set()
        for page in self._pages():
            self.stats.pages += 1
            rows = []
            for insight in page:
                self.stats.listed += 1
                iid = insight.get("id")
                if iid in seen:  # limit/offset pages shift when insights change mid-listing
                    self.stats.duplicates_skipped += 1
                    continue
                seen.add(iid)
                rows.extend(self._classify(insight, pending, limited))
            self.stats.staged += self.staging.write(rows)
        if limited:
            self._retry_concurrency_limited(limited, pending)
        if pending:
            self._follow(pending)
        return self.stats

    def _list_params(self, offset: int, *, basic: bool) -> dict[str, Any]:
        opts = self.options
        params: dict[str, Any] = {"limit": opts.page_size, "offset": offset}
        if basic:
            params["basic"] = "true"
        else:
            params["refresh"] = opts.effective_refresh
        if opts.short_id is not None:
            params["short_id"] = opts.short_id
        if opts.created_by:
            params["created_by"] = json.dumps(list(opts.created_by))
        return params

    def _get_page(self, offset: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One limit/offset page, computed in the requested mode.

        PostHog answers a whole page with 400 (or 500) when one insight's query fails in a
        blocking mode. Such a page is listed again metadata-only and its insights fetched one by
        one, so a failing query costs one row with ``query_error``, not the whole snapshot.
        """
        try:
            page = self.client.get_json(
                "insights/", self._list_params(offset, basic=self.options.basic),
                scopes=("insight:read",),
            )
            return page, list(page.get("results") or [])
        except (PostHogValidationError, PostHogServerError) as exc:
            if self.options.basic or not _is_query_failure(exc):
                raise
            return self._page_one_by_one(offset, exc)

    def _pages(self) -> Iterator[list[dict[str, Any]]]:
        """Every page in order, with up to ``prefetch_pages`` requests in flight.

        The first page gives ``count``; the later offsets are then known, so the next pages are
        requested while the current one is being staged (PostHog computes a page of results in
        a blocking mode while we serialise the previous one). Without ``count`` the ``next``
        links are followed one at a time.
        """
        size = self.options.page_size
        page, results = self._get_page(0)
        yield results
        if not page.get("next") or not results:
            return
        count = page.get("count")
        if not isinstance(count, int):
            offset = size
            while True:
                page, results = self._get_page(offset)
                yield results
                if not page.get("next") or not results:
                    return
                offset += size
        offsets = iter(range(size, count, size))
        depth = max(1, self.options.prefetch_pages)
        with ThreadPoolExecutor(depth, thread_name_prefix="posthog-pages") as pool:
            inflight: deque[Future[tuple[dict[str, Any], list[dict[str, Any]]]]] = deque(
                pool.submit(self._get_page, off) for off in itertools.islice(offsets, depth)
            )
            while inflight:
                _page, results = inflight.popleft().result()
                following = next(offsets, None)
                if following is not None:
                    inflight.append(pool.submit(self._get_page, following))
                yield results

    def _page_one_by_one(
        self, offset: int, exc: PostHogError
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        self.log.warning(
            "Insights page at offset %d failed (%s); fetching its insights one by one",
            offset, exc.detail or exc.status,
        )
        with self._stats_lock:
            self.stats.fallback_pages += 1
        page = self.client.get_json(
            "insights/", self._list_params(offset, basic=True), scopes=("insight:read",)
        )
        results = []
        for meta in page.get("results") or []:
            try:
                results.append(
                    self.client.get_insight(meta["id"], refresh=self.options.effective_refresh)
                )
            except (PostHogValidationError, PostHogServerError) as item_exc:
                if not _is_query_failure(item_exc):
                    raise
                detail = item_exc.detail or f"HTTP {item_exc.status}"
                results.append(
                    {**meta, "query_status": {"error": True, "error_message": detail}}
                )
            except PostHogNotFoundError:
                with self._stats_lock:
                    self.stats.vanished += 1
        return page, results

    def _classify(
        self,
        insight: Mapping[str, Any],
        pending: dict[str, list[int]],
        limited: dict[int, Mapping[str, Any]],
    ) -> list[dict[str, Any]]:
        """Stage the row now, or park the insight until its query (or a retry) settles."""
        opts = self.options
        qid = None if opts.basic else _pending_query_id(insight, opts.effective_refresh)
        if qid is not None:
            pending.setdefault(qid, []).append(int(insight["id"]))
            return []
        if _is_concurrency_limited(insight) and opts.concurrency_limit_retries > 0:
            limited[int(insight["id"])] = insight
            return []
        if _is_concurrency_limited(insight):
            self.stats.concurrency_limited += 1
        return [insight_row(insight, opts.recorded_refresh)]

    def _retry_concurrency_limited(
        self, limited: dict[int, Mapping[str, Any]], pending: dict[str, list[int]]
    ) -> None:
        """ClickHouse refused these for load: wait a little, ask again, keep the last answer."""
        opts = self.options
        wait_s = opts.poll_interval_s
        for _attempt in range(opts.concurrency_limit_retries):
            if not limited:
                break
            self._sleep(wait_s)
            wait_s = min(wait_s * 2, opts.poll_max_interval_s)
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
                qid = _pending_query_id(insight, opts.effective_refresh)
                if qid is not None:
                    pending.setdefault(qid, []).append(iid)
                else:
                    row = insight_row(insight, opts.recorded_refresh)
                    self.stats.staged += self.staging.write([row])
        if limited:
            self.stats.concurrency_limited += len(limited)
            self.log.warning(
                "%d insight(s) still refused with %s; recorded in query_error",
                len(limited), CONCURRENCY_LIMIT_MESSAGE,
            )
            self.stats.staged += self.staging.write(
                insight_row(insight, opts.recorded_refresh) for insight in limited.values()
            )

    def _follow(self, pending: dict[str, list[int]]) -> None:
        opts = self.options
        self.stats.pending_queries = len(pending)
        self.log.info(
            "Following %d async queries for %d insights (timeout %gs)",
            len(pending), sum(len(v) for v in pending.values()), opts.poll_timeout_s,
        )
        futures: list[Future[None]] = []
        with ThreadPoolExecutor(
            max(1, opts.poll_workers), thread_name_prefix="posthog-reread"
        ) as rereads:

            def on_finished(qid: str, error: str | None) -> None:
                for iid in pending.get(qid, ()):
                    futures.append(rereads.submit(self._reread, iid, error))

            follower = QueryFollower(
                self.client,
                interval_s=opts.poll_interval_s,
                max_interval_s=opts.poll_max_interval_s,
                timeout_s=opts.poll_timeout_s,
                workers=opts.poll_workers,
                log=self.log,
                sleep=self._sleep,
            )
            outcome = follower.follow(pending, on_finished)
            wait(futures)
        for f in futures:
            f.result()  # re-raise an auth error from a re-read
        self.stats.async_completed = len(outcome.completed)
        self.stats.async_failed = len(outcome.failed)
        self.stats.async_timed_out = len(outcome.timed_out)
        self.stats.poll_rounds = outcome.rounds
        self.stats.polls = outcome.polls
        if outcome.failed or outcome.timed_out:
            self.log.warning(
                "%d async queries failed and %d timed out; their insights carry query_error",
                len(outcome.failed), len(outcome.timed_out),
            )

    def _reread(self, insight_id: int, error: str | None) -> None:
        """Read the now-cached result (``force_cache``) and stage the insight's row."""
        try:
            insight = self.client.get_insight(insight_id, refresh="force_cache")
        except PostHogNotFoundError:
            with self._stats_lock:
                self.stats.vanished += 1
            return
        if error is None and insight.get("result") is None and not self.options.basic:
            status = insight.get("query_status") or {}
            if status.get("error"):
                error = status.get("error_message") or "query failed (no message)"
            else:
                error = "query completed but its result was not in the cache on re-read"
        staged = self.staging.write([insight_row(insight, self.options.recorded_refresh, error)])
        with self._stats_lock:
            self.stats.rereads += 1
            self.stats.staged += staged


# ------------------------------------------------------------------------------------------------
# Dagster


def resolve_fetch_options(
    project: ResolvedProject, resource: PostHogResource, config: InsightsSnapshotConfig | None
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
        poll_interval_s=resource.poll_interval_s,
        poll_max_interval_s=resource.poll_max_interval_s,
        poll_timeout_s=cfg.query_poll_timeout_s or yaml_cfg.query_poll_timeout_s,
        poll_workers=cfg.poll_workers,
        concurrency_limit_retries=cfg.concurrency_limit_retries,
        prefetch_pages=cfg.prefetch_pages,
    )


def describe_insights(conn: duckdb.DuckDBPyConnection, staged: StagedSnapshot) -> dict[str, Any]:
    """Counts over the rows just written (the partition), for the materialization metadata."""
    rows = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE result IS NULL), "
        "count(*) FILTER (WHERE is_cached), "
        "count(*) FILTER (WHERE NOT coalesce(is_cached, false) AND result IS NOT NULL), "
        "count(*) FILTER (WHERE query_error IS NOT NULL) "
        f'FROM {INSIGHTS_TABLE.ref(conn)} WHERE project_id = ? AND "partition" = ?',
        [staged.scope["project_id"], staged.scope["partition"]],
    ).fetchall()
    total, null_results, cached, fresh, errors = (int(v) for v in rows[0])
    return {
        "rows": total,
        "null_results": null_results,
        "cached": cached,
        "fresh": fresh,
        "query_errors": errors,
    }


def build_posthog_insights_snapshot(
    project: ResolvedProject,
    *,
    partitions_def: dg.PartitionsDefinition,
    translator: DagsterPostHogTranslator | None = None,
) -> dg.AssetsDefinition:
    """The daily-partitioned ``posthog.insights`` snapshot asset of one project."""
    translator = translator or DagsterPostHogTranslator()
    spec = translator.get_asset_spec(PostHogSnapshotProps(project, "insights"))
    meta = PostHogMetadataSet.extract(spec.metadata)
    resource_key = meta.resource_key or project.resource_key

    def fetch(
        context: dg.OpExecutionContext, config: InsightsSnapshotConfig, folder: Path
    ) -> StagedSnapshot:
        resource: PostHogResource = getattr(context.resources, resource_key)
        client = resource.get_client(log=context.log)
        options = resolve_fetch_options(project, resource, config)
        snapshot_at = utc_now_iso()
        requests_before = client.request_count
        context.log.info(
            "Snapshotting insights of project %s with refresh=%s into partition %s",
            resource.project_id, options.refresh, context.partition_key,
        )
        with StagingFile(folder / "insights", INSIGHTS_TABLE) as staging:
            stats = InsightSnapshotFetcher(client, staging, options, log=context.log).run()
        return StagedSnapshot(
            files=staging.files,
            rows=staging.rows,
            scope={"project_id": project_id_of(resource), "partition": context.partition_key},
            snapshot_at=snapshot_at,
            stats={
                "refresh": options.refresh,
                "effective_refresh": options.effective_refresh,
                "pages_fetched": stats.pages,
                "requests": client.request_count - requests_before,
                **{k: v for k, v in stats.as_metadata().items() if k != "pages"},
            },
        )

    return build_snapshot_asset(
        spec=spec,
        table=INSIGHTS_TABLE,
        resource_key=resource_key,
        fetch=fetch,
        config_cls=insights_config_class(project),
        partitions_def=partitions_def,
        views=[latest_view_sql],
        describe=describe_insights,
    )


def insights_partitions_def(projects: Sequence[ResolvedProject]) -> dg.DailyPartitionsDefinition:
    """One daily partitions definition for every project's insights (UTC dates, today included).

    A partition is the UTC date a snapshot was taken; ``end_offset=1`` makes today's partition
    exist so the daily schedule and the demo snapshot "today". One shared definition (earliest
    ``partition_start``) keeps a single asset job over all assets valid.
    """
    starts = [p.insights.partition_start for p in projects if p.insights.enabled]
    start = min(starts) if starts else "2026-01-01"
    return dg.DailyPartitionsDefinition(start_date=start, end_offset=1, timezone="UTC")

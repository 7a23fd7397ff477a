"""``POST /query/`` for HogQL, and the HogQL side of ``GET``/``DELETE /query/:id/``
(``posthog/api/query.py`` ``QueryViewSet``; ``posthog/hogql_queries/query_runner.py`` ``run`` and
``handle_cache_and_async_logic``; ``posthog/hogql_queries/hogql_query_runner.py``).

Per request, in PostHog's order: the body is read as a ``QueryRequest``; ``refresh`` picks the
execution mode (a missing or unknown one means ``force_cache``, which the query endpoint turns
into ``blocking``); the cache is looked up by the query's cache key (the query as sent, the
project and the limit context; async and blocking share it); a result younger than
``hogql_cache_stale_s`` (PostHog: 5 minutes, the "minute" staleness of a runner without a date
range) is served as it is, with ``is_cached: true``, however stale its rows are; otherwise the
query takes one of the organisation's concurrency slots (or waits up to 30 s for one, then 429),
is parsed and validated (OFFSET refused), runs, and the result is cached. ``force_blocking``
always computes; ``async`` answers from a fresh cache or starts a job (202); ``force_async``
always starts one. A job's id is the ``client_query_id`` or a new hex uuid; ``GET /query/:id/``
answers 202 while it runs, 200 with the full response in ``query_status.results``, 400 with
``error_message`` for an exposed error (a HogQL error or an ``APIException`` like the timeout),
500 without one; ``DELETE /query/:id/`` cancels it (``cancel_query`` in
``posthog/clickhouse/client/execute_async.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid as uuidlib
from datetime import UTC, datetime
from typing import Any

import duckdb
from starlette.responses import JSONResponse, Response

from . import errors, insights
from .auth import Ctx
from .events_db import DAY_US, EventStore
from .hogql import Compiled, HogQLError, OffsetError, compile_query, offset_used, tokenize
from .seed import Project
from .state import HogQLCacheEntry, HogQLJob, State

CLICKHOUSE_THROTTLES = ("clickhouse_burst", "clickhouse_sustained")
API_QUERIES_THROTTLES = ("api_queries_burst", "api_queries_sustained")
#: ``ClickHouseQueryTimeOut`` (``posthog/exceptions.py``): an APIException without a code, so
#: the body's code is DRF's default "error".
TIMEOUT_MESSAGE = (
    "Query has hit the max execution time before completing. See our docs for how to improve "
    "your query performance. You may need to materialize."
)
#: ``HogQLQueryRunner.cache_target_age``: "Treat SQL query caching like day insight" (6 hours).
CACHE_TARGET_AGE_S = 6 * 3600
#: ``QueryRunner._refresh_frequency``.
CLIENT_REFRESH_S = 60.0
#: ``staleness_threshold_map[LAZY]["minute"]``, the ``lazy_async`` threshold.
LAZY_STALE_S = 900.0
#: The retry interval of PostHog's concurrency limiter (``retry=0.134``).
SLOT_RETRY_S = 0.134
EXECUTION_MODES = ("blocking", "force_blocking", "async", "force_async", "lazy_async",
                   "async_except_on_cache_miss", "force_cache")  # fmt: skip
#: The team's HogQL modifiers as the response reports them (persons on events as configured).
MODIFIERS = {
    "personsOnEventsMode": "disabled",
    "personsArgMaxVersion": "auto",
    "inCohortVia": "auto",
    "materializationMode": "legacy_null_as_null",
    "bounceRatePageViewMode": "count_pageviews",
    "sessionTableVersion": "auto",
}


def throttle_scopes(state: State, method: str, body: Any) -> tuple[str, ...]:
    """``QueryViewSet.get_throttles``: the tier decides; in the legacy tier a HogQLQuery POST is
    under ``HogQLQueryThrottle`` and everything else (polls, cancels) under ClickHouse's."""
    if state.config.query_throttle_tier == "current":
        return API_QUERIES_THROTTLES
    if method == "POST" and isinstance(body, dict):
        query = body.get("query")
        if isinstance(query, dict) and query.get("kind") == "HogQLQuery":
            return ("query",)
    return CLICKHOUSE_THROTTLES


def _iso(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.isoformat().replace("+00:00", "Z")


def organization_id(project: Project) -> str:
    return str(project.to_json()["organization"])


def cache_key(project: Project, text: str) -> str:
    """Stands for ``generate_cache_key`` of the runner's payload (query, team, limit context;
    ``QUERY_ASYNC`` counts as ``QUERY``): the same text in the same project shares an entry."""
    payload = json.dumps({"query": text, "team_id": project.id, "limit_context": "query"})
    return "cache_" + hashlib.md5(payload.encode(), usedforsecurity=False).hexdigest()


def parse_mode(body: dict[str, Any]) -> str:
    """``execution_mode_from_refresh`` then the endpoint's remap of ``force_cache``."""
    raw = body.get("refresh")
    if raw is True:
        mode = "force_blocking"
    elif isinstance(raw, str) and raw in EXECUTION_MODES:
        mode = raw
    else:
        mode = "force_cache"
    if body.get("async") is True:  # the legacy flag
        mode = "async"
    return "blocking" if mode == "force_cache" else mode


# ---- the query log ------------------------------------------------------------------------------


def _log_entry(state: State, ctx: Ctx, text: str, mode: str, query_id: str) -> dict[str, Any]:
    try:
        seen = offset_used(tokenize(text))
    except HogQLError:
        seen = False
    entry: dict[str, Any] = {
        "ts": state.now(),
        "project_id": ctx.project.id,
        "kind": "HogQLQuery",
        "query": text,
        "refresh": mode,
        "query_id": query_id,
        "client_query_id": ctx.body.get("client_query_id"),
        "offset_seen": seen,
        "limit": None,
        "paginated": None,
        "capped": None,
        "status": None,
        "outcome": None,
        "rows": None,
        "is_cached": None,
        "error": None,
    }
    state.query_log.append(entry)
    return entry


def _note_compiled(entry: dict[str, Any], compiled: Compiled) -> None:
    entry.update(limit=compiled.limit, paginated=compiled.paginate, capped=compiled.capped)


# ---- concurrency ------------------------------------------------------------------------------


class ConcurrencyLimitExceeded(Exception):
    pass


async def acquire_slot(state: State, project: Project, task_id: str) -> str:
    """Wait (up to ``query_slot_wait_s``) for one of the organisation's slots."""
    org = organization_id(project)
    deadline = time.monotonic() + state.config.query_slot_wait_s
    while True:
        limit = state.config.query_max_concurrency
        if state.query_slots[org] < limit:
            state.query_slots[org] += 1
            return org
        if time.monotonic() >= deadline:
            raise ConcurrencyLimitExceeded(
                f"Exceeded maximum concurrency limit: {limit} for key: "
                f"api:query:per-org:{org} and task: {task_id}"
            )
        await asyncio.sleep(min(SLOT_RETRY_S, max(0.0, deadline - time.monotonic())) or 0.01)


def release_slot(state: State, org: str) -> None:
    if state.query_slots[org] > 0:
        state.query_slots[org] -= 1


# ---- computing --------------------------------------------------------------------------------


class QueryTimeout(Exception):
    pass


def estimated_seconds(state: State, store: EventStore, compiled: Compiled) -> float:
    """Rows ClickHouse would read (whole days of the timestamp range: the events table is
    ordered by ``toDate(timestamp)``) and the days spanned, priced by the config."""
    cfg = state.config
    if compiled.table == "events":
        counts = store.day_count_map()
        first = min(counts) if counts else store.first_day
        lower, upper = compiled.range_us
        now_us = int(time.time() * 1_000_000)
        first_us = int(datetime.combine(first, datetime.min.time(), UTC).timestamp()) * 1_000_000
        lo = first_us if lower is None else max(lower, first_us)
        hi = now_us if upper is None else upper
        rows = 0
        for day, n in counts.items():
            start = int(datetime.combine(day, datetime.min.time(), UTC).timestamp()) * 1_000_000
            if start + DAY_US > lo and start <= hi:
                rows += n
        days = max(0.0, (hi - lo) / DAY_US)
    else:
        distinct = compiled.table.endswith("distinct_ids")
        raw = "raw_person_distinct_ids" if distinct else "raw_persons"
        rows, days = store.raw_sizes()[raw], 0.0
    return rows * cfg.query_cost_per_row_s + days * cfg.query_cost_per_day_s


def _store(state: State, project: Project) -> EventStore:
    store = state.events.get(project.id)
    if store is None:
        raise errors.validation_error("This project has no events in the stand-in.")
    return store


async def compute(
    state: State, project: Project, text: str, query_id: str, entry: dict[str, Any]
) -> dict[str, Any]:
    """``QueryRunner.run`` past the cache: a slot, validation, execution, the cache write.
    Raises ``HogQLError``, ``ConcurrencyLimitExceeded`` or ``QueryTimeout``."""
    store = _store(state, project)
    org = await acquire_slot(state, project, query_id)
    try:
        try:
            compiled = compile_query(text, persons_on_events=state.config.persons_on_events)
        except OffsetError:
            entry["offset_seen"] = True
            raise
        _note_compiled(entry, compiled)
        budget = state.config.query_max_execution_s
        cost = estimated_seconds(state, store, compiled)
        if cost > budget:
            await asyncio.sleep(budget)  # ClickHouse runs until max_execution_time, then stops
            raise QueryTimeout(TIMEOUT_MESSAGE)
        started = time.monotonic()
        try:
            rows = await asyncio.to_thread(store.run_select, compiled.sql_with_limit())
        except duckdb.Error as exc:
            raise HogQLError(f"The query failed in the stand-in's database: {exc}") from exc
        latency = state.config.query_latency_s - (time.monotonic() - started)
        if latency > 0:
            await asyncio.sleep(latency)
        if time.monotonic() - started + cost > budget:
            raise QueryTimeout(TIMEOUT_MESSAGE)
    finally:
        release_slot(state, org)
    last_refresh = state.now()
    key = cache_key(project, text)
    has_more = None
    results = [list(row) for row in rows]
    if compiled.paginate:
        has_more = len(results) > compiled.applied_limit
        results = results[: compiled.applied_limit]
    body = {
        "cache_key": key,
        "cache_target_age": _iso(last_refresh + CACHE_TARGET_AGE_S),
        "calculation_trigger": None,
        "clickhouse": None,
        "columns": compiled.columns,
        "error": None,
        "explain": None,
        "hasMore": has_more,
        "hogql": compiled.hogql,
        "is_cached": False,
        "last_refresh": _iso(last_refresh),
        "limit": compiled.applied_limit if compiled.paginate else None,
        "metadata": None,
        "modifiers": {
            **MODIFIERS,
            "personsOnEventsMode": "person_id_override_properties_joined"
            if state.config.persons_on_events
            else "disabled",
        },
        "next_allowed_client_refresh": _iso(last_refresh + CLIENT_REFRESH_S),
        "offset": 0 if compiled.paginate else None,
        "query": text,
        "query_status": None,
        "results": results,
        "timezone": "UTC",
        "timings": None,
        "types": compiled.types,
    }
    state.hogql_cache[(project.id, key)] = HogQLCacheEntry(body, last_refresh)
    entry["rows"] = len(results)
    return body


# ---- async jobs ---------------------------------------------------------------------------------


def job_status(job: HogQLJob) -> dict[str, Any]:
    """The ``QueryStatus`` of a job (the fields ``execute_async.py`` fills in)."""
    return {
        "id": job.id,
        "team_id": job.project_id,
        "insight_id": None,
        "dashboard_id": None,
        "complete": job.complete,
        "error": job.error,
        "error_message": job.error_message,
        "results": job.results,
        "query_async": True,
        "start_time": _iso(job.start),
        "pickup_time": _iso(job.pickup) if job.pickup is not None else None,
        "end_time": _iso(job.end) if job.end is not None else None,
        "expiration_time": _iso(job.end + 600) if job.end is not None else None,
        "task_id": job.task_id,
        "labels": None,
    }


def start_job(
    state: State, project: Project, text: str, query_id: str, entry: dict[str, Any]
) -> HogQLJob:
    """``enqueue_process_query_task``: a new status (replacing one of the same id) and a task."""
    old = state.hogql_jobs.get(query_id)
    if old is not None and old.task is not None and not old.task.done():
        old.task.cancel()
    job = HogQLJob(
        id=query_id,
        project_id=project.id,
        query=text,
        task_id=str(uuidlib.uuid4()),
        start=state.now(),
    )
    state.hogql_jobs[query_id] = job
    job.task = asyncio.get_running_loop().create_task(_run_job(state, project, job, entry))
    return job


async def _run_job(state: State, project: Project, job: HogQLJob, entry: dict[str, Any]) -> None:
    """``process_query_task``: errors a user may see (HogQL errors, APIExceptions such as the
    timeout) become ``error_message``; anything else leaves it empty (a 500 on poll)."""
    await asyncio.sleep(0)
    job.pickup = state.now()
    try:
        body = await compute(state, project, job.query, job.id, entry)
        job.results = body
        entry["job_outcome"] = "ok"
    except (HogQLError, QueryTimeout) as exc:
        job.error, job.error_message = True, str(exc)
        entry["job_outcome"] = "error"
    except ConcurrencyLimitExceeded:
        job.error = True
        entry["job_outcome"] = "concurrency"
    except asyncio.CancelledError:
        entry["job_outcome"] = "cancelled"
        raise
    except Exception:  # noqa: BLE001 - reported as PostHog does: an error without a message
        job.error = True
        entry["job_outcome"] = "crash"
    job.complete = True
    job.end = state.now()


# ---- handlers -----------------------------------------------------------------------------------


def _query_text(body: Any) -> str:
    """``QueryRequest`` validation for the one kind the stand-in runs."""
    if not isinstance(body, dict) or "query" not in body:
        raise errors.validation_error("This field is required.", attr="query", code="required")
    query = body["query"]
    if not isinstance(query, dict) or not isinstance(query.get("kind"), str):
        raise errors.validation_error("Invalid query: 'kind' is missing", attr="query")
    if query["kind"] != "HogQLQuery":
        raise errors.validation_error(
            "The PostHog stand-in runs only HogQLQuery and ExperimentQuery on /query/, "
            f"not {query['kind']}.",
            attr="query",
        )
    text = query.get("query")
    if not isinstance(text, str):
        raise errors.validation_error("Field required: query.query", attr="query")
    unsupported = sorted(set(query) - {"kind", "query", "name", "tags"})
    if unsupported:
        raise errors.validation_error(
            f"The PostHog stand-in does not support these HogQLQuery fields: {unsupported}",
            attr="query",
        )
    return text


def _served(entry_body: dict[str, Any], status: dict[str, Any] | None) -> dict[str, Any]:
    body = dict(entry_body)
    body["is_cached"] = True
    body["query_status"] = status
    return body


def _respond(entry: dict[str, Any], body: dict[str, Any], outcome: str) -> Response:
    status = body.get("query_status")
    code = 202 if status and status.get("complete") is False else 200
    entry.update(status=code, outcome=outcome, is_cached=body.get("is_cached"))
    if "results" in body and entry.get("rows") is None and body.get("results") is not None:
        entry["rows"] = len(body["results"])
    return JSONResponse(body, status_code=code)


async def create(ctx: Ctx) -> Response:
    """``POST /query/``: an ``ExperimentQuery`` goes to ``experiments``; HogQL runs here."""
    query = ctx.body.get("query") if isinstance(ctx.body, dict) else None
    if isinstance(query, dict) and query.get("kind") == "ExperimentQuery":
        from .experiments import create as create_experiment_query  # it imports this module

        return await create_experiment_query(ctx)
    state, project = ctx.state, ctx.project
    text = _query_text(ctx.body)
    mode = parse_mode(ctx.body)
    raw_id = ctx.body.get("client_query_id")
    query_id = raw_id if isinstance(raw_id, str) and raw_id else uuidlib.uuid4().hex
    entry = _log_entry(state, ctx, text, mode, query_id)
    key = cache_key(project, text)
    now = state.now()
    if mode == "force_async":
        job = start_job(state, project, text, query_id, entry)
        return _respond(entry, {"query_status": job_status(job)}, "async")
    if mode != "force_blocking":
        cached = state.hogql_cache.get((project.id, key))
        if cached is not None:
            age = now - cached.last_refresh
            running = state.hogql_jobs.get(query_id)
            running_status = (
                job_status(running) if running is not None and not running.complete else None
            )
            if age <= state.config.hogql_cache_stale_s:
                return _respond(entry, _served(cached.body, running_status), "cached")
            if mode in ("async", "async_except_on_cache_miss"):
                job = start_job(state, project, text, query_id, entry)
                return _respond(entry, _served(cached.body, job_status(job)), "cached+async")
            if mode == "lazy_async":
                if age > LAZY_STALE_S:
                    start_job(state, project, text, query_id, entry)
                job = state.hogql_jobs.get(query_id)
                status = job_status(job) if job is not None and not job.complete else None
                return _respond(entry, _served(cached.body, status), "cached")
        elif mode in ("async", "lazy_async"):
            job = start_job(state, project, text, query_id, entry)
            return _respond(entry, {"cache_key": key, "query_status": job_status(job)}, "async")
    try:
        body = await compute(state, project, text, query_id, entry)
    except HogQLError as exc:
        entry.update(status=400, outcome="error", error=str(exc))
        raise errors.validation_error(str(exc)) from None
    except ConcurrencyLimitExceeded as exc:  # raise Throttled(detail=str(c)): no Retry-After
        entry.update(status=429, outcome="concurrency", error=str(exc))
        raise errors.ApiError(429, "throttled_error", "throttled", str(exc)) from None
    except QueryTimeout as exc:
        entry.update(status=504, outcome="timeout", error=str(exc))
        raise errors.ApiError(504, "server_error", "error", str(exc)) from None
    return _respond(entry, body, "computed")


async def query_status(ctx: Ctx) -> Response:
    """``GET /query/:id/``: a HogQL job's status, else an insight job's (``insights``)."""
    job = ctx.state.hogql_jobs.get(ctx.request.path_params["query_id"])
    if job is None or job.project_id != ctx.project.id:
        return await insights.query_status(ctx)
    status = job_status(job)
    if ctx.query.get("show_progress", "").lower() == "true":
        status["query_progress"] = {
            "bytes_read": 0,
            "rows_read": 0,
            "estimated_rows_total": 0,
            "time_elapsed": round(ctx.now - job.start, 3),
            "active_cpu_time": 0,
        }
    if not job.complete:
        code = 202
    elif not job.error:
        code = 200
    else:
        code = 400 if job.error_message else 500
    return JSONResponse({"query_status": status}, status_code=code)


async def cancel(ctx: Ctx) -> Response:
    """``DELETE /query/:id/`` (``cancel_query``): "Query already complete" for a finished job
    (whose status stays), otherwise the job is revoked and its status deleted; an unknown id
    gets the same answer as a running one."""
    state = ctx.state
    query_id = ctx.request.path_params["query_id"]
    dequeue_only = ctx.query.get("dequeue_only", "false") == "true"
    job = state.hogql_jobs.get(query_id)
    if job is not None and job.project_id == ctx.project.id:
        if job.complete:
            return JSONResponse({"message": "Query already complete"})
        if job.task is not None and not job.task.done():
            job.task.cancel()
        del state.hogql_jobs[query_id]
    else:
        insight_job = state.jobs.get(query_id)
        if insight_job is not None and insight_job.project_id == ctx.project.id:
            if insight_job.complete(ctx.now):
                return JSONResponse({"message": "Query already complete"})
            del state.jobs[query_id]
    if dequeue_only:
        message = "Only tried to dequeue, not cancelling query on clickhouse"
        return JSONResponse({"message": message})
    return JSONResponse({"message": "Cancelled query on clickhouse"})

"""Insights list/retrieve with PostHog's refresh modes, per-insight cache and async query jobs
(``products/product_analytics/backend/api/insight.py``, ``posthog/hogql_queries/query_runner.py``),
plus ``GET /query/:id/`` polling (``posthog/api/query.py``).

Async jobs complete lazily: a job records when it will end, and whoever looks at it after that
moment (a poll, a list, a retrieve) settles it and warms the cache. No background tasks needed.
"""

from __future__ import annotations

import asyncio
import csv
import heapq
import io
import json
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from starlette.responses import JSONResponse, Response

from . import errors
from .auth import Ctx
from .hashing import mix
from .pagination import limit_offset, limit_offset_page
from .seed import Insight, iso_z
from .state import CLIENT_REFRESH_S, QueryJob, State, thresholds

REFRESH_MODES = ("async", "blocking", "force_async", "force_blocking", "force_cache", "lazy_async")
CONCURRENCY_LIMIT_MESSAGE = "concurrency_limit_exceeded"
#: ``str(e)`` of the unexpected exception an injected calculation crash stands for.
CRASH_MESSAGE = "Unexpected error while calculating the insight (injected crash)"


def parse_refresh(ctx: Ctx) -> str:
    """``refresh_requested_by_client``: booleans, known modes, and anything else → force_cache."""
    if "refresh" in ctx.query:
        raw: Any = ctx.query["refresh"]
    elif isinstance(ctx.body, dict) and "refresh" in ctx.body:
        raw = ctx.body["refresh"]
    else:
        return "force_cache"
    if isinstance(raw, bool):
        return "force_blocking" if raw else "force_cache"
    text = str(raw)
    if text.lower() in ("true", "1", "yes", ""):
        return "force_blocking"
    if text.lower() in ("false", "0", "no"):
        return "force_cache"
    return text if text in REFRESH_MODES else "force_cache"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else iso_z(datetime.fromtimestamp(ts, UTC))


def _query_response(insight: Insight, last_refresh: float, is_cached: bool) -> dict[str, Any]:
    """The full query-runner response that ``query_status.results`` carries when complete."""
    default_s, _ = thresholds(insight.interval)
    return {
        "results": insight.result(),
        "is_cached": is_cached,
        "last_refresh": _iso(last_refresh),
        "next_allowed_client_refresh": _iso(last_refresh + CLIENT_REFRESH_S),
        "cache_target_age": _iso(last_refresh + default_s),
        "cache_key": insight.cache_key,
        "timezone": "UTC",
        "hogql": _hogql(insight),
        "columns": insight.result_columns(),
        "types": insight.result_types(),
        "hasMore": insight.has_more,
        "query_status": None,
        "timings": [],
    }


def _hogql(insight: Insight) -> str | None:
    """The HogQL the runner executed: the saved select of a HogQL insight, the trends query's
    translation otherwise (none for an insight with nothing to query)."""
    if insight.kind in ("hogql", "sql_truncated"):
        return insight.hogql_text()
    if insight.kind == "empty":
        return None
    events = ", ".join(repr(e) for e in insight.events) or "'$pageview'"
    return (
        f"SELECT arrayMap(number -> plus(toStartOf{insight.interval.title()}(now()), number), "
        f"range(0, {insight.points})) AS date, count() AS total FROM events "
        f"WHERE event IN ({events}) GROUP BY date"
    )


def job_status(state: State, job: QueryJob, now: float) -> dict[str, Any]:
    """The ``QueryStatus`` object; ``results`` is filled only once a successful job is done."""
    complete = job.complete(now)
    failed = complete and job.outcome != "ok"
    results = None
    if complete and not failed:
        insight = state.seed.insight_by_id(job.insight_id)
        results = _query_response(insight, job.end, False) if insight else None
    return {
        "id": job.id,
        "team_id": job.project_id,
        "insight_id": job.insight_id,
        "dashboard_id": None,
        "complete": complete,
        "error": failed,
        "error_message": job.message if failed else None,
        "results": results,
        "query_async": True,
        "start_time": _iso(job.start),
        "pickup_time": _iso(job.start + min(0.05, job.end - job.start)),
        "end_time": _iso(job.end) if complete else None,
        "expiration_time": _iso(job.start + 1200),
        "task_id": job.task_id,
        "labels": None,
    }


def settle(state: State, insight: Insight, now: float) -> QueryJob | None:
    """Complete this insight's job if its time has come (warming the cache); return the job."""
    job = state.jobs.get(insight.cache_key)
    if job is not None and not job.settled and job.complete(now):
        job.settled = True
        if job.outcome == "ok" and insight.id not in state.config.uncached_job_insights:
            current = state.cache.get(insight)
            if current is None or current < job.end:
                state.cache.put(insight, job.end)
    return job


def _failure(state: State, insight: Insight) -> tuple[str, str | None] | None:
    """The configured outcome for computing this insight, if it is not plain success."""
    cfg = state.config
    if insight.id in cfg.concurrency_limit_insights:
        return "concurrency", CONCURRENCY_LIMIT_MESSAGE
    if insight.id in cfg.query_fail_insights:
        message = cfg.query_fail_insights[insight.id]
        return "error", message or f"Query failed for insight {insight.id}: injected query error."
    if insight.id in cfg.query_crash_insights:
        return "crash", None
    return None


def _start_job(state: State, insight: Insight, now: float) -> QueryJob:
    """Start (or join the still-running) background calculation for this insight's cache key."""
    job = state.jobs.get(insight.cache_key)
    if job is not None and not job.complete(now):
        return job
    outcome, message = _failure(state, insight) or ("ok", None)
    job = QueryJob(
        id=insight.cache_key,
        project_id=insight.project.id,
        insight_id=insight.id,
        task_id=f"{mix(insight.id, int(now * 1000)):016x}",
        start=now,
        end=now + state.config.async_delay_s,
        outcome=outcome,
        message=message,
    )
    state.jobs[job.id] = job
    return job


def _failed_result(
    insight: Insight, message: str, last_refresh: float | None, client_query_id: str | None
) -> dict[str, Any]:
    """What ``InsightSerializer.insight_result`` returns when the calculation raised: HTTP 200,
    no result, no cache key, and ``dict(QueryStatus(...))`` with only the error set (so
    ``complete`` keeps its default, false; ``id`` is the request's ``client_query_id``)."""
    return {
        "result": None,
        "last_refresh": _iso(last_refresh),
        "cache_target_age": None,
        "next_allowed_client_refresh": None,
        "is_cached": False,
        "query_status": {
            "id": client_query_id,
            "team_id": insight.project.id,
            "insight_id": insight.id,
            "dashboard_id": None,
            "complete": False,
            "error": True,
            "error_message": message,
            "results": None,
            "query_async": True,
            "start_time": None,
            "pickup_time": None,
            "end_time": None,
            "expiration_time": None,
            "task_id": None,
            "labels": None,
            "query_progress": None,
        },
        "hogql": None,
        "columns": None,
        "types": None,
        "hasMore": None,
        "filters_hash": None,
    }


async def evaluate(
    state: State, insight: Insight, mode: str, now: float, client_query_id: str | None = None
) -> dict[str, Any]:
    """The result fields of one insight under ``mode`` (``QueryRunner.run`` and
    ``handle_cache_and_async_logic`` in ``posthog/hogql_queries/query_runner.py``)."""
    job = settle(state, insight, now)
    running = job if job is not None and not job.complete(now) else None
    last = state.cache.get(insight)
    default_s, lazy_s = thresholds(insight.interval)
    fresh = last is not None and now <= last + default_s
    lazily_fresh = last is not None and now <= last + lazy_s

    def result_fields(at: float, is_cached: bool) -> dict[str, Any]:
        response = _query_response(insight, at, is_cached)
        return {
            "result": response["results"],
            "last_refresh": response["last_refresh"],
            "cache_target_age": response["cache_target_age"],
            "next_allowed_client_refresh": response["next_allowed_client_refresh"],
            "is_cached": is_cached,
            "query_status": None,
            "hogql": response["hogql"],
            "columns": response["columns"],
            "types": response["types"],
            "hasMore": response["hasMore"],
            "filters_hash": insight.cache_key,
        }

    def cached(status_job: QueryJob | None) -> dict[str, Any]:
        assert last is not None
        body = result_fields(last, True)
        body["query_status"] = job_status(state, status_job, now) if status_job else None
        return body

    def miss(status_job: QueryJob | None) -> dict[str, Any]:
        return {
            "result": None,
            "last_refresh": None,
            "cache_target_age": None,
            "next_allowed_client_refresh": None,
            "is_cached": False,
            "query_status": job_status(state, status_job, now) if status_job else None,
            "hogql": None,
            "columns": None,
            "types": None,
            "hasMore": None,
            "filters_hash": insight.cache_key,
        }

    async def compute() -> dict[str, Any]:
        delay = state.config.compute_delay_s
        if delay > 0:
            await asyncio.sleep(delay)  # the query runs; other requests carry on meanwhile
        at = state.now()
        failure = _failure(state, insight)
        if failure is not None:
            kind, message = failure
            if kind == "error":  # ExposedHogQLError and friends become a ValidationError
                raise errors.validation_error(message or "Query failed.")
            if kind == "concurrency":
                return _failed_result(insight, CONCURRENCY_LIMIT_MESSAGE, at, client_query_id)
            return _failed_result(insight, CRASH_MESSAGE, None, client_query_id)
        state.cache.put(insight, at)
        return result_fields(at, False)

    if mode == "force_blocking":
        return await compute()
    if mode == "blocking":
        return cached(running) if fresh else await compute()
    if mode == "force_async":
        return miss(_start_job(state, insight, now))
    if mode == "async":
        if fresh:
            return cached(running)
        new_job = _start_job(state, insight, now)
        return cached(new_job) if last is not None else miss(new_job)
    if mode == "lazy_async":
        if last is None:
            return miss(_start_job(state, insight, now))
        return cached(running if lazily_fresh else _start_job(state, insight, now))
    # force_cache never calculates. The older handle_cache_and_async_logic answers a bare
    # CacheMissResponse (no status); newer versions attach the job's status while it runs, and
    # none once it is complete (a failed job is complete): a failure never shows here.
    if not state.config.force_cache_shows_running_job:
        return cached(None) if last is not None else miss(None)
    return cached(running) if last is not None else miss(running)


def _tiles(insight: Insight) -> list[dict[str, Any]]:
    return [
        {"id": insight.id * 10 + k, "dashboard_id": d, "deleted": None}
        for k, d in enumerate(insight.dashboard_ids)
    ]


def _base_json(state: State, insight: Insight, *, full: bool) -> dict[str, Any]:
    """The fields both serializers share. The newest answer ``query`` = the saved query or
    ``query_from_filters``, and then ``filters: {}``; older ones send the saved ``query``
    (null for an insight saved with legacy filters) and the filters (the full serializer
    defaults ``filters.insight`` to ``TRENDS`` when there is neither). ``tags`` are empty unless
    the key owner's organisation has paid tagging (``TaggedItemSerializerMixin``)."""
    user = insight.created_by
    query = insight.query()
    if state.config.insight_query_from_filters:
        query = insight.query_from_filters()
    filters = {} if query is not None else insight.filters()
    if full and query is None and "insight" not in filters:
        filters["insight"] = "TRENDS"
    return {
        "id": insight.id,
        "short_id": insight.short_id,
        "name": insight.name,
        "derived_name": insight.derived_name,
        "filters": filters,
        "query": query,
        "order": None,
        "deleted": False,
        "dashboards": insight.dashboard_ids,
        "dashboard_tiles": _tiles(insight),
        "description": insight.description,
        "created_at": iso_z(insight.created_at),
        "created_by": user,
        "updated_at": iso_z(insight.updated_at),
        "tags": insight.tags if state.config.tagging_licensed else [],
        "favorited": insight.favorited,
        "saved": insight.saved,
        "last_modified_at": iso_z(insight.updated_at),
        "last_modified_by": user,
        "last_viewed_at": None,
        "user_access_level": "editor",
    }


def basic_json(state: State, insight: Insight) -> dict[str, Any]:
    """``InsightBasicSerializer``: metadata only; ``last_refresh`` is the model's own column,
    which the query cache never writes (so it says nothing about the cached result)."""
    body = _base_json(state, insight, full=False)
    body["filters_hash"] = insight.cache_key
    moment = insight.model_last_refresh
    body["last_refresh"] = iso_z(moment) if moment is not None else None
    return body


async def insight_json(
    state: State, insight: Insight, mode: str, now: float, client_query_id: str | None = None
) -> dict[str, Any]:
    """The InsightSerializer shape, with the result fields computed under ``mode``."""
    body = _base_json(state, insight, full=True)
    body.update(await evaluate(state, insight, mode, now, client_query_id))
    table = insight.table()
    body.update(
        {
            "timezone": "UTC",
            "is_sample": False,
            "effective_restriction_level": 21,
            "effective_privilege_level": 37,
            "alerts": [],
            "resolved_date_range": {
                "date_from": f"{table.date(0)}T00:00:00Z",
                "date_to": f"{table.date(insight.points - 1)}T23:59:59Z",
            },
        }
    )
    return body


# ---- filters --------------------------------------------------------------------------------


def _truthy(text: str) -> bool:
    return text.lower() in ("true", "1", "yes", "on")


def _created_by_filter(raw: str) -> set[int] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    values = value if isinstance(value, list) else [value]
    return {int(v) for v in values if isinstance(v, int | str) and str(v).lstrip("-").isdigit()}


def _json_list(raw: str) -> set[str]:
    try:
        value = json.loads(raw)
    except ValueError:
        raise errors.server_error() from None  # json.loads raising in the view: a 500
    return {str(v) for v in value} if isinstance(value, list) else set()


def _matching(ctx: Ctx) -> list[int] | range:
    """Indexes of the project's insights that pass the list filters, in list order (by id)."""
    project = ctx.project
    q = ctx.query
    if "short_id" in q:
        found = ctx.state.seed.insight_by_short_id(q["short_id"])
        candidates: list[int] | range = (
            [found.index] if found is not None and found.project.id == project.id else []
        )
    else:
        candidates = range(project.n_insights)
    checks = []
    if "saved" in q:
        want = _truthy(q["saved"])
        checks.append(lambda i: Insight(project, i).saved == want)
    if "favorited" in q:
        want_fav = _truthy(q["favorited"])
        checks.append(lambda i: Insight(project, i).favorited == want_fav)
    if "created_by" in q:
        users = _created_by_filter(q["created_by"])
        if users is not None:
            checks.append(lambda i: Insight(project, i).created_by["id"] in users)
    if q.get("tags"):  # a JSON array, any of them; no licence check (``_filter_request``)
        wanted = _json_list(q["tags"])
        if wanted:
            checks.append(lambda i: bool(wanted.intersection(Insight(project, i).tags)))
    if q.get("search"):
        term = q["search"].lower()

        def search(i: int) -> bool:
            insight = Insight(project, i)
            texts = (insight.name or "", insight.derived_name, insight.description)
            return any(term in t.lower() for t in texts)

        checks.append(search)
    if not checks:
        return candidates
    return [i for i in candidates if all(check(i) for check in checks)]


# ---- ordering -------------------------------------------------------------------------------

#: Model fields ``?order=`` may name (Django ``order_by``), with each one's value per insight.
ORDER_FIELDS: dict[str, Callable[[Insight], Any]] = {
    "id": lambda i: i.id,
    "pk": lambda i: i.id,
    "short_id": lambda i: i.short_id,
    "name": lambda i: i.name,
    "derived_name": lambda i: i.derived_name,
    "description": lambda i: i.description,
    "created_at": lambda i: i.created_at,
    "updated_at": lambda i: i.updated_at,
    "last_modified_at": lambda i: i.updated_at,
    "last_refresh": lambda i: i.model_last_refresh,
    "order": lambda i: None,
    "deleted": lambda i: False,
    "saved": lambda i: i.saved,
    "favorited": lambda i: i.favorited,
    "created_by": lambda i: i.created_by["id"],
}
#: Fields whose value is the same for every seeded insight: ordering by them orders nothing.
_CONSTANT_FIELDS = ("order", "deleted", "?")
#: Above this many tied rows, a page's permutation is an affine map instead of a hash sort.
_HASH_SORT_MAX = 200_000


def _order_spec(ctx: Ctx) -> tuple[str, bool]:
    """``(field, descending)`` from ``?order=``; the default is the ``order`` column, as in
    ``order_queryset``. A name Django cannot resolve is a FieldError, i.e. a 500."""
    raw = ctx.query.get("order") or ""
    if not raw:
        return "order", False
    if raw == "?":
        return "?", False  # Django's random ordering
    descending = raw.startswith("-")
    name = raw[1:] if descending else raw
    if name not in ORDER_FIELDS:
        raise errors.server_error()
    return name, descending


def _ordered_page(
    ctx: Ctx, indexes: Sequence[int], order: tuple[str, bool], limit: int, offset: int
) -> list[int]:
    """The indexes of one page. Rows the ordering leaves tied come back in a per-query order
    (a hash of the id, limit, offset and seed), as a database plan for that LIMIT/OFFSET may
    return them: pages of one walk can overlap and skip rows. ``stable_default_order`` breaks
    ties by id instead."""
    field, descending = order
    n = len(indexes)
    if offset >= n:
        return []
    if field in ("id", "pk"):  # unique: no ties
        ordered = indexes[::-1] if descending else indexes
        return list(ordered[offset : offset + limit])
    project = ctx.project
    stable = ctx.state.config.stable_default_order and field != "?"
    seed = ctx.state.seed.seed

    def tie(i: int) -> int:
        return i if stable else mix(project.insight_base + i + 1, limit, offset, seed)

    if field in _CONSTANT_FIELDS:
        if stable:
            return list(indexes[offset : offset + limit])
        if n > _HASH_SORT_MAX:
            return _affine_page(indexes, limit, offset, seed)
        return heapq.nsmallest(offset + limit, indexes, key=tie)[offset:]
    value = ORDER_FIELDS[field]

    def primary(i: int) -> tuple[int, Any]:
        v = value(Insight(project, i))
        return (1, 0) if v is None else (0, v)  # NULLS LAST ascending, NULLS FIRST descending

    ordered = sorted(indexes, key=tie)
    ordered.sort(key=primary, reverse=descending)  # stable: ties keep the hash order
    return ordered[offset : offset + limit]


def _affine_page(indexes: Sequence[int], limit: int, offset: int, seed: int) -> list[int]:
    """Positions ``[offset, offset + limit)`` of a per-query permutation ``p -> a*p + b mod n``
    (cheap for millions of rows, where hashing every row per request would not be)."""
    n = len(indexes)
    a = mix(limit, offset, seed, 1) % n or 1
    while math.gcd(a, n) != 1:
        a = a % n + 1
    b = mix(limit, offset, seed, 2) % n
    return [indexes[(a * p + b) % n] for p in range(offset, min(n, offset + limit))]


# ---- CSV renderer ---------------------------------------------------------------------------


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list):
        for k, v in enumerate(value):
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def csv_response(data: dict[str, Any]) -> Response:
    """rest_framework_csv's rendering: the whole response as one flattened, sorted-key row."""
    flat: dict[str, Any] = {}
    _flatten(data, "", flat)
    header = sorted(flat)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerow(["" if flat[h] is None else flat[h] for h in header])
    return Response(buffer.getvalue(), media_type="text/csv; charset=utf-8")


def _render(ctx: Ctx, data: dict[str, Any]) -> Response:
    if ctx.query.get("format") == "csv" or "text/csv" in ctx.request.headers.get("accept", ""):
        return csv_response(data)
    return JSONResponse(data)


# ---- handlers -------------------------------------------------------------------------------


async def list_insights(ctx: Ctx) -> Response:
    basic = _truthy(ctx.query.get("basic", "false"))
    order = _order_spec(ctx)  # an unknown field fails before anything is read, like Django
    indexes = _matching(ctx)
    limit, offset = limit_offset(ctx.request)
    page = _ordered_page(ctx, indexes, order, limit, offset)
    project = ctx.project
    if basic:
        results = [basic_json(ctx.state, Insight(project, i)) for i in page]
    else:
        mode = parse_refresh(ctx)
        client_query_id = ctx.query.get("client_query_id")
        results = []
        for i in page:  # one after another, as the serializer computes them
            results.append(
                await insight_json(ctx.state, Insight(project, i), mode, ctx.now, client_query_id)
            )
    body = limit_offset_page(ctx.request, len(indexes), lambda _offset, _limit: results)
    return _render(ctx, body)


def find_insight(ctx: Ctx, raw: str) -> Insight:
    """By numeric primary key first, then by ``short_id``; only this project's insights."""
    seed = ctx.state.seed
    found = seed.insight_by_id(int(raw)) if raw.isdigit() else None
    if found is None:
        found = seed.insight_by_short_id(raw)
    if found is None or found.project.id != ctx.project.id:
        raise errors.not_found()
    return found


async def retrieve_insight(ctx: Ctx) -> Response:
    insight = find_insight(ctx, ctx.request.path_params["insight_id"])
    if _truthy(ctx.query.get("basic", "false")):
        return _render(ctx, basic_json(ctx.state, insight))
    client_query_id = ctx.query.get("client_query_id")
    body = await insight_json(ctx.state, insight, parse_refresh(ctx), ctx.now, client_query_id)
    return _render(ctx, body)


async def query_status(ctx: Ctx) -> Response:
    """202 while running, 200 complete, 400 failed with a message, 500 failed without one."""
    job = ctx.state.jobs.get(ctx.request.path_params["query_id"])
    if job is None or job.project_id != ctx.project.id:
        raise errors.not_found()
    now = ctx.now
    insight = ctx.state.seed.insight_by_id(job.insight_id)
    if insight is not None:
        settle(ctx.state, insight, now)
    status = job_status(ctx.state, job, now)
    if ctx.query.get("show_progress", "").lower() == "true":
        status["query_progress"] = {
            "bytes_read": 1_048_576,
            "rows_read": 10_000,
            "estimated_rows_total": 10_000,
            "time_elapsed": round(now - job.start, 3),
            "active_cpu_time": 1000,
        }
    if not status["complete"]:
        code = 202
    elif not status["error"]:
        code = 200
    else:
        code = 400 if status["error_message"] else 500
    return JSONResponse({"query_status": status}, status_code=code)

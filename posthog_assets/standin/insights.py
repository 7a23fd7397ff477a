"""Insights list/retrieve with PostHog's refresh modes, per-insight cache and async query jobs
(posthog-api.md §8, §11.17-20), plus ``GET /query/:id/`` polling.

Async jobs complete lazily: a job records when it will end, and whoever looks at it after that
moment (a poll, a list, a retrieve) settles it and warms the cache. No background tasks needed.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any

from starlette.responses import JSONResponse, Response

from . import errors
from .auth import Ctx
from .hashing import mix
from .pagination import limit_offset_page
from .seed import Insight, iso_z
from .state import CLIENT_REFRESH_S, QueryJob, State, thresholds

REFRESH_MODES = ("async", "blocking", "force_async", "force_blocking", "force_cache", "lazy_async")
CONCURRENCY_LIMIT_MESSAGE = "concurrency_limit_exceeded"


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
        "columns": None,
        "types": None,
        "query_status": None,
        "timings": [],
    }


def _hogql(insight: Insight) -> str:
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
        if job.outcome == "ok":
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


def evaluate(state: State, insight: Insight, mode: str, now: float) -> dict[str, Any]:
    """The result fields of one insight under ``mode`` (the table of posthog-api.md §8.4)."""
    job = settle(state, insight, now)
    running = job if job is not None and not job.complete(now) else None
    last = state.cache.get(insight)
    default_s, lazy_s = thresholds(insight.interval)
    fresh = last is not None and now <= last + default_s
    lazily_fresh = last is not None and now <= last + lazy_s

    def cached(status_job: QueryJob | None) -> dict[str, Any]:
        assert last is not None
        return {
            "result": insight.result(),
            "last_refresh": _iso(last),
            "cache_target_age": _iso(last + default_s),
            "next_allowed_client_refresh": _iso(last + CLIENT_REFRESH_S),
            "is_cached": True,
            "query_status": job_status(state, status_job, now) if status_job else None,
            "hogql": _hogql(insight),
        }

    def miss(status_job: QueryJob | None) -> dict[str, Any]:
        return {
            "result": None,
            "last_refresh": None,
            "cache_target_age": None,
            "next_allowed_client_refresh": None,
            "is_cached": False,
            "query_status": job_status(state, status_job, now) if status_job else None,
            "hogql": None,
        }

    def compute() -> dict[str, Any]:
        failure = _failure(state, insight)
        if failure is not None:
            kind, message = failure
            if kind == "error":
                raise errors.validation_error(message or "Query failed.")
            if kind == "crash":
                raise errors.server_error()
            body = miss(None)
            body["query_status"] = {
                "id": insight.cache_key,
                "team_id": insight.project.id,
                "insight_id": insight.id,
                "dashboard_id": None,
                "complete": True,
                "error": True,
                "error_message": message,
                "results": None,
                "query_async": False,
                "start_time": _iso(now),
                "end_time": _iso(now),
            }
            return body
        state.cache.put(insight, now)
        response = _query_response(insight, now, False)
        return {
            "result": response["results"],
            "last_refresh": response["last_refresh"],
            "cache_target_age": response["cache_target_age"],
            "next_allowed_client_refresh": response["next_allowed_client_refresh"],
            "is_cached": False,
            "query_status": None,
            "hogql": response["hogql"],
        }

    if mode == "force_blocking":
        return compute()
    if mode == "blocking":
        return cached(running) if fresh else compute()
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
    # force_cache: never calculates; a miss shows a running or failed job's status.
    if last is not None:
        return cached(running)
    failed = job if job is not None and job.complete(now) and job.outcome != "ok" else None
    return miss(running or failed)


def _tiles(insight: Insight) -> list[dict[str, Any]]:
    return [
        {"id": insight.id * 10 + k, "dashboard_id": d, "deleted": None}
        for k, d in enumerate(insight.dashboard_ids)
    ]


def insight_json(state: State, insight: Insight, mode: str | None, now: float) -> dict[str, Any]:
    """The InsightSerializer shape; ``mode=None`` is ``basic=true`` (metadata only)."""
    user = insight.created_by
    body: dict[str, Any] = {
        "id": insight.id,
        "short_id": insight.short_id,
        "name": insight.name,
        "derived_name": insight.derived_name,
        "filters": {},
        "query": insight.query(),
        "order": None,
        "deleted": False,
        "dashboards": insight.dashboard_ids,
        "dashboard_tiles": _tiles(insight),
        "description": insight.description,
        "created_at": iso_z(insight.created_at),
        "created_by": user,
        "updated_at": iso_z(insight.updated_at),
        "tags": insight.tags,
        "favorited": insight.favorited,
        "saved": insight.saved,
        "last_modified_at": iso_z(insight.updated_at),
        "last_modified_by": user,
        "last_viewed_at": None,
        "user_access_level": "editor",
        "filters_hash": insight.cache_key,
    }
    if mode is None:
        settle(state, insight, now)
        last = state.cache.get(insight)
        body["last_refresh"] = _iso(last)
        return body
    body.update(evaluate(state, insight, mode, now))
    body.update(
        {
            "hasMore": None,
            "columns": None,
            "types": None,
            "timezone": "UTC",
            "is_sample": False,
            "effective_restriction_level": 21,
            "effective_privilege_level": 37,
            "alerts": [],
            "resolved_date_range": {
                "date_from": f"{insight.table().date(0)}T00:00:00Z",
                "date_to": f"{insight.table().date(insight.points - 1)}T23:59:59Z",
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
    mode = None if basic else parse_refresh(ctx)
    indexes = _matching(ctx)
    now = ctx.now

    def fetch(offset: int, limit: int) -> list[dict[str, Any]]:
        page = indexes[offset : offset + limit]
        return [insight_json(ctx.state, Insight(ctx.project, i), mode, now) for i in page]

    return _render(ctx, limit_offset_page(ctx.request, len(indexes), fetch))


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
    basic = _truthy(ctx.query.get("basic", "false"))
    return _render(
        ctx, insight_json(ctx.state, insight, None if basic else parse_refresh(ctx), ctx.now)
    )


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

"""``POST /query/`` with an ``ExperimentQuery``: one metric of one experiment, answered with
PostHog's new-style ``ExperimentQueryResponse`` (``ExperimentQueryRunner``;
``frontend/src/queries/schema/schema-general.ts``).

The control variant is the ``baseline``; every other variant of the experiment's flag is in
``variant_results`` with the experiment's stats method (``stats_config.method``, bayesian by
default): ``chance_to_win`` + ``credible_interval`` or ``p_value`` + ``confidence_interval``,
each interval on the relative difference to control, and ``significant``. Counts and sums are
deterministic per (experiment, metric, variant); a mean metric counts events per exposed user,
a funnel metric converts (``sum`` = ``sum_squares`` = conversions). An experiment that never
started answers zero samples, null statistics and ``validation_failures:
["not-enough-exposures"]``, as PostHog's newer schema allows.

Modes, cache, concurrency slots and throttles are the HogQL endpoint's (``query_api``): blocking
answers from a result younger than ``hogql_cache_stale_s`` or computes in one of the
organisation's slots; ``async``/``lazy_async`` on a miss and ``force_async`` always answer 202
with a job that ``GET /query/:id/`` polls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import uuid as uuidlib
from typing import Any

from starlette.responses import JSONResponse, Response

from . import errors
from .auth import Ctx
from .catalog import experiment_status, flag_variants
from .catalog_seed import Row
from .query_api import (
    CLIENT_REFRESH_S,
    ConcurrencyLimitExceeded,
    _iso,
    acquire_slot,
    job_status,
    parse_mode,
    release_slot,
)
from .seed import Project
from .state import HogQLCacheEntry, HogQLJob, State

#: ``ExperimentQuery``'s fields (the model forbids any other).
QUERY_FIELDS = frozenset({"kind", "experiment_id", "metric", "name", "modifiers", "response",
                          "tags", "version"})  # fmt: skip
METRIC_TYPES = ("mean", "funnel", "ratio")
CACHE_TARGET_AGE_S = 6 * 3600
_Z95 = 1.959963984540054


def _h(*parts: Any) -> int:
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _r(value: float) -> float:
    return round(value, 6)


# ---- validation ---------------------------------------------------------------------------------


def _metric(query: dict[str, Any]) -> dict[str, Any]:
    metric = query.get("metric")
    if not isinstance(metric, dict):
        raise errors.validation_error("Field required: query.metric", attr="query")
    kind, metric_type = metric.get("kind"), metric.get("metric_type")
    if kind != "ExperimentMetric" or metric_type not in METRIC_TYPES:
        raise errors.validation_error(
            "Invalid metric: kind must be 'ExperimentMetric' and metric_type one of "
            f"{list(METRIC_TYPES)}",
            attr="query",
        )
    needs = {"mean": ("source",), "funnel": ("series",), "ratio": ("numerator", "denominator")}
    missing = [name for name in needs[metric_type] if not metric.get(name)]
    if missing:
        raise errors.validation_error(
            f"Field required: query.metric.{missing[0]} ({metric_type} metric)", attr="query"
        )
    return metric


def _experiment(state: State, project: Project, query: dict[str, Any]) -> Row:
    experiment_id = query.get("experiment_id")
    if isinstance(experiment_id, bool) or not isinstance(experiment_id, int):
        raise errors.validation_error("experiment_id is required for ExperimentQuery", attr="query")
    rows = state.catalog.project_rows("experiment", project.id)
    found = next((r for r in rows if r["id"] == experiment_id), None)
    if found is None:
        raise errors.validation_error(f"Experiment with id {experiment_id} does not exist")
    return found


def validate(state: State, project: Project, body: dict[str, Any]) -> tuple[Row, dict[str, Any]]:
    query = body["query"]
    unknown = sorted(set(query) - QUERY_FIELDS)
    if unknown:
        raise errors.validation_error(
            f"Extra inputs are not permitted: query.{unknown[0]}", attr="query"
        )
    metric = _metric(query)
    return _experiment(state, project, query), metric


# ---- the numbers --------------------------------------------------------------------------------


def _metric_identity(metric: dict[str, Any]) -> str:
    if isinstance(metric.get("uuid"), str):
        return metric["uuid"]
    return hashlib.md5(
        json.dumps(metric, sort_keys=True).encode(), usedforsecurity=False
    ).hexdigest()


def _is_sum(metric: dict[str, Any]) -> bool:
    source = metric.get("source") or metric.get("numerator") or {}
    return isinstance(source, dict) and source.get("math") == "sum"


def arm_stats(
    experiment_id: int, metric: dict[str, Any], key: str, control: bool
) -> dict[str, Any]:
    """``key``'s exposures, sum and sum of squares (plus the denominator's for a ratio)."""
    ident = _metric_identity(metric)
    base, own = _h(experiment_id, ident), _h(experiment_id, ident, key)
    n = 600 + own % 1400
    effect = 0.0 if control else ((own >> 12) % 30 - 9) / 100 or 0.21  # -9% .. +21%, never 0
    out: dict[str, Any] = {"key": key, "number_of_samples": n}
    if metric["metric_type"] == "funnel":
        p = min(0.95, (0.05 + base % 25 / 100) * (1 + effect))
        conversions = float(round(n * p))
        return {**out, "sum": conversions, "sum_squares": conversions}
    if _is_sum(metric):  # revenue-like: a large mean, a wide spread
        mean = (20 + base % 40) * (1 + effect)
        variance = (mean * (1 + (own >> 20) % 50 / 100)) ** 2
    else:  # a count per user: overdispersed around its mean
        mean = (0.8 + base % 200 / 100) * (1 + effect)
        variance = mean * (1.2 + (own >> 20) % 100 / 50)
    out["sum"] = _r(n * mean)
    out["sum_squares"] = _r(n * (variance + mean * mean))
    if metric["metric_type"] == "ratio":
        per_user = 1 + base % 3
        out["denominator_sum"] = float(n * per_user)
        out["denominator_sum_squares"] = float(n * per_user * per_user)
        out["numerator_denominator_sum_product"] = _r(n * mean * per_user)
    return out


def _moments(arm: dict[str, Any]) -> tuple[float, float]:
    n = arm["number_of_samples"]
    if arm.get("denominator_sum"):
        mean = arm["sum"] / arm["denominator_sum"]
        return mean, max(arm["sum_squares"] / n - (arm["sum"] / n) ** 2, 1e-12) / (
            arm["denominator_sum"] / n
        ) ** 2
    mean = arm["sum"] / n
    return mean, max(arm["sum_squares"] / n - mean * mean, 1e-12)


def variant_result(baseline: dict[str, Any], arm: dict[str, Any], method: str) -> dict[str, Any]:
    """The test arm with its statistics against ``baseline`` under ``method``."""
    mean_c, var_c = _moments(baseline)
    mean_v, var_v = _moments(arm)
    result = {**arm, "method": method, "validation_failures": None}
    if mean_c == 0:
        result["validation_failures"] = ["baseline-mean-is-zero"]
        nulls = ("chance_to_win", "credible_interval") if method == "bayesian" else (
            "p_value", "confidence_interval")  # fmt: skip
        return {**result, **dict.fromkeys(nulls), "significant": None}
    se = math.sqrt(var_c / baseline["number_of_samples"] + var_v / arm["number_of_samples"])
    diff = mean_v - mean_c
    z = diff / se if se > 0 else 0.0
    interval = [_r((diff - _Z95 * se) / mean_c), _r((diff + _Z95 * se) / mean_c)]
    if method == "frequentist":
        p_value = 2 * (1 - _phi(abs(z)))
        result.update(p_value=_r(p_value), confidence_interval=interval, significant=p_value < 0.05)
    else:
        excludes_zero = interval[0] > 0 or interval[1] < 0
        result.update(chance_to_win=_r(_phi(z)), credible_interval=interval,
                      significant=excludes_zero)  # fmt: skip
    return result


def _not_started(key: str, method: str | None) -> dict[str, Any]:
    arm: dict[str, Any] = {"key": key, "number_of_samples": 0, "sum": 0.0, "sum_squares": 0.0,
                           "validation_failures": ["not-enough-exposures"]}  # fmt: skip
    if method == "bayesian":
        arm.update(method=method, chance_to_win=None, credible_interval=None, significant=None)
    elif method == "frequentist":
        arm.update(method=method, p_value=None, confidence_interval=None, significant=None)
    return arm


def variant_keys(state: State, experiment: Row) -> list[str]:
    flag = state.catalog.find("feature_flag", experiment["_flag"])
    keys = [v["key"] for v in flag_variants(flag)] if flag is not None else []
    keys = keys or ["control", "test"]
    return ["control", *[k for k in keys if k != "control"]]


def experiment_result(
    state: State, experiment: Row, metric: dict[str, Any], cache_key: str, at: float
) -> dict[str, Any]:
    """The full ``ExperimentQueryResponse`` (with the cache fields) computed at ``at``."""
    method = (experiment.get("stats_config") or {}).get("method") or "bayesian"
    keys = variant_keys(state, experiment)
    if experiment_status(experiment) == "draft":
        baseline = _not_started(keys[0], None)
        variants = [_not_started(k, method) for k in keys[1:]]
    else:
        control = arm_stats(experiment["id"], metric, keys[0], True)
        baseline = {**control, "validation_failures": None}
        variants = [
            variant_result(control, arm_stats(experiment["id"], metric, k, False), method)
            for k in keys[1:]
        ]
    return {
        "kind": "ExperimentQuery",
        "baseline": baseline,
        "variant_results": variants,
        "breakdown_results": None,
        "metric": metric,
        "insight": None,
        "variants": None,
        "probability": None,
        "significant": None,
        "significance_code": None,
        "stats_version": None,
        "p_value": None,
        "credible_intervals": None,
        "hogql": None,
        "clickhouse_sql": None,
        "is_precomputed": False,
        "cache_key": cache_key,
        "cache_target_age": _iso(at + CACHE_TARGET_AGE_S),
        "calculation_trigger": None,
        "is_cached": False,
        "last_refresh": _iso(at),
        "next_allowed_client_refresh": _iso(at + CLIENT_REFRESH_S),
        "query_status": None,
        "timezone": "UTC",
    }


# ---- serving ------------------------------------------------------------------------------------


def cache_key(project: Project, query: dict[str, Any]) -> str:
    payload = json.dumps({"query": query, "team_id": project.id}, sort_keys=True)
    return "cache_" + hashlib.md5(payload.encode(), usedforsecurity=False).hexdigest()


async def compute(
    state: State, project: Project, experiment: Row, metric: dict[str, Any], key: str, qid: str
) -> dict[str, Any]:
    """In one of the organisation's slots, like a HogQL query; the result is cached."""
    org = await acquire_slot(state, project, qid)
    try:
        if state.config.query_latency_s > 0:
            await asyncio.sleep(state.config.query_latency_s)
    finally:
        release_slot(state, org)
    at = state.now()
    body = experiment_result(state, experiment, metric, key, at)
    state.hogql_cache[(project.id, key)] = HogQLCacheEntry(body, at)
    return body


def _start_job(
    state: State, project: Project, experiment: Row, metric: dict[str, Any], key: str, qid: str,
    entry: dict[str, Any],
) -> HogQLJob:  # fmt: skip
    old = state.hogql_jobs.get(qid)
    if old is not None and old.task is not None and not old.task.done():
        old.task.cancel()
    job = HogQLJob(id=qid, project_id=project.id, query=entry["query"],
                   task_id=str(uuidlib.uuid4()), start=state.now())  # fmt: skip

    async def run() -> None:
        await asyncio.sleep(0)
        job.pickup = state.now()
        try:
            job.results = await compute(state, project, experiment, metric, key, qid)
            entry["job_outcome"] = "ok"
        except ConcurrencyLimitExceeded:
            job.error, entry["job_outcome"] = True, "concurrency"
        except asyncio.CancelledError:
            entry["job_outcome"] = "cancelled"
            raise
        job.complete, job.end = True, state.now()

    state.hogql_jobs[qid] = job
    job.task = asyncio.get_running_loop().create_task(run())
    return job


def _log(ctx: Ctx, query: dict[str, Any], mode: str, qid: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "ts": ctx.state.now(), "project_id": ctx.project.id, "kind": "ExperimentQuery",
        "query": json.dumps(query, sort_keys=True), "refresh": mode, "query_id": qid,
        "client_query_id": ctx.body.get("client_query_id"), "offset_seen": False, "limit": None,
        "paginated": None, "capped": None, "status": None, "outcome": None, "rows": None,
        "is_cached": None, "error": None,
    }  # fmt: skip
    ctx.state.query_log.append(entry)
    return entry


def _answer(entry: dict[str, Any], body: dict[str, Any], outcome: str) -> Response:
    status = body.get("query_status")
    code = 202 if status and status.get("complete") is False else 200
    entry.update(status=code, outcome=outcome, is_cached=body.get("is_cached"))
    return JSONResponse(body, status_code=code)


async def create(ctx: Ctx) -> Response:
    """``POST /query/`` for ``{"query": {"kind": "ExperimentQuery", ...}}``."""
    state, project, body = ctx.state, ctx.project, ctx.body
    experiment, metric = validate(state, project, body)
    mode = parse_mode(body)
    raw_id = body.get("client_query_id")
    qid = raw_id if isinstance(raw_id, str) and raw_id else uuidlib.uuid4().hex
    entry = _log(ctx, body["query"], mode, qid)
    key = cache_key(project, body["query"])
    if mode == "force_async":
        job = _start_job(state, project, experiment, metric, key, qid, entry)
        return _answer(entry, {"cache_key": key, "query_status": job_status(job)}, "async")
    cached = state.hogql_cache.get((project.id, key)) if mode != "force_blocking" else None
    if cached is not None:
        fresh = state.now() - cached.last_refresh <= state.config.hogql_cache_stale_s
        status = None
        if not fresh and mode in ("async", "lazy_async", "async_except_on_cache_miss"):
            job = _start_job(state, project, experiment, metric, key, qid, entry)
            status = job_status(job)
        if fresh or status is not None:
            served = {**cached.body, "is_cached": True, "query_status": status}
            return _answer(entry, served, "cached" if status is None else "cached+async")
    elif mode in ("async", "lazy_async"):
        job = _start_job(state, project, experiment, metric, key, qid, entry)
        return _answer(entry, {"cache_key": key, "query_status": job_status(job)}, "async")
    try:
        result = await compute(state, project, experiment, metric, key, qid)
    except ConcurrencyLimitExceeded as exc:
        entry.update(status=429, outcome="concurrency", error=str(exc))
        raise errors.ApiError(429, "throttled_error", "throttled", str(exc)) from None
    return _answer(entry, result, "computed")

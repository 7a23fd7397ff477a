"""The project catalog's routes: annotations, cohorts, feature flags, actions and experiments
(``AnnotationsViewSet``, ``CohortViewSet``, ``FeatureFlagViewSet``, ``ActionViewSet``,
``EnterpriseExperimentsViewSet``), list and retrieve, over the rows of ``catalog_seed``.

What each list does, as PostHog does it:

- annotations: limit/offset with ``default_limit`` 1000; ``-date_marker`` only (``?order=`` is
  ignored); ``?search=`` on content, ``?scope=`` (``insight`` = ``dashboard_item``); deleted
  ones are hidden from list and retrieve.
- cohorts: limit/offset (100); ``-created_at`` only; deleted ones hidden from the list, but
  ``GET cohorts/:id/`` still answers a deleted cohort.
- feature flags: limit/offset (100); ``-created_at`` unless ``?order=`` names a model field
  (``-`` for descending), passed to ``order_by`` as it is: an unknown field is a 500;
  ``?search=``, ``?active=``, ``?type=``; deleted ones hidden from the list only.
- actions: NOT paginated, ``{"results": [...]}`` with every live action, ordered
  ``-last_calculated_at, name``.
- experiments: limit/offset (100); ``-created_at`` unless ``?order=`` is on the allowlist
  (else 400 ``Invalid order field``); archived ones are hidden unless ``?archived=``;
  ``?status=``, ``?search=``; deleted ones hidden from list and retrieve.

Rows the ordering leaves tied come back in an order drawn afresh for every request (a hash of
the id, a per-request counter and the seed), as a database may return them: pages of one walk
can overlap and skip rows. The ``stable_default_order`` config breaks ties by id instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from starlette.responses import JSONResponse, Response

from . import errors
from .auth import Ctx
from .catalog_seed import Row
from .hashing import mix
from .pagination import limit_offset_page
from .state import State

ANNOTATION_FIELDS = ("id", "content", "date_marker", "creation_type", "dashboard_item",
                     "dashboard_id", "dashboard_name", "insight_short_id", "insight_name",
                     "insight_derived_name", "created_by", "created_at", "updated_at", "deleted",
                     "scope", "emoji", "hidden_in_user_interface", "tags")  # fmt: skip
COHORT_FIELDS = ("id", "name", "description", "groups", "deleted", "filters", "query",
                 "is_calculating", "created_by", "created_at", "last_calculation",
                 "errors_calculating", "count", "is_static", "cohort_type",
                 "experiment_set")  # fmt: skip
#: ``FeatureFlagSerializer`` less its write-only fields (``creation_context``,
#: ``_create_in_folder``, ``_should_create_usage_dashboard``); ``evaluation_tags`` is added by
#: ``EvaluationTagSerializerMixin.to_representation``.
FLAG_FIELDS = ("id", "name", "key", "filters", "deleted", "active", "created_by", "created_at",
               "updated_at", "version", "last_modified_by", "is_simple_flag",
               "rollout_percentage", "ensure_experience_continuity", "experiment_set", "surveys",
               "features", "rollback_conditions", "performed_rollback", "can_edit", "tags",
               "usage_dashboard", "analytics_dashboards", "has_enriched_analytics",
               "user_access_level", "is_remote_configuration", "has_encrypted_payloads",
               "status", "evaluation_runtime", "evaluation_tags")  # fmt: skip
ACTION_FIELDS = ("id", "name", "description", "tags", "post_to_slack", "slack_message_format",
                 "steps", "created_at", "created_by", "deleted", "is_calculating",
                 "last_calculated_at", "team_id", "is_action", "bytecode_error", "pinned_at",
                 "creation_context", "user_access_level")  # fmt: skip
EXPERIMENT_FIELDS = ("id", "name", "description", "start_date", "end_date", "feature_flag_key",
                     "feature_flag", "holdout", "exposure_cohort", "parameters",
                     "secondary_metrics", "saved_metrics", "filters", "archived", "deleted",
                     "created_by", "created_at", "updated_at", "type", "exposure_criteria",
                     "metrics", "metrics_secondary", "stats_config", "conclusion",
                     "conclusion_comment", "primary_metrics_ordered_uuids",
                     "secondary_metrics_ordered_uuids", "user_access_level",
                     "status")  # fmt: skip
MINIMAL_FLAG_FIELDS = ("id", "team_id", "name", "key", "filters", "deleted", "active",
                       "ensure_experience_continuity", "has_encrypted_payloads", "version",
                       "evaluation_runtime", "evaluation_tags")  # fmt: skip
ANNOTATIONS_DEFAULT_LIMIT = 1000
#: ``ExperimentService.EXPERIMENT_ORDER_ALLOWLIST`` (the newest also takes ``created_by``).
EXPERIMENT_ORDERS = ("created_at", "created_by", "updated_at", "name", "start_date", "end_date",
                     "duration", "status")  # fmt: skip
_ANNOTATION_SCOPES = ("dashboard_item", "dashboard", "project", "organization", "recording")


# ---- serializers --------------------------------------------------------------------------------


def _tags(state: State, row: Row) -> list[str]:
    """Empty unless the organisation has paid tagging (``TaggedItemSerializerMixin``)."""
    return list(row.get("tags") or []) if state.config.tagging_licensed else []


def _pick(body: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    return {name: body.get(name) for name in fields}


def annotation_json(state: State, row: Row) -> dict[str, Any]:
    insight = state.seed.insight_by_id(row["dashboard_item"]) if row["dashboard_item"] else None
    board = state.seed.dashboard_by_id(row["dashboard_id"]) if row["dashboard_id"] else None
    body = {
        **row,
        "dashboard_name": board.name if board else None,
        "insight_short_id": insight.short_id if insight else None,
        "insight_name": insight.name if insight else None,
        "insight_derived_name": insight.derived_name if insight else None,
        "tags": _tags(state, row),
    }
    return _pick(body, ANNOTATION_FIELDS)


def cohort_json(state: State, row: Row) -> dict[str, Any]:
    return _pick(row, COHORT_FIELDS)


def is_simple_flag(row: Row) -> bool:
    """``get_is_simple_flag``: one condition, no properties, not group-based."""
    groups = row["filters"].get("groups") or []
    no_properties = all(len(g.get("properties") or []) == 0 for g in groups)
    grouped = row["filters"].get("aggregation_group_type_index") is not None
    return len(groups) == 1 and no_properties and not grouped


def flag_variants(row: Row) -> list[dict[str, Any]]:
    return list((row["filters"].get("multivariate") or {}).get("variants") or [])


def _flag_status(row: Row) -> str:
    """``FeatureFlagStatusChecker``: deleted, fully rolled out boolean (stale), else active."""
    if row["deleted"]:
        return "DELETED"
    groups = row["filters"].get("groups") or []
    simple_boolean = row["active"] and is_simple_flag(row) and not flag_variants(row)
    if simple_boolean and groups[0].get("rollout_percentage") == 100:
        return "STALE"
    return "ACTIVE"


def flag_json(state: State, row: Row) -> dict[str, Any]:
    simple = is_simple_flag(row)
    experiments = state.catalog.project_rows("experiment", row["_project"])
    body = {
        **row,
        "is_simple_flag": simple,
        "rollout_percentage": row["filters"]["groups"][0].get("rollout_percentage")
        if simple
        else None,
        "experiment_set": [e["id"] for e in experiments if e["_flag"] == row["id"]],
        "status": _flag_status(row),
        "tags": _tags(state, row),
    }
    return _pick(body, FLAG_FIELDS)


def minimal_flag_json(row: Row) -> dict[str, Any]:
    return _pick({**row, "team_id": row["_project"]}, MINIMAL_FLAG_FIELDS)


def action_json(state: State, row: Row) -> dict[str, Any]:
    return _pick({**row, "tags": _tags(state, row)}, ACTION_FIELDS)


def experiment_status(row: Row) -> str:
    """``status_label``: draft until launched, stopped once ended, running in between."""
    if row["start_date"] is None:
        return "draft"
    return "stopped" if row["end_date"] is not None else "running"


def experiment_json(state: State, row: Row) -> dict[str, Any]:
    """``ExperimentSerializer``: the linked flag as ``MinimalFeatureFlag``, and ``parameters``
    projected from the flag's variants (the flag is their source of truth)."""
    flag = state.catalog.find("feature_flag", row["_flag"])
    parameters: dict[str, Any] = {}
    if flag is not None:
        parameters["feature_flag_variants"] = [
            {"key": v["key"], "rollout_percentage": v["rollout_percentage"]}
            for v in flag_variants(flag)
        ]
    body = {
        **row,
        "feature_flag": minimal_flag_json(flag) if flag is not None else None,
        "parameters": parameters,
        "status": experiment_status(row),
    }
    return _pick(body, EXPERIMENT_FIELDS)


#: What the newest ``ExperimentBasicSerializer`` (the list's) leaves out.
_METRIC_FIELDS = ("metrics", "metrics_secondary", "saved_metrics", "secondary_metrics")


def basic_experiment_json(state: State, row: Row) -> dict[str, Any]:
    full = experiment_json(state, row)
    return {k: v for k, v in full.items() if k not in _METRIC_FIELDS}


# ---- ordering -----------------------------------------------------------------------------------

SortKey = tuple[Callable[[Row], Any], bool]


def tie_breaker(ctx: Ctx) -> Callable[[Row], int]:
    """Rows tied on every ordering column: a fresh order per request (or by id when the config
    asks for a stable default order)."""
    state = ctx.state
    if state.config.stable_default_order:
        return lambda row: row["id"]
    state.catalog_requests += 1
    salt = state.catalog_requests
    return lambda row: mix(row["id"], salt, state.seed.seed, 77)


def order_rows(rows: list[Row], keys: Sequence[SortKey], tie: Callable[[Row], int]) -> list[Row]:
    """Sort as PostgreSQL does: NULLs last ascending, first descending."""
    out = sorted(rows, key=tie)
    for value, descending in reversed(keys):
        out.sort(key=lambda row, v=value: (1, 0) if v(row) is None else (0, v(row)),
                 reverse=descending)  # fmt: skip
    return out


def _field(name: str) -> Callable[[Row], Any]:
    return lambda row: row.get(name)


def _user_id(name: str) -> Callable[[Row], Any]:
    return lambda row: (row.get(name) or {}).get("id")


#: ``FeatureFlag`` model fields ``?order=`` may name.
FLAG_ORDER_FIELDS: dict[str, Callable[[Row], Any]] = {
    **{name: _field(name) for name in ("id", "key", "name", "created_at", "updated_at", "active",
                                       "deleted", "version", "ensure_experience_continuity",
                                       "evaluation_runtime", "is_remote_configuration",
                                       "has_encrypted_payloads", "performed_rollback",
                                       "has_enriched_analytics", "usage_dashboard")},
    "pk": _field("id"),
    "created_by": _user_id("created_by"),
    "created_by_id": _user_id("created_by"),
    "last_modified_by": _user_id("last_modified_by"),
    "last_modified_by_id": _user_id("last_modified_by"),
    "rollout_percentage": lambda row: None,  # the legacy column, null on every flag
    "team": _field("_project"),
    "team_id": _field("_project"),
}  # fmt: skip


def _raw_order(ctx: Ctx, fields: dict[str, Callable[[Row], Any]]) -> list[SortKey] | None:
    """``queryset.order_by(order)`` with the raw parameter: ``None`` without one; a name the
    model does not have is a ``FieldError``, i.e. a 500; ``?`` is random (ties only)."""
    raw = ctx.query.get("order") or ""
    if not raw:
        return None
    if raw == "?":
        return []
    descending = raw.startswith("-")
    name = raw[1:] if descending else raw
    if name not in fields:
        raise errors.server_error()
    return [(fields[name], descending)]


def _when(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))


def _experiment_order(ctx: Ctx) -> list[SortKey]:
    raw = ctx.query.get("order") or ""
    if not raw:
        return [(_field("created_at"), True)]
    descending = raw.startswith("-")
    name = raw[1:] if descending else raw
    if name not in EXPERIMENT_ORDERS:
        raise errors.validation_error(f"Invalid order field: '{raw}'")
    now = datetime.fromtimestamp(ctx.now, UTC)

    def duration(row: Row) -> float | None:
        start = _when(row["start_date"])
        if start is None:
            return None
        return ((_when(row["end_date"]) or now) - start).total_seconds()

    values: dict[str, Callable[[Row], Any]] = {
        "duration": duration,
        "status": lambda row: 0 if row["start_date"] is None else 1 if not row["end_date"] else 2,
        "created_by": _user_id("created_by"),
    }
    return [(values.get(name) or _field(name), descending)]


# ---- handlers -----------------------------------------------------------------------------------


def _rows(ctx: Ctx, kind: str) -> list[Row]:
    return ctx.state.catalog.project_rows(kind, ctx.project.id)


def _find(ctx: Ctx, kind: str, param: str, *, deleted_ok: bool) -> Row:
    raw = ctx.request.path_params[param]
    found = next((r for r in _rows(ctx, kind) if str(r["id"]) == raw), None)
    if found is None or (found["deleted"] and not deleted_ok):
        raise errors.not_found()
    return found


def _page(
    ctx: Ctx,
    rows: list[Row],
    serialize: Callable[[State, Row], dict[str, Any]],
    default_limit: int = 100,
) -> Response:
    page = limit_offset_page(
        ctx.request,
        len(rows),
        lambda offset, limit: [serialize(ctx.state, r) for r in rows[offset : offset + limit]],
        default_limit,
    )
    return JSONResponse(page)


def _live(ctx: Ctx, kind: str) -> list[Row]:
    return [r for r in _rows(ctx, kind) if not r["deleted"]]


async def list_annotations(ctx: Ctx) -> Response:
    rows = _live(ctx, "annotation")
    scope = ctx.query.get("scope")
    if scope:
        scope = "dashboard_item" if scope == "insight" else scope
        if scope not in _ANNOTATION_SCOPES:
            raise errors.validation_error(f"Invalid scope: {scope}", attr="scope")
        rows = [r for r in rows if r["scope"] == scope]
    search = (ctx.query.get("search") or "").lower()
    if search:
        rows = [r for r in rows if search in (r["content"] or "").lower()]
    ordered = order_rows(rows, [(_field("date_marker"), True)], tie_breaker(ctx))
    return _page(ctx, ordered, annotation_json, ANNOTATIONS_DEFAULT_LIMIT)


async def retrieve_annotation(ctx: Ctx) -> Response:
    row = _find(ctx, "annotation", "annotation_id", deleted_ok=False)
    return JSONResponse(annotation_json(ctx.state, row))


async def list_cohorts(ctx: Ctx) -> Response:
    ordered = order_rows(_live(ctx, "cohort"), [(_field("created_at"), True)], tie_breaker(ctx))
    return _page(ctx, ordered, cohort_json)


async def retrieve_cohort(ctx: Ctx) -> Response:
    row = _find(ctx, "cohort", "cohort_id", deleted_ok=True)
    return JSONResponse(cohort_json(ctx.state, row))


async def list_feature_flags(ctx: Ctx) -> Response:
    order = _raw_order(ctx, FLAG_ORDER_FIELDS)  # an unknown field fails like Django's, first
    rows = _live(ctx, "feature_flag")
    q = ctx.query
    if q.get("search"):
        term = q["search"].lower()
        rows = [r for r in rows if term in r["key"].lower() or term in (r["name"] or "").lower()]
    if q.get("active") in ("true", "false"):
        rows = [r for r in rows if r["active"] == (q["active"] == "true")]
    if q.get("type") in ("boolean", "multivariant", "experiment"):
        linked = {e["_flag"] for e in _rows(ctx, "experiment") if not e["deleted"]}

        def kind(row: Row) -> str:
            if row["id"] in linked:
                return "experiment"
            return "multivariant" if flag_variants(row) else "boolean"

        rows = [r for r in rows if kind(r) == q["type"]]
    keys = order if order is not None else [(_field("created_at"), True)]
    ordered = order_rows(rows, keys, tie_breaker(ctx))
    return _page(ctx, ordered, flag_json)


async def retrieve_feature_flag(ctx: Ctx) -> Response:
    row = _find(ctx, "feature_flag", "feature_flag_id", deleted_ok=True)
    return JSONResponse(flag_json(ctx.state, row))


async def list_actions(ctx: Ctx) -> Response:
    """``ActionViewSet.list`` (":HACKY:" override): every live action, no pagination."""
    keys = [(_field("last_calculated_at"), True), (_field("name"), False)]
    ordered = order_rows(_live(ctx, "action"), keys, tie_breaker(ctx))
    return JSONResponse({"results": [action_json(ctx.state, r) for r in ordered]})


async def retrieve_action(ctx: Ctx) -> Response:
    row = _find(ctx, "action", "action_id", deleted_ok=True)
    return JSONResponse(action_json(ctx.state, row))


async def list_experiments(ctx: Ctx) -> Response:
    q = ctx.query
    rows = _live(ctx, "experiment")
    status = (q.get("status") or "").lower()
    status = "stopped" if status == "complete" else status
    if status in ("draft", "running", "stopped"):
        rows = [r for r in rows if experiment_status(r) == status]
    archived = q.get("archived")
    want_archived = archived is not None and archived.lower() == "true"
    rows = [r for r in rows if bool(r["archived"]) == want_archived]
    if q.get("search"):
        rows = [r for r in rows if q["search"].lower() in r["name"].lower()]
    ordered = order_rows(rows, _experiment_order(ctx), tie_breaker(ctx))
    if ctx.state.config.experiments_list_metrics:
        return _page(ctx, ordered, experiment_json)
    return _page(ctx, ordered, basic_experiment_json)


async def retrieve_experiment(ctx: Ctx) -> Response:
    row = _find(ctx, "experiment", "experiment_id", deleted_ok=False)
    return JSONResponse(experiment_json(ctx.state, row))

"""The control plane under ``/_standin/`` (not PostHog): tests and benches reshape the stand-in's
behaviour here. JSON in and out; a bad request answers 400 ``{"error": "..."}``.

It can add a full-scope key and shows the stand-in's own, so :class:`ControlGate` lets through only
requests that carry the token printed at start-up, name a loopback host (or ``--host``) and send
JSON. A web page cannot know the token, cannot send that header or a JSON body without a CORS
preflight (never granted here), and cannot reach the plane under a rebound DNS name.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .catalog import experiment_status, flag_variants
from .catalog_seed import KINDS, Catalog, add_row
from .events_db import EventStore
from .group_seed import group_index
from .seed import INSIGHT_KIND_RULES, Insight, Project, iso_z
from .server import CONTROL_TOKEN_HEADER
from .state import CACHE_STATES, KeyInfo, State

Handler = Callable[[Request], Awaitable[Response]]
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_TOKEN_HEADER = CONTROL_TOKEN_HEADER.lower().encode("latin-1")
_TOKEN_HINT = "send the control_token the stand-in printed on its ready line at start-up"


def host_name(header: str) -> str:
    """The name in a ``Host`` header without its port (``[::1]:80`` → ``::1``); ``""`` if the
    header is malformed, so it matches no allowed name."""
    header = header.strip().lower()
    if header.startswith("["):
        name, _, rest = header[1:].partition("]")
        return name if rest == "" or (rest[:1] == ":" and rest[1:].isdigit()) else ""
    name, colon, port = header.rpartition(":")
    if not colon:
        return header
    return name if port.isdigit() and ":" not in name else ""


@dataclass(frozen=True)
class ControlAccess:
    """What a control request must show: the start-up token and a host we answer to."""

    token: str
    host: str = "127.0.0.1"

    @property
    def hosts(self) -> frozenset[str]:
        return LOOPBACK_HOSTS | {self.host.strip("[]").lower()}

    def refusal(self, method: str, headers: dict[bytes, bytes]) -> Response | None:
        """Why this request may not use the control plane (403/415), or ``None`` if it may."""
        host = headers.get(b"host", b"").decode("latin-1")
        if host_name(host) not in self.hosts:
            allowed = ", ".join(sorted(self.hosts))
            return _refuse(403, f"Host {host!r} is not served here; use one of: {allowed}")
        sent = headers.get(_TOKEN_HEADER)
        if sent is None or not hmac.compare_digest(sent, self.token.encode()):
            problem = "missing" if sent is None else "wrong"
            return _refuse(403, f"{problem} {CONTROL_TOKEN_HEADER} header: {_TOKEN_HINT}")
        media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if method in _WRITE_METHODS and media != "application/json":
            return _refuse(415, f"JSON only: send Content-Type: application/json, not {media!r}")
        return None


def _refuse(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


class ControlGate:
    """In front of the whole listener: ``/_standin`` requests pass only if :class:`ControlAccess`
    allows them; PostHog's routes pass untouched (their own auth is PostHog's)."""

    def __init__(self, app: ASGIApp, access: ControlAccess) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/_standin"):
            refusal = self.access.refusal(scope["method"], dict(scope.get("headers", [])))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ControlError(Exception):
    """A malformed control request (answered with 400)."""


async def _json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ControlError(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ControlError("body must be a JSON object")
    return data


def _guard(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except (ControlError, ValueError, TypeError, KeyError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    return wrapped


def control_routes(state: State) -> list[Route]:
    seed = state.seed

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    async def config(request: Request) -> Response:
        if request.method == "POST":
            state.configure(await _json(request))
        body = state.config.to_json()
        body["export_fail_next"] = {"count": state.fail_next[0], "exception": state.fail_next[1]}
        return JSONResponse(body)

    async def faults(request: Request) -> Response:
        if request.method == "POST":
            rule = state.faults.add(await _json(request))
            return JSONResponse(rule.to_json(), status_code=201)
        if request.method == "DELETE":
            state.faults.clear()
        return JSONResponse([rule.to_json() for rule in state.faults.rules])

    async def requests_log(request: Request) -> Response:
        if request.method == "DELETE":
            state.log.clear()
            state.log_since = state.now()
            return JSONResponse([])
        return JSONResponse(list(state.log))

    async def keys(request: Request) -> Response:
        data = await _json(request)
        key = data.get("key")
        if not isinstance(key, str) or not key:
            raise ControlError("'key' must be a non-empty string")
        projects = data.get("projects")
        members = data.get("user_projects")
        state.keys[key] = KeyInfo(
            key=key,
            scopes=tuple(data.get("scopes") or ()),
            projects=None if projects is None else frozenset(int(p) for p in projects),
            current_project=int(data.get("current_project") or seed.main.id),
            user_id=int(data.get("user_id") or 1),
            user_projects=None if members is None else frozenset(int(p) for p in members),
        )
        return JSONResponse({"key": key, "scopes": list(state.keys[key].scopes)}, status_code=201)

    def _export(request: Request) -> Any:
        rec = state.exports.get(int(request.path_params["export_id"]))
        if rec is None:
            raise ControlError(f"no export {request.path_params['export_id']}")
        return rec

    async def expire_export(request: Request) -> Response:
        rec = _export(request)
        rec.expires_after = datetime.now(UTC) - timedelta(seconds=1)
        return JSONResponse({"id": rec.id, "expired": True})

    async def lose_content(request: Request) -> Response:
        rec = _export(request)
        rec.content_lost = True
        return JSONResponse({"id": rec.id, "content_lost": True})

    async def remove_group(request: Request) -> Response:
        project = seed.projects.get(int(request.query_params.get("project_id", seed.main.id)))
        if project is None:
            raise ControlError("unknown project_id")
        type_index = int(request.path_params["type_index"])
        key = request.path_params["group_key"]
        j = group_index(project, type_index, key)
        if j is None:
            return JSONResponse(
                {"error": f"no group {key!r} of type {type_index}"}, status_code=404
            )
        state.removed_groups.setdefault((project.id, type_index), set()).add(j)
        return JSONResponse({"removed": key, "group_type_index": type_index})

    def _cache_state(data: dict[str, Any]) -> str:
        value = data.get("state")
        if value not in CACHE_STATES:
            raise ControlError(f"state must be one of {CACHE_STATES}")
        return value

    async def insight_cache(request: Request) -> Response:
        value = _cache_state(await _json(request))
        insight = seed.insight_by_id(int(request.path_params["insight_id"]))
        if insight is None:
            return JSONResponse({"error": "no such insight"}, status_code=404)
        state.cache.set_state(insight, value, state.now())
        return JSONResponse({"id": insight.id, "state": value})

    async def all_insights_cache(request: Request) -> Response:
        value = _cache_state(await _json(request))
        state.cache.set_all(value, state.now())
        return JSONResponse({"state": value})

    async def stats(request: Request) -> Response:
        counts = {"exports": len(state.exports), "notebooks": len(state.notebooks)}
        return JSONResponse({**state.stats.to_json(), **counts})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "storage_url": state.storage_url})

    def insight_ids_by_kind(project: Project, per_kind: int = 10) -> dict[str, list[int]]:
        """The first few insight ids of each kind (the kinds repeat every 40 indexes)."""
        found: dict[str, list[int]] = {kind: [] for kind in INSIGHT_KIND_RULES}
        for i in range(min(project.n_insights, 40 * per_kind)):
            insight = Insight(project, i)
            if len(found[insight.kind]) < per_kind:
                found[insight.kind].append(insight.id)
        return found

    async def seed_info(request: Request) -> Response:
        """The seeded sizes and id ranges, so tests can work with any start-up arguments.

        ``insight_kinds`` gives the rule on the 0-based index ``i`` (id = first id + i) that
        decides an insight's kind (trends, legacy-filters, HogQL, empty, a trends variant, a
        funnel view, retention, lifecycle, stickiness or paths), and ``insight_ids_by_kind``
        the first few ids of each.
        """
        projects = [
            {
                "id": p.id,
                "name": p.name,
                "insights": p.n_insights,
                "dashboards": p.n_dashboards,
                "group_types": p.n_group_types,
                "groups": p.n_groups,
                "first_insight_id": p.insight_base + 1,
                "first_dashboard_id": p.dashboard_base + 1,
                "insight_ids_by_kind": insight_ids_by_kind(p),
                "catalog": catalog_summary(state.catalog_seed, p.id),
            }
            for p in seed.projects.values()
        ]
        return JSONResponse(
            {
                "seed": seed.seed,
                "key": state.default_key,
                "insight_kinds": INSIGHT_KIND_RULES,
                "projects": projects,
            }
        )

    # ---- events, persons and the HogQL query log ---------------------------------------------
    def _store(request: Request) -> EventStore:
        project_id = int(request.query_params.get("project_id", seed.main.id))
        store = state.events.get(project_id)
        if store is None:
            raise ControlError(f"no events for project_id {project_id}")
        return store

    async def events_info(request: Request) -> Response:
        store = _store(request)
        sizes = await asyncio.to_thread(store.sizes)
        days = await asyncio.to_thread(store.day_counts)
        return JSONResponse({**store.info(), "live": sizes, "days": days})

    async def late_events(request: Request) -> Response:
        store = _store(request)
        data = await _json(request)
        day = date.fromisoformat(str(data.get("day")))
        count = data.get("count")
        if isinstance(count, bool) or not isinstance(count, int):
            raise ControlError("'count' must be an integer")
        event = data.get("event")
        if event is not None and not isinstance(event, str):
            raise ControlError("'event' must be a string")
        result = await asyncio.to_thread(store.insert_late_events, day, count, event)
        return JSONResponse(result, status_code=201)

    async def persons(request: Request) -> Response:
        store = _store(request)
        limit = int(request.query_params.get("limit", 10))
        min_ids = int(request.query_params.get("min_ids", 1))
        return JSONResponse(await asyncio.to_thread(store.persons_sample, limit, min_ids=min_ids))

    def _person_id(data: dict[str, Any], name: str) -> str:
        value = data.get(name)
        if not isinstance(value, str) or not value:
            raise ControlError(f"'{name}' must be a person id (a UUID string)")
        return value

    async def merge(request: Request) -> Response:
        store = _store(request)
        data = await _json(request)
        winner, loser = _person_id(data, "winner"), _person_id(data, "loser")
        return JSONResponse(await asyncio.to_thread(store.merge_persons, winner, loser))

    async def delete_person(request: Request) -> Response:
        store = _store(request)
        person_id = _person_id(await _json(request), "id")
        return JSONResponse(await asyncio.to_thread(store.delete_person, person_id))

    async def update_person(request: Request) -> Response:
        store = _store(request)
        data = await _json(request)
        properties = data.get("properties")
        if not isinstance(properties, dict):
            raise ControlError("'properties' must be an object")
        person_id = _person_id(data, "id")
        return JSONResponse(await asyncio.to_thread(store.update_person, person_id, properties))

    # ---- the catalog: soft-delete and add objects ---------------------------------------------
    async def catalog_info(request: Request) -> Response:
        """The live catalog (after control-plane changes), per project and kind."""
        return JSONResponse(
            {str(p.id): catalog_summary(state.catalog, p.id) for p in seed.projects.values()}
        )

    async def catalog_delete(request: Request) -> Response:
        kind = catalog_kind(request.path_params["kind"])
        row = state.catalog.find(kind, int(request.path_params["object_id"]))
        if row is None:
            return JSONResponse({"error": f"no {kind} {request.path_params['object_id']}"}, 404)
        row["deleted"] = True
        if "updated_at" in row:
            row["updated_at"] = iso_z(datetime.fromtimestamp(state.now(), UTC))
        return JSONResponse({"kind": kind, "id": row["id"], "deleted": True})

    async def catalog_add(request: Request) -> Response:
        kind = catalog_kind(request.path_params["kind"])
        project = seed.projects.get(int(request.query_params.get("project_id", seed.main.id)))
        if project is None:
            raise ControlError("unknown project_id")
        row = add_row(state.catalog, kind, project, await _json(request))
        public = {k: v for k, v in row.items() if not k.startswith("_")}
        return JSONResponse({"kind": kind, "project_id": project.id, **public}, status_code=201)

    async def queries(request: Request) -> Response:
        if request.method == "DELETE":
            state.query_log.clear()
            return JSONResponse([])
        return JSONResponse(list(state.query_log))

    table: list[tuple[str, Handler, list[str]]] = [
        ("/_standin/health", health, ["GET"]),
        ("/_standin/seed", seed_info, ["GET"]),
        ("/_standin/reset", reset, ["POST"]),
        ("/_standin/config", config, ["GET", "POST"]),
        ("/_standin/faults", faults, ["GET", "POST", "DELETE"]),
        ("/_standin/requests", requests_log, ["GET", "DELETE"]),
        ("/_standin/keys", keys, ["POST"]),
        ("/_standin/exports/{export_id:int}/expire", expire_export, ["POST"]),
        ("/_standin/exports/{export_id:int}/lose_content", lose_content, ["POST"]),
        ("/_standin/groups/{type_index:int}/{group_key}", remove_group, ["DELETE"]),
        ("/_standin/insights/cache", all_insights_cache, ["POST"]),
        ("/_standin/insights/{insight_id:int}/cache", insight_cache, ["POST"]),
        ("/_standin/stats", stats, ["GET"]),
        ("/_standin/events", events_info, ["GET"]),
        ("/_standin/events/late", late_events, ["POST"]),
        ("/_standin/persons", persons, ["GET"]),
        ("/_standin/persons/merge", merge, ["POST"]),
        ("/_standin/persons/delete", delete_person, ["POST"]),
        ("/_standin/persons/update", update_person, ["POST"]),
        ("/_standin/queries", queries, ["GET", "DELETE"]),
        ("/_standin/catalog", catalog_info, ["GET"]),
        ("/_standin/catalog/{kind}", catalog_add, ["POST"]),
        ("/_standin/catalog/{kind}/{object_id:int}/delete", catalog_delete, ["POST"]),
    ]
    return [Route(path, _guard(handler), methods=methods) for path, handler, methods in table]


def catalog_kind(raw: str) -> str:
    """A catalog kind from its singular or plural name (``feature_flags`` → ``feature_flag``)."""
    kind = raw[:-1] if raw.endswith("s") else raw
    if kind not in KINDS:
        raise ControlError(f"kind must be one of {KINDS} (or their plurals), not {raw!r}")
    return kind


def catalog_summary(catalog: Catalog, project_id: int) -> dict[str, Any]:
    """Per kind: every id, the live and the deleted ones; for experiments also each one's
    status, flag, variants and metric uuids (what ExperimentQuery needs)."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        rows = catalog.project_rows(kind, project_id)
        out[kind] = {
            "ids": [r["id"] for r in rows],
            "live_ids": [r["id"] for r in rows if not r["deleted"]],
            "deleted_ids": [r["id"] for r in rows if r["deleted"]],
        }
    flags = {r["id"]: r for r in catalog.project_rows("feature_flag", project_id)}
    out["experiment"]["experiments"] = [
        {
            "id": r["id"],
            "deleted": r["deleted"],
            "status": experiment_status(r),
            "feature_flag_id": r["_flag"],
            "feature_flag_key": r["feature_flag_key"],
            "variants": [v["key"] for v in flag_variants(flags[r["_flag"]])]
            if r["_flag"] in flags
            else [],
            "stats_method": (r["stats_config"] or {}).get("method", "bayesian"),
            "metric_uuids": [m.get("uuid") for m in r["metrics"] or []],
        }
        for r in catalog.project_rows("experiment", project_id)
    ]
    return out

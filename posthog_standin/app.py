"""The API application: PostHog's routes under both prefixes, each behind the same pipeline of
authentication → project → scopes → throttle → handler (DRF's ``initial()`` order)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from . import catalog, errors, exports, groups, insights, projects, query_api
from .auth import Ctx, authenticate, read_json_body, require_scopes, resolve_project
from .control import ControlAccess, ControlGate, control_routes
from .middleware import ApiMiddleware
from .state import State

logger = logging.getLogger("posthog_standin")

Handler = Callable[[Ctx], Awaitable[Response]]
DEFAULT_THROTTLES = ("burst", "sustained")
CLICKHOUSE_THROTTLES = ("clickhouse_burst", "clickhouse_sustained")
_READ_METHODS = ("GET", "HEAD", "OPTIONS")
#: Every route takes every method, so a wrong one gets PostHog's 405 body after the auth checks.
_ALL_METHODS = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"]


@dataclass(frozen=True)
class ApiRoute:
    """One PostHog endpoint: its path under the project prefix, handlers, scope and throttles."""

    name: str
    path: str
    methods: dict[str, Handler]
    scope_object: str
    throttles: tuple[str, ...] = DEFAULT_THROTTLES
    projects_only: bool = False
    write_scopes: Callable[[Any], list[str]] | None = None
    #: Throttle scopes chosen per request (the query routes: by tier, method and body).
    throttle_fn: Callable[[State, str, Any], tuple[str, ...]] | None = None

    def throttle_scopes(self, state: State, method: str, body: Any) -> tuple[str, ...]:
        if self.throttle_fn is not None:
            return self.throttle_fn(state, method, body)
        return self.throttles

    def scopes(self, method: str, body: Any) -> list[str]:
        if method in _READ_METHODS:
            return [f"{self.scope_object}:read"]
        if self.write_scopes is not None and method in self.methods:
            return self.write_scopes(body)
        return [f"{self.scope_object}:write"]


PROJECT_ROUTES: tuple[ApiRoute, ...] = (
    ApiRoute("project", "", {"GET": projects.retrieve_project}, "project"),
    ApiRoute("dashboards", "/dashboards", {"GET": projects.list_dashboards}, "dashboard"),
    ApiRoute(
        "dashboard", "/dashboards/{dashboard_id}", {"GET": projects.retrieve_dashboard}, "dashboard"
    ),
    ApiRoute(
        "exports",
        "/exports",
        {"GET": exports.list_exports, "POST": exports.create_export},
        "export",
        write_scopes=exports.required_scopes,
    ),
    ApiRoute("export", "/exports/{export_id}", {"GET": exports.retrieve_export}, "export"),
    ApiRoute(
        "export_content", "/exports/{export_id}/content", {"GET": exports.export_content}, "export"
    ),
    ApiRoute("groups", "/groups", {"GET": groups.list_groups}, "group"),
    ApiRoute("groups_find", "/groups/find", {"GET": groups.find_group}, "group"),
    ApiRoute(
        "groups_property_definitions",
        "/groups/property_definitions",
        {"GET": groups.property_definitions},
        "group",
    ),
    ApiRoute(
        "groups_property_values",
        "/groups/property_values",
        {"GET": groups.property_values},
        "group",
    ),
    ApiRoute(
        "groups_types",
        "/groups_types",
        {"GET": groups.list_group_types},
        "group",
        projects_only=True,
    ),
    ApiRoute(
        "insights", "/insights", {"GET": insights.list_insights}, "insight", CLICKHOUSE_THROTTLES
    ),
    ApiRoute(
        "insight",
        "/insights/{insight_id}",
        {"GET": insights.retrieve_insight},
        "insight",
        CLICKHOUSE_THROTTLES,
    ),
    # QueryViewSet: every action, POST and DELETE included, needs query:read
    # (scope_object_read_actions = ["retrieve", "create", "list", "destroy"]).
    ApiRoute(
        "query_create",
        "/query",
        {"POST": query_api.create},
        "query",
        CLICKHOUSE_THROTTLES,
        write_scopes=lambda body: ["query:read"],
        throttle_fn=query_api.throttle_scopes,
    ),
    ApiRoute(
        "query",
        "/query/{query_id}",
        {"GET": query_api.query_status, "DELETE": query_api.cancel},
        "query",
        CLICKHOUSE_THROTTLES,
        write_scopes=lambda body: ["query:read"],
        throttle_fn=query_api.throttle_scopes,
    ),
)
#: The catalog (``catalog``): list and retrieve of each kind, under its own scope object. PostHog
#: registers these viewsets on the projects router only (``routers.projects.register``; its
#: published schema has no ``/api/environments/`` paths for them): under ``environments`` a 404.
CATALOG_ROUTES: tuple[ApiRoute, ...] = tuple(
    route
    for name, plural, scope, listing, retrieve in (
        (
            "annotation",
            "annotations",
            "annotation",
            catalog.list_annotations,
            catalog.retrieve_annotation,
        ),
        ("cohort", "cohorts", "cohort", catalog.list_cohorts, catalog.retrieve_cohort),
        (
            "feature_flag",
            "feature_flags",
            "feature_flag",
            catalog.list_feature_flags,
            catalog.retrieve_feature_flag,
        ),
        ("action", "actions", "action", catalog.list_actions, catalog.retrieve_action),
        (
            "experiment",
            "experiments",
            "experiment",
            catalog.list_experiments,
            catalog.retrieve_experiment,
        ),
    )  # fmt: skip
    for route in (
        ApiRoute(plural, f"/{plural}", {"GET": listing}, scope, projects_only=True),
        ApiRoute(name, f"/{plural}/{{{name}_id}}", {"GET": retrieve}, scope, projects_only=True),
    )
)
PROJECT_ROUTES += CATALOG_ROUTES
PROJECT_LIST = ApiRoute("projects", "", {"GET": projects.list_projects}, "project")


def _throttle_ident(key: str) -> str:
    """PostHog's ``PersonalApiKeyRateThrottle`` keys its history by a sha256 of the personal API
    key (never the key itself), so limits are per key, not per project."""
    return hashlib.sha256(key.encode()).hexdigest()


def endpoint(
    state: State, route: ApiRoute, with_project: bool
) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        method = request.method
        state.stats.requests_by_route[f"{method} {route.name}"] += 1
        try:
            body = await read_json_body(request)
            key = authenticate(state, request, body)
            if with_project:
                project = resolve_project(state, key, request.path_params["project_id"])
            else:
                project = state.seed.main
            require_scopes(key, route.scopes(method, body))
            if state.config.rate_limits:
                scopes = route.throttle_scopes(state, method, body)
                allowed, wait = state.limiter.check(_throttle_ident(key.key), scopes, state.now())
                if not allowed:
                    raise errors.throttled(wait)
            handler = route.methods.get("GET" if method == "HEAD" else method)
            if handler is None:
                raise errors.method_not_allowed(method)
            return await handler(Ctx(request, state, key, project, body))
        except errors.ApiError as exc:
            if exc.status == 429:
                state.stats.throttled_429 += 1
            return exc.response()
        except ClientDisconnect:
            return Response(status_code=499)  # the client left (e.g. timed out); nobody reads this
        except Exception:
            logger.exception("stand-in handler crashed on %s %s", method, request.url.path)
            return errors.server_error().response()

    return handle


async def _not_found(request: Request, exc: Exception) -> Response:
    return errors.not_found().response()


def build_api_app(state: State, access: ControlAccess) -> ControlGate:
    """The ASGI app of the main listener: PostHog routes, the control plane (behind ``access``),
    and the middleware."""
    routes: list[Route] = [
        Route("/api/projects", endpoint(state, PROJECT_LIST, False), methods=_ALL_METHODS),
    ]
    for prefix in ("projects", "environments"):
        for route in PROJECT_ROUTES:
            if route.projects_only and prefix != "projects":
                continue
            path = f"/api/{prefix}/{{project_id}}{route.path}"
            routes.append(Route(path, endpoint(state, route, True), methods=_ALL_METHODS))
    routes.extend(control_routes(state))
    app = Starlette(routes=routes, exception_handlers={404: _not_found})
    app.router.redirect_slashes = False
    return ControlGate(ApiMiddleware(app, state), access)

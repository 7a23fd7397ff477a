"""Request context, personal-API-key authentication, project resolution and scope checks.

Mirrors PostHog's ``PersonalAPIKeyAuthentication``, ``TeamAndOrgViewSetMixin`` and
``APIScopePermission`` (``posthog/auth.py``, ``posthog/api/routing.py``, ``posthog/permissions.py``)
closely enough that a client sees the same status codes and error texts for the same mistakes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from . import errors
from .seed import Project
from .state import KeyInfo, State

_BEARER = re.compile(r"^Bearer\s+(\S.+)$")


@dataclass
class Ctx:
    """What a handler needs: the request, the shared state, the caller's key and project."""

    request: Request
    state: State
    key: KeyInfo
    project: Project
    body: Any

    @property
    def query(self) -> Any:
        return self.request.query_params

    @property
    def now(self) -> float:
        return self.state.now()


def site_url(request: Request) -> str:
    """Scheme and host as the client addressed us, for absolute ``next`` links and headers."""
    host = request.headers.get("host") or f"{request.url.hostname}:{request.url.port}"
    return f"{request.url.scheme}://{host}"


async def read_json_body(request: Request) -> Any:
    """The JSON body (``None`` if empty), with DRF's 400/415 errors for bad input."""
    raw = await request.body()
    if not raw.strip():
        return None
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise errors.ApiError(
            415,
            "invalid_request",
            "unsupported_media_type",
            f'Unsupported media type "{media}" in request.',
        )
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.ApiError(
            400, "validation_error", "parse_error", f"JSON parse error - {exc}"
        ) from exc


def find_key(request: Request, body: Any) -> tuple[str, str] | None:
    """``(key, where)`` from the header, then the body, then the query string (PostHog's order)."""
    match = _BEARER.match(request.headers.get("authorization", ""))
    if match:
        return match.group(1).strip(), "Authorization header"
    if isinstance(body, dict) and isinstance(body.get("personal_api_key"), str):
        return body["personal_api_key"], "body"
    if "personal_api_key" in request.query_params:
        return request.query_params["personal_api_key"], "query string"
    return None


def authenticate(state: State, request: Request, body: Any) -> KeyInfo:
    found = find_key(request, body)
    if found is None:
        raise errors.not_authenticated(site_url(request))
    key, where = found
    info = state.keys.get(key)
    if info is None:
        raise errors.authentication_failed(where, site_url(request))
    return info


def resolve_project(state: State, key: KeyInfo, raw: str) -> Project:
    """An integer id, or ``@current`` (the key owner's selected project); else 404/403."""
    if raw == "@current":
        project_id = key.current_project
    else:
        try:
            project_id = int(raw)
        except ValueError:
            raise errors.not_found("Project not found.") from None
    project = state.seed.projects.get(project_id)
    if project is None:
        raise errors.not_found("Project not found.")
    if key.projects is not None and project.id not in key.projects:
        raise errors.permission_denied(
            f"API key does not have access to the requested project: ID {project.id}."
        )
    if key.user_projects is not None and project.id not in key.user_projects:
        raise errors.permission_denied("You don't have access to the project.")
    return project


def require_scopes(key: KeyInfo, scopes: list[str]) -> None:
    for scope in scopes:
        if not key.has_scope(scope):
            raise errors.permission_denied(f"API key missing required scope '{scope}'")

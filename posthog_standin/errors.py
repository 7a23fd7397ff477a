"""PostHog-shaped error bodies (``posthog/exceptions.py`` ``exception_handler`` over
drf-exceptions-hog's ``exceptions_hog/handler.py``).

Every failure the stand-in sends has exactly the four keys ``type``, ``code``, ``detail`` and
``attr``, because that is what PostHog's exception handler emits and what clients parse. Handlers
raise :class:`ApiError`; the app turns it into a response in one place.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.responses import JSONResponse


def www_authenticate(site_url: str) -> str:
    """The header PostHog's newest handler puts on every 401, pointing at its OAuth metadata."""
    return f'Bearer resource_metadata="{site_url}/.well-known/oauth-protected-resource"'


#: Status -> (type, code, detail) for statuses a fault rule may ask for without a body.
_STATUS_DEFAULTS: dict[int, tuple[str, str, str]] = {
    400: ("validation_error", "invalid_input", "Invalid input."),
    401: (
        "authentication_error",
        "not_authenticated",
        "Authentication credentials were not provided.",
    ),
    402: ("server_error", "payment_required", "Quota limit exceeded."),
    403: (
        "authentication_error",
        "permission_denied",
        "You do not have permission to perform this action.",
    ),
    404: ("invalid_request", "not_found", "Not found."),
    405: ("invalid_request", "method_not_allowed", "Method not allowed."),
    409: ("invalid_request", "conflict", "Conflict."),
    500: ("server_error", "error", "A server error occurred."),
    502: ("server_error", "bad_gateway", "Bad gateway."),
    503: (
        "server_error",
        "service_unavailable",
        "Service temporarily unavailable, try again later.",
    ),
    504: (
        "server_error",
        "query_timeout",
        "Query timed out. Try a narrower date range or fewer series.",
    ),
}


def error_body(type_: str, code: str, detail: str, attr: str | None = None) -> dict[str, Any]:
    """The four-key body; ``attr`` is null for non-field errors."""
    return {"type": type_, "code": code, "detail": detail, "attr": attr}


def throttle_detail(wait_s: int) -> str:
    """DRF's throttle text: it says "second" (singular) when the wait is exactly one second."""
    unit = "second" if wait_s == 1 else "seconds"
    return f"Request was throttled. Expected available in {wait_s} {unit}."


class ApiError(Exception):
    """Raised by handlers; rendered by :func:`error_response` with PostHog's body and headers."""

    def __init__(
        self,
        status: int,
        type_: str,
        code: str,
        detail: str,
        attr: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.body = error_body(type_, code, detail, attr)
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        """Render as the JSON response PostHog would send."""
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def not_found(detail: str = "Not found.") -> ApiError:
    return ApiError(404, "invalid_request", "not_found", detail)


def validation_error(detail: str, attr: str | None = None, code: str = "invalid_input") -> ApiError:
    """A 400; DRF's plain ``invalid`` code is reported as ``invalid_input`` by PostHog."""
    return ApiError(
        400, "validation_error", "invalid_input" if code == "invalid" else code, detail, attr
    )


def permission_denied(detail: str) -> ApiError:
    return ApiError(403, "authentication_error", "permission_denied", detail)


def not_authenticated(site_url: str) -> ApiError:
    return ApiError(
        401,
        "authentication_error",
        "not_authenticated",
        "Authentication credentials were not provided.",
        headers={"WWW-Authenticate": www_authenticate(site_url)},
    )


def authentication_failed(source: str, site_url: str) -> ApiError:
    """``source`` is where the key was found: "Authorization header", "body" or "query string"."""
    return ApiError(
        401,
        "authentication_error",
        "authentication_failed",
        f"Personal API key found in request {source} is invalid.",
        headers={"WWW-Authenticate": www_authenticate(site_url)},
    )


def method_not_allowed(method: str) -> ApiError:
    return ApiError(405, "invalid_request", "method_not_allowed", f'Method "{method}" not allowed.')


def throttled(wait_s: float | None) -> ApiError:
    """429 with ``Retry-After`` rounded up to whole seconds, as DRF's ``Throttled`` does; without
    a wait, just "Request was throttled." and no header."""
    if wait_s is None:
        return ApiError(429, "throttled_error", "throttled", "Request was throttled.")
    wait = max(1, math.ceil(wait_s))
    return ApiError(
        429,
        "throttled_error",
        "throttled",
        throttle_detail(wait),
        headers={"Retry-After": str(wait)},
    )


def server_error() -> ApiError:
    return status_error(500)


def status_error(status: int, retry_after: float | None = None, site_url: str = "") -> ApiError:
    """The body PostHog (or its load balancer, normalised) sends for ``status``; used by faults."""
    if status == 429:
        return throttled(retry_after if retry_after is not None else 1)
    type_, code, detail = _STATUS_DEFAULTS.get(
        status, ("server_error" if status >= 500 else "invalid_request", "error", f"HTTP {status}.")
    )
    headers = {"Retry-After": str(math.ceil(retry_after))} if retry_after is not None else {}
    if status == 401:
        headers["WWW-Authenticate"] = www_authenticate(site_url)
    return ApiError(status, type_, code, detail, headers=headers)

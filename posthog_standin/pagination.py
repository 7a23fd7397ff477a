"""DRF's two paginators as PostHog configures them (``REST_FRAMEWORK`` in
``posthog/settings/web.py``; ``GroupCursorPagination`` in ``ee/clickhouse/views/groups.py``).

Limit/offset for exports, insights, dashboards and projects (default 100, no maximum); cursor
pagination for groups (base64 of ``o``/``r``/``p`` tokens). ``next``/``previous`` are absolute URLs
rebuilt from the request with the other query parameters kept and sorted, as DRF does.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from starlette.requests import Request

from . import errors
from .auth import site_url

DEFAULT_LIMIT = 100


def request_url(request: Request) -> str:
    """The absolute URL as the client sent it (original path, trailing slash included)."""
    path = request.scope.get("standin.path", request.url.path)
    query = request.url.query
    return f"{site_url(request)}{path}" + (f"?{query}" if query else "")


def replace_query_param(url: str, key: str, value: Any) -> str:
    scheme, netloc, path, query, fragment = urlsplit(url)
    params = parse_qs(query, keep_blank_values=True)
    params[key] = [str(value)]
    return urlunsplit(
        (scheme, netloc, path, urlencode(sorted(params.items()), doseq=True), fragment)
    )


def remove_query_param(url: str, key: str) -> str:
    scheme, netloc, path, query, fragment = urlsplit(url)
    params = parse_qs(query, keep_blank_values=True)
    params.pop(key, None)
    return urlunsplit(
        (scheme, netloc, path, urlencode(sorted(params.items()), doseq=True), fragment)
    )


def _positive_int(text: str | None, *, strict: bool) -> int:
    value = int(text)  # type: ignore[arg-type]
    if value < 0 or (strict and value == 0):
        raise ValueError(text)
    return value


def limit_offset(request: Request, default_limit: int = DEFAULT_LIMIT) -> tuple[int, int]:
    """DRF's parsing: a bad or zero ``limit`` means the default (100, or the paginator's
    ``default_limit``), a bad ``offset`` means 0; no cap."""
    try:
        limit = _positive_int(request.query_params.get("limit"), strict=True)
    except (TypeError, ValueError):
        limit = default_limit
    try:
        offset = _positive_int(request.query_params.get("offset"), strict=False)
    except (TypeError, ValueError):
        offset = 0
    return limit, offset


def limit_offset_page(
    request: Request,
    count: int,
    fetch: Callable[[int, int], Sequence[Any]],
    default_limit: int = DEFAULT_LIMIT,
) -> dict[str, Any]:
    """``{"count","next","previous","results"}``; ``fetch(offset, limit)`` returns one page."""
    limit, offset = limit_offset(request, default_limit)
    url = request_url(request)
    results = list(fetch(offset, limit)) if offset < count else []
    next_url = None
    if offset + limit < count:
        next_url = replace_query_param(
            replace_query_param(url, "limit", limit), "offset", offset + limit
        )
    previous_url = None
    if offset > 0:
        previous_url = replace_query_param(url, "limit", limit)
        if offset - limit <= 0:
            previous_url = remove_query_param(previous_url, "offset")
        else:
            previous_url = replace_query_param(previous_url, "offset", offset - limit)
    return {"count": count, "next": next_url, "previous": previous_url, "results": results}


@dataclass(frozen=True)
class Cursor:
    offset: int
    reverse: bool
    position: str | None


def encode_cursor(cursor: Cursor) -> str:
    tokens: dict[str, str] = {}
    if cursor.offset:
        tokens["o"] = str(cursor.offset)
    if cursor.reverse:
        tokens["r"] = "1"
    if cursor.position is not None:
        tokens["p"] = cursor.position
    return base64.b64encode(urlencode(tokens, doseq=True).encode("ascii")).decode("ascii")


def decode_cursor(encoded: str) -> Cursor:
    """Inverse of :func:`encode_cursor`; anything undecodable is DRF's 404 "Invalid cursor"."""
    try:
        text = base64.b64decode(encoded.encode("ascii"), validate=False).decode("ascii")
        tokens = parse_qs(text, keep_blank_values=True)
        offset = _positive_int(tokens.get("o", ["0"])[0], strict=False)
        reverse = bool(int(tokens.get("r", ["0"])[0]))
        position = tokens.get("p", [None])[0]
    except (TypeError, ValueError, UnicodeError, binascii.Error):
        raise errors.not_found("Invalid cursor") from None
    return Cursor(offset, reverse, position)


def cursor_url(request: Request, cursor: Cursor) -> str:
    return replace_query_param(request_url(request), "cursor", encode_cursor(cursor))

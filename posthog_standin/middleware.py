"""The ASGI layer in front of the routes: optional trailing slash, request log, in-flight
counting, the environments deprecation headers, and fault injection.

Dropped connections are real: uvicorn's ``receive`` is a bound method of its request cycle, whose
``transport`` we abort (no response bytes at all) or close after part of the body (the client
sees a short read against the announced Content-Length).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import errors
from .faults import FaultRule
from .state import State

SUNSET = "Fri, 31 Jul 2026 00:00:00 GMT"
REDACTED = "<redacted>"
_BODY_METHODS = ("POST", "PUT", "PATCH")


def _query_dict(raw: bytes) -> dict[str, Any]:
    """The query string as a dict (repeated keys become lists), with any key value redacted."""
    out: dict[str, Any] = {}
    for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        value = REDACTED if name == "personal_api_key" else value
        if name in out:
            previous = out[name]
            out[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            out[name] = value
    return out


def _logged_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw.decode("utf-8", "replace")
    if isinstance(body, dict) and "personal_api_key" in body:
        body = {**body, "personal_api_key": REDACTED}
    return body


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the buffered body back once, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class Connection:
    """Access to uvicorn's request cycle for killing the connection; inert on other servers."""

    def __init__(self, receive: Receive) -> None:
        self.cycle = getattr(receive, "__self__", None)
        self.transport = getattr(self.cycle, "transport", None)

    async def _wait_disconnected(self) -> None:
        # Let uvicorn notice the loss before the app returns, so it does not log "returned
        # without (completing|starting) response" for a connection we closed on purpose.
        for _ in range(200):
            if getattr(self.cycle, "disconnected", True):
                return
            await asyncio.sleep(0.005)

    async def abort(self) -> None:
        """Reset the TCP connection now; nothing more reaches the client."""
        if self.transport is None:
            raise RuntimeError("this server does not expose its transport; cannot drop")
        self.transport.abort()
        await self._wait_disconnected()

    async def close(self) -> None:
        """Flush what was written, then close (the client sees an early end of the body)."""
        if self.transport is None:
            raise RuntimeError("this server does not expose its transport; cannot drop")
        self.transport.close()
        await self._wait_disconnected()


class _CutBody:
    """A ``send`` that forwards headers and about half of the body, then closes the connection."""

    def __init__(self, send: Send, connection: Connection) -> None:
        self.send = send
        self.connection = connection
        self.limit = 0
        self.sent = 0
        self.done = False

    async def __call__(self, message: Message) -> None:
        if self.done:
            return
        if message["type"] == "http.response.start":
            length = dict(message.get("headers", [])).get(b"content-length", b"0")
            self.limit = int(length) // 2
            await self.send(message)
            return
        body = message.get("body", b"")
        room = self.limit - self.sent
        if len(body) < room and message.get("more_body", False):
            self.sent += len(body)
            await self.send(message)
            return
        await self.send(
            {"type": "http.response.body", "body": body[: max(room, 0)], "more_body": True}
        )
        self.done = True
        await self.connection.close()


class ApiMiddleware:
    """Wraps the API app (not the control plane, which passes straight through)."""

    def __init__(self, app: ASGIApp, state: State, server: str = "api") -> None:
        self.app = app
        self.state = state
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        scope = {**scope, "standin.path": path}
        if len(path) > 1 and path.endswith("/"):
            scope["path"] = path.rstrip("/")  # PostHog's router takes both forms
        if path.startswith("/_standin"):
            await self.app(scope, receive, send)
            return
        state = self.state
        method: str = scope["method"]
        connection = Connection(receive)
        raw_body = b""
        if method in _BODY_METHODS:
            raw_body = await _read_body(receive)
            receive = _replay(raw_body, receive)
        headers = dict(scope.get("headers", []))
        entry: dict[str, Any] = {
            "server": self.server,
            "method": method,
            "path": path,
            "query": _query_dict(scope.get("query_string", b"")),
            "status": None,
            "authorization": b"authorization" in headers,
            "ts": state.now(),
            "fault": None,
        }
        if method in _BODY_METHODS:
            entry["body"] = _logged_body(raw_body)
        logged = False

        def record() -> None:
            """Log once: as soon as the status is known (so the log is current by the time the
            client has the response), or when the request ends without one."""
            nonlocal logged
            if not logged:
                logged = True
                state.record(entry)

        stats = state.stats
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            await self._serve(scope, receive, send, connection, entry, headers, record)
        finally:
            stats.in_flight -= 1
            record()

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        connection: Connection,
        entry: dict[str, Any],
        headers: dict[bytes, bytes],
        record: Callable[[], None],
    ) -> None:
        state = self.state
        path = entry["path"]
        extra: list[tuple[bytes, bytes]] = []
        if path.startswith("/api/environments/") and state.config.environments_sunset:
            # posthog/middleware.py rewrites the alias to /api/projects/ and marks it deprecated,
            # pointing at the same resource under the canonical prefix.
            successor = "/api/projects/" + path[len("/api/environments/") :]
            query = scope.get("query_string", b"").decode("latin-1")
            if query:
                successor += f"?{query}"
            extra = [
                (b"deprecation", b"true"),
                (b"sunset", SUNSET.encode()),
                (b"link", f'<{successor}>; rel="successor-version"'.encode("latin-1")),
            ]

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
                record()
                if extra:
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        rule = state.faults.pick(entry["method"], path) if self.server == "api" else None
        if rule is not None:
            state.stats.faults_fired += 1
            entry["fault"] = rule.kind
            if rule.kind == "slow":
                await asyncio.sleep(rule.delay_s)
            elif rule.kind == "drop":
                record()
                await connection.abort()
                return
            elif rule.kind == "status":
                host = headers.get(b"host", b"127.0.0.1").decode("latin-1")
                await _fault_response(rule, f"http://{host}")(scope, receive, send_logged)
                return
            elif rule.kind == "drop_mid_body":
                cut = _CutBody(send_logged, connection)
                await self.app(scope, receive, cut)
                return
        await self.app(scope, receive, send_logged)


def _fault_response(
    rule: FaultRule, site_url: str
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    error = errors.status_error(rule.status, rule.retry_after, site_url)
    if rule.body is not None:
        error.body = rule.body
    if rule.status == 429 and rule.retry_after is None:
        error.headers.setdefault("Retry-After", "1")
    return error.response()

"""HTTP client for PostHog's REST API (exports, groups, insights, query status).

Plain Python on one ``requests.Session``: no Dagster here, so the client can be used and tested on
its own. It retries only what is worth retrying (429, 5xx, dropped connections), honours
``Retry-After`` across threads, pages lazily, and streams downloads to disk atomically.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

import requests
import tenacity

from posthog_assets.api.download import (
    DOWNLOAD_CHUNK_BYTES,
    DownloadResult,
    remove_stale_parts,
    stream_to_file,
)
from posthog_assets.api.errors import (
    PostHogAuthError,
    PostHogConnectionError,
    PostHogDownloadError,
    PostHogError,
    PostHogExportFailed,
    PostHogNotFoundError,
    PostHogPermissionError,
    PostHogRateLimitError,
    PostHogServerError,
    PostHogValidationError,
    advice_for,
)
from posthog_assets.api.ratelimit import (
    POSTHOG_CLOUD_LIMITS,
    FileState,
    GateState,
    GateWaitTooLong,
    Limits,
    MemoryState,
    RequestGate,
    throttle_class,
)

USER_AGENT = "posthog-assets/0.1 (+dagster)"

ApiPrefix = Literal["environments", "projects"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrySettings:
    """How hard to retry: attempts, capped exponential backoff with jitter, total time budget."""

    max_attempts: int = 6
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    jitter_s: float = 0.5
    total_budget_s: float = 180.0


@dataclass(frozen=True)
class QueryStatus:
    """One answer of ``GET /query/:id/``: 202 running, 200 done, 400/500 failed."""

    http_status: int
    status: dict[str, Any]
    #: Bytes of the answer (a finished query's carries its whole result).
    size: int = 0

    @property
    def complete(self) -> bool:
        return bool(self.status.get("complete"))

    @property
    def failed(self) -> bool:
        return self.http_status in (400, 500) or bool(self.status.get("error"))

    @property
    def error_message(self) -> str | None:
        if not self.failed:
            return None
        return self.status.get("error_message") or f"query failed (HTTP {self.http_status})"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _gate_state(given: str | os.PathLike[str] | GateState | None) -> GateState:
    """A path means a state file (the single-host form); a state object is used as given."""
    if given is None:
        return MemoryState()
    if isinstance(given, str | os.PathLike):
        return FileState(given)
    return given


class _OriginBearerAuth(requests.auth.AuthBase):
    """Adds ``Authorization: Bearer`` only for URLs on PostHog's own origin.

    Object-storage redirects (presigned S3 URLs) must never receive the key.
    """

    def __init__(self, origin_url: str, key: str) -> None:
        self._origin = _origin(origin_url)
        self._key = key

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if r.url and _origin(r.url) == self._origin:
            r.headers["Authorization"] = f"Bearer {self._key}"
        else:
            r.headers.pop("Authorization", None)
        return r

    def __repr__(self) -> str:
        return "<bearer auth for PostHog origin, key hidden>"


class _WaitRetryAfterOrBackoff(tenacity.wait.wait_base):
    """Exponential backoff with jitter, but never shorter than the server's ``Retry-After``."""

    def __init__(self, settings: RetrySettings) -> None:
        self._backoff = tenacity.wait_exponential_jitter(
            multiplier=settings.backoff_initial_s,
            max=settings.backoff_max_s,
            jitter=settings.jitter_s,
        )

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        base = self._backoff(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        return max(base, float(retry_after)) if retry_after else base


@dataclass(frozen=True)
class InsightPage:
    """One limit/offset page of the insights list (``results`` in PostHog's order for it)."""

    offset: int
    count: int | None
    results: list[dict[str, Any]]
    #: The page failed as a whole (one insight's query broke it): it was listed metadata-only and
    #: its insights fetched one by one; a failing one carries ``query_status.error``.
    fallback: bool = False
    #: Insights listed metadata-only that were gone by the time they were fetched one by one.
    vanished: int = 0


class PostHogClient:
    """Talks to one PostHog project.

    Args:
        host: Base URL, e.g. ``https://us.posthog.com`` or a self-hosted instance.
        project_id: Numeric project id (``@current`` works but follows the UI's selection).
        personal_api_key: A ``phx_`` key; sent only as a Bearer header to ``host``.
        api_prefix: ``projects`` (``/api/projects/:id/``, the default) or ``environments``, the
            older alias PostHog has marked deprecated.
        read_timeout_s: Longest wait for an answer to one request.
        post_timeout_s: Longest wait for the answer to ``POST /exports/``: PostHog holds it open
            until the export is rendered. When it passes, the export is found in the list and
            followed there (see :mod:`posthog_assets.exports.runner`). Default: ``read_timeout_s``.
        rate_limits: PostHog's throttles to stay under, per class (default PostHog Cloud's);
            None paces only on 429s.
        rate_limit_state: Where the gate's log and pauses live: a file shared with other
            processes on this machine using the same key and host
            (:func:`posthog_assets.ratelimit.shared_state_path`), or a state object such as
            :class:`posthog_assets.ratelimit.RedisState` shared across hosts; None keeps pacing
            per client.
        max_concurrent_queries: HogQL queries this client has in flight at once.
        deprecation_marker: A file whose creation claims the one deprecation warning of a run,
            so the steps of one run (separate processes) warn once between them.
    """

    def __init__(
        self,
        host: str,
        project_id: int | str,
        personal_api_key: str,
        *,
        api_prefix: ApiPrefix = "projects",
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        post_timeout_s: float | None = None,
        retry: RetrySettings | None = None,
        rate_limits: Limits | None = POSTHOG_CLOUD_LIMITS,
        rate_limit_state: str | os.PathLike[str] | GateState | None = None,
        max_concurrent_queries: int = 3,
        deprecation_marker: str | os.PathLike[str] | None = None,
        log: logging.Logger | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.host = host.rstrip("/")
        self.project_id = project_id
        self.api_prefix = api_prefix
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.post_timeout = (connect_timeout_s, post_timeout_s or read_timeout_s)
        self.retry = retry or RetrySettings()
        self.log = log or logger
        self.gate = RequestGate(_gate_state(rate_limit_state), rate_limits)
        #: HogQL queries in flight (PostHog runs 3 per organisation, queues the rest 30 s).
        self.query_slots = threading.BoundedSemaphore(max_concurrent_queries)
        self._sleep = sleep or tenacity.nap.sleep
        self._deprecation_marker = Path(deprecation_marker) if deprecation_marker else None
        self._warned_sunset = False
        self.request_count = 0
        self._count_lock = threading.Lock()
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.auth = _OriginBearerAuth(self.host, personal_api_key)
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def __repr__(self) -> str:
        return f"PostHogClient(host={self.host!r}, project_id={self.project_id!r})"

    def close(self) -> None:
        self.session.close()

    # ---------------------------------------------------------------- URLs

    @property
    def project_base(self) -> str:
        return f"{self.host}/api/{self.api_prefix}/{self.project_id}"

    def url(self, path: str) -> str:
        """Absolute URL of a project route (``exports/``) or an absolute ``/api/...`` path."""
        if path.startswith(("http://", "https://")):
            return path
        if path.startswith("/"):
            return f"{self.host}{path}"
        return f"{self.project_base}/{path}"

    def ui_url(self, kind: Literal["insights", "dashboard"], object_id: int | str) -> str:
        """Link to an insight or dashboard in PostHog's UI (for asset metadata)."""
        return f"{self.host}/project/{self.project_id}/{kind}/{object_id}"

    def _same_origin(self, url: str) -> str:
        """Keep a server-built ``next`` URL on our host (proxies may rewrite the host)."""
        parts = urlsplit(url)
        return f"{self.host}{parts.path}" + (f"?{parts.query}" if parts.query else "")

    # ---------------------------------------------------------------- core request

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        scopes: tuple[str, ...] = (),
        accept: tuple[int, ...] = (),
        stream: bool = False,
        allow_redirects: bool = True,
        timeout: tuple[float, float] | None = None,
        idempotent: bool | None = None,
    ) -> requests.Response:
        """Send one request with retries; raise a typed :class:`PostHogError` on failure.

        Statuses in ``accept`` are returned instead of raised (e.g. 400/500 from ``/query/:id/``).
        POSTs are retried only when PostHog certainly did not act on them (429 or a failed
        connect), so a retry can never create a second export; ``idempotent`` overrides that.
        """
        url = self.url(path)
        if idempotent is None:
            idempotent = method.upper() in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")

        def attempt() -> requests.Response:
            return self._send_once(
                method, url, params, json_body, scopes, accept, stream, allow_redirects, timeout
            )

        return self.call_with_retries(attempt, idempotent=idempotent)

    def call_with_retries(
        self, fn: Callable[[], Any], *, idempotent: bool = True, what: str = "request"
    ) -> Any:
        """Run ``fn`` under the client's retry policy (attempts, backoff, budget).

        A 429 whose ``Retry-After`` lies beyond the remaining budget is not waited for: the error
        says when PostHog will accept requests again, for the caller (or a later run) to decide.
        """
        started = time.monotonic()

        def should_retry(exc: BaseException) -> bool:
            if not isinstance(exc, PostHogError) or not exc.retryable:
                return False
            retry_after = getattr(exc, "retry_after", None)
            remaining = self.retry.total_budget_s - (time.monotonic() - started)
            if retry_after is not None and retry_after > remaining:
                return False
            if idempotent or isinstance(exc, PostHogRateLimitError):
                return True
            return isinstance(exc, PostHogConnectionError) and not exc.request_sent

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            self.log.warning(
                "PostHog %s failed (attempt %d/%d: %s); retrying in %.1fs",
                what,
                state.attempt_number,
                self.retry.max_attempts,
                exc,
                wait,
            )

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(should_retry),
            stop=tenacity.stop_after_attempt(self.retry.max_attempts)
            | tenacity.stop_before_delay(self.retry.total_budget_s),
            wait=_WaitRetryAfterOrBackoff(self.retry),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(fn)
        except PostHogRateLimitError as exc:
            remaining = self.retry.total_budget_s - (time.monotonic() - started)
            if exc.retry_after is not None and exc.retry_after > remaining:
                exc.retryable = False  # a step retry seconds later would only be refused again
            raise

    def _send_once(
        self,
        method: str,
        url: str,
        params: Mapping[str, Any] | None,
        json_body: Any,
        scopes: tuple[str, ...],
        accept: tuple[int, ...],
        stream: bool,
        allow_redirects: bool,
        timeout: tuple[float, float] | None = None,
    ) -> requests.Response:
        path = urlsplit(url).path
        klass = throttle_class(path) if _origin(url) == _origin(self.host) else None
        if klass is not None:
            try:
                self.gate.acquire(klass, max_wait_s=self.retry.total_budget_s)
            except GateWaitTooLong as exc:
                raise _too_long(exc, method, path) from None
        with self._count_lock:
            self.request_count += 1
        timeout = timeout or self.timeout
        try:
            resp = self.session.request(
                method,
                url,
                params=params,
                json=json_body,
                timeout=timeout,
                stream=stream,
                allow_redirects=allow_redirects,
            )
        except requests.exceptions.ConnectTimeout:
            raise PostHogConnectionError(
                f"{method} {_shown_origin(url)}{path}: no connection within {timeout[0]:g}s "
                "(connect timeout)",
                request_sent=False,
                method=method,
                path=path,
            ) from None
        except requests.exceptions.ReadTimeout:
            raise PostHogConnectionError(
                f"{method} {_shown_origin(url)}{path}: no answer within {timeout[1]:g}s "
                "(read timeout)",
                method=method,
                path=path,
                read_timeout=True,
            ) from None
        except requests.exceptions.ConnectionError as exc:
            sent = "NewConnectionError" not in repr(exc) and "Connection refused" not in repr(exc)
            raise PostHogConnectionError(
                f"{method} {_shown_origin(url)}{path}: connection failed ({_cause(exc)})",
                request_sent=sent,
                method=method,
                path=path,
            ) from None
        except requests.exceptions.ChunkedEncodingError:
            # The connection broke while the body was being read (short read against
            # Content-Length, or a cut chunked stream). PostHog did answer, so a POST may
            # have taken effect: treat it as "sent" so only idempotent calls are retried.
            raise PostHogConnectionError(
                f"{method} {path}: connection dropped while reading the response body",
                method=method,
                path=path,
            ) from None
        except requests.exceptions.RequestException as exc:  # a URL requests cannot use
            raise PostHogError(
                f"{method} {_shown_origin(url)}{path}: {_cause(exc)}", method=method, path=path
            ) from None
        self._warn_on_sunset(resp)
        if resp.status_code < 400 or resp.status_code in accept:
            return resp
        error = self._error_from(resp, method, path, scopes)
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None and klass is not None:
            # Tell every thread and process on this key before anyone sends again. A 429 pauses
            # its throttle class; a 503 with Retry-After (PostHog overloaded) pauses everything.
            self.gate.throttled(klass if resp.status_code == 429 else None, retry_after)
        raise error

    def _warn_on_sunset(self, resp: requests.Response) -> None:
        if self._warned_sunset:
            return
        sunset = resp.headers.get("Sunset") or resp.headers.get("Deprecation")
        if not sunset:
            return
        self._warned_sunset = True
        marker = self._deprecation_marker
        if marker is not None:
            try:
                marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                return  # another step of this run has said it already
            except OSError:
                pass
        self.log.warning(
            "PostHog marks /api/%s/ as deprecated (Sunset: %s); set api_prefix='projects'.",
            self.api_prefix,
            resp.headers.get("Sunset") or sunset,
        )

    def _error_from(
        self, resp: requests.Response, method: str, path: str, scopes: tuple[str, ...]
    ) -> PostHogError:
        status = resp.status_code
        try:
            body = resp.json()
        except ValueError:
            body = {}
        finally:
            resp.close()
        if not isinstance(body, dict):
            body = {}
        detail = str(body.get("detail") or resp.reason or "")
        code = body.get("code")
        attr = body.get("attr")
        retry_after = _retry_after(resp)
        where = f"{method} {path}"
        field = f" (field '{attr}')" if attr else ""
        advice = advice_for(status, detail, scopes)
        if retry_after is not None and status in (429, 503):
            advice += f" PostHog accepts requests again at {_utc(time.time() + retry_after)}."
        message = f"PostHog answered {status} to {where}{field}: {detail} {advice}"
        kw: dict[str, Any] = dict(
            status=status, code=code, detail=detail, attr=attr, method=method, path=path
        )
        if status == 401:
            return PostHogAuthError(message, **kw)
        if status == 403:
            return PostHogPermissionError(message, **kw)
        if status == 404:
            return PostHogNotFoundError(message, **kw)
        if status == 429:
            return PostHogRateLimitError(message, retry_after=retry_after, **kw)
        if status >= 500:
            return PostHogServerError(message, retry_after=retry_after, **kw)
        if status == 400:
            return PostHogValidationError(message, **kw)
        return PostHogError(message, **kw)

    # ---------------------------------------------------------------- JSON helpers

    def get_json(
        self, path: str, params: Mapping[str, Any] | None = None, *, scopes: tuple[str, ...] = ()
    ) -> Any:
        resp = self.request("GET", path, params=params, scopes=scopes)
        return _decode(resp)

    def iter_pages(
        self, path: str, params: Mapping[str, Any] | None = None, *, scopes: tuple[str, ...] = ()
    ) -> Iterator[dict[str, Any]]:
        """Yield pages lazily, following ``next`` (works for limit/offset and cursor pages).

        Only one page is held at a time, so memory does not grow with the number of pages.
        """
        url: str | None = self.url(path)
        query = dict(params or {})
        while url:
            page = self.get_json(url, query or None, scopes=scopes)
            next_url = page.get("next")
            yield page
            url = self._same_origin(next_url) if next_url else None
            query = {}

    # ---------------------------------------------------------------- projects

    def list_projects(self) -> Iterator[dict[str, Any]]:
        """Projects the key can see (``GET /api/projects/``): where a project id is found."""
        for page in self.iter_pages("/api/projects/"):
            yield from page.get("results", [])

    # ---------------------------------------------------------------- exports

    def create_export(
        self,
        export_format: str,
        *,
        insight: int | None = None,
        dashboard: int | None = None,
        export_context: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``POST /exports/``; PostHog may hold it open until rendering ends (``post_timeout``).

        Never retried once sent: a read timeout raises :class:`PostHogConnectionError` with
        ``read_timeout=True`` and the caller looks the export up in the list instead.
        """
        body: dict[str, Any] = {"export_format": export_format}
        scopes = ["export:write"]
        if insight is not None:
            body["insight"] = insight
            scopes.append("insight:read")
        if dashboard is not None:
            body["dashboard"] = dashboard
            scopes.append("dashboard:read")
        if export_context is not None:
            body["export_context"] = dict(export_context)
            if export_context.get("source"):
                scopes.append("query:read")
        resp = self.request(
            "POST", "exports/", json_body=body, scopes=tuple(scopes), timeout=self.post_timeout
        )
        return _decode(resp)

    def get_export(self, export_id: int) -> dict[str, Any]:
        return self.get_json(f"exports/{export_id}/", scopes=("export:read",))

    def iter_exports(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """The key owner's exports, newest first (PostHog orders them by ``-created_at``)."""
        params = {k: v for k, v in filters.items() if v is not None}
        for page in self.iter_pages("exports/", params, scopes=("export:read",)):
            yield from page.get("results", [])

    def download_export_content(
        self, export_id: int, dest: Path, *, chunk_bytes: int = DOWNLOAD_CHUNK_BYTES
    ) -> DownloadResult:
        """Stream ``/exports/:id/content/`` to ``dest`` (atomically, with retries).

        Besides 404 (nothing stored, or expired), one PostHog version answers 425
        ``export_not_ready`` before the content exists (retried like a 5xx) and 400
        ``export_failed`` after the export failed (raised as :class:`PostHogExportFailed`).
        """
        try:
            return self.download(f"exports/{export_id}/content/", dest, scopes=("export:read",))
        except PostHogValidationError as exc:
            if exc.code != "export_failed":
                raise
            raise PostHogExportFailed(
                f"PostHog export {export_id} failed; its content route says: {exc.detail}",
                detail=exc.detail,
                status=exc.status,
                code=exc.code,
            ) from None

    def download(
        self,
        path: str,
        dest: Path,
        *,
        scopes: tuple[str, ...] = (),
        chunk_bytes: int = DOWNLOAD_CHUNK_BYTES,
        max_redirects: int = 5,
    ) -> DownloadResult:
        """Stream a URL to ``dest`` via a temporary file in the same folder, then rename.

        Redirects are followed by hand so that the key is only ever sent to PostHog's origin;
        a body shorter than its Content-Length is an error (and retried), never a file.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_parts(dest.parent):
            self.log.warning("Removed %s, left by a download that was killed", stale.name)

        def attempt() -> DownloadResult:
            url = self.url(path)
            redirected = False
            for _ in range(max_redirects + 1):
                resp = self._send_once(
                    "GET", url, None, None, scopes, (425,), stream=True, allow_redirects=False
                )
                if resp.status_code == 425:
                    resp.close()
                    raise PostHogServerError(
                        f"GET {path}: PostHog answered 425 (export_not_ready)",
                        status=425,
                        code="export_not_ready",
                        method="GET",
                        path=path,
                    )
                if not resp.is_redirect:
                    break
                location = resp.headers["Location"]
                resp.close()
                url = _next_hop(url, urljoin(url, location), path)
                redirected = True
            else:
                raise PostHogDownloadError(f"GET {path}: more than {max_redirects} redirects")
            with resp:
                return stream_to_file(resp, dest, chunk_bytes=chunk_bytes, redirected=redirected)

        return self.call_with_retries(attempt, what=f"download of {path}")

    # ---------------------------------------------------------------- groups

    def list_group_types(self) -> list[dict[str, Any]]:
        """``groups_types`` is a plain array and exists only under ``/api/projects/``."""
        return self.get_json(
            f"/api/projects/{self.project_id}/groups_types/", scopes=("group:read",)
        )

    def iter_group_pages(
        self, group_type_index: int, *, search: str | None = None, group_key: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Cursor pages (100 groups each, newest first, no ``count``)."""
        params: dict[str, Any] = {"group_type_index": group_type_index}
        if search is not None:
            params["search"] = search
        if group_key is not None:
            params["group_key"] = group_key
        return self.iter_pages("groups/", params, scopes=("group:read",))

    def lookup_group(self, group_type_index: int, group_key: str) -> dict[str, Any] | None:
        """The group with exactly this key, or None, read without side effects.

        Not ``groups/find``: with PostHog's CRM feature on, ``find`` creates a Notebook for the
        group in the customer's project (``ee/clickhouse/views/groups.py``). The groups list with
        ``search=<key>`` matches keys exactly (case-insensitively) but also any property text, so
        a short key would page through thousands of groups; ``group_key=<key>`` (key contains,
        AND-ed with ``search``) narrows it to keys containing the key, and the exact key is
        picked out here.
        """
        pages = self.iter_group_pages(group_type_index, search=group_key, group_key=group_key)
        for page in pages:
            for group in page.get("results") or []:
                if group.get("group_key") == group_key:
                    return group
        return None

    def group_property_definitions(self) -> dict[str, list[dict[str, Any]]]:
        return self.get_json("groups/property_definitions/", scopes=("group:read",))

    def group_property_values(
        self, group_type_index: int, key: str, *, value: str | None = None
    ) -> list[dict[str, Any]]:
        """Top values of a group property; PostHog answers a bare list or ``{"results": …}``."""
        params: dict[str, Any] = {"group_type_index": group_type_index, "key": key}
        if value is not None:
            params["value"] = value
        body = self.get_json("groups/property_values/", params, scopes=("group:read",))
        return body["results"] if isinstance(body, dict) else body

    # ---------------------------------------------------------------- insights

    def list_insights(
        self,
        *,
        offset: int = 0,
        limit: int = 100,
        refresh: str | None = None,
        basic: bool = False,
        order: str = "id",
        **filters: Any,
    ) -> dict[str, Any]:
        """One page of ``GET /insights/``, ordered by a unique field.

        PostHog orders by the ``order`` column (NULL for almost every insight) unless told
        otherwise, and ties come back in whatever order each LIMIT/OFFSET query yields, so
        pages overlap and skip rows. ``order=id`` makes every page part of one order.
        """
        params = _insight_params(refresh, basic, filters)
        params.update(limit=limit, offset=offset)
        if order:
            params["order"] = order
        return self.get_json("insights/", params, scopes=("insight:read",))

    def iter_insight_pages(
        self,
        *,
        refresh: str | None = None,
        basic: bool = False,
        page_size: int = 100,
        order: str = "id",
        prefetch: int = 2,
        offsets: Sequence[int] | None = None,
        **filters: Any,
    ) -> Iterator[InsightPage]:
        """Every page of the insights list (or the pages at ``offsets``), in order.

        Up to ``prefetch`` requests are in flight while the caller works on the current page
        (in a blocking mode PostHog computes a page's results inside the request). A page that
        fails with a query error (400, or 500 after retries) is listed metadata-only and its
        insights are fetched one by one, so one broken insight costs one row, not the snapshot.
        """

        def fetch(offset: int) -> InsightPage:
            try:
                page = self.list_insights(
                    offset=offset, limit=page_size, refresh=refresh, basic=basic, order=order,
                    **filters,
                )  # fmt: skip
            except (PostHogValidationError, PostHogServerError) as exc:
                if basic or exc.status not in (400, 500):
                    raise
                return self._insight_page_one_by_one(
                    offset, page_size, refresh, order, exc, filters
                )
            count = page.get("count")
            return InsightPage(
                offset, count if isinstance(count, int) else None, list(page.get("results") or [])
            )

        if offsets is not None:
            todo: Iterator[int] = iter(sorted(set(offsets)))
        else:
            first = fetch(0)
            yield first
            if first.count is None or not first.results:
                # No count to plan with: follow the pages one at a time.
                offset = page_size
                while first.results and first.count is None:
                    page = fetch(offset)
                    if not page.results:
                        return
                    yield page
                    offset += page_size
                return
            todo = iter(range(page_size, first.count, page_size))
        depth = max(1, prefetch)
        with ThreadPoolExecutor(depth, thread_name_prefix="posthog-pages") as pool:
            inflight: deque[Future[InsightPage]] = deque(
                pool.submit(fetch, off) for off in itertools.islice(todo, depth)
            )
            while inflight:
                page = inflight.popleft().result()
                following = next(todo, None)
                if following is not None:
                    inflight.append(pool.submit(fetch, following))
                yield page

    def _insight_page_one_by_one(
        self,
        offset: int,
        limit: int,
        refresh: str | None,
        order: str,
        exc: PostHogError,
        filters: Mapping[str, Any],
    ) -> InsightPage:
        self.log.warning(
            "Insights page at offset %d failed (%s); fetching its insights one by one",
            offset, exc.detail or exc.status,
        )  # fmt: skip
        page = self.list_insights(
            offset=offset, limit=limit, basic=True, order=order, **dict(filters)
        )
        results, vanished = [], 0
        for meta in page.get("results") or []:
            try:
                results.append(self.get_insight(meta["id"], refresh=refresh))
            except (PostHogValidationError, PostHogServerError) as item_exc:
                if item_exc.status not in (400, 500):
                    raise
                detail = item_exc.detail or f"HTTP {item_exc.status}"
                results.append({**meta, "query_status": {"error": True, "error_message": detail}})
            except PostHogNotFoundError:
                vanished += 1
        count = page.get("count")
        return InsightPage(
            offset, count if isinstance(count, int) else None, results, True, vanished
        )

    def get_insight(
        self, insight_id: int | str, *, refresh: str | None = None, basic: bool = False
    ) -> dict[str, Any]:
        """One insight by numeric id or ``short_id``."""
        query = _insight_params(refresh, basic, {})
        return self.get_json(f"insights/{insight_id}/", query, scopes=("insight:read",))

    def get_query_status(self, query_id: str) -> QueryStatus:
        """Poll an async query: 202 running, 200 done, 400 and 500 failed.

        A 500 here is PostHog's answer for a job that failed with an error it does not expose
        (``posthog/api/query.py``), so it is an answer about the query, not a passing fault.
        """
        resp = self.request("GET", f"query/{query_id}/", scopes=("query:read",), accept=(400, 500))
        try:
            body = resp.json()
        except ValueError:
            body = {}
        status = body.get("query_status", body) if isinstance(body, dict) else {}
        return QueryStatus(
            http_status=resp.status_code, status=status or {}, size=len(resp.content)
        )


def _insight_params(refresh: str | None, basic: bool, extra: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, value in extra.items():
        if value is None:
            continue
        if name == "created_by":
            params[name] = json.dumps(list(value))
        else:
            params[name] = value
    if basic:
        params["basic"] = "true"
    elif refresh is not None:
        params["refresh"] = refresh
    return params


def _too_long(exc: GateWaitTooLong, method: str, path: str) -> PostHogRateLimitError:
    wait = max(0.0, exc.retry_at - time.time())
    error = PostHogRateLimitError(
        f"PostHog will accept {method} {path} from this key again at {_utc(exc.retry_at)} "
        f"(in {wait:.0f}s; {exc.reason}), later than this step's retry budget allows. Run again "
        "after that time, or raise retry_budget_s.",
        retry_after=wait,
        method=method,
        path=path,
    )
    error.retryable = False
    error.retry_at = exc.retry_at
    return error


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _decode(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise PostHogServerError(
            f"{_shown_origin(resp.url)} answered {resp.status_code} with a body that is not "
            f"JSON ({resp.headers.get('Content-Type')}): is host the base URL of a PostHog "
            "instance (e.g. https://us.posthog.com), not a login page or a proxy?",
            status=resp.status_code,
        ) from None


def _next_hop(current: str, target: str, path: str) -> str:
    """Where a download redirect may go: http(s) only, and never from https down to plain http
    (the export's bytes would cross the network in clear, open to change). The error shows only
    scheme and host: the rest of a storage URL is a presigned signature."""
    scheme = urlsplit(target).scheme.lower()
    if scheme not in ("http", "https"):
        reason = "not an http(s) URL"
    elif urlsplit(current).scheme.lower() == "https" and scheme != "https":
        reason = "from https down to plain http"
    else:
        return target
    error = PostHogDownloadError(
        f"GET {path}: the download was redirected to {_shown_origin(target)}, {reason}; refused"
    )
    error.retryable = False
    raise error


def _shown_origin(url: str | None) -> str:
    """Scheme, host and port of a URL: what an error may show (never a path or query, which
    can hold a presigned signature)."""
    parts = urlsplit(url or "")
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}" if parts.scheme else "<no URL>"


def _cause(exc: BaseException) -> str:
    """The innermost reason of a connection error (refused, DNS, TLS verification ...), without
    the object reprs and URLs requests wraps it in."""
    seen: BaseException = exc
    for _ in range(8):
        inner = getattr(seen, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in seen.args if isinstance(a, BaseException)), None)
        if inner is None or inner is seen:
            break
        seen = inner
    text = re.sub(r"<[^<>]* object at 0x[0-9a-f]+>:?\s*", "", str(seen))
    text = re.sub(r"https?://[^\s'\")]+", lambda m: _shown_origin(m.group(0)), text)
    return f"{type(seen).__name__}: {text}"[:300]


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None

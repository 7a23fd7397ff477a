"""Typed errors raised by :mod:`posthog_assets.api.client`.

PostHog answers every failure with ``{"type", "code", "detail", "attr"}``. The client turns that
body into one of these classes so callers can decide by type (retry, fail fast, re-create) and so
the message a person reads says what to do next. None of these messages ever contains the API key.
"""

from __future__ import annotations

import re
import time

_SCOPE_RE = re.compile(r"scope '([a-z_]+:(?:read|write))'")


class PostHogError(Exception):
    """Base class: an HTTP call to PostHog did not give what was asked for.

    ``retry_after`` (seconds) and ``retry_at`` (epoch seconds) say when PostHog asked to be called
    again, if it did; ``export_id`` names the PostHog export an export run had made, if any.
    """

    retryable: bool = False
    retry_after: float | None = None
    retry_at: float | None = None
    export_id: int | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        detail: str | None = None,
        attr: str | None = None,
        method: str | None = None,
        path: str | None = None,
        retry_after: float | None = None,
        retry_at: float | None = None,
        export_id: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = detail
        self.attr = attr
        self.method = method
        self.path = path
        self.retry_after = retry_after
        self.retry_at = retry_at
        self.export_id = export_id


class PostHogAuthError(PostHogError):
    """401: the key is missing, wrong or revoked."""


class PostHogPermissionError(PostHogError):
    """403: the key lacks a scope or may not use this project."""

    @property
    def missing_scope(self) -> str | None:
        match = _SCOPE_RE.search(self.detail or "")
        return match.group(1) if match else None


class PostHogNotFoundError(PostHogError):
    """404: no such project, object, cursor, or an export that has expired."""


class PostHogValidationError(PostHogError):
    """400: PostHog rejected a field (named in ``attr``)."""


class PostHogRateLimitError(PostHogError):
    """429: throttled; ``retry_after`` is how long PostHog asked us to wait.

    ``retry_at`` (epoch seconds) is when PostHog will accept requests again; when that lies
    beyond the step's retry budget the error is not retryable within the step.
    """

    retryable = True

    def __init__(self, message: str, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        if self.retry_at is None and self.retry_after is not None:
            self.retry_at = time.time() + self.retry_after


class PostHogServerError(PostHogError):
    """5xx: PostHog (or something in front of it) failed; worth another try."""

    retryable = True


class PostHogConnectionError(PostHogError):
    """The connection failed, dropped or timed out before a full answer arrived."""

    retryable = True

    def __init__(
        self, message: str, *, request_sent: bool = True, read_timeout: bool = False, **kw: object
    ) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        #: False only when the request certainly never reached the server (connect failure).
        self.request_sent = request_sent
        #: The request was sent and no answer came in time (PostHog may still act on it).
        self.read_timeout = read_timeout


class PostHogDownloadError(PostHogError):
    """A download ended short of its Content-Length or was otherwise corrupt."""

    retryable = True


class PostHogPollTimeout(PostHogError):
    """Polling an export or a query gave up after the configured time budget."""

    retryable = True


class PostHogQueryTimeout(PostHogError):
    """PostHog stopped a query at its execution time limit (504, or 512 when it estimates the
    query too long): the same query would time out again, a narrower one may not."""


class PostHogQueryFailed(PostHogError):
    """A HogQL query ended with an error PostHog reported (bad query, failed async job)."""


class PostHogExportFailed(PostHogError):
    """PostHog set ``exception`` on an export: the export itself failed and will not recover."""

    def __init__(self, message: str, *, retryable: bool = False, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retryable = retryable


def advice_for(status: int, detail: str, scopes: tuple[str, ...]) -> str:
    """Say what a person should do about an error, in one sentence."""
    if status == 401:
        return (
            "Check that the personal API key is set and valid (it should start with 'phx_'); "
            "create one in PostHog under Settings > Personal API keys."
        )
    if status == 403:
        scope = _SCOPE_RE.search(detail or "")
        if scope:
            return (
                f"The key lacks scope {scope.group(1)}: add it to the personal API key in PostHog "
                "or use a key that has it."
            )
        if "project" in (detail or "").lower():
            return "The key may not use this project: check project_id or the key's project list."
        if scopes:
            return f"This call needs scope(s) {', '.join(scopes)}: check the key's scopes."
        return "Check the key's scopes and project access."
    if status == 404:
        return "Check the project id and object id (an export 404s once it has expired)."
    if status == 429:
        return (
            "PostHog rate-limited this key (240/min and 1200/h for insights, 480/min and "
            "4800/h for other routes); other tools may be using the same key."
        )
    if status >= 500:
        return "PostHog failed on its side; a retry usually helps."
    return "Fix the request as the detail says."

"""Queries through ``POST /query/`` (HogQL and other kinds), inside PostHog's limits.

What PostHog does with a query sent with a personal API key (``posthog/api/query.py``,
``posthog/hogql/constants.py``, ``posthog/hogql/user_query_validator.py``):

- without a ``LIMIT`` it returns 100 rows; a ``LIMIT`` above 50,000 is silently lowered to
  50,000, so a page is never asked for more (:data:`MAX_ROWS`) and a full page means "more may
  follow"; ``OFFSET`` is refused: pages are keyset (:func:`keyset_pages`);
- ``refresh: blocking`` answers from a cache up to 5 minutes old, so a page re-read after late
  events could be stale: pages use ``force_blocking``;
- a query stops at its execution time limit (about 10 s) with a 504, or is refused up front with
  512 when PostHog estimates it too long: :class:`PostHogQueryTimeout`, for the caller to narrow;
- 3 queries run at once per organisation, the rest wait up to 30 s and then get 429: each client
  holds at most ``max_concurrent_queries`` in flight;
- ``force_async`` answers 202 at once and is followed with ``GET /query/:id/``: a page whose
  blocking answer outlives the read timeout is asked again that way.

No Dagster here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from posthog_assets.api.client import PostHogClient
from posthog_assets.api.errors import (
    PostHogConnectionError,
    PostHogPollTimeout,
    PostHogQueryFailed,
    PostHogQueryTimeout,
)
from posthog_assets.api.polling import PollPolicy

#: PostHog's ``MAX_SELECT_RETURNED_ROWS``: the most rows one query returns, whatever it asks.
MAX_ROWS = 50_000
QUERY_SCOPES = ("query:read",)
#: ``ClickHouseQueryTimeOut`` and ``ClickHouseEstimatedQueryExecutionTimeTooLong``.
TIMEOUT_STATUSES = (504, 512)
_TIMEOUT_WORDS = ("max execution time", "execution time is too long", "timeout")


@dataclass
class HogQLResult:
    """One query's answer: its columns, its rows, and the bytes PostHog sent for it."""

    columns: list[str]
    rows: list[list[Any]]
    bytes: int
    asynchronous: bool = False

    def records(self) -> Iterator[dict[str, Any]]:
        return (dict(zip(self.columns, row, strict=False)) for row in self.rows)


def string_literal(value: str) -> str:
    """A HogQL string literal (backslash escapes, as PostHog's printer writes them)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def datetime_literal(moment: datetime) -> str:
    """A UTC instant to the microsecond, as HogQL compares it with ``timestamp``."""
    text = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return f"toDateTime64('{text}', 6, 'UTC')"


def parse_instant(text: str) -> datetime:
    """PostHog's ``2026-12-01T10:00:00.123456Z`` (no fraction when it is zero)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def run_hogql(
    client: PostHogClient,
    query: str,
    *,
    poll: PollPolicy,
    name: str | None = None,
    asynchronous: bool = False,
) -> HogQLResult:
    """Run a HogQL ``query`` and return every row PostHog returned for it.

    Blocking (``force_blocking``) unless ``asynchronous``; a blocking answer that outlives the
    client's read timeout is asked again with ``force_async`` and followed until done.
    """
    node = {"kind": "HogQLQuery", "query": query}
    refresh = "force_async" if asynchronous else "force_blocking"
    answer, size, followed = run_query(client, node, poll=poll, name=name, refresh=refresh)
    if not isinstance(answer, dict) or not isinstance(answer.get("results"), list):
        raise PostHogQueryFailed("PostHog's answer to a HogQL query has no results list")
    return HogQLResult(
        columns=[str(c) for c in answer.get("columns") or []],
        rows=answer["results"],
        bytes=size,
        asynchronous=followed,
    )


def run_query(
    client: PostHogClient,
    node: dict[str, Any],
    *,
    poll: PollPolicy,
    name: str | None = None,
    refresh: str = "force_blocking",
) -> tuple[dict[str, Any], int, bool]:
    """Run any query node (HogQL, ExperimentQuery, ...): PostHog's answer, the bytes it took,
    and whether it was followed asynchronously. A blocking mode whose answer outlives the read
    timeout is asked again with ``force_async``."""
    with client.query_slots:
        if refresh in ("blocking", "force_blocking"):
            try:
                answer, size = _post(client, node, name, refresh)
                return answer, size, False
            except PostHogConnectionError as exc:
                if not exc.read_timeout:
                    raise
                client.log.info(
                    "A query took longer than the read timeout; asking again asynchronously "
                    "(force_async) and following it"
                )
                refresh = "force_async"
        answer, size = _post(client, node, name, refresh, poll=poll)
        return answer, size, True


def _post(
    client: PostHogClient,
    node: dict[str, Any],
    name: str | None,
    refresh: str,
    *,
    poll: PollPolicy | None = None,
) -> tuple[dict[str, Any], int]:
    body: dict[str, Any] = {"query": node, "refresh": refresh}
    if name:
        body["name"] = name
    resp = client.request(
        "POST", "query/", json_body=body, scopes=QUERY_SCOPES, accept=TIMEOUT_STATUSES,
        idempotent=False,
    )  # fmt: skip
    if resp.status_code in TIMEOUT_STATUSES:
        raise _timeout(resp.status_code, _detail(resp))
    size = len(resp.content)
    answer = resp.json()
    if not isinstance(answer, dict):
        raise PostHogQueryFailed("PostHog's answer to a query is not an object")
    status = answer.get("query_status")
    if isinstance(status, dict) and status.get("complete") is False:
        if poll is None:
            raise PostHogQueryFailed("PostHog answered a blocking query with a running job")
        answer, more = _follow(client, str(status["id"]), poll)
        size += more
    return answer, size


def _follow(client: PostHogClient, query_id: str, poll: PollPolicy) -> tuple[Any, int]:
    """Poll ``GET /query/:id/`` until the job ends; cancel it when ``poll`` runs out."""
    deadline = time.monotonic() + poll.timeout_s
    size = 0
    for wait in poll.waits():
        state = client.get_query_status(query_id)
        size += state.size
        if state.failed:
            message = state.error_message or "query failed"
            if any(word in message.lower() for word in _TIMEOUT_WORDS):
                raise _timeout(state.http_status, message)
            raise PostHogQueryFailed(f"HogQL query {query_id} failed: {message}")
        if state.complete:
            results = state.status.get("results")
            return (results if isinstance(results, dict) else {}), size
        if time.monotonic() + wait > deadline:
            client.request("DELETE", f"query/{query_id}/", scopes=QUERY_SCOPES)
            raise PostHogPollTimeout(
                f"HogQL query {query_id} still running after {poll.timeout_s:g}s; cancelled it"
            )
        time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def _detail(resp: Any) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.reason or ""
    return str(body.get("detail") or "") if isinstance(body, dict) else ""


def _timeout(status: int, detail: str) -> PostHogQueryTimeout:
    return PostHogQueryTimeout(
        f"PostHog stopped a HogQL query at its execution time limit ({status}: {detail})",
        status=status,
        detail=detail,
        path="query/",
    )


def keyset_pages(
    run: Callable[[str], HogQLResult],
    sql: Callable[[list[Any] | None], str],
    page_size: int,
) -> Iterator[HogQLResult]:
    """Every page of a keyset-paged query: ``sql(last_row)`` builds the next page's query from
    the previous page's last row (None for the first); a page shorter than ``page_size`` is the
    last. The caller's ORDER BY must be unique (e.g. ``timestamp, uuid``) and its key taken
    from the row as PostHog returned it (PostHog orders UUIDs by their second half)."""
    if not 0 < page_size <= MAX_ROWS:
        raise ValueError(f"page_size must be 1 to {MAX_ROWS}, got {page_size}")
    last: list[Any] | None = None
    while True:
        page = run(sql(last))
        yield page
        if len(page.rows) < page_size:
            return
        last = page.rows[-1]

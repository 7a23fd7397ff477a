"""``posthog.events``: one partition per UTC day of the events' ``timestamp``, read through HogQL.

Why these choices (PostHog's ``posthog/hogql/database/schema/events.py`` and ``/query/``):

- Pages are keyset on ``(timestamp, uuid)``: ``OFFSET`` is refused for personal API keys, and a
  key of ``timestamp`` alone skips events sharing the boundary timestamp. The cursor is the last
  row as PostHog returned it (ClickHouse orders UUIDs by their second half; never compared here).
- The partition is the day of ``timestamp`` (when the event happened), the column analysts
  filter on. Events arrive late (``created_at``, ingestion time, can be days after
  ``timestamp``), so re-reading a day is honest: it replaces that day with what PostHog holds
  now, and the schedule re-reads the last ``lookback_days`` days. ``created_at`` is the only
  ingestion-time column HogQL exposes, but it is not indexed for a day's read, so it is stored,
  not used as the cursor.
- PostHog's ``count()`` of the day is asked before the first page: the pages must give at least
  as many rows (late events arriving meanwhile may add some), or the fetch fails and nothing is
  written.
- A page that hits PostHog's execution time limit is asked again over half its time range (down
  to ``min_window_s``), then once asynchronously; only then does the day fail.
"""

import json
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import dagster as dg

from posthog_assets.api.client import PostHogClient
from posthog_assets.api.errors import PostHogError, PostHogQueryTimeout
from posthog_assets.api.hogql import (
    MAX_ROWS,
    HogQLResult,
    datetime_literal,
    parse_instant,
    run_hogql,
    string_literal,
)
from posthog_assets.api.polling import PollPolicy
from posthog_assets.config import EventsConfig, PostHogProject, property_column
from posthog_assets.snapshots.checks import MAX_LISTED, duckdb_check, select_rows
from posthog_assets.snapshots.source import SnapshotSource, StageRequest
from posthog_assets.tables import EVENTS_GROUP, Column, Table, columns, json_as_text

EVENT_DATE = Column(
    "event_date",
    "DATE",
    "UTC day of the event's timestamp: the partition; re-reading a day replaces its rows.",
)
EVENT_COLUMNS = columns("""
    uuid            UUID         The event's id; unique.
    event           VARCHAR      The event's name ($pageview, signed_up, ...).
    timestamp       TIMESTAMPTZ  When the event happened (the sender's clock, in UTC).
    distinct_id     VARCHAR      The id the event was sent with.
    person_id       UUID         The person PostHog resolves the event to, as its HogQL
                                 person_id gives it (with persons on events: the person at
                                 ingestion, merges applied).
    properties      JSON         Every property of the event.
    elements_chain  VARCHAR      Autocaptured elements, in PostHog's chain format.
    created_at      TIMESTAMPTZ  When PostHog ingested the event (later than timestamp for
                                 late events).
""")
_SELECTED = [c.name for c in EVENT_COLUMNS]


class EventsIncomplete(PostHogError):
    """The pages of a day gave fewer events than PostHog counted for it. Not retried within
    the run: a re-read would most likely fall short again (e.g. a team whose person_id join
    drops personless events)."""


def events_table(config: EventsConfig) -> Table:
    """The table of a project's events: the fixed columns and its promoted properties."""
    promoted = tuple(
        Column(property_column(name), "VARCHAR", f"The event property {name} (as text).")
        for name in config.properties
    )
    return Table(
        name="events",
        description="PostHog's events, one partition per UTC day of their timestamp, read "
        "through HogQL by keyset on (timestamp, uuid).",
        group=EVENTS_GROUP,
        columns=(*json_as_text(EVENT_COLUMNS), *promoted),
        key=("uuid",),
        partition=EVENT_DATE,
        checks=(events_match_posthog_counts,),
    )


def events_partitions(config: EventsConfig) -> dg.DailyPartitionsDefinition:
    """A partition per whole UTC day from ``start_date`` (today's appears once it is over)."""
    return dg.DailyPartitionsDefinition(start_date=config.start_date, timezone="UTC", end_offset=0)


def event_filter(config: EventsConfig) -> str:
    """The HogQL condition of the configured event names ('' for every event)."""
    if not config.event_names:
        return ""
    return f" AND event IN ({', '.join(string_literal(e) for e in config.event_names)})"


def day_bounds(day: str) -> tuple[datetime, datetime]:
    start = datetime.fromisoformat(day).replace(tzinfo=UTC)
    return start, start + timedelta(days=1)


@dataclass
class _Window:
    """Part of the day still to read: ``[start, end)``, after the keyset ``after`` if set."""

    start: datetime
    end: datetime
    after: tuple[str, str] | None = None
    asynchronous: bool = False


class EventsSource(SnapshotSource):
    """The events of one day (the run's partition)."""

    def __init__(self, project: PostHogProject, config: EventsConfig) -> None:
        self.project = project
        self.config = config
        self.table = events_table(config)
        self.partitions_def = events_partitions(config)

    def select_sql(self, window: _Window) -> str:
        promoted = "".join(
            f", properties.{name} AS {property_column(name)}" for name in self.config.properties
        )
        where = (
            f"timestamp >= {datetime_literal(window.start)} AND "
            f"timestamp < {datetime_literal(window.end)}{event_filter(self.config)}"
        )
        if window.after is not None:
            ts = datetime_literal(parse_instant(window.after[0]))
            uuid = string_literal(window.after[1])
            where += f" AND (timestamp > {ts} OR (timestamp = {ts} AND uuid > toUUID({uuid})))"
        return (
            f"SELECT {', '.join(_SELECTED)}{promoted} FROM events WHERE {where} "
            f"ORDER BY timestamp ASC, uuid ASC LIMIT {self.config.page_size}"
        )

    def count(self, client: PostHogClient, poll: PollPolicy, start: datetime, end: datetime) -> int:
        """PostHog's count of the configured events in ``[start, end)``, in halves when a
        count hits PostHog's execution time limit."""
        sql = (
            f"SELECT count() AS events FROM events WHERE timestamp >= {datetime_literal(start)} "
            f"AND timestamp < {datetime_literal(end)}{event_filter(self.config)}"
        )
        try:
            result = run_hogql(client, sql, poll=poll, name="posthog-assets events count")
        except PostHogQueryTimeout:
            middle = start + (end - start) / 2
            if (middle - start).total_seconds() < self.config.min_window_s:
                raise
            return self.count(client, poll, start, middle) + self.count(client, poll, middle, end)
        return int(result.rows[0][0]) if result.rows else 0

    def day_counts(
        self, client: PostHogClient, poll: PollPolicy, first: str, last: str
    ) -> dict[str, int]:
        """PostHog's count of events per UTC day from ``first`` to ``last``: one query, or
        halves of the range when one hits PostHog's execution time limit."""
        start, end = day_bounds(first)[0], day_bounds(last)[1]
        sql = (
            # toDate alone would give the day in the project's timezone (HogQL applies it)
            "SELECT toDate(toTimeZone(timestamp, 'UTC')) AS day, count() AS events "
            "FROM events WHERE "
            f"timestamp >= {datetime_literal(start)} AND timestamp < {datetime_literal(end)}"
            f"{event_filter(self.config)} GROUP BY day ORDER BY day LIMIT {MAX_ROWS}"
        )
        try:
            answer = run_hogql(client, sql, poll=poll, name="posthog-assets events per day")
        except PostHogQueryTimeout:
            if first == last:
                return {first: self.count(client, poll, start, end)}
            first_day = date.fromisoformat(first)
            split = first_day + timedelta(days=(date.fromisoformat(last) - first_day).days // 2)
            return {
                **self.day_counts(client, poll, first, split.isoformat()),
                **self.day_counts(client, poll, (split + timedelta(days=1)).isoformat(), last),
            }
        return {str(day)[:10]: int(n) for day, n in answer.rows}

    def stage(self, request: StageRequest) -> dict[str, Any]:
        if request.partition_key is None:
            raise ValueError("posthog/events is partitioned by day: launch it for a partition")
        client, config = request.client, self.config
        poll = request.resource.poll_policy()
        start, end = day_bounds(request.partition_key)
        expected = self.count(client, poll, start, end)
        figures = {"posthog_count": expected, "pages": 0, "bytes": 0, "window_splits": 0,
                   "async_pages": 0}  # fmt: skip
        windows = [_Window(start, end)]
        rows = 0
        while windows:
            window = windows.pop(0)
            try:
                page = run_hogql(
                    client, self.select_sql(window), poll=poll,
                    name=f"posthog-assets events {request.partition_key}",
                    asynchronous=window.asynchronous,
                )  # fmt: skip
            except PostHogQueryTimeout:
                windows[:0] = self._narrower(window, request)
                figures["window_splits"] += 1
                continue
            figures["pages"] += 1
            figures["bytes"] += page.bytes
            figures["async_pages"] += int(page.asynchronous)
            rows += request.staging.write_lists(page.columns, self._rows(page))
            if len(page.rows) >= config.page_size:  # a full page: more may follow
                last = dict(zip(page.columns, page.rows[-1], strict=False))
                windows.insert(0, replace(window, after=(last["timestamp"], last["uuid"])))
        if rows < expected:
            raise EventsIncomplete(
                f"posthog.events {request.partition_key}: PostHog counts {expected} events, "
                f"the pages gave {rows}; nothing was written (re-run the partition)"
            )
        request.log.info(
            "Events of %s: %d rows in %d pages (PostHog counted %d before the first)",
            request.partition_key, rows, figures["pages"], expected,
        )  # fmt: skip
        return {"rows": rows, "event_date": request.partition_key, **figures}

    def _narrower(self, window: _Window, request: StageRequest) -> list[_Window]:
        """Half the window's remaining time range each, or the same window asynchronously."""
        begin = parse_instant(window.after[0]) if window.after else window.start
        half = (window.end - begin) / 2
        if half.total_seconds() >= self.config.min_window_s:
            middle = begin + half
            request.log.warning(
                "A page of %s timed out in PostHog; reading %s..%s and %s..%s apart",
                request.partition_key, begin.time(), middle.time(), middle.time(),
                window.end.time(),
            )  # fmt: skip
            return [replace(window, end=middle), _Window(middle, window.end)]
        if not window.asynchronous:
            return [replace(window, asynchronous=True)]
        raise PostHogQueryTimeout(
            f"posthog.events {request.partition_key}: a page from {begin.isoformat()} timed out "
            f"in PostHog even over {self.config.min_window_s:g}s and asynchronously; lower "
            "page_size in the events settings"
        )

    def _rows(self, page: HogQLResult) -> list[list[Any]]:
        """The page's rows, promoted properties as text (JSON for numbers, booleans, objects)."""
        promoted = [i for i, c in enumerate(page.columns) if c.startswith("prop_")]
        for row in page.rows if promoted else ():
            for i in promoted:
                if row[i] is not None and not isinstance(row[i], str):
                    row[i] = json.dumps(row[i])
        return page.rows


def events_match_posthog_counts(
    project: PostHogProject, table: Table, asset_key: dg.AssetKey
) -> dg.AssetChecksDefinition:
    """Each materialized day holds as many events as PostHog counts for it now."""
    config = project.events
    if config is None:
        raise ValueError(f"project '{project.name}' reads no events")

    @duckdb_check(
        project,
        asset_key,
        "events_match_posthog_counts",
        "Each materialized day of posthog.events holds as many events as PostHog counts for it "
        "now (one count() query over those days). A difference means events arrived late, or "
        "were deleted, after the day was read: materialize those days again.",
        blocking=False,
    )
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        days = sorted(context.instance.get_materialized_partitions(asset_key))
        if not days:
            return dg.AssetCheckResult(passed=False, description="No day materialized yet.")
        resource = getattr(context.resources, project.resource_key)
        source = EventsSource(project, config)
        posthog = source.day_counts(
            resource.get_client(log=context.log), resource.poll_policy(), days[0], days[-1]
        )
        rows = select_rows(
            context,
            table.name,
            "SELECT event_date::VARCHAR, count(*) FROM {table} WHERE project_id = ? GROUP BY 1",
            [resource.stored_project_id],
        )
        stored = {str(day): int(n) for day, n in rows or []}
        differing = [
            f"{day}: stored {stored.get(day, 0)}, PostHog {posthog.get(day, 0)}"
            for day in days
            if stored.get(day, 0) != posthog.get(day, 0)
        ]
        return dg.AssetCheckResult(
            passed=not differing,
            metadata={
                "days_compared": len(days),
                "days_differing": len(differing),
                "stored_events": sum(stored.get(d, 0) for d in days),
                "posthog_events": sum(posthog.get(d, 0) for d in days),
            },
            description=(
                f"{len(differing)} day(s) differ from PostHog's count: "
                + "; ".join(differing[:MAX_LISTED])
                + ". Materialize those days again."
                if differing
                else None
            ),
        )

    return _check

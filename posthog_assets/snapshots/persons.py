"""``posthog.persons`` and ``posthog.person_distinct_ids``: the project's current persons and
which distinct ids belong to whom, read through HogQL and replaced in one transaction.

HogQL's ``persons`` and ``person_distinct_ids`` are PostHog's own argMax views over versioned
rows (``posthog/hogql/database/schema/persons.py``, ``person_distinct_ids.py``): a deleted
person, and the person merged away into another, is absent; a merged person's distinct ids point
at the person they were merged into. So the snapshot stores what PostHog shows, as it shows it.
Persons have no modification time (``created_at`` is not one), so each snapshot reads them all,
keyset-paged on ``id`` and on ``distinct_id`` (never ``OFFSET``, which PostHog refuses).

Counted against PostHog: the persons created before the snapshot started (PostHog's count is
asked after the last page, so persons merged away meanwhile cannot make it fail) and the
distinct ids (counted before the first page); a shortfall fails the fetch and writes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from posthog_assets.api.errors import PostHogError
from posthog_assets.api.hogql import (
    datetime_literal,
    keyset_pages,
    parse_instant,
    run_hogql,
    string_literal,
)
from posthog_assets.config import PersonsConfig, PostHogProject
from posthog_assets.snapshots.source import SnapshotSource, StageRequest
from posthog_assets.tables import EVENTS_GROUP, Table, columns, json_as_text

PERSONS = Table(
    name="persons",
    description="PostHog's current persons (deleted and merged-away persons are absent, as in "
    "PostHog's persons table), replaced by each snapshot.",
    group=EVENTS_GROUP,
    columns=json_as_text(
        columns("""
            id             UUID         The person's id (events.person_id).
            created_at     TIMESTAMPTZ  When PostHog created the person.
            is_identified  BOOLEAN      Whether the person was identified ($identify).
            properties     JSON         The person's properties.
        """)
    ),
    key=("id",),
)
PERSON_DISTINCT_IDS = Table(
    name="person_distinct_ids",
    description="Which person each distinct id belongs to now (after merges), replaced with "
    "posthog.persons in the same transaction.",
    group=EVENTS_GROUP,
    columns=columns("""
        distinct_id  VARCHAR  A distinct id events are sent with.
        person_id    UUID     The person it belongs to (posthog.persons.id).
    """),
    key=("distinct_id",),
)


class PersonsIncomplete(PostHogError):
    """The pages gave fewer persons or distinct ids than PostHog counted. Not retried within
    the run: the next scheduled snapshot reads them all again."""


class PersonsSource(SnapshotSource):
    """Persons and their distinct ids, in one fetch."""

    table = PERSONS
    companions = (PERSON_DISTINCT_IDS,)

    def __init__(self, project: PostHogProject, config: PersonsConfig) -> None:
        self.project = project
        self.config = config

    def stage(self, request: StageRequest) -> dict[str, Any]:
        client, size = request.client, self.config.page_size
        poll = request.resource.poll_policy()
        started = parse_instant(request.snapshot_at)

        def run(sql: str) -> Any:
            return run_hogql(client, sql, poll=poll, name="posthog-assets persons")

        def count(sql: str) -> int:
            rows = run(sql).rows
            return int(rows[0][0]) if rows else 0

        ids_before = count("SELECT count() AS ids FROM person_distinct_ids")
        figures = {"pages": 0, "bytes": 0}
        persons = created_before = 0
        for page in keyset_pages(
            run,
            lambda last: (
                "SELECT id, created_at, is_identified, properties FROM persons"
                + (f" WHERE id > {string_literal(str(last[0]))}" if last else "")
                + f" ORDER BY id ASC LIMIT {size}"
            ),
            size,
        ):
            rows = [_person(r) for r in page.records()]
            created_before += sum(1 for r in rows if _before(r["created_at"], started))
            persons += request.staging.write(rows)
            figures["pages"] += 1
            figures["bytes"] += page.bytes
        ids = 0
        for page in keyset_pages(
            run,
            lambda last: (
                "SELECT distinct_id, person_id FROM person_distinct_ids"
                + (f" WHERE distinct_id > {string_literal(str(last[0]))}" if last else "")
                + f" ORDER BY distinct_id ASC LIMIT {size}"
            ),
            size,
        ):
            ids += request.companions[PERSON_DISTINCT_IDS.name].write(page.records())
            figures["pages"] += 1
            figures["bytes"] += page.bytes
        persons_before = count(
            "SELECT count() AS persons FROM persons WHERE created_at < " + datetime_literal(started)
        )
        short = []
        if created_before < persons_before:
            short.append(
                f"PostHog counts {persons_before} persons created before the snapshot started, "
                f"the pages gave {created_before}"
            )
        if ids < ids_before:
            short.append(f"PostHog counted {ids_before} distinct ids, the pages gave {ids}")
        if short:
            raise PersonsIncomplete(
                f"posthog.persons: {'; '.join(short)}; nothing was written (run it again)"
            )
        return {
            "persons": persons,
            "distinct_ids": ids,
            "posthog_persons_created_before": persons_before,
            "posthog_distinct_ids": ids_before,
            **figures,
        }


def _person(record: dict[str, Any]) -> dict[str, Any]:
    record["is_identified"] = bool(record.get("is_identified"))  # HogQL answers 0 or 1
    return record


def _before(created_at: Any, moment: datetime) -> bool:
    return isinstance(created_at, str) and parse_instant(created_at) < moment

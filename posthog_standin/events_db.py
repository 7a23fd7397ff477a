"""Events and persons of one project in the stand-in's own in-memory DuckDB, shaped like the
ClickHouse tables PostHog's HogQL reads, with HogQL's views over them.

Tables (each a view over an immutable seeded table ``*_seed`` and a table ``*_extra`` that the
control plane appends to, so a reset only empties the ``*_extra`` tables):

- ``events``: ``uuid`` (UUID), ``event``, ``timestamp`` (TIMESTAMPTZ, microseconds, UTC),
  ``distinct_id``, ``properties`` (JSON text), ``elements_chain``, ``created_at`` (ingestion
  time), ``team_id``; plus ``uuid_ck``, the key ClickHouse sorts a UUID by (below).
- ``raw_persons``: ``id`` (UUID), ``created_at`` (milliseconds, as ClickHouse's ``DateTime64``
  whose default precision is 3), ``properties``, ``is_identified``, ``is_deleted``, ``version``.
- ``raw_person_distinct_ids``: ``distinct_id``, ``person_id``, ``is_deleted``, ``version``.

HogQL's views, as ``posthog/hogql/database/schema/persons.py``, ``person_distinct_ids.py`` and
``argmax.py`` define them: ``persons`` = per ``id`` the fields of the row with the highest
``version`` (``argMax``), ids whose latest row has ``is_deleted = 1`` (or a ``created_at`` more
than a day ahead) left out; ``person_distinct_ids`` = per ``distinct_id`` the latest row's
``person_id``, deleted ones left out. ``events.person_id`` is PostHog's persons-on-events value
by default (``hogql.PERSON_ID_ON_EVENTS``: no event dropped); with ``persons_on_events`` off it
goes through ``person_distinct_ids`` with an INNER JOIN (``join_with_person_distinct_ids_table``),
so an event whose distinct id has no live mapping disappears from any query that selects it.

ClickHouse sorts (and compares) UUIDs by their second half first ("Due to historical reasons,
UUIDs are sorted by their second half", ClickHouse's UUID data type page); ``ck()`` is that key
as text, and every UUID comparison or ordering here goes through it.

The seed is one set of DuckDB statements over ``range()`` and ``hash()`` (deterministic for a
seed and a DuckDB version), so a million events take a couple of seconds. Events are spread over
the ``days`` whole UTC days before the day the stand-in started. Within a day the i-th event
(by ``timestamp, uuid``) is the i-th generated, except that bursts of events share one exact
timestamp: the 40 events at day positions ``997*b - 20 .. 997*b + 19`` (b >= 1) and the 40 at
``50000*m - 20 .. 50000*m + 19`` (m >= 1), so pages of 1,000 (and many of 100) and pages of
50,000 end inside a burst (see :data:`BURST_RULE`).
"""

from __future__ import annotations

import json
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import duckdb

from .hashing import mix

BURST_RULE = {
    "width": 40,
    "small_period": 997,
    "large_period": 50_000,
    "positions": (
        "0-based positions within a UTC day (ordered by timestamp, uuid) sharing one timestamp: "
        "997*b-20 .. 997*b+19 for b >= 1, and 50000*m-20 .. 50000*m+19 for m >= 1 (the latter "
        "win where both apply)"
    ),
}

#: Event names and their share in percent (cumulative bounds are built from this order).
EVENT_MIX: tuple[tuple[str, int], ...] = (
    ("$pageview", 40),
    ("$autocapture", 22),
    ("$pageleave", 10),
    ("$screen", 5),
    ("feature_used", 7),
    ("$identify", 3),
    ("signed_up", 4),
    ("trial_started", 3),
    ("purchase", 3),
    ("subscription_renewed", 3),
)
_BROWSERS = ("Chrome", "Safari", "Firefox", "Microsoft Edge", "Opera")
_OSES = ("Mac OS X", "Windows", "iOS", "Android", "Linux")
_PATHS = ("/", "/pricing", "/signup", "/docs", "/blog", "/settings", "/billing", "/dashboard")
_PLANS = ("free", "pro", "enterprise")
#: Server-side events (posthog-python): no browser properties at all.
_SERVER_EVENTS = ("purchase", "subscription_renewed")
DAY_US = 86_400_000_000
#: How many personless distinct ids the seed draws from (``guest_00000`` ...).
GUEST_POOL = 5_000


def ck_of(text: str) -> str:
    """ClickHouse's sort key of a UUID: its second half, then its first (32 hex digits)."""
    hexed = str(uuidlib.UUID(text)).replace("-", "")
    return hexed[16:] + hexed[:16]


def _sql_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def _event_case(column: str) -> str:
    """A CASE over ``column % 100`` picking an event name by :data:`EVENT_MIX`."""
    parts, bound = [], 0
    for name, share in EVENT_MIX:
        bound += share
        parts.append(f"WHEN {column} % 100 < {bound} THEN '{name}'")
    return "CASE " + " ".join(parts) + " ELSE '$pageview' END"


@dataclass(frozen=True)
class EventSeedSpec:
    """What to seed: sizes, the day span and the seed number."""

    seed: int
    events: int
    persons: int
    days: int
    personless_share: float
    team_id: int


class EventStore:
    """One project's DuckDB; every query opens its own cursor, so threads may share it."""

    def __init__(self, spec: EventSeedSpec, *, now: datetime | None = None) -> None:
        self.spec = spec
        started = time.perf_counter()
        self.seeded_at = (now or datetime.now(UTC)).replace(microsecond=0)
        self.today = self.seeded_at.date()
        self.first_day = self.today - timedelta(days=max(spec.days, 1))
        self.con = duckdb.connect(":memory:")
        self._lock = threading.Lock()
        self.late_batches = 0
        self._day_counts: dict[date, int] | None = None
        self._raw_sizes: dict[str, int] | None = None
        self._seed()
        self.seed_seconds = time.perf_counter() - started

    # ---- plumbing ---------------------------------------------------------------------------
    def cursor(self) -> duckdb.DuckDBPyConnection:
        cur = self.con.cursor()
        cur.execute("SET TimeZone = 'UTC'")
        return cur

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        cur = self.cursor()
        try:
            return cur.execute(sql, params or []).fetchall()
        finally:
            cur.close()

    # ---- seeding ----------------------------------------------------------------------------
    def _day_plan(self) -> list[tuple[int, int, int, int]]:
        """(day index, day start in epoch microseconds, first event index, events that day)."""
        spec = self.spec
        days = max(spec.days, 1)
        weights = [0.7 + 0.6 * (mix(spec.seed, 71, d) % 1000) / 1000 for d in range(days)]
        total = sum(weights)
        counts = [int(spec.events * w / total) for w in weights]
        counts[-1] += spec.events - sum(counts)
        plan, first = [], 0
        for d, n in enumerate(counts):
            start = datetime.combine(self.first_day + timedelta(days=d), datetime.min.time(), UTC)
            plan.append((d, int(start.timestamp()) * 1_000_000, first, n))
            first += n
        return plan

    def _seed(self) -> None:
        spec = self.spec
        s = int(spec.seed)
        con = self.con
        # Everything seeded is anchored at midnight UTC of the start day (nothing is later), so
        # a seed number gives the same rows all day long.
        now_us = int(datetime.combine(self.today, datetime.min.time(), UTC).timestamp()) * 10**6
        n_persons = max(spec.persons, 1)
        share_ppm = int(round(max(0.0, min(spec.personless_share, 1.0)) * 1_000_000))
        con.execute("SET TimeZone = 'UTC'")
        # Deterministic 63-bit hashes of (seed, salt, x) and the identity rules of the seed.
        con.execute(f"CREATE MACRO h(salt, x) AS (hash({s}, salt, x) >> 1)::BIGINT")
        con.execute(
            "CREATE MACRO ck(u) AS substr(replace(CAST(u AS VARCHAR), '-', ''), 17, 16) "
            "|| substr(replace(CAST(u AS VARCHAR), '-', ''), 1, 16)"
        )
        # A DateTime as PostHog's JSON shows it: Python's isoformat() with Z, which leaves the
        # fraction out when it is zero (DRF's JSONEncoder; the cache's orjson OPT_UTC_Z agrees).
        con.execute(
            "CREATE MACRO fmt_ts(x) AS CASE WHEN x IS NULL THEN NULL "
            "WHEN epoch_us(x) % 1000000 = 0 THEN strftime(x, '%Y-%m-%dT%H:%M:%SZ') "
            "ELSE strftime(x, '%Y-%m-%dT%H:%M:%S.%fZ') END"
        )
        con.execute(
            "CREATE MACRO uuid_from(ms, a, b) AS CAST("
            "substr(printf('%012x', ms), 1, 8) || '-' || substr(printf('%012x', ms), 9, 4) "
            "|| '-7' || printf('%03x', a % 4096) || '-' || printf('%x', 8 + (a >> 12) % 4) "
            "|| printf('%03x', (a >> 14) % 4096) || '-' || printf('%06x', (a >> 26) % 16777216) "
            "|| printf('%06x', b % 16777216) AS UUID)"
        )
        # n_ids(p): 40% of persons have one distinct id (an anonymous device), 40% two (device
        # and user id, identified), 20% three (a second device, merged in from another person).
        con.execute("CREATE MACRO n_ids(p) AS 1 + CAST(h(11, p) % 10 < 6 AS INT) "
                    "+ CAST(h(11, p) % 10 < 2 AS INT)")  # fmt: skip
        con.execute(
            "CREATE MACRO device_id(salt, p) AS printf('%08x-%04x-7%03x-%04x-%012x', "
            "h(salt, p) % 4294967296, (h(salt, p) >> 32) % 65536, h(salt + 1, p) % 4096, "
            "32768 + (h(salt + 1, p) >> 12) % 16384, (h(salt + 2, p)) % 281474976710656)"
        )
        con.execute(
            "CREATE MACRO did(p, slot) AS CASE slot WHEN 0 THEN device_id(20, p) "
            "WHEN 1 THEN printf('user_%07d', p) ELSE device_id(30, p) END"
        )
        con.execute(
            "CREATE MACRO person_ms(p) AS "
            f"{now_us // 1000} - {90 * 86_400_000} + h(12, p) % {60 * 86_400_000}"
        )
        con.execute("CREATE MACRO person_uuid(p) AS uuid_from(person_ms(p), h(13, p), p)")
        con.execute(
            "CREATE MACRO ghost_uuid(p) AS uuid_from(person_ms(p) - 3600000, h(14, p), p + 8388608)"
        )
        # Each person's distinct ids, in slot order (what events draw theirs from).
        con.execute(
            f"CREATE TABLE person_dids AS SELECT range AS p, n_ids(range) AS n, "
            f"[did(range, 0), did(range, 1), did(range, 2)] AS ids FROM range({n_persons})"
        )
        con.execute("CREATE TABLE day_plan (d INTEGER, day_us BIGINT, first_idx BIGINT, n BIGINT)")
        con.executemany("INSERT INTO day_plan VALUES (?, ?, ?, ?)", self._day_plan())
        events_cols = (
            "uuid UUID, uuid_ck VARCHAR, event VARCHAR, timestamp TIMESTAMPTZ, "
            "distinct_id VARCHAR, properties VARCHAR, elements_chain VARCHAR, "
            "created_at TIMESTAMPTZ, team_id BIGINT"
        )
        con.execute(f"CREATE TABLE events_extra ({events_cols})")
        # Day positions k = 0..n-1 of each day; a burst shares its first event's timestamp.
        con.execute(
            f"""
            CREATE TEMP TABLE seed_src AS
            WITH base AS (
                SELECT first_idx + k AS i, day_us, n, k
                FROM (SELECT p.*, unnest(range(p.n)) AS k FROM day_plan p)
            ), anchored AS (
                SELECT *, CASE
                    WHEN k >= 49980 AND (k + 20) % 50000 < 40 THEN k - (k + 20) % 50000
                    WHEN k >= 977 AND (k + 20) % 997 < 40 THEN k - (k + 20) % 997
                    ELSE k END AS anchor
                FROM base
            )
            SELECT i,
                   day_us + anchor * {DAY_US} // n
                       + h(1, i - k + anchor) % greatest(1, ({DAY_US} // n) // 2) AS ts_us,
                   h(2, i) AS r1, h(3, i) AS r2, h(4, i) AS r3
            FROM anchored
            """
        )
        rows_sql = self._event_rows_sql("seed_src", now_us, n_persons, share_ppm)
        con.execute(f"CREATE TABLE events_seed AS {rows_sql}")
        con.execute("DROP TABLE seed_src")
        self._seed_persons(n_persons)
        con.execute("CREATE TABLE raw_persons_extra AS SELECT * FROM raw_persons_seed LIMIT 0")
        con.execute(
            "CREATE TABLE raw_person_distinct_ids_extra AS "
            "SELECT * FROM raw_person_distinct_ids_seed LIMIT 0"
        )
        con.execute(
            "CREATE VIEW events AS SELECT * FROM events_seed UNION ALL SELECT * FROM events_extra"
        )
        con.execute(
            "CREATE VIEW raw_persons AS "
            "SELECT * FROM raw_persons_seed UNION ALL SELECT * FROM raw_persons_extra"
        )
        con.execute(
            "CREATE VIEW raw_person_distinct_ids AS SELECT * FROM raw_person_distinct_ids_seed "
            "UNION ALL SELECT * FROM raw_person_distinct_ids_extra"
        )
        # argmax_select(): every field as argMax(field, version), grouped by the key, rows whose
        # latest is_deleted is 1 dropped; persons also clamp created_at (posthog/hogql/database/
        # argmax.py, schema/persons.py, schema/person_distinct_ids.py).
        con.execute(
            """
            CREATE VIEW persons AS
            SELECT id, arg_max(created_at, version) AS created_at,
                   arg_max(properties, version) AS properties,
                   arg_max(is_identified, version) AS is_identified,
                   arg_max(team_id, version) AS team_id
            FROM raw_persons GROUP BY id
            HAVING arg_max(is_deleted, version) = 0
               AND arg_max(created_at, version) < now() + INTERVAL 1 DAY
            """
        )
        con.execute(
            """
            CREATE VIEW person_distinct_ids AS
            SELECT distinct_id, arg_max(person_id, version) AS person_id,
                   arg_max(team_id, version) AS team_id
            FROM raw_person_distinct_ids GROUP BY distinct_id
            HAVING arg_max(is_deleted, version) = 0
            """
        )

    def _event_rows_sql(self, source: str, now_us: int, n_persons: int, share_ppm: int) -> str:
        """The SELECT that turns ``source`` rows (``i``, ``ts_us``, ``r1``..``r3``) into events;
        distinct ids come from ``person_dids`` (each person's list of them)."""
        spec = self.spec
        server = _sql_list(_SERVER_EVENTS)
        return f"""
            WITH named AS (
                SELECT i, ts_us, r1, r2, r3, {_event_case("r2")} AS event,
                       uuid_from(ts_us // 1000, r1, i) AS uuid,
                       (r3 >> 20) % {n_persons} AS p,
                       r3 % 1000000 < {share_ppm} AS personless
                FROM {source}
            )
            SELECT e.uuid, ck(e.uuid) AS uuid_ck, e.event,
                   CAST(make_timestamp(CAST(e.ts_us AS BIGINT)) AS TIMESTAMPTZ) AS timestamp,
                   CASE WHEN e.personless
                        THEN printf('guest_%05d', (e.r3 >> 20) % {GUEST_POOL})
                        ELSE d.ids[1 + (e.r3 >> 40) % d.n]
                   END AS distinct_id,
                   CASE WHEN list_contains({server}, e.event) THEN CAST(json_object(
                            '$lib', 'posthog-python', 'plan',
                            {_sql_list(_PLANS)}[1 + (e.r1 >> 33) % {len(_PLANS)}],
                            'amount', (e.r1 >> 36) % 500) AS VARCHAR)
                        ELSE CAST(json_object(
                            '$browser',
                            {_sql_list(_BROWSERS)}[1 + (e.r1 >> 33) % {len(_BROWSERS)}],
                            '$os', {_sql_list(_OSES)}[1 + (e.r1 >> 37) % {len(_OSES)}],
                            '$current_url', 'https://app.example.com'
                                || {_sql_list(_PATHS)}[1 + (e.r1 >> 41) % {len(_PATHS)}],
                            '$lib', 'web',
                            '$session_id', printf('%016x', (e.r2 >> 8) % 281474976710656)
                        ) AS VARCHAR) END AS properties,
                   CASE WHEN e.event = '$autocapture'
                        THEN 'button.btn.btn-primary:attr__class="btn btn-primary"nth-child="'
                             || (1 + e.r1 % 4) || '"nth-of-type="1"text="Sign up"'
                        ELSE '' END AS elements_chain,
                   CAST(make_timestamp(CAST(least({now_us}, e.ts_us + (e.r2 >> 30) % 3000000
                        + CASE WHEN (e.r3 >> 8) % 1000 < 5
                               THEN (1 + (e.r3 >> 12) % 72) * 3600000000 ELSE 0 END) AS BIGINT))
                        AS TIMESTAMPTZ) AS created_at,
                   {int(spec.team_id)} AS team_id
            FROM named e LEFT JOIN person_dids d ON d.p = e.p
        """

    def _seed_persons(self, n_persons: int) -> None:
        con = self.con
        team = int(self.spec.team_id)
        # Identified persons carry an email; anonymous ones do not have the key at all.
        props = (
            "CASE WHEN n_ids(p) > 1 THEN CAST(json_object("
            "'email', printf('user_%07d@example.com', p), "
            "'plan', {plans}[1 + (h(15, p) + {shift}) % 3], "
            "'$initial_browser', {browsers}[1 + h(16, p) % 5]) AS VARCHAR) "
            "ELSE CAST(json_object('plan', {plans}[1 + (h(15, p) + {shift}) % 3], "
            "'$initial_browser', {browsers}[1 + h(16, p) % 5]) AS VARCHAR) END"
        )
        plans, browsers = _sql_list(_PLANS), _sql_list(_BROWSERS)
        current = props.format(plans=plans, browsers=browsers, shift=0)
        older = props.format(plans=plans, browsers=browsers, shift=1)
        created = "CAST(make_timestamp(person_ms(p) * 1000) AS TIMESTAMPTZ)"
        # Every person's row (version 1 for the tenth whose properties were updated once, with
        # the older version 0 row kept), and the "ghost" persons the three-id persons absorbed:
        # a live version 0 row and its deletion (version 100, as delete_person writes it).
        con.execute(
            f"""
            CREATE TABLE raw_persons_seed AS
            WITH p AS (SELECT range AS p FROM range({n_persons}))
            SELECT person_uuid(p) AS id, ck(person_uuid(p)) AS id_ck, {created} AS created_at,
                   {current} AS properties, CAST(n_ids(p) > 1 AS TINYINT) AS is_identified,
                   CAST(0 AS TINYINT) AS is_deleted,
                   CAST(CASE WHEN h(17, p) % 10 = 0 THEN 1 ELSE 0 END AS BIGINT) AS version,
                   {team} AS team_id
            FROM p
            UNION ALL
            SELECT person_uuid(p), ck(person_uuid(p)), {created}, {older},
                   CAST(n_ids(p) > 1 AS TINYINT), 0, 0, {team}
            FROM p WHERE h(17, p) % 10 = 0
            UNION ALL
            SELECT ghost_uuid(p), ck(ghost_uuid(p)),
                   CAST(make_timestamp((person_ms(p) - 3600000) * 1000) AS TIMESTAMPTZ),
                   '{{}}', 0, CAST(d AS TINYINT), CAST(d * 100 AS BIGINT), {team}
            FROM p, (VALUES (0), (1)) v(d) WHERE n_ids(p) = 3
            """
        )
        # Each distinct id's mapping (version 0), and for the second device of a three-id
        # person its history: version 0 pointed at the ghost, version 1 at the person.
        con.execute(
            f"""
            CREATE TABLE raw_person_distinct_ids_seed AS
            SELECT d.ids[1 + slot] AS distinct_id, person_uuid(d.p) AS person_id,
                   CAST(0 AS TINYINT) AS is_deleted,
                   CAST(CASE WHEN slot = 2 THEN 1 ELSE 0 END AS BIGINT) AS version,
                   {team} AS team_id
            FROM person_dids d, range(3) s(slot) WHERE slot < d.n
            UNION ALL
            SELECT d.ids[3], ghost_uuid(d.p), 0, 0, {team} FROM person_dids d WHERE d.n = 3
            """
        )

    # ---- control-plane mutations --------------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            cur = self.cursor()
            try:
                cur.execute("DELETE FROM events_extra")
                cur.execute("DELETE FROM raw_persons_extra")
                cur.execute("DELETE FROM raw_person_distinct_ids_extra")
            finally:
                cur.close()
            self.late_batches = 0
            self._day_counts = self._raw_sizes = None

    def insert_late_events(self, day: date, count: int, event: str | None = None) -> dict[str, Any]:
        """``count`` events spread over the UTC ``day``, ingested now (``created_at``)."""
        if count < 0 or count > 5_000_000:
            raise ValueError("count must be between 0 and 5,000,000")
        with self._lock:
            self.late_batches += 1
            batch = self.late_batches
            now = datetime.now(UTC)
            now_us = int(now.timestamp() * 1_000_000)
            day_us = int(datetime.combine(day, datetime.min.time(), UTC).timestamp()) * 1_000_000
            base = int(self.spec.events) + batch * 10_000_000
            n = max(count, 1)
            cur = self.cursor()
            try:
                cur.execute(
                    f"""
                    CREATE OR REPLACE TEMP TABLE late_src AS
                    SELECT {base} + range AS i,
                           {day_us} + range * {DAY_US} // {n}
                               + h(5, {base} + range) % greatest(1, ({DAY_US} // {n}) // 2)
                               AS ts_us,
                           h(6, {base} + range) AS r1, h(7, {base} + range) AS r2,
                           h(8, {base} + range) AS r3
                    FROM range({int(count)})
                    """
                )
                rows_sql = self._event_rows_sql("late_src", now_us, max(self.spec.persons, 1), 0)
                cur.execute(f"CREATE OR REPLACE TEMP TABLE late_rows AS {rows_sql}")
                cur.execute(
                    "UPDATE late_rows SET created_at = CAST(make_timestamp(?) AS TIMESTAMPTZ)",
                    [now_us],
                )
                if event is not None:
                    cur.execute("UPDATE late_rows SET event = ?", [event])
                cur.execute("INSERT INTO events_extra SELECT * FROM late_rows")
                self._day_counts = None
                first = cur.execute(
                    "SELECT CAST(uuid AS VARCHAR) FROM late_rows ORDER BY timestamp LIMIT 5"
                ).fetchall()
            finally:
                cur.close()
        return {
            "inserted": count,
            "day": day.isoformat(),
            "created_at": now.isoformat().replace("+00:00", "Z"),
            "first_uuids": [row[0] for row in first],
        }

    def _latest_person(self, cur: duckdb.DuckDBPyConnection, person_id: str) -> tuple[Any, ...]:
        row = cur.execute(
            "SELECT created_at, properties, is_identified, is_deleted, version FROM raw_persons "
            "WHERE id = CAST(? AS UUID) ORDER BY version DESC LIMIT 1",
            [person_id],
        ).fetchone()
        if row is None:
            raise KeyError(f"no person {person_id}")
        return row

    def _person_distinct_ids(self, cur: duckdb.DuckDBPyConnection, person_id: str) -> list[Any]:
        """The live distinct ids of a person, with each one's latest version."""
        return cur.execute(
            """
            SELECT distinct_id, max(version) FROM raw_person_distinct_ids
            GROUP BY distinct_id
            HAVING arg_max(person_id, version) = CAST(? AS UUID)
               AND arg_max(is_deleted, version) = 0
            ORDER BY distinct_id
            """,
            [person_id],
        ).fetchall()

    def _write_person(
        self, cur: duckdb.DuckDBPyConnection, person_id: str, row: tuple[Any, ...]
    ) -> None:
        created_at, properties, is_identified, is_deleted, version = row
        self._raw_sizes = None
        cur.execute(
            "INSERT INTO raw_persons_extra VALUES (CAST(? AS UUID), ?, ?, ?, ?, ?, ?, ?)",
            [person_id, ck_of(person_id), created_at, properties, is_identified, is_deleted,
             version, int(self.spec.team_id)],
        )  # fmt: skip

    def _write_pdi(
        self, cur: duckdb.DuckDBPyConnection, distinct_id: str, person_id: str, deleted: int,
        version: int,
    ) -> None:  # fmt: skip
        self._raw_sizes = None
        cur.execute(
            "INSERT INTO raw_person_distinct_ids_extra VALUES (?, CAST(? AS UUID), ?, ?, ?)",
            [distinct_id, person_id, deleted, version, int(self.spec.team_id)],
        )

    def merge_persons(self, winner: str, loser: str) -> dict[str, Any]:
        """PostHog's merge: the loser's distinct ids now point at the winner (each one's version
        + 1), the winner gets the loser's properties it lacks (version + 1), and the loser's row
        is re-written deleted (version + 100, as ``delete_person`` does)."""
        winner, loser = str(uuidlib.UUID(winner)), str(uuidlib.UUID(loser))
        if winner == loser:
            raise ValueError("winner and loser are the same person")
        with self._lock:
            cur = self.cursor()
            try:
                win_row = self._latest_person(cur, winner)
                lose_row = self._latest_person(cur, loser)
                if win_row[3] or lose_row[3]:
                    raise ValueError("both persons must exist and not be deleted")
                moved = self._person_distinct_ids(cur, loser)
                for distinct_id, version in moved:
                    self._write_pdi(cur, distinct_id, winner, 0, int(version) + 1)
                merged = {**json.loads(lose_row[1] or "{}"), **json.loads(win_row[1] or "{}")}
                self._write_person(
                    cur, winner, (win_row[0], json.dumps(merged, separators=(",", ":")),
                                  1 if (win_row[2] or lose_row[2]) else 0, 0, win_row[4] + 1),
                )  # fmt: skip
                self._write_person(
                    cur, loser, (lose_row[0], lose_row[1], lose_row[2], 1, lose_row[4] + 100)
                )
            finally:
                cur.close()
        return {"winner": winner, "loser": loser, "moved_distinct_ids": [d for d, _ in moved]}

    def delete_person(self, person_id: str) -> dict[str, Any]:
        """``delete_person`` (``posthog/models/person/util.py``): the person row re-written with
        ``is_deleted = 1`` and version + 100, each of its distinct ids likewise."""
        person_id = str(uuidlib.UUID(person_id))
        with self._lock:
            cur = self.cursor()
            try:
                row = self._latest_person(cur, person_id)
                if row[3]:
                    raise ValueError(f"person {person_id} is already deleted")
                ids = self._person_distinct_ids(cur, person_id)
                for distinct_id, version in ids:
                    self._write_pdi(cur, distinct_id, person_id, 1, int(version) + 100)
                self._write_person(cur, person_id, (row[0], row[1], row[2], 1, row[4] + 100))
            finally:
                cur.close()
        return {"deleted": person_id, "distinct_ids": [d for d, _ in ids]}

    def update_person(self, person_id: str, properties: dict[str, Any]) -> dict[str, Any]:
        """``$set`` on a person: the properties merged in, version + 1."""
        person_id = str(uuidlib.UUID(person_id))
        with self._lock:
            cur = self.cursor()
            try:
                row = self._latest_person(cur, person_id)
                if row[3]:
                    raise ValueError(f"person {person_id} is deleted")
                merged = {**json.loads(row[1] or "{}"), **properties}
                text = json.dumps(merged, separators=(",", ":"))
                self._write_person(cur, person_id, (row[0], text, row[2], 0, row[4] + 1))
            finally:
                cur.close()
        return {"id": person_id, "version": row[4] + 1, "properties": merged}

    # ---- read helpers for the control plane ---------------------------------------------------
    def day_counts(self) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT CAST(CAST(timestamp AS DATE) AS VARCHAR) AS day, count(*) FROM events "
            "GROUP BY ALL ORDER BY day"
        )
        return [{"day": day, "events": n} for day, n in rows]

    def day_count_map(self) -> dict[date, int]:
        """Events per UTC day (cached until the next insert or reset)."""
        counts = self._day_counts
        if counts is None:
            rows = self.query("SELECT CAST(timestamp AS DATE), count(*) FROM events GROUP BY ALL")
            counts = self._day_counts = {day: int(n) for day, n in rows}
        return counts

    def raw_sizes(self) -> dict[str, int]:
        """Rows of each raw table, what a query over it (or its view) scans."""
        sizes = self._raw_sizes
        if sizes is None:
            row = self.query(
                "SELECT (SELECT count(*) FROM raw_persons), "
                "(SELECT count(*) FROM raw_person_distinct_ids)"
            )[0]
            sizes = self._raw_sizes = {"raw_persons": int(row[0]),
                                       "raw_person_distinct_ids": int(row[1])}  # fmt: skip
        return sizes

    def run_select(self, sql: str) -> list[tuple[Any, ...]]:
        """A translated HogQL query (called in a worker thread)."""
        return self.query(sql)

    def sizes(self) -> dict[str, int]:
        row = self.query(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM persons), "
            "(SELECT count(*) FROM person_distinct_ids), (SELECT count(*) FROM raw_persons), "
            "(SELECT count(*) FROM raw_person_distinct_ids)"
        )[0]
        keys = ("events", "persons", "person_distinct_ids", "raw_persons",
                "raw_person_distinct_ids")  # fmt: skip
        return dict(zip(keys, (int(v) for v in row), strict=True))

    def persons_sample(self, limit: int, *, min_ids: int = 1) -> list[dict[str, Any]]:
        """Live persons with their distinct ids (those with at least ``min_ids`` first)."""
        rows = self.query(
            """
            SELECT CAST(p.id AS VARCHAR), list(d.distinct_id ORDER BY d.distinct_id)
            FROM persons p JOIN person_distinct_ids d ON d.person_id = p.id
            GROUP BY p.id HAVING count(*) >= ? ORDER BY CAST(p.id AS VARCHAR) LIMIT ?
            """,
            [min_ids, limit],
        )
        return [{"id": pid, "distinct_ids": list(ids)} for pid, ids in rows]

    def info(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "seed": spec.seed,
            "events_seeded": spec.events,
            "persons_seeded": spec.persons,
            "event_days": spec.days,
            "first_day": self.first_day.isoformat(),
            "last_day": (self.first_day + timedelta(days=max(spec.days, 1) - 1)).isoformat(),
            "personless_share": spec.personless_share,
            "seed_seconds": round(self.seed_seconds, 3),
            "bursts": BURST_RULE,
        }

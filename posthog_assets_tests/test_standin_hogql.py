"""The stand-in's ``POST /query/`` for HogQL over its own events and persons, tested as a real
subprocess over real HTTP: keyset pagination over bursts of equal timestamps, PostHog's OFFSET
refusal, row limits, late events, merged and deleted persons, concurrency slots, throttle tiers,
the execution budget, the blocking cache and async jobs.

Most tests use the session's stand-in (conftest ``standin``, reset by ``control``); the 50,000-row
page tests start a dedicated one with a day of 60,000 events, and the million-event seed test
(marked ``system``) one of a million.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from typing import Any

import pytest
import requests

from posthog_standin.server import StandinControl, StandinProcess

pytestmark = pytest.mark.integration

OFFSET_MESSAGE = (
    "OFFSET is not supported on queries made with a personal API key. "
    "For pagination, use keyset pagination on the `timestamp` column, e.g. "
    "`WHERE timestamp > :last_seen_timestamp ORDER BY timestamp LIMIT N`. "
    "For bulk data extraction, use batch exports: https://posthog.com/docs/cdp/batch-exports"
)
TIMEOUT_MESSAGE = (
    "Query has hit the max execution time before completing. See our docs for how to improve "
    "your query performance. You may need to materialize."
)
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z$")


class Hog:
    """``POST /query/`` (and ``GET``/``DELETE /query/:id/``) of one stand-in and key."""

    def __init__(self, standin: StandinProcess, key: str | None = None) -> None:
        self.standin = standin
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key or standin.key}"
        self.base = f"{standin.url}/api/projects/{standin.project_id}/query/"

    def post(self, hogql: str, refresh: str | None = "blocking", **extra: Any) -> requests.Response:
        body: dict[str, Any] = {"query": {"kind": "HogQLQuery", "query": hogql}, **extra}
        if refresh is not None:
            body["refresh"] = refresh
        return self.session.post(self.base, json=body, timeout=60)

    def ok(self, hogql: str, refresh: str = "blocking", **extra: Any) -> dict[str, Any]:
        response = self.post(hogql, refresh, **extra)
        assert response.status_code == 200, response.text
        return response.json()

    def rows(self, hogql: str, refresh: str = "force_blocking") -> list[list[Any]]:
        return self.ok(hogql, refresh)["results"]

    def count(self, hogql: str) -> int:
        return self.rows(hogql)[0][0]

    def status(self, query_id: str) -> requests.Response:
        return self.session.get(f"{self.base}{query_id}/", timeout=30)

    def cancel(self, query_id: str) -> requests.Response:
        return self.session.delete(f"{self.base}{query_id}/", timeout=30)


def literal(stamp: str) -> str:
    """A result timestamp (``2026-12-01T10:00:00.123456Z``) as the package sends it back."""
    text = stamp.rstrip("Z").replace("T", " ")
    if "." not in text:
        text += ".000000"
    return f"toDateTime64('{text}', 6, 'UTC')"


def day_bounds(day: str, next_day: str) -> str:
    return (
        f"timestamp >= toDateTime64('{day} 00:00:00.000000', 6, 'UTC') AND "
        f"timestamp < toDateTime64('{next_day} 00:00:00.000000', 6, 'UTC')"
    )


def ck(text: str) -> str:
    """ClickHouse's order of UUIDs: the second half first."""
    hexed = uuid.UUID(text).hex
    return hexed[16:] + hexed[:16]


@pytest.fixture
def hog(standin: StandinProcess, control: StandinControl) -> Hog:
    return Hog(standin)


@pytest.fixture
def days(control: StandinControl) -> list[str]:
    info = control.events_info()
    return [row["day"] for row in info["days"]] + [_next_day(info["last_day"])]


def _next_day(day: str) -> str:
    return (date.fromisoformat(day) + timedelta(days=1)).isoformat()


def keyset_pages(
    hog: Hog, where: str, page: int, *, with_uuid: bool
) -> tuple[list[tuple[str, str]], list[int]]:
    """Every (uuid, timestamp) of ``where`` in pages of ``page`` rows: keyed on (timestamp,
    uuid), or on the timestamp alone as PostHog's docs suggest; also each page's size."""
    seen: list[tuple[str, str]] = []
    sizes: list[int] = []
    last: list[Any] | None = None
    order = "timestamp ASC, uuid ASC" if with_uuid else "timestamp ASC"
    while True:
        keyset = ""
        if last is not None:
            ts, uid = literal(last[1]), last[0]
            keyset = (
                f" AND (timestamp > {ts} OR (timestamp = {ts} AND uuid > toUUID('{uid}')))"
                if with_uuid
                else f" AND timestamp > {ts}"
            )
        rows = hog.rows(
            f"SELECT uuid, timestamp FROM events WHERE {where}{keyset} ORDER BY {order} "
            f"LIMIT {page}"
        )
        seen.extend((row[0], row[1]) for row in rows)
        sizes.append(len(rows))
        if len(rows) < page:
            return seen, sizes
        last = rows[-1]


# ---- keyset pagination over bursts ------------------------------------------------------------


def test_keyset_on_timestamp_and_uuid_returns_a_burst_across_a_page_boundary_once(
    hog: Hog, control: StandinControl, days: list[str]
) -> None:
    control.configure_queries(query_latency_s=0)
    where = day_bounds(days[0], days[1])
    total = hog.count(f"SELECT count() FROM events WHERE {where}")
    assert total > 1017, "the first day must reach past the burst at positions 977..1016"

    full, sizes = keyset_pages(hog, where, 100, with_uuid=True)
    uuids = [uid for uid, _ in full]
    assert len(uuids) == len(set(uuids)) == total  # every event exactly once
    assert sizes[:-1] == [100] * (len(sizes) - 1)
    # The 40 equal timestamps at positions 977..1016 straddle the page boundary at 1000.
    burst_ts = full[977][1]
    assert [ts for _, ts in full[977:1017]] == [burst_ts] * 40
    assert full[976][1] != burst_ts != full[1017][1]

    lossy, _ = keyset_pages(hog, where, 100, with_uuid=False)
    kept = {uid for uid, _ in lossy}
    missing = set(uuids) - kept
    assert len(kept) == len(lossy) == total - 17  # the burst's rows 1000..1016 are skipped
    assert missing <= {uid for uid, ts in full if ts == burst_ts}


def test_uuids_compare_and_sort_by_their_second_half_as_in_clickhouse(
    hog: Hog, days: list[str]
) -> None:
    where = day_bounds(days[1], days[2])
    rows = hog.rows(f"SELECT uuid FROM events WHERE {where} ORDER BY uuid ASC LIMIT 2000")
    ids = [row[0] for row in rows]
    assert ids == sorted(ids, key=ck)
    assert ids != sorted(ids)  # not the text order
    pivot = ids[len(ids) // 2]
    after = hog.rows(
        f"SELECT uuid FROM events WHERE {where} AND uuid > toUUID('{pivot}') "
        "ORDER BY uuid ASC LIMIT 2000"
    )
    assert [row[0] for row in after][: len(ids) // 2 - 1] == ids[len(ids) // 2 + 1 :]


# ---- PostHog's refusals and limits ------------------------------------------------------------


def test_offset_is_refused_with_posthogs_message_and_logged(
    hog: Hog, control: StandinControl
) -> None:
    for text in (
        "SELECT event FROM events ORDER BY timestamp LIMIT 10 OFFSET 10",
        "select event from events order by timestamp limit 10, 10",
        "SELECT event FROM events OFFSET 5",
    ):
        response = hog.post(text)
        assert response.status_code == 400
        assert response.json() == {
            "type": "validation_error",
            "code": "invalid_input",
            "detail": OFFSET_MESSAGE,
            "attr": None,
        }
    log = control.query_log()
    assert [entry["offset_seen"] for entry in log] == [True, True, True]
    assert all(entry["status"] == 400 for entry in log)
    hog.ok("SELECT properties.offset AS o FROM events LIMIT 1")  # a property named offset is fine
    assert control.query_log()[-1]["offset_seen"] is False


def test_without_limit_100_rows_and_has_more(hog: Hog, control: StandinControl) -> None:
    body = hog.ok("SELECT uuid, event FROM events ORDER BY timestamp")
    assert len(body["results"]) == 100
    assert (body["hasMore"], body["limit"], body["offset"]) == (True, 100, 0)
    count = hog.ok("SELECT count() FROM events")
    assert (count["hasMore"], count["limit"], count["offset"]) == (False, 100, 0)
    limited = hog.ok("SELECT uuid FROM events ORDER BY timestamp LIMIT 150")
    assert len(limited["results"]) == 150
    assert (limited["hasMore"], limited["limit"], limited["offset"]) == (None, None, None)
    assert control.query_log()[0]["paginated"] is True


def test_outside_the_subset_and_unknown_names_get_400(hog: Hog) -> None:
    cases = {
        "SELECT nope FROM events": "Unable to resolve field: nope",
        "SELECT event FROM nope": "Unknown table `nope`.",
        "SELECT frobnicate(event) FROM events": "Unsupported function call 'frobnicate(...)'",
    }
    for text, detail in cases.items():
        response = hog.post(text)
        assert response.status_code == 400
        assert response.json()["detail"] == detail
        assert response.json()["type"] == "validation_error"
    for text in (
        "SELECT * FROM events",
        "SELECT lower(event) FROM events",
        "SELECT e.event FROM events e JOIN persons p ON e.person_id = p.id",
        "SELECT event FROM events WHERE event LIKE '%page%'",
        "SELECT session_id FROM sessions",
    ):
        response = hog.post(text)
        assert response.status_code == 400, text
        assert "stand-in" in response.json()["detail"]
    other = hog.session.post(hog.base, json={"query": {"kind": "EventsQuery", "select": ["*"]}})
    assert other.status_code == 400


def test_query_needs_the_query_read_scope(
    hog: Hog, standin: StandinProcess, control: StandinControl
) -> None:
    control.add_key("phx_no_query", ["insight:read"])
    response = Hog(standin, "phx_no_query").post("SELECT count() FROM events")
    assert response.status_code == 403
    assert response.json()["detail"] == "API key missing required scope 'query:read'"
    control.add_key("phx_query", ["query:read"])
    assert Hog(standin, "phx_query").post("SELECT count() FROM events").status_code == 200
    environments = f"{standin.url}/api/environments/{standin.project_id}/query/"
    answer = hog.session.post(
        environments, json={"query": {"kind": "HogQLQuery", "query": "SELECT count() FROM events"}}
    )
    assert answer.status_code == 200 and answer.headers["deprecation"] == "true"


# ---- values as PostHog's JSON carries them ------------------------------------------------------


def test_values_are_serialised_as_posthog_sends_them(hog: Hog, days: list[str]) -> None:
    where = day_bounds(days[0], days[1])
    body = hog.ok(
        "SELECT uuid, event, timestamp, distinct_id, person_id, properties, elements_chain, "
        f"created_at, properties.$browser AS prop__browser FROM events WHERE {where} "
        "ORDER BY timestamp ASC, uuid ASC LIMIT 200"
    )
    assert body["columns"][-1] == "prop__browser"
    assert dict(body["types"]) == {
        "uuid": "UUID",
        "event": "String",
        "timestamp": "DateTime64(6, 'UTC')",
        "distinct_id": "String",
        "person_id": "UUID",
        "properties": "String",
        "elements_chain": "String",
        "created_at": "DateTime64(6, 'UTC')",
        "prop__browser": "Nullable(String)",
    }
    for row in body["results"]:
        uid, _, ts, _, person, props, _, created, browser = row
        assert str(uuid.UUID(uid)) == uid and str(uuid.UUID(person)) == person
        assert ISO.match(ts) and ISO.match(created)
        assert json.loads(props).get("$browser") == browser  # a JSON text; missing -> null
    assert {body["is_cached"], body["query_status"], body["timezone"]} == {False, None, "UTC"}
    assert ISO.match(body["last_refresh"])

    persons = hog.ok("SELECT id, created_at, is_identified, properties FROM persons LIMIT 50")
    assert dict(persons["types"])["created_at"] == "DateTime64(3, 'UTC')"
    for pid, created, identified, props in persons["results"]:
        assert str(uuid.UUID(pid)) == pid
        assert re.match(r"^.*T\d\d:\d\d:\d\d(\.\d{3}000)?Z$", created)  # milliseconds
        assert identified in (0, 1) and isinstance(json.loads(props), dict)

    per_day = hog.ok(
        f"SELECT toDate(timestamp) AS day, count() FROM events WHERE {day_bounds(days[0], days[2])}"
        " GROUP BY day ORDER BY day"
    )
    assert per_day["columns"] == ["day", "count()"]
    assert [row[0] for row in per_day["results"]] == days[:2]
    assert all(isinstance(row[1], int) for row in per_day["results"])


def test_datetime_literal_forms(hog: Hog, days: list[str]) -> None:
    where = day_bounds(days[0], days[1])
    stamps = [
        row[0]
        for row in hog.rows(
            f"SELECT timestamp FROM events WHERE {where} ORDER BY timestamp LIMIT 50"
        )
    ]
    stamp = next(s for s in stamps if "." in s and not s.endswith("000Z"))
    text = stamp.rstrip("Z").replace("T", " ")

    def count(expr: str) -> int:
        return hog.count(f"SELECT count() FROM events WHERE timestamp = {expr}")

    exact = count(f"toDateTime64('{text}', 6, 'UTC')")
    assert exact >= 1
    assert count(f"toDateTime('{text}')") == exact  # printed as toDateTime64(s, 6, tz)
    assert count(f"toDateTime('{stamp}', 'UTC')") == exact  # parseDateTime64BestEffortOrNull
    assert count(f"'{text}'") == exact  # a string compared with DateTime64(6)
    assert count(f"toDateTime64('{text}', 3, 'UTC')") == 0  # cut to milliseconds
    assert count(f"toDateTime('{text[:19]}')") == 0  # whole seconds
    assert count("toDateTime('not a date', 'UTC')") == 0  # NULL: matches nothing
    assert (
        hog.post("SELECT count() FROM events WHERE timestamp > toDateTime('nope')").status_code
        == 400
    )


# ---- late events, merged and deleted persons ----------------------------------------------------


def test_late_events_appear_in_the_day_count(
    hog: Hog, control: StandinControl, days: list[str]
) -> None:
    where = day_bounds(days[2], days[3])
    before = hog.count(f"SELECT count() FROM events WHERE {where}")
    assert control.event_counts()[days[2]] == before
    started = time.time()
    result = control.insert_late_events(days[2], 25, event="late_event")
    assert result["inserted"] == 25
    assert hog.count(f"SELECT count() FROM events WHERE {where}") == before + 25
    assert control.event_counts()[days[2]] == before + 25
    late = hog.rows(
        f"SELECT timestamp, created_at FROM events WHERE {where} AND event IN ('late_event') "
        "ORDER BY timestamp LIMIT 100"
    )
    assert len(late) == 25
    for ts, created in late:
        assert ts.startswith(days[2])
        ingested = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
        assert ingested >= started - 5  # created_at is the moment of insertion
    control.reset()
    assert hog.count(f"SELECT count() FROM events WHERE {where}") == before


def test_merged_persons_vanish_and_their_distinct_ids_follow_the_winner(
    hog: Hog, control: StandinControl
) -> None:
    winner, loser, doomed = control.persons_sample(3, min_ids=2)
    persons = hog.count("SELECT count() FROM persons")
    result = control.merge_persons(winner["id"], loser["id"])
    assert sorted(result["moved_distinct_ids"]) == sorted(loser["distinct_ids"])

    assert hog.count("SELECT count() FROM persons") == persons - 1
    assert hog.count(f"SELECT count() FROM persons WHERE id = '{loser['id']}'") == 0
    ids = ", ".join(f"'{d}'" for d in loser["distinct_ids"] + winner["distinct_ids"])
    mapped = hog.rows(
        f"SELECT distinct_id, person_id FROM person_distinct_ids WHERE distinct_id IN ({ids}) "
        "ORDER BY distinct_id ASC LIMIT 100"
    )
    assert {person for _, person in mapped} == {winner["id"]}
    assert len(mapped) == len(loser["distinct_ids"]) + len(winner["distinct_ids"])
    event_people = hog.rows(f"SELECT person_id FROM events WHERE distinct_id IN ({ids}) LIMIT 1000")
    assert event_people and {row[0] for row in event_people} == {winner["id"]}
    raw = hog.rows(
        f"SELECT version, is_deleted FROM raw_persons WHERE id = '{loser['id']}' "
        "ORDER BY version ASC LIMIT 10"
    )
    assert raw[-1][1] == 1 and raw[-1][0] >= raw[0][0] + 100

    own = ", ".join(f"'{d}'" for d in doomed["distinct_ids"])
    events = hog.count(f"SELECT count() FROM events WHERE distinct_id IN ({own})")
    control.delete_person(doomed["id"])
    assert hog.count(f"SELECT count() FROM persons WHERE id = '{doomed['id']}'") == 0
    assert hog.count(f"SELECT count() FROM events WHERE distinct_id IN ({own})") == events
    # persons on events (PostHog's default modes): every event keeps a person id
    kept = hog.rows(f"SELECT person_id FROM events WHERE distinct_id IN ({own}) LIMIT 1000")
    assert len(kept) == events and all(row[0] for row in kept)
    # the "disabled" mode joins person_distinct_ids with an INNER JOIN: the rows go away
    control.configure(persons_on_events=False)
    assert hog.rows(f"SELECT person_id FROM events WHERE distinct_id IN ({own}) LIMIT 10") == []
    control.configure(persons_on_events=True)

    control.update_person(winner["id"], {"plan": "legendary"})
    props = hog.rows(f"SELECT properties FROM persons WHERE id = '{winner['id']}' LIMIT 5")
    assert len(props) == 1 and json.loads(props[0][0])["plan"] == "legendary"


def test_persons_and_distinct_ids_keyset_pages_cover_everyone_once(
    hog: Hog, control: StandinControl
) -> None:
    control.configure_queries(query_latency_s=0)
    total = hog.count("SELECT count() FROM persons")
    seen: list[str] = []
    last = None
    while True:
        where = f" WHERE id > '{last}'" if last else ""
        rows = hog.rows(
            f"SELECT id, created_at, is_identified, properties FROM persons{where} "
            "ORDER BY id ASC LIMIT 500"
        )
        seen.extend(row[0] for row in rows)
        if len(rows) < 500:
            break
        last = rows[-1][0]
    assert len(seen) == len(set(seen)) == total
    assert seen == sorted(seen, key=ck)

    pairs = hog.count("SELECT count() FROM person_distinct_ids")
    dids: list[str] = []
    cursor = None
    while True:
        where = f" WHERE distinct_id > '{cursor}'" if cursor else ""
        rows = hog.rows(
            f"SELECT distinct_id, person_id FROM person_distinct_ids{where} "
            "ORDER BY distinct_id ASC LIMIT 1000"
        )
        dids.extend(row[0] for row in rows)
        if len(rows) < 1000:
            break
        cursor = rows[-1][0]
    assert len(dids) == len(set(dids)) == pairs
    raw = hog.count("SELECT count() FROM raw_person_distinct_ids")
    assert raw > pairs  # superseded rows live on in the raw table


# ---- concurrency, throttles, budget ----------------------------------------------------------


def _parallel(hog: Hog, texts: list[str], ids: list[str]) -> list[requests.Response]:
    out: list[requests.Response | None] = [None] * len(texts)

    def run(k: int) -> None:  # a session per thread
        out[k] = Hog(hog.standin).post(texts[k], "force_blocking", client_query_id=ids[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(r is not None for r in out)
    return [r for r in out if r is not None]


def test_three_queries_run_at_once_and_the_rest_wait_then_429(
    hog: Hog, control: StandinControl, standin: StandinProcess
) -> None:
    control.configure_queries(query_latency_s=1.5, query_slot_wait_s=0.3)
    texts = [f"SELECT count() FROM events WHERE event IN ('e{k}')" for k in range(5)]
    ids = [f"slot-test-{k}" for k in range(5)]
    responses = _parallel(hog, texts, ids)
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 200, 429, 429]
    project = requests.get(
        f"{standin.url}/api/projects/{standin.project_id}/",
        headers={"Authorization": f"Bearer {standin.key}"},
        timeout=10,
    ).json()
    for response, query_id in zip(responses, ids, strict=True):
        if response.status_code == 429:
            assert response.json() == {
                "type": "throttled_error",
                "code": "throttled",
                "detail": "Exceeded maximum concurrency limit: 3 for key: "
                f"api:query:per-org:{project['organization']} and task: {query_id}",
                "attr": None,
            }
            assert "Retry-After" not in response.headers

    control.configure_queries(query_latency_s=0.5, query_slot_wait_s=10)
    started = time.monotonic()
    queued = _parallel(hog, texts, [f"queued-{k}" for k in range(5)])
    assert [r.status_code for r in queued] == [200] * 5
    assert time.monotonic() - started >= 0.9  # two had to wait for a slot
    assert [e["outcome"] for e in control.query_log()].count("concurrency") == 2


def test_throttle_tiers(hog: Hog, control: StandinControl) -> None:
    # legacy: HogQLQuery POSTs under HogQLQueryThrottle, polls under ClickHouse's
    control.configure(query_throttle_tier="legacy", rate_limit_overrides={"query": "2/hour"})
    assert [hog.post("SELECT count() FROM events").status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]
    assert int(hog.post("SELECT count() FROM events").headers["Retry-After"]) > 3000
    assert hog.status("no-such-query").status_code == 404  # not counted against "query"

    control.reset()  # current (the default): every /query/ request under the API-queries throttles
    control.configure(rate_limit_overrides={"api_queries_burst": "3/minute"})
    assert hog.post("SELECT count() FROM events").status_code == 200
    assert hog.status("no-such-query").status_code == 404
    assert hog.cancel("no-such-query").status_code == 200
    assert hog.post("SELECT count() FROM events").status_code == 429  # POST, GET, DELETE all count
    assert hog.status("no-such-query").status_code == 429

    control.reset()
    control.configure(
        query_throttle_tier="current", rate_limit_overrides={"api_queries_sustained": "1/hour"}
    )
    assert [hog.post("SELECT count() FROM events").status_code for _ in range(2)] == [200, 429]


def test_a_query_over_the_execution_budget_fails_with_504(
    hog: Hog, control: StandinControl, days: list[str]
) -> None:
    control.configure_queries(query_max_execution_s=0.3, query_cost_per_day_s=0.1)
    assert hog.post(f"SELECT count() FROM events WHERE {day_bounds(days[0], days[1])}").ok
    started = time.monotonic()
    response = hog.post(f"SELECT count() FROM events WHERE {day_bounds(days[0], days[-1])}")
    assert response.status_code == 504
    assert response.json() == {
        "type": "server_error",
        "code": "error",
        "detail": TIMEOUT_MESSAGE,
        "attr": None,
    }
    assert time.monotonic() - started >= 0.3  # it ran until the limit
    assert hog.post("SELECT count() FROM events").status_code == 504  # no range: all of it

    control.reset()
    control.configure_queries(query_max_execution_s=0.2, query_cost_per_row_s=1e-3)
    assert hog.post("SELECT count() FROM persons").status_code == 504  # thousands of rows
    assert control.query_log()[-1]["outcome"] == "timeout"


# ---- cache and async --------------------------------------------------------------------------


def test_blocking_serves_the_cache_even_when_stale_and_force_blocking_recomputes(
    hog: Hog, control: StandinControl, days: list[str]
) -> None:
    text = f"SELECT count() FROM events WHERE {day_bounds(days[3], days[4])}"
    first = hog.ok(text)
    assert first["is_cached"] is False
    control.insert_late_events(days[3], 7)
    again = hog.ok(text)
    assert again["is_cached"] is True
    assert again["results"] == first["results"]  # the old count: up to 5 minutes stale
    assert again["last_refresh"] == first["last_refresh"]
    assert again["cache_key"] == first["cache_key"]
    fresh = hog.ok(text, "force_blocking")
    assert fresh["is_cached"] is False
    assert fresh["results"][0][0] == first["results"][0][0] + 7
    assert hog.ok(text)["results"] == fresh["results"]  # the cache now holds the new count

    other = hog.ok(text.replace("SELECT", "select"))  # another text, another cache entry
    assert other["is_cached"] is False and other["cache_key"] != first["cache_key"]

    control.configure_queries(hogql_cache_stale_s=0.3)
    time.sleep(0.4)
    assert hog.ok(text)["is_cached"] is False  # past the staleness threshold: computed


def _poll(hog: Hog, query_id: str, timeout: float = 10.0) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = hog.status(query_id)
        if response.status_code != 202 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_async_queries_202_then_poll_then_delete(hog: Hog, control: StandinControl) -> None:
    control.configure_queries(query_latency_s=0.3)
    text = "SELECT event, count() FROM events GROUP BY event ORDER BY event LIMIT 50"
    started = hog.post(text, "async", client_query_id="my-async-1")
    assert started.status_code == 202
    body = started.json()
    assert set(body) == {"cache_key", "query_status"}
    status = body["query_status"]
    assert (status["id"], status["team_id"], status["complete"]) == (
        "my-async-1",
        hog.standin.project_id,
        False,
    )
    assert hog.status("my-async-1").status_code == 202
    done = _poll(hog, "my-async-1")
    assert done.status_code == 200
    final = done.json()["query_status"]
    assert final["complete"] is True and final["error"] is False
    assert final["results"]["columns"] == ["event", "count()"]
    assert final["results"]["is_cached"] is False and final["results"]["results"]
    assert hog.cancel("my-async-1").json() == {"message": "Query already complete"}
    cached = hog.post(text, "async")
    assert cached.status_code == 200 and cached.json()["is_cached"] is True
    control.configure_queries(hogql_cache_stale_s=0.2)
    time.sleep(0.3)
    stale = hog.post(text, "async", client_query_id="my-async-3")
    assert stale.status_code == 202  # the stale rows now, a refresh running
    assert stale.json()["is_cached"] is True and stale.json()["results"]
    assert stale.json()["query_status"]["id"] == "my-async-3"
    assert _poll(hog, "my-async-3").status_code == 200

    running = hog.post(text, "force_async", client_query_id="my-async-2")
    assert running.status_code == 202 and set(running.json()) == {"query_status"}
    cancelled = hog.cancel("my-async-2")
    assert cancelled.status_code == 200
    assert cancelled.json() == {"message": "Cancelled query on clickhouse"}
    assert hog.status("my-async-2").status_code == 404
    hog.post(text, "force_async", client_query_id="my-async-4")
    dequeued = hog.session.delete(f"{hog.base}my-async-4/?dequeue_only=true", timeout=30)
    assert dequeued.json() == {
        "message": "Only tried to dequeue, not cancelling query on clickhouse"
    }

    failing = hog.post("SELECT event FROM events LIMIT 5 OFFSET 5", "async", client_query_id="bad")
    assert failing.status_code == 202
    failed = _poll(hog, "bad")
    assert failed.status_code == 400
    assert failed.json()["query_status"]["error_message"] == OFFSET_MESSAGE
    assert control.query_log()[-1]["offset_seen"] is True


# ---- a day of 60,000 events: 50,000-row pages ---------------------------------------------


@pytest.fixture(scope="module")
def big() -> Iterator[StandinProcess]:
    proc = StandinProcess(events=60_000, persons=500, event_days=1, key="phx_big_day").start()
    try:
        yield proc
    finally:
        proc.stop()


def test_50000_row_pages_over_a_burst_at_row_50000(big: StandinProcess) -> None:
    hog = Hog(big)
    info = big.control.events_info()
    day, next_day = info["first_day"], _next_day(info["first_day"])
    where = day_bounds(day, next_day)
    assert hog.count(f"SELECT count() FROM events WHERE {where}") == 60_000

    capped = hog.ok(f"SELECT uuid FROM events WHERE {where} ORDER BY timestamp LIMIT 60000")
    assert len(capped["results"]) == 50_000  # silently capped
    assert (capped["hasMore"], capped["limit"], capped["offset"]) == (None, None, None)
    assert big.control.query_log()[-1]["capped"] is True

    started = time.monotonic()
    page = hog.rows(
        "SELECT uuid, event, timestamp, distinct_id, person_id, properties, elements_chain, "
        f"created_at, properties.$browser AS prop__browser FROM events WHERE {where} "
        "ORDER BY timestamp ASC, uuid ASC LIMIT 50000"
    )
    took = time.monotonic() - started
    assert len(page) == 50_000
    assert took < 10, f"a 50,000-row page took {took:.2f}s"
    print(f"50,000-row page of a 60,000-event day: {took:.2f}s")

    full, _ = keyset_pages(hog, where, 50_000, with_uuid=True)
    assert len(full) == len({uid for uid, _ in full}) == 60_000
    lossy, _ = keyset_pages(hog, where, 50_000, with_uuid=False)
    assert 60_000 - len(lossy) == 20  # positions 50,000..50,019 of the burst at row 50,000


# ---- a million events ---------------------------------------------------------------------


@pytest.mark.system
def test_a_million_events_seed_fast_and_a_50000_row_page_answers() -> None:
    started = time.monotonic()
    with StandinProcess(events=1_000_000, persons=50_000, key="phx_million") as proc:
        ready = time.monotonic() - started
        info = proc.control.events_info()
        assert info["live"]["events"] == 1_000_000
        assert ready < 15, f"start-up with a million events took {ready:.1f}s"
        hog = Hog(proc)
        day, next_day = info["days"][1]["day"], info["days"][2]["day"]
        page_started = time.monotonic()
        rows = hog.rows(
            "SELECT uuid, event, timestamp, distinct_id, person_id, properties, elements_chain, "
            f"created_at, properties.$browser AS prop__browser FROM events WHERE "
            f"{day_bounds(day, next_day)} ORDER BY timestamp ASC, uuid ASC LIMIT 50000"
        )
        page = time.monotonic() - page_started
        assert len(rows) == 50_000
        assert page < 10
        print(
            f"million-event seed: {info['seed_seconds']}s (ready after {ready:.1f}s); "
            f"50,000-row page: {page:.2f}s"
        )

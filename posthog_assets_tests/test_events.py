"""Events and persons through HogQL, against the stand-in's own events and persons: every event
of a day exactly once (bursts of one timestamp across page boundaries, a page cut at 50,000), no
OFFSET ever sent, re-runs that replace, late events caught by the lookback schedule and by the
per-day count check, a timeout answered by a narrower window, a 429 on /query/ that leaves the
insight routes alone, and persons merged between two snapshots.

The session's stand-in has 20,000 events over the 7 whole UTC days before it started and 2,000
persons; the 50,000-row page test starts its own with a day of 60,000 events.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from posthog_assets.api.client import PostHogClient, RetrySettings
from posthog_assets.api.errors import PostHogRateLimitError
from posthog_assets.api.hogql import run_hogql
from posthog_assets.api.polling import PollPolicy
from posthog_assets.config import EventsConfig, PersonsConfig
from posthog_assets.resources import PostHogResource
from posthog_assets.snapshots.definitions import events_job_name
from posthog_assets_tests.support.snapshots import (
    check_results,
    failure_message,
    materialization_metadata,
    materialize_named,
    query,
    resources_for,
    scalar,
    snapshot_defs,
    snapshot_project,
)
from posthog_standin.server import StandinControl, StandinProcess

pytestmark = pytest.mark.integration

EVENTS = ("events",)
PERSONS = ("persons", "person_distinct_ids")
POLL = PollPolicy(interval_s=0.1, max_interval_s=0.5, timeout_s=60)


def days_of(control: StandinControl) -> dict[str, int]:
    """The stand-in's events per UTC day, as PostHog would count them."""
    return {d["day"]: d["events"] for d in control.events_info()["days"]}


def project_defs(
    env: dict[str, str], start: str, *, events: dict[str, Any] | None = None, persons: bool = False
) -> dg.Definitions:
    """Events from ``start`` (and persons) of the project ``env`` points at; nothing else."""
    project = snapshot_project(env, insights={"enabled": False}, groups={"enabled": False})
    project = dataclasses.replace(
        project,
        events=EventsConfig.model_validate({"start_date": start, **(events or {})}),
        persons=PersonsConfig() if persons else None,
    )
    return snapshot_defs(project)


@pytest.fixture
def env(posthog_env: dict[str, str], control: StandinControl) -> dict[str, str]:
    control.configure_queries(query_latency_s=0)
    return posthog_env


def test_every_event_of_a_day_once_across_bursts_at_page_boundaries_and_no_offset(
    env: dict[str, str],
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    control: StandinControl,
    db: Path,
) -> None:
    counts = days_of(control)
    day = sorted(counts)[1]
    assert counts[day] > 1017  # the burst at positions 977..1016 straddles the first page end
    defs = project_defs(env, day, events={"page_size": 1000, "properties": ["$browser", "$os"]})
    control.clear_query_log()

    result = materialize_named(defs, resources, instance, names=EVENTS, partition=day)

    assert result.success, failure_message(result)
    meta = materialization_metadata(result, "events")
    rows = query(db, "SELECT count(*), count(DISTINCT uuid), min(event_date), max(event_date) "
                     "FROM events")  # fmt: skip
    assert rows == [(counts[day], counts[day], *[datetime.fromisoformat(day).date()] * 2)]
    assert meta["rows"] == meta["posthog_count"] == counts[day] == meta["dagster/row_count"]
    assert meta["pages"] == counts[day] // 1000 + 1
    assert meta["requests"] == meta["pages"] + 1  # the day's count, then the pages
    assert meta["bytes"] > 1000 * meta["pages"]
    # every row's timestamp is inside the day; promoted properties match the JSON
    assert scalar(db, "SELECT count(*) FROM events WHERE timestamp::DATE <> event_date") == 0
    assert scalar(
        db, "SELECT count(*) FROM events WHERE prop_browser IS DISTINCT FROM "
            "properties->>'$.\"$browser\"' OR prop_os IS DISTINCT FROM properties->>'$.\"$os\"'"
    ) == 0  # fmt: skip
    assert scalar(db, "SELECT count(*) FROM events WHERE person_id IS NULL") == 0
    log = control.query_log()
    assert log and not [e for e in log if e["offset_seen"] or "OFFSET" in e["query"].upper()]
    assert {e["refresh"] for e in log} == {"force_blocking"}
    assert all(e["capped"] is not True for e in log)
    assert all(c.passed for c in check_results(result).values())


def test_a_rerun_replaces_the_day_and_late_events_are_caught_by_check_and_lookback(
    env: dict[str, str],
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    control: StandinControl,
    db: Path,
) -> None:
    counts = days_of(control)
    days = sorted(counts)
    defs = project_defs(env, days[0], events={"lookback_days": 3})
    for day in (days[-4], days[-4], days[-1]):  # the first day twice: replaced, not appended
        assert materialize_named(defs, resources, instance, names=EVENTS, partition=day).success
    stored = dict(query(db, "SELECT event_date::VARCHAR, count(*) FROM events GROUP BY 1"))
    assert stored == {days[-4]: counts[days[-4]], days[-1]: counts[days[-1]]}

    control.insert_late_events(days[-4], 25)
    result = materialize_named(defs, resources, instance, names=EVENTS, partition=days[-2])
    check = check_results(result)["events_match_posthog_counts"]
    assert not check.passed
    assert f"{days[-4]}: stored {counts[days[-4]]}, PostHog {counts[days[-4]] + 25}" in str(
        check.description
    )

    whole = dg.Definitions.merge(defs, dg.Definitions(resources=resources))
    schedule = whole.resolve_schedule_def(f"{events_job_name(snapshot_project(env))}_lookback")
    tomorrow = datetime.fromisoformat(days[-1]).replace(tzinfo=UTC) + timedelta(days=1, hours=2)
    repository = whole.get_repository_def()
    context = dg.build_schedule_context(
        instance=instance, scheduled_execution_time=tomorrow, repository_def=repository
    )
    requests = list(schedule.evaluate_tick(context).run_requests or [])
    assert [r.partition_key for r in requests] == days[-3:]
    # the lookback of a day later re-reads the late day too
    context = dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=tomorrow - timedelta(days=1),
        repository_def=repository,
    )
    keys = [r.partition_key for r in schedule.evaluate_tick(context).run_requests or []]
    assert keys == days[-4:-1]
    for key in keys:
        result = materialize_named(defs, resources, instance, names=EVENTS, partition=key)
        assert result.success, failure_message(result)
    assert check_results(result)["events_match_posthog_counts"].passed
    assert scalar(db, "SELECT count(*) FROM events WHERE event_date = ?", [days[-4]]) == (
        counts[days[-4]] + 25
    )
    assert scalar(db, "SELECT count(*) - count(DISTINCT uuid) FROM events") == 0


def test_a_page_that_times_out_is_read_in_halves(
    env: dict[str, str],
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    control: StandinControl,
    db: Path,
) -> None:
    counts = days_of(control)
    day = sorted(counts)[2]
    # a whole day costs 0.8 s of PostHog's 0.5 s execution budget: 504; half a day fits
    control.configure_queries(query_max_execution_s=0.5, query_cost_per_day_s=0.8)
    result = materialize_named(
        project_defs(env, day), resources, instance, names=EVENTS, partition=day
    )

    assert result.success, failure_message(result)
    meta = materialization_metadata(result, "events")
    assert meta["window_splits"] >= 1
    assert meta["rows"] == meta["posthog_count"] == counts[day]
    assert scalar(db, "SELECT count(DISTINCT uuid) FROM events") == counts[day]
    outcomes = [e["status"] for e in control.query_log()]
    assert 504 in outcomes and outcomes[-1] == 200


def test_a_team_that_drops_personless_events_fails_the_day_loudly(
    env: dict[str, str],
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    control: StandinControl,
    db: Path,
) -> None:
    """With persons on events off, PostHog's person_id join drops events without a person: the
    pages fall short of the day's count() and nothing is written."""
    counts = days_of(control)
    day = sorted(counts)[1]
    control.configure(persons_on_events=False)
    result = materialize_named(
        project_defs(env, day), resources, instance, names=EVENTS, partition=day
    )

    assert not result.success
    assert f"PostHog counts {counts[day]} events, the pages gave" in failure_message(result)
    assert not db.exists() or scalar(db, "SELECT count(*) FROM information_schema.tables "
                                         "WHERE table_name = 'events'") == 0  # fmt: skip


def test_a_429_on_query_pauses_query_calls_only(
    standin: StandinProcess, control: StandinControl
) -> None:
    control.configure(rate_limit_overrides={"api_queries_burst": "2/minute"})
    client = PostHogClient(
        standin.url,
        standin.project_id,
        standin.key,
        retry=RetrySettings(max_attempts=2, total_budget_s=3.0),
        rate_limits=None,
    )
    try:
        for _ in range(2):
            run_hogql(client, "SELECT count() FROM events", poll=POLL)
        with pytest.raises(PostHogRateLimitError, match="accepts requests again"):
            run_hogql(client, "SELECT count() FROM events", poll=POLL)
        sent = len(control.requests_log())
        started = time.monotonic()
        assert client.list_insights(limit=1)["results"]  # the insight routes are not paused
        assert time.monotonic() - started < 2.0
        with pytest.raises(PostHogRateLimitError):  # query calls are, without a request
            run_hogql(client, "SELECT count() FROM events", poll=POLL)
        assert len(control.requests_log()) == sent + 1
    finally:
        client.close()


def test_persons_merged_and_deleted_between_two_snapshots(
    env: dict[str, str],
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    control: StandinControl,
    db: Path,
) -> None:
    defs = project_defs(env, min(days_of(control)), persons=True)
    first = materialize_named(defs, resources, instance, names=PERSONS)
    assert first.success, failure_message(first)
    info = control.events_info()["live"]
    assert scalar(db, "SELECT count(*) FROM persons") == info["persons"]
    assert scalar(db, "SELECT count(*) FROM person_distinct_ids") == info["person_distinct_ids"]
    winner, loser, doomed = control.persons_sample(3, min_ids=2)
    control.merge_persons(winner["id"], loser["id"])
    control.delete_person(doomed["id"])

    second = materialize_named(defs, resources, instance, names=PERSONS)

    assert second.success, failure_message(second)
    assert scalar(db, "SELECT count(*) FROM persons") == info["persons"] - 2
    gone = [loser["id"], doomed["id"]]
    assert scalar(db, "SELECT count(*) FROM persons WHERE id::VARCHAR IN (?, ?)", gone) == 0
    moved = query(
        db,
        "SELECT DISTINCT person_id::VARCHAR FROM person_distinct_ids WHERE distinct_id IN "
        f"({', '.join('?' * len(loser['distinct_ids']))})",
        loser["distinct_ids"],
    )
    assert moved == [(winner["id"],)]
    assert (
        scalar(
            db,
            "SELECT count(*) FROM person_distinct_ids WHERE person_id::VARCHAR = ?",
            [doomed["id"]],
        )
        == 0
    )
    meta = materialization_metadata(second, "persons")
    assert meta["persons"] == meta["posthog_persons_created_before"] == info["persons"] - 2
    assert all(c.passed for c in check_results(second).values())
    identified = scalar(db, "SELECT count(*) FROM persons WHERE is_identified")
    assert 0 < identified < info["persons"]


@pytest.fixture(scope="module")
def big() -> Iterator[StandinProcess]:
    """A stand-in with one day of 60,000 events (a burst straddles row 50,000)."""
    with StandinProcess(insights=1, groups=1, events=60_000, persons=500, event_days=1) as proc:
        yield proc


def test_a_day_past_50000_events_is_read_in_full_pages(big: StandinProcess, tmp_path: Path) -> None:
    control = big.control
    control.reset()
    control.configure_queries(query_latency_s=0)
    counts = days_of(control)
    (day,) = counts
    assert counts[day] > 50_000
    env = {
        "POSTHOG_HOST": big.url,
        "POSTHOG_PROJECT_ID": str(big.project_id),
        "POSTHOG_PERSONAL_API_KEY": big.key,
        "POSTHOG_ASSETS_DUCKDB": str(tmp_path / "posthog.duckdb"),
        "POSTHOG_ASSETS_EXPORT_DIR": str(tmp_path / "exports"),
    }
    defs = project_defs(env, day)
    resource = PostHogResource(
        host=big.url, project_id=str(big.project_id), personal_api_key=big.key,
        export_dir=str(tmp_path / "exports"), poll_interval_s=0.1,
    )  # fmt: skip
    with dg.instance_for_test() as instance:
        result = materialize_named(
            defs, resources_for(resource, tmp_path / "posthog.duckdb"), instance, names=EVENTS,
            partition=day,
        )  # fmt: skip
    assert result.success, failure_message(result)
    meta = materialization_metadata(result, "events")
    assert meta["pages"] == 2 and meta["rows"] == counts[day]
    assert (
        scalar(tmp_path / "posthog.duckdb", "SELECT count(DISTINCT uuid) FROM events")
        == (counts[day])
    )
    pages = [e for e in control.query_log() if e["query"].startswith("SELECT uuid")]
    assert [e["rows"] for e in pages] == [50_000, counts[day] - 50_000]


def test_a_query_slower_than_the_read_timeout_is_followed_asynchronously(
    standin: StandinProcess, control: StandinControl
) -> None:
    control.configure_queries(query_latency_s=1.5)
    client = PostHogClient(
        standin.url, standin.project_id, standin.key, read_timeout_s=0.5, rate_limits=None
    )
    try:
        result = run_hogql(client, "SELECT count() AS n FROM events", poll=POLL)
    finally:
        client.close()
    assert result.asynchronous and result.columns == ["n"]
    assert result.rows == [[control.events_info()["live"]["events"]]]
    assert [e["refresh"] for e in control.query_log()] == ["force_blocking", "force_async"]

"""Automation under the real daemon of the shared ``dg dev``: the export expiry sensor and a
schedule tick, each launching real runs against the session's PostHog stand-in.

The sensor and the schedule are turned on with the same GraphQL mutations the UI's toggles send.
For the schedule tick, the test cannot wait for tomorrow's 06:00, so it starts the schedule as if
it had been started a day ago: the daemon's scheduler then finds the last cron tick due and
launches it, exactly as it catches up after downtime. The run takes that day's snapshot: its
materialization records the UTC date the snapshot was taken.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef
from dagster._core.scheduler.instigation import InstigatorType, ScheduleInstigatorData

from posthog_standin.server import StandinControl

pytestmark = [pytest.mark.system, pytest.mark.xdist_group("dagster_dev")]

# Rewrite asserts in the fixture module too (it is also registered as a plugin below).
pytest.register_assert_rewrite("posthog_assets_tests.support.dagster_dev")
from posthog_assets_tests.support.dagster_dev import (  # noqa: E402
    LOCATION_NAME,
    REPOSITORY_NAME,
    DagsterDevUI,
    export_asset_key,
    insights_asset_key,
    load_defs,
    metadata_dict,
)

#: The sensor daemon loops every 5 s; a first tick comes right after the start.
SENSOR_RUN_TIMEOUT_S = 90.0
#: The scheduler daemon wakes at each minute boundary.
SCHEDULE_RUN_TIMEOUT_S = 150.0

IN_PROCESS = {"execution": {"config": {"in_process": {}}}}

START_SENSOR = """
mutation Start($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { id status } }
    ... on PythonError { message }
  }
}
"""
STOP_SENSOR = """
mutation Stop($id: String!) {
  stopSensor(id: $id) { __typename }
}
"""
SENSOR_TICKS = """
query Sensor($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    ... on Sensor {
      sensorState {
        ticks(limit: 5) { status timestamp runIds skipReason error { message } }
      }
    }
  }
}
"""
START_SCHEDULE = """
mutation Start($selector: ScheduleSelector!) {
  startSchedule(scheduleSelector: $selector) {
    __typename
    ... on ScheduleStateResult { scheduleState { id status } }
    ... on PythonError { message }
  }
}
"""
STOP_SCHEDULE = """
mutation Stop($id: String!) {
  stopRunningSchedule(id: $id) { __typename }
}
"""
SCHEDULE_TICKS = """
query Schedule($selector: ScheduleSelector!) {
  scheduleOrError(scheduleSelector: $selector) {
    ... on Schedule {
      scheduleState {
        ticks(limit: 5) { status timestamp runIds skipReason error { message } }
      }
    }
  }
}
"""


def _selector(kind: str, name: str) -> dict[str, str]:
    return {
        "repositoryLocationName": LOCATION_NAME,
        "repositoryName": REPOSITORY_NAME,
        f"{kind}Name": name,
    }


def _expiry_sensor_name() -> str:
    repo = load_defs().get_repository_def()
    names = [s.name for s in repo.sensor_defs if "expir" in s.name]
    assert len(names) == 1, f"expected one expiry sensor, found {names}"
    return names[0]


def _insights_schedule() -> dg.ScheduleDefinition:
    """The schedule whose job materializes the insights snapshot asset."""
    repo = load_defs().get_repository_def()
    insights = {insights_asset_key()}
    found = []
    for schedule in repo.schedule_defs:
        job = repo.get_job(schedule.job_name)
        if insights & set(job.asset_layer.executable_asset_keys):
            found.append(schedule)
    assert len(found) == 1, f"expected one insights schedule, found {[s.name for s in found]}"
    return found[0]


def test_expiry_sensor_rematerializes_an_export_that_expired_in_posthog(
    dagster_ui: DagsterDevUI, control: StandinControl
) -> None:
    key = export_asset_key("png")
    sensor = _expiry_sensor_name()
    selector = _selector("sensor", sensor)

    # Set-up run: the in-process executor saves a step subprocess (10-20 s on two busy cores).
    first = dagster_ui.launch_assets([key], run_config=IN_PROCESS)
    run = dagster_ui.wait_for_run(first)
    assert run["status"] == "SUCCESS", dagster_ui.run_failure_text(first)
    before = metadata_dict(dagster_ui.latest_materialization(key) or {})
    old_id, old_path = before["export_id"], Path(before["path"])
    assert old_path.is_file()

    # PostHog drops the export before its recorded expires_after; the file is still here, so
    # only the sensor's lookup in PostHog (404) can notice.
    control.expire_export(int(old_id))
    control.clear_requests_log()
    state = dagster_ui.gql(START_SENSOR, {"selector": selector})["startSensor"]
    assert state["__typename"] == "Sensor", state
    state_id = state["sensorState"]["id"]
    try:

        def sensor_run() -> str | None:
            for r in dagster_ui.runs(limit=10):
                tags = {t["key"]: t["value"] for t in r["tags"]}
                if tags.get("dagster/sensor_name") == sensor:
                    return str(r["runId"])
            return None

        try:
            run_id = dagster_ui.wait_for(
                f"{sensor} to launch a run", sensor_run, timeout_s=SENSOR_RUN_TIMEOUT_S
            )
        except AssertionError as exc:
            ticks = dagster_ui.gql(SENSOR_TICKS, {"selector": selector})
            raise AssertionError(f"{exc}; latest ticks: {ticks}") from None
        run = dagster_ui.wait_for_run(run_id)
        assert run["status"] == "SUCCESS", dagster_ui.run_failure_text(run_id)
        assert tuple(key.path) in [tuple(a["path"]) for a in run["assetSelection"] or []]
        reason = {t["key"]: t["value"] for t in run["tags"]}.get("posthog/expiry_reason", "")
        assert "gone from PostHog" in reason, run["tags"]
    finally:
        dagster_ui.gql(STOP_SENSOR, {"id": state_id})

    after = metadata_dict(dagster_ui.latest_materialization(key) or {})
    assert after["export_id"] != old_id, "the sensor's run exported again"
    new_path = Path(after["path"])
    assert new_path.is_file() and new_path.stat().st_size == after["bytes"]
    posts = [e for e in control.requests_log() if e["method"] == "POST"]
    assert any(e["path"].endswith("/exports/") for e in posts), "no new export was created"


@dataclass(frozen=True)
class ArmedSchedule:
    schedule: dg.ScheduleDefinition
    selector: dict[str, str]
    started_as_of: float


def _backdate_schedule(instance: dg.DagsterInstance, name: str, start: float) -> None:
    """Make a running schedule look as if it had been started at ``start``."""
    states = [
        s
        for s in instance.all_instigator_state(instigator_type=InstigatorType.SCHEDULE)
        if s.name == name
    ]
    assert len(states) == 1, states
    data = states[0].instigator_data
    assert isinstance(data, ScheduleInstigatorData)
    instance.update_instigator_state(
        states[0].with_data(ScheduleInstigatorData(data.cron_schedule, start_timestamp=start))
    )


@pytest.fixture(scope="module", autouse=True)
def armed_insights_schedule(dagster_ui: DagsterDevUI) -> Iterator[ArmedSchedule]:
    """The insights schedule, turned on as if a day ago, when this module starts.

    Why module-wide: the scheduler daemon wakes only at minute boundaries, so arming first lets
    that wait (up to 60 s) overlap the sensor test instead of adding to the suite's time.
    """
    schedule = _insights_schedule()
    selector = _selector("schedule", schedule.name)
    # Arm between two of the scheduler's wake-ups, never in the seconds right before one.
    if dt.datetime.now(dt.UTC).second > 50:
        time.sleep(62 - dt.datetime.now(dt.UTC).second)
    started_as_of = time.time() - 86400 - 60
    state = dagster_ui.gql(START_SCHEDULE, {"selector": selector})["startSchedule"]
    assert state["__typename"] == "ScheduleStateResult", state
    try:
        with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_ui.home))) as instance:
            _backdate_schedule(instance, schedule.name, started_as_of)
        yield ArmedSchedule(schedule, selector, started_as_of)
    finally:
        dagster_ui.gql(STOP_SCHEDULE, {"id": state["scheduleState"]["id"]})


def test_schedule_tick_launches_the_insights_snapshot_of_that_day(
    dagster_ui: DagsterDevUI, armed_insights_schedule: ArmedSchedule
) -> None:
    schedule, selector = armed_insights_schedule.schedule, armed_insights_schedule.selector

    def ticked() -> list[dict[str, Any]] | None:
        data = dagster_ui.gql(SCHEDULE_TICKS, {"selector": selector})
        ticks = data["scheduleOrError"]["scheduleState"]["ticks"]
        done = [t for t in ticks if t["status"] in ("SUCCESS", "FAILURE", "SKIPPED")]
        return done or None

    ticks = dagster_ui.wait_for(
        f"{schedule.name} to tick", ticked, timeout_s=SCHEDULE_RUN_TIMEOUT_S
    )
    assert all(t["status"] == "SUCCESS" for t in ticks), ticks
    defs = load_defs()
    key = insights_asset_key()
    assert defs.resolve_assets_def(key).partitions_def is None  # nothing past to backfill
    for tick in ticks:
        assert armed_insights_schedule.started_as_of <= tick["timestamp"] <= time.time()
        assert len(tick["runIds"]) == 1
        (run_id,) = tick["runIds"]
        run = dagster_ui.wait_for_run(run_id)
        assert run["status"] == "SUCCESS", dagster_ui.run_failure_text(run_id)
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert tags["dagster/schedule_name"] == schedule.name
        assert "dagster/partition" not in tags
        mat = dagster_ui.latest_materialization(key)
        assert mat is not None and metadata_dict(mat).get("snapshot_date") == (
            dt.datetime.now(dt.UTC).date().isoformat()
        ), mat
        assert mat is not None and mat["runId"] == run_id, (key, mat)

"""Expiry and retry sensors, evaluated as the daemon does (``evaluate_tick``) on a real instance,
and their per-export decisions as plain functions."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.sensor_definition import SensorExecutionData
from dagster._core.storage.dagster_run import RunRecord

from posthog_assets.common import (
    TAG_DEDUP_ROOT,
    TAG_REFRESH_OF,
    TAG_RETRY_ATTEMPT,
    TAG_RETRY_OF,
    file_sha256,
)
from posthog_assets.exports.assets import build_posthog_export_assets
from posthog_assets.exports.log import build_posthog_exports_log_asset, exports_log_key
from posthog_assets.exports.records import ExportFailure, ExportMaterialization
from posthog_assets.exports.sensors import (
    HashedFile,
    RefreshRequested,
    RetryPlan,
    build_posthog_export_expiry_sensor,
    build_posthog_export_retry_sensor,
    check_expiry,
    plan_refresh,
    plan_retry,
)
from posthog_assets_tests.support.exports import (
    CSV,
    PNG,
    export_posts,
    make_project,
    materialization_metadata,
    resources,
)

pytestmark = pytest.mark.integration

DAY = 86400.0


def _key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["posthog", "exports", name])


def _evaluate(
    sensor: dg.SensorDefinition, instance, cursor: str | None, resources: dict | None = None
) -> SensorExecutionData:
    """One tick, the daemon's way (direct calls reject ``required_resource_keys``)."""
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as ctx:
        return sensor.evaluate_tick(ctx)


# ---------------------------------------------------------------------- expiry


def test_expiry_sensor_requests_expiring_missing_and_changed_files_once(
    posthog_resource, control, tmp_path
):
    project = make_project(
        {"name": "table", "insight": 2, "format": CSV},  # expires in 7 days
        {"name": "gone", "insight": 1, "format": PNG},  # 180 days
        {"name": "changed", "insight": 3, "format": PNG},
        {"name": "fine", "insight": 4, "format": PNG},
        {"name": "early", "insight": 5, "format": PNG},  # PostHog drops it early
    )
    assets = build_posthog_export_assets(project=project, retry_policy=None)
    keys = list(assets[0].keys)
    log = build_posthog_exports_log_asset(project=project, export_keys=keys)
    now = [time.time() + 7 * DAY]  # a week later: the CSV is past or within a day of expiry
    sensor = build_posthog_export_expiry_sensor(
        project=project, export_keys=keys, log_key=log.key, margin_s=DAY, clock=lambda: now[0]
    )
    res = resources(posthog_resource, tmp_path)

    with dg.instance_for_test() as instance:
        run = dg.materialize(assets, resources=res, instance=instance)
        md = {
            name: materialization_metadata(run, _key(name))
            for name in ("table", "gone", "changed", "fine", "early")
        }
        control.expire_export(md["early"]["export_id"])
        Path(md["gone"]["path"]).unlink()
        changed = Path(md["changed"]["path"])
        data = bytearray(changed.read_bytes())
        data[-20] ^= 0xFF  # same size, different bytes
        changed.write_bytes(bytes(data))

        control.clear_requests_log()
        first = _evaluate(sensor, instance, None, res)
        second = _evaluate(sensor, instance, first.cursor, res)

        requested = {r.asset_selection[0].path[-1]: r for r in first.run_requests}
        assert set(requested) == {"table", "gone", "changed", "early"}
        for name, request in requested.items():
            assert request.run_key == f"expiry:posthog/exports/{name}:{md[name]['export_id']}:1"
            assert request.asset_selection == [_key(name), log.key]
            assert request.tags[TAG_REFRESH_OF] == f"posthog/exports/{name}:{md[name]['export_id']}"
        assert "expire" in requested["table"].tags["posthog/expiry_reason"]
        assert "missing" in requested["gone"].tags["posthog/expiry_reason"]
        assert "sha256" in requested["changed"].tags["posthog/expiry_reason"]
        assert "gone from PostHog" in requested["early"].tags["posthog/expiry_reason"]
        # Only exports that looked fine locally were looked up, once per tick.
        lookups = sorted(
            int(e["path"].rstrip("/").rsplit("/", 1)[-1])
            for e in control.requests_log()
            if e["method"] == "GET" and "/exports/" in e["path"]
        )
        assert lookups == sorted([md["fine"]["export_id"], md["early"]["export_id"]] * 2)
        assert second.run_requests == [] and second.skip_message  # nothing twice

        # The refresh runs: "gone" and "changed" get new exports and files; a later expiry of
        # the new CSV export is a new request, never swallowed by the old run_key.
        dg.materialize(
            assets,
            resources=res,
            instance=instance,
            selection=[_key("gone"), _key("changed"), _key("table")],
        )
        third = _evaluate(sensor, instance, second.cursor, res)
        assert [r.asset_selection[0].path[-1] for r in third.run_requests] == ["table"]
        assert third.run_requests[0].run_key != requested["table"].run_key


def test_expiry_sensor_stops_within_its_time_budget_and_continues_next_tick(tmp_path):
    project = make_project()
    keys = [_key(f"e{i:03d}") for i in range(60)]
    clock = [1_000_000.0]

    def tick_clock() -> float:
        clock[0] += 0.05  # every look at the clock costs 50 ms of "work"
        return clock[0]

    sensor = build_posthog_export_expiry_sensor(
        project=project,
        export_keys=keys,
        margin_s=0,
        time_budget_s=2.0,
        clock=tick_clock,
        check_posthog=False,
    )
    with dg.instance_for_test() as instance:
        for i, key in enumerate(keys):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(
                    asset_key=key,
                    metadata={
                        "export_id": 1000 + i,
                        "expires_after": "2000-01-01T00:00:00Z",
                        "path": str(tmp_path / "missing.png"),
                    },
                )
            )
        seen: list[str] = []
        cursor = None
        ticks = 0
        while len(seen) < len(keys) and ticks < 20:
            result = _evaluate(sensor, instance, cursor)
            cursor = result.cursor
            seen += [r.run_key for r in result.run_requests]
            ticks += 1
        again = _evaluate(sensor, instance, cursor)

    assert ticks > 1, "a single tick should not have handled everything with this budget"
    assert len(seen) == len(set(seen)) == len(keys)  # each export requested exactly once
    assert again.run_requests == [] and again.skip_message
    assert len(json.loads(again.cursor)["requested"]) == len(keys)


def test_expiry_sensor_rides_out_posthog_errors_and_names_a_missing_scope(
    posthog_resource, control, tmp_path
):
    project = make_project({"name": "weekly_png", "insight": 1, "format": PNG})
    assets = build_posthog_export_assets(project=project, retry_policy=None)
    sensor = build_posthog_export_expiry_sensor(project=project, export_keys=list(assets[0].keys))
    res = resources(posthog_resource, tmp_path)

    with dg.instance_for_test() as instance:
        dg.materialize(assets, resources=res, instance=instance)
        # PostHog down: the tick neither fails nor re-exports; it looks again next tick.
        control.add_fault(match=r"/exports/\d+/?$", method="GET", kind="status", status=503)
        down = _evaluate(sensor, instance, None, res)
        assert down.run_requests == [] and down.skip_message
        control.clear_faults()

        # A key without export:read fails the tick with the scope to add.
        control.add_key("phx_no_export_read", scopes=["insight:read"])
        no_scope = resources(posthog_resource, tmp_path, personal_api_key="phx_no_export_read")
        with pytest.raises(Exception, match="export:read") as raised:
            _evaluate(sensor, instance, None, no_scope)
        assert "phx_no_export_read" not in str(raised.value)


# ---------------------------------------------------------------------- retry


def test_retry_sensor_retries_timeouts_after_backoff_and_never_user_errors(
    posthog_resource, control, tmp_path
):
    control.configure(export_post_held=False, export_delay_by_format={PNG: 1.0})
    project = make_project(
        {"name": "slow_png", "insight": 1, "format": PNG},
        {"name": "empty_csv", "insight": 40, "format": CSV},
    )
    assets = build_posthog_export_assets(project=project, retry_policy=None)
    log = build_posthog_exports_log_asset(project=project, export_keys=list(assets[0].keys))
    now = [time.time()]
    sensor = build_posthog_export_retry_sensor(
        project=project,
        export_assets=assets,
        log_key=log.key,
        backoff_s=30,
        clock=lambda: now[0],
    )
    res = resources(posthog_resource, tmp_path, poll_timeout_s=0.3)

    with dg.instance_for_test() as instance:
        failed = dg.materialize(
            [*assets, log], resources=res, instance=instance, raise_on_error=False
        )
        assert not failed.success
        assert len(export_posts(control)) == 1  # the user error never reached POST

        now[0] = time.time()
        waiting = _evaluate(sensor, instance, None)
        assert waiting.run_requests == [] and "waiting" in (waiting.skip_message or "")
        now[0] += 31
        due = _evaluate(sensor, instance, waiting.cursor)
        again = _evaluate(sensor, instance, due.cursor)

        assert len(due.run_requests) == 1
        request = due.run_requests[0]
        assert request.asset_selection == [_key("slow_png"), exports_log_key(project)]
        assert request.run_key == f"posthog-retry:{failed.run_id}:1"
        assert request.tags[TAG_RETRY_ATTEMPT] == "1"
        assert request.tags[TAG_RETRY_OF] == failed.run_id
        assert request.tags[TAG_DEDUP_ROOT] == failed.run_id
        assert again.run_requests == []

        # Launch what the sensor asked for: it resumes the pending export (no new POST).
        time.sleep(0.8)
        retried = dg.materialize(
            [*assets, log],
            resources=resources(posthog_resource, tmp_path),
            instance=instance,
            selection=request.asset_selection,
            tags=request.tags,
        )
        assert retried.success
        assert len(export_posts(control)) == 1
        md = materialization_metadata(retried, _key("slow_png"))
        assert md["resumed"] is True

        # The successful retry run gives the sensor nothing more to do.
        assert _evaluate(sensor, instance, again.cursor).run_requests == []


def test_retry_sensor_gives_up_after_max_attempts(posthog_resource, control, tmp_path):
    control.add_fault(match=r"/exports/?$", method="POST", kind="status", status=503)
    project = make_project({"name": "weekly_png", "insight": 1, "format": PNG})
    assets = build_posthog_export_assets(project=project, retry_policy=None)
    sensor = build_posthog_export_retry_sensor(
        project=project, export_assets=assets, max_attempts=2, backoff_s=0
    )
    res = resources(posthog_resource, tmp_path)

    with dg.instance_for_test() as instance:
        first = dg.materialize(assets, resources=res, instance=instance, raise_on_error=False)
        tick = _evaluate(sensor, instance, None)
        assert [r.tags[TAG_RETRY_ATTEMPT] for r in tick.run_requests] == ["1"]

        second = dg.materialize(
            assets,
            resources=res,
            instance=instance,
            raise_on_error=False,
            tags=tick.run_requests[0].tags,
        )
        tick = _evaluate(sensor, instance, tick.cursor)
        assert [r.tags[TAG_RETRY_ATTEMPT] for r in tick.run_requests] == ["2"]
        assert tick.run_requests[0].tags[TAG_DEDUP_ROOT] == first.run_id

        dg.materialize(
            assets,
            resources=res,
            instance=instance,
            raise_on_error=False,
            tags=tick.run_requests[0].tags,
        )
        tick = _evaluate(sensor, instance, tick.cursor)
        assert tick.run_requests == []  # third failure: attempts used up
        assert not second.success


def test_retry_sensor_waits_until_posthogs_rate_limit_lets_requests_through(
    posthog_resource, control, tmp_path
):
    """The hourly window is full: the step fails at once saying when PostHog will accept
    requests again, is not retried within the run, and the sensor waits until that time."""
    control.configure(rate_limits=True, rate_limit_overrides={"sustained": "1/hour"})
    project = make_project({"name": "weekly_png", "insight": 1, "format": PNG})
    assets = build_posthog_export_assets(project=project)
    now = [time.time()]
    sensor = build_posthog_export_retry_sensor(
        project=project, export_assets=assets, backoff_s=0, clock=lambda: now[0]
    )
    res = resources(posthog_resource, tmp_path, pace_requests=False)

    with dg.instance_for_test() as instance:
        started = time.time()
        client = res["posthog"].get_client()
        client.list_group_types()  # the one request of the hour
        failed = dg.materialize(assets, resources=res, instance=instance, raise_on_error=False)
        assert not failed.success and time.time() - started < 15
        assert not [e for e in failed.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        failure = failed.get_step_failure_events()[0].step_failure_data.user_failure_data
        assert "accepts requests again at" in failure.description
        [recorded] = failure.metadata["posthog_export_failures"].value
        assert recorded["retry_at"] == pytest.approx(started + 3600, abs=60)

        tick = _evaluate(sensor, instance, None)
        assert tick.run_requests == [] and "waiting" in (tick.skip_message or "")
        now[0] = recorded["retry_at"] + 1
        tick = _evaluate(sensor, instance, tick.cursor)
        assert [r.tags[TAG_RETRY_ATTEMPT] for r in tick.run_requests] == ["1"]


# ---------------------------------------------------------------------- decisions, no server

NOW = 1_000_000_000.0
LOG = "posthog/exports_log"


def _recorded(path: Path, **kw) -> ExportMaterialization:
    size, sha256 = path.stat().st_size, file_sha256(path)
    values = {"export_id": 7, "path": str(path), "bytes": size, "sha256": sha256}
    return ExportMaterialization(**{**values, **kw})


@pytest.mark.unit
def test_check_expiry_reads_the_recorded_time_then_the_file(tmp_path):
    path = tmp_path / "chart.png"
    path.write_bytes(b"chart")
    soon = _recorded(path, expires_after="2001-09-09T12:00:00Z")  # ten hours after NOW
    fine = check_expiry(soon, NOW, margin_s=3600)
    assert fine.reason is None and fine.hashed is not None and fine.hashed.matches
    assert check_expiry(soon, NOW, DAY).reason == "expires at 2001-09-09T12:00:00+00:00"
    assert check_expiry(soon, NOW + DAY, 0).reason == "expired at 2001-09-09T12:00:00+00:00"

    recorded = _recorded(path)
    path.write_bytes(b"CHART")  # same size, other bytes
    changed = check_expiry(recorded, NOW, 0, fine.hashed)
    assert changed.reason == "file sha256 differs from the recorded download"
    assert changed.hashed is not None and not changed.hashed.matches
    path.write_bytes(b"chart!")
    assert check_expiry(recorded, NOW, 0).reason == "file size 6 differs from recorded 5"
    path.unlink()
    gone = check_expiry(recorded, NOW, 0, fine.hashed)
    assert gone.reason == f"file {path} is missing" and gone.hashed is None


@pytest.mark.unit
def test_check_expiry_hashes_a_file_only_when_it_changed(tmp_path):
    path = tmp_path / "table.csv"
    path.write_bytes(b"a,b\n1,2\n")
    stat = path.stat()
    # What an earlier tick found for this very file (its answer is trusted, not recomputed).
    cached = HashedFile(export_id=7, size=stat.st_size, mtime_ns=stat.st_mtime_ns, matches=False)
    assert check_expiry(_recorded(path), NOW, 0, cached).hashed == cached
    # A new export of the same file: hashed again.
    rehashed = check_expiry(_recorded(path, export_id=8), NOW, 0, cached)
    assert rehashed.reason is None and rehashed.hashed is not None and rehashed.hashed.matches


def _run(tags: dict[str, str] | None = None, **kw) -> dg.DagsterRun:
    return dg.DagsterRun(job_name="__ASSET_JOB", run_id="failed-run", tags=tags or {}, **kw)


def _last_run(status: dg.DagsterRunStatus, end_time: float | None = None) -> RunRecord:
    at = datetime.fromtimestamp(NOW, UTC)
    return RunRecord(1, _run(status=status), at, at, end_time=end_time)


@pytest.mark.unit
def test_plan_refresh_asks_once_then_cools_down():
    first = plan_refresh(7, NOW, None, None, launched=0)
    assert first == RefreshRequested(export_id=7, attempt=1, at=NOW)

    hour, after = 3600.0, 6 * 3600.0
    assert plan_refresh(7, NOW + hour, first, None, 1, after) is None  # asked an hour ago
    running = _last_run(dg.DagsterRunStatus.STARTED)
    assert plan_refresh(7, NOW + 7 * hour, first, running, 1, after) is None
    ended = _last_run(dg.DagsterRunStatus.SUCCESS, end_time=NOW + 5 * hour)
    assert plan_refresh(7, NOW + 7 * hour, first, ended, 1, after) is None  # just ended
    again = plan_refresh(7, NOW + 12 * hour, first, ended, 2, after)
    assert again == RefreshRequested(export_id=7, attempt=3, at=NOW + 12 * hour)


def _failure(name: str, **kw) -> ExportFailure:
    return ExportFailure(asset_key=f"posthog/exports/{name}", export_name=name, **kw)


@pytest.mark.unit
def test_plan_retry_retries_passing_failures_after_backoff_never_user_errors():
    slow = _failure("slow_png", kind="PostHogPollTimeout")
    final = _failure("empty_csv", kind="PostHogExportFailed", retryable=False, message="no")
    failed = [slow.asset_key, final.asset_key, "posthog/exports/crashed", LOG]
    failures = {f.asset_key: f for f in (slow, final)}

    plan = plan_retry(_run(), failed, failures, NOW, log_key=LOG, backoff_s=30)

    assert plan.pending is not None
    assert plan.pending.assets == ["posthog/exports/crashed", slow.asset_key, LOG]
    assert plan.pending.due == NOW + 30
    assert plan.pending.run_key == "posthog-retry:failed-run:1"
    assert plan.pending.tags == {
        TAG_RETRY_ATTEMPT: "1",
        TAG_RETRY_OF: "failed-run",
        TAG_DEDUP_ROOT: "failed-run",
    }
    assert plan.warnings == (
        "Not retrying posthog/exports/empty_csv (failed run failed-run): PostHogExportFailed is "
        "not retryable: no",
    )
    # Every export failure final: no run, not even for the log.
    only_final = plan_retry(_run(), [final.asset_key, LOG], failures, NOW, log_key=LOG)
    assert only_final.pending is None and len(only_final.warnings) == 1
    assert plan_retry(_run(), [], {}, NOW) == RetryPlan()  # nothing of ours failed


@pytest.mark.unit
def test_plan_retry_backs_off_waits_for_the_rate_limit_and_gives_up():
    limited = _failure("weekly_png", retryable=False, retry_at=NOW + 3600)
    chain = {TAG_RETRY_ATTEMPT: "1", TAG_DEDUP_ROOT: "first-run"}
    failed = [limited.asset_key]

    plan = plan_retry(_run(chain), failed, {limited.asset_key: limited}, NOW, backoff_s=60)
    assert plan.pending is not None and plan.pending.tags[TAG_RETRY_ATTEMPT] == "2"
    assert plan.pending.due == NOW + 3600  # PostHog's time, later than the 120 s backoff
    assert plan.pending.tags[TAG_DEDUP_ROOT] == "first-run"
    capped = plan_retry(_run(chain), failed, {}, NOW, backoff_s=3000, backoff_max_s=4000)
    assert capped.pending is not None and capped.pending.due == NOW + 4000

    used_up = plan_retry(_run({TAG_RETRY_ATTEMPT: "3"}), failed, {}, NOW, max_attempts=3)
    assert used_up == RetryPlan(
        warnings=(
            "Giving up on posthog/exports/weekly_png: run failed-run was already retry 3 of 3",
        )
    )


@pytest.mark.unit
def test_sensors_start_afresh_from_an_unreadable_cursor(tmp_path):
    project = make_project()
    key = _key("chart")
    expiry = build_posthog_export_expiry_sensor(
        project=project, export_keys=[key], check_posthog=False
    )
    retry = build_posthog_export_retry_sensor(project=project, export_assets=[])
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=key, metadata={"export_id": 1, "path": str(tmp_path / "gone.png")}
            )
        )
        for cursor in ("not json", '{"offset": 3, "hashed": []}', '{"__class__": "Other"}'):
            tick = _evaluate(expiry, instance, cursor)
            assert [r.run_key for r in tick.run_requests] == ["expiry:posthog/exports/chart:1:1"]
            assert _evaluate(expiry, instance, tick.cursor).run_requests == []
            assert _evaluate(retry, instance, cursor).skip_message

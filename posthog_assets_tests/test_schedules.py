"""Snapshot schedules and definitions: stopped by default, daily, no HTTP at load."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from posthog_assets.build import build_project_definitions
from posthog_assets.config import GROUPS_SCHEDULE_CRON, INSIGHTS_SCHEDULE_CRON
from posthog_assets_tests.support.snapshots import snapshot_project

pytestmark = pytest.mark.integration


@pytest.fixture
def defs(posthog_env: dict[str, str]) -> dg.Definitions:
    return build_project_definitions(snapshot_project(posthog_env))


def test_both_schedules_exist_and_are_stopped_by_default(defs: dg.Definitions) -> None:
    insights = defs.resolve_schedule_def("posthog_insights_snapshot_daily")
    groups = defs.resolve_schedule_def("posthog_groups_snapshot_daily")
    assert insights.default_status == dg.DefaultScheduleStatus.STOPPED
    assert groups.default_status == dg.DefaultScheduleStatus.STOPPED
    assert insights.job_name == "posthog_insights_snapshot"
    assert groups.job_name == "posthog_groups_snapshot"
    assert groups.cron_schedule == GROUPS_SCHEDULE_CRON
    assert insights.execution_timezone in (None, "UTC")


def test_insights_schedule_takes_one_snapshot_a_day_with_no_partition_to_backfill(
    defs: dg.Definitions,
) -> None:
    schedule = defs.resolve_schedule_def("posthog_insights_snapshot_daily")
    assert schedule.cron_schedule == INSIGHTS_SCHEDULE_CRON == "0 6 * * *"
    at = dt.datetime(2026, 3, 2, 6, 0, tzinfo=dt.UTC)
    with dg.DagsterInstance.ephemeral() as instance:
        context = dg.build_schedule_context(instance=instance, scheduled_execution_time=at)
        data = schedule.evaluate_tick(context)
    [request] = data.run_requests or []
    assert request.partition_key is None
    assert defs.resolve_job_def("posthog_insights_snapshot").partitions_def is None


def test_groups_job_selects_every_group_asset_and_its_checks(defs: dg.Definitions) -> None:
    job = defs.resolve_job_def("posthog_groups_snapshot")
    keys = {k.path[-1] for k in job.asset_layer.selected_asset_keys}
    assert keys == {"group_types", "groups", "group_property_definitions", "group_property_values"}
    check_names = {k.name for k in job.asset_layer.asset_graph.asset_check_keys}
    assert "groups_count_per_type_matches_api" in check_names


def test_one_job_and_schedule_per_project(
    posthog_env: dict[str, str], tmp_path: Path, standin: Any
) -> None:
    defs = dg.Definitions.merge(
        build_project_definitions(
            snapshot_project(
                posthog_env,
                name="prod",
                groups={"tracked": [{"group_type_index": 0, "group_key": "organization-1"}]},
            )
        ),
        build_project_definitions(
            snapshot_project(
                posthog_env,
                name="staging",
                project_id=standin.project_id + 1,
                groups={"enabled": False},
            )
        ),
    )
    names = {s.name for s in defs.schedules or []}
    assert names == {
        "posthog_prod_insights_snapshot_daily",
        "posthog_prod_groups_snapshot_daily",
        "posthog_staging_insights_snapshot_daily",
    }
    keys = {k.to_user_string() for a in defs.assets or [] for k in a.keys}
    assert "posthog/prod/tracked_groups" in keys and "posthog/staging/insights" in keys
    assert not any(k.startswith("posthog/staging/group") for k in keys)
    defs.resolve_job_def("posthog_staging_insights_snapshot")
    defs.get_repository_def()  # validates the whole location (op names, resources)


def test_building_the_definitions_makes_no_http_call(
    posthog_env: dict[str, str], control: Any, tmp_path: Path
) -> None:
    control.clear_requests_log()
    defs = build_project_definitions(
        snapshot_project(
            posthog_env, groups={"tracked": [{"group_type_index": 0, "group_key": "x"}]}
        )
    )
    repo = defs.get_repository_def()
    assert len(repo.asset_graph.get_all_asset_keys()) == 11  # insights + 5 tidy tables + groups
    assert control.requests_log() == []

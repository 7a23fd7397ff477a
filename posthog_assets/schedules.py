"""Daily schedules for the snapshots, both stopped by default (turn them on in the UI).

Each tick takes that day's snapshot: the insights snapshot records the UTC date it was taken, so a
second run the same day replaces that day's rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from posthog_assets.config import GROUPS_SCHEDULE_CRON, INSIGHTS_SCHEDULE_CRON, ProjectConfig
from posthog_assets.snapshots.definitions import groups_job_name, insights_job_name


def build_insights_snapshot_schedule(
    job_name: str,
    *,
    name: str,
    cron_schedule: str = INSIGHTS_SCHEDULE_CRON,
) -> dg.ScheduleDefinition:
    """Daily at 06:00 UTC: that day's insights snapshot."""
    return dg.ScheduleDefinition(
        name=name,
        job_name=job_name,
        cron_schedule=cron_schedule,
        execution_timezone="UTC",
        description="Daily insights snapshot (stored under the UTC date it is taken).",
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )


def build_groups_snapshot_schedule(
    job_name: str, *, name: str, cron_schedule: str = GROUPS_SCHEDULE_CRON
) -> dg.ScheduleDefinition:
    """Daily groups snapshot (replaces the project's previous snapshot)."""
    return dg.ScheduleDefinition(
        name=name,
        job_name=job_name,
        cron_schedule=cron_schedule,
        execution_timezone="UTC",
        description="Daily snapshot of group types, groups, properties and tracked groups.",
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )


def build_posthog_schedules(projects: Sequence[ProjectConfig]) -> list[dg.ScheduleDefinition]:
    """The daily schedules of every project's snapshot jobs (see ``snapshots.definitions``)."""
    schedules = []
    for project in projects:
        if project.insights.enabled:
            job = insights_job_name(project)
            schedules.append(
                build_insights_snapshot_schedule(
                    job, name=f"{job}_daily", cron_schedule=project.insights.schedule
                )
            )
        if project.groups.enabled:
            job = groups_job_name(project)
            schedules.append(
                build_groups_snapshot_schedule(
                    job, name=f"{job}_daily", cron_schedule=project.groups.schedule
                )
            )
    return schedules

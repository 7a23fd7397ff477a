"""Daily schedules for the snapshots, both stopped by default (turn them on in the UI).

Each tick takes that day's snapshot: the insights snapshot records the UTC date it was taken, so a
second run the same day replaces that day's rows.
"""

from __future__ import annotations

import dagster as dg

#: 06:00 UTC: after PostHog's nightly cache warming, before most people look at dashboards.
INSIGHTS_SCHEDULE_CRON = "0 6 * * *"
#: Groups change slowly; once a day, an hour after the insights.
GROUPS_SCHEDULE_CRON = "0 7 * * *"


def build_insights_snapshot_schedule(
    job: dg.UnresolvedAssetJobDefinition,
    *,
    name: str,
    cron_schedule: str = INSIGHTS_SCHEDULE_CRON,
) -> dg.ScheduleDefinition:
    """Daily at 06:00 UTC: that day's insights snapshot."""
    return dg.ScheduleDefinition(
        name=name,
        job=job,
        cron_schedule=cron_schedule,
        execution_timezone="UTC",
        description="Daily insights snapshot (stored under the UTC date it is taken).",
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )


def build_groups_snapshot_schedule(
    job: dg.UnresolvedAssetJobDefinition, *, name: str, cron_schedule: str = GROUPS_SCHEDULE_CRON
) -> dg.ScheduleDefinition:
    """Daily groups snapshot (replaces the project's previous snapshot)."""
    return dg.ScheduleDefinition(
        name=name,
        job=job,
        cron_schedule=cron_schedule,
        execution_timezone="UTC",
        description="Daily snapshot of group types, groups, properties and tracked groups.",
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )

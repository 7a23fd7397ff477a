"""Daily schedules for the snapshots, both stopped by default (turn them on in the UI).

The insights schedule is built from the partitioned job, so each tick materializes the partition
of that UTC day (the partitions definition includes today, see ``insights_partitions_def``).
"""

from __future__ import annotations

import dagster as dg

#: 06:00 UTC: after PostHog's nightly cache warming, before most people look at dashboards.
INSIGHTS_SCHEDULE_HOUR = 6
INSIGHTS_SCHEDULE_MINUTE = 0
#: Groups change slowly; once a day, an hour after the insights.
GROUPS_SCHEDULE_CRON = "0 7 * * *"


def build_insights_snapshot_schedule(
    job: dg.UnresolvedAssetJobDefinition, *, name: str
) -> dg.ScheduleDefinition | dg.UnresolvedPartitionedAssetScheduleDefinition:
    """Daily at 06:00 UTC, for that day's partition."""
    return dg.build_schedule_from_partitioned_job(
        job,
        name=name,
        description="Daily insights snapshot (the partition of the current UTC day).",
        hour_of_day=INSIGHTS_SCHEDULE_HOUR,
        minute_of_hour=INSIGHTS_SCHEDULE_MINUTE,
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

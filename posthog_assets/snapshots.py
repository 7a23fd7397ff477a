"""All snapshot assets, checks, jobs and schedules of every configured project.

``build_posthog_snapshot_definitions(settings)`` makes no HTTP call: ids and options come from the
YAML configuration; resources (``posthog*`` and ``duckdb``) come from ``build_resources``.
"""

from __future__ import annotations

import dagster as dg

from posthog_assets.config import Settings
from posthog_assets.groups import build_posthog_group_assets
from posthog_assets.insights import build_posthog_insights_snapshot
from posthog_assets.schedules import (
    build_groups_snapshot_schedule,
    build_insights_snapshot_schedule,
)
from posthog_assets.snapshot_checks import build_group_checks, build_insights_checks
from posthog_assets.translator import DagsterPostHogTranslator


def insights_job_name(resource_key: str) -> str:
    return f"{resource_key}_insights_snapshot"


def groups_job_name(resource_key: str) -> str:
    return f"{resource_key}_groups_snapshot"


def build_posthog_snapshot_definitions(
    settings: Settings, *, translator: DagsterPostHogTranslator | None = None
) -> dg.Definitions:
    """Insights and group snapshots (assets, checks, one job and one schedule each) per project."""
    translator = translator or DagsterPostHogTranslator()
    assets: list[dg.AssetsDefinition] = []
    checks: list[dg.AssetChecksDefinition] = []
    jobs: list[dg.UnresolvedAssetJobDefinition] = []
    schedules: list = []
    for project in settings.projects:
        prefix = project.resource_key
        if project.insights.enabled:
            insights = build_posthog_insights_snapshot(project, translator=translator)
            assets.append(insights)
            checks += build_insights_checks(project, asset_key=insights.key)
            job = dg.define_asset_job(
                insights_job_name(prefix),
                selection=dg.AssetSelection.assets(insights.key),
                description=f"Daily insights snapshot of project '{project.name}' into DuckDB.",
            )
            jobs.append(job)
            schedules.append(
                build_insights_snapshot_schedule(job, name=f"{insights_job_name(prefix)}_daily")
            )
        group_assets = build_posthog_group_assets(project, translator=translator)
        if group_assets:
            assets += group_assets.values()
            checks += build_group_checks(
                project,
                groups_key=group_assets["groups"].key if "groups" in group_assets else None,
                tracked_key=(
                    group_assets["tracked_groups"].key if "tracked_groups" in group_assets else None
                ),
            )
            job = dg.define_asset_job(
                groups_job_name(prefix),
                selection=dg.AssetSelection.assets(*(a.key for a in group_assets.values())),
                description=f"Groups snapshot of project '{project.name}' into DuckDB.",
            )
            jobs.append(job)
            schedules.append(
                build_groups_snapshot_schedule(job, name=f"{groups_job_name(prefix)}_daily")
            )
    return dg.Definitions(assets=assets, asset_checks=checks, jobs=jobs, schedules=schedules)

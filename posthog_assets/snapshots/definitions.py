"""Every snapshot asset of a project, with its checks and its job.

No HTTP call: ids and options come from the configuration. Each table's spec comes from the
translator; a table computed from another (the tidy tables, from ``insights``) is shown
downstream of it, with the lineage of each column.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from posthog_assets.config import PostHogProject
from posthog_assets.snapshots.checks import table_checks
from posthog_assets.snapshots.factory import build_snapshot_asset
from posthog_assets.snapshots.groups import group_sources
from posthog_assets.snapshots.insights import InsightsSource
from posthog_assets.snapshots.source import SnapshotSource
from posthog_assets.tables import Table
from posthog_assets.translator import (
    DagsterPostHogTranslator,
    PostHogMetadataSet,
    PostHogSnapshotProps,
)


def insights_job_name(project: PostHogProject) -> str:
    return f"{project.resource_key}_insights_snapshot"


def groups_job_name(project: PostHogProject) -> str:
    return f"{project.resource_key}_groups_snapshot"


def snapshot_specs(
    project: PostHogProject, tables: Sequence[Table], translator: DagsterPostHogTranslator
) -> dict[str, dg.AssetSpec]:
    """The translator's spec of each table, by table name; a table with an upstream among
    ``tables`` depends on its spec (whatever key the translator gave it)."""
    specs = {t.name: translator.get_asset_spec(PostHogSnapshotProps(project, t)) for t in tables}
    for table in tables:
        if table.upstream in specs:
            upstream = specs[table.upstream].key
            specs[table.name] = (
                specs[table.name]
                .replace_attributes(deps=[upstream])
                .merge_attributes(
                    metadata={"dagster/column_lineage": column_lineage(table, upstream)}
                )
            )
    return specs


def column_lineage(table: Table, upstream: dg.AssetKey) -> dg.TableColumnLineage:
    """Which upstream columns each column's values come from."""
    return dg.TableColumnLineage(
        deps_by_column={
            c.name: [dg.TableColumnDep(asset_key=upstream, column_name=u) for u in c.lineage]
            for c in table.columns
            if c.lineage
        }
    )


def build_source(
    project: PostHogProject, source: SnapshotSource, translator: DagsterPostHogTranslator
) -> tuple[dg.AssetsDefinition, list[dg.AssetChecksDefinition]]:
    """One source's asset (its table and companions) and every check their declarations ask."""
    tables = [source.table, *source.companions]
    specs = snapshot_specs(project, tables, translator)
    resource_key = PostHogMetadataSet.extract(specs[source.table.name].metadata).resource_key
    asset = build_snapshot_asset(
        source=source, specs=specs, resource_key=resource_key or project.resource_key
    )
    checks = [c for t in tables for c in table_checks(project, t, specs[t.name].key)]
    return asset, checks


def build_posthog_snapshot_definitions(
    projects: Sequence[PostHogProject], *, translator: DagsterPostHogTranslator | None = None
) -> dg.Definitions:
    """Insights and group snapshots per project: assets, checks, one job each, and its daily
    schedule (stopped until turned on in the UI). The insights snapshot records the UTC date it
    is taken, so a second run the same day replaces that day's rows."""
    translator = translator or DagsterPostHogTranslator()
    assets: list[dg.AssetsDefinition] = []
    checks: list[dg.AssetChecksDefinition] = []
    jobs: list[dg.UnresolvedAssetJobDefinition] = []
    schedules: list[dg.ScheduleDefinition] = []
    for project in projects:
        insights, groups = project.insights, project.groups
        families = {
            insights_job_name(project): (
                [InsightsSource(project)] if insights.enabled else [],
                insights.schedule,
                f"Daily insights snapshot of project '{project.name}' into DuckDB (stored under "
                "the UTC date it is taken).",
            ),
            groups_job_name(project): (
                group_sources(project) if groups.enabled else [],
                groups.schedule,
                f"Groups snapshot of project '{project.name}' into DuckDB: group types, groups, "
                "properties and tracked groups.",
            ),
        }
        for job_name, (sources, cron, description) in families.items():
            built = [build_source(project, s, translator) for s in sources]
            if not built:
                continue
            assets += [asset for asset, _ in built]
            checks += [c for _, cs in built for c in cs]
            keys = [k for asset, _ in built for k in asset.keys]
            jobs.append(
                dg.define_asset_job(
                    job_name, selection=dg.AssetSelection.assets(*keys), description=description
                )
            )
            schedules.append(
                dg.ScheduleDefinition(
                    name=f"{job_name}_daily",
                    job_name=job_name,
                    cron_schedule=cron,
                    execution_timezone="UTC",
                    description=description,
                    default_status=dg.DefaultScheduleStatus.STOPPED,
                )
            )
    return dg.Definitions(assets=assets, asset_checks=checks, jobs=jobs, schedules=schedules)

"""Every snapshot asset of a project, with its checks and its job.

No HTTP call: ids and options come from the configuration. Each table's spec comes from the
translator; a table computed from another (the tidy tables, from ``insights``) is shown
downstream of it, with the lineage of each column.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from posthog_assets.config import CATALOG_SCHEDULE_CRON, PostHogProject
from posthog_assets.snapshots.catalog import catalog_sources
from posthog_assets.snapshots.checks import table_checks
from posthog_assets.snapshots.events import EventsSource
from posthog_assets.snapshots.experiment_results import ExperimentResultsSource
from posthog_assets.snapshots.factory import build_snapshot_asset
from posthog_assets.snapshots.groups import group_sources
from posthog_assets.snapshots.insights import InsightsSource
from posthog_assets.snapshots.persons import PersonsSource
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


def catalog_job_name(project: PostHogProject) -> str:
    return f"{project.resource_key}_catalog_snapshot"


def events_job_name(project: PostHogProject) -> str:
    return f"{project.resource_key}_events"


def persons_job_name(project: PostHogProject) -> str:
    return f"{project.resource_key}_persons_snapshot"


def lookback_schedule(
    name: str, job: dg.UnresolvedAssetJobDefinition, source: EventsSource, cron: str
) -> dg.ScheduleDefinition:
    """A run per day for the last ``lookback_days`` whole days: yesterday's first read, and the
    late events of the days before it."""
    days = source.config.lookback_days
    partitions = source.partitions_def

    @dg.schedule(
        name=name,
        job=job,
        cron_schedule=cron,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Reads the last {days} whole UTC day(s) of events again (late events "
        "land in them); each day replaces its partition.",
    )
    def _schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
        keys = partitions.get_partition_keys(current_time=context.scheduled_execution_time)
        return [
            dg.RunRequest(
                run_key=f"{key}@{context.scheduled_execution_time.isoformat()}",
                partition_key=key,
            )
            for key in keys[-days:]
        ]

    return _schedule


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
    if source.partitions_def is not None:
        specs = {
            n: s.replace_attributes(partitions_def=source.partitions_def) for n, s in specs.items()
        }
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
        if project.persons is not None and project.persons.enabled:
            families[persons_job_name(project)] = (
                [PersonsSource(project, project.persons)],
                project.persons.schedule,
                f"Persons snapshot of project '{project.name}' into DuckDB: persons and their "
                "distinct ids.",
            )
        if project.catalog:
            families[catalog_job_name(project)] = (
                [
                    *catalog_sources(n for n in project.catalog if n != "experiment_results"),
                    *(
                        [ExperimentResultsSource()]
                        if "experiment_results" in project.catalog
                        else []
                    ),
                ],
                CATALOG_SCHEDULE_CRON,
                f"Daily snapshot of project '{project.name}''s "
                f"{', '.join(project.catalog)} into DuckDB.",
            )
        if project.events is not None:
            events = EventsSource(project, project.events)
            asset, event_checks = build_source(project, events, translator)
            assets.append(asset)
            checks += event_checks
            job = dg.define_asset_job(
                events_job_name(project),
                selection=dg.AssetSelection.assets(*asset.keys),
                description=f"Events of project '{project.name}', one UTC day per run.",
            )
            jobs.append(job)
            schedules.append(
                lookback_schedule(
                    f"{events_job_name(project)}_lookback", job, events, project.events.schedule
                )
            )
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

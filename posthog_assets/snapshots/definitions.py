"""Every snapshot asset of every configured project, with its checks and its job.

No HTTP call: ids and options come from the configuration; resources (``posthog*``, ``duckdb``)
come from :func:`posthog_assets.resources.build_resources`; schedules from
:mod:`posthog_assets.schedules`.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from posthog_assets.config import ProjectConfig
from posthog_assets.snapshots.checks import (
    build_group_checks,
    build_insights_checks,
    build_tidy_checks,
)
from posthog_assets.snapshots.factory import build_snapshot_asset
from posthog_assets.snapshots.groups import group_sources
from posthog_assets.snapshots.insights import InsightsSource
from posthog_assets.snapshots.source import SnapshotSource
from posthog_assets.translator import (
    DagsterPostHogTranslator,
    PostHogMetadataSet,
    PostHogSnapshotProps,
)


def insights_job_name(project: ProjectConfig) -> str:
    return f"{project.resource_key}_insights_snapshot"


def groups_job_name(project: ProjectConfig) -> str:
    return f"{project.resource_key}_groups_snapshot"


def build_snapshot_assets(
    project: ProjectConfig,
    sources: list[SnapshotSource],
    translator: DagsterPostHogTranslator,
) -> dict[str, dg.AssetsDefinition]:
    """One asset per source, keyed by the source's name, with the translator's spec (and one
    spec per companion table, materialized by the same asset)."""
    assets = {}
    for source in sources:
        spec = translator.get_asset_spec(PostHogSnapshotProps(project, source.name))  # type: ignore[arg-type]
        companion_specs = {
            c.name: translator.get_asset_spec(PostHogSnapshotProps(project, c.name))  # type: ignore[arg-type]
            for c in source.companions
        }
        resource_key = PostHogMetadataSet.extract(spec.metadata).resource_key
        assets[source.name] = build_snapshot_asset(
            source=source,
            spec=spec,
            resource_key=resource_key or project.resource_key,
            companion_specs=companion_specs,
        )
    return assets


def _key_of(asset: dg.AssetsDefinition, table: str) -> dg.AssetKey:
    """The key of the asset output that writes ``posthog.<table>``."""
    by_table = {
        PostHogMetadataSet.extract(asset.specs_by_key[k].metadata).table or k.path[-1]: k
        for k in asset.keys
    }
    return by_table.get(f"posthog.{table}") or by_table[table]


def build_posthog_snapshot_definitions(
    projects: Sequence[ProjectConfig], *, translator: DagsterPostHogTranslator | None = None
) -> dg.Definitions:
    """Insights and group snapshots per project: assets, checks, and one job each."""
    translator = translator or DagsterPostHogTranslator()
    assets: list[dg.AssetsDefinition] = []
    checks: list[dg.AssetChecksDefinition] = []
    jobs: list[dg.UnresolvedAssetJobDefinition] = []
    for project in projects:
        if project.insights.enabled:
            source = InsightsSource(project)
            asset = build_snapshot_assets(project, [source], translator)["insights"]
            key = _key_of(asset, "insights")
            assets.append(asset)
            checks += build_insights_checks(project, asset_key=key)
            checks += build_tidy_checks(
                project,
                insights_key=key,
                table_keys={c.name: _key_of(asset, c.name) for c in source.companions},
            )
            jobs.append(
                dg.define_asset_job(
                    insights_job_name(project),
                    selection=dg.AssetSelection.assets(*asset.keys),
                    description=f"Daily insights snapshot of project '{project.name}' into DuckDB.",
                )
            )
        groups = build_snapshot_assets(project, group_sources(project), translator)
        if groups:
            assets += groups.values()
            checks += build_group_checks(
                project,
                groups_key=groups["groups"].key if "groups" in groups else None,
                tracked_key=groups["tracked_groups"].key if "tracked_groups" in groups else None,
            )
            jobs.append(
                dg.define_asset_job(
                    groups_job_name(project),
                    selection=dg.AssetSelection.assets(*(a.key for a in groups.values())),
                    description=f"Groups snapshot of project '{project.name}' into DuckDB.",
                )
            )
    return dg.Definitions(assets=assets, asset_checks=checks, jobs=jobs)

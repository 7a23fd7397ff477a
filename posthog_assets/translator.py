"""From configured PostHog objects to Dagster ``AssetSpec``s.

Subclass :class:`DagsterPostHogTranslator` and override :meth:`get_asset_spec` (calling
``super().get_asset_spec(props).replace_attributes(...)``) to change keys, groups or tags. Asset
execution reads the remote ids back from the spec's :class:`PostHogMetadataSet`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import dagster as dg

# Not re-exported by ``dagster`` in 1.13.27 (dagster-fivetran imports it from here too).
from dagster._core.definitions.metadata.metadata_set import NamespacedMetadataSet

from posthog_assets.config import EXPORT_FORMATS, ExportConfig, ProjectConfig

EXPORTS_GROUP = "posthog_exports"
INSIGHTS_GROUP = "posthog_insights"
GROUPS_GROUP = "posthog_groups"

#: The DuckDB tables a project can have (each one asset, ``posthog/<name>``).
SnapshotName = Literal[
    "exports_log",
    "insights",
    "group_types",
    "groups",
    "group_property_definitions",
    "group_property_values",
    "tracked_groups",
    "insight_series",
    "funnel_steps",
    "retention_cells",
    "path_edges",
    "insight_rows",
]
#: Tables written with ``insights`` (flattened from its results), in the insights group.
INSIGHT_TIDY_NAMES = (
    "insight_series",
    "funnel_steps",
    "retention_cells",
    "path_edges",
    "insight_rows",
)

_SNAPSHOT_DESCRIPTIONS: dict[str, str] = {
    "exports_log": "One row per PostHog export (file path, bytes, sha256, expiry), in DuckDB.",
    "insights": "Daily snapshot of every PostHog insight with its result, in DuckDB.",
    "group_types": "PostHog group types (groups_types), in DuckDB.",
    "groups": "Every PostHog group of every type (cursor pages), in DuckDB.",
    "group_property_definitions": "Group property names and counts per group type, in DuckDB.",
    "group_property_values": "Top values of each group property with counts, in DuckDB.",
    "tracked_groups": "Configured groups looked up by key (without side effects), in DuckDB.",
    "insight_series": "Every data point of Trends, Stickiness and Lifecycle insights (and funnel "
    "trends/time to convert), one row each, per daily snapshot, in DuckDB.",
    "funnel_steps": "Every funnel step (per breakdown value) with counts, conversion rates and "
    "times, per daily snapshot, in DuckDB.",
    "retention_cells": "Every cohort x period count of retention insights, per daily snapshot, "
    "in DuckDB.",
    "path_edges": "Every edge of paths insights, per daily snapshot, in DuckDB.",
    "insight_rows": "Every result row of HogQL/DataTable insights as a JSON object keyed by "
    "column name, per daily snapshot, in DuckDB.",
}


class PostHogMetadataSet(NamespacedMetadataSet):
    """PostHog ids an asset stands for, stored on the spec and read back at execution."""

    project_name: str | None = None
    project_id: str | None = None
    resource_key: str | None = None
    export_name: str | None = None
    insight_id: int | None = None
    dashboard_id: int | None = None
    export_format: str | None = None
    table: str | None = None

    @classmethod
    def namespace(cls) -> str:
        return "dagster-posthog"


@dataclass(frozen=True)
class PostHogExportProps:
    """One configured export, as the translator sees it."""

    project: ProjectConfig
    export: ExportConfig


@dataclass(frozen=True)
class PostHogSnapshotProps:
    """One DuckDB snapshot table of a project."""

    project: ProjectConfig
    name: SnapshotName

    @property
    def table(self) -> str:
        return "posthog.exports" if self.name == "exports_log" else f"posthog.{self.name}"


class DagsterPostHogTranslator:
    """Maps PostHog objects to asset specs; override to customise."""

    def get_asset_spec(self, props: PostHogExportProps | PostHogSnapshotProps) -> dg.AssetSpec:
        if isinstance(props, PostHogExportProps):
            return self._export_spec(props)
        return self._snapshot_spec(props)

    def _export_spec(self, props: PostHogExportProps) -> dg.AssetSpec:
        project, export = props.project, props.export
        target = (
            f"insight {export.insight}"
            if export.insight is not None
            else f"dashboard {export.dashboard}"
        )
        ext = EXPORT_FORMATS[export.export_format]
        description = export.description or (
            f"{ext.upper()} export of PostHog {target} (project '{project.name}'), "
            "created through the exports API and streamed to disk."
        )
        metadata: dict[str, Any] = {
            **PostHogMetadataSet(
                project_name=project.name,
                project_id=_str_or_none(project.project_id),
                resource_key=project.resource_key,
                export_name=export.name,
                insight_id=export.insight,
                dashboard_id=export.dashboard,
                export_format=export.export_format,
            )
        }
        return dg.AssetSpec(
            key=dg.AssetKey([*project.key_prefix, "exports", export.name]),
            description=description,
            group_name=EXPORTS_GROUP,
            kinds={"posthog", ext},
            metadata=metadata,
            tags={"posthog/format": ext},
        )

    def _snapshot_spec(self, props: PostHogSnapshotProps) -> dg.AssetSpec:
        project = props.project
        group = {"insights": INSIGHTS_GROUP, "exports_log": EXPORTS_GROUP}.get(
            props.name, INSIGHTS_GROUP if props.name in INSIGHT_TIDY_NAMES else GROUPS_GROUP
        )
        metadata: dict[str, Any] = {
            **PostHogMetadataSet(
                project_name=project.name,
                project_id=_str_or_none(project.project_id),
                resource_key=project.resource_key,
                table=props.table,
            )
        }
        return dg.AssetSpec(
            key=dg.AssetKey([*project.key_prefix, props.name]),
            description=_SNAPSHOT_DESCRIPTIONS[props.name],
            group_name=group,
            kinds={"posthog", "duckdb"},
            metadata=metadata,
        )


def column_schema(columns: Mapping[str, str]) -> dg.TableSchema:
    """A DuckDB table's columns (name -> SQL type) as Dagster shows them (the Columns tab)."""
    return dg.TableSchema(columns=[dg.TableColumn(name=n, type=t) for n, t in columns.items()])


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)

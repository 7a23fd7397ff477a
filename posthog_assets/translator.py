"""From configured PostHog objects to Dagster ``AssetSpec``s.

Subclass :class:`DagsterPostHogTranslator` and override :meth:`get_asset_spec` (calling
``super().get_asset_spec(props).replace_attributes(...)``) to change keys, groups or tags. Asset
execution reads the remote ids back from the spec's :class:`PostHogMetadataSet`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import dagster as dg

# Not re-exported by ``dagster`` in 1.13.27 (dagster-fivetran imports it from here too).
from dagster._core.definitions.metadata.metadata_set import NamespacedMetadataSet

from posthog_assets.config import (
    EXPORT_FORMATS,
    ExportConfig,
    PostHogProject,
)
from posthog_assets.tables import EXPORTS_GROUP, Table


class PostHogMetadataSet(NamespacedMetadataSet):
    """PostHog ids an asset stands for, stored on the spec and read back at execution."""

    project_name: str | None = None
    project_id: str | None = None
    resource_key: str | None = None
    export_name: str | None = None
    insight_id: int | None = None
    dashboard_id: int | None = None
    export_format: str | None = None
    #: The export's ``export_context`` as JSON text (metadata sets hold no dicts).
    export_context: str | None = None
    table: str | None = None

    @classmethod
    def namespace(cls) -> str:
        return "dagster-posthog"


@dataclass(frozen=True)
class PostHogExportProps:
    """One configured export, as the translator sees it."""

    project: PostHogProject
    export: ExportConfig


@dataclass(frozen=True)
class PostHogSnapshotProps:
    """One DuckDB table of a project (its declaration: columns, description, group)."""

    project: PostHogProject
    table: Table

    @property
    def name(self) -> str:
        """The asset's name (``insights``, ``groups``, ``exports_log``, ...)."""
        return self.table.asset_name


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
        ext = EXPORT_FORMATS[export.format]
        description = export.description or (
            f"{ext.upper()} export of PostHog {target} (project '{project.name}'), "
            "created through the exports API and streamed to disk."
        )
        metadata: dict[str, Any] = {
            **PostHogMetadataSet(
                project_name=project.name,
                project_id=project.project_id,
                resource_key=project.resource_key,
                export_name=export.name,
                insight_id=export.insight,
                dashboard_id=export.dashboard,
                export_format=export.format,
                export_context=(
                    json.dumps(export.export_context, sort_keys=True)
                    if export.export_context
                    else None
                ),
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
        project, table = props.project, props.table
        metadata: dict[str, Any] = {
            **PostHogMetadataSet(
                project_name=project.name,
                project_id=project.project_id,
                resource_key=project.resource_key,
                table=table.qualified_name,
            ),
            "dagster/table_name": table.qualified_name,
            "dagster/column_schema": table_schema(table),
        }
        return dg.AssetSpec(
            key=dg.AssetKey([*project.key_prefix, table.asset_name]),
            description=table.description,
            group_name=table.group,
            kinds={"posthog", "duckdb"},
            metadata=metadata,
        )


def table_schema(table: Table) -> dg.TableSchema:
    """A table's columns as Dagster shows them (the Columns tab), each with its description."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name=c.name, type=c.type, description=c.description)
            for c in table.columns
        ]
    )

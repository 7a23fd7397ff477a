"""Everything of a PostHog project as one ``dg.Definitions``: what the component builds, what a
YAML file (``POSTHOG_ASSETS_CONFIG``) builds, and what a Python user calls. Makes no HTTP call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from posthog_assets.common import DUCKDB_RESOURCE_KEY
from posthog_assets.config import (
    DEFAULT_DUCKDB_PATH,
    DEFAULT_PROJECT_NAME,
    EventsConfig,
    ExportConfig,
    GroupsConfig,
    InsightsConfig,
    PersonsConfig,
    PostHogProject,
    catalog_names,
)
from posthog_assets.exports.assets import ExportExecute
from posthog_assets.exports.definitions import build_posthog_export_definitions
from posthog_assets.resources import PostHogResource, duckdb_resource
from posthog_assets.snapshots.definitions import build_posthog_snapshot_definitions
from posthog_assets.translator import DagsterPostHogTranslator

__all__ = ["build_posthog_assets_definitions", "build_project_definitions"]


def build_posthog_assets_definitions(
    resource: PostHogResource,
    *,
    name: str = DEFAULT_PROJECT_NAME,
    exports: Sequence[ExportConfig | Mapping[str, Any]] = (),
    insights: InsightsConfig | Mapping[str, Any] | None = None,
    groups: GroupsConfig | Mapping[str, Any] | None = None,
    events: EventsConfig | Mapping[str, Any] | None = None,
    persons: PersonsConfig | Mapping[str, Any] | None = None,
    catalog: str | Sequence[str] = (),
    duckdb_path: str | Path = DEFAULT_DUCKDB_PATH,
    translator: DagsterPostHogTranslator | None = None,
) -> dg.Definitions:
    """The assets, checks, sensors, jobs and schedules of one PostHog project, with its resource.

    Example:
        .. code-block:: python

            import dagster as dg
            from posthog_assets import PostHogResource, build_posthog_assets_definitions

            defs = build_posthog_assets_definitions(
                PostHogResource(
                    host="https://eu.posthog.com",
                    project_id="12345",
                    personal_api_key=dg.EnvVar("POSTHOG_PERSONAL_API_KEY"),
                ),
                exports=[{"insight": 42, "format": "text/csv", "name": "signups_csv"}],
                insights={"refresh": "async"},
            )

    Args:
        resource: The project's connection (host, project id, key, HTTP and rate-limit settings).
        name: ``default`` keeps the unprefixed names (``posthog/...``); another name gives
            ``posthog/<name>/...`` and resource ``posthog_<name>``, for a second project.
        exports: What to export, by id (no stored state needed).
        insights: The insights snapshot (refresh mode, schedule, ...).
        groups: The group snapshots (property values, tracked groups, schedule).
        events: The daily-partitioned events (``start_date``, event names, promoted
            properties, lookback); off when None.
        persons: The persons snapshot (page size, schedule); off when None.
        catalog: ``all``, or which of annotations, cohorts, feature_flags, actions,
            dashboards, experiments, experiment_results to snapshot daily.
        duckdb_path: The DuckDB file every snapshot and the exports log write.
        translator: Customises every asset spec (keys, groups, tags, owners, ...).
    """
    project = PostHogProject(
        resource=resource,
        name=name,
        exports=tuple(ExportConfig.model_validate(e) for e in exports),
        insights=InsightsConfig.model_validate(insights or {}),
        groups=GroupsConfig.model_validate(groups or {}),
        events=EventsConfig.model_validate(events) if events is not None else None,
        persons=PersonsConfig.model_validate(persons) if persons is not None else None,
        catalog=catalog_names(catalog),
        duckdb_path=str(duckdb_path),
    )
    return build_project_definitions(project, translator=translator)


def build_project_definitions(
    project: PostHogProject,
    *,
    translator: DagsterPostHogTranslator | None = None,
    execute: ExportExecute | None = None,
) -> dg.Definitions:
    """The definitions of a resolved project (the component and the YAML file end here);
    ``execute`` runs each export step (default: every selected export, concurrently)."""
    resources = {
        project.resource_key: project.resource,
        DUCKDB_RESOURCE_KEY: duckdb_resource(project.duckdb_path),
    }
    parts = [dg.Definitions(resources=resources)]
    if project.exports:
        parts.append(
            build_posthog_export_definitions([project], translator=translator, execute=execute)
        )
    if (
        project.insights.enabled
        or project.groups.enabled
        or project.events
        or project.persons
        or project.catalog
    ):
        parts.append(build_posthog_snapshot_definitions([project], translator=translator))
    return dg.Definitions.merge(*parts)

"""Everything of some PostHog projects as one ``dg.Definitions``: what the component builds for
its project, what the code location loads, and what a Python user calls. Makes no HTTP call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from posthog_assets.config import (
    DEFAULT_DUCKDB_PATH,
    DEFAULT_EXPORT_DIR,
    ProjectConfig,
    Settings,
)
from posthog_assets.executor import DEFAULT_EXECUTOR
from posthog_assets.exports.definitions import build_posthog_export_definitions
from posthog_assets.resources import build_resources
from posthog_assets.schedules import build_posthog_schedules
from posthog_assets.snapshots.definitions import build_posthog_snapshot_definitions
from posthog_assets.translator import DagsterPostHogTranslator

ALL_ASSETS_JOB = "posthog_all"
__all__ = ["ALL_ASSETS_JOB", "DEFAULT_EXECUTOR", "MAIN_JOB", "build_posthog_assets_definitions"]

#: The main job: every PostHog asset of the code location.
MAIN_JOB = dg.define_asset_job(
    ALL_ASSETS_JOB,
    selection=dg.AssetSelection.all(),
    description="Materialize every PostHog asset (the main job).",
)


def build_posthog_assets_definitions(
    projects: ProjectConfig | Sequence[ProjectConfig],
    *,
    duckdb_path: str | Path = DEFAULT_DUCKDB_PATH,
    export_dir: str | Path = DEFAULT_EXPORT_DIR,
    translator: DagsterPostHogTranslator | None = None,
    main_job: bool = True,
) -> dg.Definitions:
    """Resources, exports, snapshots, their checks, sensors, jobs and schedules of ``projects``.

    Args:
        projects: One project or several (see :class:`~posthog_assets.config.ProjectConfig`).
        duckdb_path: The DuckDB file every snapshot and the exports log write.
        export_dir: Where export files land (``<export_dir>/<asset name>/``).
        translator: Customises every asset spec (keys, groups, tags, owners, ...).
        main_job: Add ``posthog_all``, every asset of the code location, and the executor.
    """
    projects = [projects] if isinstance(projects, ProjectConfig) else list(projects)
    return dg.Definitions.merge(
        dg.Definitions(
            resources=build_resources(projects, duckdb_path=duckdb_path, export_dir=export_dir),
            schedules=build_posthog_schedules(projects),
            jobs=[MAIN_JOB] if main_job else [],
            executor=DEFAULT_EXECUTOR if main_job else None,
        ),
        build_posthog_export_definitions(projects, translator=translator),
        build_posthog_snapshot_definitions(projects, translator=translator),
    )


def build_definitions_from_settings(
    settings: Settings, *, translator: DagsterPostHogTranslator | None = None
) -> dg.Definitions:
    """The YAML route (``posthog_assets.yaml`` and the env): the same code underneath."""
    return build_posthog_assets_definitions(
        settings.projects,
        duckdb_path=settings.duckdb_path,
        export_dir=settings.export_dir,
        translator=translator,
    )

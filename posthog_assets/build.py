"""Everything of every configured project as one ``dg.Definitions``: what the code location
loads, and what a Python user calls with settings of their own. Makes no HTTP call."""

from __future__ import annotations

from typing import Any

import dagster as dg

from posthog_assets.config import Settings
from posthog_assets.exports.definitions import build_posthog_export_definitions
from posthog_assets.resources import build_resources
from posthog_assets.schedules import build_posthog_schedules
from posthog_assets.snapshots.definitions import build_posthog_snapshot_definitions
from posthog_assets.translator import DagsterPostHogTranslator

ALL_ASSETS_JOB = "posthog_all"

#: Steps a fresh interpreter would spend seconds importing; forked from a server that did once.
PRELOAD_MODULES = ["posthog_assets.definitions"]


def _forkserver_by_default(config: dict[str, Any]) -> dict[str, Any]:
    """Dagster's default executor (each step in its own process, or ``in_process``), with steps
    forked from a server that imported Dagster and these definitions once, unless the run
    config chooses another start method."""
    multiprocess = config.get("multiprocess")
    if isinstance(multiprocess, dict) and not multiprocess.get("start_method"):
        start = {"forkserver": {"preload_modules": PRELOAD_MODULES}}
        return {"multiprocess": {**multiprocess, "start_method": start}}
    return config


DEFAULT_EXECUTOR = dg.multi_or_in_process_executor.configured(
    _forkserver_by_default,
    name="multi_or_in_process_executor",
    config_schema=dg.multi_or_in_process_executor.config_schema.as_field(),
)


def build_posthog_definitions(
    settings: Settings, *, translator: DagsterPostHogTranslator | None = None
) -> dg.Definitions:
    """Resources, exports, snapshots, their checks, sensors, jobs and schedules, and the main
    job (``posthog_all``) of every configured project."""
    return dg.Definitions.merge(
        dg.Definitions(
            resources=build_resources(settings),
            jobs=[
                dg.define_asset_job(
                    ALL_ASSETS_JOB,
                    selection=dg.AssetSelection.all(),
                    description="Materialize every PostHog asset (the main job).",
                )
            ],
            schedules=build_posthog_schedules(settings),
            executor=DEFAULT_EXECUTOR,
        ),
        build_posthog_export_definitions(settings, translator=translator),
        build_posthog_snapshot_definitions(settings, translator=translator),
    )

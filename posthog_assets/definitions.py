"""The code location: every asset, check, sensor, schedule, job and resource, built from config.

Loading reads ``posthog_assets.yaml`` and the env vars only; it makes no HTTP call.
"""

from __future__ import annotations

import dagster as dg

from posthog_assets.config import load_settings
from posthog_assets.exports import build_posthog_export_definitions
from posthog_assets.resources import build_resources
from posthog_assets.snapshots import build_posthog_snapshot_definitions

ALL_ASSETS_JOB = "posthog_all"

settings = load_settings()

defs = dg.Definitions.merge(
    dg.Definitions(
        resources=build_resources(settings),
        jobs=[
            dg.define_asset_job(
                ALL_ASSETS_JOB,
                selection=dg.AssetSelection.all(),
                description="Materialize every PostHog asset (the main job).",
            )
        ],
    ),
    build_posthog_export_definitions(settings),
    build_posthog_snapshot_definitions(settings),
)

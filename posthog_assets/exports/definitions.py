"""Every export asset, its DuckDB log, checks and sensors, for every configured project."""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from posthog_assets.config import PostHogProject
from posthog_assets.exports.assets import ExportExecute, build_posthog_export_assets
from posthog_assets.exports.checks import build_posthog_export_checks
from posthog_assets.exports.log import build_posthog_exports_log_asset
from posthog_assets.exports.sensors import (
    build_posthog_export_expiry_sensor,
    build_posthog_export_retry_sensor,
)
from posthog_assets.translator import DagsterPostHogTranslator


def build_posthog_export_definitions(
    projects: Sequence[PostHogProject],
    *,
    translator: DagsterPostHogTranslator | None = None,
    execute: ExportExecute | None = None,
) -> dg.Definitions:
    """Export assets, the DuckDB log, checks and sensors for every configured project; the
    resources come with the project (:func:`posthog_assets.build.build_project_definitions`).
    No HTTP call happens here."""
    assets: list[dg.AssetsDefinition] = []
    checks: list[dg.AssetChecksDefinition] = []
    sensors: list[dg.SensorDefinition] = []
    for project in projects:
        export_assets = build_posthog_export_assets(
            project=project, translator=translator, execute=execute
        )
        if not export_assets:
            continue
        keys = [k for a in export_assets for k in a.keys]
        log_asset = build_posthog_exports_log_asset(
            project=project, export_keys=keys, translator=translator
        )
        assets += [*export_assets, log_asset]
        checks += build_posthog_export_checks(project=project, export_assets=export_assets)
        sensors += [
            build_posthog_export_expiry_sensor(
                project=project, export_keys=keys, log_key=log_asset.key
            ),
            build_posthog_export_retry_sensor(
                project=project, export_assets=export_assets, log_key=log_asset.key
            ),
        ]
    return dg.Definitions(assets=assets, asset_checks=checks, sensors=sensors)

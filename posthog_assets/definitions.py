"""The code location: every asset, check, sensor, schedule, job and resource.

It loads the component instances of ``posthog_assets/defs/`` (``PostHogProjectComponent``), plus
the main job. With ``POSTHOG_ASSETS_CONFIG`` set it reads that YAML file instead (the same code
underneath: ``build_posthog_assets_definitions``). Loading makes no HTTP call.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from posthog_assets.build import (
    ALL_ASSETS_JOB,
    DEFAULT_EXECUTOR,
    MAIN_JOB,
    build_definitions_from_settings,
)
from posthog_assets.config import ENV_CONFIG, load_settings

__all__ = ["ALL_ASSETS_JOB", "defs"]


def load_definitions() -> dg.Definitions:
    if os.environ.get(ENV_CONFIG):
        return build_definitions_from_settings(load_settings())
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(jobs=[MAIN_JOB], executor=DEFAULT_EXECUTOR),
    )


defs = load_definitions()

"""This repository's code location: its PostHog projects, the main job and the executor.

It loads the component instances of ``posthog_project/defs/`` (``PostHogProjectComponent``). With
``POSTHOG_ASSETS_CONFIG`` set it reads that file instead: ``defs.yaml``'s own format, one document
per project, for a deployment without ``dg``. Loading makes no HTTP call.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from posthog_assets.component.yaml_file import load_definitions_from_yaml
from posthog_assets.config import ENV_CONFIG
from posthog_project.executor import DEFAULT_EXECUTOR

ALL_ASSETS_JOB = "posthog_all"
__all__ = ["ALL_ASSETS_JOB", "MAIN_JOB", "defs"]

#: The main job: every PostHog asset of the code location.
MAIN_JOB = dg.define_asset_job(
    ALL_ASSETS_JOB,
    selection=dg.AssetSelection.all(),
    description="Materialize every PostHog asset (the main job).",
)


def load_definitions() -> dg.Definitions:
    projects = (
        load_definitions_from_yaml()
        if os.environ.get(ENV_CONFIG)
        else dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    )
    return dg.Definitions.merge(
        projects, dg.Definitions(jobs=[MAIN_JOB], executor=DEFAULT_EXECUTOR)
    )


defs = load_definitions()

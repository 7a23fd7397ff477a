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
__all__ = ["ALL_ASSETS_JOB", "defs", "main_job"]


def main_job(projects: dg.Definitions) -> dg.UnresolvedAssetJobDefinition:
    """The main job: every PostHog asset of the code location but the events, whose runs are
    one day each (their own job and lookback schedule)."""
    partitioned = [s.key for s in projects.resolve_all_asset_specs() if s.partitions_def]
    return dg.define_asset_job(
        ALL_ASSETS_JOB,
        selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*partitioned),
        description="Materialize every PostHog asset but the day-partitioned events (the main "
        "job).",
    )


def load_definitions() -> dg.Definitions:
    projects = (
        load_definitions_from_yaml()
        if os.environ.get(ENV_CONFIG)
        else dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    )
    return dg.Definitions.merge(
        projects, dg.Definitions(jobs=[main_job(projects)], executor=DEFAULT_EXECUTOR)
    )


defs = load_definitions()

"""The code location loads from config alone (no HTTP) and holds what the UI should show."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
import pytest

from posthog_assets.standin.server import StandinControl, StandinProcess
from posthog_assets.translator import (
    DagsterPostHogTranslator,
    PostHogExportProps,
    PostHogMetadataSet,
)

pytestmark = pytest.mark.integration


def test_definitions_load_without_any_http_call(
    standin: StandinProcess, control: StandinControl
) -> None:
    env = {
        **os.environ,
        "POSTHOG_HOST": standin.url,
        "POSTHOG_PROJECT_ID": "1",
        "POSTHOG_PERSONAL_API_KEY": standin.key,
    }
    code = (
        "from posthog_assets.definitions import defs\n"
        "specs = list(defs.resolve_all_asset_specs())\n"
        "print(len(specs))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert int(out.stdout.strip()) >= 1
    assert [r for r in control.requests_log() if "/api/" in r["path"]] == []


def test_definitions_hold_the_main_job_and_a_masked_key() -> None:
    from posthog_assets.definitions import ALL_ASSETS_JOB, defs

    assert defs.resolve_job_def(ALL_ASSETS_JOB) is not None
    posthog = defs.resources["posthog"]
    assert isinstance(posthog.personal_api_key, dg.EnvVar) or "EnvVar" in repr(
        posthog.personal_api_key
    )


def test_translator_can_be_overridden() -> None:
    from posthog_assets.definitions import settings

    project = settings.projects[0]
    assert project.exports, "the shipped posthog_assets.yaml lists exports"

    class MyTranslator(DagsterPostHogTranslator):
        def get_asset_spec(self, props):  # type: ignore[no-untyped-def]
            spec = super().get_asset_spec(props)
            return spec.replace_attributes(group_name="marketing")

    props = PostHogExportProps(project=project, export=project.exports[0])
    spec = MyTranslator().get_asset_spec(props)
    assert spec.group_name == "marketing"
    ids = PostHogMetadataSet.extract(spec.metadata)
    assert ids.export_format == project.exports[0].export_format


def test_every_asset_sits_in_a_posthog_group_with_the_posthog_kind() -> None:
    """The UI groups assets by these names; a graph-backed asset once fell into 'default'."""
    from posthog_assets.definitions import defs

    specs = list(defs.resolve_all_asset_specs())
    groups = {s.key.to_user_string(): s.group_name for s in specs}
    assert set(groups.values()) == {"posthog_exports", "posthog_insights", "posthog_groups"}, groups
    assert all("posthog" in s.kinds for s in specs)

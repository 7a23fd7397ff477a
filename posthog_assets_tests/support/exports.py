"""Helpers shared by the export tests (not a test module itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import requests
from dagster_duckdb import DuckDBResource

from posthog_assets.config import ExportConfig, PostHogProject
from posthog_assets.resources import PostHogResource
from posthog_assets_tests.support.resources import with_fields

PNG = "image/png"
CSV = "text/csv"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
#: Small in-run retry policy so step retries take fractions of a second.
FAST_RETRY = dg.RetryPolicy(max_retries=2, delay=0.05)


#: The definitions' resource of a test project: tests pass the stand-in's resource to the run.
UNUSED_RESOURCE = PostHogResource(
    host="http://127.0.0.1:9", project_id="1", personal_api_key="phx_unused_in_tests"
)


def make_project(
    *exports: ExportConfig | dict[str, Any],
    name: str = "default",
    resource: PostHogResource = UNUSED_RESOURCE,
) -> PostHogProject:
    """A project holding the given exports; "default" is the default project (resource key
    ``posthog``)."""
    configs = [e if isinstance(e, ExportConfig) else ExportConfig(**e) for e in exports]
    return PostHogProject(resource=resource, name=name, exports=tuple(configs))


def resources(posthog: PostHogResource, tmp_path: Path, **kw: Any) -> dict[str, Any]:
    res = with_fields(posthog, **kw) if kw else posthog
    return {"posthog": res, "duckdb": DuckDBResource(database=str(tmp_path / "posthog.duckdb"))}


def server_content(standin: Any, export_id: int) -> bytes:
    """What PostHog serves for an export, fetched independently of the package's client."""
    url = f"{standin.url}/api/projects/{standin.project_id}/exports/{export_id}/content/"
    resp = requests.get(url, headers={"Authorization": f"Bearer {standin.key}"}, timeout=30)
    resp.raise_for_status()
    return resp.content


def export_posts(control: Any) -> list[dict[str, Any]]:
    """POST /exports/ requests the stand-in received (any prefix)."""
    return [
        r
        for r in control.requests_log()
        if r["method"] == "POST" and r["path"].rstrip("/").endswith("/exports")
    ]


def materialization_metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict:
    """Raw metadata values of the (last) materialization of ``key`` in a run."""
    events = [
        e for e in result.get_asset_materialization_events() if e.materialization.asset_key == key
    ]
    assert events, f"no materialization of {key.to_user_string()}"
    return {k: v.value for k, v in events[-1].materialization.metadata.items()}


def part_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".part")]

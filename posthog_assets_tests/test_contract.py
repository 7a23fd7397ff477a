"""What the package SENDS matches PostHog's published OpenAPI schema (patched only where the
schema is known to be wrong, see openapi_contract.py).

Not a list of client calls written for the test: the real assets run (exports of every format and
insight kind, the async insights snapshot with its follow-up rounds and query polls, every group
snapshot, the expiry sensor's lookups) against the stand-in, and every request the stand-in
recorded is validated, under both URL prefixes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from posthog_assets.exports.definitions import build_posthog_export_definitions
from posthog_assets.exports.sensors import build_posthog_export_expiry_sensor
from posthog_assets.snapshots.definitions import build_posthog_snapshot_definitions
from posthog_assets_tests.support.config_file import (
    project_document,
    resolve_document,
    write_config_file,
)
from posthog_assets_tests.support.openapi import ContractError, validate_request
from posthog_assets_tests.support.resources import make_resource
from posthog_assets_tests.support.snapshots import resources_for
from posthog_standin.server import StandinControl, StandinProcess

pytestmark = pytest.mark.integration

XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
EVERYTHING = project_document(
    exports=[
        {"insight": 1, "format": "image/png", "name": "insight_png"},
        {"insight": 2, "format": "text/csv", "name": "trends_csv"},
        {"insight": 8, "format": XLSX, "name": "legacy_xlsx"},
        {"insight": 10, "format": "text/csv", "name": "hogql_csv"},
        {"dashboard": 1, "format": "image/png", "name": "board_png"},
    ],
    insights={"refresh": "async", "created_by": [3]},
    groups={
        "property_values": True,
        "tracked": [{"group_type_index": 0, "group_key": "organization-3"}],
    },
)


def _run_everything(
    standin: StandinProcess, control: StandinControl, tmp_path: Path, prefix: str
) -> list[dict[str, Any]]:
    config = write_config_file(tmp_path / "posthog_assets.yaml", EVERYTHING)
    project = resolve_document(EVERYTHING, config)
    exports = build_posthog_export_definitions([project])
    snapshots = build_posthog_snapshot_definitions([project])
    posthog = make_resource(standin, tmp_path / "exports", api_prefix=prefix)
    resources = resources_for(posthog, tmp_path / "posthog.duckdb")
    # one async query that fails, so the follow-up asks GET /query/:id/ about it
    control.configure(async_delay_s=0.2, query_crash_insights=[3])
    control.clear_requests_log()
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [*(exports.assets or []), *(snapshots.assets or [])],
            resources=resources,
            instance=instance,
        )
        assert result.success
        keys = [k for a in exports.assets or [] for k in a.keys if "exports_log" not in k.path]
        sensor = build_posthog_export_expiry_sensor(project=project, export_keys=keys)
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            sensor.evaluate_tick(context)
    return [r for r in control.requests_log() if r["server"] == "api"]


@pytest.mark.parametrize("prefix", ["projects", "environments"])
def test_every_request_the_assets_send_matches_the_openapi_schema(
    prefix: str, standin: StandinProcess, control: StandinControl, tmp_path: Path
) -> None:
    log = _run_everything(standin, control, tmp_path, prefix)
    routes = {r["path"].split("/")[4] for r in log if r["path"].startswith("/api/")}
    assert {"insights", "query", "groups", "groups_types", "exports"} <= routes, routes
    assert any(r["method"] == "POST" for r in log)
    checked = 0
    for r in log:
        assert r["status"] < 400 or "/query/" in r["path"], r
        if "groups_types" not in r["path"]:  # exists under /api/projects/ only, by design
            assert r["path"].startswith(f"/api/{prefix}/"), r["path"]
        validate_request(
            r["method"], r["path"], r["query"], r.get("body"), authorization=r["authorization"]
        )
        checked += 1
    assert checked == len(log) > 20
    sent = {k for r in log if r["path"].rstrip("/").endswith("/insights") for k in r["query"]}
    assert "order" in sent  # stable pages


def test_contract_check_catches_a_bad_request() -> None:
    """The check can fail: an unknown refresh mode and a bad body are rejected."""
    with pytest.raises(ContractError):
        validate_request("GET", "/api/projects/1/insights/", {"refresh": "sometimes"})
    with pytest.raises(ContractError):
        validate_request("POST", "/api/projects/1/exports/", {}, {"insight": 1})

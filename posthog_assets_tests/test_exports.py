"""Export assets end to end: ``dg.materialize`` against the stand-in, files on disk, DuckDB rows."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from posthog_assets.build import build_posthog_assets_definitions
from posthog_assets.common import FAILURES_METADATA_KEY
from posthog_assets.component.yaml_file import load_definitions_from_yaml
from posthog_assets.exports.assets import build_posthog_export_assets
from posthog_assets.exports.checks import build_posthog_export_checks
from posthog_assets.exports.log import build_posthog_exports_log_asset, exports_log_key
from posthog_assets.resources import PostHogResource
from posthog_assets.tables import table_ref
from posthog_assets.translator import DagsterPostHogTranslator, PostHogExportProps
from posthog_assets_tests.support.exports import (
    CSV,
    FAST_RETRY,
    PNG,
    XLSX,
    export_posts,
    make_project,
    materialization_metadata,
    part_files,
    resources,
    server_content,
)

pytestmark = pytest.mark.integration

KEY = dg.AssetKey


def _defs(project, **kw):
    assets = build_posthog_export_assets(project=project, retry_policy=kw.pop("retry", None), **kw)
    keys = [k for a in assets for k in a.keys]
    log = build_posthog_exports_log_asset(project=project, export_keys=keys)
    return assets, log


def _rows(tmp_path) -> list[dict]:
    with duckdb.connect(str(tmp_path / "posthog.duckdb"), read_only=True) as conn:
        cur = conn.execute(f"SELECT * FROM {table_ref(conn, 'exports')} ORDER BY export_id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def test_every_format_end_to_end_with_metadata_and_duckdb_row(
    posthog_resource, control, standin, tmp_path
):
    project = make_project(
        {"name": "weekly_png", "insight": 1, "format": PNG},
        {"name": "signups_csv", "insight": 2, "format": CSV},
        {"name": "signups_xlsx", "insight": 3, "format": XLSX},
        {"name": "board_png", "dashboard": 1, "format": PNG},
    )
    assets, log = _defs(project)

    result = dg.materialize([*assets, log], resources=resources(posthog_resource, tmp_path))

    assert result.success
    rows = {r["asset_name"]: r for r in _rows(tmp_path)}
    for name in ("weekly_png", "signups_csv", "signups_xlsx", "board_png"):
        md = materialization_metadata(result, KEY(["posthog", "exports", name]))
        data = Path(md["path"]).read_bytes()
        assert data == server_content(standin, md["export_id"])
        assert md["sha256"] == hashlib.sha256(data).hexdigest() and md["bytes"] == len(data)
        assert md["path"].startswith(str(tmp_path / "exports" / name))
        assert md["expires_after"].endswith("Z") and md["poll_count"] >= 0
        row = rows[name]
        assert (row["export_id"], row["sha256"], row["path"], row["bytes"]) == (
            md["export_id"],
            md["sha256"],
            md["path"],
            md["bytes"],
        )
        assert row["project_id"] == str(standin.project_id)
        assert row["expires_after"] is not None and row["downloaded_at"] is not None

    png = materialization_metadata(result, KEY(["posthog", "exports", "weekly_png"]))
    assert png["preview"].startswith("![export preview](data:image/png;base64,")
    assert png["posthog_url"].endswith(f"/project/{standin.project_id}/insights/1")
    assert png["image_width"] > 0
    board = materialization_metadata(result, KEY(["posthog", "exports", "board_png"]))
    assert board["posthog_url"].endswith("/dashboard/1") and rows["board_png"]["dashboard"] == 1
    for name in ("signups_csv", "signups_xlsx"):
        md = materialization_metadata(result, KEY(["posthog", "exports", name]))
        # PostHog's layout: series, the breakdown property, one column per day (8 days)
        assert md["dagster/row_count"] > 0 and md["columns"] == 10
        columns = [c.name for c in md["preview"].schema.columns]
        assert columns[:2] == ["series", "$current_url"] and md["preview"].records
    assert part_files(tmp_path) == []
    assert len(export_posts(control)) == 4


@pytest.mark.parametrize("rows", [120_000, 50_000])
def test_large_csv_counts_rows_without_loading_it(posthog_resource, control, tmp_path, rows):
    """A file of exactly PostHog's export row limit (50,000) may have been cut: it says so."""
    control.configure(csv_rows=rows)
    project = make_project({"name": "big_csv", "insight": 2, "format": CSV})
    assets, _ = _defs(project)

    result = dg.materialize(assets, resources=resources(posthog_resource, tmp_path))

    md = materialization_metadata(result, KEY(["posthog", "exports", "big_csv"]))
    assert md["dagster/row_count"] == rows
    assert md["at_posthog_row_limit"] is (rows == 50_000)
    assert len(md["preview"].records) == 10  # the head only


def test_twenty_slow_exports_wait_together_not_in_a_queue(posthog_resource, control, tmp_path):
    control.configure(export_post_held=False, export_delay_s=1.0)
    project = make_project(
        *({"name": f"e{i:02d}", "insight": 1 + i, "format": PNG} for i in range(20))
    )
    assets, _ = _defs(project)

    started = time.monotonic()
    result = dg.materialize(assets, resources=resources(posthog_resource, tmp_path))
    wall = time.monotonic() - started

    assert result.success
    assert len(result.get_asset_materialization_events()) == 20
    assert wall < 6.0, f"20 exports of 1 s took {wall:.1f}s: they are not waiting in parallel"


def test_a_user_error_surfaces_and_is_not_retried(posthog_resource, control, tmp_path):
    """A table of an insight with nothing to render is final: named, not retried, no POST."""
    project = make_project(
        {"name": "empty_csv", "insight": 40, "format": CSV},
        {"name": "weekly_png", "insight": 1, "format": PNG},
    )
    assets, _ = _defs(project, retry=FAST_RETRY)

    result = dg.materialize(
        assets, resources=resources(posthog_resource, tmp_path), raise_on_error=False
    )

    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "empty_csv" in failure.description
    assert "insight 40" in failure.description and "export_context.source" in failure.description
    recorded = failure.metadata[FAILURES_METADATA_KEY].value
    assert [(f["export_name"], f["retryable"]) for f in recorded] == [("empty_csv", False)]
    # The PNG still materialized; the CSV was never posted and not retried.
    assert [e.asset_key.path[-1] for e in result.get_asset_materialization_events()] == [
        "weekly_png"
    ]
    assert len(export_posts(control)) == 1
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert retries == []


def test_csv_and_xlsx_of_every_insight_kind_render(posthog_resource, control, tmp_path):
    """Trends (query source), legacy filters (path) and HogQL tables all give files."""
    project = make_project(
        {"name": "trends_csv", "insight": 2, "format": CSV},
        {"name": "legacy_xlsx", "insight": 8, "format": XLSX},
        {"name": "hogql_csv", "insight": 10, "format": CSV},
    )
    assets, _ = _defs(project)
    checks = build_posthog_export_checks(project=project, export_assets=assets)

    result = dg.materialize([*assets, *checks], resources=resources(posthog_resource, tmp_path))

    assert result.success
    for name in ("trends_csv", "legacy_xlsx", "hogql_csv"):
        md = materialization_metadata(result, KEY(["posthog", "exports", name]))
        assert md["bytes"] > 0 and md["dagster/row_count"] > 0, (name, md)
    assert all(c.passed for c in result.get_asset_check_evaluations())
    assert all(p["status"] == 201 for p in export_posts(control))


def test_step_retry_after_timeout_resumes_the_same_export(posthog_resource, control, tmp_path):
    control.configure(export_post_held=False, export_delay_s=1.2)
    project = make_project({"name": "slow_png", "insight": 1, "format": PNG})
    assets, _ = _defs(project, retry=dg.RetryPolicy(max_retries=3, delay=0.05))

    result = dg.materialize(
        assets, resources=resources(posthog_resource, tmp_path, poll_timeout_s=0.5)
    )

    assert result.success
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert retries, "the first attempt should have timed out"
    md = materialization_metadata(result, KEY(["posthog", "exports", "slow_png"]))
    assert md["resumed"] is True
    assert len(export_posts(control)) == 1


def test_step_retry_does_not_redo_exports_finished_by_an_earlier_attempt(
    posthog_resource, control, tmp_path
):
    # The first attempt: PNG done, CSV hits 503s on its POST (not retried in the client).
    control.add_fault(match=r"/exports/?$", method="POST", kind="status", status=503, times=1)
    control.configure(export_post_held=False, export_delay_by_format={PNG: 0.0, CSV: 0.3})
    project = make_project(
        {"name": "a_csv", "insight": 2, "format": CSV},
        {"name": "b_png", "insight": 1, "format": PNG},
    )
    assets, _ = _defs(project, retry=FAST_RETRY)

    result = dg.materialize(assets, resources=resources(posthog_resource, tmp_path))

    assert result.success
    posts = export_posts(control)
    assert sum(1 for p in posts if p["status"] == 201) == 2  # one export each, none twice


def test_exports_log_upsert_is_idempotent(posthog_resource, control, tmp_path):
    project = make_project({"name": "weekly_png", "insight": 1, "format": PNG})
    assets, log = _defs(project)
    res = resources(posthog_resource, tmp_path)
    with dg.instance_for_test() as instance:
        dg.materialize([*assets, log], resources=res, instance=instance)
        dg.materialize([*assets, log], resources=res, instance=instance)
        again = dg.materialize(
            [*assets, log], resources=res, instance=instance, selection=[log.key]
        )

    assert materialization_metadata(again, log.key)["rows_upserted"] == 0

    rows = _rows(tmp_path)
    assert len(rows) == 2
    assert len({r["export_id"] for r in rows}) == 2


def test_translator_override_changes_keys_and_execution_reads_ids_from_spec(
    posthog_resource, control, standin, tmp_path
):
    class Custom(DagsterPostHogTranslator):
        def get_asset_spec(self, props):
            spec = super().get_asset_spec(props)
            if isinstance(props, PostHogExportProps):
                return spec.replace_attributes(
                    key=KEY(["reports", props.export.name]), group_name="reports"
                )
            return spec

    project = make_project({"name": "weekly_png", "insight": 4, "format": PNG})
    assets = build_posthog_export_assets(project=project, translator=Custom(), retry_policy=None)

    result = dg.materialize(assets, resources=resources(posthog_resource, tmp_path))

    md = materialization_metadata(result, KEY(["reports", "weekly_png"]))
    assert md["insight_id"] == 4
    assert export_posts(control)[0]["body"]["insight"] == 4


def test_definitions_load_without_any_http_call(posthog_env, control, tmp_path):
    config = tmp_path / "posthog.yaml"
    config.write_text(
        "type: posthog_assets.PostHogProjectComponent\n"
        "attributes:\n"
        "  exports:\n"
        "    - {name: weekly_png, insight: 1, format: image/png}\n"
        "    - {name: signups_csv, insight: 2, format: text/csv}\n"
        "  insights: {enabled: false}\n"
        "  groups: {enabled: false}\n"
    )

    defs = load_definitions_from_yaml(config)

    keys = {k.to_user_string() for a in defs.assets for k in a.keys}
    assert keys == {
        "posthog/exports/weekly_png",
        "posthog/exports/signups_csv",
        exports_log_key(make_project()).to_user_string(),
    }
    assert {s.name for s in defs.sensors} == {
        "posthog_export_expiry_sensor",
        "posthog_export_retry_sensor",
    }
    assert all(s.default_status == dg.DefaultSensorStatus.STOPPED for s in defs.sensors)
    assert control.requests_log() == []


@pytest.mark.parametrize("secret", ["phx_test_key_0123456789abcdef"])
def test_secret_never_in_metadata_or_failure(posthog_resource, control, tmp_path, secret):
    project = make_project(
        {"name": "weekly_png", "insight": 1, "format": PNG},
        {"name": "empty_csv", "insight": 40, "format": CSV},
    )
    assets, _ = _defs(project)

    result = dg.materialize(
        assets, resources=resources(posthog_resource, tmp_path), raise_on_error=False
    )

    text = repr([e.event_specific_data for e in result.all_events])
    assert posthog_resource.personal_api_key == secret
    assert secret not in text


def test_two_projects_get_separate_steps_sensors_and_logs(posthog_env, control, tmp_path):
    def project(name: str, project_id: int, insight: int) -> dg.Definitions:
        return build_posthog_assets_definitions(
            PostHogResource(
                host="http://127.0.0.1:1", project_id=str(project_id), personal_api_key="phx_k"
            ),
            name=name,
            exports=[{"name": "weekly_png", "insight": insight, "format": PNG}],
            insights={"enabled": False},
            groups={"enabled": False},
            duckdb_path=tmp_path / "p.duckdb",
        )

    defs = dg.Definitions.merge(project("prod", 1, 1), project("staging", 2, 5))
    dg.Definitions.validate_loadable(defs)

    keys = {k.to_user_string() for a in defs.assets for k in a.keys}
    assert keys == {
        "posthog/prod/exports/weekly_png",
        "posthog/prod/exports_log",
        "posthog/staging/exports/weekly_png",
        "posthog/staging/exports_log",
    }
    assert len(list(defs.sensors)) == 4
    assert control.requests_log() == []

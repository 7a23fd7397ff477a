"""Asset checks on export files: pass on what was downloaded, fail once a file is damaged."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from posthog_assets.exports.assets import build_posthog_export_assets
from posthog_assets.exports.checks import (
    CHECK_FILE_PRESENT,
    CHECK_FORMAT,
    CHECK_SHA256,
    build_posthog_export_checks,
    validate_format,
)
from posthog_assets_tests.support.exports import (
    CSV,
    PNG,
    XLSX,
    make_project,
    materialization_metadata,
    resources,
)

pytestmark = pytest.mark.integration


def _evaluations(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], bool]:
    return {
        (e.asset_key.path[-1], e.check_name): e.passed for e in result.get_asset_check_evaluations()
    }


def test_checks_pass_on_downloads_and_fail_after_truncation(posthog_resource, control, tmp_path):
    project = make_project(
        {"name": "chart", "insight": 1, "format": PNG},
        {"name": "table", "insight": 2, "format": CSV},
        {"name": "sheet", "insight": 3, "format": XLSX},
    )
    assets = build_posthog_export_assets(project=project, retry_policy=None)
    checks = build_posthog_export_checks(project=project, export_assets=assets)
    res = resources(posthog_resource, tmp_path)

    with dg.instance_for_test() as instance:
        first = dg.materialize([*assets, *checks], resources=res, instance=instance)
        good = _evaluations(first)
        assert len(good) == 9 and all(good.values()), good

        for name in ("chart", "table", "sheet"):
            path = Path(
                materialization_metadata(first, dg.AssetKey(["posthog", "exports", name]))["path"]
            )
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])

        second = dg.materialize(
            [*assets, *checks],
            resources=res,
            instance=instance,
            selection=dg.AssetSelection.all_asset_checks(),
            raise_on_error=False,
        )
    bad = _evaluations(second)
    assert len(second.get_asset_materialization_events()) == 0  # checks only, no new export
    for name in ("chart", "table", "sheet"):
        assert bad[(name, CHECK_FILE_PRESENT)] is False
        assert bad[(name, CHECK_SHA256)] is False
    assert bad[("chart", CHECK_FORMAT)] is False  # PNG without its IEND chunk
    assert bad[("sheet", CHECK_FORMAT)] is False  # a zip without its central directory


def test_checks_fail_when_the_file_is_gone(posthog_resource, control, tmp_path):
    project = make_project({"name": "chart", "insight": 1, "format": PNG})
    assets = build_posthog_export_assets(project=project, retry_policy=None)
    checks = build_posthog_export_checks(project=project, export_assets=assets)
    res = resources(posthog_resource, tmp_path)
    with dg.instance_for_test() as instance:
        first = dg.materialize([*assets, *checks], resources=res, instance=instance)
        Path(materialization_metadata(first, assets[0].key)["path"]).unlink()
        second = dg.materialize(
            [*assets, *checks],
            resources=res,
            instance=instance,
            selection=dg.AssetSelection.all_asset_checks(),
        )
    assert set(_evaluations(second).values()) == {False}


@pytest.mark.parametrize(
    ("fmt", "content", "ok"),
    [
        (PNG, b"GIF89a....", False),
        (CSV, b"a,b\n1,2\n", True),
        (CSV, b"", False),
        (XLSX, b"PK\x03\x04 broken", False),
    ],
)
def test_format_validation(tmp_path, fmt, content, ok):
    path = tmp_path / "file"
    path.write_bytes(content)
    assert validate_format(path, fmt)[0] is ok

"""Asset checks on the snapshot tables: they read DuckDB read-only and fail with names and ids."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest

from posthog_assets_tests.support.session import TEST_GROUPS_PER_TYPE
from posthog_assets_tests.support.snapshots import (
    check_results,
    defs_assets,
    defs_checks,
    materialize_groups,
    materialize_insights,
)

pytestmark = pytest.mark.integration


def _tamper(db: Path, sql: str) -> None:
    """Corrupt the table behind the package's back (a writer connection, closed at once)."""
    conn = duckdb.connect(str(db))
    try:
        conn.execute("SET schema = 'posthog'")
        conn.execute(sql)
    finally:
        conn.close()


def _run_checks_only(
    defs: dg.Definitions,
    resources: dict[str, Any],
    asset_name: str,
    *,
    instance: dg.DagsterInstance | None = None,
) -> dict[str, Any]:
    """Execute only the checks of one asset (no fetch, no write)."""
    assets = defs_assets(defs, asset_name)
    checks = defs_checks(defs, [asset_name])
    result = dg.materialize(
        [*assets, *checks],
        selection=dg.AssetSelection.checks_for_assets(*(k for a in assets for k in a.keys)),
        resources=resources,
        raise_on_error=False,
        instance=instance,
    )
    assert not result.get_asset_materialization_events()
    return check_results(result)


def test_checks_before_any_snapshot_fail_with_a_hint(
    defs: dg.Definitions, resources: dict[str, Any]
) -> None:
    results = _run_checks_only(defs, resources, "insights")
    assert not results["insights_not_empty"].passed
    assert "materialize" in results["insights_not_empty"].description


def test_empty_snapshot_fails_not_empty(defs: dg.Definitions, resources: dict[str, Any]) -> None:
    result = materialize_insights(
        defs, resources, refresh="force_cache", short_id="zzzzzzzz", raise_on_error=False
    )
    check = check_results(result)["insights_not_empty"]
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert not check.passed and today in check.description


def test_duplicate_snapshot_id_rows_fail_the_duplicates_check(
    defs: dg.Definitions, resources: dict[str, Any], db: Path
) -> None:
    result = materialize_insights(defs, resources, refresh="force_cache", created_by=[3])
    assert check_results(result)["insights_no_duplicates"].passed
    _tamper(
        db,
        "INSERT INTO insights (project_id, snapshot_date, id) "
        "SELECT project_id, snapshot_date, id FROM insights ORDER BY id LIMIT 1",
    )
    results = _run_checks_only(defs, resources, "insights")
    check = results["insights_no_duplicates"]
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert not check.passed and f"snapshot of {today}" in check.description
    assert " x2" in check.description
    assert results["insights_not_empty"].passed


def test_group_count_check_compares_duckdb_with_what_the_api_returned(
    defs: dg.Definitions, resources: dict[str, Any], db: Path
) -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize_groups(defs, resources, names=["groups"], instance=instance)
        assert check_results(result)["groups_count_per_type_matches_api"].passed
        _tamper(db, "DELETE FROM groups WHERE group_type_index = 2 AND group_key LIKE '%-1%'")
        _tamper(
            db,
            "INSERT INTO groups (project_id, group_type_index, group_key) "
            "SELECT project_id, group_type_index, group_key FROM groups "
            "WHERE group_type_index = 0 LIMIT 1",
        )
        results = _run_checks_only(defs, resources, "groups", instance=instance)
    count_check = results["groups_count_per_type_matches_api"]
    assert not count_check.passed
    assert f"2: {TEST_GROUPS_PER_TYPE} vs " in count_check.description
    assert f"0: {TEST_GROUPS_PER_TYPE} vs {TEST_GROUPS_PER_TYPE + 1}" in count_check.description
    assert not results["groups_no_duplicates"].passed


def test_checks_release_the_file_so_the_next_writer_is_not_blocked(
    defs: dg.Definitions, resources: dict[str, Any], db: Path
) -> None:
    """Checks open DuckDB read-only and close it: a writer can open the file right after."""
    materialize_insights(defs, resources, refresh="force_cache", created_by=[3])
    results = _run_checks_only(defs, resources, "insights")
    assert results["insights_not_empty"].passed
    assert results["insights_no_duplicates"].passed
    conn = duckdb.connect(str(db))  # would raise if a check had kept the file open
    conn.close()


def test_a_write_never_replaces_a_snapshot_with_a_partial_one(tmp_path: Path) -> None:
    """Missing staging files or a row-count mismatch roll back: the old rows stay."""
    from posthog_assets.snapshots.groups import GROUPS_TABLE
    from posthog_assets.snapshots.staging import StagedRows, StagedSnapshot
    from posthog_assets.snapshots.writer import replace_snapshot

    def staged(stem: str, n: int, *, rotate: int = 1 << 20) -> StagedSnapshot:
        columns = GROUPS_TABLE.staged_columns
        with StagedRows(tmp_path / stem, columns, rotate_bytes=rotate) as staging:
            for start in range(0, n, 10):
                staging.write(
                    {"group_type_index": 0, "group_key": f"k{i}", "group_properties": {"i": i}}
                    for i in range(start, min(n, start + 10))
                )
        return StagedSnapshot(
            files=staging.files,
            rows=staging.rows,
            scope={"project_id": "1"},
            snapshot_at="2026-01-05T00:00:00+00:00",
        )

    conn = duckdb.connect(str(tmp_path / "store.duckdb"))
    try:
        many = staged("many", 95, rotate=200)  # several rotated files
        assert len(many.files) > 3
        assert replace_snapshot(conn, GROUPS_TABLE, many) == {"groups": 95}
        partial = staged("partial", 50, rotate=200)
        Path(partial.files[1]).unlink()
        with pytest.raises(FileNotFoundError, match="not changed"):
            replace_snapshot(conn, GROUPS_TABLE, partial)
        wrong = staged("wrong", 20)
        wrong.rows = 21
        with pytest.raises(RuntimeError, match="rolled back"):
            replace_snapshot(conn, GROUPS_TABLE, wrong)
        (count,) = conn.execute("SELECT count(*) FROM store.posthog.groups").fetchall()[0]
        assert count == 95
    finally:
        conn.close()

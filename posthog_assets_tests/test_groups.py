"""Group snapshots against the stand-in: every type, many cursor pages, properties, tracked groups.

The session stand-in has 3 group types x 500 groups (5 cursor pages per type).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from posthog_assets.snapshots.staging import STAGED_MARKER, STAGING_DIRNAME
from posthog_assets_tests.support.resources import make_resource
from posthog_assets_tests.support.session import TEST_GROUP_TYPES, TEST_GROUPS_PER_TYPE
from posthog_assets_tests.support.snapshots import (
    asset_name,
    check_results,
    defs_assets,
    materialization_metadata,
    materialize_groups,
    query,
    resources_for,
    scalar,
    snapshot_defs,
    snapshot_project,
)

pytestmark = pytest.mark.integration

TRACKED = {
    "tracked": [
        {"group_type_index": 0, "group_key": "organization-3"},
        {"group_type_index": 1, "group_key": "company-7"},
    ]
}
TOTAL_GROUPS = TEST_GROUP_TYPES * TEST_GROUPS_PER_TYPE


@pytest.fixture
def defs(posthog_env: dict[str, str], tmp_path: Path) -> dg.Definitions:
    return snapshot_defs(snapshot_project(posthog_env, groups=TRACKED))


def test_every_group_of_every_type_across_many_cursor_pages(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, client: Any, standin: Any
) -> None:
    result = materialize_groups(defs, resources)
    meta = materialization_metadata(result, "groups")

    per_type = dict(query(db, "SELECT group_type_index, count(*) FROM groups GROUP BY 1"))
    assert per_type == {i: TEST_GROUPS_PER_TYPE for i in range(TEST_GROUP_TYPES)}
    assert scalar(db, "SELECT count(DISTINCT (group_type_index, group_key)) FROM groups") == (
        TOTAL_GROUPS
    )
    assert meta["dagster/row_count"] == TOTAL_GROUPS
    assert meta["pages_fetched"] == TEST_GROUP_TYPES * (TEST_GROUPS_PER_TYPE // 100)
    assert meta["api_groups_per_type"] == {str(i): TEST_GROUPS_PER_TYPE for i in per_type}
    assert scalar(db, "SELECT DISTINCT project_id FROM groups") == str(standin.project_id)

    sample = client.lookup_group(1, "company-7")
    props, created = query(
        db,
        "SELECT group_properties, created_at FROM groups "
        "WHERE group_type_index = 1 AND group_key = 'company-7'",
    )[0]
    assert json.loads(props) == sample["group_properties"]
    assert created.isoformat().replace("+00:00", "Z") == sample["created_at"]

    types = query(
        db, "SELECT group_type_index, group_type, name_plural FROM group_types ORDER BY 1"
    )
    api_types = client.list_group_types()
    assert types == [(t["group_type_index"], t["group_type"], t["name_plural"]) for t in api_types]
    assert all(c.passed for c in check_results(result).values())


def test_property_definitions_and_values_match_the_api(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, client: Any
) -> None:
    materialize_groups(
        defs, resources, names=["group_property_definitions", "group_property_values"]
    )
    definitions = client.group_property_definitions()
    expected_defs = sorted(
        (int(t), d["name"], d["count"]) for t, items in definitions.items() for d in items
    )
    assert (
        query(
            db,
            "SELECT group_type_index, name, count FROM group_property_definitions ORDER BY 1, 2, 3",
        )
        == expected_defs
    )
    assert {t for t, _, _ in expected_defs} == set(range(TEST_GROUP_TYPES))

    for type_index, name, _ in expected_defs:
        values = client.group_property_values(type_index, name)
        api = sorted((v["name"], v["count"]) for v in values)
        stored = query(
            db,
            "SELECT value, count FROM group_property_values WHERE group_type_index = ? AND key = ? "
            "ORDER BY 1, 2",
            [type_index, name],
        )
        assert stored == api and stored, (type_index, name)
    plan_total = scalar(
        db,
        "SELECT sum(count) FROM group_property_values WHERE group_type_index = 0 AND key = 'plan'",
    )
    assert plan_total == TEST_GROUPS_PER_TYPE


def test_rerun_replaces_the_previous_snapshot(
    defs: dg.Definitions, resources: dict[str, Any], db: Path
) -> None:
    materialize_groups(defs, resources, names=["groups"])
    materialize_groups(defs, resources, names=["groups"])
    assert scalar(db, "SELECT count(*) FROM groups") == TOTAL_GROUPS
    assert scalar(db, "SELECT count(DISTINCT snapshot_at) FROM groups") == 1


def test_tracked_group_that_disappears_fails_the_check_by_name(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, control: Any
) -> None:
    result = materialize_groups(defs, resources, names=["tracked_groups"])
    assert check_results(result)["tracked_groups_present"].passed
    # read without side effects: never groups/find, which creates a Notebook in the project
    assert not any("/groups/find" in r["path"] for r in control.requests_log())
    assert control.stats()["notebooks_created"] == 0
    assert query(db, "SELECT group_key, found FROM tracked_groups ORDER BY 1") == [
        ("company-7", True),
        ("organization-3", True),
    ]

    control.remove_group(1, "company-7")
    result = materialize_groups(defs, resources, names=["tracked_groups", "groups"])
    check = check_results(result)["tracked_groups_present"]
    assert not check.passed
    assert "1:company-7" in check.description and "organization-3" not in check.description
    assert query(db, "SELECT group_key, found, error FROM tracked_groups ORDER BY 1") == [
        ("company-7", False, "not found: no group of this type has this key"),
        ("organization-3", True, None),
    ]
    assert materialization_metadata(result, "tracked_groups")["missing_keys"] == "1:company-7"
    # the groups snapshot follows the API: one group fewer, and its count check still passes
    assert scalar(db, "SELECT count(*) FROM groups WHERE group_type_index = 1") == (
        TEST_GROUPS_PER_TYPE - 1
    )
    assert check_results(result)["groups_count_per_type_matches_api"].passed


def test_two_projects_share_one_duckdb_file(
    posthog_env: dict[str, str], tmp_path: Path, standin: Any, db: Path
) -> None:
    main_id, staging_id = standin.project_id, standin.project_id + 1
    defs = snapshot_defs(
        snapshot_project(posthog_env, name="prod", project_id=main_id),
        snapshot_project(posthog_env, name="staging", project_id=staging_id),
    )
    resources = {
        f"posthog_{name}": make_resource(standin, tmp_path / "exports", project_id=str(pid))
        for name, pid in (("prod", main_id), ("staging", staging_id))
    }
    resources = resources_for(resources["posthog_prod"], db, **resources)
    keys = {k for a in defs.assets or [] for k in a.keys}
    assert dg.AssetKey(["posthog", "staging", "groups"]) in keys
    groups_assets = [a for a in defs.assets or [] if asset_name(a) == "groups"]
    dg.materialize(groups_assets, resources=resources)
    counts = dict(query(db, "SELECT project_id, count(*) FROM groups GROUP BY 1"))
    assert counts[str(main_id)] == TOTAL_GROUPS
    assert 0 < counts[str(staging_id)] < TOTAL_GROUPS

    staging_only = [a for a in groups_assets if a.key.path[1] == "staging"]
    dg.materialize(staging_only, resources=resources)
    assert dict(query(db, "SELECT project_id, count(*) FROM groups GROUP BY 1")) == counts


@dg.asset
def _finishes() -> None:
    """Stands for any run that ended well."""


@dg.asset
def _fails() -> None:
    raise RuntimeError("stands for a run that failed")


def test_a_fetch_clears_what_finished_runs_left_in_staging(
    defs: dg.Definitions, resources: dict[str, Any], db: Path
) -> None:
    root = db.parent / STAGING_DIRNAME

    def leave(run_id: str, asset: str, *, fetched: bool, age_days: float = 0) -> Path:
        folder = root / run_id / asset
        folder.mkdir(parents=True)
        (folder / "rows-00000.ndjson").write_text('{"id": 1}\n')
        if fetched:
            marker = folder / STAGED_MARKER
            marker.touch()
            then = time.time() - age_days * 86400
            os.utime(marker, (then, then))
        return folder

    with dg.instance_for_test() as instance:
        ok = dg.materialize([_finishes], instance=instance)
        failed = dg.materialize([_fails], instance=instance, raise_on_error=False)
        assert not failed.success
        gone = [
            leave(ok.run_id, "fetched", fetched=True),
            leave(failed.run_id, "killed_mid_fetch", fetched=False),
            leave(failed.run_id, "fetched_last_month", fetched=True, age_days=30),
        ]
        kept = [
            # "Re-execute from failure" can still write this one.
            leave(failed.run_id, "fetched_yesterday", fetched=True, age_days=1),
            # Not a run of this instance: maybe another Dagster home's, running now.
            leave("0f0e0d0c-not-a-run-of-this-instance", "fetching", fetched=False),
        ]
        result = dg.materialize(
            defs_assets(defs, "group_types"), resources=resources, instance=instance
        )

    assert result.success
    assert [f for f in gone if f.exists()] == []
    assert [f for f in kept if not f.exists()] == []
    assert not (root / ok.run_id).exists()
    assert not (root / result.run_id).exists()  # its own staging went after the write
    assert scalar(db, "SELECT count(*) FROM group_types") == TEST_GROUP_TYPES


def test_a_tracked_key_is_looked_up_by_key_not_by_scanning_property_text(
    client: Any, control: Any
) -> None:
    """``search=`` also matches property text, so a short key (numeric ids are common) scans
    every group whose properties contain it; ``group_key=`` (AND-ed) narrows the scan."""
    control.clear_requests_log()
    assert client.lookup_group(1, "1") is None  # "1" is in many names and employee counts
    narrowed = [r for r in control.requests_log() if r["path"].endswith("/groups/")]
    assert narrowed and all(r["query"].get("group_key") == "1" for r in narrowed)

    control.clear_requests_log()
    scanned = sum(1 for _ in client.iter_group_pages(1, search="1"))  # search alone, as before
    assert len(narrowed) < scanned
    found = client.lookup_group(1, "company-7")
    assert found is not None and found["group_key"] == "company-7"

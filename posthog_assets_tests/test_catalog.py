"""The rest of a project as tables, against the stand-in: every live object of each list (read as
PostHog pages it, soft-deleted ones never shown as live), a re-run the same day replacing that day,
experiment results with PostHog's numbers, and a missing scope named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import requests

from posthog_assets.config import catalog_names
from posthog_assets.snapshots.catalog import CATALOG
from posthog_assets_tests.support.resources import make_resource, with_fields
from posthog_assets_tests.support.snapshots import (
    check_results,
    failure_message,
    materialization_metadata,
    materialize_named,
    query,
    resources_for,
    scalar,
    snapshot_defs,
    snapshot_project,
)
from posthog_standin.server import StandinControl, StandinProcess

pytestmark = pytest.mark.integration

LISTS = ("annotations", "cohorts", "feature_flags", "actions", "dashboards", "experiments")


def catalog_defs(env: dict[str, str], catalog: Any) -> dg.Definitions:
    project = snapshot_project(env, insights={"enabled": False}, groups={"enabled": False})
    return snapshot_defs(dataclasses.replace(project, catalog=catalog_names(catalog)))


def posthog_list(standin: StandinProcess, path: str) -> list[dict[str, Any]]:
    """Everything the stand-in lists at ``path``, straight from its API (one large page)."""
    response = requests.get(
        f"{standin.url}/api/projects/{standin.project_id}/{path}",
        params={"limit": 100_000},
        headers={"Authorization": f"Bearer {standin.key}"},
        timeout=30,
    )
    response.raise_for_status()
    return list(response.json()["results"])


def stored_ids(db: Path, table: str) -> list[int]:
    return [int(r[0]) for r in query(db, f"SELECT id FROM {table} ORDER BY id")]


def test_every_live_object_of_each_list_and_nothing_deleted_shown_as_live(
    env: dict[str, str],
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    standin: StandinProcess,
    control: StandinControl,
    db: Path,
) -> None:
    defs = catalog_defs(env, "all")
    first = materialize_named(defs, resources, instance)
    assert first.success, failure_message(first)
    for name in LISTS:
        live = posthog_list(standin, CATALOG[name].path)
        assert live and not [o for o in live if o.get("deleted")], name
        assert stored_ids(db, name) == sorted(int(o["id"]) for o in live), name
        meta = materialization_metadata(first, name)
        if name != "actions":
            assert meta["posthog_count"] == len(live), name
    flags = posthog_list(standin, "feature_flags/")
    variants = sum(len(((f["filters"] or {}).get("multivariate") or {}).get("variants") or [])
                   for f in flags)  # fmt: skip
    assert 0 < variants == scalar(db, "SELECT count(*) FROM feature_flag_variants")
    assert scalar(db, "SELECT count(*) FROM dashboard_tiles") > 0
    assert all(c.passed for c in check_results(first).values())

    # an object deleted in PostHog: gone from today's snapshot, which replaces the day's rows
    victims = {name: stored_ids(db, name)[0] for name in LISTS if name != "dashboards"}
    for name, object_id in victims.items():
        control.delete_object(name, object_id)
    second = materialize_named(defs, resources, instance)
    assert second.success, failure_message(second)
    for name, object_id in victims.items():
        ids = stored_ids(db, name)
        assert object_id not in ids and len(ids) == len(posthog_list(standin, CATALOG[name].path))
        assert scalar(db, f"SELECT count(DISTINCT snapshot_at) FROM {name}") == 1, name


def test_a_finished_experiment_with_two_variants_and_two_metrics_gives_four_rows(
    env: dict[str, str],
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    standin: StandinProcess,
    control: StandinControl,
    db: Path,
) -> None:
    # the newest PostHog lists experiments without their metrics: each is read on its own
    control.configure(experiments_list_metrics=False)
    result = materialize_named(
        catalog_defs(env, ["experiments", "experiment_results"]), resources, instance
    )
    assert result.success, failure_message(result)
    experiments = [
        requests.get(
            f"{standin.url}/api/projects/{standin.project_id}/experiments/{e['id']}/",
            headers={"Authorization": f"Bearer {standin.key}"},
            timeout=30,
        ).json()
        for e in posthog_list(standin, "experiments/")
    ]
    assert scalar(db, "SELECT count(*) FROM experiments WHERE metrics IS NULL") == 0
    finished = [
        e for e in experiments
        if e.get("end_date") and len(e["parameters"]["feature_flag_variants"]) == 2
        and len(e["metrics"]) == 2
    ]  # fmt: skip
    assert finished
    experiment = finished[0]
    rows = query(
        db,
        "SELECT metric_index, variant_key, is_baseline, number_of_samples, sum, chance_to_win, "
        "credible_low, credible_high, p_value, significant FROM experiment_results "
        "WHERE experiment_id = ? ORDER BY metric_index, is_baseline DESC",
        [experiment["id"]],
    )
    assert len(rows) == 4
    for index, metric in enumerate(experiment["metrics"]):
        answer = requests.post(
            f"{standin.url}/api/projects/{standin.project_id}/query/",
            json={
                "query": {
                    "kind": "ExperimentQuery",
                    "experiment_id": experiment["id"],
                    "metric": metric,
                },
                "refresh": "blocking",
            },  # fmt: skip
            headers={"Authorization": f"Bearer {standin.key}"},
            timeout=30,
        ).json()
        base, (variant,) = answer["baseline"], answer["variant_results"]
        expected = [
            (index, base["key"], True, base["number_of_samples"], base["sum"],
             None, None, None, None, None),
            (index, variant["key"], False, variant["number_of_samples"], variant["sum"],
             variant.get("chance_to_win"), *(variant.get("credible_interval") or [None, None]),
             variant.get("p_value"), variant.get("significant")),
        ]  # fmt: skip
        assert [r for r in rows if r[0] == index] == expected
    drafts = [e["id"] for e in experiments if not e.get("start_date")]
    assert drafts and not query(
        db, "SELECT 1 FROM experiment_results WHERE experiment_id = ?", [drafts[0]]
    )
    meta = materialization_metadata(result, "experiment_results")
    started = [e for e in experiments if e.get("start_date")]
    queries = sum(len(e["metrics"]) + len(e.get("metrics_secondary") or []) for e in started)
    assert meta["experiment_queries"] == queries and meta["failed_queries"] == 0


def test_a_key_without_a_scope_gets_a_failure_naming_it(
    env: dict[str, str],
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    standin: StandinProcess,
    control: StandinControl,
) -> None:
    control.add_key("phx_no_cohorts", ["annotation:read"])
    posthog = with_fields(resources["posthog"], personal_api_key="phx_no_cohorts")
    result = materialize_named(
        catalog_defs(env, ["cohorts"]), {**resources, "posthog": posthog}, instance
    )
    assert not result.success
    assert "cohort:read" in failure_message(result)


@pytest.mark.parametrize("bad", ["everything", ["cohorts", "flags"]])
def test_an_unknown_catalog_entry_is_refused_naming_the_known_ones(bad: Sequence[str]) -> None:
    with pytest.raises(ValueError, match="annotations, cohorts, feature_flags"):
        catalog_names(bad)


@pytest.fixture
def env(posthog_env: dict[str, str]) -> dict[str, str]:
    return posthog_env


def test_a_large_project_costs_a_request_or_two_per_list_and_loses_nothing(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    """1,000 feature flags (paged by id), 200 cohorts, and 1,200 annotations: more than a first
    page, with ties on date_marker, so they are asked again as one page of ``count``."""
    with StandinProcess(
        insights=1, groups=1, events=100, persons=10, feature_flags=1000, cohorts=200,
        annotations=1200,
    ) as big:  # fmt: skip
        env = {
            "POSTHOG_HOST": big.url,
            "POSTHOG_PROJECT_ID": str(big.project_id),
            "POSTHOG_PERSONAL_API_KEY": big.key,
            "POSTHOG_ASSETS_DUCKDB": str(tmp_path / "posthog.duckdb"),
            "POSTHOG_ASSETS_EXPORT_DIR": str(tmp_path / "exports"),
        }
        resource = with_fields(
            make_resource(big, tmp_path / "exports"), rate_limit_url=None, shared_rate_limit=False
        )
        defs = catalog_defs(env, ["annotations", "cohorts", "feature_flags"])
        result = materialize_named(
            defs, resources_for(resource, tmp_path / "posthog.duckdb"), instance
        )
        assert result.success, failure_message(result)
        db = tmp_path / "posthog.duckdb"
        for name, live, requests_spent in (
            ("feature_flags", 1000, 1), ("cohorts", 200, 1), ("annotations", 1200, 2)
        ):  # fmt: skip
            meta = materialization_metadata(result, name)
            assert scalar(db, f"SELECT count(DISTINCT id) FROM {name}") == live, name
            assert meta["posthog_count"] == live and meta["list_requests"] == requests_spent

"""The stand-in's catalog routes (annotations, cohorts, feature flags, actions, experiments) and
``ExperimentQuery`` on ``POST /query/``, over real HTTP against the session's stand-in: shapes
checked against PostHog's published schema, soft-deleted rows kept out of lists, each list's
pagination and ordering (unstable ties, raw and allowlisted ``order``), scopes, throttles, the
control plane's delete/add/reset, and experiment results.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import requests

from posthog_assets_tests.support.openapi_catalog import validate_component, validate_response
from posthog_standin.server import StandinControl, StandinProcess

pytestmark = pytest.mark.integration

#: kind -> (list path, scope, live rows the session's stand-in seeds, default page size or None)
KINDS: dict[str, tuple[str, str, int, int | None]] = {
    "annotation": ("annotations", "annotation:read", 30, 1000),
    "cohort": ("cohorts", "cohort:read", 20, 100),
    "feature_flag": ("feature_flags", "feature_flag:read", 40, 100),
    "action": ("actions", "action:read", 15, None),
    "experiment": ("experiments", "experiment:read", 4, 100),
}
FIELDS = {
    "annotation": {"id", "content", "date_marker", "creation_type", "dashboard_item",
                   "dashboard_id", "dashboard_name", "insight_short_id", "insight_name",
                   "insight_derived_name", "created_by", "created_at", "updated_at", "deleted",
                   "scope", "emoji", "hidden_in_user_interface", "tags"},
    "cohort": {"id", "name", "description", "groups", "deleted", "filters", "query",
               "is_calculating", "created_by", "created_at", "last_calculation",
               "errors_calculating", "count", "is_static", "cohort_type", "experiment_set"},
    "feature_flag": {"id", "name", "key", "filters", "deleted", "active", "created_by",
                     "created_at", "updated_at", "version", "last_modified_by", "is_simple_flag",
                     "rollout_percentage", "ensure_experience_continuity", "experiment_set",
                     "surveys", "features", "rollback_conditions", "performed_rollback",
                     "can_edit", "tags", "evaluation_tags", "usage_dashboard",
                     "analytics_dashboards", "has_enriched_analytics", "user_access_level",
                     "is_remote_configuration", "has_encrypted_payloads", "status",
                     "evaluation_runtime"},
    "action": {"id", "name", "description", "tags", "post_to_slack", "slack_message_format",
               "steps", "created_at", "created_by", "deleted", "is_calculating",
               "last_calculated_at", "team_id", "is_action", "bytecode_error", "pinned_at",
               "creation_context", "user_access_level"},
    "experiment": {"id", "name", "description", "start_date", "end_date", "feature_flag_key",
                   "feature_flag", "holdout", "exposure_cohort", "parameters",
                   "secondary_metrics", "saved_metrics", "filters", "archived", "deleted",
                   "created_by", "created_at", "updated_at", "type", "exposure_criteria",
                   "metrics", "metrics_secondary", "stats_config", "conclusion",
                   "conclusion_comment", "primary_metrics_ordered_uuids",
                   "secondary_metrics_ordered_uuids", "user_access_level", "status"},
}  # fmt: skip
#: Response keys beyond the published ExperimentQueryResponse: the cached-response fields and
#: the newer runner's ``hogql``/``clickhouse_sql``/``is_precomputed``.
EXTRA_RESPONSE_KEYS = {"cache_key", "cache_target_age", "calculation_trigger", "is_cached",
                       "last_refresh", "next_allowed_client_refresh", "query_status", "timezone",
                       "hogql", "clickhouse_sql", "is_precomputed"}  # fmt: skip


class Api:
    def __init__(self, standin: StandinProcess, key: str | None = None) -> None:
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key or standin.key}"
        self.url = standin.url
        self.prefix = f"/api/projects/{standin.project_id}/"

    def get(self, path: str, **params: Any) -> requests.Response:
        return self.session.get(f"{self.url}{self.prefix}{path}", params=params, timeout=30)

    def ok(self, path: str, **params: Any) -> Any:
        response = self.get(path, **params)
        assert response.status_code == 200, response.text
        return response.json()

    def query(self, body: dict[str, Any]) -> requests.Response:
        return self.session.post(f"{self.url}{self.prefix}query/", json=body, timeout=60)


@pytest.fixture
def api(standin: StandinProcess, control: StandinControl) -> Api:
    return Api(standin)


@pytest.fixture
def main_catalog(control: StandinControl, standin: StandinProcess) -> dict[str, Any]:
    return control.catalog()[str(standin.project_id)]


def _ids(rows: list[dict[str, Any]]) -> list[int]:
    return [r["id"] for r in rows]


def _error(response: requests.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"type", "code", "detail", "attr"}, body
    return body


# ---- shapes, deleted rows, control plane --------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_shapes_match_the_published_schema(api: Api, kind: str) -> None:
    path = KINDS[kind][0]
    body = api.ok(f"{path}/")
    validate_response(f"{api.prefix}{path}/", 200, body)
    assert body["results"]
    for row in body["results"]:
        assert set(row) == FIELDS[kind], set(row) ^ FIELDS[kind]
        assert row["deleted"] is False
    first = body["results"][0]["id"]
    one = api.ok(f"{path}/{first}/")
    validate_response(f"{api.prefix}{path}/{first}/", 200, one)
    assert one == next(r for r in body["results"] if r["id"] == first)


@pytest.mark.parametrize("kind", list(KINDS))
def test_lists_hold_every_live_row_and_no_deleted_one(
    api: Api, main_catalog: dict[str, Any], kind: str
) -> None:
    path, _, live, _ = KINDS[kind]
    info = main_catalog[kind]
    assert len(info["live_ids"]) == live and info["deleted_ids"], info
    body = api.ok(f"{path}/")
    assert body.get("count", live) == live
    assert sorted(_ids(body["results"])) == sorted(info["live_ids"])
    # Retrieve: annotations and experiments hide deleted rows everywhere; cohorts, flags and
    # actions filter them out of the list only.
    gone = api.get(f"{path}/{info['deleted_ids'][0]}/")
    if kind in ("annotation", "experiment"):
        assert gone.status_code == 404 and _error(gone)["code"] == "not_found"
    else:
        assert gone.status_code == 200 and gone.json()["deleted"] is True
        if kind == "feature_flag":
            assert gone.json()["status"] == "DELETED"


def test_deleted_rows_are_about_one_in_eight(main_catalog: dict[str, Any]) -> None:
    for kind in KINDS:
        info = main_catalog[kind]
        assert len(info["deleted_ids"]) == -(-len(info["live_ids"]) // 7), (kind, info)


def test_control_plane_deletes_adds_and_reset_restores(
    standin: StandinProcess, api: Api, control: StandinControl, main_catalog: dict[str, Any]
) -> None:
    for kind, (path, *_rest) in KINDS.items():
        victim = main_catalog[kind]["live_ids"][0]
        control.delete_object(kind, victim)
        listed = _ids(api.ok(f"{path}/")["results"])
        assert victim not in listed
        added = control.add_object(kind)
        assert added["id"] not in main_catalog[kind]["ids"]
        assert added["id"] in _ids(api.ok(f"{path}/", limit=1000)["results"])
    named = control.add_object("experiment", {"name": "Added later"})
    flags = {f["key"] for f in api.ok("feature_flags/", limit=1000)["results"]}
    assert named["feature_flag_key"] in flags
    with pytest.raises(Exception, match="does not have"):
        control.add_object("cohort", {"no_such_field": 1})
    control.reset()
    assert control.catalog()[str(standin.project_id)] == main_catalog
    # Ids of added objects keep counting up across resets (never mistaken for an earlier one).
    again = control.add_object("cohort")
    assert again["id"] > max(main_catalog["cohort"]["ids"]) + 1


def test_catalog_is_under_projects_only(standin: StandinProcess, api: Api) -> None:
    """PostHog registers these viewsets on the projects router only."""
    for path, *_ in KINDS.values():
        url = f"{standin.url}/api/environments/{standin.project_id}/{path}/"
        assert api.session.get(url, timeout=30).status_code == 404


def test_staging_has_its_own_rows(standin: StandinProcess, api: Api, control: StandinControl):
    catalog = control.catalog()
    staging_id = next(p for p in catalog if p != str(standin.project_id))
    staging = Api(standin)
    staging.prefix = f"/api/projects/{staging_id}/"
    for kind, (path, *_) in KINDS.items():
        rows = staging.ok(f"{path}/")["results"]
        assert sorted(_ids(rows)) == sorted(catalog[staging_id][kind]["live_ids"])
        assert not set(_ids(rows)) & set(catalog[str(standin.project_id)][kind]["ids"])
        main_first = catalog[str(standin.project_id)][kind]["live_ids"][0]
        assert staging.get(f"{path}/{main_first}/").status_code == 404


# ---- scopes and throttles -----------------------------------------------------------------------


def test_each_kind_needs_its_scope(standin: StandinProcess, control: StandinControl) -> None:
    control.add_key("phx_catalog_insights_only", scopes=["insight:read"])
    narrow = Api(standin, "phx_catalog_insights_only")
    for path, scope, *_ in KINDS.values():
        for route in (f"{path}/", f"{path}/1/"):
            denied = narrow.get(route)
            assert denied.status_code == 403
            assert _error(denied)["detail"] == f"API key missing required scope '{scope}'"
    control.add_key("phx_catalog_flags_write", scopes=["feature_flag:write"])
    assert Api(standin, "phx_catalog_flags_write").get("feature_flags/").status_code == 200


def test_catalog_routes_share_the_default_throttles(api: Api, control: StandinControl) -> None:
    control.configure(rate_limit_overrides={"burst": "3/minute"})
    codes = [api.get(path).status_code for path in ("annotations/", "cohorts/", "actions/")]
    assert codes == [200, 200, 200]
    refused = api.get("experiments/")
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    assert api.get("insights/", basic="true").status_code == 200  # ClickHouse throttles


# ---- ordering and pagination --------------------------------------------------------------------


def _tie_orders(rows: list[dict[str, Any]], key: str) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row["id"])
    return groups


def test_annotations_order_by_date_marker_only_with_unstable_ties(api: Api) -> None:
    first = api.ok("annotations/")
    second = api.ok("annotations/", order="id")  # ignored
    assert first["count"] == 30 and first["next"] is None and len(first["results"]) == 30
    for body in (first, second):
        markers = [r["date_marker"] for r in body["results"]]
        assert markers == sorted(markers, reverse=True)
    a, b = (
        _tie_orders(first["results"], "date_marker"),
        _tie_orders(second["results"], "date_marker"),
    )
    assert max(len(ids) for ids in a.values()) >= 4  # many share a date_marker
    assert {k: sorted(v) for k, v in a.items()} == {k: sorted(v) for k, v in b.items()}
    assert a != b  # ties come back in another order


def test_annotations_default_limit_is_1000(api: Api) -> None:
    assert len(api.ok("annotations/", limit="abc")["results"]) == 30
    page = api.ok("annotations/", limit=10, offset=10)
    assert len(page["results"]) == 10
    assert "limit=10" in page["next"] and "offset=20" in page["next"]
    assert "offset" not in page["previous"]


def _walk(api: Api, path: str, limit: int, **params: Any) -> list[int]:
    seen, offset = [], 0
    while True:
        page = api.ok(path, limit=limit, offset=offset, **params)
        seen += _ids(page["results"])
        if page["next"] is None:
            return seen
        offset += limit


def test_walking_pages_over_ties_can_skip_and_repeat(api: Api, control: StandinControl) -> None:
    walks = [_walk(api, "annotations/", 4) for _ in range(3)]
    assert any(len(set(w)) < 30 or len(w) != len(set(w)) for w in walks), walks
    control.configure(stable_default_order=True)
    stable = _walk(api, "annotations/", 4)
    assert len(stable) == len(set(stable)) == 30
    assert stable == _walk(api, "annotations/", 7)


def test_cohorts_order_by_created_at_with_unstable_ties(api: Api) -> None:
    first, second = api.ok("cohorts/"), api.ok("cohorts/", order="name")
    for body in (first, second):
        stamps = [r["created_at"] for r in body["results"]]
        assert stamps == sorted(stamps, reverse=True)
    a, b = _tie_orders(first["results"], "created_at"), _tie_orders(second["results"], "created_at")
    assert max(len(ids) for ids in a.values()) >= 3
    tied = [k for k, ids in a.items() if len(ids) > 1]
    assert any(a[k] != b[k] for k in tied)
    assert {r["cohort_type"] for r in first["results"]} >= {
        "static",
        "person_property",
        "behavioral",
    }
    assert any(r["count"] is None for r in first["results"])


def test_feature_flag_order_is_django_order_by(api: Api) -> None:
    default = api.ok("feature_flags/")["results"]
    stamps = [r["created_at"] for r in default]
    assert stamps == sorted(stamps, reverse=True)
    by_id = [_ids(api.ok("feature_flags/", order="id")["results"]) for _ in range(2)]
    assert by_id[0] == by_id[1] == sorted(by_id[0])
    assert _ids(api.ok("feature_flags/", order="-id")["results"]) == by_id[0][::-1]
    keys = [r["key"] for r in api.ok("feature_flags/", order="key")["results"]]
    assert keys == sorted(keys)
    updated = [r["updated_at"] for r in api.ok("feature_flags/", order="-updated_at")["results"]]
    assert updated == sorted(updated, reverse=True)
    assert _walk(api, "feature_flags/", 7, order="id") == by_id[0]
    for bad in ("nope", "-nope", "is_simple_flag", "name,key"):
        refused = api.get("feature_flags/", order=bad)
        assert refused.status_code == 500 and _error(refused)["type"] == "server_error"


def test_feature_flag_fields(api: Api, main_catalog: dict[str, Any]) -> None:
    flags = api.ok("feature_flags/")["results"]
    for flag in flags:
        assert (flag["rollout_percentage"] is not None) == flag["is_simple_flag"]
        variants = (flag["filters"].get("multivariate") or {}).get("variants") or []
        if variants:
            assert 2 <= len(variants) <= 4
            assert sum(v["rollout_percentage"] for v in variants) == 100
    multivariate = sum(1 for f in flags if f["filters"].get("multivariate"))
    assert len(flags) // 4 <= multivariate <= len(flags) // 2
    assert any(f["is_simple_flag"] for f in flags) and not all(f["is_simple_flag"] for f in flags)
    by_key = {f["key"]: f for f in flags}
    for experiment in main_catalog["experiment"]["experiments"]:
        if experiment["deleted"]:
            continue
        flag = by_key[experiment["feature_flag_key"]]
        assert experiment["id"] in flag["experiment_set"]


def test_actions_are_not_paginated(api: Api) -> None:
    body = api.ok("actions/", limit=2, offset=3)
    assert set(body) == {"results"} and len(body["results"]) == 15
    order = [(r["last_calculated_at"], r["name"]) for r in body["results"]]
    by_name = sorted(order, key=lambda t: t[1])
    assert order == sorted(by_name, key=lambda t: t[0], reverse=True)
    assert len({t[0] for t in order}) < len(order)  # names break ties of last_calculated_at
    steps = body["results"][0]["steps"]
    assert steps and set(steps[0]) >= {"event", "selector", "selector_regex", "url_matching"}


def test_experiments_seed_and_order(api: Api) -> None:
    body = api.ok("experiments/")
    rows = body["results"]
    assert body["count"] == 4
    assert Counter(r["status"] for r in rows) == {"running": 2, "draft": 1, "stopped": 1}
    stamps = [r["created_at"] for r in rows]
    assert stamps == sorted(stamps, reverse=True)
    done = next(r for r in rows if r["status"] == "stopped")
    assert done["end_date"] and len(done["metrics"]) == 2
    assert [v["key"] for v in done["parameters"]["feature_flag_variants"]] == ["control", "test"]
    assert {r["stats_config"]["method"] for r in rows} == {"bayesian", "frequentist"}
    for row in rows:
        assert row["feature_flag"]["key"] == row["feature_flag_key"]
        assert (row["start_date"] is None) == (row["status"] == "draft")
        assert (row["end_date"] is None) == (row["status"] != "stopped")
        for metric in row["metrics"]:
            validate_component("ExperimentQuery", {"kind": "ExperimentQuery", "metric": metric})
    flags = {f["key"] for f in api.ok("feature_flags/")["results"]}
    assert {r["feature_flag_key"] for r in rows if r["status"] != "draft"} <= flags
    names = [r["name"] for r in api.ok("experiments/", order="name")["results"]]
    assert names == sorted(names)
    for order in ("created_at", "-updated_at", "start_date", "-end_date", "duration", "-status"):
        assert len(api.ok("experiments/", order=order)["results"]) == 4
    assert [r["status"] for r in api.ok("experiments/", order="status")["results"]][0] == "draft"
    assert _ids(api.ok("experiments/", status="complete")["results"]) == [done["id"]]
    refused = api.get("experiments/", order="feature_flag_key")
    assert refused.status_code == 400
    assert _error(refused) == {"type": "validation_error", "code": "invalid_input",
                               "detail": "Invalid order field: 'feature_flag_key'",
                               "attr": None}  # fmt: skip


def test_experiments_list_without_metrics_like_the_newest_posthog(
    api: Api, control: StandinControl
) -> None:
    """Not checked against the November 2025 schema, which still lists the full serializer
    (``saved_metrics`` required)."""
    control.configure(experiments_list_metrics=False)
    body = api.ok("experiments/")
    dropped = {"metrics", "metrics_secondary", "saved_metrics", "secondary_metrics"}
    for row in body["results"]:
        assert set(row) == FIELDS["experiment"] - dropped
        assert api.ok(f"experiments/{row['id']}/")["metrics"]


# ---- ExperimentQuery ----------------------------------------------------------------------------


def _experiment_query(experiment: dict[str, Any], metric: dict[str, Any], **extra: Any):
    query = {"kind": "ExperimentQuery", "experiment_id": experiment["id"], "metric": metric}
    return {"query": query, **extra}


def _check_answer(answer: dict[str, Any], method: str) -> None:
    validate_component("ExperimentStatsBaseValidated", answer["baseline"])
    name = "ExperimentVariantResultBayesian" if method == "bayesian" else (
        "ExperimentVariantResultFrequentist")  # fmt: skip
    for variant in answer["variant_results"]:
        validate_component(name, variant)
        assert variant["method"] == method
    published = {k: v for k, v in answer.items() if k not in EXTRA_RESPONSE_KEYS}
    validate_component("ExperimentQueryResponse", published)
    assert set(answer) >= EXTRA_RESPONSE_KEYS


def test_experiment_query_answers_every_metric(api: Api) -> None:
    for experiment in api.ok("experiments/")["results"]:
        method = experiment["stats_config"]["method"]
        variants = [v["key"] for v in experiment["parameters"]["feature_flag_variants"]]
        for metric in experiment["metrics"]:
            body = _experiment_query(experiment, metric, refresh="force_blocking")
            response = api.query(body)
            assert response.status_code == 200, response.text
            answer = response.json()
            _check_answer(answer, method)
            assert answer["kind"] == "ExperimentQuery" and answer["metric"] == metric
            assert answer["baseline"]["key"] == "control"
            assert [v["key"] for v in answer["variant_results"]] == variants[1:]
            assert answer["hogql"] is None and answer["is_precomputed"] is False
            if experiment["status"] == "draft":
                for arm in [answer["baseline"], *answer["variant_results"]]:
                    assert arm["number_of_samples"] == 0
                    assert arm["validation_failures"] == ["not-enough-exposures"]
                for variant in answer["variant_results"]:
                    assert variant["significant"] is None
                continue
            assert answer["baseline"]["number_of_samples"] > 0
            for variant in answer["variant_results"]:
                lo, hi = variant.get("credible_interval") or variant["confidence_interval"]
                assert lo < hi and isinstance(variant["significant"], bool)
                if method == "bayesian":
                    assert 0 <= variant["chance_to_win"] <= 1 and "p_value" not in variant
                else:
                    assert 0 <= variant["p_value"] <= 1 and "chance_to_win" not in variant
            again = api.query(body).json()
            assert again["variant_results"] == answer["variant_results"]  # deterministic


def test_experiment_query_cache_and_errors(api: Api) -> None:
    experiment = api.ok("experiments/", order="name")["results"][0]
    metric = experiment["metrics"][0]
    first = api.query(_experiment_query(experiment, metric, refresh="blocking")).json()
    cached = api.query(_experiment_query(experiment, metric, refresh="blocking")).json()
    assert first["is_cached"] is False and cached["is_cached"] is True
    assert cached["last_refresh"] == first["last_refresh"]
    unknown = api.query({"query": {"kind": "ExperimentQuery", "experiment_id": 99999,
                                   "metric": metric}})  # fmt: skip
    assert unknown.status_code == 400 and _error(unknown)["type"] == "validation_error"
    assert "99999" in _error(unknown)["detail"]
    bad_metric = api.query(_experiment_query(experiment, {"kind": "ExperimentMetric"}))
    assert bad_metric.status_code == 400


def test_experiment_query_async_job(api: Api) -> None:
    experiment = next(r for r in api.ok("experiments/")["results"] if r["status"] == "running")
    body = _experiment_query(experiment, experiment["metrics"][-1], refresh="force_async")
    started = api.query(body)
    assert started.status_code == 202, started.text
    status = started.json()["query_status"]
    assert status["complete"] is False
    deadline = time.monotonic() + 10
    while True:
        polled = api.get(f"query/{status['id']}/")
        if polled.status_code != 202 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert polled.status_code == 200, polled.text
    _check_answer(polled.json()["query_status"]["results"], experiment["stats_config"]["method"])

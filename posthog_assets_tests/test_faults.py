"""The fault matrix: one real ``dg.materialize`` per fault over real HTTP to the stand-in.

Why: a scheduled pipeline meets every one of these sooner or later. For each fault the test asserts
the outcome a person would want: either the run recovers and the data is exactly what a fault-free
run produces (same DuckDB rows, no duplicates, no partial snapshot; one file per export, no
``.part``; no export created twice), or it fails fast, without retrying, with a message that says
what to do. The fault-free reference is one run of the whole world per session (``reference``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import requests

from posthog_assets_tests.support.reliability import (
    EXPORTS,
    FAST_STEP_RETRY,
    WORLD_EXPORTS,
    Reference,
    World,
    api_requests,
    assert_export_folder,
    build_world,
    duplicates,
    export_post_entries,
    exports_created,
    failure_texts,
    fast_resource,
    materialized,
    select,
    sha256_of,
    shared_reference,
    step_retries,
    table_rows,
    wait_violations,
)
from posthog_standin.server import StandinControl, StandinProcess

pytestmark = pytest.mark.integration

POST_EXPORTS = r"/exports/?$"
EXPORT_GET = r"/exports/\d+/?$"
CONTENT = r"/exports/\d+/content"
INSIGHTS_PAGE = r"/insights/?$"
GROUPS_PAGE = r"/groups/?$"
PROPERTY_VALUES = r"/groups/property_values"
LIMITED_KEY = "phx_fault_matrix_limited_key_0001"
WRONG_KEY = "phx_fault_matrix_wrong_key_0001"
EXPORT_EXCEPTION = "ValueError: the insight's query is invalid (unknown property 'plan')"
QUERY_ERROR = "Query failed: column 'plan' does not exist"


@pytest.fixture(scope="module")
def reference(standin: StandinProcess, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return shared_reference(standin, tmp_path_factory)


Setup = Callable[[StandinControl, Reference], None]


@dataclass(frozen=True)
class Case:
    """One fault, where it strikes, and the outcome the package must show."""

    id: str
    families: tuple[str, ...]
    setup: Setup
    recovers: bool = True
    messages: tuple[str, ...] = ()  # each must appear in a failed step's message
    created: int | None = None  # exports PostHog creates (None: one per export asset)
    resource: Mapping[str, Any] = field(default_factory=dict)
    run_config: Mapping[str, Any] = field(default_factory=dict)
    step_retry: dg.RetryPolicy | None = FAST_STEP_RETRY
    expect_step_retry: bool = False
    failed: tuple[str, ...] = ()  # families that must have written nothing
    query_errors: Mapping[int, str] = field(default_factory=dict)  # insight index -> error


def fault(**rule: Any) -> Setup:
    """Inject one stand-in fault rule (see ``StandinControl.add_fault``)."""

    def setup(control: StandinControl, _ref: Reference) -> None:
        control.add_fault(**rule)

    return setup


def configure(**config: Any) -> Setup:
    """Change the stand-in's behaviour (see ``StandinControl.configure``)."""

    def setup(control: StandinControl, _ref: Reference) -> None:
        control.configure(**config)

    return setup


def nothing(_control: StandinControl, _ref: Reference) -> None:
    """No fault on the server: the mistake is in the resource (key, project id)."""


def limited_key(control: StandinControl, _ref: Reference) -> None:
    """A key that may read insights and exports but not create exports or read groups."""
    control.add_key(LIMITED_KEY, scopes=["insight:read", "export:read", "query:read"])


def query_fails(control: StandinControl, ref: Reference) -> None:
    """Warm cache except for one insight, whose background query then fails."""
    control.set_insight_cache(None, "fresh")
    control.set_insight_cache(ref.insight_ids[3], "cold")
    control.configure(async_delay_s=0.2, query_fail_insights={str(ref.insight_ids[3]): QUERY_ERROR})


def concurrency_limited(control: StandinControl, ref: Reference) -> None:
    control.configure(concurrency_limit_insights=[ref.insight_ids[7]])


FAIL_FAST = (EXPORTS, "insights", "groups")
CASES = [
    Case("429_retry_after_on_create", (EXPORTS,),
         fault(match=POST_EXPORTS, method="POST", kind="status", status=429, retry_after=1,
               times=1)),
    Case("500_on_download", (EXPORTS,),
         fault(match=CONTENT, kind="status", status=500, times=2)),
    Case("502_on_insights_page", ("insights",),
         fault(match=INSIGHTS_PAGE, kind="status", status=502, times=2)),
    Case("503_on_groups_page", ("groups",),
         fault(match=GROUPS_PAGE, kind="status", status=503, times=2)),
    Case("504_on_property_values", ("group_property_values",),
         fault(match=PROPERTY_VALUES, kind="status", status=504, times=2)),
    Case("drop_before_answer_on_groups_page", ("groups",),
         fault(match=GROUPS_PAGE, kind="drop", times=2)),
    Case("drop_before_answer_on_create", (EXPORTS,),
         fault(match=POST_EXPORTS, method="POST", kind="drop", times=1), expect_step_retry=True),
    Case("drop_mid_body_on_download", (EXPORTS,),
         fault(match=CONTENT, kind="drop_mid_body", times=2)),
    Case("drop_mid_body_on_create_answer", (EXPORTS,),
         fault(match=POST_EXPORTS, method="POST", kind="drop_mid_body", times=1)),
    Case("drop_mid_body_on_insights_page", ("insights",),
         fault(match=INSIGHTS_PAGE, kind="drop_mid_body", times=2)),
    Case("read_timeout_on_insights_page", ("insights",),
         fault(match=INSIGHTS_PAGE, kind="slow", delay_s=1.5, times=1),
         resource={"read_timeout_s": 0.5}),
    Case("slow_server_within_timeout", (EXPORTS,),
         fault(match=r"/exports", kind="slow", delay_s=0.3), resource={"read_timeout_s": 5}),
    Case("export_exception", (EXPORTS,),
         configure(export_fail_next={"count": 2, "exception": EXPORT_EXCEPTION}),
         recovers=False, failed=(EXPORTS,),
         messages=(EXPORT_EXCEPTION, "not retryable", "This is final for this export")),
    Case("export_stuck_past_threshold", (EXPORTS,),
         configure(export_post_held=False, export_delay_s=60, stuck_threshold_s=0.3),
         recovers=False, failed=(EXPORTS,), step_retry=None,
         messages=("Export failed without throwing an exception", "retryable",
                   "a new attempt may succeed")),
    Case("expired_export_content_404", (EXPORTS,),
         fault(match=CONTENT, kind="status", status=404, times=1), created=3),
    Case("async_insight_query_errors", ("insights",), query_fails,
         run_config={"ops": {"posthog__insights": {"config": {"refresh": "async"}}}},
         query_errors={3: QUERY_ERROR}),
    Case("concurrency_limit_exceeded_with_http_200", ("insights",), concurrency_limited,
         query_errors={7: "concurrency_limit_exceeded"}),
    Case("401_bad_key", FAIL_FAST, nothing, recovers=False, created=0,
         resource={"personal_api_key": WRONG_KEY}, failed=FAIL_FAST,
         messages=("PostHog answered 401", "Check that the personal API key is set and valid")),
    Case("403_missing_scope", FAIL_FAST, limited_key, recovers=False, created=0,
         resource={"personal_api_key": LIMITED_KEY}, failed=(EXPORTS, "groups"),
         messages=("PostHog answered 403", "The key lacks scope export:write",
                   "The key lacks scope group:read")),
    Case("404_project", FAIL_FAST, nothing, recovers=False, created=0,
         resource={"project_id": "999"}, failed=FAIL_FAST,
         messages=("PostHog answered 404", "Project not found.", "Check the project id")),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(
    case: Case,
    reference: Reference,
    standin: StandinProcess,
    control: StandinControl,
    tmp_path: Path,
) -> None:
    world = build_world(tmp_path, step_retry=case.step_retry)
    case.setup(control, reference)
    resource = fast_resource(standin, world.export_dir, **case.resource)

    result = world.materialize(case.families, resource, run_config=case.run_config, checks=False)

    log = control.requests_log()
    rules = control.faults()
    control.clear_faults()
    # Every planned fault really struck (a rule that never matches would prove nothing).
    assert all(r["fired"] >= 1 and not r["times"] for r in rules), rules
    texts = failure_texts(result)
    assert result.success == case.recovers, texts
    for message in case.messages:
        assert any(message in t for t in texts), (message, texts)
    assert all(standin.key not in t and LIMITED_KEY not in t and WRONG_KEY not in t for t in texts)
    if case.recovers:
        assert (step_retries(result) > 0) == case.expect_step_retry
    else:
        # Failing fast: no step retry, and no refused request sent twice (no client retry).
        assert step_retries(result) == 0
        refused = [
            (r["method"], r["path"], json.dumps(r["query"]), json.dumps(r.get("body")))
            for r in api_requests(log)
            if r["status"] is not None and 400 <= r["status"] < 500
        ]
        assert not duplicates(refused), refused

    _assert_data(case, world, reference)
    _assert_exports(case, world, reference, result, log, standin)


def _assert_data(case: Case, world: World, ref: Reference) -> None:
    """Every family's table holds exactly the fault-free rows, or nothing if it failed."""
    for family in case.families:
        if family == EXPORTS:
            continue  # checked file by file in _assert_exports
        if family in case.failed:
            assert table_rows(world.db, family) == [], f"{family} wrote rows after failing"
            continue
        if not case.query_errors:
            assert table_rows(world.db, family) == ref.rows[family], family
            continue
        # The insights whose query failed are recorded with the error, not dropped or nulled.
        ignore = {"result", "query_error", "refresh", "query_status_id"}
        expected = table_rows(ref.db, family, ignore=ignore)
        assert table_rows(world.db, family, ignore=ignore) == expected
        errors = dict(
            select(world.db, "SELECT id, query_error FROM insights WHERE query_error IS NOT NULL")
        )
        wanted = {ref.insight_ids[i]: text for i, text in case.query_errors.items()}
        assert errors == wanted
        nulls = select(world.db, "SELECT id FROM insights WHERE result IS NULL")
        assert sorted(i for (i,) in nulls) == sorted(wanted)


def _assert_exports(
    case: Case,
    world: World,
    ref: Reference,
    result: dg.ExecuteInProcessResult,
    log: list[dict[str, Any]],
    standin: StandinProcess,
) -> None:
    """One export per asset created (or the stated number), each file equal to PostHog's."""
    if EXPORTS not in case.families:
        assert export_post_entries(log) == []
        return
    expected_created = len(WORLD_EXPORTS) if case.created is None else case.created
    assert exports_created(log) == expected_created, export_post_entries(log)
    if EXPORTS in case.failed:
        assert_export_folder(world.export_dir, world.db, [])
        return
    assert_export_folder(world.export_dir, world.db, WORLD_EXPORTS)
    metadata = materialized(result)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {standin.key}"
    for name in WORLD_EXPORTS:
        md = metadata[name]
        url = f"{standin.url}/api/projects/{standin.project_id}/exports/{md['export_id']}/content/"
        server = session.get(url, timeout=30)
        assert server.status_code == 200
        assert Path(md["path"]).read_bytes() == server.content, f"{name} differs from PostHog"
        assert sha256_of(Path(md["path"])) == md["sha256"]
    assert metadata["insight_2_csv"]["sha256"] == ref.csv_sha256  # CSV: same bytes as fault-free
    if case.id == "429_retry_after_on_create":
        assert any(r["status"] == 429 for r in log)
        assert wait_violations(log, retry_after_s=1.0) == []
    if case.id == "expired_export_content_404":
        assert sorted(md.get("recreated") for md in metadata.values() if "sha256" in md) == [
            False,
            True,
        ]

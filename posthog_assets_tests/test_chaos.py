"""Chaos: the whole world materialized while 20% of API requests fail at random (seeded).

Why: single faults (test_faults.py) prove each recovery path; chaos proves they compose, when a
retry is itself faulted, a download breaks after a throttled create, and so on. The final data
must equal the session's fault-free run (``shared_reference``): the same DuckDB rows (content,
not snapshot times), the CSV export byte for byte, every file equal to PostHog's content, and no
export created twice.
``bench/chaos.py`` is the longer variant with more exports, rounds and printed figures.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import requests

from posthog_assets_tests.support.reliability import (
    ALL_FAMILIES,
    WORLD_EXPORTS,
    Reference,
    assert_export_folder,
    build_world,
    chaos_report,
    chaos_rules,
    compare_worlds,
    failure_texts,
    fast_resource,
    materialized,
    reset,
    shared_reference,
)
from posthog_assets_tests.support.snapshots import errors
from posthog_standin.server import StandinControl, StandinProcess

pytestmark = pytest.mark.system

FAULT_RATE = 0.2
SEED = 20260105
#: Enough attempts that a request faulted several times in a row still gets through.
CHAOS_CLIENT = {"max_attempts": 8, "backoff_initial_s": 0.02, "backoff_max_s": 0.2}
CHAOS_STEP_RETRY = dg.RetryPolicy(max_retries=4, delay=0.05)


@pytest.fixture(scope="module")
def reference(standin: StandinProcess, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return shared_reference(standin, tmp_path_factory)


def test_chaos_run_ends_with_the_same_data_as_a_fault_free_run(
    reference: Reference, standin: StandinProcess, control: StandinControl, tmp_path: Path
) -> None:
    reset(control)
    for rule in chaos_rules(FAULT_RATE, SEED):
        control.add_fault(**rule)
    chaos = build_world(tmp_path / "chaos", step_retry=CHAOS_STEP_RETRY)
    result = chaos.materialize(
        ALL_FAMILIES, fast_resource(standin, chaos.export_dir, **CHAOS_CLIENT)
    )
    log = control.requests_log()
    control.clear_faults()
    report = chaos_report(log)
    print(f"chaos: {report.faulted} of {report.requests} API requests faulted: {report.by_kind}")

    assert result.success, failure_texts(result)
    # The faults really happened, at about the rate asked for, and of every kind.
    assert report.faulted >= 8, report
    assert 0.1 <= report.faulted / report.requests <= 0.35, report
    assert len(report.by_kind) >= 4, report
    # Same rows as the fault-free run: nothing lost, nothing extra, nothing duplicated.
    diff = compare_worlds(reference.world, chaos, ALL_FAMILIES)
    assert all(d["rows"] > 0 for d in diff.values()), diff
    assert all(d["lost"] == d["extra"] == d["duplicated"] == 0 for d in diff.values()), diff
    # One export created per asset; one file each, equal to PostHog's content.
    assert report.exports_created == len(WORLD_EXPORTS)
    assert_export_folder(chaos.export_dir, chaos.db, WORLD_EXPORTS)
    metadata = materialized(result)
    assert metadata["insight_2_csv"]["sha256"] == reference.csv_sha256
    headers = {"Authorization": f"Bearer {standin.key}"}
    for name in WORLD_EXPORTS:
        md = metadata[name]
        url = f"{standin.url}/api/projects/{standin.project_id}/exports/{md['export_id']}/content/"
        server = requests.get(url, headers=headers, timeout=30).content
        assert Path(md["path"]).read_bytes() == server, f"{name} differs from PostHog's content"
    # Every asset check passes on the chaos run's output as well.
    checks = result.get_asset_check_evaluations()
    assert checks and not errors(checks)

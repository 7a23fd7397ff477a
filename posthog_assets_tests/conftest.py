"""Shared fixtures: ONE stand-in PostHog server per test session, reset before each test.

The stand-in runs as a real subprocess on 127.0.0.1 (port 0), so every test talks real HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from posthog_assets.client import PostHogClient, RetrySettings
from posthog_assets.ratelimit import ENV_RATE_LIMIT_DIR
from posthog_assets.resources import PostHogResource
from posthog_assets.standin.server import StandinControl, StandinProcess
from posthog_assets_tests.snapshot_support import resources_for, snapshot_defs, snapshot_settings

#: Seed sizes for the session's stand-in: several pages of everything, still fast to serve.
TEST_INSIGHTS = 1200
TEST_GROUPS_PER_TYPE = 1200
TEST_GROUP_TYPES = 3
TEST_KEY = "phx_test_key_0123456789abcdef"
#: Fast retry/poll settings so fault tests take fractions of a second.
TEST_RETRY = RetrySettings(
    max_attempts=4, backoff_initial_s=0.05, backoff_max_s=0.3, jitter_s=0.05, total_budget_s=20
)


def standin_env(standin: StandinProcess, root: Path) -> dict[str, str]:
    """The env contract pointed at the stand-in, DuckDB and exports under ``root``; no key
    (callers that need one add it, so tests of the key choose theirs)."""
    return {
        "POSTHOG_HOST": standin.url,
        "POSTHOG_PROJECT_ID": str(standin.project_id),
        "POSTHOG_ASSETS_DUCKDB": str(root / "posthog.duckdb"),
        "POSTHOG_ASSETS_EXPORT_DIR": str(root / "exports"),
    }


@pytest.fixture(autouse=True)
def private_rate_limit_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own shared-gate folder: the stand-in's throttles are reset per test,
    so the client's record of what it sent must start afresh too."""
    folder = tmp_path / "gates"
    monkeypatch.setenv(ENV_RATE_LIMIT_DIR, str(folder))
    return folder


@pytest.fixture(scope="session")
def standin() -> Iterator[StandinProcess]:
    proc = StandinProcess(
        key=TEST_KEY,
        insights=TEST_INSIGHTS,
        groups=TEST_GROUPS_PER_TYPE,
        group_types=TEST_GROUP_TYPES,
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def control(standin: StandinProcess) -> StandinControl:
    """The stand-in's control plane, with state reset to the seed for this test."""
    ctl = StandinControl(standin.url)
    ctl.reset()
    return ctl


@pytest.fixture
def posthog_env(
    standin: StandinProcess,
    control: StandinControl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """The environment contract pointed at the stand-in and at tmp_path."""
    env = {**standin_env(standin, tmp_path), "POSTHOG_PERSONAL_API_KEY": standin.key}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def client(standin: StandinProcess, control: StandinControl) -> Iterator[PostHogClient]:
    c = PostHogClient(standin.url, standin.project_id, standin.key, retry=TEST_RETRY)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def posthog_resource(
    standin: StandinProcess, control: StandinControl, tmp_path: Path
) -> PostHogResource:
    return PostHogResource(
        host=standin.url,
        project_id=str(standin.project_id),
        personal_api_key=standin.key,
        export_dir=str(tmp_path / "exports"),
        max_attempts=TEST_RETRY.max_attempts,
        backoff_initial_s=TEST_RETRY.backoff_initial_s,
        backoff_max_s=TEST_RETRY.backoff_max_s,
        retry_budget_s=TEST_RETRY.total_budget_s,
        poll_interval_s=0.05,
        poll_max_interval_s=0.3,
        poll_timeout_s=20,
    )


# -- the snapshot tests' defaults (a module may override any of them)


@pytest.fixture
def db(posthog_env: dict[str, str]) -> Path:
    """The DuckDB file the env points the package at."""
    return Path(posthog_env["POSTHOG_ASSETS_DUCKDB"])


@pytest.fixture
def defs(posthog_env: dict[str, str], tmp_path: Path) -> dg.Definitions:
    """Snapshot definitions from an empty YAML (every default) against the stand-in."""
    return snapshot_defs(snapshot_settings(posthog_env, tmp_path))


@pytest.fixture
def resources(posthog_resource: PostHogResource, db: Path) -> dict[str, Any]:
    return resources_for(posthog_resource, db)

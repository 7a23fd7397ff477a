"""Shared fixtures: ONE stand-in PostHog server per test session, reset before each test.

The stand-in runs as a real subprocess on 127.0.0.1 (port 0), so every test talks real HTTP.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from posthog_assets.api.client import PostHogClient
from posthog_assets.api.ratelimit import ENV_RATE_LIMIT_DIR
from posthog_assets.config import ENV_CONFIG
from posthog_assets.resources import PostHogResource
from posthog_assets_tests.support.resources import make_resource
from posthog_assets_tests.support.session import (
    TEST_RETRY,
    standin_env,
    start_session_standin,
    with_code_location,
)
from posthog_assets_tests.support.snapshots import resources_for, snapshot_defs, snapshot_project
from posthog_project.demo import refresh_defs_state
from posthog_standin.server import StandinControl, StandinProcess

#: The shared ``dg dev`` of the UI and daemon tests, a Redis and a PostgreSQL (each started only
#: when a test asks for it).
pytest_plugins = (
    "posthog_assets_tests.support.dagster_dev",
    "posthog_assets_tests.support.redis",
    "posthog_assets_tests.support.postgres",
)

TIERS = ("unit", "integration", "system")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test belongs to a tier (its closest tier marker). The quick target selects
    ``-m "not system"``: a test marked ``system`` in an integration module is left out."""
    untiered = [item.nodeid for item in items if not _tier(item)]
    if untiered:
        raise pytest.UsageError(
            "tests without a tier marker (" + ", ".join(TIERS) + "): " + ", ".join(untiered[:10])
        )


def _tier(item: pytest.Item) -> str | None:
    return next((m.name for m in item.iter_markers() if m.name in TIERS), None)


@pytest.fixture(scope="session", autouse=True)
def worker_dagster_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Each test worker has its own ``DAGSTER_HOME`` (the project's ``dagster.yaml``): the
    ``dg``/``dagster`` processes tests start keep their SQLite storage out of the developer's
    ``.dagster_home``, and two workers never migrate one fresh SQLite file at once (alembic
    then fails with "more than one head")."""
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(Path(__file__).resolve().parents[1] / "dagster.yaml", home / "dagster.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))
        yield home


@pytest.fixture(autouse=True)
def private_rate_limit_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own shared-gate folder: the stand-in's throttles are reset per test,
    so the client's record of what it sent must start afresh too."""
    folder = tmp_path / "gates"
    monkeypatch.setenv(ENV_RATE_LIMIT_DIR, str(folder))
    return folder


@pytest.fixture(scope="session")
def standin() -> Iterator[StandinProcess]:
    proc = start_session_standin()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def shipped_defs_state(standin: StandinProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped component's state (``posthog_project/defs``), refreshed from the session's
    stand-in with ``dg utils refresh-defs-state``, as ``make demo`` and ``make ui`` do: tests
    that load the code location (``posthog_project.definitions``) in-process need it."""
    root = Path(__file__).resolve().parents[1]
    # The repository on PYTHONPATH: `dg utils refresh-defs-state` imports the code location
    # (posthog_project, not installed with the package) in its own process.
    env = with_code_location(
        {
            **os.environ,
            **standin_env(standin, tmp_path_factory.mktemp("state")),
            "POSTHOG_PERSONAL_API_KEY": standin.key,
        }
    )
    env.pop(ENV_CONFIG, None)
    refresh_defs_state(root, env)
    return root


@pytest.fixture
def control(standin: StandinProcess) -> StandinControl:
    """The stand-in's control plane, with state reset to the seed for this test."""
    ctl = standin.control
    ctl.reset()
    return ctl


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """A throw-away Dagster instance (runs, materializations, partitions) for one test."""
    with dg.instance_for_test() as inst:
        yield inst


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
    return make_resource(standin, tmp_path / "exports")


# -- the snapshot tests' defaults (a module may override any of them)


@pytest.fixture
def db(posthog_env: dict[str, str]) -> Path:
    """The DuckDB file the env points the package at."""
    return Path(posthog_env["POSTHOG_ASSETS_DUCKDB"])


@pytest.fixture
def defs(posthog_env: dict[str, str], tmp_path: Path) -> dg.Definitions:
    """Snapshot definitions of a project with every default, against the stand-in."""
    return snapshot_defs(snapshot_project(posthog_env))


@pytest.fixture
def resources(posthog_resource: PostHogResource, db: Path) -> dict[str, Any]:
    return resources_for(posthog_resource, db)

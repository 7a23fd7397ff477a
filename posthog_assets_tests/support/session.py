"""The test session's stand-in: its sizes, key and environment, and the fast retry settings.

One stand-in serves a whole test session (``conftest.standin``); every test resets it to the seed
through the ``control`` fixture.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from posthog_assets.api.client import RetrySettings
from posthog_standin.server import StandinProcess

#: Seed sizes for the session's stand-in: several pages of everything, still fast to serve.
TEST_INSIGHTS = 500
TEST_GROUPS_PER_TYPE = 500
TEST_GROUP_TYPES = 3
TEST_KEY = "phx_test_key_0123456789abcdef"
#: Fast retry settings so fault tests take fractions of a second.
TEST_RETRY = RetrySettings(
    max_attempts=4, backoff_initial_s=0.05, backoff_max_s=0.3, jitter_s=0.05, total_budget_s=20
)


def start_session_standin() -> StandinProcess:
    return StandinProcess(
        key=TEST_KEY,
        insights=TEST_INSIGHTS,
        groups=TEST_GROUPS_PER_TYPE,
        group_types=TEST_GROUP_TYPES,
    ).start()


def standin_env(standin: StandinProcess, root: Path) -> dict[str, str]:
    """The env contract pointed at the stand-in, DuckDB and exports under ``root``; no key
    (callers that need one add it, so tests of the key choose theirs)."""
    return {
        "POSTHOG_HOST": standin.url,
        "POSTHOG_PROJECT_ID": str(standin.project_id),
        "POSTHOG_ASSETS_DUCKDB": str(root / "posthog.duckdb"),
        "POSTHOG_ASSETS_EXPORT_DIR": str(root / "exports"),
    }


#: The repository: this repository's own code location (``posthog_project``) is its source, not
#: part of what the package installs.
REPOSITORY = Path(__file__).resolve().parents[2]


def with_code_location(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the repository on ``PYTHONPATH``, for a process that imports the code
    location (``posthog_project``) from another folder, or through ``dg``/``dagster``, whose
    entry points do not look in the current folder."""
    paths = [str(REPOSITORY), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}

"""The code location loads from the stored state alone (no HTTP) and holds what the UI shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from posthog_standin.server import StandinControl, StandinProcess

# On one worker with every other user of the shipped state: it is one file in the repository,
# and a worker refreshing it from its own stand-in would make it another project's for the rest.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("dagster_dev")]


def test_definitions_load_without_any_http_call(
    standin: StandinProcess, control: StandinControl, shipped_defs_state: Path
) -> None:
    env = _shipped(standin)
    control.clear_requests_log()
    out = subprocess.run(
        [sys.executable, "-c", LIST_KEYS], env=env, capture_output=True, text=True, check=True
    )
    keys = set(out.stdout.split())
    # the shipped defs.yaml: every dashboard, the insights on two of them, the snapshots
    assert {"posthog/exports/dashboard_1_png", "posthog/insights", "posthog/groups"} <= keys
    assert sum(k.endswith("_csv") for k in keys) == 10  # "Product health" holds 10 insights
    assert [r for r in control.requests_log() if "/api/" in r["path"]] == []


@pytest.mark.parametrize("unset", ["POSTHOG_HOST", "POSTHOG_PROJECT_ID"])
def test_the_stored_state_is_not_used_when_nothing_says_it_is_this_projects(
    standin: StandinProcess, control: StandinControl, shipped_defs_state: Path, unset: str
) -> None:
    """The shipped component leaves host and project id to the environment: unset, the stored
    selections could be another project's, and the load says so rather than guess."""
    env = _shipped(standin)
    env.pop(unset)
    control.clear_requests_log()
    out = subprocess.run([sys.executable, "-c", LIST_KEYS], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    field = "project.host" if unset == "POSTHOG_HOST" else "project.project_id"
    assert (
        f"but the environment variable {unset} ({field}) is not set, so nothing says it is "
        "this project's"
    ) in out.stderr
    assert [r for r in control.requests_log() if "/api/" in r["path"]] == []


LIST_KEYS = (
    "from posthog_project.definitions import defs\n"
    "for spec in defs.resolve_all_asset_specs(): print(spec.key.to_user_string())\n"
)


def _shipped(standin: StandinProcess) -> dict[str, str]:
    """The environment of the code location as the shipped state was read: the session's
    stand-in (``conftest.shipped_defs_state``), no configuration file."""
    env = {
        **os.environ,
        "POSTHOG_HOST": standin.url,
        "POSTHOG_PROJECT_ID": str(standin.project_id),
        "POSTHOG_PERSONAL_API_KEY": standin.key,
    }
    env.pop("POSTHOG_ASSETS_CONFIG", None)
    return env


@pytest.fixture
def shipped_env(
    standin: StandinProcess, shipped_defs_state: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The env the shipped state was read with: a load checks the state is of this project."""
    monkeypatch.setenv("POSTHOG_HOST", standin.url)
    monkeypatch.setenv("POSTHOG_PROJECT_ID", str(standin.project_id))
    return shipped_defs_state


def test_definitions_hold_the_main_job_and_a_masked_key(shipped_env: Path) -> None:
    from posthog_project.definitions import ALL_ASSETS_JOB, defs

    assert defs.resolve_job_def(ALL_ASSETS_JOB) is not None
    posthog = defs.resources["posthog"]
    assert isinstance(posthog.personal_api_key, dg.EnvVar) or "EnvVar" in repr(
        posthog.personal_api_key
    )


def test_every_asset_sits_in_a_posthog_group_with_the_posthog_kind(shipped_env: Path) -> None:
    """The UI groups assets by these names; a graph-backed asset once fell into 'default'."""
    from posthog_project.definitions import defs

    specs = list(defs.resolve_all_asset_specs())
    groups = {s.key.to_user_string(): s.group_name for s in specs}
    assert set(groups.values()) == {
        "posthog_exports", "posthog_insights", "posthog_groups", "posthog_events",
        "posthog_catalog",
    }, groups  # fmt: skip
    assert all("posthog" in s.kinds for s in specs)


@pytest.mark.system
def test_dg_check_defs_passes_on_the_shipped_project(
    standin: StandinProcess, shipped_defs_state: Path
) -> None:
    """What a newcomer runs after cloning: ``dg check defs`` on the repository itself."""
    venv_bin = Path(sys.executable).parent
    env = {
        **{k: v for k, v in os.environ.items() if k != "POSTHOG_ASSETS_CONFIG"},
        "POSTHOG_HOST": standin.url,
        "POSTHOG_PROJECT_ID": str(standin.project_id),
        "VIRTUAL_ENV": str(venv_bin.parent),
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    done = subprocess.run(
        [str(venv_bin / "dg"), "check", "defs"],
        cwd=shipped_defs_state,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All definitions loaded successfully" in done.stdout + done.stderr


@pytest.mark.system
def test_the_shipped_state_refreshes_as_make_demo_refreshes_it(
    standin: StandinProcess, tmp_path: Path
) -> None:
    """``make demo``, ``make ui`` and ``make check-defs`` refresh the state this way first."""
    from posthog_project.demo import refresh_defs_state

    env = {
        **{k: v for k, v in _shipped(standin).items() if k != "PYTHONPATH"},
        "POSTHOG_ASSETS_DUCKDB": str(tmp_path / "posthog.duckdb"),
        "POSTHOG_ASSETS_EXPORT_DIR": str(tmp_path / "exports"),
    }
    refresh_defs_state(Path(__file__).resolve().parents[1], env)

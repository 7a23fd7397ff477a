"""The main job, end to end: ``python -m posthog_project.demo`` (what ``make demo`` runs).

Without ``POSTHOG_HOST`` it starts the local PostHog stand-in and points the package at it, so the
whole pipeline runs with no PostHog account. It then materializes every asset once (today's
snapshot), records the run in ``DAGSTER_HOME`` (``.dagster_home/`` by default, visible later in
the UI) and prints where the results landed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

from posthog_assets.config import ENV_CONFIG

DEMO_KEY = "phx_demo_standin_key"


def prepare_dagster_home(root: Path) -> Path:
    """Use ``$DAGSTER_HOME`` or ``.dagster_home/``, seeded with the project's ``dagster.yaml``."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(root / ".dagster_home"))).resolve()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    src = root / "dagster.yaml"
    if src.exists() and not (home / "dagster.yaml").exists():
        shutil.copyfile(src, home / "dagster.yaml")
    return home


def use_standin_without_credentials(stack: ExitStack) -> None:
    """No ``POSTHOG_HOST``: start the local stand-in (stopped with ``stack``) and point the env
    at it, so the commands run with no PostHog account."""
    if os.environ.get("POSTHOG_HOST"):
        return
    from posthog_standin.server import StandinProcess

    standin = stack.enter_context(StandinProcess(key=DEMO_KEY, export_delay=0.5))
    os.environ.update(
        POSTHOG_HOST=standin.url,
        POSTHOG_PROJECT_ID=str(standin.project_id),
        POSTHOG_PERSONAL_API_KEY=standin.key,
    )
    print(f"No POSTHOG_HOST set: using the local PostHog stand-in at {standin.url}")


def dg_command(
    *args: str, env: Mapping[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """A ``dg`` command line and its env: this interpreter's ``dg``, its venv as the active one."""
    venv_bin = Path(sys.executable).parent
    dg_cli = venv_bin / "dg"
    env = dict(os.environ if env is None else env)
    env["VIRTUAL_ENV"] = str(venv_bin.parent)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    return [str(dg_cli) if dg_cli.exists() else "dg", *args], env


def refresh_defs_state(root: Path, env: Mapping[str, str] | None = None) -> None:
    """``dg utils refresh-defs-state``: what the component stores about the project (its
    insights and dashboards) is read now from the PostHog the env points at, so a stand-in or a
    PostHog chosen since the last start is the one the selections resolve against.

    Nothing to do on the YAML route (``POSTHOG_ASSETS_CONFIG``): it holds ids, not selections.
    """
    if (os.environ if env is None else env).get(ENV_CONFIG):
        return
    print("Refreshing the component's PostHog state (dg utils refresh-defs-state) ...", flush=True)
    command, full_env = dg_command("utils", "refresh-defs-state", env=env)
    done = subprocess.run(command, cwd=root, env=full_env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"dg utils refresh-defs-state failed:\n{done.stdout}{done.stderr}")


#: The days of events the demo reads (the stand-in holds the 7 days before it started).
EVENT_DAYS = 3


def main() -> int:
    root = Path.cwd()
    home = prepare_dagster_home(root)
    with ExitStack() as stack:
        use_standin_without_credentials(stack)
        refresh_defs_state(root)

        import dagster as dg

        from posthog_assets.config import (
            DEFAULT_DUCKDB_PATH,
            DEFAULT_EXPORT_DIR,
        )
        from posthog_assets.pools import apply_pool_limits
        from posthog_project.definitions import ALL_ASSETS_JOB, defs

        instance = stack.enter_context(dg.DagsterInstance.get())
        apply_pool_limits(instance)
        job = defs.resolve_job_def(ALL_ASSETS_JOB)
        logging = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
        result = job.execute_in_process(run_config=logging, instance=instance, raise_on_error=False)
        runs = [result]
        for events_job in [j for j in defs.resolve_all_job_defs() if j.name.endswith("_events")]:
            # what the lookback schedule runs: the last days, one run each
            assert events_job.partitions_def is not None
            for day in events_job.partitions_def.get_partition_keys()[-EVENT_DAYS:]:
                runs.append(
                    events_job.execute_in_process(
                        run_config=logging,
                        instance=instance,
                        partition_key=day,
                        raise_on_error=False,
                    )  # fmt: skip
                )
        print()
        for run in runs:
            print(f"Run {run.run_id}: {'SUCCESS' if run.success else 'FAILURE'}")
        result = (
            runs[-1] if all(r.success for r in runs) else next(r for r in runs if not r.success)
        )
        print(f"Dagster run history:   {home}  (see it with: make ui)")
        print_results(
            Path(os.environ.get("POSTHOG_ASSETS_DUCKDB", DEFAULT_DUCKDB_PATH)),
            Path(os.environ.get("POSTHOG_ASSETS_EXPORT_DIR", DEFAULT_EXPORT_DIR)),
        )
        return 0 if result.success else 1


def print_results(duckdb_path: Path, export_dir: Path) -> None:
    """Say where the data is, with row counts and file sizes a person can check."""
    import duckdb

    print(f"DuckDB file:           {duckdb_path.resolve()}")
    if duckdb_path.exists():
        with duckdb.connect(str(duckdb_path), read_only=True) as conn:
            tables = conn.execute(
                "SELECT table_catalog, table_schema, table_name FROM information_schema.tables "
                "WHERE table_type = 'BASE TABLE' AND table_catalog = current_database() "
                "ORDER BY 2, 3"
            ).fetchall()
            for catalog, schema, table in tables:
                (count,) = conn.execute(
                    f'SELECT count(*) FROM "{catalog}"."{schema}"."{table}"'
                ).fetchone()
                print(f"  {schema}.{table:<28} {count:>8} rows")
    print(f"Export folder:         {export_dir.resolve()}")
    if export_dir.exists():
        for path in sorted(p for p in export_dir.rglob("*") if p.is_file()):
            print(f"  {path.relative_to(export_dir)}  ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    sys.exit(main())

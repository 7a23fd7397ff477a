"""Scale-out storage for real: ``deploy/dagster.yaml`` against a throwaway PostgreSQL server.

A PostgreSQL cluster from Debian's packages is created in a temp folder (``initdb`` as the
``postgres`` user, which refuses root), listens on 127.0.0.1 on a free port with password (SCRAM)
authentication, and is stopped in ``finally``. Dagster reads ``deploy/dagster.yaml`` unchanged, the
connection coming from the ``DAGSTER_PG_*`` env vars, and runs the main job with the multiprocess
executor (each step in its own process, the way a team deployment runs). The test then reads the
runs, materializations and pool limits back through Dagster and straight from the Postgres tables.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psycopg2
import pytest

from posthog_assets.pools import POOL_LIMITS, apply_pool_limits

pytestmark = pytest.mark.system

# The UI tests register this module as a plugin; rewriting its asserts whoever imports it first.
pytest.register_assert_rewrite("posthog_assets_tests.support.dagster_dev")
from posthog_assets_tests.support.dagster_dev import (  # noqa: E402
    ROOT,
    free_port,
    posthog_all_job,
    skip_or_fail,
)

DEPLOY_CONFIG = ROOT / "deploy" / "dagster.yaml"
PG_USER = "dagster"
PG_PASSWORD = "dagster-test-password"
PG_DB = "dagster"
#: Each step in its own process, forked from a server that imported Dagster, our definitions and
#: the Postgres storage once: a fresh interpreter per step spends 5-20 s on imports on two busy
#: cores (dagster_postgres alone pulls in 450 modules).
PRELOAD_MODULES = [
    "posthog_assets.definitions",
    "posthog_assets_tests.support.dagster_dev",
    "dagster_postgres",
    "psycopg2",
    "openpyxl",
]
MULTIPROCESS_RUN_CONFIG = {
    "execution": {
        "config": {
            "multiprocess": {
                "max_concurrent": 2,
                "start_method": {"forkserver": {"preload_modules": PRELOAD_MODULES}},
            }
        }
    }
}


def _pg_bindir() -> Path | None:
    """Debian keeps initdb/pg_ctl off PATH, under /usr/lib/postgresql/<major>/bin."""
    dirs = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name), reverse=True
    )
    for d in dirs:
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    port: int
    run_as: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def sockets(self) -> Path:
        return self.root / "sock"

    def _run(self, *cmd: str) -> None:
        proc = subprocess.run([*self.run_as, *cmd], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = self.root / "postgres.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise AssertionError(f"{cmd[0]} failed: {proc.stdout}{proc.stderr}\n{tail}")

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text("superuser-unused\n")
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--no-sync",
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        log = str(self.root / "postgres.log")
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            log,
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        # Over the Unix socket (trust) as the superuser: the login role and database Dagster uses.
        conn = psycopg2.connect(
            host=str(self.sockets), port=self.port, user="postgres", dbname="postgres"
        )
        conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE ROLE {PG_USER} LOGIN PASSWORD %s", (PG_PASSWORD,))
                cur.execute(f"CREATE DATABASE {PG_DB} OWNER {PG_USER}")
        finally:
            conn.close()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def connect(self) -> psycopg2.extensions.connection:
        """A TCP connection with the password, as Dagster makes it."""
        return psycopg2.connect(
            host="127.0.0.1", port=self.port, user=PG_USER, password=PG_PASSWORD, dbname=PG_DB
        )


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    bindir = _pg_bindir()
    if bindir is None:
        skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    assert bindir is not None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            skip_or_fail("running as root, and there is no 'postgres' user to run initdb as")
        run_as = ["runuser", "-u", "postgres", "--"]
    else:
        run_as = []  # initdb refuses only root; any other user can own a cluster
    # Directly under /tmp: pytest's own temp root is 0700 root, which the postgres user can't enter.
    root = Path(tempfile.mkdtemp(prefix="posthog-pg-"))
    (root / "sock").mkdir()
    if run_as:
        for path in (root, root / "sock"):
            shutil.chown(path, "postgres", "postgres")
    server = PostgresServer(bindir=bindir, root=root, port=free_port(), run_as=run_as)
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


def test_deploy_config_runs_the_main_job_on_postgres_with_multiprocess(
    postgres: PostgresServer,
    shipped_defs_state: Path,
    posthog_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(DEPLOY_CONFIG, home / "dagster.yaml")
    for name, value in {
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(postgres.port),
        "DAGSTER_PG_DB": PG_DB,
        "DAGSTER_PG_USERNAME": PG_USER,
        "DAGSTER_PG_PASSWORD": PG_PASSWORD,
    }.items():
        monkeypatch.setenv(name, value)  # step subprocesses inherit these

    job = posthog_all_job()
    expected_keys = {k for k in job.asset_layer.executable_asset_keys}
    assert expected_keys, "the main job has no assets"

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_monitoring_enabled
        assert instance.run_retries_enabled
        apply_pool_limits(instance)

        result = dg.execute_job(
            dg.reconstructable(posthog_all_job),
            instance=instance,
            run_config=MULTIPROCESS_RUN_CONFIG,
        )
        failures = [e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert result.success, f"run failed: {failures}"
        run_id = result.run_id

        record = instance.get_run_record_by_id(run_id)
        assert record is not None and record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        materialized = {
            k for k in expected_keys if instance.get_latest_materialization_event(k) is not None
        }
        assert materialized == expected_keys

    # Straight from the tables, over TCP with the password, as another Dagster process would read.
    with postgres.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
        assert cur.fetchone() == ("SUCCESS",)
        cur.execute(
            "SELECT asset_key FROM event_logs WHERE run_id = %s "
            "AND dagster_event_type = 'ASSET_MATERIALIZATION'",
            (run_id,),
        )
        keys_in_pg = {dg.AssetKey(json.loads(row[0])) for row in cur.fetchall()}
        assert keys_in_pg == expected_keys
        cur.execute(
            "SELECT count(DISTINCT event::json #>> '{dagster_event,pid}') FROM event_logs "
            "WHERE run_id = %s AND dagster_event_type = 'STEP_START'",
            (run_id,),
        )
        (step_pids,) = cur.fetchone()
        steps = len({s.step_key for s in result.get_step_success_events()})
        assert step_pids == steps, "multiprocess: each step ran in its own process"
        cur.execute('SELECT concurrency_key, "limit" FROM concurrency_limits')
        assert dict(cur.fetchall()) == POOL_LIMITS

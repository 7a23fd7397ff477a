"""A throwaway PostgreSQL server from Debian's packages, in a temporary folder.

The cluster is created with ``initdb`` (as the ``postgres`` user when running as root, which
``initdb`` refuses), listens on 127.0.0.1 on a free port with password (SCRAM) authentication, and
is stopped and removed in ``finally``. Dagster reaches it the way a deployment does: over TCP with
the ``DAGSTER_PG_*`` env vars (:meth:`PostgresServer.dagster_env`).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest

from posthog_assets_tests.support.dagster_dev import free_port, skip_or_fail

PG_USER = "dagster"
PG_PASSWORD = "dagster-test-password"
PG_DB = "dagster"


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

    def dagster_env(self) -> dict[str, str]:
        """The connection env ``deploy/dagster.yaml`` (and ``deploy/celery/``) read."""
        return {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_DB": PG_DB,
            "DAGSTER_PG_USERNAME": PG_USER,
            "DAGSTER_PG_PASSWORD": PG_PASSWORD,
        }

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


def start_postgres() -> PostgresServer:
    """A new cluster (skips, or fails in CI, when the server binaries cannot be had)."""
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
    except BaseException:
        remove_postgres(server)
        raise
    return server


def remove_postgres(server: PostgresServer) -> None:
    try:
        server.stop()
    finally:
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    """A fresh, empty PostgreSQL for one test, stopped and removed afterwards."""
    server = start_postgres()
    try:
        yield server
    finally:
        remove_postgres(server)

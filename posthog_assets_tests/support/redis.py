"""A real Redis from Debian's ``redis-server`` on a loopback port, in a temporary folder.

What a multi-host deployment shares besides PostgreSQL: the Celery broker, and the rate-limit
gate every worker must see. Nothing is persisted; stopping it removes nothing but its process.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from posthog_assets_tests.support.dagster_dev import free_port, skip_or_fail

STARTUP_TIMEOUT_S = 20.0


@dataclass
class RedisServer:
    folder: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            skip_or_fail("redis-server is not installed (Debian package redis-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "redis.log").open("wb")
        self.proc = subprocess.Popen(
            [
                str(binary), "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.folder), "--save", "", "--appendonly", "no",
                "--protected-mode", "yes", "--daemonize", "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    text = (self.folder / "redis.log").read_text(errors="replace")
                    raise AssertionError(f"redis-server exited ({self.proc.returncode}):\n{text}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
            raise AssertionError(f"redis-server did not answer within {STARTUP_TIMEOUT_S:.0f} s")
        finally:
            client.close()

    def flush(self) -> None:
        import redis

        with redis.Redis.from_url(self.url) as client:
            client.flushall()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the session's worker (flush it in a test that needs it empty)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()

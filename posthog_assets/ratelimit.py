"""Client-side pacing shared by every thread, and optionally every process, that uses one key.

PostHog limits each personal API key (480/min for most routes, 240/min for insights). When one
thread is told to wait (429 + ``Retry-After``) the others must wait too, or they burn the budget
and extend the penalty; an optional token bucket keeps a busy run under the limit to begin with.

Why a cross-process variant: a Dagster run launched from the UI or a schedule uses the
multiprocess executor, so the steps of ONE run (exports, insights, groups, property values) are
separate processes, each with its own client, all spending the same key's budget at the same time
(the ``posthog_api`` pool lets several run at once). A per-process gate cannot see the others'
``Retry-After`` or their requests. :class:`SharedRequestGate` keeps the same "not before" instant
and token bucket in a tiny file per (host, key), guarded by ``fcntl.flock``, so every process on
the machine that uses the key paces together. The file name is a hash: the key never touches disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Where shared gate files live (default: a per-user folder in the system temp dir).
ENV_RATE_LIMIT_DIR = "POSTHOG_ASSETS_RATE_LIMIT_DIR"
#: Seconds of requests a full bucket lets through at once. One second keeps the burst below any
#: server bucket at least as generous as the configured pace (PostHog's hold a minute's worth).
DEFAULT_BURST_S = 1.0
#: A "not before" further ahead than this is treated as corrupt (a clock jump, a broken file).
MAX_BLOCK_S = 3600.0


class RequestGate:
    """Blocks callers until a shared "not before" instant, optionally paced by a token bucket."""

    def __init__(
        self,
        requests_per_minute: float | None = None,
        *,
        burst_s: float = DEFAULT_BURST_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self._not_before = 0.0
        self._rate = (requests_per_minute / 60.0) if requests_per_minute else None
        self._capacity = max(1.0, (requests_per_minute or 0) / 60.0 * burst_s)
        self._tokens = self._capacity
        self._refilled_at = clock()

    def block_for(self, seconds: float) -> None:
        """Tell every caller to hold off for ``seconds`` (from a ``Retry-After``)."""
        with self._lock:
            self._not_before = max(self._not_before, self._clock() + max(0.0, seconds))

    def wait(self) -> float:
        """Wait until a request may be sent; return how long we waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                delay = self._not_before - now
                if delay <= 0 and self._rate is not None:
                    self._tokens = min(
                        self._capacity, self._tokens + (now - self._refilled_at) * self._rate
                    )
                    self._refilled_at = now
                    if self._tokens >= 1:
                        self._tokens -= 1
                    else:
                        delay = (1 - self._tokens) / self._rate
                if delay <= 0:
                    return waited
            self._sleep(delay)
            waited += delay


def default_state_dir() -> Path:
    """``$POSTHOG_ASSETS_RATE_LIMIT_DIR``, else ``<tmp>/posthog-assets-ratelimit-<uid>``."""
    configured = os.environ.get(ENV_RATE_LIMIT_DIR)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"posthog-assets-ratelimit-{os.getuid()}"


def shared_state_path(host: str, key: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """The gate file of one (host, key): a hash of both, so the file name reveals nothing."""
    digest = hashlib.sha256(f"{host.rstrip('/').lower()}\n{key}".encode()).hexdigest()[:32]
    return Path(directory or default_state_dir()) / f"gate-{digest}.json"


class SharedRequestGate:
    """:class:`RequestGate` whose state lives in a file, so separate processes share it.

    The state is ``{"not_before", "tokens", "refilled_at"}`` in wall-clock seconds (comparable
    across processes and harmless after a reboot). Every read-modify-write holds an exclusive
    ``flock`` on the file; sleeping happens outside the lock. Threads of one process also take a
    threading lock first, so the file is opened once at a time per process.

    Args:
        path: The state file (see :func:`shared_state_path`); its folder is created (mode 0700).
        requests_per_minute: Steady pace shared by all processes; None = only ``Retry-After``.
        burst_s: Seconds of requests a full bucket lets through at once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        requests_per_minute: float | None = None,
        *,
        burst_s: float = DEFAULT_BURST_S,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._thread_lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self._rate = (requests_per_minute / 60.0) if requests_per_minute else None
        self._capacity = max(1.0, (requests_per_minute or 0) / 60.0 * burst_s)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The state, read and written back under an exclusive lock."""
        with self._thread_lock:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                raw = os.pread(fd, 4096, 0)
                try:
                    state = json.loads(raw) if raw else {}
                    if not isinstance(state, dict):
                        state = {}
                except ValueError:
                    state = {}  # a torn or foreign file: start afresh rather than fail a run
                before = dict(state)
                yield state
                if state != before:
                    data = json.dumps(state).encode()
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, data, 0)
            finally:
                os.close(fd)  # closing releases the flock

    def block_for(self, seconds: float) -> None:
        """Tell every process using this key to hold off for ``seconds``."""
        seconds = min(max(0.0, seconds), MAX_BLOCK_S)
        with self._locked() as state:
            now = self._clock()
            state["not_before"] = max(_number(state.get("not_before")), now + seconds)

    def not_before(self) -> float:
        """The shared instant (wall clock) before which no request may be sent."""
        with self._locked() as state:
            return _number(state.get("not_before"))

    def wait(self) -> float:
        """Wait until a request may be sent (and take a token); return how long we waited."""
        waited = 0.0
        while True:
            with self._locked() as state:
                now = self._clock()
                not_before = _number(state.get("not_before"))
                if not_before - now > MAX_BLOCK_S:
                    not_before = state["not_before"] = now  # corrupt or clock jumped back
                delay = not_before - now
                if delay <= 0 and self._rate is not None:
                    refilled_at = _number(state.get("refilled_at"), now)
                    tokens = _number(state.get("tokens"), self._capacity)
                    elapsed = min(max(0.0, now - refilled_at), MAX_BLOCK_S)
                    tokens = min(self._capacity, tokens + elapsed * self._rate)
                    if tokens >= 1:
                        tokens -= 1
                    else:
                        delay = (1 - tokens) / self._rate
                    state["tokens"] = tokens
                    state["refilled_at"] = now
            if delay <= 0:
                return waited
            self._sleep(delay)
            waited += delay


def _number(value: Any, default: float = 0.0) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default

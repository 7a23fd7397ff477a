"""Client-side throttling that mirrors PostHog's, shared by every thread and process using a key.

PostHog throttles each personal API key with DRF sliding logs (``posthog/rate_limit.py``): the
insight routes allow 240 requests a minute and 1,200 an hour; ``/query/`` has its own throttles
(``APIQueriesBurstThrottle``/``APIQueriesSustainedThrottle``: 240 a minute and 2,400 an hour on
the current tier, ``posthog/api/query.py`` ``get_throttles``); every other route 480 a minute and
4,800 an hour. A 429's ``Retry-After`` is the time until the oldest logged request
leaves the full window, so once the hourly budget is spent it can be close to an hour.

:class:`RequestGate` keeps the same sliding log of the requests *we* sent, per throttle class, and
holds a request back until PostHog would accept it, so a run alone on its key is never throttled.
When a 429 arrives anyway (another tool uses the key, or the limits differ), every caller of that
class pauses until ``Retry-After``, and the log is filled as if the window were full, so the
callers resume one slot at a time instead of all at once (which would earn each of them another
429).

Why the state can live in a file: the steps of one Dagster run are separate processes under the
multiprocess executor, each with its own client, all spending the same key's budget. A gate on a
:class:`FileState` keeps the log and the pauses in a small file per (host, key), guarded by
``fcntl.flock``, so every process on the machine paces together. The file name is a hash: the key
never touches disk. The file lives in a per-user folder that only its owner may write and is
opened without following symlinks (:mod:`posthog_assets.api.private_files`): another local user
must not be able to plant state that blocks runs or point our writes at the user's own files.

Why the state can live in Redis: Celery workers on several hosts share no disk, so a file per
machine would give each host its own budget and let each hammer PostHog after a 429. A gate on a
:class:`RedisState` keeps the same JSON under a distributed lock, keyed by the same hash, so every
worker on every host spends one budget.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from posthog_assets.api.private_files import (
    MAX_READ_BYTES,
    FileTooLarge,
    open_private,
    private_dir,
    read_capped,
)

#: Where shared gate files live (default: ``$XDG_RUNTIME_DIR`` or ``~/.cache``, see
#: :func:`default_state_dir`).
ENV_RATE_LIMIT_DIR = "POSTHOG_ASSETS_RATE_LIMIT_DIR"
#: The default gate folder below ``$XDG_RUNTIME_DIR``, ``$XDG_CACHE_HOME`` or ``~/.cache``.
STATE_SUBDIR = ("posthog-assets", "ratelimit")
#: A Redis shared by every host (``redis://host:6379/0``); unset, the gate is a file per machine.
ENV_RATE_LIMIT_URL = "POSTHOG_ASSETS_RATE_LIMIT_URL"
#: Throttle classes: PostHog's ClickHouse throttles (insights), its API-queries throttles
#: (``/query/``, HogQL and query status) and the default ones.
INSIGHTS = "insights"
QUERY = "query"
DEFAULT = "default"
ALL = "*"
#: A slot counts as free this long after PostHog would free it: our clock reads the send time,
#: PostHog logs the arrival a little later.
DEFAULT_MARGIN_S = 1.0
#: A pause further ahead than this is treated as corrupt (a clock jump, a broken file). PostHog's
#: longest window is an hour, so a real ``Retry-After`` stays below it.
MAX_BLOCK_S = 2 * 3600.0
#: Logged requests dated further ahead than this are dropped: hosts sharing Redis disagree by
#: seconds, while a clock that jumped back or a planted file would hold requests back for good.
MAX_CLOCK_SKEW_S = 60.0

#: The URL schemes redis-py connects with (TCP, TLS, a local socket).
REDIS_SCHEMES = ("redis", "rediss", "unix")
#: Redis keys of gates: this prefix and the (host, key) digest; the lock is the same plus ``:lock``.
REDIS_KEY_PREFIX = "posthog-assets:ratelimit:gate-"
#: An untouched Redis gate vanishes after this: it outlives the longest pause it can hold.
REDIS_STATE_TTL_S = int(MAX_BLOCK_S) + 600
#: The Redis lock's lease: far above the GET and SET it guards, short enough that a crashed
#: holder delays the others only briefly.
REDIS_LOCK_LEASE_S = 10.0
#: How long to wait for the lock before failing (a lease lapses first, unless Redis is stuck).
REDIS_LOCK_WAIT_S = 30.0
#: Connect and read timeout of one Redis command.
REDIS_TIMEOUT_S = 5.0

logger = logging.getLogger(__name__)

_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*([smhd])[a-z]*\s*$")


@dataclass(frozen=True)
class Window:
    """At most ``count`` requests in any ``period_s`` seconds."""

    count: int
    period_s: float

    def __str__(self) -> str:
        unit = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}
        return f"{self.count}/{unit.get(self.period_s, f'{self.period_s:g}s')}"


def parse_rate(text: str) -> Window:
    """DRF's rate syntax, e.g. ``240/minute``, ``1200/hour``, ``5/s``."""
    match = _RATE_RE.match(text)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"rate must look like '240/minute' or '1200/hour', got {text!r}")
    return Window(int(match.group(1)), _PERIODS[match.group(2)])


Limits = Mapping[str, Sequence[Window]]

#: PostHog Cloud's throttles per personal API key (``ClickHouseBurstRateThrottle``,
#: ``ClickHouseSustainedRateThrottle``, ``APIQueriesBurstThrottle``, ``APIQueriesSustainedThrottle``
#: (the current tier; a legacy team has ``HogQLQueryThrottle``, 120/hour), ``BurstRateThrottle``,
#: ``SustainedRateThrottle``).
POSTHOG_CLOUD_LIMITS: dict[str, tuple[Window, ...]] = {
    INSIGHTS: (Window(240, 60.0), Window(1200, 3600.0)),
    QUERY: (Window(240, 60.0), Window(2400, 3600.0)),
    DEFAULT: (Window(480, 60.0), Window(4800, 3600.0)),
}


def throttle_class(path: str) -> str:
    """Which of PostHog's throttles a route counts against."""
    if re.search(r"/query(/|$)", path):
        return QUERY
    return INSIGHTS if re.search(r"/insights(/|$)", path) else DEFAULT


class GateWaitTooLong(Exception):
    """PostHog will not accept a request within the caller's budget; ``retry_at`` says when."""

    def __init__(self, retry_at: float, reason: str) -> None:
        super().__init__(reason)
        self.retry_at = retry_at
        self.reason = reason


class GateState(Protocol):
    """Where a gate keeps its pauses and logs: read and written back under one lock."""

    def locked(self) -> contextlib.AbstractContextManager[dict[str, Any]]: ...


class MemoryState:
    """State shared by the threads of one process (one client)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {}

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            yield self._state


class FileState:
    """State in a file shared by every process on this machine (``fcntl.flock``, mode 0600).

    The folder must be this user's alone and the file a regular file of ours, never followed
    through a symlink; what is read is capped. A problem with either fails with
    :class:`SharedStateUnavailable` naming the path, never as a disk error of the caller's.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._thread_lock = threading.Lock()
        try:
            private_dir(self.path.parent)
        except OSError as exc:
            raise self._unavailable(exc) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        with self._thread_lock:
            fd = self._open()
            try:
                state, rewrite = self._read(fd)
                before = json.dumps(state, sort_keys=True)
                yield state
                data = json.dumps(state, sort_keys=True)
                if rewrite or data != before:
                    self._write(fd, data)
            finally:
                os.close(fd)  # closing releases the flock

    def _open(self) -> int:
        try:
            fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise self._unavailable(exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            raise self._unavailable(exc) from None
        return fd

    def _read(self, fd: int) -> tuple[dict[str, Any], bool]:
        """The stored state, and whether it must be written back (a torn, foreign or oversized
        file starts afresh rather than fail a run)."""
        try:
            raw = read_capped(fd, MAX_READ_BYTES)
        except FileTooLarge:
            logger.warning(
                "the rate-limit state %s holds more than %d bytes: starting afresh",
                self.path,
                MAX_READ_BYTES,
            )
            return {}, True
        except OSError as exc:
            raise self._unavailable(exc) from None
        state = _decode_state(raw)
        return state, bool(raw) and not state

    def _write(self, fd: int, data: str) -> None:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data.encode(), 0)
        except OSError as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: OSError) -> SharedStateUnavailable:
        return SharedStateUnavailable(
            f"the shared rate-limit gate cannot use {self.path} (folder from "
            f"${ENV_RATE_LIMIT_DIR}, else a per-user default): {exc}"
        )


def default_state_dir() -> Path:
    """``$POSTHOG_ASSETS_RATE_LIMIT_DIR``, else a per-user folder no other user can reach first:
    ``$XDG_RUNTIME_DIR/posthog-assets/ratelimit``, else the same below ``$XDG_CACHE_HOME`` or
    ``~/.cache`` (a shared temp dir would let another user create it before us)."""
    configured = os.environ.get(ENV_RATE_LIMIT_DIR)
    if configured:
        return Path(configured)
    for variable in ("XDG_RUNTIME_DIR", "XDG_CACHE_HOME"):
        base = os.environ.get(variable, "")
        if os.path.isabs(base):  # the XDG spec says to ignore relative values
            return Path(base).joinpath(*STATE_SUBDIR)
    try:
        return Path.home().joinpath(".cache", *STATE_SUBDIR)
    except (RuntimeError, KeyError):  # no home at all: the checks of private_dir still apply
        return Path(tempfile.gettempdir()) / f"posthog-assets-ratelimit-{os.getuid()}"


def state_digest(host: str, key: str) -> str:
    """One (host, key) as 32 hex digits: names its file or Redis key without revealing either."""
    return hashlib.sha256(f"{host.rstrip('/').lower()}\n{key}".encode()).hexdigest()[:32]


def shared_state_path(host: str, key: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """The gate file of one (host, key): a hash of both, so the file name reveals nothing."""
    return Path(directory or default_state_dir()) / f"gate-{state_digest(host, key)}.json"


class SharedStateUnavailable(RuntimeError):
    """The shared gate's store cannot be used; the message names the setting, never a password."""


def redact_url(url: str) -> str:
    """What a log or an error may show of a store URL: no user, password or query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    host = f"[{host}]" if ":" in host else host
    auth = "***@" if "@" in parts.netloc else ""
    query = "?***" if parts.query else ""
    return f"{parts.scheme}://{auth}{host}{port}{parts.path}{query}"


def validate_redis_url(url: str, setting: str = ENV_RATE_LIMIT_URL) -> None:
    """Refuse a URL redis-py cannot use, naming ``setting``; the value is never echoed."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in REDIS_SCHEMES:
        raise ValueError(
            f"{setting} must start with redis://, rediss:// or unix:// "
            "(e.g. redis://host:6379/0); the value is not shown, it may hold a password"
        )


def _url_secrets(url: str) -> tuple[str, ...]:
    """The password of ``url`` as written and decoded (userinfo or ``?password=``), to scrub."""
    parts = urlsplit(url)
    found = [parts.password or "", *parse_qs(parts.query).get("password", [])]
    return tuple({s for p in found for s in (p, unquote(p)) if s})


def _decode_state(raw: bytes | str | None) -> dict[str, Any]:
    """Stored JSON as a dict; anything else (torn, foreign) starts afresh rather than fail a run."""
    try:
        state = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


class RedisState:
    """State in Redis, shared by every process on every host using the key: one budget per key.

    The lock is redis-py's :class:`~redis.lock.Lock` (``SET NX`` with a lease, released only by
    its owner's token), not a WATCH/MULTI transaction: an optimistic transaction must re-run its
    body when another writer got in first, and the body here is the caller's ``with`` block,
    which runs once. Under the lock there is one GET and at most one SET (the gate never sleeps
    inside it), so the lease lapses only if the holder freezes; then one update of the advisory
    log may be lost, and nobody waits on a dead holder for more than the lease.

    The key is the same digest as :func:`shared_state_path` (it names neither host nor key) and
    expires :data:`REDIS_STATE_TTL_S` after the last write, so abandoned gates vanish.
    ``redis`` is imported here, so the HTTP layer loads without it.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://``; may hold a password, so it is kept
            only inside the connection pool and shown redacted.
        host: PostHog's base URL, and ``key`` the personal API key: what the budget belongs to.
        setting: How the caller configured ``url``, named in every error.
    """

    def __init__(
        self,
        url: str,
        host: str,
        key: str,
        *,
        setting: str = ENV_RATE_LIMIT_URL,
        ttl_s: int = REDIS_STATE_TTL_S,
        lock_lease_s: float = REDIS_LOCK_LEASE_S,
        lock_wait_s: float = REDIS_LOCK_WAIT_S,
    ) -> None:
        validate_redis_url(url, setting)
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError:
            raise SharedStateUnavailable(
                f"{setting} needs the redis package: pip install 'posthog-assets[celery]'"
            ) from None
        self.name = f"{REDIS_KEY_PREFIX}{state_digest(host, key)}"
        self.where = redact_url(url)
        self.setting = setting
        self.ttl_s = ttl_s
        self._lease_s = lock_lease_s
        self._wait_s = lock_wait_s
        self._secrets = _url_secrets(url)
        self._errors: tuple[type[Exception], ...] = (redis.exceptions.RedisError, OSError)
        self._not_owned = redis.exceptions.LockNotOwnedError
        self._redis = redis.Redis.from_url(
            url,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), retries=2),
        )
        self._thread_lock = threading.Lock()  # threads queue here, not by polling Redis

    def __repr__(self) -> str:
        return f"RedisState({self.where!r}, name={self.name!r})"

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        with self._thread_lock:
            lock = self._redis.lock(
                f"{self.name}:lock",
                timeout=self._lease_s,
                sleep=0.005,
                blocking_timeout=self._wait_s,
                thread_local=False,
            )
            if not self._call("take the lock", lock.acquire):
                raise SharedStateUnavailable(
                    f"the shared rate-limit gate in Redis at {self.where} (set by {self.setting}) "
                    f"stayed locked for {self._wait_s:g}s"
                )
            try:
                state = _decode_state(self._call("read", self._redis.get, self.name))
                before = json.dumps(state, sort_keys=True)
                yield state
                data = json.dumps(state, sort_keys=True)
                if data != before:
                    self._call("write", self._redis.set, self.name, data, ex=self.ttl_s)
            finally:
                self._release(lock)

    def _release(self, lock: Any) -> None:
        """Give the lock back; never raise over the caller's own error (the lease ends it)."""
        try:
            lock.release()
        except self._not_owned:
            logger.warning(
                "the rate-limit lock in Redis lapsed while held (a pause over %gs): "
                "one update of the shared request log may be lost",
                self._lease_s,
            )
        except self._errors as exc:
            logger.warning("could not release the rate-limit lock in Redis: %s", self._safe(exc))

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one Redis command; a failure names the setting and the redacted URL."""
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise SharedStateUnavailable(
                f"the shared rate-limit gate cannot {what} in Redis at {self.where} (set by "
                f"{self.setting}): {self._safe(exc)}"
            ) from None

    def _safe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class RequestGate:
    """Holds requests back until PostHog's sliding windows have room; shares 429 pauses.

    Args:
        state: Where pauses and logs live (:class:`MemoryState` for one process,
            :class:`FileState` for every process using the key); default: in memory.
        limits: Windows per throttle class (default PostHog Cloud's); None paces only on 429s.
        margin_s: Extra seconds before a logged request counts as gone from a window.
    """

    def __init__(
        self,
        state: GateState | None = None,
        limits: Limits | None = POSTHOG_CLOUD_LIMITS,
        *,
        margin_s: float = DEFAULT_MARGIN_S,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.state: GateState = state if state is not None else MemoryState()
        self.limits = {k: tuple(v) for k, v in (limits or {}).items()}
        self.margin_s = margin_s
        self._clock = clock
        self._sleep = sleep

    def _windows(self, klass: str) -> tuple[Window, ...]:
        return self.limits.get(klass, self.limits.get(DEFAULT, ()))

    def acquire(self, klass: str = DEFAULT, *, max_wait_s: float = math.inf) -> float:
        """Wait until a request of ``klass`` may be sent and log it; return the seconds waited.

        Raises :class:`GateWaitTooLong` (before waiting) when the wait would exceed ``max_wait_s``.
        """
        waited = 0.0
        while True:
            with self.state.locked() as state:
                now = self._clock()
                delay, reason = self._delay(state, klass, now)
                if delay <= 0:
                    log = _log(state, klass)
                    bisect.insort(log, round(now, 3))  # another host's clock may run ahead
                    longest = max((w.period_s for w in self._windows(klass)), default=0.0)
                    del log[: bisect.bisect_right(log, now - longest - self.margin_s)]
                    return waited
            if waited + delay > max_wait_s:
                raise GateWaitTooLong(now + delay, reason)
            self._sleep(delay)
            waited += delay

    def _delay(self, state: dict[str, Any], klass: str, now: float) -> tuple[float, str]:
        pauses = state.get("not_before")
        pauses = pauses if isinstance(pauses, dict) else {}
        delay, reason = 0.0, ""
        for name in (ALL, klass):
            until = _number(pauses.get(name))
            if until - now > MAX_BLOCK_S:
                pauses[name] = until = now  # corrupt, or the clock jumped back
            if until - now > delay:
                delay, reason = until - now, "PostHog answered 429 (Retry-After)"
        log = _current_log(state, klass, now)
        for window in self._windows(klass):
            span = window.period_s + self.margin_s
            recent = len(log) - bisect.bisect_right(log, now - span)
            if recent >= window.count:
                frees = log[-window.count] + span - now
                if frees > delay:
                    delay, reason = frees, f"{klass} limit {window} per key"
        return delay, reason

    def throttled(self, klass: str | None, retry_after_s: float) -> None:
        """A 429 (or 503) said to wait: pause ``klass`` (every class when None) for everyone.

        PostHog's window is full: fill our log so that, after the pause, slots come back one at
        a time at the window's pace rather than all at once.
        """
        seconds = min(max(0.0, retry_after_s), MAX_BLOCK_S)
        with self.state.locked() as state:
            now = self._clock()
            pauses = state.setdefault("not_before", {})
            if not isinstance(pauses, dict):
                pauses = state["not_before"] = {}
            name = klass or ALL
            pauses[name] = max(_number(pauses.get(name)), now + seconds)
            windows = sorted(self._windows(klass), key=lambda w: w.period_s) if klass else []
            fitting = [w for w in windows if w.period_s >= seconds] or windows[-1:]
            if not fitting:
                return
            window = fitting[0]
            first = now + seconds - window.period_s - self.margin_s
            step = (now - first) / max(1, window.count - 1)
            log = [t for t in _log(state, klass) if t < first]  # type: ignore[arg-type]
            log += [round(first + k * step, 3) for k in range(window.count)]
            state.setdefault("logs", {})[klass] = log

    def not_before(self, klass: str | None = None) -> float:
        """The instant (wall clock) before which no request of ``klass`` may be sent."""
        with self.state.locked() as state:
            now = self._clock()
            delay, _ = self._delay(state, klass or DEFAULT, now)
            return now + max(0.0, delay)


def _log(state: dict[str, Any], klass: str) -> list[float]:
    logs = state.get("logs")
    if not isinstance(logs, dict):
        logs = state["logs"] = {}
    log = logs.get(klass)
    if not isinstance(log, list) or not all(isinstance(t, int | float) for t in log):
        log = logs[klass] = []
    return log


def _current_log(state: dict[str, Any], klass: str, now: float) -> list[float]:
    """The log of ``klass`` in order, without entries dated beyond :data:`MAX_CLOCK_SKEW_S`
    from now: like a pause beyond :data:`MAX_BLOCK_S`, they would hold requests back for good."""
    log = _log(state, klass)
    log.sort()
    future = bisect.bisect_right(log, now + MAX_CLOCK_SKEW_S)
    if future < len(log):
        logger.warning(
            "dropped %d logged %s request(s) dated more than %gs ahead (a clock that jumped "
            "back, or a corrupt rate-limit state)",
            len(log) - future,
            klass,
            MAX_CLOCK_SKEW_S,
        )
        del log[future:]
    return log


def _number(value: Any, default: float = 0.0) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default

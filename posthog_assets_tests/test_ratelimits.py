"""Rate limits: PostHog's per-key sliding windows (the stand-in's real ones, made small and fast).

Why: PostHog Cloud throttles every personal API key with DRF sliding logs (insights and query:
240/min + 1200/h; everything else 480/min + 4800/h), and once a window is full ``Retry-After`` can
be close to an hour. The client keeps the same log of what it sent and holds requests back until
PostHog would accept them; a 429 anyway pauses every thread and process using the key. Steps of
one Dagster run can be separate processes, so the log lives in a locked state file
(:class:`posthog_assets.ratelimit.FileState`); these tests show it holds across real processes.
Workers on several hosts share no file, so the log can live in Redis instead
(:class:`posthog_assets.ratelimit.RedisState`); these tests show one budget across "hosts"
(processes with nothing on disk in common) through a real ``redis-server``.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from posthog_assets.api.client import PostHogClient, RetrySettings
from posthog_assets.api.errors import PostHogRateLimitError
from posthog_assets.api.ratelimit import (
    DEFAULT,
    ENV_RATE_LIMIT_DIR,
    ENV_RATE_LIMIT_URL,
    INSIGHTS,
    MAX_BLOCK_S,
    QUERY,
    REDIS_STATE_TTL_S,
    FileState,
    GateWaitTooLong,
    MemoryState,
    RedisState,
    RequestGate,
    SharedStateUnavailable,
    Window,
    parse_rate,
    shared_state_path,
    throttle_class,
)
from posthog_assets.resources import PostHogResource
from posthog_assets_tests.support.dagster_dev import free_port
from posthog_assets_tests.support.redis import RedisServer
from posthog_assets_tests.support.reliability import (
    SNAPSHOT_NAMES,
    Reference,
    api_requests,
    build_world,
    failure_texts,
    fast_resource,
    shared_reference,
    table_rows,
    wait_violations,
)
from posthog_assets_tests.support.resources import make_resource
from posthog_standin.server import StandinControl, StandinProcess

pytestmark = pytest.mark.integration

#: Small windows so throttling happens within a second (PostHog's are per minute and hour):
#: (other routes, insight routes) per second. A snapshot sends about 35 requests, 15 of them
#: property values fetched side by side: unpaced, the tight pair bites even on a loaded machine
#: (20/10 did not always); paced, the client's log (which adds a safety margin to each window)
#: keeps every request under the looser pair and the test short.
TIGHT_LIMITS, LOOSE_LIMITS = ("8/second", "4/second"), ("20/second", "10/second")
GROUPS_TYPES = r"/groups_types"


@pytest.fixture(scope="module")
def reference(standin: StandinProcess, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return shared_reference(standin, tmp_path_factory)


def _limits(insights: str, default: str) -> dict[str, tuple[Window, ...]]:
    return {INSIGHTS: (parse_rate(insights),), DEFAULT: (parse_rate(default),)}


# ------------------------------------------------------------------------------------------------
# A whole snapshot under real limits


@pytest.mark.parametrize("paced", [False, True], ids=["retry_after_only", "paced_like_posthog"])
def test_full_snapshot_completes_under_real_sliding_windows(
    paced: bool,
    reference: Reference,
    standin: StandinProcess,
    control: StandinControl,
    tmp_path: Path,
) -> None:
    default, insights = LOOSE_LIMITS if paced else TIGHT_LIMITS
    overrides = {"burst": default, "clickhouse_burst": insights}
    control.configure(rate_limits=True, rate_limit_overrides=overrides)
    world = build_world(tmp_path)
    resource = fast_resource(
        standin,
        world.export_dir,
        max_attempts=10,
        retry_budget_s=60,
        pace_requests=paced,
        insight_rate_limits=[insights],
        default_rate_limits=[default],
    )

    result = world.materialize(SNAPSHOT_NAMES, resource, checks=False)

    log = control.requests_log()
    throttled = [r for r in api_requests(log) if r["status"] == 429]
    assert result.success, failure_texts(result)
    for family in SNAPSHOT_NAMES:  # nothing lost or duplicated by the throttling
        assert table_rows(world.db, family) == reference.rows[family], family
    assert wait_violations(log, retry_after_s=1.0) == []
    if paced:
        assert throttled == [], f"{len(throttled)} requests throttled despite the client's log"
    else:
        assert len(throttled) >= 2, "the windows never bit: the test proves nothing"


# ------------------------------------------------------------------------------------------------
# One key shared with someone else


def test_no_call_is_answered_429_more_than_twice_in_a_row(
    standin: StandinProcess, control: StandinControl, tmp_path: Path
) -> None:
    """Another tool has just used up the window: the first 429 pauses every thread, and they
    come back one slot at a time instead of all at once."""
    control.configure(rate_limits=True, rate_limit_overrides={"burst": "10/second"})
    limits = _limits("10/second", "10/second")
    other = PostHogClient(standin.url, standin.project_id, standin.key, rate_limits=None)
    for _ in range(10):  # the other tool's requests fill the window
        other.list_group_types()
    ours = PostHogClient(
        standin.url, standin.project_id, standin.key, rate_limits=limits,
        rate_limit_state=shared_state_path(standin.url, standin.key, tmp_path),
        retry=RetrySettings(max_attempts=6, backoff_initial_s=0.05, backoff_max_s=0.2,
                            jitter_s=0.01, total_budget_s=30),
    )  # fmt: skip
    calls = itertools.count()

    def work() -> None:
        for _ in range(4):
            ours.get_json(f"/api/projects/{standin.project_id}/groups_types/", {"n": next(calls)})

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    by_call: dict[str, list[int]] = defaultdict(list)
    for r in sorted(api_requests(control.requests_log()), key=lambda r: r["ts"]):
        if "n" in r["query"]:
            by_call[r["query"]["n"]].append(r["status"])
    assert len(by_call) == 24 and all(s[-1] == 200 for s in by_call.values())
    assert any(429 in s for s in by_call.values()), "no 429 at all: the test proves nothing"
    worst = max(len(list(g)) for s in by_call.values() for k, g in itertools.groupby(s) if k == 429)
    assert worst <= 2, dict(by_call)


def test_a_wait_beyond_the_retry_budget_fails_at_once_saying_when(
    standin: StandinProcess, control: StandinControl
) -> None:
    """The hourly window is full: PostHog's Retry-After is close to an hour. Waiting it out
    inside a step helps nobody; the error says when PostHog will accept requests again."""
    control.configure(rate_limits=True, rate_limit_overrides={"sustained": "3/hour"})
    client = PostHogClient(
        standin.url, standin.project_id, standin.key, rate_limits=None,
        retry=RetrySettings(max_attempts=5, backoff_initial_s=0.05, total_budget_s=20),
    )  # fmt: skip
    for _ in range(3):
        client.list_group_types()
    started = time.time()
    with pytest.raises(PostHogRateLimitError) as err:
        client.list_group_types()
    assert time.time() - started < 3
    assert err.value.retry_at == pytest.approx(started + 3600, abs=30)
    assert "accepts requests again at" in str(err.value)
    # the next call knows it too and does not even ask PostHog
    sent = len(api_requests(control.requests_log()))
    with pytest.raises(PostHogRateLimitError, match="again at") as again:
        client.list_group_types()
    assert again.value.retryable is False
    assert len(api_requests(control.requests_log())) == sent


# ------------------------------------------------------------------------------------------------
# The budget across processes

HAMMER = """
import json, sys, time
from posthog_assets.api.client import PostHogClient, RetrySettings
from posthog_assets.api.ratelimit import DEFAULT, RedisState, parse_rate
url, pid, key, state, rate, n, start = sys.argv[1:8]
if state.startswith("redis://"):
    state = RedisState(state, url, key)
client = PostHogClient(
    url, int(pid), key, rate_limits={DEFAULT: (parse_rate(rate),)} if rate else None,
    rate_limit_state=state or None,
    retry=RetrySettings(max_attempts=20, backoff_initial_s=0.05, backoff_max_s=0.2,
                        jitter_s=0.01, total_budget_s=60),
)
while time.time() < float(start):
    time.sleep(0.002)
sent = []
for _ in range(int(n)):
    sent.append(time.time())
    client.list_group_types()
print(json.dumps({"requests": client.request_count, "first": sent[0]}))
"""


def _hammer(
    standin: StandinProcess, state: Path | str | None, rate: str, n: int, start: float
) -> subprocess.Popen[str]:
    args = [standin.url, str(standin.project_id), standin.key, str(state or ""), rate,
            str(n), str(start)]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-c", HAMMER, *args], stdout=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "store", ["file", "redis", None], ids=["shared_log", "shared_redis_log", "per_process_log"]
)
@pytest.mark.system  # real processes
def test_client_budget_is_shared_by_processes_using_one_key(
    store: str | None,
    standin: StandinProcess,
    control: StandinControl,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Three processes, 30 requests each, against a 40/second window: only a shared log fits,
    in a file or in Redis."""
    control.configure(rate_limits=True, rate_limit_overrides={"burst": "40/second"})
    shared = store is not None
    state: Path | str | None = None
    if store == "file":
        state = shared_state_path(standin.url, standin.key, tmp_path)
    elif store == "redis":
        state = _flushed(request.getfixturevalue("redis_server"))
    start = time.time() + 1.5  # all three begin together, after their imports
    procs = [_hammer(standin, state, "40/second", n=30, start=start) for _ in range(3)]
    results = [_finish(p) for p in procs]

    log = [r for r in api_requests(control.requests_log()) if "groups_types" in r["path"]]
    throttled = [r for r in log if r["status"] == 429]
    assert sum(1 for r in log if r["status"] == 200) == 90
    if shared:
        assert throttled == []
        assert sum(r["requests"] for r in results) == 90  # not one retry needed
        span = max(r["ts"] for r in log) - min(r["ts"] for r in log)
        assert span >= 0.9, f"90 requests in a shared 40/second window took only {span:.2f}s"
    else:
        assert throttled, "three separate 40/second logs should overrun one 40/second window"


@pytest.mark.system  # real processes
def test_retry_after_seen_by_one_process_pauses_the_others(
    standin: StandinProcess, control: StandinControl, tmp_path: Path
) -> None:
    state = shared_state_path(standin.url, standin.key, tmp_path)
    control.add_fault(match=GROUPS_TYPES, kind="status", status=429, retry_after=2, times=1)
    first = PostHogClient(
        standin.url, standin.project_id, standin.key, rate_limit_state=state,
        retry=RetrySettings(max_attempts=3, backoff_initial_s=0.05, backoff_max_s=0.1),
    )  # fmt: skip
    waiter = threading.Thread(target=first.list_group_types)
    waiter.start()
    deadline = time.monotonic() + 10
    while not any(r["status"] == 429 for r in control.requests_log()):
        assert time.monotonic() < deadline, "no 429 arrived"
        time.sleep(0.02)

    other = _finish(_hammer(standin, state, "", n=1, start=0))
    waiter.join(timeout=10)
    first.close()

    log = sorted(api_requests(control.requests_log()), key=lambda r: r["ts"])
    t429 = next(r["ts"] for r in log if r["status"] == 429)
    after = [r["ts"] - t429 for r in log if r["ts"] > t429]
    assert len(after) == 2 and min(after) >= 2.0 - 0.02, after  # both waited the full 2 s
    assert other["first"] - t429 < 1.5  # the other process was ready to send long before


# ------------------------------------------------------------------------------------------------
# The gate on its own (no network)


class FakeTime:
    """A clock that moves only when someone sleeps: the gate's waits become exact numbers."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.unit
def test_the_gate_keeps_posthogs_sliding_windows(tmp_path: Path) -> None:
    t = FakeTime()
    limits = {INSIGHTS: (Window(3, 60.0), Window(5, 3600.0))}
    gate = RequestGate(FileState(tmp_path / "g.json"), limits, margin_s=1.0, clock=t.clock,
                       sleep=t.sleep)  # fmt: skip
    assert [gate.acquire(INSIGHTS) for _ in range(3)] == [0, 0, 0]
    assert gate.acquire(INSIGHTS) == pytest.approx(61.0)  # the minute window: oldest leaves
    assert gate.acquire(INSIGHTS) == 0  # the other two left at the same time
    # five in the hour now: the next waits for the first to leave the hour (+ margin)
    with pytest.raises(GateWaitTooLong) as err:
        gate.acquire(INSIGHTS, max_wait_s=600)
    assert err.value.retry_at == pytest.approx(1_000_000.0 + 3601, abs=0.01)
    assert "1200" not in err.value.reason and "insights limit 5/hour" in err.value.reason


@pytest.mark.unit
def test_a_429_pauses_the_class_and_resumes_one_slot_at_a_time(tmp_path: Path) -> None:
    t = FakeTime()
    path = shared_state_path("https://us.posthog.com", "phx_secret_key", tmp_path)
    limits = {INSIGHTS: (Window(10, 60.0),), DEFAULT: (Window(100, 60.0),)}
    a = RequestGate(FileState(path), limits, margin_s=0.0, clock=t.clock, sleep=t.sleep)
    b = RequestGate(FileState(path), limits, margin_s=0.0, clock=t.clock, sleep=t.sleep)
    assert "phx_secret_key" not in path.name and "us.posthog" not in path.name
    a.throttled(INSIGHTS, 30.0)
    assert b.acquire(INSIGHTS) == pytest.approx(30.0)  # whoever asks next waits it out
    assert b.acquire(INSIGHTS) == pytest.approx(30.0 / 9, abs=0.01)  # one slot at a time
    assert b.acquire(DEFAULT) == 0  # other routes have their own throttle
    a.throttled(None, 5.0)  # a 503 with Retry-After pauses everything
    assert b.acquire(DEFAULT) == pytest.approx(5.0)


@pytest.mark.unit
def test_a_corrupt_or_absurd_state_file_never_blocks_a_run(tmp_path: Path) -> None:
    t = FakeTime()
    path = tmp_path / "gate.json"
    path.write_text("{not json")
    gate = RequestGate(FileState(path), None, clock=t.clock, sleep=t.sleep)
    assert gate.acquire() == 0
    path.write_text(json.dumps({"not_before": {"*": t.now + 10 * MAX_BLOCK_S}}))
    assert gate.acquire() == 0  # a clock jump or a broken writer: ignored, not hours of waiting
    gate.throttled(None, 10 * MAX_BLOCK_S)
    assert gate.not_before() <= t.now + MAX_BLOCK_S
    fresh = FileState(tmp_path / "new" / "gate.json")
    RequestGate(fresh, None, clock=t.clock, sleep=t.sleep).throttled(None, 1)
    assert oct(fresh.path.stat().st_mode & 0o777) == oct(0o600)  # other users cannot read it
    assert oct(fresh.path.parent.stat().st_mode & 0o777) == oct(0o700)


@pytest.mark.unit
def test_routes_count_against_posthogs_throttle_classes() -> None:
    assert throttle_class("/api/projects/1/insights/") == INSIGHTS
    assert throttle_class("/api/environments/1/insights/42/") == INSIGHTS
    assert throttle_class("/api/projects/1/query/cache_abc/") == QUERY
    assert throttle_class("/api/projects/1/query/") == QUERY
    assert throttle_class("/api/projects/1/exports/") == DEFAULT
    assert throttle_class("/api/projects/1/groups/") == DEFAULT
    assert parse_rate("240/minute") == Window(240, 60.0)
    with pytest.raises(ValueError, match="240/minute"):
        parse_rate("fast")


def test_bad_rate_settings_are_refused_naming_the_field(standin: StandinProcess) -> None:
    """Where the resource is written (the definitions load), before any run."""
    with pytest.raises(ValueError, match="insight_rate_limits"):
        fast_resource(standin, Path("unused"), insight_rate_limits=["lots/minute"])


# ------------------------------------------------------------------------------------------------
# One budget across hosts: the gate in Redis

REDIS_HOST = "https://us.posthog.com"
REDIS_KEY = "phx_secret_key_for_redis"
#: The Retry-After the stand-in answers in the two-host test.
RETRY_AFTER_S = 2.0


def _flushed(server: RedisServer) -> str:
    """The session's Redis, emptied: each test starts with no gate in it."""
    server.flush()
    return server.url


@pytest.fixture
def redis_url(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv(ENV_RATE_LIMIT_URL, raising=False)
    return _flushed(redis_server)


def _raw_redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def test_redis_state_round_trips_under_a_hashed_key_that_expires(redis_url: str) -> None:
    """What one client writes another reads (same host and key); the key name is the state
    file's hash, it expires after the last write, and a read alone does not write."""
    writer = RedisState(redis_url, REDIS_HOST, REDIS_KEY)
    with writer.locked() as state:
        assert state == {}
        state["not_before"] = {DEFAULT: 123.5}
    with RedisState(redis_url, REDIS_HOST + "/", REDIS_KEY).locked() as state:
        assert state == {"not_before": {DEFAULT: 123.5}}

    digest = shared_state_path(REDIS_HOST, REDIS_KEY).stem.removeprefix("gate-")
    with _raw_redis(redis_url) as raw:
        assert raw.keys("*") == [f"posthog-assets:ratelimit:gate-{digest}".encode()]  # no lock left
        assert REDIS_STATE_TTL_S - 5 < raw.ttl(writer.name) <= REDIS_STATE_TTL_S
        raw.expire(writer.name, 100)
        with writer.locked() as state:
            assert state["not_before"] == {DEFAULT: 123.5}
        assert raw.ttl(writer.name) <= 100  # unchanged state is not written back
        raw.set(writer.name, b"{torn")
    with writer.locked() as state:
        assert state == {}  # a torn or foreign value starts afresh rather than fail a run
    assert "phx_secret" not in writer.name and "posthog" not in writer.name.split("gate-")[1]
    assert "RedisState('redis://127.0.0.1:" in repr(writer)


def test_a_429_recorded_in_redis_pauses_another_gate(redis_url: str) -> None:
    t = FakeTime()
    limits = {DEFAULT: (Window(100, 60.0),)}
    a = RequestGate(RedisState(redis_url, REDIS_HOST, REDIS_KEY), limits, clock=t.clock,
                    sleep=t.sleep)  # fmt: skip
    b = RequestGate(RedisState(redis_url, REDIS_HOST, REDIS_KEY), limits, clock=t.clock,
                    sleep=t.sleep)  # fmt: skip
    other_key = RequestGate(RedisState(redis_url, REDIS_HOST, "phx_other"), limits,
                            clock=t.clock, sleep=t.sleep)  # fmt: skip
    a.throttled(DEFAULT, 30.0)
    assert other_key.acquire() == 0  # another key has its own budget
    assert b.acquire() == pytest.approx(30.0)


def _count_up(state: RedisState, times: int) -> None:
    for _ in range(times):
        with state.locked() as s:
            s["n"] = s.get("n", 0) + 1


def _counted(url: str) -> int:
    with RedisState(url, REDIS_HOST, REDIS_KEY).locked() as state:
        return int(state["n"])


def test_redis_lock_loses_no_update_between_threads(redis_url: str) -> None:
    """Eight threads read-modify-write one counter: four share a state, four have their own."""
    shared = RedisState(redis_url, REDIS_HOST, REDIS_KEY)
    states = [shared] * 4 + [RedisState(redis_url, REDIS_HOST, REDIS_KEY) for _ in range(4)]
    threads = [threading.Thread(target=_count_up, args=(s, 100)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _counted(redis_url) == 800


COUNTER = """
import sys, threading, time
from posthog_assets.api.ratelimit import RedisState
url, host, key, start = sys.argv[1:5]
def work():
    state = RedisState(url, host, key)
    for _ in range(50):
        with state.locked() as s:
            s["n"] = s.get("n", 0) + 1
while time.time() < float(start):
    time.sleep(0.002)
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


@pytest.mark.system  # real processes
def test_redis_lock_loses_no_update_between_processes(redis_url: str) -> None:
    """Three processes of four threads each, and two threads here, all at once: 700 updates."""
    start = time.time() + 1.0
    args = [redis_url, REDIS_HOST, REDIS_KEY, str(start)]
    procs = [subprocess.Popen([sys.executable, "-c", COUNTER, *args]) for _ in range(3)]
    while time.time() < start:
        time.sleep(0.002)
    here = [threading.Thread(target=_count_up, args=(RedisState(*args[:3]), 50)) for _ in "ab"]
    for t in here:
        t.start()
    for t in here:
        t.join()
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    assert _counted(redis_url) == 3 * 4 * 50 + 2 * 50


HOST = """
import json, sys, time
from posthog_assets.resources import PostHogResource
url, pid, key, who = sys.argv[1:5]
resource = PostHogResource(host=url, project_id=pid, personal_api_key=key, max_attempts=3,
                           backoff_initial_s=0.05, backoff_max_s=0.1, retry_budget_s=30)
client = resource.get_client()
print(json.dumps({"state": type(client.gate.state).__name__}), flush=True)
sys.stdin.readline()
asked = time.time()
client.get_json(f"/api/projects/{pid}/groups_types/", {"who": who})
print(json.dumps({"asked": asked, "done": time.time()}), flush=True)
"""


class Host:
    """A worker on a host of its own: its own HOME, TMPDIR and gate folder; only the stand-in
    (and Redis, when given) in common with the other. It builds its client from the resource,
    so its environment decides the gate, and sends one request when told to."""

    def __init__(self, who: str, standin: StandinProcess, root: Path, url: str | None) -> None:
        self.who = who
        env = {**os.environ, "HOME": str(root / "home"), "TMPDIR": str(root / "tmp"),
               ENV_RATE_LIMIT_DIR: str(root / "gates")}  # fmt: skip
        env.pop(ENV_RATE_LIMIT_URL, None)
        if url is not None:
            env[ENV_RATE_LIMIT_URL] = url
        for folder in ("home", "tmp"):
            (root / folder).mkdir(parents=True)
        args = [standin.url, str(standin.project_id), standin.key, who]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOST, *args], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        self.root = root

    def ready(self) -> str:
        """Wait until imported and the client is built; the gate state's class."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"{self.who} exited ({self.proc.wait()})"
        return str(json.loads(line)["state"])

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self) -> dict[str, float]:
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, self.who
        return dict(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("through_redis", [True, False], ids=["redis", "file_only"])
@pytest.mark.system  # real processes
def test_a_retry_after_seen_on_one_host_holds_the_other_host_back(
    through_redis: bool,
    standin: StandinProcess,
    control: StandinControl,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The point of the Redis gate. Host A is answered 429 with ``Retry-After: 2``; host B,
    asked to send right after, is held until A's Retry-After has passed. With a file per host
    (no URL), B sends at once: each host would have its own budget."""
    url = _flushed(request.getfixturevalue("redis_server")) if through_redis else None
    a = Host("a", standin, tmp_path / "host-a", url)
    b = Host("b", standin, tmp_path / "host-b", url)
    expected = "RedisState" if through_redis else "FileState"
    assert (a.ready(), b.ready()) == (expected, expected)
    control.add_fault(
        match=GROUPS_TYPES, kind="status", status=429, retry_after=RETRY_AFTER_S, times=1
    )
    a.go()
    deadline = time.monotonic() + 10
    while not any(r["status"] == 429 for r in control.requests_log()):
        assert time.monotonic() < deadline, "no 429 arrived"
        time.sleep(0.01)
    b.go()
    result_a, result_b = a.finish(), b.finish()

    log = sorted(api_requests(control.requests_log()), key=lambda r: r["ts"])
    t429 = next(r["ts"] for r in log if r["status"] == 429)
    [b_sent] = [r["ts"] for r in log if r["query"].get("who") == "b"]
    a_retry = next(r["ts"] for r in log if r["query"].get("who") == "a" and r["status"] == 200)
    held = b_sent - result_b["asked"]  # B's measured wait, from its ask to the stand-in's log
    seen = f"B asked {result_b['asked'] - t429:.3f}s after the 429 and waited {held:.3f}s"
    assert result_b["asked"] - t429 < 1.0, seen  # B asked well inside A's Retry-After
    assert a_retry - t429 >= RETRY_AFTER_S - 0.02, result_a  # A itself waited, either way
    gate_files = sorted(p.relative_to(tmp_path).parts[0] for p in tmp_path.glob("*/gates/*"))
    if through_redis:
        assert b_sent - t429 >= RETRY_AFTER_S - 0.02, seen
        assert gate_files == []  # nothing on either host's disk: the gate is in Redis
    else:
        assert b_sent - t429 < 1.0 and held < 0.5, seen
        assert b_sent < a_retry, seen  # B reached PostHog inside A's Retry-After
        assert gate_files == ["host-a", "host-b"]  # one budget per host


PASSWORD = "s3cret-redis-pw"


@pytest.mark.parametrize("source", ["field", "env"])
def test_an_unreachable_redis_fails_naming_the_setting_never_the_url(
    source: str,
    standin: StandinProcess,
    control: StandinControl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A closed port behind a URL with a password: the step fails before any request, the error
    names the setting, and neither the URL nor its password is in any log or error."""
    url = f"redis://worker:{PASSWORD}@127.0.0.1:{free_port()}/0"
    monkeypatch.delenv(ENV_RATE_LIMIT_URL, raising=False)
    if source == "env":
        monkeypatch.setenv(ENV_RATE_LIMIT_URL, url)
        resource = make_resource(standin, tmp_path / "exports")
    else:
        resource = make_resource(standin, tmp_path / "exports", rate_limit_url=url)

    @dg.asset
    def probe(posthog: PostHogResource) -> None:
        posthog.get_client().list_group_types()

    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [probe], resources={"posthog": resource}, instance=instance, raise_on_error=False
        )
        logs = repr(list(instance.all_logs(result.run_id)))
    [failure] = [e for e in result.all_events if e.is_step_failure]
    error = failure.step_failure_data.error
    assert error is not None
    assert "rate_limit_url or $POSTHOG_ASSETS_RATE_LIMIT_URL" in error.to_string()
    assert "SharedStateUnavailable" in error.to_string()
    assert [r for r in control.requests_log() if "/api/" in r["path"]] == []

    client = resource.get_client()
    with pytest.raises(SharedStateUnavailable) as direct:
        client.list_group_types()
    texts = [logs, caplog.text, error.to_string(), str(direct.value), repr(direct.value),
             repr(resource), repr(client.gate.state)]  # fmt: skip
    for text in texts:
        assert PASSWORD not in text and url not in text
    assert "redis://***@127.0.0.1:" in str(direct.value)  # where it looked, redacted


@pytest.mark.unit
def test_the_redis_url_is_secret_checked_and_the_env_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Field, else env, else the machine's file; off means in memory. The value is a secret
    field, out of the repr, and a bad scheme is refused naming the field, not showing it."""
    monkeypatch.delenv(ENV_RATE_LIMIT_URL, raising=False)
    fields = PostHogResource.to_config_schema().as_field().config_type.fields
    assert fields["rate_limit_url"].is_secret and not fields["rate_limit_url"].is_required

    def gate(**overrides: Any) -> Any:
        base = {"host": REDIS_HOST, "project_id": "1", "personal_api_key": REDIS_KEY}
        return PostHogResource(**{**base, **overrides}).get_client().gate.state

    assert isinstance(gate(), FileState)
    assert gate().path == shared_state_path(REDIS_HOST, REDIS_KEY)
    assert isinstance(gate(shared_rate_limit=False, rate_limit_url="redis://h:1/0"), MemoryState)
    monkeypatch.setenv(ENV_RATE_LIMIT_URL, "redis://:pw@env-host:6379/0")
    assert gate().where == "redis://***@env-host:6379/0"
    assert gate(rate_limit_url="********").where == "redis://***@env-host:6379/0"  # UI mask
    assert gate(rate_limit_url="rediss://field-host:6380/1").where == "rediss://field-host:6380/1"
    assert gate(rate_limit_url="unix:///run/redis.sock").where == "unix:///run/redis.sock"

    resource = PostHogResource(host=REDIS_HOST, project_id="1", personal_api_key=REDIS_KEY,
                               rate_limit_url="redis://:pw@cache:6379/0")  # fmt: skip
    assert "pw@cache" not in repr(resource)
    with pytest.raises(ValueError, match="rate_limit_url") as err:  # refused where written
        PostHogResource(host=REDIS_HOST, project_id="1", personal_api_key=REDIS_KEY,
                        rate_limit_url="http://:pw@cache:6379/0")  # fmt: skip
    assert "pw@cache" not in str(err.value)
    monkeypatch.setenv(ENV_RATE_LIMIT_URL, "cache:6379")
    with pytest.raises(ValueError, match=r"\$POSTHOG_ASSETS_RATE_LIMIT_URL"):
        gate()

    state = MemoryState()  # the client takes a state object as it is, or a path
    assert PostHogClient(REDIS_HOST, 1, REDIS_KEY, rate_limit_state=state).gate.state is state
    by_path = PostHogClient(REDIS_HOST, 1, REDIS_KEY, rate_limit_state=tmp_path / "g.json")
    assert isinstance(by_path.gate.state, FileState)


@pytest.mark.unit
def test_the_http_layer_imports_without_redis() -> None:
    code = "import sys, posthog_assets.api.client\nprint('redis' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

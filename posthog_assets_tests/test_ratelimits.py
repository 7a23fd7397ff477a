"""Rate limits: PostHog's per-key sliding windows (the stand-in's real ones, made small and fast).

Why: PostHog Cloud throttles every personal API key with DRF sliding logs (insights and query:
240/min + 1200/h; everything else 480/min + 4800/h), and once a window is full ``Retry-After`` can
be close to an hour. The client keeps the same log of what it sent and holds requests back until
PostHog would accept them; a 429 anyway pauses every thread and process using the key. Steps of
one Dagster run can be separate processes, so the log lives in a locked state file
(:class:`posthog_assets.ratelimit.FileState`); these tests show it holds across real processes.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from posthog_assets.api.client import PostHogClient, RetrySettings
from posthog_assets.api.errors import PostHogRateLimitError
from posthog_assets.api.ratelimit import (
    DEFAULT,
    INSIGHTS,
    MAX_BLOCK_S,
    FileState,
    GateWaitTooLong,
    RequestGate,
    Window,
    parse_rate,
    shared_state_path,
    throttle_class,
)
from posthog_assets.standin.server import StandinControl, StandinProcess
from posthog_assets_tests.support.reliability import (
    SNAPSHOT_NAMES,
    Reference,
    api_requests,
    build_world,
    failure_texts,
    fast_resource,
    shared_reference,
    standin_env,
    table_rows,
    wait_violations,
)

pytestmark = pytest.mark.integration

#: Small windows so throttling happens within a second (PostHog's are per minute and hour).
SNAPSHOT_LIMITS = {"burst": "20/second", "clickhouse_burst": "10/second"}
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
    control.configure(rate_limits=True, rate_limit_overrides=SNAPSHOT_LIMITS)
    world = build_world(standin_env(standin, tmp_path), tmp_path)
    resource = fast_resource(
        standin,
        world.export_dir,
        max_attempts=10,
        retry_budget_s=60,
        pace_requests=paced,
        insight_rate_limits=["10/second"],
        default_rate_limits=["20/second"],
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
from posthog_assets.api.ratelimit import DEFAULT, parse_rate
url, pid, key, state, rate, n, start = sys.argv[1:8]
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
    standin: StandinProcess, state: Path | None, rate: str, n: int, start: float
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


@pytest.mark.parametrize("shared", [True, False], ids=["shared_log", "per_process_log"])
@pytest.mark.system  # real processes
def test_client_budget_is_shared_by_processes_using_one_key(
    shared: bool, standin: StandinProcess, control: StandinControl, tmp_path: Path
) -> None:
    """Three processes, 30 requests each, against a 40/second window: only a shared log fits."""
    control.configure(rate_limits=True, rate_limit_overrides={"burst": "40/second"})
    state = shared_state_path(standin.url, standin.key, tmp_path) if shared else None
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
    assert throttle_class("/api/projects/1/query/cache_abc/") == INSIGHTS
    assert throttle_class("/api/projects/1/exports/") == DEFAULT
    assert throttle_class("/api/projects/1/groups/") == DEFAULT
    assert parse_rate("240/minute") == Window(240, 60.0)
    with pytest.raises(ValueError, match="240/minute"):
        parse_rate("fast")


def test_bad_rate_settings_are_refused_naming_the_field(standin: StandinProcess) -> None:
    resource = fast_resource(standin, Path("unused"), insight_rate_limits=["lots/minute"])
    with pytest.raises(ValueError, match="insight_rate_limits"):
        resource.validate_settings()

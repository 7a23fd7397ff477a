"""Rate limits: PostHog's per-key token buckets (the stand-in's real ones, made small and fast).

Why: PostHog Cloud throttles every personal API key (480/min, 240/min for insights). A snapshot
must finish anyway, wait as long as ``Retry-After`` says, and never send a request while the last
answer said to wait, since each such request extends the penalty. Steps of one Dagster run can be
separate processes (multiprocess executor), so the client's budget is shared through a locked
state file (:class:`posthog_assets.ratelimit.SharedRequestGate`); these tests show it holds across
real processes and that without it the same load is throttled.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from posthog_assets.client import PostHogClient, RetrySettings
from posthog_assets.ratelimit import (
    ENV_RATE_LIMIT_DIR,
    MAX_BLOCK_S,
    SharedRequestGate,
    shared_state_path,
)
from posthog_assets.standin.server import StandinControl, StandinProcess
from posthog_assets_tests.reliability_support import (
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

#: Small buckets so throttling happens within a second: capacity N, refilled N per second.
SNAPSHOT_LIMITS = {"burst": "20/second", "clickhouse_burst": "10/second"}
#: Below both buckets (15/s with a one-second burst of 15).
PACED_RPM = 900.0
GROUPS_TYPES = r"/groups_types"


@pytest.fixture(scope="module")
def reference(standin: StandinProcess, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return shared_reference(standin, tmp_path_factory)


@pytest.fixture(autouse=True)
def private_gate_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own shared-gate folder, so no pause leaks between tests."""
    folder = tmp_path / "gates"
    monkeypatch.setenv(ENV_RATE_LIMIT_DIR, str(folder))
    return folder


# ------------------------------------------------------------------------------------------------
# A whole snapshot under real limits


@pytest.mark.parametrize("paced", [False, True], ids=["retry_after_only", "client_budget"])
def test_full_snapshot_completes_under_real_token_buckets(
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
        requests_per_minute=PACED_RPM if paced else None,
    )

    result = world.materialize(SNAPSHOT_NAMES, resource, checks=False)

    log = control.requests_log()
    throttled = [r for r in api_requests(log) if r["status"] == 429]
    assert result.success, failure_texts(result)
    for family in SNAPSHOT_NAMES:  # nothing lost or duplicated by the throttling
        assert table_rows(world.db, family) == reference.rows[family], family
    # Stand-in 429s always say Retry-After: 1 (whole seconds, rounded up).
    assert wait_violations(log, retry_after_s=1.0) == []
    if paced:
        assert throttled == [], f"{len(throttled)} requests throttled despite the client budget"
    else:
        assert len(throttled) >= 2, "the buckets never bit: the test proves nothing"


# ------------------------------------------------------------------------------------------------
# The budget across processes

HAMMER = """
import json, sys, time
from posthog_assets.client import PostHogClient, RetrySettings
url, pid, key, state, rpm, n, start = sys.argv[1:8]
client = PostHogClient(
    url, int(pid), key, requests_per_minute=float(rpm) or None, rate_limit_state=state or None,
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
    standin: StandinProcess, state: Path | None, rpm: float, n: int, start: float
) -> subprocess.Popen[str]:
    args = [standin.url, str(standin.project_id), standin.key, str(state or ""), str(rpm),
            str(n), str(start)]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-c", HAMMER, *args], stdout=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("shared", [True, False], ids=["shared_budget", "per_process_budget"])
def test_client_budget_is_shared_by_processes_using_one_key(
    shared: bool, standin: StandinProcess, control: StandinControl, tmp_path: Path
) -> None:
    """Three processes at 30 req/s each against a 40 req/s bucket: only a shared budget fits."""
    control.configure(rate_limits=True, rate_limit_overrides={"burst": "40/second"})
    state = shared_state_path(standin.url, standin.key, tmp_path) if shared else None
    start = time.time() + 1.5  # all three begin together, after their imports
    procs = [_hammer(standin, state, rpm=1800, n=30, start=start) for _ in range(3)]
    results = [_finish(p) for p in procs]

    log = [r for r in api_requests(control.requests_log()) if "groups_types" in r["path"]]
    throttled = [r for r in log if r["status"] == 429]
    assert sum(1 for r in log if r["status"] == 200) == 90
    if shared:
        assert throttled == []
        assert sum(r["requests"] for r in results) == 90  # not one retry needed
        span = max(r["ts"] for r in log) - min(r["ts"] for r in log)
        assert span >= (90 - 30) / 30 * 0.9, f"90 requests at a shared 30/s took only {span:.2f}s"
    else:
        assert throttled, "three separate 30/s budgets should overrun a 40/s bucket"


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

    other = _finish(_hammer(standin, state, rpm=0, n=1, start=0))
    waiter.join(timeout=10)
    first.close()

    log = sorted(api_requests(control.requests_log()), key=lambda r: r["ts"])
    t429 = next(r["ts"] for r in log if r["status"] == 429)
    after = [r["ts"] - t429 for r in log if r["ts"] > t429]
    assert len(after) == 2 and min(after) >= 2.0 - 0.02, after  # both waited the full 2 s
    assert other["first"] - t429 < 1.5  # the other process was ready to send long before


# ------------------------------------------------------------------------------------------------
# The shared gate and the wait check on their own (no network)


def test_a_negative_pace_is_refused_naming_the_field(standin: StandinProcess) -> None:
    resource = fast_resource(standin, Path("unused"), requests_per_minute=-60)
    with pytest.raises(ValueError, match="requests_per_minute must be greater than 0"):
        resource.validate_settings()


def test_wait_check_flags_a_request_sent_while_told_to_wait() -> None:
    """The log check used above really catches a client that ignores Retry-After."""
    log = [
        {"server": "api", "path": "/api/projects/1/groups/", "status": 429, "ts": 100.0},
        {"server": "api", "path": "/api/projects/1/groups/", "status": 200, "ts": 100.05},
        {"server": "api", "path": "/api/projects/1/groups/", "status": 429, "ts": 100.4},
        {"server": "api", "path": "/api/projects/1/groups/", "status": 200, "ts": 101.5},
    ]
    flagged = wait_violations(log, retry_after_s=1.0)
    assert [(t, r["ts"]) for t, r in flagged] == [(100.0, 100.4)]  # in flight (100.05) is fine


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


def test_gates_on_one_file_share_pauses_and_tokens(tmp_path: Path) -> None:
    t = FakeTime()
    path = shared_state_path("https://us.posthog.com", "phx_secret_key", tmp_path)
    a = SharedRequestGate(path, 120, clock=t.clock, sleep=t.sleep)  # 2/s, burst of 2
    b = SharedRequestGate(path, 120, clock=t.clock, sleep=t.sleep)
    assert "phx_secret_key" not in path.name and "us.posthog" not in path.name
    assert a.wait() == 0 and b.wait() == 0  # the shared burst of two
    assert b.wait() == pytest.approx(0.5)  # the third waits for a token, whoever asks
    a.block_for(3.0)
    assert b.wait() == pytest.approx(3.0)
    assert b.not_before() == pytest.approx(a.not_before())


def test_a_corrupt_or_absurd_state_file_never_blocks_a_run(tmp_path: Path) -> None:
    t = FakeTime()
    path = tmp_path / "gate.json"
    path.write_text("{not json")
    gate = SharedRequestGate(path, None, clock=t.clock, sleep=t.sleep)
    assert gate.wait() == 0
    path.write_text(json.dumps({"not_before": t.now + 10 * MAX_BLOCK_S}))
    assert gate.wait() == 0  # a clock jump or a broken writer: ignored, not hours of waiting
    gate.block_for(10 * MAX_BLOCK_S)
    assert gate.not_before() <= t.now + MAX_BLOCK_S
    fresh = SharedRequestGate(tmp_path / "new" / "gate.json", None, clock=t.clock, sleep=t.sleep)
    fresh.block_for(1)
    assert oct(fresh.path.stat().st_mode & 0o777) == oct(0o600)  # other users cannot read it
    assert oct(fresh.path.parent.stat().st_mode & 0o777) == oct(0o700)

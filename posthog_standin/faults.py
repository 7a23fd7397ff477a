"""Fault injection rules and PostHog's per-key throttles.

Both are tiny state machines the app consults before running a handler: a matching fault rule
replaces (or delays) the normal answer, and a full request log turns the request into a 429.
"""

from __future__ import annotations

import random
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

FAULT_KINDS = ("status", "drop", "drop_mid_body", "slow")


@dataclass
class FaultRule:
    """One injected fault; ``times=None`` fires forever, ``probability`` fires a seeded fraction."""

    id: int
    match: str
    method: str | None
    kind: str
    status: int = 503
    retry_after: float | None = None
    body: Any = None
    delay_s: float = 2.0
    times: int | None = None
    probability: float | None = None
    seed: int | None = None
    fired: int = 0
    _pattern: re.Pattern[str] = field(init=False, repr=False)
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {FAULT_KINDS}, not {self.kind!r}")
        if self.method is not None:
            self.method = self.method.upper()
        if self.probability is not None and not 0 <= self.probability <= 1:
            raise ValueError("probability must be between 0 and 1")
        self._pattern = re.compile(self.match)
        self._rng = random.Random(self.seed)

    @classmethod
    def from_json(cls, rule_id: int, data: dict[str, Any]) -> FaultRule:
        allowed = {
            "match", "method", "kind", "status", "retry_after", "body", "delay_s", "times",
            "probability", "seed",
        }  # fmt: skip
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        if "kind" not in data:
            raise ValueError("a fault needs 'kind'")
        return cls(
            id=rule_id,
            match=str(data.get("match") or ".*"),
            method=data.get("method"),
            kind=data["kind"],
            status=int(data.get("status") or 503),
            retry_after=None if data.get("retry_after") is None else float(data["retry_after"]),
            body=data.get("body"),
            delay_s=float(data.get("delay_s", 2.0)),
            times=None if data.get("times") is None else int(data["times"]),
            probability=None if data.get("probability") is None else float(data["probability"]),
            seed=data.get("seed"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "match": self.match,
            "method": self.method,
            "kind": self.kind,
            "status": self.status,
            "retry_after": self.retry_after,
            "body": self.body,
            "delay_s": self.delay_s,
            "times": self.times,
            "probability": self.probability,
            "seed": self.seed,
            "fired": self.fired,
        }

    def applies(self, method: str, path: str) -> bool:
        """Whether this request gets the fault; consumes one of ``times`` when it does."""
        if self.times is not None and self.times <= 0:
            return False
        if self.method is not None and self.method != method:
            return False
        if not self._pattern.search(path):
            return False
        if self.probability is not None and self._rng.random() >= self.probability:
            return False
        if self.times is not None:
            self.times -= 1
        self.fired += 1
        return True


class FaultBook:
    """The active rules, consulted in the order they were added; the first that applies wins."""

    def __init__(self) -> None:
        self.rules: list[FaultRule] = []
        self._next_id = 1

    def add(self, data: dict[str, Any]) -> FaultRule:
        rule = FaultRule.from_json(self._next_id, data)
        self._next_id += 1
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules.clear()

    def pick(self, method: str, path: str) -> FaultRule | None:
        for rule in self.rules:
            if rule.applies(method, path):
                return rule
        return None


# ---- throttling -----------------------------------------------------------------------------

#: PostHog's throttle scopes and their rates (``posthog/rate_limit.py``: ``BurstRateThrottle``,
#: ``SustainedRateThrottle``, ``ClickHouseBurstRateThrottle``, ``ClickHouseSustainedRateThrottle``,
#: ``HogQLQueryThrottle``, ``APIQueriesBurstThrottle``, ``APIQueriesSustainedThrottle``).
DEFAULT_RATES: dict[str, str] = {
    "burst": "480/minute",
    "sustained": "4800/hour",
    "clickhouse_burst": "240/minute",
    "clickhouse_sustained": "1200/hour",
    "query": "120/hour",
    "api_queries_burst": "240/minute",
    "api_queries_sustained": "2400/hour",
}
_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_rate(rate: str) -> tuple[int, float]:
    """DRF's rate syntax: ``"<count>/<period>"`` where only the period's first letter counts."""
    count_text, _, period = rate.partition("/")
    count = int(count_text)
    if count <= 0 or not period or period[0] not in _PERIODS:
        raise ValueError(f"bad rate {rate!r}; use e.g. '480/min', '5/second', '4800/hour'")
    return count, float(_PERIODS[period[0]])


class RateLimiter:
    """DRF's ``SimpleRateThrottle`` for every scope, per key ident: a log of request times.

    ``allow_request`` drops the entries older than the window; the request fails if as many as
    ``num_requests`` remain, else its time is recorded. ``APIView.check_throttles`` asks every
    throttle of the view, so a request one scope refuses is still recorded by the scopes that
    allow it, and the answer waits for the longest of the refusing scopes' ``wait()``.
    """

    def __init__(self, overrides: dict[str, str] | None = None) -> None:
        self.rates: dict[str, tuple[int, float]] = {}
        self.logs: dict[tuple[str, str], deque[float]] = {}
        self.configure(overrides or {})

    def configure(self, overrides: dict[str, str]) -> None:
        """New rates; the logs stay (DRF keeps its history in the cache whatever the rate)."""
        unknown = set(overrides) - set(DEFAULT_RATES)
        if unknown:
            raise ValueError(
                f"unknown throttle scopes {sorted(unknown)}; known: {list(DEFAULT_RATES)}"
            )
        merged = {**DEFAULT_RATES, **overrides}
        self.rates = {scope: parse_rate(rate) for scope, rate in merged.items()}

    def check(self, ident: str, scopes: tuple[str, ...], now: float) -> tuple[bool, float | None]:
        """``(allowed, wait)``; ``wait`` is the longest refusing scope's wait in seconds, or
        ``None`` when none of them can say (more requests logged than the rate now allows)."""
        waits: list[float | None] = []
        for scope in scopes:
            num_requests, duration = self.rates[scope]
            log = self.logs.setdefault((ident, scope), deque())
            while log and log[0] <= now - duration:
                log.popleft()
            if len(log) >= num_requests:
                available = num_requests - len(log) + 1
                remaining = duration - (now - log[0])
                waits.append(remaining / available if available > 0 else None)
            else:
                log.append(now)
        if not waits:
            return True, None
        known = [w for w in waits if w is not None]
        return False, max(known) if known else None

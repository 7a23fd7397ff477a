"""Client-side pacing shared by every thread that uses one :class:`PostHogClient`.

PostHog limits each personal API key (480/min for most routes, 240/min for insights). When one
thread is told to wait (429 + ``Retry-After``) the others must wait too, or they burn the budget
and extend the penalty; an optional token bucket keeps a busy run under the limit to begin with.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RequestGate:
    """Blocks callers until a shared "not before" instant, optionally paced by a token bucket."""

    def __init__(
        self,
        requests_per_minute: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self._not_before = 0.0
        self._rate = (requests_per_minute / 60.0) if requests_per_minute else None
        self._capacity = max(1.0, (requests_per_minute or 0) / 60.0 * 5)  # ~5 s of burst
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

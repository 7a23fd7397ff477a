"""How long to wait between polls of PostHog, and when to give up: one policy for exports
(``GET /exports/:id/``) and async insight calculations (re-reads of the insights list).

Finite by design: an integration that polls without a timeout hangs forever the day PostHog
loses a job. No Dagster here.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_POLL_MAX_INTERVAL_S = 15.0
DEFAULT_POLL_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class PollPolicy:
    """Waits of ``interval_s`` growing by ``factor`` up to ``max_interval_s`` (each +/- a
    ``jitter`` fraction), for at most ``timeout_s`` in all."""

    interval_s: float = DEFAULT_POLL_INTERVAL_S
    max_interval_s: float = DEFAULT_POLL_MAX_INTERVAL_S
    timeout_s: float = DEFAULT_POLL_TIMEOUT_S
    factor: float = 1.5
    jitter: float = 0.2

    def __post_init__(self) -> None:
        for name in ("interval_s", "max_interval_s", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than 0, got {getattr(self, name)}")

    def waits(self, rng: random.Random | None = None) -> Iterator[float]:
        """The successive waits, without end (the caller stops at ``timeout_s``)."""
        rng = rng or random.Random()
        interval = self.interval_s
        while True:
            yield interval * (1.0 + rng.uniform(-self.jitter, self.jitter))
            interval = min(interval * self.factor, max(self.interval_s, self.max_interval_s))

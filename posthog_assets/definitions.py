"""The code location: every asset, check, sensor, schedule, job and resource, built from config.

Loading reads ``posthog_assets.yaml`` and the env vars only; it makes no HTTP call.
"""

from __future__ import annotations

from posthog_assets.build import ALL_ASSETS_JOB, build_posthog_definitions
from posthog_assets.config import load_settings

__all__ = ["ALL_ASSETS_JOB", "defs", "settings"]

settings = load_settings()
defs = build_posthog_definitions(settings)

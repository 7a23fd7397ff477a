"""Dagster assets for PostHog: exports, insight snapshots and groups, with sensors and checks.

The public API, imported lazily so that the HTTP layer (``posthog_assets.api``) and the stand-in
load without Dagster:

- ``PostHogProjectComponent``: a PostHog project in a ``defs.yaml`` (``dg scaffold defs``);
- ``build_posthog_assets_definitions``: the same definitions from Python;
- ``ProjectConfig``, ``ExportConfig``, ``InsightsConfig``, ``GroupsConfig``: what they take;
- ``PostHogResource``, ``DagsterPostHogTranslator``, ``PostHogClient``.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC: dict[str, str] = {
    "PostHogProjectComponent": "posthog_assets.component.component",
    "build_posthog_assets_definitions": "posthog_assets.build",
    "ProjectConfig": "posthog_assets.config",
    "ExportConfig": "posthog_assets.config",
    "InsightsConfig": "posthog_assets.config",
    "GroupsConfig": "posthog_assets.config",
    "PostHogResource": "posthog_assets.resources",
    "DagsterPostHogTranslator": "posthog_assets.translator",
    "PostHogClient": "posthog_assets.api.client",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'posthog_assets' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

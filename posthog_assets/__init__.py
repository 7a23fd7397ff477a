"""Dagster assets for PostHog: exports, insight snapshots, groups, events and persons, with
sensors, schedules and checks.

The public API, imported lazily so that the HTTP layer (``posthog_assets.api``) and the stand-in
load without Dagster:

- ``PostHogProjectComponent``: a PostHog project in a ``defs.yaml`` (``dg scaffold defs``);
- ``build_posthog_assets_definitions``: the same definitions from Python;
- ``load_definitions_from_yaml``: a file in ``defs.yaml``'s format, for a deployment without ``dg``;
- ``PostHogProject``, ``ExportConfig``, ``InsightsConfig``, ``GroupsConfig``, ``EventsConfig``,
  ``PersonsConfig``: what they take;
- ``PostHogResource``, ``DagsterPostHogTranslator``, ``PostHogClient``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each is imported on first use
    from posthog_assets.api.client import PostHogClient
    from posthog_assets.build import build_posthog_assets_definitions
    from posthog_assets.component.component import PostHogProjectComponent
    from posthog_assets.component.yaml_file import load_definitions_from_yaml
    from posthog_assets.config import (
        EventsConfig,
        ExportConfig,
        GroupsConfig,
        InsightsConfig,
        PersonsConfig,
        PostHogProject,
    )
    from posthog_assets.resources import PostHogResource
    from posthog_assets.translator import DagsterPostHogTranslator

try:
    __version__ = version("posthog-assets")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_PUBLIC: dict[str, str] = {
    "PostHogProjectComponent": "posthog_assets.component.component",
    "build_posthog_assets_definitions": "posthog_assets.build",
    "load_definitions_from_yaml": "posthog_assets.component.yaml_file",
    "PostHogProject": "posthog_assets.config",
    "ExportConfig": "posthog_assets.config",
    "InsightsConfig": "posthog_assets.config",
    "GroupsConfig": "posthog_assets.config",
    "EventsConfig": "posthog_assets.config",
    "PersonsConfig": "posthog_assets.config",
    "PostHogResource": "posthog_assets.resources",
    "DagsterPostHogTranslator": "posthog_assets.translator",
    "PostHogClient": "posthog_assets.api.client",
}

__all__ = [
    "DagsterPostHogTranslator",
    "EventsConfig",
    "ExportConfig",
    "GroupsConfig",
    "InsightsConfig",
    "PersonsConfig",
    "PostHogClient",
    "PostHogProject",
    "PostHogProjectComponent",
    "PostHogResource",
    "__version__",
    "build_posthog_assets_definitions",
    "load_definitions_from_yaml",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'posthog_assets' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""A ``defs.yaml``-format file as definitions, for deployments without ``dg``.

The file holds one document per project, each exactly what a ``defs.yaml`` holds (``type:`` and
``attributes:``), and goes through the component's own model: one configuration language. Without
``dg`` there is no stored state, so exports are named by numeric id (``insight: 42``,
``dashboard: 7``); a selection by tag, name or filter says to use ``dg``.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import yaml
from dagster.components.resolved.errors import ResolutionException

from posthog_assets.build import build_project_definitions
from posthog_assets.component.component import PostHogProjectComponent
from posthog_assets.component.selection import needs_state
from posthog_assets.config import ENV_CONFIG, PostHogProject

COMPONENT_TYPES = frozenset({"posthog_assets.PostHogProjectComponent", "PostHogProjectComponent"})


class ConfigFileError(ValueError):
    """The file cannot be read as PostHog projects; the message names the file and document."""


def load_definitions_from_yaml(path: str | os.PathLike[str] | None = None) -> dg.Definitions:
    """Every project of the file (default: the file ``POSTHOG_ASSETS_CONFIG`` names) as one
    ``dg.Definitions``. Makes no HTTP call.

    Example:
        .. code-block:: python

            # definitions.py of a code location without dg
            from posthog_assets import load_definitions_from_yaml

            defs = load_definitions_from_yaml("posthog.yaml")

    Raises:
        ConfigFileError: The file is missing, not YAML, or a document is not a valid project
            (the message names the document and the field).
    """
    given = str(path or os.environ.get(ENV_CONFIG) or "")
    if not given:
        raise ConfigFileError(f"no configuration file: give a path or set {ENV_CONFIG}")
    try:
        documents = [d for d in yaml.safe_load_all(Path(given).read_text(encoding="utf-8")) if d]
    except FileNotFoundError:
        raise ConfigFileError(f"{given}: configuration file not found ({ENV_CONFIG})") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{given}: not valid YAML: {exc}") from None
    if not documents:
        raise ConfigFileError(f"{given}: no project (write one document per project)")
    seen: dict[str, str] = {}
    parts = []
    for index, document in enumerate(documents):
        label = f"{given}, document {index + 1}" if len(documents) > 1 else given
        component = _component(document, label)
        name = component.project.name
        if name in seen:
            raise ConfigFileError(
                f"{label} and {seen[name]} both configure the project named '{name}': give one "
                "of them another project.name"
            )
        seen[name] = label
        project = _project(component, label)
        parts.append(
            build_project_definitions(
                project, translator=component.translator, execute=component.execute
            )
        )
    return dg.Definitions.merge(*parts)


def _component(document: object, label: str) -> PostHogProjectComponent:
    if not isinstance(document, dict) or document.get("type") not in COMPONENT_TYPES:
        raise ConfigFileError(
            f"{label}: each document is a defs.yaml: 'type: posthog_assets.PostHogProjectComponent'"
            " and 'attributes:'"
        )
    extra = sorted(set(document) - {"type", "attributes"})
    if extra:
        raise ConfigFileError(f"{label}: '{extra[0]}' is not a defs.yaml key (type, attributes)")
    attributes = document.get("attributes") or {}
    unknown = sorted(set(attributes) - set(PostHogProjectComponent.model_fields))
    if not isinstance(attributes, dict) or unknown:
        raise ConfigFileError(
            f"{label}: attributes"
            + (
                f", field '{unknown[0]}': not a known field (a typo?)"
                if unknown
                else " is not a mapping"
            )
            + f" (the fields are: {', '.join(PostHogProjectComponent.model_fields)})"
        )
    try:
        return PostHogProjectComponent.resolve_from_yaml(yaml.safe_dump(attributes))
    except (ResolutionException, dg.DagsterError, ValueError) as exc:
        raise ConfigFileError(f"{label}: {getattr(exc, 'message', None) or exc}") from None


def _project(component: PostHogProjectComponent, label: str) -> PostHogProject:
    needing = [
        f"exports[{i}] ({e.describe()})" for i, e in enumerate(component.exports) if needs_state(e)
    ]
    if needing:
        raise ConfigFileError(
            f"{label}: {needing[0]} selects by name, tag or filter, which needs the stored state "
            "`dg utils refresh-defs-state` writes; without dg, name exports by numeric id "
            "(insight: 42, dashboard: 7)"
        )
    try:
        return component.build_project(None, where=label)
    except ValueError as exc:
        raise ConfigFileError(str(exc)) from None

"""Configuration files of the YAML route (``POSTHOG_ASSETS_CONFIG``), written from Python values.

The file holds one document per project, each exactly what a ``defs.yaml`` holds (``type:`` and
``attributes:``). The harnesses that start the code location with such a file (bad input, crash
safety, secrets, Celery) write it here, so every one of them speaks the same format. Without
``dg`` there is no stored state: exports name their object by numeric id.

Paths: the code location reads no path variable on its own. A document names its DuckDB file and
its export folder; by default it names them through the env contract the tests set
(``POSTHOG_ASSETS_DUCKDB``, ``POSTHOG_ASSETS_EXPORT_DIR``: :func:`support.session.standin_env`),
as the shipped ``defs.yaml`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from posthog_assets.component.component import PostHogProjectComponent
from posthog_assets.config import PostHogProject

COMPONENT = "posthog_assets.PostHogProjectComponent"
#: The DuckDB file and the export folder as the shipped defs.yaml names them: read from the
#: environment when the definitions load.
DUCKDB_FROM_ENV = "{{ env('POSTHOG_ASSETS_DUCKDB', 'data/posthog.duckdb') }}"
EXPORT_DIR_FROM_ENV = "{{ env('POSTHOG_ASSETS_EXPORT_DIR', 'data/exports') }}"


def project_document(
    *,
    exports: Sequence[Mapping[str, Any]] = (),
    insights: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
    project: Mapping[str, Any] | None = None,
    duckdb_path: str | Path = DUCKDB_FROM_ENV,
    export_dir: str | Path = EXPORT_DIR_FROM_ENV,
    **attributes: Any,
) -> dict[str, Any]:
    """One project as a document: ``exports`` entries as the component takes them
    (``{"insight": 1, "format": "image/png", "name": "weekly_png"}``), ``project`` any resource
    field (host, project id and key come from the environment when left out), ``attributes``
    anything else of ``defs.yaml`` (``translation``, ...)."""
    body: dict[str, Any] = {
        "project": {"export_dir": str(export_dir), **dict(project or {})},
        "exports": [dict(e) for e in exports],
        "duckdb_path": str(duckdb_path),
    }
    if insights is not None:
        body["insights"] = dict(insights)
    if groups is not None:
        body["groups"] = dict(groups)
    body.update(attributes)
    return {"type": COMPONENT, "attributes": body}


def config_text(*documents: Mapping[str, Any]) -> str:
    """The documents as one file, ``---`` between them."""
    return yaml.safe_dump_all([dict(d) for d in documents], sort_keys=False)


def write_config_file(path: Path, *documents: Mapping[str, Any]) -> Path:
    """Write the documents (at least one) to ``path``; returns ``path``."""
    assert documents, "a configuration file holds at least one project"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_text(*documents), encoding="utf-8")
    return path


def resolve_document(document: Mapping[str, Any], where: str | Path) -> PostHogProject:
    """The project a document describes, resolved by the component's own model as the YAML
    route resolves it (no stored state: exports by numeric id), for tests that build assets
    from it with the package's factories; ``where`` is how messages name it."""
    component = PostHogProjectComponent.resolve_from_yaml(yaml.safe_dump(document["attributes"]))
    return component.build_project(None, where=str(where))

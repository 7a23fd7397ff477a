"""Group snapshots: group types, every group, property definitions and values, tracked groups.

Each asset is a fetch step (API, stages rows to disk page by page) and a write step (one DuckDB
transaction). A groups snapshot **replaces** the project's previous snapshot in its table: these
tables hold the latest state (with ``snapshot_at`` saying when it was taken), not a history. Groups
are big and change slowly; history is what the daily insights snapshots are for.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from posthog_assets.client import PostHogClient
from posthog_assets.config import ResolvedProject
from posthog_assets.resources import PostHogResource
from posthog_assets.snapshot_store import (
    DescribeFn,
    SnapshotTable,
    StagedSnapshot,
    StagingFile,
    build_snapshot_asset,
    project_id_of,
    utc_now_iso,
)
from posthog_assets.translator import (
    DagsterPostHogTranslator,
    PostHogMetadataSet,
    PostHogSnapshotProps,
    SnapshotKind,
)

DEFAULT_TYPE_CONCURRENCY = 5
DEFAULT_PROPERTY_VALUES_CONCURRENCY = 4

GROUP_TYPES_TABLE = SnapshotTable(
    name="group_types",
    columns={
        "project_id": "VARCHAR",
        "snapshot_at": "TIMESTAMPTZ",
        "group_type_index": "INTEGER",
        "group_type": "VARCHAR",
        "name_singular": "VARCHAR",
        "name_plural": "VARCHAR",
        "detail_dashboard": "BIGINT",
        "default_columns": "JSON",
        "created_at": "TIMESTAMPTZ",
    },
)
GROUPS_TABLE = SnapshotTable(
    name="groups",
    columns={
        "project_id": "VARCHAR",
        "snapshot_at": "TIMESTAMPTZ",
        "group_type_index": "INTEGER",
        "group_key": "VARCHAR",
        "group_properties": "JSON",
        "created_at": "TIMESTAMPTZ",
    },
)
GROUP_PROPERTY_DEFINITIONS_TABLE = SnapshotTable(
    name="group_property_definitions",
    columns={
        "project_id": "VARCHAR",
        "snapshot_at": "TIMESTAMPTZ",
        "group_type_index": "INTEGER",
        "name": "VARCHAR",
        "count": "BIGINT",
    },
)
GROUP_PROPERTY_VALUES_TABLE = SnapshotTable(
    name="group_property_values",
    columns={
        "project_id": "VARCHAR",
        "snapshot_at": "TIMESTAMPTZ",
        "group_type_index": "INTEGER",
        "key": "VARCHAR",
        "value": "VARCHAR",
        "count": "BIGINT",
    },
)
TRACKED_GROUPS_TABLE = SnapshotTable(
    name="tracked_groups",
    columns={
        "project_id": "VARCHAR",
        "snapshot_at": "TIMESTAMPTZ",
        "group_type_index": "INTEGER",
        "group_key": "VARCHAR",
        "found": "BOOLEAN",
        "group_properties": "JSON",
        "created_at": "TIMESTAMPTZ",
        "error": "VARCHAR",
    },
)


class GroupsSnapshotConfig(dg.Config):
    """Per-run settings of the groups snapshot."""

    type_concurrency: int = Field(
        default=DEFAULT_TYPE_CONCURRENCY,
        description="Group types paged at the same time (cursor pages of one type are sequential).",
    )


class GroupPropertyValuesConfig(dg.Config):
    """Per-run settings of the property-values snapshot."""

    max_concurrency: int = Field(
        default=DEFAULT_PROPERTY_VALUES_CONCURRENCY,
        description="Property-values requests in flight at once (PostHog allows 480/min per key).",
    )


# ------------------------------------------------------------------------------------------------
# Fetch logic (plain Python; the Dagster wiring is below)


def group_type_row(item: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "group_type_index": item.get("group_type_index"),
        "group_type": item.get("group_type"),
        "name_singular": item.get("name_singular"),
        "name_plural": item.get("name_plural"),
        "detail_dashboard": item.get("detail_dashboard"),
        "default_columns": item.get("default_columns"),
        "created_at": item.get("created_at"),
    }


def group_row(item: Mapping[str, Any], type_index: int) -> dict[str, Any]:
    return {
        "group_type_index": item.get("group_type_index", type_index),
        "group_key": item.get("group_key"),
        "group_properties": item.get("group_properties"),
        "created_at": item.get("created_at"),
    }


def _value_text(value: Any) -> str | None:
    """Property values are usually strings; numbers, booleans and objects are kept as JSON text."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def type_indexes(client: PostHogClient) -> list[int]:
    return sorted(int(t["group_type_index"]) for t in client.list_group_types())


def stage_groups(
    client: PostHogClient,
    staging: StagingFile,
    indexes: Sequence[int],
    *,
    concurrency: int = DEFAULT_TYPE_CONCURRENCY,
    log: logging.Logger | Any = None,
) -> tuple[dict[str, int], int]:
    """Page through every group of every type (types in parallel); return counts and pages."""
    log = log or logging.getLogger(__name__)
    counts: dict[str, int] = {}
    pages = 0
    lock = threading.Lock()

    def one_type(index: int) -> None:
        nonlocal pages
        n = p = 0
        for page in client.iter_group_pages(index):
            n += staging.write(group_row(g, index) for g in page.get("results") or [])
            p += 1
        with lock:
            counts[str(index)] = n
            pages += p
        log.info("Group type %d: %d groups in %d cursor pages", index, n, p)

    with ThreadPoolExecutor(max(1, min(concurrency, len(indexes) or 1))) as pool:
        for future in [pool.submit(one_type, i) for i in indexes]:
            future.result()
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0]))), pages


def definition_rows(definitions: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``{"0": [{"name", "count"}, ...]}`` (keys are the type index as a string) to rows."""
    rows = []
    for index, entries in definitions.items():
        for entry in entries or []:
            rows.append(
                {
                    "group_type_index": int(index),
                    "name": entry.get("name"),
                    "count": entry.get("count"),
                }
            )
    return rows


def stage_property_values(
    client: PostHogClient,
    staging: StagingFile,
    definitions: Mapping[str, Any],
    *,
    concurrency: int = DEFAULT_PROPERTY_VALUES_CONCURRENCY,
) -> tuple[int, int]:
    """``property_values`` for each defined property, ``concurrency`` requests at a time."""
    pairs = [(int(r["group_type_index"]), str(r["name"])) for r in definition_rows(definitions)]

    def one(pair: tuple[int, str]) -> int:
        index, key = pair
        values = client.group_property_values(index, key)
        return staging.write(
            {
                "group_type_index": index,
                "key": key,
                "value": _value_text(v.get("name")),
                "count": v.get("count"),
            }
            for v in values
        )

    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="posthog-propvals") as pool:
        written = sum(pool.map(one, pairs))
    return len(pairs), written


def tracked_group_row(client: PostHogClient, type_index: int, key: str) -> dict[str, Any]:
    """One tracked group, looked up without side effects (the groups list, exact key match).

    Not ``groups/find``: with PostHog's CRM feature on it creates a Notebook in the customer's
    project for every group it finds, and a daily snapshot would litter the project with them.
    """
    found = client.lookup_group(type_index, key)
    if found is None:
        return {
            "group_type_index": type_index,
            "group_key": key,
            "found": False,
            "error": "not found: no group of this type has this key",
        }
    return {
        "group_type_index": type_index,
        "group_key": key,
        "found": True,
        "group_properties": found.get("group_properties"),
        "created_at": found.get("created_at"),
    }


# ------------------------------------------------------------------------------------------------
# Dagster


#: Stages one table's rows from the API; returns the figures recorded as metadata.
StageFn = Callable[[dg.OpExecutionContext, Any, PostHogClient, StagingFile], Mapping[str, Any]]


def _group_snapshot_asset(
    project: ResolvedProject,
    kind: SnapshotKind,
    translator: DagsterPostHogTranslator,
    table: SnapshotTable,
    stage: StageFn,
    *,
    config_cls: type[dg.Config] | None = None,
    describe: DescribeFn | None = None,
) -> dg.AssetsDefinition:
    """A snapshot asset whose fetch step stages ``table`` with ``stage`` and counts requests."""
    spec = translator.get_asset_spec(PostHogSnapshotProps(project, kind))
    rkey = PostHogMetadataSet.extract(spec.metadata).resource_key or project.resource_key

    def fetch(context: dg.OpExecutionContext, config: Any, folder: Path) -> StagedSnapshot:
        resource: PostHogResource = getattr(context.resources, rkey)
        client = resource.get_client(log=context.log)
        snapshot_at, requests_before = utc_now_iso(), client.request_count
        with StagingFile(folder / table.name, table) as staging:
            stats = stage(context, config, client, staging)
        return StagedSnapshot(
            files=list(staging.files),
            rows=staging.rows,
            scope={"project_id": project_id_of(resource)},
            snapshot_at=snapshot_at,
            stats={"requests": client.request_count - requests_before, **stats},
        )

    return build_snapshot_asset(
        spec=spec,
        table=table,
        resource_key=rkey,
        fetch=fetch,
        config_cls=config_cls,
        describe=describe,
    )


def build_posthog_group_assets(
    project: ResolvedProject, *, translator: DagsterPostHogTranslator | None = None
) -> dict[SnapshotKind, dg.AssetsDefinition]:
    """The group snapshot assets of one project (those its ``groups:`` section enables)."""
    translator = translator or DagsterPostHogTranslator()
    if not project.groups.enabled:
        return {}
    assets: dict[SnapshotKind, dg.AssetsDefinition] = {
        "group_types": _group_types_asset(project, translator),
        "groups": _groups_asset(project, translator),
        "group_property_definitions": _property_definitions_asset(project, translator),
    }
    if project.groups.property_values:
        assets["group_property_values"] = _property_values_asset(project, translator)
    if project.groups.tracked:
        assets["tracked_groups"] = _tracked_groups_asset(project, translator)
    return assets


def _group_types_asset(
    project: ResolvedProject, translator: DagsterPostHogTranslator
) -> dg.AssetsDefinition:
    def stage(
        _context: dg.OpExecutionContext, _config: None, client: PostHogClient, staging: StagingFile
    ) -> dict[str, Any]:
        return {"group_types": staging.write(group_type_row(t) for t in client.list_group_types())}

    return _group_snapshot_asset(project, "group_types", translator, GROUP_TYPES_TABLE, stage)


def describe_groups(conn: Any, staged: StagedSnapshot) -> dict[str, Any]:
    """Rows per type as written, next to what the API returned (the check compares them)."""
    rows = conn.execute(
        f"SELECT group_type_index, count(*) FROM {GROUPS_TABLE.ref(conn)} WHERE project_id = ? "
        "GROUP BY 1 ORDER BY 1",
        [staged.scope["project_id"]],
    ).fetchall()
    return {"db_groups_per_type": {str(i): int(n) for i, n in rows}}


def _groups_asset(
    project: ResolvedProject, translator: DagsterPostHogTranslator
) -> dg.AssetsDefinition:
    def stage(
        context: dg.OpExecutionContext,
        config: GroupsSnapshotConfig,
        client: PostHogClient,
        staging: StagingFile,
    ) -> dict[str, Any]:
        indexes = type_indexes(client)
        counts, pages = stage_groups(
            client, staging, indexes, concurrency=config.type_concurrency, log=context.log
        )
        return {
            "group_types": len(indexes),
            "pages_fetched": pages,
            "api_groups_per_type": counts,
            **{f"groups_type_{i}": n for i, n in counts.items()},
        }

    return _group_snapshot_asset(
        project,
        "groups",
        translator,
        GROUPS_TABLE,
        stage,
        config_cls=GroupsSnapshotConfig,
        describe=describe_groups,
    )


def _property_definitions_asset(
    project: ResolvedProject, translator: DagsterPostHogTranslator
) -> dg.AssetsDefinition:
    def stage(
        _context: dg.OpExecutionContext, _config: None, client: PostHogClient, staging: StagingFile
    ) -> dict[str, Any]:
        return {"properties": staging.write(definition_rows(client.group_property_definitions()))}

    return _group_snapshot_asset(
        project, "group_property_definitions", translator, GROUP_PROPERTY_DEFINITIONS_TABLE, stage
    )


def _property_values_asset(
    project: ResolvedProject, translator: DagsterPostHogTranslator
) -> dg.AssetsDefinition:
    def stage(
        _context: dg.OpExecutionContext,
        config: GroupPropertyValuesConfig,
        client: PostHogClient,
        staging: StagingFile,
    ) -> dict[str, Any]:
        properties, _ = stage_property_values(
            client, staging, client.group_property_definitions(), concurrency=config.max_concurrency
        )
        return {"properties": properties}

    return _group_snapshot_asset(
        project,
        "group_property_values",
        translator,
        GROUP_PROPERTY_VALUES_TABLE,
        stage,
        config_cls=GroupPropertyValuesConfig,
    )


def _tracked_groups_asset(
    project: ResolvedProject, translator: DagsterPostHogTranslator
) -> dg.AssetsDefinition:
    tracked = [(t.group_type_index, t.group_key) for t in project.groups.tracked]

    def stage(
        context: dg.OpExecutionContext, _config: None, client: PostHogClient, staging: StagingFile
    ) -> dict[str, Any]:
        rows = [tracked_group_row(client, index, key) for index, key in tracked]
        missing = [f"{r['group_type_index']}:{r['group_key']}" for r in rows if not r["found"]]
        if missing:
            context.log.warning("Tracked group(s) not found in PostHog: %s", ", ".join(missing))
        staging.write(rows)
        return {
            "tracked": len(rows),
            "missing": len(missing),
            "missing_keys": ", ".join(missing) or "none",
        }

    return _group_snapshot_asset(project, "tracked_groups", translator, TRACKED_GROUPS_TABLE, stage)

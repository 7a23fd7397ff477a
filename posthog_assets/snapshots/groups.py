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
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dagster as dg
import duckdb
from pydantic import Field

from posthog_assets.api.client import PostHogClient
from posthog_assets.config import ProjectConfig
from posthog_assets.snapshots.source import SnapshotSource, StageRequest
from posthog_assets.snapshots.staging import StagedRows, StagedSnapshot
from posthog_assets.snapshots.writer import SnapshotTable

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
    staging: StagedRows,
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
    staging: StagedRows,
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
# The sources


class GroupTypesSource(SnapshotSource):
    """``posthog.group_types``: the project's group types (``groups_types``, a plain array)."""

    name = "group_types"
    table = GROUP_TYPES_TABLE

    def stage(self, request: StageRequest) -> dict[str, Any]:
        types = request.client.list_group_types()
        return {"group_types": request.staging.write(group_type_row(t) for t in types)}


class GroupsSource(SnapshotSource):
    """``posthog.groups``: every group of every type (cursor pages; types in parallel)."""

    name = "groups"
    table = GROUPS_TABLE
    config_cls = GroupsSnapshotConfig

    def stage(self, request: StageRequest) -> dict[str, Any]:
        indexes = type_indexes(request.client)
        counts, pages = stage_groups(
            request.client,
            request.staging,
            indexes,
            concurrency=request.config.type_concurrency,
            log=request.log,
        )
        return {
            "group_types": len(indexes),
            "pages_fetched": pages,
            "api_groups_per_type": counts,
            **{f"groups_type_{i}": n for i, n in counts.items()},
        }

    def describe(self, conn: duckdb.DuckDBPyConnection, staged: StagedSnapshot) -> dict[str, Any]:
        """Rows per type as written, next to what the API returned (the check compares them)."""
        rows = conn.execute(
            f"SELECT group_type_index, count(*) FROM {GROUPS_TABLE.ref(conn)} "
            "WHERE project_id = ? GROUP BY 1 ORDER BY 1",
            [staged.scope["project_id"]],
        ).fetchall()
        return {"db_groups_per_type": {str(i): int(n) for i, n in rows}}


class PropertyDefinitionsSource(SnapshotSource):
    """``posthog.group_property_definitions``: property names and counts per group type."""

    name = "group_property_definitions"
    table = GROUP_PROPERTY_DEFINITIONS_TABLE

    def stage(self, request: StageRequest) -> dict[str, Any]:
        rows = definition_rows(request.client.group_property_definitions())
        return {"properties": request.staging.write(rows)}


class PropertyValuesSource(SnapshotSource):
    """``posthog.group_property_values``: the top values of each group property."""

    name = "group_property_values"
    table = GROUP_PROPERTY_VALUES_TABLE
    config_cls = GroupPropertyValuesConfig

    def stage(self, request: StageRequest) -> dict[str, Any]:
        properties, _ = stage_property_values(
            request.client,
            request.staging,
            request.client.group_property_definitions(),
            concurrency=request.config.max_concurrency,
        )
        return {"properties": properties}


class TrackedGroupsSource(SnapshotSource):
    """``posthog.tracked_groups``: the configured groups, looked up without side effects."""

    name = "tracked_groups"
    table = TRACKED_GROUPS_TABLE

    def __init__(self, tracked: Sequence[tuple[int, str]]) -> None:
        self.tracked = list(tracked)

    def stage(self, request: StageRequest) -> dict[str, Any]:
        rows = [tracked_group_row(request.client, index, key) for index, key in self.tracked]
        missing = [f"{r['group_type_index']}:{r['group_key']}" for r in rows if not r["found"]]
        if missing:
            request.log.warning("Tracked group(s) not found in PostHog: %s", ", ".join(missing))
        request.staging.write(rows)
        return {
            "tracked": len(rows),
            "missing": len(missing),
            "missing_keys": ", ".join(missing) or "none",
        }


def group_sources(project: ProjectConfig) -> list[SnapshotSource]:
    """The group snapshots one project's ``groups:`` section enables."""
    groups = project.groups
    if not groups.enabled:
        return []
    sources: list[SnapshotSource] = [
        GroupTypesSource(),
        GroupsSource(),
        PropertyDefinitionsSource(),
    ]
    if groups.property_values:
        sources.append(PropertyValuesSource())
    if groups.tracked:
        pairs = [(t.group_type_index, t.group_key) for t in groups.tracked]
        sources.append(TrackedGroupsSource(pairs))
    return sources

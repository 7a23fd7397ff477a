"""Group snapshots: group types, every group, property definitions and values, tracked groups.

A groups snapshot **replaces** the project's previous one in its table: these tables hold the
latest state (``snapshot_at`` says when it was taken), not a history. Groups are big and change
slowly; history is what the daily insights snapshots are for.
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
from posthog_assets.config import PostHogProject
from posthog_assets.snapshots.checks import (
    groups_count_per_type_matches_api,
    tracked_groups_present,
)
from posthog_assets.snapshots.source import ListSource, SnapshotSource, StageRequest
from posthog_assets.snapshots.staging import StagedRows, StagedSnapshot
from posthog_assets.tables import GROUPS_GROUP, Table, columns

DEFAULT_TYPE_CONCURRENCY = 5
DEFAULT_PROPERTY_VALUES_CONCURRENCY = 4

_TYPE_INDEX = (
    "group_type_index  INTEGER  The group type's index (0 to 4), as in posthog.group_types."
)
GROUP_TYPES_TABLE = Table(
    name="group_types",
    description="The project's group types (groups_types), in DuckDB.",
    group=GROUPS_GROUP,
    key=("group_type_index",),
    columns=columns(f"""
        {_TYPE_INDEX}
        group_type        VARCHAR      The type's name in events ($group_<index>), e.g. company.
        name_singular     VARCHAR      The singular name shown in PostHog.
        name_plural       VARCHAR      The plural name shown in PostHog.
        detail_dashboard  BIGINT       The dashboard shown on a group's page.
        default_columns   JSON         The columns PostHog's groups list shows.
        created_at        TIMESTAMPTZ  When the type was first seen.
    """),
)
GROUPS_TABLE = Table(
    name="groups",
    description="Every PostHog group of every type (cursor pages), in DuckDB.",
    group=GROUPS_GROUP,
    key=("group_type_index", "group_key"),
    columns=columns(f"""
        {_TYPE_INDEX}
        group_key         VARCHAR      The group's key (the value of $group_<index>).
        group_properties  JSON         The group's properties.
        created_at        TIMESTAMPTZ  When PostHog first saw the group.
    """),
    checks=(groups_count_per_type_matches_api,),
)
GROUP_PROPERTY_DEFINITIONS_TABLE = Table(
    name="group_property_definitions",
    description="Group property names and counts per group type, in DuckDB.",
    group=GROUPS_GROUP,
    key=("group_type_index", "name"),
    columns=columns(f"""
        {_TYPE_INDEX}
        name              VARCHAR  The property's name.
        count             BIGINT   Groups of the type that have the property.
    """),
)
GROUP_PROPERTY_VALUES_TABLE = Table(
    name="group_property_values",
    description="Top values of each group property with counts, in DuckDB.",
    group=GROUPS_GROUP,
    key=("group_type_index", "key", "value"),
    columns=columns(f"""
        {_TYPE_INDEX}
        key               VARCHAR  The property's name.
        value             VARCHAR  One of its values (non-text values as JSON text).
        count             BIGINT   Groups with this value.
    """),
)
TRACKED_GROUPS_TABLE = Table(
    name="tracked_groups",
    description="Configured groups (groups.tracked) looked up by key without side effects, "
    "in DuckDB.",
    group=GROUPS_GROUP,
    key=("group_type_index", "group_key"),
    columns=columns(f"""
        {_TYPE_INDEX}
        group_key         VARCHAR      The key listed under groups.tracked.
        found             BOOLEAN      PostHog has a group of this type with exactly this key.
        group_properties  JSON         The group's properties (found groups).
        created_at        TIMESTAMPTZ  When PostHog first saw the group.
        error             VARCHAR      Why the group was not found.
    """),
    checks=(tracked_groups_present,),
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


def definition_rows(item: tuple[str, Any]) -> list[dict[str, Any]]:
    """One entry of ``{"0": [{"name", "count"}, ...]}`` (the type index as a string) as rows."""
    index, entries = item
    return [
        {"group_type_index": int(index), "name": e.get("name"), "count": e.get("count")}
        for e in entries or []
    ]


def stage_property_values(
    client: PostHogClient,
    staging: StagedRows,
    definitions: Mapping[str, Any],
    *,
    concurrency: int = DEFAULT_PROPERTY_VALUES_CONCURRENCY,
) -> tuple[int, int]:
    """``property_values`` for each defined property, ``concurrency`` requests at a time."""
    pairs = [
        (int(r["group_type_index"]), str(r["name"]))
        for item in definitions.items()
        for r in definition_rows(item)
    ]

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
    row = {"group_type_index": type_index, "group_key": key, "found": found is not None}
    if found is None:
        return {**row, "error": "not found: no group of this type has this key"}
    return {
        **row,
        "group_properties": found.get("group_properties"),
        "created_at": found.get("created_at"),
    }


# ------------------------------------------------------------------------------------------------
# The sources


class GroupsSource(SnapshotSource):
    """``posthog.groups``: every group of every type (cursor pages; types in parallel)."""

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


class PropertyValuesSource(SnapshotSource):
    """``posthog.group_property_values``: the top values of each group property."""

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


def group_sources(project: PostHogProject) -> list[SnapshotSource]:
    """The group snapshots one project's ``groups:`` section enables."""
    groups = project.groups
    if not groups.enabled:
        return []
    sources: list[SnapshotSource] = [
        ListSource(
            GROUP_TYPES_TABLE,
            lambda client: client.list_group_types(),
            lambda item: [group_type_row(item)],
            "group_types",
        ),
        GroupsSource(),
        ListSource(
            GROUP_PROPERTY_DEFINITIONS_TABLE,
            lambda client: client.group_property_definitions().items(),
            definition_rows,
            "properties",
        ),
    ]
    if groups.property_values:
        sources.append(PropertyValuesSource())
    if groups.tracked:
        pairs = [(t.group_type_index, t.group_key) for t in groups.tracked]
        sources.append(TrackedGroupsSource(pairs))
    return sources

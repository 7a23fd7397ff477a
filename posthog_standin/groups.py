"""Groups, group property definitions/values and group types (``ee/clickhouse/views/groups.py``).

Group ``j`` of a type is created ``~j`` minutes before the seed epoch, so "newest first" is simply
increasing ``j`` and a cursor position maps back to an index in O(1). Removed groups (control
plane) are skipped everywhere and subtracted from the closed-form property counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from starlette.responses import JSONResponse, Response

from . import errors
from .auth import Ctx
from .group_seed import (
    COUNTABLE_PROPERTIES,
    Project,
    first_index_older_than,
    group_created_at,
    group_index,
    group_json,
    group_key,
    group_properties,
    group_type_json,
    property_value_counts,
    property_value_text,
)
from .hashing import mix
from .pagination import Cursor, cursor_url, decode_cursor
from .seed import base62_id

PAGE_SIZE = 100
PROPERTY_VALUES_LIMIT = 20
MISSING_TYPE_INDEX = (
    "You must pass ?group_type_index= in this URL. To get a list of valid group types, "
    "call /api/:project_id/groups_types/."
)


def _type_index(
    ctx: Ctx, missing: tuple[str, str] = ("This field is required.", "required")
) -> int:
    """The required ``group_type_index``; ``missing`` is the (detail, code) when it is absent."""
    raw = ctx.query.get("group_type_index")
    if raw is None or raw == "":
        raise errors.validation_error(missing[0], "group_type_index", missing[1])
    try:
        return int(raw)
    except ValueError:
        raise errors.validation_error(
            "A valid integer is required.", "group_type_index", "invalid"
        ) from None


def _count(project: Project, type_index: int) -> int:
    return project.n_groups if 0 <= type_index < project.n_group_types else 0


def _position(project: Project, type_index: int, j: int) -> str:
    """DRF's cursor position: ``str()`` of the ordering field (``2026-01-01 00:00:00+00:00``)."""
    return str(group_created_at(project, type_index, j))


def _predicate(ctx: Ctx, type_index: int) -> Callable[[int], bool]:
    removed = ctx.state.removed(ctx.project.id, type_index)
    search = (ctx.query.get("search") or "").lower()
    key_part = (ctx.query.get("group_key") or "").lower()
    project = ctx.project

    def keep(j: int) -> bool:
        if j in removed:
            return False
        key = group_key(type_index, j).lower()
        if key_part and key_part not in key:
            return False
        if search:
            text = json.dumps(group_properties(project, type_index, j)).lower()
            return search in text or key == search
        return True

    return keep


async def list_groups(ctx: Ctx) -> Response:
    """Cursor pages of 100, newest first; ``previous``/``next`` follow DRF's CursorPagination."""
    type_index = _type_index(ctx, (MISSING_TYPE_INDEX, "invalid"))
    project = ctx.project
    n = _count(project, type_index)
    cursor = decode_cursor(ctx.query["cursor"]) if ctx.query.get("cursor") else None
    keep = _predicate(ctx, type_index)
    moment: datetime | None = None
    if cursor is not None and cursor.position is not None:
        try:
            moment = datetime.fromisoformat(cursor.position)
        except ValueError:
            raise errors.not_found("Invalid cursor") from None
    found: list[int] = []
    skip = cursor.offset if cursor else 0
    if cursor is None or not cursor.reverse:
        j = 0 if moment is None else first_index_older_than(project, type_index, moment)
        while j < n and len(found) <= PAGE_SIZE:
            if keep(j):
                if skip:
                    skip -= 1
                else:
                    found.append(j)
            j += 1
        page = found[:PAGE_SIZE]
        has_next, has_previous = len(found) > PAGE_SIZE, cursor is not None
    else:
        # Reverse: rows newer than the position, nearest first, then put back in list order.
        j = min(n, first_index_older_than(project, type_index, moment)) - 1 if moment else -1
        if moment is not None and j >= 0 and group_created_at(project, type_index, j) == moment:
            j -= 1  # the boundary row itself belongs to the page after
        while j >= 0 and len(found) <= PAGE_SIZE:
            if keep(j):
                if skip:
                    skip -= 1
                else:
                    found.append(j)
            j -= 1
        page = sorted(found[:PAGE_SIZE])
        has_next, has_previous = True, len(found) > PAGE_SIZE
    next_url = previous_url = None
    if page and has_next:
        next_url = cursor_url(
            ctx.request, Cursor(0, False, _position(project, type_index, page[-1]))
        )
    if page and has_previous:
        previous_url = cursor_url(
            ctx.request, Cursor(0, True, _position(project, type_index, page[0]))
        )
    elif has_previous and cursor is not None and cursor.position is not None:
        previous_url = cursor_url(ctx.request, Cursor(0, True, cursor.position))
    results = [group_json(project, type_index, j) for j in page]
    return JSONResponse({"next": next_url, "previous": previous_url, "results": results})


def _required(ctx: Ctx, name: str) -> str:
    value = ctx.query.get(name)
    if value is None or value == "":
        raise errors.validation_error("This field is required.", name, "required")
    return value


async def find_group(ctx: Ctx) -> Response:
    """One group by exact key. With PostHog's CRM feature flag on, finding a group also creates
    a Notebook for it (once) and answers its short id: a read with a side effect."""
    type_index = _type_index(ctx)
    key = _required(ctx, "group_key")
    project = ctx.project
    state = ctx.state
    j = group_index(project, type_index, key)
    if j is None or j in state.removed(project.id, type_index):
        raise errors.not_found()
    notebook = None
    if state.config.crm_notebooks:
        slot = (project.id, type_index, key)
        notebook = state.notebooks.get(slot)
        if notebook is None:
            state.stats.notebooks_created += 1
            notebook = base62_id(
                mix(state.seed.seed, project.id, 41, type_index, j, state.stats.notebooks_created)
            )
            state.notebooks[slot] = notebook
    return JSONResponse({**group_json(project, type_index, j), "notebook": notebook})


def _removed_counts(ctx: Ctx, type_index: int, key: str) -> dict[str, int]:
    """How many removed groups had each value of ``key`` (subtracted from seeded counts)."""
    counts: dict[str, int] = {}
    for j in ctx.state.removed(ctx.project.id, type_index):
        props = group_properties(ctx.project, type_index, j)
        if key in props:
            text = property_value_text(props[key])
            counts[text] = counts.get(text, 0) + 1
    return counts


def _value_counts(ctx: Ctx, type_index: int, key: str) -> dict[str, int]:
    seeded = property_value_counts(ctx.project, type_index, key)
    removed = _removed_counts(ctx, type_index, key)
    return {v: c - removed.get(v, 0) for v, c in seeded.items() if c - removed.get(v, 0) > 0}


async def property_definitions(ctx: Ctx) -> Response:
    """``{"<index>": [{"name", "count"}]}``, count descending then name, over live groups."""
    out: dict[str, list[dict[str, Any]]] = {}
    project = ctx.project
    for t in range(project.n_group_types):
        live = project.n_groups - len(ctx.state.removed(project.id, t))
        entries = [{"name": "name", "count": live}] if live > 0 else []
        for key in COUNTABLE_PROPERTIES:
            total = sum(_value_counts(ctx, t, key).values())
            if total > 0:
                entries.append({"name": key, "count": total})
        entries.sort(key=lambda e: (-e["count"], e["name"]))
        out[str(t)] = entries
    return JSONResponse(out)


async def property_values(ctx: Ctx) -> Response:
    """Top 20 values of one property by count, optionally filtered by a substring.

    PostHog reads ``request.GET["group_type_index"]`` and ``request.GET["key"]`` directly, so a
    missing one is an unhandled ``KeyError`` (500), and a non-integer index fails in ClickHouse
    (500 too). The answer is a bare list, or ``{"results", "refreshing"}`` in the versions that
    wrap it (``property_values_envelope``).
    """
    raw_index = ctx.query.get("group_type_index")
    key = ctx.query.get("key")
    if raw_index is None or key is None:
        raise errors.server_error()
    try:
        type_index = int(raw_index)
    except ValueError:
        raise errors.server_error() from None
    needle = (ctx.query.get("value") or "").lower()
    project = ctx.project
    results: list[dict[str, Any]] = []
    if 0 <= type_index < project.n_group_types:
        if key in COUNTABLE_PROPERTIES:
            counts = _value_counts(ctx, type_index, key)
            ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
            results = [{"name": v, "count": c} for v, c in ranked if needle in v.lower()]
        elif key == "name":
            # Unique per group: every count is 1, so take the first matches, newest first.
            removed = ctx.state.removed(project.id, type_index)
            j = 0
            while j < project.n_groups and len(results) < PROPERTY_VALUES_LIMIT:
                if j not in removed:
                    name = group_properties(project, type_index, j)["name"]
                    if needle in name.lower():
                        results.append({"name": name, "count": 1})
                j += 1
    results = results[:PROPERTY_VALUES_LIMIT]
    if ctx.state.config.property_values_envelope:
        return JSONResponse({"results": results, "refreshing": False})
    return JSONResponse(results)


async def list_group_types(ctx: Ctx) -> Response:
    project = ctx.project
    return JSONResponse([group_type_json(project, t) for t in range(project.n_group_types)])

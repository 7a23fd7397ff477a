"""Asset checks on the snapshot tables. Every check opens DuckDB read-only (a read-write open
would wait for, or block, the single writer), in the ``duckdb`` pool.

Every table with a key gets :func:`no_duplicates`; a table's declaration lists its other checks,
each built as ``check(project, table, asset_key)``.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb

from posthog_assets.common import DUCKDB_RESOURCE_KEY
from posthog_assets.config import BLOCKING_REFRESH_MODES, PostHogProject
from posthog_assets.pools import DUCKDB_POOL
from posthog_assets.tables import Table, open_read_only, quote, table_exists, table_ref

#: How many offending ids/keys a failed check lists in its description.
MAX_LISTED = 10


@contextmanager
def _reader(context: dg.AssetCheckExecutionContext) -> Iterator[duckdb.DuckDBPyConnection | None]:
    """A read-only connection, or None when the DuckDB file does not exist yet."""
    path = Path(getattr(context.resources, DUCKDB_RESOURCE_KEY).database)
    if not path.exists():
        yield None
        return
    conn = open_read_only(path)
    try:
        yield conn
    finally:
        conn.close()


def select_rows(
    context: dg.AssetCheckExecutionContext, table: str, sql: str, params: Sequence[Any]
) -> list[tuple[Any, ...]] | None:
    """Rows of ``sql`` (``{table}`` becomes the qualified name); None if the table is not there."""
    with _reader(context) as conn:
        if conn is None or not table_exists(conn, table):
            return None
        return conn.execute(sql.format(table=table_ref(conn, table)), list(params)).fetchall()


def duckdb_check(
    project: PostHogProject,
    asset_key: dg.AssetKey,
    name: str,
    description: str,
    *,
    blocking: bool = False,
) -> Callable[[Callable[..., dg.AssetCheckResult]], dg.AssetChecksDefinition]:
    """``dg.asset_check`` in the duckdb pool (a read-only open fails while a writer holds it)."""
    return dg.asset_check(
        asset=asset_key,
        name=name,
        description=description,
        blocking=blocking,
        required_resource_keys={DUCKDB_RESOURCE_KEY, project.resource_key},
        pool=DUCKDB_POOL,
    )


def _missing_table(table: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=False, description=f"posthog.{table} does not exist yet: materialize the asset."
    )


def _project_id(context: dg.AssetCheckExecutionContext, project: PostHogProject) -> str:
    return str(getattr(context.resources, project.resource_key).stored_project_id)


def _latest_metadata(context: dg.AssetCheckExecutionContext, key: dg.AssetKey) -> dict[str, Any]:
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return {}
    return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


def _snapshot_scope(
    context: dg.AssetCheckExecutionContext,
    project: PostHogProject,
    table: Table,
    asset_key: dg.AssetKey,
) -> tuple[str, list[Any]]:
    """``WHERE`` of the newest snapshot: the project's rows, and for a daily table the date of
    the latest materialization (the one the run just wrote), else the newest date in DuckDB."""
    project_id = _project_id(context, project)
    if not table.daily:
        return "project_id = ?", [project_id]
    snapshot = _latest_metadata(context, asset_key).get("snapshot_date")
    if not (isinstance(snapshot, str) and snapshot):
        rows = select_rows(
            context,
            table.name,
            "SELECT max(snapshot_date)::VARCHAR FROM {table} WHERE project_id = ?",
            [project_id],
        )
        snapshot = rows[0][0] if rows else None
    return "project_id = ? AND snapshot_date = ?", [project_id, snapshot]


def no_duplicates(
    project: PostHogProject, table: Table, asset_key: dg.AssetKey
) -> dg.AssetChecksDefinition:
    """No key of the table appears twice in the newest snapshot (a re-run replaced, did not
    append)."""
    cols = ", ".join(quote(c) for c in table.key)
    label = ", ".join(table.key)

    @duckdb_check(
        project,
        asset_key,
        f"{table.name}_no_duplicates",
        f"No ({label}) appears twice in the newest snapshot of {table.qualified_name}.",
        blocking=True,
    )
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        where, params = _snapshot_scope(context, project, table, asset_key)
        dupes = select_rows(
            context,
            table.name,
            f"SELECT {cols}, count(*) FROM {{table}} WHERE {where} "
            "GROUP BY ALL HAVING count(*) > 1 ORDER BY ALL LIMIT ?",
            [*params, MAX_LISTED],
        )
        if dupes is None:
            return _missing_table(table.name)
        counted = select_rows(
            context, table.name, f"SELECT count(*) FROM {{table}} WHERE {where}", params
        )
        listed = ", ".join(
            f"{row[0] if len(row) == 2 else tuple(row[:-1])} x{row[-1]}" for row in dupes
        )
        return dg.AssetCheckResult(
            passed=not dupes,
            metadata={
                "rows": int(counted[0][0]) if counted else 0,
                "duplicate_keys_listed": len(dupes),
                **({"snapshot_date": str(params[1])} if table.daily else {}),
            },
            description=(
                f"Duplicate ({label})"
                + (f" in the snapshot of {params[1]}" if table.daily else "")
                + f": {listed}"
                if dupes
                else None
            ),
        )

    return _check


def table_checks(
    project: PostHogProject, table: Table, asset_key: dg.AssetKey
) -> list[dg.AssetChecksDefinition]:
    """Every check the table's declaration asks for."""
    checks = [no_duplicates(project, table, asset_key)] if table.key else []
    return checks + [build(project, table, asset_key) for build in table.checks]


# ------------------------------------------------------------------------------------------------
# Insights


def insights_not_empty(
    project: PostHogProject, table: Table, asset_key: dg.AssetKey
) -> dg.AssetChecksDefinition:
    @duckdb_check(
        project,
        asset_key,
        "insights_not_empty",
        "The newest snapshot has at least one insight.",
        blocking=True,
    )
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        where, params = _snapshot_scope(context, project, table, asset_key)
        counted = select_rows(
            context, table.name, f"SELECT count(*) FROM {{table}} WHERE {where}", params
        )
        if counted is None:
            return _missing_table(table.name)
        rows = int(counted[0][0])
        return dg.AssetCheckResult(
            passed=rows > 0,
            metadata={"rows": rows, "snapshot_date": str(params[1])},
            description=None if rows else f"No insights in the snapshot of {params[1]}.",
        )

    return _check


def insights_results_present(
    project: PostHogProject, table: Table, asset_key: dg.AssetKey
) -> dg.AssetChecksDefinition:
    @duckdb_check(
        project,
        asset_key,
        "insights_results_present",
        "In blocking modes (blocking, force_blocking) every insight has a result; other modes "
        "may legitimately return null (cold cache), so only the count is reported.",
    )
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        where, params = _snapshot_scope(context, project, table, asset_key)
        rows = select_rows(
            context,
            table.name,
            f"SELECT id, refresh, query_error FROM {{table}} WHERE {where} AND result IS NULL "
            "ORDER BY id",
            params,
        )
        if rows is None:
            return _missing_table(table.name)
        blocking = [r for r in rows if r[1] in BLOCKING_REFRESH_MODES]
        listed = "; ".join(
            f"{i} ({err or 'no error given'})" for i, _, err in blocking[:MAX_LISTED]
        )
        return dg.AssetCheckResult(
            passed=not blocking,
            metadata={
                "null_results": len(rows),
                "null_results_in_blocking_modes": len(blocking),
                "snapshot_date": str(params[1]),
            },
            description=(
                f"{len(blocking)} insight(s) without a result in a blocking mode: {listed}"
                if blocking
                else f"{len(rows)} null result(s), none in a blocking mode."
            ),
        )

    return _check


def insights_not_truncated(
    project: PostHogProject, table: Table, asset_key: dg.AssetKey
) -> dg.AssetChecksDefinition:
    @duckdb_check(
        project,
        asset_key,
        "insights_not_truncated",
        "No insight's result was cut short by PostHog (has_more): a SQL insight whose query has "
        "no LIMIT keeps only its first 100 rows. Warns; a CSV export of the insight has them all.",
    )
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        where, params = _snapshot_scope(context, project, table, asset_key)
        rows = select_rows(
            context,
            table.name,
            f"SELECT id, coalesce(name, derived_name) FROM {{table}} WHERE {where} AND has_more "
            "ORDER BY id",
            params,
        )
        if rows is None:
            return _missing_table(table.name)
        listed = ", ".join(f"{i} ({name})" for i, name in rows[:MAX_LISTED])
        return dg.AssetCheckResult(
            passed=not rows,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"truncated_insights": len(rows), "snapshot_date": str(params[1])},
            description=(
                f"{len(rows)} insight result(s) cut short by PostHog (has_more): {listed}. Their "
                "rows in posthog.insight_rows are the first ones only; add a LIMIT to the query "
                "or export the insight as CSV (text/csv) for every row."
                if rows
                else None
            ),
        )

    return _check


# ------------------------------------------------------------------------------------------------
# Groups


def groups_count_per_type_matches_api(
    project: PostHogProject, table: Table, asset_key: dg.AssetKey
) -> dg.AssetChecksDefinition:
    @duckdb_check(
        project,
        asset_key,
        "groups_count_per_type_matches_api",
        "Rows per group type in posthog.groups equal the groups the API returned "
        "(api_groups_per_type in the latest materialization's metadata).",
    )
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        reported = _latest_metadata(context, asset_key).get("api_groups_per_type")
        if not isinstance(reported, dict):
            return dg.AssetCheckResult(
                passed=False, description="No materialization with per-type counts yet."
            )
        rows = select_rows(
            context,
            table.name,
            "SELECT group_type_index, count(*) FROM {table} WHERE project_id = ? GROUP BY 1",
            [_project_id(context, project)],
        )
        if rows is None:
            return _missing_table(table.name)
        in_db = {str(i): int(n) for i, n in rows}
        api = {str(k): int(v) for k, v in reported.items()}
        wrong = {
            k: (api.get(k, 0), in_db.get(k, 0))
            for k in sorted(set(api) | set(in_db), key=int)
            if api.get(k, 0) != in_db.get(k, 0)
        }
        return dg.AssetCheckResult(
            passed=not wrong,
            metadata={"api_groups_per_type": api, "db_groups_per_type": in_db},
            description=(
                "Per-type counts differ (type: api vs duckdb): "
                + ", ".join(f"{k}: {a} vs {d}" for k, (a, d) in wrong.items())
                if wrong
                else None
            ),
        )

    return _check


def tracked_groups_present(
    project: PostHogProject, table: Table, asset_key: dg.AssetKey
) -> dg.AssetChecksDefinition:
    tracked = [(t.group_type_index, t.group_key) for t in project.groups.tracked]

    @duckdb_check(
        project,
        asset_key,
        "tracked_groups_present",
        "Every group listed under groups.tracked is found in PostHog.",
    )
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        rows = select_rows(
            context,
            table.name,
            "SELECT group_type_index, group_key, found FROM {table} WHERE project_id = ?",
            [_project_id(context, project)],
        )
        if rows is None:
            return _missing_table(table.name)
        found = {(int(t), str(k)) for t, k, ok in rows if ok}
        missing = [f"{t}:{k}" for t, k in tracked if (t, k) not in found]
        return dg.AssetCheckResult(
            passed=not missing,
            metadata={"tracked": len(tracked), "missing": len(missing)},
            description=(
                "Tracked group(s) not found in PostHog (group_type_index:group_key): "
                + ", ".join(missing)
                + ". Check each key in groups.tracked (keys match exactly) and its "
                "group_type_index; a group PostHog deleted is not found either."
                if missing
                else None
            ),
        )

    return _check

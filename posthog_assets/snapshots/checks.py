"""Asset checks on the snapshot tables. Every check opens DuckDB read-only (a read-write open
would wait for, or block, the single writer), in the ``duckdb`` pool.

- insights: the newest snapshot is non-empty; in blocking modes no insight came back without a
  result; no result was cut short by PostHog (warns); no duplicate ``(snapshot_date, id)`` rows.
- groups: rows per group type in DuckDB equal what the API returned (recorded in the last
  materialization's metadata); no duplicate ``(group_type_index, group_key)`` rows.
- tracked groups: every configured group was found; a failure names the missing keys.
- tidy tables (insight_series, funnel_steps, ...): no key twice in the newest snapshot.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb

from posthog_assets.common import DUCKDB_RESOURCE_KEY
from posthog_assets.config import BLOCKING_REFRESH_MODES, ProjectConfig
from posthog_assets.pools import DUCKDB_POOL
from posthog_assets.snapshots.tidy import TIDY_KEYS
from posthog_assets.tables import open_read_only, quote, table_exists, table_ref

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


def _select(
    context: dg.AssetCheckExecutionContext, table: str, sql: str, params: Sequence[Any]
) -> list[tuple[Any, ...]] | None:
    """Rows of ``sql`` (``{table}`` becomes the qualified name); None if the table is not there."""
    with _reader(context) as conn:
        if conn is None or not table_exists(conn, table):
            return None
        return conn.execute(sql.format(table=table_ref(conn, table)), list(params)).fetchall()


def _duckdb_check(
    asset_key: dg.AssetKey,
    name: str,
    description: str,
    resource_keys: set[str],
    *,
    blocking: bool = False,
) -> Callable[[Callable[..., dg.AssetCheckResult]], dg.AssetChecksDefinition]:
    """``dg.asset_check`` in the duckdb pool (a read-only open fails while a writer holds it)."""
    return dg.asset_check(
        asset=asset_key,
        name=name,
        description=description,
        blocking=blocking,
        required_resource_keys=resource_keys,
        pool=DUCKDB_POOL,
    )


def _no_duplicates_check(
    asset_key: dg.AssetKey,
    name: str,
    table: str,
    key_columns: tuple[str, str],
    resource_keys: set[str],
    posthog_key: str,
    show: Callable[[Any, Any], str],
    *,
    blocking: bool = False,
) -> dg.AssetChecksDefinition:
    """No ``key_columns`` pair appears twice in ``posthog.<table>`` for the project."""
    a, b = (quote(c) for c in key_columns)
    label = ", ".join(key_columns)

    @_duckdb_check(
        asset_key,
        name,
        f"No ({label}) appears twice in posthog.{table} for this project.",
        resource_keys,
        blocking=blocking,
    )
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        dupes = _select(
            context,
            table,
            f"SELECT {a}, {b}, count(*) FROM {{table}} WHERE project_id = ? "
            "GROUP BY 1, 2 HAVING count(*) > 1 ORDER BY 1, 2 LIMIT ?",
            [_project_id(context, posthog_key), MAX_LISTED],
        )
        if dupes is None:
            return _missing_table(table)
        return dg.AssetCheckResult(
            passed=not dupes,
            metadata={"duplicate_keys_listed": len(dupes)},
            description=(
                f"Duplicate ({label}): " + ", ".join(f"{show(x, y)} x{n}" for x, y, n in dupes)
                if dupes
                else None
            ),
        )

    return _check


def _missing_table(table: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=False, description=f"posthog.{table} does not exist yet: materialize the asset."
    )


def _project_id(context: dg.AssetCheckExecutionContext, resource_key: str) -> str:
    return str(getattr(context.resources, resource_key).stored_project_id)


def _newest_snapshot(
    context: dg.AssetCheckExecutionContext, asset_key: dg.AssetKey, project_id: str
) -> str | None:
    """The date of the latest materialized snapshot (the one the run just wrote), else the
    newest date in DuckDB."""
    recorded = _latest_metadata(context, asset_key).get("snapshot_date")
    if isinstance(recorded, str) and recorded:
        return recorded
    rows = _select(
        context,
        "insights",
        "SELECT max(snapshot_date)::VARCHAR FROM {table} WHERE project_id = ?",
        [project_id],
    )
    return rows[0][0] if rows else None


def build_insights_checks(
    project: ProjectConfig,
    *,
    asset_key: dg.AssetKey,
) -> list[dg.AssetChecksDefinition]:
    """Checks on one project's newest insights snapshot."""
    rkey = project.resource_key
    keys = {DUCKDB_RESOURCE_KEY, rkey}

    @_duckdb_check(
        asset_key,
        "insights_not_empty",
        "The newest snapshot has at least one insight.",
        keys,
        blocking=True,
    )
    def insights_not_empty(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        project_id = _project_id(context, rkey)
        snapshot = _newest_snapshot(context, asset_key, project_id)
        counted = _select(
            context,
            "insights",
            "SELECT count(*) FROM {table} WHERE project_id = ? AND snapshot_date = ?",
            [project_id, snapshot],
        )
        if counted is None:
            return _missing_table("insights")
        rows = int(counted[0][0])
        return dg.AssetCheckResult(
            passed=rows > 0,
            metadata={"rows": rows, "snapshot_date": str(snapshot)},
            description=None if rows else f"No insights in the snapshot of {snapshot}.",
        )

    @_duckdb_check(
        asset_key,
        "insights_results_present",
        "In blocking modes (blocking, force_blocking) every insight has a result; other modes "
        "may legitimately return null (cold cache), so only the count is reported.",
        keys,
    )
    def insights_results_present(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        project_id = _project_id(context, rkey)
        snapshot = _newest_snapshot(context, asset_key, project_id)
        rows = _select(
            context,
            "insights",
            "SELECT id, refresh, query_error FROM {table} "
            "WHERE project_id = ? AND snapshot_date = ? AND result IS NULL ORDER BY id",
            [project_id, snapshot],
        )
        if rows is None:
            return _missing_table("insights")
        blocking = [r for r in rows if r[1] in BLOCKING_REFRESH_MODES]
        listed = "; ".join(
            f"{i} ({err or 'no error given'})" for i, _, err in blocking[:MAX_LISTED]
        )
        return dg.AssetCheckResult(
            passed=not blocking,
            metadata={
                "null_results": len(rows),
                "null_results_in_blocking_modes": len(blocking),
                "snapshot_date": str(snapshot),
            },
            description=(
                f"{len(blocking)} insight(s) without a result in a blocking mode: {listed}"
                if blocking
                else f"{len(rows)} null result(s), none in a blocking mode."
            ),
        )

    @_duckdb_check(
        asset_key,
        "insights_not_truncated",
        "No insight's result was cut short by PostHog (has_more): a SQL insight whose query has "
        "no LIMIT keeps only its first 100 rows. Warns; a CSV export of the insight has them all.",
        keys,
    )
    def insights_not_truncated(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        project_id = _project_id(context, rkey)
        snapshot = _newest_snapshot(context, asset_key, project_id)
        rows = _select(
            context,
            "insights",
            "SELECT id, coalesce(name, derived_name) FROM {table} "
            "WHERE project_id = ? AND snapshot_date = ? AND has_more ORDER BY id",
            [project_id, snapshot],
        )
        if rows is None:
            return _missing_table("insights")
        listed = ", ".join(f"{i} ({name})" for i, name in rows[:MAX_LISTED])
        return dg.AssetCheckResult(
            passed=not rows,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"truncated_insights": len(rows), "snapshot_date": str(snapshot)},
            description=(
                f"{len(rows)} insight result(s) cut short by PostHog (has_more): {listed}. Their "
                "rows in posthog.insight_rows are the first ones only; add a LIMIT to the query "
                "or export the insight as CSV (text/csv) for every row."
                if rows
                else None
            ),
        )

    insights_no_duplicates = _no_duplicates_check(
        asset_key,
        "insights_no_duplicates",
        "insights",
        ("snapshot_date", "id"),
        keys,
        rkey,
        lambda p, i: f"({p}, {i})",
        blocking=True,
    )

    return [
        insights_not_empty,
        insights_results_present,
        insights_not_truncated,
        insights_no_duplicates,
    ]


def build_tidy_checks(
    project: ProjectConfig,
    *,
    insights_key: dg.AssetKey,
    table_keys: Mapping[str, dg.AssetKey],
) -> list[dg.AssetChecksDefinition]:
    """Per tidy table: no key appears twice in the newest snapshot (a re-run replaced, did not
    append)."""
    rkey = project.resource_key
    return [
        _tidy_no_duplicates(insights_key, table, asset_key, rkey)
        for table, asset_key in table_keys.items()
    ]


def _tidy_no_duplicates(
    insights_key: dg.AssetKey, table: str, asset_key: dg.AssetKey, rkey: str
) -> dg.AssetChecksDefinition:
    key_columns = TIDY_KEYS[table]
    cols = ", ".join(quote(c) for c in key_columns)

    @_duckdb_check(
        asset_key,
        f"{table}_no_duplicates",
        f"No ({', '.join(key_columns)}) appears twice in the newest snapshot of posthog.{table}.",
        {DUCKDB_RESOURCE_KEY, rkey},
        blocking=True,
    )
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        project_id = _project_id(context, rkey)
        snapshot = _newest_snapshot(context, insights_key, project_id)
        dupes = _select(
            context,
            table,
            f"SELECT {cols}, count(*) FROM {{table}} WHERE project_id = ? AND snapshot_date = ? "
            f"GROUP BY ALL HAVING count(*) > 1 ORDER BY ALL LIMIT ?",
            [project_id, snapshot, MAX_LISTED],
        )
        if dupes is None:
            return _missing_table(table)
        counted = _select(
            context,
            table,
            "SELECT count(*) FROM {table} WHERE project_id = ? AND snapshot_date = ?",
            [project_id, snapshot],
        )
        listed = ", ".join(f"{tuple(row[:-1])} x{row[-1]}" for row in dupes)
        return dg.AssetCheckResult(
            passed=not dupes,
            metadata={
                "rows": int(counted[0][0]) if counted else 0,
                "duplicate_keys_listed": len(dupes),
                "snapshot_date": str(snapshot),
            },
            description=f"Duplicate ({', '.join(key_columns)}): {listed}" if dupes else None,
        )

    return _check


def _latest_metadata(context: dg.AssetCheckExecutionContext, key: dg.AssetKey) -> dict[str, Any]:
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return {}
    return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


def build_group_checks(
    project: ProjectConfig,
    *,
    groups_key: dg.AssetKey | None,
    tracked_key: dg.AssetKey | None,
) -> list[dg.AssetChecksDefinition]:
    """Checks on one project's groups and tracked-groups snapshots."""
    rkey = project.resource_key
    keys = {DUCKDB_RESOURCE_KEY, rkey}
    checks: list[dg.AssetChecksDefinition] = []

    if groups_key is not None:

        @_duckdb_check(
            groups_key,
            "groups_count_per_type_matches_api",
            "Rows per group type in posthog.groups equal the groups the API returned "
            "(api_groups_per_type in the latest materialization's metadata).",
            keys,
        )
        def groups_count_matches(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
            reported = _latest_metadata(context, groups_key).get("api_groups_per_type")
            if not isinstance(reported, dict):
                return dg.AssetCheckResult(
                    passed=False, description="No materialization with per-type counts yet."
                )
            rows = _select(
                context,
                "groups",
                "SELECT group_type_index, count(*) FROM {table} WHERE project_id = ? GROUP BY 1",
                [_project_id(context, rkey)],
            )
            if rows is None:
                return _missing_table("groups")
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

        groups_no_duplicates = _no_duplicates_check(
            groups_key,
            "groups_no_duplicates",
            "groups",
            ("group_type_index", "group_key"),
            keys,
            rkey,
            lambda t, k: f"{t}:{k}",
        )

        checks += [groups_count_matches, groups_no_duplicates]

    if tracked_key is not None:
        tracked: Sequence[tuple[int, str]] = [
            (t.group_type_index, t.group_key) for t in project.groups.tracked
        ]

        @_duckdb_check(
            tracked_key,
            "tracked_groups_present",
            "Every group listed under groups.tracked is found in PostHog.",
            keys,
        )
        def tracked_groups_present(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
            rows = _select(
                context,
                "tracked_groups",
                "SELECT group_type_index, group_key, found FROM {table} WHERE project_id = ?",
                [_project_id(context, rkey)],
            )
            if rows is None:
                return _missing_table("tracked_groups")
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

        checks.append(tracked_groups_present)

    return checks

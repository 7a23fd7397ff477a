"""Asset checks on the snapshot tables. Every check opens DuckDB read-only (STYLE §4).

- insights: the partition is non-empty; in blocking modes no insight came back without a result;
  no duplicate ``(partition, id)`` rows.
- groups: rows per group type in DuckDB equal what the API returned (recorded in the last
  materialization's metadata); no duplicate ``(group_type_index, group_key)`` rows.
- tracked groups: every configured group was found; a failure names the missing keys.
"""


from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb

from posthog_assets.config import BLOCKING_REFRESH_MODES, ResolvedProject
from posthog_assets.duckdb_store import open_read_only, table_ref
from posthog_assets.pools import DUCKDB_POOL
from posthog_assets.snapshot_store import DUCKDB_RESOURCE_KEY, project_id_of, table_exists

PARTITION_TAG = "dagster/partition"
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


def _missing_table(table: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=False, description=f"posthog.{table} does not exist yet: materialize the asset."
    )


def _project_id(context: dg.AssetCheckExecutionContext, resource_key: str) -> str:
    return project_id_of(getattr(context.resources, resource_key))


def _partition_of(
    context: dg.AssetCheckExecutionContext, conn: duckdb.DuckDBPyConnection, project_id: str
) -> str | None:
    """The run's partition; a check run on its own looks at the newest partition in DuckDB.

    The checks are not partitioned themselves (partitioned checks are a preview feature in
    Dagster 1.13): they read the partition from the run's ``dagster/partition`` tag.
    """
    tagged = context.run.tags.get(PARTITION_TAG)
    if tagged:
        return tagged
    rows = conn.execute(
        f'SELECT max("partition")::VARCHAR FROM {table_ref(conn, "insights")} '
        "WHERE project_id = ?",
        [project_id],
    ).fetchall()
    return rows[0][0] if rows else None


def build_insights_checks(
    project: ResolvedProject,
    *,
    asset_key: dg.AssetKey,
) -> list[dg.AssetChecksDefinition]:
    """Checks on one project's insights snapshot (the run's partition, or the newest one)."""
    rkey = project.resource_key
    keys = {DUCKDB_RESOURCE_KEY, rkey}

    @dg.asset_check(
        asset=asset_key,
        name="insights_not_empty",
        description="The snapshot partition has at least one insight.",
        blocking=True,
        required_resource_keys=keys,
        pool=DUCKDB_POOL,  # a read-only open fails while a writer holds the file
    )
    def insights_not_empty(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        with _reader(context) as conn:
            if conn is None or not table_exists(conn, "insights"):
                return _missing_table("insights")
            project_id = _project_id(context, rkey)
            partition = _partition_of(context, conn, project_id)
            ((rows,),) = conn.execute(
                f"SELECT count(*) FROM {table_ref(conn, 'insights')} "
                'WHERE project_id = ? AND "partition" = ?',
                [project_id, partition],
            ).fetchall()
        return dg.AssetCheckResult(
            passed=rows > 0,
            metadata={"rows": rows, "partition": str(partition)},
            description=None if rows else f"No insights in partition {partition}.",
        )

    @dg.asset_check(
        asset=asset_key,
        name="insights_results_present",
        description=(
            "In blocking modes (blocking, force_blocking) every insight has a result; other modes "
            "may legitimately return null (cold cache), so only the count is reported."
        ),
        required_resource_keys=keys,
        pool=DUCKDB_POOL,  # a read-only open fails while a writer holds the file
    )
    def insights_results_present(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        with _reader(context) as conn:
            if conn is None or not table_exists(conn, "insights"):
                return _missing_table("insights")
            project_id = _project_id(context, rkey)
            partition = _partition_of(context, conn, project_id)
            rows = conn.execute(
                f"SELECT id, refresh, query_error FROM {table_ref(conn, 'insights')} "
                'WHERE project_id = ? AND "partition" = ? AND result IS NULL ORDER BY id',
                [project_id, partition],
            ).fetchall()
        blocking = [r for r in rows if r[1] in BLOCKING_REFRESH_MODES]
        listed = "; ".join(
            f"{i} ({err or 'no error given'})" for i, _, err in blocking[:MAX_LISTED]
        )
        return dg.AssetCheckResult(
            passed=not blocking,
            metadata={
                "null_results": len(rows),
                "null_results_in_blocking_modes": len(blocking),
                "partition": str(partition),
            },
            description=(
                f"{len(blocking)} insight(s) without a result in a blocking mode: {listed}"
                if blocking
                else f"{len(rows)} null result(s), none in a blocking mode."
            ),
        )

    @dg.asset_check(
        asset=asset_key,
        name="insights_no_duplicates",
        description="No (partition, id) appears twice in posthog.insights for this project.",
        blocking=True,
        required_resource_keys=keys,
        pool=DUCKDB_POOL,  # a read-only open fails while a writer holds the file
    )
    def insights_no_duplicates(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        with _reader(context) as conn:
            if conn is None or not table_exists(conn, "insights"):
                return _missing_table("insights")
            dupes = conn.execute(
                f'SELECT "partition", id, count(*) FROM {table_ref(conn, "insights")} '
                "WHERE project_id = ? GROUP BY 1, 2 HAVING count(*) > 1 ORDER BY 1, 2 LIMIT ?",
                [_project_id(context, rkey), MAX_LISTED],
            ).fetchall()
        return dg.AssetCheckResult(
            passed=not dupes,
            metadata={"duplicate_keys_listed": len(dupes)},
            description=(
                "Duplicate (partition, id): " + ", ".join(f"({p}, {i}) x{n}" for p, i, n in dupes)
                if dupes
                else None
            ),
        )

    return [insights_not_empty, insights_results_present, insights_no_duplicates]


def _latest_metadata(context: dg.AssetCheckExecutionContext, key: dg.AssetKey) -> dict[str, Any]:
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return {}
    return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


def build_group_checks(
    project: ResolvedProject,
    *,
    groups_key: dg.AssetKey | None,
    tracked_key: dg.AssetKey | None,
) -> list[dg.AssetChecksDefinition]:
    """Checks on one project's groups and tracked-groups snapshots."""
    rkey = project.resource_key
    keys = {DUCKDB_RESOURCE_KEY, rkey}
    checks: list[dg.AssetChecksDefinition] = []

    if groups_key is not None:

        @dg.asset_check(
            asset=groups_key,
            name="groups_count_per_type_matches_api",
            description=(
                "Rows per group type in posthog.groups equal the groups the API returned "
                "(api_groups_per_type in the latest materialization's metadata)."
            ),
            required_resource_keys=keys,
        pool=DUCKDB_POOL,  # a read-only open fails while a writer holds the file
        )
        def groups_count_matches(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
            reported = _latest_metadata(context, groups_key).get("api_groups_per_type")
            if not isinstance(reported, dict):
                return dg.AssetCheckResult(
                    passed=False, description="No materialization with per-type counts yet."
                )
            with _reader(context) as conn:
                if conn is None or not table_exists(conn, "groups"):
                    return _missing_table("groups")
                rows = conn.execute(
                    f"SELECT group_type_index, count(*) FROM {table_ref(conn, 'groups')} "
                    "WHERE project_id = ? GROUP BY 1",
                    [_project_id(context, rkey)],
                ).fetchall()
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

        @dg.asset_check(
            asset=groups_key,
            name="groups_no_duplicates",
            description="No (group_type_index, group_key) appears twice for this project.",
            required_resource_keys=keys,
        pool=DUCKDB_POOL,  # a read-only open fails while a writer holds the file
        )
        def groups_no_duplicates(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
            with _reader(context) as conn:
                if conn is None or not table_exists(conn, "groups"):
                    return _missing_table("groups")
                dupes = conn.execute(
                    "SELECT group_type_index, group_key, count(*) "
                    f"FROM {table_ref(conn, 'groups')} "
                    "WHERE project_id = ? GROUP BY 1, 2 HAVING count(*) > 1 ORDER BY 1, 2 "
                    "LIMIT ?",
                    [_project_id(context, rkey), MAX_LISTED],
                ).fetchall()
            return dg.AssetCheckResult(
                passed=not dupes,
                description=(
                    "Duplicate groups: " + ", ".join(f"{t}:{k} x{n}" for t, k, n in dupes)
                    if dupes
                    else None
                ),
            )

        checks += [groups_count_matches, groups_no_duplicates]

    if tracked_key is not None:
        tracked: Sequence[tuple[int, str]] = [
            (t.group_type_index, t.group_key) for t in project.groups.tracked
        ]

        @dg.asset_check(
            asset=tracked_key,
            name="tracked_groups_present",
            description="Every group listed under groups.tracked still exists in PostHog.",
            required_resource_keys=keys,
        pool=DUCKDB_POOL,  # a read-only open fails while a writer holds the file
        )
        def tracked_groups_present(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
            with _reader(context) as conn:
                if conn is None or not table_exists(conn, "tracked_groups"):
                    return _missing_table("tracked_groups")
                rows = conn.execute(
                    "SELECT group_type_index, group_key, found "
                    f"FROM {table_ref(conn, 'tracked_groups')} "
                    "WHERE project_id = ?",
                    [_project_id(context, rkey)],
                ).fetchall()
            found = {(int(t), str(k)) for t, k, ok in rows if ok}
            missing = [f"{t}:{k}" for t, k in tracked if (t, k) not in found]
            return dg.AssetCheckResult(
                passed=not missing,
                metadata={"tracked": len(tracked), "missing": len(missing)},
                description=(
                    "Tracked group(s) disappeared (group_type_index:group_key): "
                    + ", ".join(missing)
                    if missing
                    else None
                ),
            )

        checks.append(tracked_groups_present)

    return checks

"""``<prefix>/exports_log``: one row per PostHog export in DuckDB table ``posthog.exports``.

A separate, short asset in the ``duckdb`` pool that reads the recorded materializations back from
the Dagster instance, so no API wait ever holds the DuckDB lock.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from posthog_assets.api.private_files import owner_only_umask
from posthog_assets.common import materialization_values
from posthog_assets.config import ProjectConfig
from posthog_assets.pools import DUCKDB_POOL
from posthog_assets.tables import SCHEMA, ensure_table, quote, table_ref
from posthog_assets.translator import (
    DagsterPostHogTranslator,
    PostHogSnapshotProps,
    column_schema,
)

EXPORTS_TABLE = "exports"
#: DuckDB columns of ``posthog.exports`` (one row per export, upserted on project + export id).
EXPORTS_COLUMNS: dict[str, str] = {
    "project_id": "VARCHAR",
    "export_id": "BIGINT",
    "asset_key": "VARCHAR",
    "asset_name": "VARCHAR",
    "insight": "BIGINT",
    "dashboard": "BIGINT",
    "export_format": "VARCHAR",
    "filename": "VARCHAR",
    "path": "VARCHAR",
    "bytes": "BIGINT",
    "sha256": "VARCHAR",
    "created_at": "TIMESTAMPTZ",
    "expires_after": "TIMESTAMPTZ",
    "downloaded_at": "TIMESTAMPTZ",
    "run_id": "VARCHAR",
    "event_storage_id": "BIGINT",
}
_TIME_COLUMNS = ("created_at", "expires_after", "downloaded_at")


def exports_log_spec(
    project: ProjectConfig, translator: DagsterPostHogTranslator | None = None
) -> dg.AssetSpec:
    """The translator's spec of the project's exports log."""
    translator = translator or DagsterPostHogTranslator()
    return translator.get_asset_spec(PostHogSnapshotProps(project, "exports_log"))


def exports_log_key(project: ProjectConfig) -> dg.AssetKey:
    """The log's key with the default translator."""
    return exports_log_spec(project).key


def build_posthog_exports_log_asset(
    *,
    project: ProjectConfig,
    export_keys: Sequence[dg.AssetKey],
    translator: DagsterPostHogTranslator | None = None,
    pool: str = DUCKDB_POOL,
) -> dg.AssetsDefinition:
    """``<prefix>/exports_log``: upsert one ``posthog.exports`` row per recorded export.

    Reads the export assets' materializations from the instance (only those after the newest
    already in the table), so it is short, idempotent (keyed on project id + export id) and
    catches up on exports whose run failed before this step could run.
    """
    keys = list(export_keys)
    spec = exports_log_spec(project, translator)

    @dg.asset(
        key=spec.key,
        deps=keys,
        pool=pool,
        kinds=spec.kinds,
        group_name=spec.group_name,
        description=spec.description,
        tags=spec.tags,
        owners=spec.owners,
        metadata={
            **spec.metadata,
            "dagster/table_name": f"{SCHEMA}.{EXPORTS_TABLE}",
            "dagster/column_schema": column_schema(EXPORTS_COLUMNS),
        },
    )
    def _exports_log(
        context: dg.AssetExecutionContext, duckdb: DuckDBResource
    ) -> dg.MaterializeResult:
        # DuckDB creates the database and its WAL following the umask: keep them 0600
        with owner_only_umask(), duckdb.get_connection() as conn:
            ensure_table(conn, EXPORTS_TABLE, EXPORTS_COLUMNS)
            ref = table_ref(conn, EXPORTS_TABLE)
            marks = dict(
                conn.execute(
                    f"SELECT asset_key, max(event_storage_id) FROM {ref} GROUP BY asset_key"
                ).fetchall()
            )
            rows = [
                row
                for key in keys
                for row in _rows_since(context.instance, key, marks.get(key.to_user_string()))
            ]
            written = upsert_export_rows(conn, rows)
            total = conn.execute(f"SELECT count(*) FROM {ref}").fetchall()[0]
        context.log.info("posthog.exports: upserted %d row(s)", written)
        return dg.MaterializeResult(
            metadata={
                "rows_upserted": dg.MetadataValue.int(written),
                "dagster/row_count": dg.MetadataValue.int(int(total[0]) if total else 0),
                "table": dg.MetadataValue.text(f"{SCHEMA}.{EXPORTS_TABLE}"),
                "dagster/column_schema": dg.MetadataValue.table_schema(
                    column_schema(EXPORTS_COLUMNS)
                ),
            }
        )

    return _exports_log


def _rows_since(
    instance: dg.DagsterInstance, key: dg.AssetKey, after_storage_id: int | None
) -> Iterator[dict[str, Any]]:
    cursor: str | None = None
    while True:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, after_storage_id=after_storage_id),
            limit=500,
            cursor=cursor,
            ascending=True,
        )
        for record in result.records:
            md = materialization_values(record.event_log_entry)
            if "export_id" not in md:
                continue
            yield export_row(key, md, run_id=record.run_id, storage_id=record.storage_id)
        if not result.has_more:
            return
        cursor = result.cursor


def export_row(
    key: dg.AssetKey, md: Mapping[str, Any], *, run_id: str, storage_id: int
) -> dict[str, Any]:
    """One ``posthog.exports`` row from a materialization's metadata values."""
    return {
        "project_id": str(md.get("project_id") or ""),
        "export_id": int(md["export_id"]),
        "asset_key": key.to_user_string(),
        "asset_name": key.path[-1],
        "insight": md.get("insight_id"),
        "dashboard": md.get("dashboard_id"),
        "export_format": md.get("export_format"),
        "filename": md.get("filename"),
        "path": str(md.get("path") or ""),
        "bytes": md.get("bytes"),
        "sha256": md.get("sha256"),
        "created_at": md.get("created_at") or None,
        "expires_after": md.get("expires_after") or None,
        "downloaded_at": md.get("downloaded_at") or None,
        "run_id": run_id,
        "event_storage_id": storage_id,
    }


def upsert_export_rows(conn: Any, rows: Sequence[Mapping[str, Any]]) -> int:
    """Replace rows with the same (project_id, export_id), in one transaction; return count."""
    if not rows:
        return 0
    names = list(EXPORTS_COLUMNS)
    frame = pd.DataFrame([{n: r.get(n) for n in names} for r in rows], columns=names)
    for col in ("export_id", "insight", "dashboard", "bytes", "event_storage_id"):
        frame[col] = pd.array(frame[col], dtype="Int64")
    for col in _TIME_COLUMNS:
        frame[col] = frame[col].astype("string")
    table = table_ref(conn, EXPORTS_TABLE)
    select = ", ".join(
        f"TRY_CAST({quote(n)} AS TIMESTAMPTZ) AS {quote(n)}" if n in _TIME_COLUMNS else quote(n)
        for n in names
    )
    conn.register("incoming_exports", frame)
    try:
        conn.execute("BEGIN TRANSACTION")
        try:
            conn.execute(
                f"CREATE OR REPLACE TEMP TABLE exports_batch AS SELECT {select} "
                "FROM incoming_exports QUALIFY row_number() OVER ("
                "PARTITION BY project_id, export_id ORDER BY event_storage_id DESC) = 1"
            )
            conn.execute(
                f"DELETE FROM {table} AS t USING exports_batch AS b "
                "WHERE t.project_id = b.project_id AND t.export_id = b.export_id"
            )
            cols = ", ".join(quote(n) for n in names)
            conn.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM exports_batch")
            written = conn.execute("SELECT count(*) FROM exports_batch").fetchall()[0]
            conn.execute("DROP TABLE exports_batch")
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.unregister("incoming_exports")
    return int(written[0]) if written else 0

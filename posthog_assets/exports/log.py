"""``<prefix>/exports_log``: one row per PostHog export in DuckDB table ``posthog.exports``.

A separate, short asset in the ``duckdb`` pool that reads the recorded materializations back from
the Dagster instance, so no API wait ever holds the DuckDB lock.
"""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from posthog_assets.api.private_files import owner_only_umask
from posthog_assets.config import PostHogProject
from posthog_assets.exports.records import ExportMaterialization
from posthog_assets.pools import DUCKDB_POOL
from posthog_assets.tables import EXPORTS_GROUP, Table, columns, ensure_table, quote
from posthog_assets.translator import DagsterPostHogTranslator, PostHogSnapshotProps, table_schema

#: ``posthog.exports``: one row per export, upserted on project + export id.
EXPORTS_LOG_TABLE = Table(
    name="exports",
    asset_name="exports_log",
    description="One row per PostHog export (file path, bytes, sha256, expiry), in DuckDB.",
    group=EXPORTS_GROUP,
    snapshot_columns=False,
    columns=columns("""
        project_id        VARCHAR      The PostHog project the export belongs to.
        export_id         BIGINT       PostHog's id of the export (exported asset).
        asset_key         VARCHAR      The Dagster asset that made the export.
        asset_name        VARCHAR      That asset's name.
        insight           BIGINT       The exported insight's id (null for a dashboard).
        dashboard         BIGINT       The exported dashboard's id (null for an insight).
        export_format     VARCHAR      The MIME type: image/png, text/csv or XLSX.
        filename          VARCHAR      The file's name as PostHog gave it.
        path              VARCHAR      Where the file was written.
        bytes             BIGINT       The file's size.
        sha256            VARCHAR      The file's SHA-256, as written.
        created_at        TIMESTAMPTZ  When PostHog created the export.
        expires_after     TIMESTAMPTZ  When PostHog deletes its copy of the content.
        downloaded_at     TIMESTAMPTZ  When the file was downloaded.
        run_id            VARCHAR      The Dagster run that made the export.
        event_storage_id  BIGINT       The materialization event the row was read from.
    """),
)


def exports_log_spec(
    project: PostHogProject, translator: DagsterPostHogTranslator | None = None
) -> dg.AssetSpec:
    """The translator's spec of the project's exports log."""
    translator = translator or DagsterPostHogTranslator()
    return translator.get_asset_spec(PostHogSnapshotProps(project, EXPORTS_LOG_TABLE))


def exports_log_key(project: PostHogProject) -> dg.AssetKey:
    """The log's key with the default translator."""
    return exports_log_spec(project).key


def build_posthog_exports_log_asset(
    *,
    project: PostHogProject,
    export_keys: Sequence[dg.AssetKey],
    translator: DagsterPostHogTranslator | None = None,
    pool: str = DUCKDB_POOL,
) -> dg.AssetsDefinition:
    """``<prefix>/exports_log``: upsert one ``posthog.exports`` row per recorded export, read
    from the instance (materializations after the newest in the table): short, idempotent (keyed
    on project id + export id), and it catches up on exports whose run failed before it ran."""
    keys = list(export_keys)
    spec = exports_log_spec(project, translator).replace_attributes(deps=keys)

    # The translator's spec as it is; named as ``@dg.asset`` would name the op.
    @dg.multi_asset(specs=[spec], name=spec.key.to_python_identifier(), pool=pool)
    def _exports_log(
        context: dg.AssetExecutionContext, duckdb: DuckDBResource
    ) -> dg.MaterializeResult:
        # DuckDB creates the database and its WAL following the umask: keep them 0600
        with owner_only_umask(), duckdb.get_connection() as conn:
            ensure_table(conn, EXPORTS_LOG_TABLE.name, EXPORTS_LOG_TABLE.types)
            ref = EXPORTS_LOG_TABLE.ref(conn)
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
                "table": dg.MetadataValue.text(EXPORTS_LOG_TABLE.qualified_name),
                "dagster/column_schema": dg.MetadataValue.table_schema(
                    table_schema(EXPORTS_LOG_TABLE)
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
            export = ExportMaterialization.from_event(record.event_log_entry)
            if export is not None:
                yield export_row(key, export, run_id=record.run_id, storage_id=record.storage_id)
        if not result.has_more:
            return
        cursor = result.cursor


def export_row(
    key: dg.AssetKey, export: ExportMaterialization, *, run_id: str, storage_id: int
) -> dict[str, Any]:
    """One ``posthog.exports`` row from a recorded materialization: its fields named like a
    column fill that column, the others are not written."""
    return {
        **asdict(export),
        "project_id": export.project_id or "",
        "asset_key": key.to_user_string(),
        "asset_name": key.path[-1],
        "insight": export.insight_id,
        "dashboard": export.dashboard_id,
        "path": export.path or "",
        "run_id": run_id,
        "event_storage_id": storage_id,
    }


def upsert_export_rows(conn: Any, rows: Sequence[Mapping[str, Any]]) -> int:
    """Replace rows with the same (project_id, export_id), in one transaction (the newest row of
    each wins); return how many were written."""
    if not rows:
        return 0
    types = EXPORTS_LOG_TABLE.types
    names = list(types)
    frame = pd.DataFrame([{n: r.get(n) for n in names} for r in rows], columns=names)
    frame = frame.astype({n: "Int64" if t == "BIGINT" else "string" for n, t in types.items()})
    frame = frame.sort_values("event_storage_id").drop_duplicates(
        ["project_id", "export_id"], keep="last"
    )
    table = EXPORTS_LOG_TABLE.ref(conn)
    select = ", ".join(
        f"TRY_CAST({quote(n)} AS {t})" if t == "TIMESTAMPTZ" else quote(n) for n, t in types.items()
    )
    conn.register("incoming_exports", frame)
    try:
        conn.execute("BEGIN TRANSACTION")
        try:
            conn.execute(
                f"DELETE FROM {table} AS t USING incoming_exports AS b "
                "WHERE t.project_id = b.project_id AND t.export_id = b.export_id"
            )
            cols = ", ".join(quote(n) for n in names)
            conn.execute(f"INSERT INTO {table} ({cols}) SELECT {select} FROM incoming_exports")
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.unregister("incoming_exports")
    return len(frame)

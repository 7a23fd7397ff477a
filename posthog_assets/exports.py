"""Export assets: one asset per configured export, all of a project's exports in one step.

Why one ``multi_asset`` step with threads inside (rather than one step per export): an export is
almost all waiting (PostHog renders, we poll), so twenty exports in twenty threads wait together and
a run takes about as long as its slowest export, without twenty process spawns (seconds each) or a
multiprocess executor. ``can_subset=True`` keeps every export individually selectable; the
``posthog_api`` pool bounds how many such steps hit PostHog at once across runs.

DuckDB is written by a separate, short ``exports_log`` asset in the ``duckdb`` pool that reads the
recorded materializations back from the instance, so no API wait ever holds the DuckDB lock.
"""

import base64
import csv
import html
import struct
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from posthog_assets.client import PostHogClient
from posthog_assets.config import ExportConfig, ResolvedProject, Settings
from posthog_assets.duckdb_store import SCHEMA, ensure_table, quote, table_ref
from posthog_assets.export_runner import (
    ExportOutcome,
    ExportRequest,
    ExportRunner,
    PollSettings,
    failure_kind,
)
from posthog_assets.resources import PostHogResource
from posthog_assets.translator import (
    EXPORTS_GROUP,
    DagsterPostHogTranslator,
    PostHogExportProps,
    PostHogMetadataSet,
)

#: Run tag that pins which logical exports a run resumes (set by the retry sensor on its runs).
TAG_DEDUP_ROOT = "posthog/export_dedup_root"
#: Key of the ``dg.Failure`` metadata entry listing failed exports (read by the retry sensor).
FAILURES_METADATA_KEY = "posthog_export_failures"
EXPORTS_TABLE = "exports"
DEFAULT_MAX_CONCURRENT_EXPORTS = 32
#: Embed a PNG in the UI only below this size (base64 grows it by a third; event rows stay small).
PNG_PREVIEW_MAX_BYTES = 150_000
PREVIEW_ROWS = 10
PREVIEW_MAX_COLUMNS = 20
PREVIEW_MAX_CELL = 60
#: Up to this size CSV rows are counted exactly with the csv module; above it, by line count.
CSV_EXACT_COUNT_MAX_BYTES = 64 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

DEFAULT_EXPORT_RETRY_POLICY = dg.RetryPolicy(
    max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)

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


def exports_op_name(project: ResolvedProject) -> str:
    return "_".join([*project.key_prefix, "exports"])


def exports_log_key(project: ResolvedProject) -> dg.AssetKey:
    return dg.AssetKey([*project.key_prefix, "exports_log"])


def export_specs(
    project: ResolvedProject, translator: DagsterPostHogTranslator | None = None
) -> list[dg.AssetSpec]:
    """The translator's spec for every configured export of ``project`` (no HTTP)."""
    translator = translator or DagsterPostHogTranslator()
    return [
        translator.get_asset_spec(PostHogExportProps(project=project, export=export))
        for export in project.exports
    ]


# ---------------------------------------------------------------------- the export step


@dataclass(frozen=True)
class _Job:
    spec: dg.AssetSpec
    request: ExportRequest
    exclude_ids: frozenset[int]
    scan_list: bool


def build_posthog_export_assets(
    *,
    project: ResolvedProject,
    translator: DagsterPostHogTranslator | None = None,
    max_concurrent_exports: int = DEFAULT_MAX_CONCURRENT_EXPORTS,
    retry_policy: dg.RetryPolicy | None = DEFAULT_EXPORT_RETRY_POLICY,
    pool: str = "posthog_api",
) -> list[dg.AssetsDefinition]:
    """One ``multi_asset`` holding every export of ``project`` (empty list when there are none).

    Args:
        project: The configured project; its exports become assets via ``translator``.
        translator: Override keys, groups, tags, descriptions (``replace_attributes``).
        max_concurrent_exports: Threads waiting on PostHog at once inside the step.
        retry_policy: In-run step retries for retryable failures (timeouts, 5xx, 429).
        pool: Dagster concurrency pool bounding PostHog steps across runs.
    """
    specs = export_specs(project, translator)
    if not specs:
        return []
    configs: dict[str, ExportConfig] = {e.name: e for e in project.exports}
    resource_key = project.resource_key

    @dg.multi_asset(
        name=exports_op_name(project),
        specs=specs,
        can_subset=True,
        pool=pool,
        retry_policy=retry_policy,
        required_resource_keys={resource_key},
        description=f"PostHog exports of project '{project.name}', rendered and downloaded "
        "concurrently.",
    )
    def _posthog_exports(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        resource: PostHogResource = getattr(context.resources, resource_key)
        client = resource.get_client(log=context.log)
        runner = ExportRunner(
            client,
            resource.export_path,
            poll=PollSettings(
                interval_s=resource.poll_interval_s,
                max_interval_s=resource.poll_max_interval_s,
                timeout_s=resource.poll_timeout_s,
            ),
            log=context.log,
        )
        selected = [s for s in specs if s.key in context.selected_asset_keys]
        latest = context.instance.get_latest_materialization_events([s.key for s in selected])
        root = _dedup_root(context)
        # A first attempt of a brand-new run cannot have exports of its own yet: skip the list.
        scan_list = context.retry_number > 0 or root != context.run.run_id
        partition = context.partition_key if context.has_partition_key else ""

        jobs: list[_Job] = []
        for spec in selected:
            event = latest.get(spec.key)
            previous = materialization_values(event)
            if event is not None and event.run_id == context.run.run_id and previous:
                # An earlier attempt of this very step already finished this export: report it
                # again instead of asking PostHog for another one.
                context.log.info(
                    "%s: already exported by an earlier attempt of this step (export %s)",
                    spec.key.to_user_string(),
                    previous.get("export_id"),
                )
                yield dg.MaterializeResult(
                    asset_key=spec.key,
                    metadata=dict(event.asset_materialization.metadata),  # type: ignore[union-attr]
                )
                continue
            ids = PostHogMetadataSet.extract(spec.metadata)
            config = configs[str(ids.export_name)]
            request = ExportRequest(
                asset_name=str(ids.export_name),
                export_format=str(ids.export_format or config.export_format),
                dedup_key=f"{spec.key.to_user_string()}|{root}|{partition}",
                insight=ids.insight_id,
                dashboard=ids.dashboard_id,
                export_context=config.export_context,
            )
            prev_id = previous.get("export_id")
            exclude = frozenset({int(prev_id)}) if isinstance(prev_id, int) else frozenset()
            jobs.append(_Job(spec, request, exclude, scan_list))
        if not jobs:
            return

        failures: list[dict[str, Any]] = []
        workers = max(1, min(max_concurrent_exports, len(jobs)))
        context.log.info("Running %d PostHog export(s) with %d thread(s)", len(jobs), workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="posthog-export") as tp:
            futures: dict[Future[dict[str, Any]], _Job] = {
                tp.submit(_export_one, runner, client, resource.project_id, job): job
                for job in jobs
            }
            for future in as_completed(futures):
                job = futures[future]
                try:
                    metadata = future.result()
                except Exception as exc:  # collected: every export gets its chance
                    kind, retryable = failure_kind(exc)
                    failures.append(
                        {
                            "asset_key": job.spec.key.to_user_string(),
                            "export_name": job.request.asset_name,
                            "export_id": getattr(exc, "export_id", None),
                            "kind": kind,
                            "retryable": retryable,
                            # When PostHog's rate limit will let a retry through (epoch seconds).
                            "retry_at": getattr(exc, "retry_at", None),
                            "message": str(exc),
                        }
                    )
                    context.log.error(
                        "%s failed (%s): %s", job.spec.key.to_user_string(), kind, exc
                    )
                    continue
                yield dg.MaterializeResult(asset_key=job.spec.key, metadata=metadata)

        if failures:
            failures.sort(key=lambda f: f["asset_key"])
            any_retryable = any(f["retryable"] for f in failures)
            lines = [
                f"- {f['export_name']} (export {f['export_id'] or 'not created'}, {f['kind']}, "
                f"{'retryable' if f['retryable'] else 'not retryable'}): {f['message']}"
                for f in failures
            ]
            raise dg.Failure(
                description=f"{len(failures)} of {len(jobs)} PostHog export(s) failed:\n"
                + "\n".join(lines),
                metadata={FAILURES_METADATA_KEY: dg.MetadataValue.json(failures)},
                allow_retries=any_retryable,
            )

    return [_posthog_exports]


def _dedup_root(context: dg.AssetExecutionContext) -> str:
    return dedup_root_from_tags(context.run.tags, context.run.run_id)


def dedup_root_from_tags(tags: Mapping[str, str], run_id: str) -> str:
    """What makes two attempts "the same logical export".

    A step retry (same run), a re-execution (same ``dagster/root_run_id``) and a retry-sensor run
    (``posthog/export_dedup_root``) keep it, so they resume; a new scheduled run does not.
    """
    return tags.get(TAG_DEDUP_ROOT) or tags.get("dagster/root_run_id") or run_id


def materialization_values(event: dg.EventLogEntry | None) -> dict[str, Any]:
    """Raw values of a materialization's metadata (``MetadataValue.value``)."""
    if event is None or event.asset_materialization is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def _export_one(
    runner: ExportRunner, client: PostHogClient, project_id: str, job: _Job
) -> dict[str, Any]:
    outcome = runner.run(job.request, exclude_ids=job.exclude_ids, scan_list=job.scan_list)
    return outcome_metadata(outcome, client=client, project_id=project_id)


def outcome_metadata(
    outcome: ExportOutcome, *, client: PostHogClient, project_id: str
) -> dict[str, Any]:
    """What a materialization records: ids, file facts, UI link, waiting, and a preview."""
    metadata: dict[str, Any] = {
        "export_id": dg.MetadataValue.int(outcome.export_id),
        "export_format": dg.MetadataValue.text(outcome.export_format),
        "path": dg.MetadataValue.path(str(outcome.path)),
        "filename": dg.MetadataValue.text(outcome.server_filename or outcome.path.name),
        "bytes": dg.MetadataValue.int(outcome.bytes),
        "sha256": dg.MetadataValue.text(outcome.sha256),
        "created_at": dg.MetadataValue.text(outcome.created_at or ""),
        "expires_after": dg.MetadataValue.text(outcome.expires_after or ""),
        "downloaded_at": dg.MetadataValue.text(outcome.downloaded_at),
        "project_id": dg.MetadataValue.text(str(project_id)),
        "poll_count": dg.MetadataValue.int(outcome.poll_count),
        "wait_s": dg.MetadataValue.float(float(outcome.wait_s)),
        "resumed": dg.MetadataValue.bool(outcome.resumed),
        "recreated": dg.MetadataValue.bool(outcome.recreated),
    }
    if outcome.insight is not None:
        metadata["insight_id"] = dg.MetadataValue.int(outcome.insight)
        metadata["posthog_url"] = dg.MetadataValue.url(client.ui_url("insights", outcome.insight))
    if outcome.dashboard is not None:
        metadata["dashboard_id"] = dg.MetadataValue.int(outcome.dashboard)
        metadata["posthog_url"] = dg.MetadataValue.url(
            client.ui_url("dashboard", outcome.dashboard)
        )
    metadata.update(file_preview_metadata(outcome.path, outcome.export_format))
    return metadata


# ---------------------------------------------------------------------- previews


def file_preview_metadata(path: Path, export_format: str) -> dict[str, Any]:
    """Format-specific facts read from the head of the file only (never the whole thing)."""
    try:
        if export_format == "image/png":
            return _png_preview(path)
        if export_format == "text/csv":
            return _csv_preview(path)
        if export_format.endswith("spreadsheetml.sheet"):
            return _xlsx_preview(path)
    except Exception as exc:  # a preview must never fail the export itself
        return {"preview": dg.MetadataValue.md(f"_No preview: {html.escape(str(exc))}_")}
    return {}


def png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the IHDR chunk, or None if this is not a PNG."""
    with path.open("rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _png_preview(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    dims = png_size(path)
    meta: dict[str, Any] = {}
    if dims:
        meta["image_width"] = dg.MetadataValue.int(dims[0])
        meta["image_height"] = dg.MetadataValue.int(dims[1])
    if size <= PNG_PREVIEW_MAX_BYTES and dims:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        meta["preview"] = dg.MetadataValue.md(f"![export preview](data:image/png;base64,{data})")
    else:
        meta["preview"] = dg.MetadataValue.md(
            f"_Preview not embedded: the image is {size / 1e6:.1f} MB (limit "
            f"{PNG_PREVIEW_MAX_BYTES // 1000} kB); open the file at `path`._"
        )
    return meta


def _csv_preview(path: Path) -> dict[str, Any]:
    head = pd.read_csv(path, nrows=PREVIEW_ROWS, dtype=str, keep_default_na=False)
    rows, method = count_csv_rows(path)
    return {
        "dagster/row_count": dg.MetadataValue.int(rows),
        "row_count_method": dg.MetadataValue.text(method),
        "columns": dg.MetadataValue.int(len(head.columns)),
        "preview": dg.MetadataValue.md(
            markdown_table([str(c) for c in head.columns], head.values.tolist())
        ),
    }


def count_csv_rows(path: Path) -> tuple[int, str]:
    """Data rows (header excluded), streaming: exact for small files, line count for big ones."""
    if path.stat().st_size <= CSV_EXACT_COUNT_MAX_BYTES:
        with path.open(newline="", encoding="utf-8", errors="replace") as fh:
            total = sum(1 for _ in csv.reader(fh))
        return max(0, total - 1), "exact"
    lines = 0
    last = b"\n"
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":
        lines += 1
    return max(0, lines - 1), "lines (approximate if cells contain line breaks)"


def _xlsx_preview(path: Path) -> dict[str, Any]:
    import openpyxl

    wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        ws = wb.active
        if ws is None:
            return {}
        max_row, max_col = ws.max_row, ws.max_column
        rows = [list(r) for r in ws.iter_rows(max_row=PREVIEW_ROWS + 1, values_only=True)]
        if max_row is None or max_col is None:  # no <dimension>: count by streaming
            max_row = sum(1 for _ in ws.iter_rows(values_only=True))
            max_col = max((len(r) for r in rows), default=0)
    finally:
        wb.close()
    header = [str(c) if c is not None else "" for c in (rows[0] if rows else [])]
    return {
        "dagster/row_count": dg.MetadataValue.int(max(0, int(max_row) - 1)),
        "columns": dg.MetadataValue.int(int(max_col)),
        "sheets": dg.MetadataValue.int(len(wb.sheetnames)),
        "preview": dg.MetadataValue.md(markdown_table(header, rows[1:])),
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A small markdown table: capped columns and cell width, pipes escaped."""

    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        text = text.replace("\r", " ").replace("\n", " ").replace("|", "\\|")
        return text if len(text) <= PREVIEW_MAX_CELL else text[: PREVIEW_MAX_CELL - 1] + "…"

    cols = list(header)[:PREVIEW_MAX_COLUMNS]
    if not cols:
        return "_Empty table._"
    more = len(header) - len(cols)
    lines = [
        "| " + " | ".join(cell(c) for c in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in list(rows)[:PREVIEW_ROWS]:
        values = list(row)[: len(cols)] + [""] * max(0, len(cols) - len(row))
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    if more > 0:
        lines.append(f"\n_{more} more column(s) not shown._")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the DuckDB log


def build_posthog_exports_log_asset(
    *, project: ResolvedProject, export_keys: Sequence[dg.AssetKey], pool: str = "duckdb"
) -> dg.AssetsDefinition:
    """``<prefix>/exports_log``: upsert one ``posthog.exports`` row per recorded export.

    Reads the export assets' materializations from the instance (only those after the newest
    already in the table), so it is short, idempotent (keyed on project id + export id) and
    catches up on exports whose run failed before this step could run.
    """
    keys = list(export_keys)

    @dg.asset(
        key=exports_log_key(project),
        deps=keys,
        pool=pool,
        kinds={"posthog", "duckdb"},
        group_name=EXPORTS_GROUP,
        description=f"One row per PostHog export of project '{project.name}' in DuckDB table "
        f"{SCHEMA}.{EXPORTS_TABLE} (file path, bytes, sha256, expiry).",
        metadata={"dagster/table_name": f"{SCHEMA}.{EXPORTS_TABLE}"},
    )
    def _exports_log(
        context: dg.AssetExecutionContext, duckdb: DuckDBResource
    ) -> dg.MaterializeResult:
        with duckdb.get_connection() as conn:
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


# ---------------------------------------------------------------------- definitions


def build_posthog_export_definitions(
    settings: Settings, *, translator: DagsterPostHogTranslator | None = None
) -> dg.Definitions:
    """Export assets, the DuckDB log, checks and sensors for every configured project.

    Resources (``posthog``/``posthog_<project>`` and ``duckdb``) come from
    :func:`posthog_assets.resources.build_resources`. No HTTP call happens here.
    """
    # Imported here: the checks and sensors modules import names from this one.
    from posthog_assets.export_checks import build_posthog_export_checks
    from posthog_assets.export_sensors import (
        build_posthog_export_expiry_sensor,
        build_posthog_export_retry_sensor,
    )

    assets: list[dg.AssetsDefinition] = []
    checks: list[dg.AssetChecksDefinition] = []
    sensors: list[dg.SensorDefinition] = []
    for project in settings.projects:
        export_assets = build_posthog_export_assets(project=project, translator=translator)
        if not export_assets:
            continue
        keys = [k for a in export_assets for k in a.keys]
        log_asset = build_posthog_exports_log_asset(project=project, export_keys=keys)
        assets += [*export_assets, log_asset]
        checks += build_posthog_export_checks(project=project, export_assets=export_assets)
        sensors += [
            build_posthog_export_expiry_sensor(
                project=project, export_keys=keys, log_key=exports_log_key(project)
            ),
            build_posthog_export_retry_sensor(
                project=project, export_assets=export_assets, log_key=exports_log_key(project)
            ),
        ]
    return dg.Definitions(assets=assets, asset_checks=checks, sensors=sensors)

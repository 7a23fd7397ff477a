"""Staging and writing of snapshot tables, shared by the insight and group assets.

Fetching and writing are separate steps (STYLE §4): the fetch step appends each page's rows to a
newline-delimited JSON file as the page arrives, so memory stays flat however many rows there are;
the write step then replaces the snapshot's rows in DuckDB in ONE short transaction::

    DELETE FROM posthog.<table> WHERE project_id = ? [AND snapshot_date = ?];
    INSERT INTO posthog.<table> (<explicit columns>) SELECT <explicit columns> FROM read_json(...);

DuckDB parses the staging file itself (typed by the table's schema), so no row passes through
pandas and the column order of the file never matters. ``ensure_table`` adds a new column in place
first, so a schema change never loses rows.
"""


import json
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import dagster as dg
import duckdb

from posthog_assets.config import parse_project_id
from posthog_assets.duckdb_store import SCHEMA, ensure_table, quote, table_ref
from posthog_assets.errors import PostHogError

#: Folder (next to the DuckDB file) that holds staging files between the fetch and write steps.
STAGING_DIRNAME = ".posthog_staging"
#: Written into an asset's staging folder once its fetch step has finished.
STAGED_MARKER = ".fetched"
#: A failed run's finished fetches stay this long, so "re-execute from failure" can still write
#: them; an unfinished fetch of a finished run is removed at once (no step will read it).
FAILED_STAGING_KEEP_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class SnapshotTable:
    """One snapshot table: its columns (ordered, with SQL types) and how a snapshot is scoped.

    ``scope`` columns (e.g. ``project_id``, ``snapshot_date``) and ``snapshot_at`` are written as
    constants by the write step; all other columns come from the staged rows.
    """

    name: str
    columns: Mapping[str, str]
    scope: tuple[str, ...] = ("project_id",)
    constants: tuple[str, ...] = ("project_id", "snapshot_at")
    #: Columns renamed since an earlier version (old name -> new), renamed in place on write.
    renamed: Mapping[str, str] = field(default_factory=dict)

    def ref(self, conn: duckdb.DuckDBPyConnection) -> str:
        """Catalog-qualified name (a file called posthog.duckdb makes ``posthog.x`` ambiguous)."""
        return table_ref(conn, self.name)

    @property
    def staged_columns(self) -> dict[str, str]:
        return {c: t for c, t in self.columns.items() if c not in self.constants}


#: A staging file is closed and a new one started past this size. DuckDB reads a list of small
#: NDJSON files with less memory than one big file, so the write step's peak stays flat.
STAGING_ROTATE_BYTES = 4 << 20


class StagingFile:
    """Appends rows as NDJSON to ``<stem>-NNNNN.ndjson`` files as pages arrive.

    Thread-safe; only one page is in memory at a time. Only the table's staged columns are
    written, so a payload's extra keys never reach DuckDB. ``files`` lists what was written.
    """

    def __init__(
        self, stem: Path, schema: SnapshotTable, *, rotate_bytes: int = STAGING_ROTATE_BYTES
    ) -> None:
        self.stem = Path(stem)
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self._columns = tuple(schema.staged_columns)
        self._rotate_bytes = rotate_bytes
        self._lock = threading.Lock()
        self.files: list[str] = []
        self._fh: IO[str] | None = None
        self._size = 0
        self.rows = 0
        self._closed = False

    def _next_file(self) -> IO[str]:
        if self._fh is not None:
            self._fh.close()
        path = self.stem.with_name(f"{self.stem.name}-{len(self.files):05d}.ndjson")
        self.files.append(str(path))
        self._size = 0
        self._fh = path.open("w", encoding="utf-8", buffering=1 << 20)
        return self._fh

    def write(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Serialise ``rows`` (outside the lock) and append them; return how many were written."""
        cols = self._columns
        lines = [
            json.dumps({c: row.get(c) for c in cols}, separators=(",", ":"), default=str)
            for row in rows
        ]
        if not lines:
            return 0
        text = "\n".join(lines) + "\n"
        with self._lock:
            if self._closed:
                raise RuntimeError(f"staging {self.stem.name} is already closed")
            fh = self._fh
            if fh is None or self._size >= self._rotate_bytes:
                fh = self._next_file()
            fh.write(text)
            self._size += len(text)
            self.rows += len(lines)
        return len(lines)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> "StagingFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class StagedSnapshot:
    """What a fetch step hands to its write step: small, picklable, no row data."""

    files: list[str]
    rows: int
    scope: dict[str, Any]
    snapshot_at: str
    stats: dict[str, Any] = field(default_factory=dict)


def staging_root(database: str | Path) -> Path:
    """Staging lives next to the DuckDB file, on the same disk as the data it becomes."""
    if str(database) in (":memory:", ""):
        raise ValueError("snapshot assets need a DuckDB file path, not ':memory:'")
    return Path(database).resolve().parent / STAGING_DIRNAME


def staging_dir(database: str | Path, run_id: str, name: str) -> Path:
    """A fresh per-run, per-asset folder (a retried fetch starts from an empty folder)."""
    folder = staging_root(database) / run_id / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def remove_staging(files: Sequence[str | Path]) -> None:
    """Delete staged files and their (then empty) folders once their rows are committed."""
    folders = set()
    for f in files:
        p = Path(f)
        p.unlink(missing_ok=True)
        folders.add(p.parent)
    for folder in folders:
        (folder / STAGED_MARKER).unlink(missing_ok=True)
        for candidate in (folder, folder.parent):
            with suppress(OSError):
                candidate.rmdir()


def remove_stale_staging(
    database: str | Path, instance: dg.DagsterInstance, *, now: float | None = None
) -> list[Path]:
    """Delete what finished runs left in staging: a killed or failed fetch's partial files at
    once, a failed run's finished fetch after ``FAILED_STAGING_KEEP_S``.

    Folders of runs still going, or of runs this instance does not know (another Dagster home
    may share the folder), are left alone.
    """
    root = staging_root(database)
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    removed: list[Path] = []
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        run = instance.get_run_by_id(run_dir.name)
        if run is None or not run.is_finished:
            continue
        for folder in [p for p in run_dir.iterdir() if p.is_dir()]:
            marker = folder / STAGED_MARKER
            fetched = marker.exists()
            if (
                fetched
                and run.status != dg.DagsterRunStatus.SUCCESS
                and now - marker.stat().st_mtime < FAILED_STAGING_KEEP_S
            ):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        with suppress(OSError):
            run_dir.rmdir()
    return removed


#: DuckDB settings of the write step, unless ``DuckDBResource.connection_config`` sets them. The
#: write is one streaming INSERT ... SELECT: one thread and a bounded buffer pool keep the peak
#: memory of the step nearly flat however large the snapshot is (DuckDB spills beyond it).
WRITE_SETTINGS = {"threads": "1", "memory_limit": "'64MB'"}


@contextmanager
def writer_connection(duckdb_resource: Any) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-write connection from ``DuckDBResource`` that is closed even when the write fails.

    ``DuckDBResource.get_connection`` closes only on success; a failed write in a long-lived
    process would otherwise keep the file lock (STYLE §4).
    """
    configured = getattr(duckdb_resource, "connection_config", None) or {}
    with duckdb_resource.get_connection() as conn:
        try:
            for name, value in WRITE_SETTINGS.items():
                if name not in configured:
                    conn.execute(f"SET {name} = {value}")
            yield conn
        finally:
            conn.close()


def _read_json_sql(schema: SnapshotTable) -> str:
    cols = ", ".join(f"{_sql_str(c)}: {_sql_str(t)}" for c, t in schema.staged_columns.items())
    return (
        f"read_json($files, format = 'newline_delimited', columns = {{{cols}}}, "
        "maximum_object_size = 16777216)"
    )


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def replace_snapshot(
    conn: duckdb.DuckDBPyConnection,
    schema: SnapshotTable,
    staged: StagedSnapshot,
    *,
    views: Sequence[Callable[[duckdb.DuckDBPyConnection], str]] = (),
) -> int:
    """Replace the rows of ``staged.scope`` with the staged rows, atomically; return rows inserted.

    Runs ``ensure_table`` (adds missing columns, keeps rows), then one transaction with the
    ``DELETE`` of the scope, the ``INSERT ... SELECT`` with explicit columns, and any view DDL.
    Either everything commits or nothing changes.
    """
    missing = [f for f in staged.files if not Path(f).exists()]
    if missing:  # never replace a snapshot with a partial one
        raise FileNotFoundError(
            f"{len(missing)} staging file(s) of {SCHEMA}.{schema.name} are gone (e.g. "
            f"{Path(missing[0]).name}); the table was not changed: re-run the fetch step"
        )
    ensure_table(conn, schema.name, schema.columns, renamed=schema.renamed)
    files = [f for f in staged.files if Path(f).stat().st_size > 0]
    where = " AND ".join(f"{quote(c)} = ?" for c in schema.scope)
    scope_values = [staged.scope[c] for c in schema.scope]
    names = list(schema.columns)
    select_parts = []
    params: dict[str, Any] = {"files": files}
    for c in names:
        if c in schema.constants:
            params[f"c_{c}"] = staged.snapshot_at if c == "snapshot_at" else staged.scope[c]
            select_parts.append(f"CAST($c_{c} AS {schema.columns[c]}) AS {quote(c)}")
        else:
            select_parts.append(quote(c))
    col_list = ", ".join(quote(c) for c in names)
    target = schema.ref(conn)
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.execute(f"DELETE FROM {target} WHERE {where}", scope_values)
        inserted = 0
        if files:
            rows = conn.execute(
                f"INSERT INTO {target} ({col_list}) "
                f"SELECT {', '.join(select_parts)} FROM {_read_json_sql(schema)}",
                params,
            ).fetchall()
            inserted = int(rows[0][0]) if rows else 0
        if inserted != staged.rows:
            raise RuntimeError(
                f"{SCHEMA}.{schema.name}: staged {staged.rows} rows but read back {inserted}; "
                "rolled back, the table was not changed"
            )
        for view_sql in views:
            conn.execute(view_sql(conn))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return inserted


# ------------------------------------------------------------------------------------------------
# Dagster wiring: one asset = a fetch op (pool posthog_api) + a write op (pool duckdb).

POOL_API = "posthog_api"
POOL_DUCKDB = "duckdb"
DUCKDB_RESOURCE_KEY = "duckdb"

#: Step retries for transient PostHog trouble that outlived the client's own request retries.
FETCH_RETRY_POLICY = dg.RetryPolicy(
    max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)

FetchFn = Callable[[dg.OpExecutionContext, Any, Path], StagedSnapshot]
DescribeFn = Callable[[duckdb.DuckDBPyConnection, StagedSnapshot], Mapping[str, Any]]


def project_id_of(resource: Any) -> str:
    """The project id as stored in every table: text, normalised (``@current`` is possible)."""
    return str(parse_project_id(resource.project_id))


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat()


def fatal_failure(exc: PostHogError) -> dg.Failure:
    """A failure a step retry cannot heal; says when PostHog accepts requests again, if known."""
    retry_at = getattr(exc, "retry_at", None)
    metadata = {"retry_at": dg.MetadataValue.float(float(retry_at))} if retry_at else {}
    return dg.Failure(description=str(exc), allow_retries=False, metadata=metadata)


def build_snapshot_asset(
    *,
    spec: dg.AssetSpec,
    table: SnapshotTable,
    resource_key: str,
    fetch: FetchFn,
    config_cls: type[dg.Config] | None = None,
    partitions_def: dg.PartitionsDefinition | None = None,
    views: Sequence[Callable[[duckdb.DuckDBPyConnection], str]] = (),
    describe: DescribeFn | None = None,
) -> dg.AssetsDefinition:
    """A graph-backed asset: fetch (API I/O, stages rows to disk) then write (one transaction).

    Why two ops: API fetching can take minutes and must not hold the single-writer ``duckdb``
    pool, while the write needs that pool so two runs never write the same file at once. The
    fetch op passes only a small :class:`StagedSnapshot` (file paths and counts) to the write op.
    """
    base = "__".join(spec.key.path)

    def _run_fetch(context: dg.OpExecutionContext, config: Any) -> StagedSnapshot:
        duck = getattr(context.resources, DUCKDB_RESOURCE_KEY)
        stale = remove_stale_staging(duck.database, context.instance)
        if stale:
            context.log.info("Removed %d staging folder(s) of finished runs", len(stale))
        folder = staging_dir(duck.database, context.run_id, base)
        started = time.monotonic()
        try:
            staged = fetch(context, config, folder)
        except PostHogError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if exc.retryable:
                raise
            # Auth, scope, not-found, validation and "not before <time>" rate limits will not
            # heal within a step retry: fail now.
            raise fatal_failure(exc) from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        staged.stats["fetch_seconds"] = round(time.monotonic() - started, 3)
        (folder / STAGED_MARKER).touch()
        return staged

    # Dagster reads the op's parameters from real annotations (this module uses postponed ones).
    annotations: dict[str, Any] = {"context": dg.OpExecutionContext, "return": StagedSnapshot}
    if config_cls is None:

        def fetch_fn(context):  # type: ignore[no-untyped-def]
            return _run_fetch(context, None)

    else:
        annotations["config"] = config_cls

        def fetch_fn(context, config):  # type: ignore[no-untyped-def]
            return _run_fetch(context, config)

    fetch_fn.__annotations__ = annotations
    fetch_op = dg.op(
        name=f"{base}__fetch",
        description=f"Fetch {spec.key.to_user_string()} from PostHog and stage it on disk.",
        pool=POOL_API,
        required_resource_keys={resource_key, DUCKDB_RESOURCE_KEY},
        retry_policy=FETCH_RETRY_POLICY,
        tags={"posthog/step": "fetch"},
    )(fetch_fn)

    @dg.op(
        name=f"{base}__write",
        description=f"Replace {SCHEMA}.{table.name}'s snapshot rows in one DuckDB transaction.",
        pool=POOL_DUCKDB,
        required_resource_keys={DUCKDB_RESOURCE_KEY},
        out=dg.Out(dg.Nothing),
        tags={"posthog/step": "write"},
    )
    def write_op(context: dg.OpExecutionContext, staged: StagedSnapshot) -> None:
        started = time.monotonic()
        duck = getattr(context.resources, DUCKDB_RESOURCE_KEY)
        with writer_connection(duck) as conn:
            inserted = replace_snapshot(conn, table, staged, views=views)
            extra = dict(describe(conn, staged) if describe else {})
        remove_staging(staged.files)
        write_seconds = round(time.monotonic() - started, 3)
        metadata: dict[str, Any] = {
            "dagster/row_count": dg.MetadataValue.int(inserted),
            "dagster/table_name": dg.MetadataValue.text(f"{SCHEMA}.{table.name}"),
            "project_id": dg.MetadataValue.text(str(staged.scope.get("project_id"))),
            "snapshot_at": dg.MetadataValue.text(staged.snapshot_at),
            **{k: _metadata_value(v) for k, v in staged.stats.items()},
            **{k: _metadata_value(v) for k, v in extra.items()},
            "write_seconds": dg.MetadataValue.float(write_seconds),
            "seconds": dg.MetadataValue.float(
                round(float(staged.stats.get("fetch_seconds", 0.0)) + write_seconds, 3)
            ),
        }
        context.log.info(
            "Wrote %d rows to %s.%s (scope %s) in %.2fs", inserted, SCHEMA, table.name,
            staged.scope, write_seconds,
        )
        context.add_output_metadata(metadata)

    # Run config sits on the asset itself (ops: {<base>: {config: ...}}), not on the inner op.
    config_mapping = (
        dg.ConfigMapping(
            config_fn=lambda cfg: {fetch_op.name: {"config": cfg}},
            config_schema=config_cls.to_config_schema(),
        )
        if config_cls is not None
        else None
    )

    @dg.graph_multi_asset(
        name=base,
        outs={spec.key.path[-1]: dg.AssetOut.from_spec(spec, dagster_type=dg.Nothing)},
        partitions_def=partitions_def,
        config=config_mapping,
        group_name=spec.group_name,  # graph_multi_asset drops the out spec's group otherwise
    )
    def _graph():
        return write_op(fetch_op())

    return _graph


def _metadata_value(value: Any) -> Any:
    """Plain Python values as typed metadata (ints stay ints, dicts become JSON)."""
    if isinstance(value, bool):
        return dg.MetadataValue.bool(value)
    if isinstance(value, int):
        return dg.MetadataValue.int(value)
    if isinstance(value, float):
        return dg.MetadataValue.float(value)
    if isinstance(value, dict | list):
        return dg.MetadataValue.json(value)
    if value is None:
        return dg.MetadataValue.null()
    return dg.MetadataValue.text(str(value))

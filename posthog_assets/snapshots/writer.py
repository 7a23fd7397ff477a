"""Snapshot tables and their one-transaction write.

The write step replaces a snapshot's rows in DuckDB in ONE short transaction, for its table and
any companion tables derived from the same fetch::

    DELETE FROM posthog.<table> WHERE project_id = ? [AND snapshot_date = ?];
    INSERT INTO posthog.<table> (<explicit columns>) SELECT <explicit columns> FROM read_json(...);

DuckDB parses the staged files itself (typed by the table's schema), so no row passes through
pandas and the column order of a file never matters. ``ensure_table`` renames and adds columns in
place first, so a schema change never loses rows.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from posthog_assets.api.private_files import owner_only_umask
from posthog_assets.snapshots.staging import StagedSnapshot
from posthog_assets.tables import SCHEMA, Table, ensure_table, quote

#: DuckDB settings of the write step, unless ``DuckDBResource.connection_config`` sets them. The
#: write is one streaming INSERT ... SELECT: one thread and a bounded buffer pool keep the peak
#: memory of the step nearly flat however large the snapshot is (DuckDB spills beyond it).
WRITE_SETTINGS = {"threads": "1", "memory_limit": "'64MB'"}


@contextmanager
def private_connection(duckdb_resource: Any) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-write connection from ``DuckDBResource``, closed even when the caller fails, whose
    new files (the database, its WAL, spill files) only this user can read.

    DuckDB creates them following the umask (0644 by default) and refuses a pre-created empty
    database file, so the umask is narrowed while the connection is open. A database that
    already exists keeps its mode (it may be shared on purpose). ``get_connection`` closes only
    on success; a failed write in a long-lived process would otherwise keep the file lock.
    """
    _check_database_folder(str(duckdb_resource.database))
    with owner_only_umask(), duckdb_resource.get_connection() as conn:
        try:
            yield conn
        finally:
            conn.close()


@contextmanager
def writer_connection(duckdb_resource: Any) -> Iterator[duckdb.DuckDBPyConnection]:
    """:func:`private_connection` with the write step's settings (:data:`WRITE_SETTINGS`)."""
    configured = getattr(duckdb_resource, "connection_config", None) or {}
    with private_connection(duckdb_resource) as conn:
        for name, value in WRITE_SETTINGS.items():
            if name not in configured:
                conn.execute(f"SET {name} = {value}")
        yield conn


def _check_database_folder(database: str) -> None:
    """Fail at once, as an ``OSError``, where DuckDB would retry its connect for ~100 s: the
    folder is not a folder, is read-only, or is not ours to write."""
    if database == ":memory:":
        return
    folder = os.path.dirname(os.path.abspath(database))
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        return  # DuckDB says so itself
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder)
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), folder)


def _read_json_sql(schema: Table) -> str:
    cols = ", ".join(f"{_sql_str(c)}: {_sql_str(t)}" for c, t in schema.staged_columns.items())
    return (
        f"read_json($files, format = 'newline_delimited', columns = {{{cols}}}, "
        "maximum_object_size = 16777216)"
    )


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def replace_snapshot(
    conn: duckdb.DuckDBPyConnection,
    schema: Table,
    staged: StagedSnapshot,
    *,
    companions: Sequence[Table] = (),
) -> dict[str, int]:
    """Replace the rows of ``staged.scope`` in ``schema`` and every companion table with the
    staged rows, atomically; return the rows inserted per table.

    Runs ``ensure_table`` for each (adds missing columns, keeps rows), then ONE transaction with,
    per table, the ``DELETE`` of the scope and the ``INSERT ... SELECT`` with explicit columns,
    then the tables' views. Either everything commits or nothing changes: a companion table never
    holds rows of another snapshot than its main table.
    """
    parts: list[tuple[Table, list[str], int]] = [(schema, staged.files, staged.rows)]
    for table in companions:
        part = staged.companions.get(table.name)
        parts.append((table, part.files if part else [], part.rows if part else 0))
    missing = [f for _, files, _ in parts for f in files if not Path(f).exists()]
    if missing:  # never replace a snapshot with a partial one
        raise FileNotFoundError(
            f"{len(missing)} staging file(s) of {SCHEMA}.{schema.name} are gone (e.g. "
            f"{Path(missing[0]).name}); the table was not changed: re-run the fetch step"
        )
    for table, _, _ in parts:
        ensure_table(conn, table.name, table.types, renamed=table.renamed)
    inserted: dict[str, int] = {}
    conn.execute("BEGIN TRANSACTION")
    try:
        for table, files, rows in parts:
            inserted[table.name] = _replace_rows(conn, table, staged, files, rows)
        for table, _, _ in parts:
            for view_sql in table.views:
                conn.execute(view_sql(conn))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return inserted


def _replace_rows(
    conn: duckdb.DuckDBPyConnection,
    schema: Table,
    staged: StagedSnapshot,
    files: Sequence[str],
    expected: int,
) -> int:
    """Inside the caller's transaction: delete the scope's rows, insert the staged ones."""
    files = [f for f in files if Path(f).stat().st_size > 0]
    where = " AND ".join(f"{quote(c)} = ?" for c in schema.scope)
    scope_values = [staged.scope[c] for c in schema.scope]
    types = schema.types
    names = list(types)
    select_parts = []
    params: dict[str, Any] = {"files": files}
    for c in names:
        if c in schema.constants:
            params[f"c_{c}"] = staged.snapshot_at if c == "snapshot_at" else staged.scope[c]
            select_parts.append(f"CAST($c_{c} AS {types[c]}) AS {quote(c)}")
        elif schema.staged_columns[c] != types[c]:
            select_parts.append(f"CAST({quote(c)} AS {types[c]}) AS {quote(c)}")
        else:
            select_parts.append(quote(c))
    col_list = ", ".join(quote(c) for c in names)
    target = schema.ref(conn)
    conn.execute(f"DELETE FROM {target} WHERE {where}", scope_values)
    inserted = 0
    if files:
        rows = conn.execute(
            f"INSERT INTO {target} ({col_list}) "
            f"SELECT {', '.join(select_parts)} FROM {_read_json_sql(schema)}",
            params,
        ).fetchall()
        inserted = int(rows[0][0]) if rows else 0
    if inserted != expected:
        raise RuntimeError(
            f"{SCHEMA}.{schema.name}: staged {expected} rows but read back {inserted}; "
            "rolled back, the table was not changed"
        )
    return inserted

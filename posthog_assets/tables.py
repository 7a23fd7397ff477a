"""Small DuckDB helpers shared by every writer: explicit columns, schema evolution, atomic swaps.

Writers never rely on column order (the pandas IO manager's positional insert corrupts tables when
columns move) and never lose rows when a column is added: missing columns are added in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import duckdb

SCHEMA = "posthog"


def quote(identifier: str) -> str:
    """Quote an identifier (DuckDB 2.0 reserves words such as ``at``)."""
    return '"' + identifier.replace('"', '""') + '"'


def schema_ref(conn: duckdb.DuckDBPyConnection) -> str:
    """``"<catalog>".posthog``: fully qualified, because a file named ``posthog.duckdb`` makes a
    catalog ``posthog`` and a bare ``posthog.<table>`` is then an "ambiguous reference to catalog
    or schema" error in DuckDB.
    """
    # fetchall, not fetchone: DuckDB 2.0 keeps a half-read result open and then refuses
    # register() and friends on the connection ("unfinished result from execute()").
    rows = conn.execute("SELECT current_database()").fetchall()
    catalog = str(rows[0][0]) if rows else "memory"
    return f"{quote(catalog)}.{SCHEMA}"


def table_ref(conn: duckdb.DuckDBPyConnection, table: str) -> str:
    """``"<catalog>".posthog."<table>"`` (see :func:`schema_ref`)."""
    return f"{schema_ref(conn)}.{quote(table)}"


def table_columns(conn: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    """``posthog.<table>``'s columns in table order (none when the table does not exist)."""
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_catalog = current_database() AND table_schema = ? AND table_name = ? "
        "ORDER BY ordinal_position",
        [SCHEMA, table],
    ).fetchall()
    return [str(r[0]) for r in rows]


def table_exists(conn: duckdb.DuckDBPyConnection, table: str) -> bool:
    rows = conn.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_catalog = current_database() AND table_schema = ? AND table_name = ?",
        [SCHEMA, table],
    ).fetchall()
    return bool(rows and rows[0][0])


def ensure_table(
    conn: duckdb.DuckDBPyConnection,
    table: str,
    columns: Mapping[str, str],
    *,
    renamed: Mapping[str, str] | None = None,
) -> None:
    """Create ``posthog.<table>`` if missing, else rename old columns and add any it lacks
    (rows are kept)."""
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema_ref(conn)}")
    cols = ", ".join(f"{quote(name)} {sql_type}" for name, sql_type in columns.items())
    ref = table_ref(conn, table)
    conn.execute(f"CREATE TABLE IF NOT EXISTS {ref} ({cols})")
    existing = set(table_columns(conn, table))
    for old, new in (renamed or {}).items():
        if old in existing and new not in existing:
            conn.execute(f"ALTER TABLE {ref} RENAME COLUMN {quote(old)} TO {quote(new)}")
            existing = (existing - {old}) | {new}
    for name, sql_type in columns.items():
        if name not in existing:
            conn.execute(f"ALTER TABLE {ref} ADD COLUMN {quote(name)} {sql_type}")


def open_read_only(path: str | Path) -> duckdb.DuckDBPyConnection:
    """Checks and readers open read-only so they never hold the writer's lock."""
    return duckdb.connect(str(path), read_only=True)

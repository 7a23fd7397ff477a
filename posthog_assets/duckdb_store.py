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


def ensure_table(
    conn: duckdb.DuckDBPyConnection, table: str, columns: Mapping[str, str]
) -> None:
    """Create ``posthog.<table>`` if missing, else add any column it lacks (rows are kept)."""
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    cols = ", ".join(f"{quote(name)} {sql_type}" for name, sql_type in columns.items())
    conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.{quote(table)} ({cols})")
    existing = {
        row[0]
        for row in conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = ? AND table_name = ?",
            [SCHEMA, table],
        ).fetchall()
    }
    for name, sql_type in columns.items():
        if name not in existing:
            conn.execute(
                f"ALTER TABLE {SCHEMA}.{quote(table)} ADD COLUMN {quote(name)} {sql_type}"
            )


def insert_select(
    conn: duckdb.DuckDBPyConnection, table: str, columns: list[str], source_sql: str
) -> int:
    """``INSERT INTO posthog.<table> (<columns>) SELECT <columns> FROM <source>``, by name."""
    names = ", ".join(quote(c) for c in columns)
    conn.execute(
        f"INSERT INTO {SCHEMA}.{quote(table)} ({names}) SELECT {names} FROM {source_sql}"
    )
    result = conn.fetchone()
    return int(result[0]) if result else 0


def open_read_only(path: str | Path) -> duckdb.DuckDBPyConnection:
    """Checks and readers open read-only so they never hold the writer's lock."""
    return duckdb.connect(str(path), read_only=True)

"""DuckDB tables: each declared once (:class:`Table`), and the helpers every writer shares.

A declaration holds everything about a table: its columns with their descriptions, the key that
identifies a row within one snapshot, its description and asset group, the table its rows are
computed from, its views and its checks. The translator (asset specs, column schema, lineage),
the staging, the writer and the checks all read it; adding a table is one declaration plus the
function that turns PostHog's objects into its rows.

Writers never rely on column order (the pandas IO manager's positional insert corrupts tables when
columns move) and never lose rows when a column is added: missing columns are added in place.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import duckdb

SCHEMA = "posthog"
#: The asset groups of the UI.
EXPORTS_GROUP = "posthog_exports"
INSIGHTS_GROUP = "posthog_insights"
GROUPS_GROUP = "posthog_groups"
EVENTS_GROUP = "posthog_events"

#: A view (re)created in the write's transaction, as SQL built for the connection.
ViewSql = Callable[[duckdb.DuckDBPyConnection], str]


@dataclass(frozen=True)
class Column:
    """One column: its DuckDB type, what it holds, and (for a table computed from another) the
    upstream columns its values come from (``dagster/column_lineage``)."""

    name: str
    type: str
    description: str
    lineage: tuple[str, ...] = ()
    #: The type the staged rows carry when it differs (JSON text arrives as a string: staged
    #: as VARCHAR, cast to JSON on insert).
    staged_type: str = ""


def columns(spec: str) -> tuple[Column, ...]:
    """Columns written as a table, one per line: ``name  TYPE  description``, where an indented
    line continues the description and ``<- a, b`` at its end names the upstream columns."""
    found: list[list[str]] = []
    for line in textwrap.dedent(spec).strip("\n").splitlines():
        if line[:1].isspace():
            found[-1][2] += " " + line.strip()
        elif line.strip():
            name, sql_type, description = line.split(None, 2)
            found.append([name, sql_type, description])
    made = []
    for name, sql_type, description in found:
        text, _, upstream = description.partition(" <- ")
        lineage = tuple(u.strip() for u in upstream.split(",") if u.strip())
        made.append(Column(name, sql_type, text.strip(), lineage))
    return tuple(made)


def json_as_text(declared: tuple[Column, ...]) -> tuple[Column, ...]:
    """The JSON columns staged as text (HogQL answers JSON as a string), cast on insert."""
    return tuple(replace(c, staged_type="VARCHAR") if c.type == "JSON" else c for c in declared)


#: The columns every snapshot row carries, written by the write step as constants.
PROJECT_ID = Column("project_id", "VARCHAR", "The PostHog project the row was read from.")
SNAPSHOT_DATE = Column(
    "snapshot_date", "DATE", "UTC date of the snapshot; taking it again that day replaces it."
)
SNAPSHOT_AT = Column("snapshot_at", "TIMESTAMPTZ", "When the snapshot was taken (UTC).")


@dataclass(frozen=True)
class Table:
    """A DuckDB table of ``posthog``, declared once.

    Attributes:
        name: ``posthog.<name>``.
        description: What a row is; the asset's description.
        group: The asset group.
        columns: The columns the rows carry (the snapshot columns are added in front).
        key: What identifies a row within one snapshot (a check fails on duplicates).
        daily: One snapshot a day is kept (scope: project and date); else a snapshot replaces
            the project's previous rows.
        asset_name: The asset's last key part (default: ``name``).
        upstream: The table these rows are computed from, in the same transaction: the asset
            is shown downstream of it, with the lineage of each column.
        views: Views (re)created in the write's transaction.
        checks: Further checks, each built as ``check(project, table, asset_key)``.
        renamed: Columns renamed since an earlier version (old -> new), renamed in place.
        partition: A DATE column holding the run's partition key: one partition's rows replace
            that partition's (scope: project and partition) instead of a snapshot's.
    """

    name: str
    description: str
    group: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()
    daily: bool = False
    asset_name: str = ""
    upstream: str | None = None
    views: tuple[ViewSql, ...] = ()
    checks: tuple[Callable[..., Any], ...] = ()
    renamed: Mapping[str, str] = field(default_factory=dict)
    snapshot_columns: bool = True
    partition: Column | None = None

    def __post_init__(self) -> None:
        if not self.asset_name:
            object.__setattr__(self, "asset_name", self.name)
        if self.snapshot_columns:
            middle = self.partition or (SNAPSHOT_DATE if self.daily else None)
            front = (PROJECT_ID, *([middle] if middle else []), SNAPSHOT_AT)
            object.__setattr__(self, "columns", (*front, *self.columns))
        missing = [k for k in self.key if k not in self.types]
        if missing:
            raise ValueError(f"{self.name}: key column(s) {missing} not declared")

    @property
    def types(self) -> dict[str, str]:
        """Column name -> DuckDB type, in table order."""
        return {c.name: c.type for c in self.columns}

    @property
    def scope(self) -> tuple[str, ...]:
        """The columns whose values one snapshot (or partition) replaces."""
        if self.partition is not None:
            return ("project_id", self.partition.name)
        return ("project_id", "snapshot_date") if self.daily else ("project_id",)

    @property
    def constants(self) -> tuple[str, ...]:
        """The columns the write step fills (the rest come from the staged rows)."""
        return (*self.scope, "snapshot_at") if self.snapshot_columns else ()

    @property
    def staged_columns(self) -> dict[str, str]:
        """Column name -> the type its staged values are read as."""
        return {
            c.name: c.staged_type or c.type for c in self.columns if c.name not in self.constants
        }

    @property
    def qualified_name(self) -> str:
        return f"{SCHEMA}.{self.name}"

    def ref(self, conn: duckdb.DuckDBPyConnection) -> str:
        """Catalog-qualified name (a file called posthog.duckdb makes ``posthog.x`` ambiguous)."""
        return table_ref(conn, self.name)


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

"""A subset of HogQL, parsed and translated to DuckDB over :mod:`events_db`'s tables.

What PostHog does and the stand-in reproduces (files under ``posthog/`` in PostHog's repository):

- ``OFFSET`` (also ``LIMIT m, n`` and ``LIMIT n BY .. OFFSET m``) in a query sent with a personal
  API key is refused before anything runs, with ``OFFSET_NOT_ALLOWED_MESSAGE``
  (``hogql/user_query_validator.py``); ``SAMPLE n OFFSET m`` is not an OFFSET there.
- A top-level SELECT without LIMIT gets the paginator: 100 rows, fetched as 101 to set ``hasMore``
  (``hogql/constants.py`` ``DEFAULT_RETURNED_ROWS``, ``hogql_queries/insights/paginators.py``); a
  constant LIMIT above 50,000 is silently lowered to 50,000 (``MAX_SELECT_RETURNED_ROWS``, the
  printer's ``visit_select_query``) and nothing says so.
- Date-time functions, as ``hogql/functions/clickhouse/conversions.py`` maps them and
  ``hogql/printer`` prints them (``tz_aware``: the project's timezone is appended when the last
  argument is missing; the precision 6 is inserted for the 64-bit forms):
  ``toDateTime64(s[, scale[, tz]])`` → ClickHouse ``toDateTime64(s, scale, tz)`` (the scale
  defaults to 6; fraction digits beyond it are cut off); ``toDateTime(s)`` with one string
  literal ``YYYY-MM-DD hh:mm:ss.f{1,6}`` → ``toDateTime64(s, 6, tz)`` (exact), with
  ``YYYY-MM-DD hh:mm:ss`` or ``YYYY-MM-DD`` → ``toDateTime(s, tz)`` (whole seconds), any other
  literal → ``parseDateTime64BestEffort(s, 6, tz)`` (an error if it cannot be read);
  ``toDateTime(s, tz)`` → ``parseDateTime64BestEffortOrNull(s, 6, tz)`` (NULL if it cannot be
  read, so a comparison with it matches nothing); ``toDateTime(<integer>)`` → seconds since the
  epoch. ``toUUID(s)`` → ``accurateCastOrNull(s, 'UUID')`` (NULL when invalid). A plain string
  compared with a DateTime column is converted by ClickHouse to the column's type
  (``DateTime64(6, 'UTC')``: exact); the stand-in reads it as ``YYYY-MM-DD[ hh:mm:ss[.f]]``.
- Comparisons of nullable values follow the ClickHouse printer: ``=`` is true when both sides are
  NULL, ``!=`` is true when exactly one is, every other comparison with a NULL is false.
- UUIDs compare and sort by their second half first, as ClickHouse does (see ``events_db``).

Results are rendered as PostHog's JSON renderer writes the ClickHouse driver's Python values: a
DateTime as ISO-8601 with ``Z`` and six fraction digits, none when they are all zero (DRF's
``JSONEncoder`` and the cache's orjson with ``OPT_UTC_Z`` agree); a Date as ``YYYY-MM-DD``; a
UUID as its canonical lowercase text; ``properties`` as the JSON text it is stored as; ``Int8``
columns (``is_identified``) as the integers 0/1; ``count()`` as an integer.

``columns`` holds each item's alias, or for an item without one its HogQL text (``uuid``,
``properties.$browser``, ``count()``, ``toDate(timestamp)``), as ``execute_hogql_query`` prints
the columns; ``types`` pairs the same names with the ClickHouse types (PostHog names these after
the ClickHouse columns, which for unaliased expressions may differ: send aliases).

Anything outside the subset is refused with a 400 that says it is the stand-in's limit; PostHog's
own wording is used for an unknown table (``Unknown table `x`.``, ``hogql/database/database.py``),
an unknown field (``Unable to resolve field: x``) and an unknown function
(``Unsupported function call 'f(...)'``).
"""

from __future__ import annotations

import re
import uuid as uuidlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .events_db import ck_of

OFFSET_NOT_ALLOWED_MESSAGE = (
    "OFFSET is not supported on queries made with a personal API key. "
    "For pagination, use keyset pagination on the `timestamp` column, e.g. "
    "`WHERE timestamp > :last_seen_timestamp ORDER BY timestamp LIMIT N`. "
    "For bulk data extraction, use batch exports: https://posthog.com/docs/cdp/batch-exports"
)
DEFAULT_RETURNED_ROWS = 100
MAX_SELECT_RETURNED_ROWS = 50_000
SUBSET_HINT = (
    "The PostHog stand-in runs only a subset of HogQL (one table of events, persons, "
    "person_distinct_ids, raw_persons or raw_person_distinct_ids; fields, properties.<name>, "
    "count(), toDate(), toDateTime(), toDateTime64(), toUUID(); comparisons, IN, AND/OR/NOT; "
    "GROUP BY, ORDER BY, LIMIT). PostHog itself may accept this query"
)

T_UUID = "UUID"
T_STR = "String"
T_NSTR = "Nullable(String)"
T_DT6 = "DateTime64(6, 'UTC')"
T_DT3 = "DateTime64(3, 'UTC')"
T_DATE = "Date"
T_U64 = "UInt64"
T_I64 = "Int64"
T_I8 = "Int8"
_DATETIMES = (T_DT6, T_DT3)
_STRINGS = (T_STR, T_NSTR)
_INTS = (T_U64, T_I64, T_I8)


class HogQLError(Exception):
    """A query PostHog (or the stand-in) refuses with a 400 ``validation_error``."""


class OffsetError(HogQLError):
    def __init__(self) -> None:
        super().__init__(OFFSET_NOT_ALLOWED_MESSAGE)


def unsupported(what: str) -> HogQLError:
    return HogQLError(f"{SUBSET_HINT}; not supported here: {what}.")


# ---- tokens -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    kind: str  # ident | qident | string | number | op | eof
    value: str
    pos: int

    def kw(self, *words: str) -> bool:
        return self.kind == "ident" and self.value.upper() in words


_OPS = ("==", "!=", "<>", "<=", ">=", "=", "<", ">", "(", ")", ",", ".", "*", ";", "-", "+",
        "[", "]", "/", "%", "{", "}", ":", "?")  # fmt: skip
_ESCAPES = {"b": "\b", "f": "\f", "r": "\r", "n": "\n", "t": "\t", "0": "\0", "a": "\a",
            "v": "\v", "\\": "\\", "'": "'", '"': '"', "`": "`"}  # fmt: skip
_IDENT = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
_NUMBER = re.compile(r"\d+(\.\d*)?([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?")


def _quoted(text: str, start: int, quote: str) -> tuple[str, int]:
    """A quoted literal from ``start`` (the opening quote): backslash escapes and doubled
    quotes, as ClickHouse's (and HogQL's) string literals have them."""
    out: list[str] = []
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
        elif c == quote:
            if i + 1 < len(text) and text[i + 1] == quote:
                out.append(quote)
                i += 2
            else:
                return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise HogQLError(f"Syntax error: unterminated quoted text starting at position {start}")


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise HogQLError("Syntax error: unterminated comment")
            i = end + 2
        elif c == "'":
            value, i2 = _quoted(text, i, "'")
            tokens.append(Token("string", value, i))
            i = i2
        elif c in '`"':
            value, i2 = _quoted(text, i, c)
            tokens.append(Token("qident", value, i))
            i = i2
        elif m := _NUMBER.match(text, i):
            tokens.append(Token("number", m.group(0), i))
            i = m.end()
        elif m := _IDENT.match(text, i):
            tokens.append(Token("ident", m.group(0), i))
            i = m.end()
        else:
            for op in _OPS:
                if text.startswith(op, i):
                    tokens.append(Token("op", op, i))
                    i += len(op)
                    break
            else:
                raise HogQLError(f"Syntax error: unexpected character {c!r} at position {i}")
    tokens.append(Token("eof", "", n))
    return tokens


def offset_used(tokens: list[Token]) -> bool:
    """Whether the query has an OFFSET that ``_OffsetDetectingVisitor`` refuses: an ``OFFSET``
    keyword (not a ``SAMPLE n OFFSET m``, not a field named ``offset`` after a dot), or the
    ``LIMIT m, n`` form (HogQL parses it as LIMIT n OFFSET m)."""
    clause = ""
    for k, tok in enumerate(tokens):
        if tok.kw("LIMIT", "SAMPLE"):
            clause = tok.value.upper()
            after = tokens[k + 1 : k + 3]
            if clause == "LIMIT" and len(after) == 2 and after[1].value == ",":
                return True
        elif tok.kw("OFFSET"):
            before = tokens[k - 1] if k else None
            if before is not None and before.kind == "op" and before.value == ".":
                continue
            if clause != "SAMPLE":
                return True
    return False


# ---- syntax tree ------------------------------------------------------------------------------


@dataclass
class Field:
    chain: list[str]


@dataclass
class Const:
    value: Any  # str | int | float | bool | None


@dataclass
class Call:
    name: str
    args: list[Any]
    star: bool = False


@dataclass
class Cmp:
    op: str
    left: Any
    right: Any


@dataclass
class InList:
    expr: Any
    values: list[Any]
    negated: bool


@dataclass
class BoolOp:
    op: str  # AND | OR
    exprs: list[Any]


@dataclass
class Not:
    expr: Any


@dataclass
class Item:
    expr: Any
    alias: str | None


@dataclass
class Select:
    items: list[Item]
    table: str
    table_alias: str | None
    where: Any = None
    group_by: list[Any] = field(default_factory=list)
    order_by: list[tuple[Any, bool]] = field(default_factory=list)
    limit: int | None = None


_CLAUSE_WORDS = ("FROM", "WHERE", "GROUP", "ORDER", "LIMIT", "OFFSET", "HAVING", "PREWHERE",
                 "SETTINGS", "UNION", "JOIN", "INNER", "LEFT", "RIGHT", "FULL", "CROSS", "ARRAY",
                 "SAMPLE", "FORMAT", "WINDOW", "QUALIFY", "ASC", "DESC", "AND", "OR", "NOT",
                 "AS", "BY", "ON", "USING", "INTERSECT", "EXCEPT", "FINAL", "NULLS", "WITH",
                 "ANY", "ALL", "GLOBAL", "SEMI", "ANTI", "ASOF", "OUTER", "LIMIT")  # fmt: skip
_UNSUPPORTED_WORDS = ("LIKE", "ILIKE", "BETWEEN", "IS", "CASE", "INTERVAL", "DISTINCT", "EXISTS",
                      "CAST", "GLOBAL", "REGEXP")  # fmt: skip


class Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.i = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def next(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def is_op(self, *ops: str) -> bool:
        return self.tok.kind == "op" and self.tok.value in ops

    def expect_op(self, op: str) -> None:
        if not self.is_op(op):
            raise self.error(f"expected {op!r}")
        self.next()

    def expect_kw(self, *words: str) -> None:
        if not self.tok.kw(*words):
            raise self.error(f"expected {' '.join(words)}")
        self.next()

    def error(self, what: str) -> HogQLError:
        tok = self.tok
        shown = "end of query" if tok.kind == "eof" else repr(tok.value)
        return HogQLError(f"Syntax error at position {tok.pos}: {what}, found {shown}")

    def not_here(self) -> HogQLError:
        tok = self.tok
        if tok.kind == "eof":
            return self.error("unexpected end")
        return unsupported(f"{tok.value!r} at position {tok.pos}")

    # -- statement --------------------------------------------------------------------------
    def select(self) -> Select:
        if self.tok.kw("WITH"):
            raise self.not_here()
        self.expect_kw("SELECT")
        if self.tok.kw("DISTINCT", "TOP"):
            raise self.not_here()
        items = [self.item()]
        while self.is_op(","):
            self.next()
            items.append(self.item())
        self.expect_kw("FROM")
        if self.is_op("("):
            raise unsupported("a subquery in FROM")
        table_tok = self.next()
        if table_tok.kind not in ("ident", "qident"):
            raise HogQLError(f"Syntax error at position {table_tok.pos}: expected a table name")
        table = table_tok.value
        while self.is_op("."):
            self.next()
            table += "." + self.next().value
        alias = None
        if self.tok.kw("AS"):
            self.next()
            alias = self.next().value
        elif self.tok.kind == "qident" or (
            self.tok.kind == "ident" and self.tok.value.upper() not in _CLAUSE_WORDS
        ):
            alias = self.next().value
        query = Select(items=items, table=table, table_alias=alias)
        if self.tok.kw("WHERE"):
            self.next()
            query.where = self.expr()
        if self.tok.kw("GROUP"):
            self.next()
            self.expect_kw("BY")
            query.group_by.append(self.expr())
            while self.is_op(","):
                self.next()
                query.group_by.append(self.expr())
        if self.tok.kw("ORDER"):
            self.next()
            self.expect_kw("BY")
            query.order_by.append(self.order_item())
            while self.is_op(","):
                self.next()
                query.order_by.append(self.order_item())
        if self.tok.kw("LIMIT"):
            self.next()
            query.limit = self.int_literal()
            if self.tok.kw("BY", "WITH"):
                raise self.not_here()
        if self.tok.kind != "eof":
            raise self.not_here()
        return query

    def int_literal(self) -> int:
        tok = self.tok
        if tok.kind != "number" or not tok.value.isdigit():
            if tok.kind == "eof":
                raise self.error("expected a number")
            raise unsupported(f"LIMIT {tok.value!r} (only a whole-number literal)")
        self.next()
        return int(tok.value)

    def item(self) -> Item:
        if self.is_op("*"):
            raise unsupported("SELECT *")
        expr = self.expr()
        alias = None
        if self.tok.kw("AS"):
            self.next()
            tok = self.next()
            if tok.kind not in ("ident", "qident"):
                raise HogQLError(f"Syntax error at position {tok.pos}: expected an alias")
            alias = tok.value
        elif self.tok.kind == "qident" or (
            self.tok.kind == "ident" and self.tok.value.upper() not in _CLAUSE_WORDS
        ):
            alias = self.next().value
        return Item(expr, alias)

    def order_item(self) -> tuple[Any, bool]:
        expr = self.expr()
        desc = False
        if self.tok.kw("ASC", "ASCENDING"):
            self.next()
        elif self.tok.kw("DESC", "DESCENDING"):
            self.next()
            desc = True
        if self.tok.kw("NULLS", "COLLATE", "WITH"):
            raise self.not_here()
        return expr, desc

    # -- expressions ------------------------------------------------------------------------
    def expr(self) -> Any:
        left = self.and_expr()
        exprs = [left]
        while self.tok.kw("OR"):
            self.next()
            exprs.append(self.and_expr())
        return exprs[0] if len(exprs) == 1 else BoolOp("OR", exprs)

    def and_expr(self) -> Any:
        exprs = [self.not_expr()]
        while self.tok.kw("AND"):
            self.next()
            exprs.append(self.not_expr())
        return exprs[0] if len(exprs) == 1 else BoolOp("AND", exprs)

    def not_expr(self) -> Any:
        if self.tok.kw("NOT"):
            self.next()
            return Not(self.not_expr())
        return self.comparison()

    def comparison(self) -> Any:
        left = self.primary()
        if self.is_op("=", "==", "!=", "<>", "<", "<=", ">", ">="):
            op = self.next().value
            return Cmp(op, left, self.primary())
        negated = False
        if self.tok.kw("NOT") and self.tokens[self.i + 1].kw("IN"):
            self.next()
            negated = True
        if self.tok.kw("IN"):
            self.next()
            if self.tok.kw("COHORT"):
                raise self.not_here()
            self.expect_op("(")
            if self.tok.kw("SELECT"):
                raise unsupported("a subquery in IN")
            values = [self.primary()]
            while self.is_op(","):
                self.next()
                values.append(self.primary())
            self.expect_op(")")
            return InList(left, values, negated)
        if self.tok.kw(*_UNSUPPORTED_WORDS) or self.is_op("+", "-", "*", "/", "%", "[", "?"):
            raise self.not_here()
        return left

    def primary(self) -> Any:
        tok = self.tok
        if self.is_op("("):
            self.next()
            if self.tok.kw("SELECT"):
                raise unsupported("a subquery")
            inner = self.expr()
            if self.is_op(","):
                raise unsupported("tuples")
            self.expect_op(")")
            return inner
        if self.is_op("-") and self.tokens[self.i + 1].kind == "number":
            self.next()
            number = self.next().value
            return Const(-(float(number) if not number.isdigit() else int(number)))
        if tok.kind == "string":
            self.next()
            return Const(tok.value)
        if tok.kind == "number":
            self.next()
            return Const(int(tok.value) if tok.value.isdigit() else float(tok.value))
        if tok.kw("NULL"):
            self.next()
            return Const(None)
        if tok.kw("TRUE", "FALSE"):
            self.next()
            return Const(tok.value.upper() == "TRUE")
        if tok.kind == "ident" and tok.value.upper() in _UNSUPPORTED_WORDS:
            raise self.not_here()
        if (
            tok.kind == "ident"
            and self.tokens[self.i + 1].value == "("
            and (self.tokens[self.i + 1].kind == "op")
        ):
            return self.call()
        if tok.kind in ("ident", "qident"):
            if tok.kind == "ident" and tok.value.upper() in _CLAUSE_WORDS:
                raise self.error("expected an expression")
            chain = [self.next().value]
            while self.is_op("."):
                self.next()
                part = self.next()
                if part.kind not in ("ident", "qident", "number"):
                    raise HogQLError(f"Syntax error at position {part.pos}: expected a name")
                chain.append(part.value)
            if self.is_op("["):
                raise self.not_here()
            return Field(chain)
        if tok.kind == "eof":
            raise self.error("expected an expression")
        raise self.not_here()

    def call(self) -> Call:
        name = self.next().value
        self.expect_op("(")
        if self.is_op(")"):
            self.next()
            return self._after_call(Call(name, []))
        if self.is_op("*"):
            self.next()
            self.expect_op(")")
            return self._after_call(Call(name, [], star=True))
        if self.tok.kw("DISTINCT"):
            raise self.not_here()
        args = [self.expr()]
        while self.is_op(","):
            self.next()
            args.append(self.expr())
        self.expect_op(")")
        return self._after_call(Call(name, args))

    def _after_call(self, call: Call) -> Call:
        if self.is_op("(") or self.tok.kw("OVER"):
            raise self.not_here()
        return call


def parse(text: str) -> Select:
    """Tokenize and parse; the OFFSET check runs first, as ``validate_user_query`` sees every
    OFFSET of a query that parsed."""
    tokens = tokenize(text)
    if offset_used(tokens):
        raise OffsetError()
    if tokens[0].kind == "eof":
        raise HogQLError("Empty query")
    return Parser(tokens).select()


# ---- schema -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    sql: str
    type: str
    needs_pdi: bool = False


@dataclass(frozen=True)
class TableDef:
    sql: str
    columns: dict[str, Column]
    json_columns: tuple[str, ...] = ("properties",)


def _cols(pairs: dict[str, str], prefix: str = "t") -> dict[str, Column]:
    return {name: Column(f"{prefix}.{name}", type_) for name, type_ in pairs.items()}


TABLES: dict[str, TableDef] = {
    "events": TableDef(
        "events",
        {
            **_cols(
                {
                    "uuid": T_UUID,
                    "event": T_STR,
                    "timestamp": T_DT6,
                    "distinct_id": T_STR,
                    "properties": T_STR,
                    "elements_chain": T_STR,
                    "created_at": T_DT6,
                    "team_id": T_I64,
                }
            ),
            "person_id": Column("pdi.person_id", T_UUID, needs_pdi=True),
        },
    ),
    "persons": TableDef(
        "persons",
        _cols(
            {
                "id": T_UUID,
                "created_at": T_DT3,
                "properties": T_STR,
                "is_identified": T_I8,
                "team_id": T_I64,
            }
        ),
    ),
    "person_distinct_ids": TableDef(
        "person_distinct_ids",
        _cols({"distinct_id": T_STR, "person_id": T_UUID, "team_id": T_I64}),
        json_columns=(),
    ),
    "raw_persons": TableDef(
        "raw_persons",
        _cols(
            {
                "id": T_UUID,
                "created_at": T_DT3,
                "properties": T_STR,
                "is_identified": T_I8,
                "is_deleted": T_I8,
                "version": T_U64,
                "team_id": T_I64,
            }
        ),
    ),
    "raw_person_distinct_ids": TableDef(
        "raw_person_distinct_ids",
        _cols(
            {
                "distinct_id": T_STR,
                "person_id": T_UUID,
                "is_deleted": T_I8,
                "version": T_I64,
                "team_id": T_I64,
            }
        ),
        json_columns=(),
    ),
}
#: HogQL tables PostHog has that the stand-in does not (a 400 that says so, not "unknown").
OTHER_POSTHOG_TABLES = frozenset({
    "sessions", "raw_sessions", "groups", "raw_groups", "cohort_people", "static_cohort_people",
    "person_overrides", "person_distinct_id_overrides", "session_replay_events", "log_entries",
    "query_log", "numbers", "heatmaps", "exchange_rate", "app_metrics", "console_logs",
    "logs", "document_embeddings", "error_tracking_issue_fingerprint_overrides",
})  # fmt: skip
#: HogQL functions PostHog has that the stand-in does not run (a 400 that says so).
_KNOWN_FUNCTIONS = frozenset({
    "now", "today", "toStartOfDay", "toStartOfHour", "toStartOfWeek", "toStartOfMonth",
    "toString", "toInt", "toFloat", "lower", "upper", "length", "concat", "coalesce", "if",
    "multiIf", "JSONExtractString", "JSONExtractRaw", "dateDiff", "dateAdd", "dateSub",
    "formatDateTime", "uniq", "uniqExact", "sum", "avg", "min", "max", "any",
    "argMax", "argMin", "groupArray", "countIf", "sumIf", "toYYYYMM", "toUnixTimestamp",
    "fromUnixTimestamp", "parseDateTimeBestEffort", "isNull", "isNotNull", "ifNull", "like",
    "match", "replaceRegexpAll", "splitByChar", "arrayJoin", "has", "toUUIDOrDefault",
    "toDateTimeUS", "toTypeName", "cityHash64", "toIntOrZero", "toFloatOrZero", "toDecimal",
    "round", "floor", "ceil", "abs", "startsWith", "endsWith", "position", "substring",
    "trim", "date_trunc", "toDayOfWeek", "toHour", "toMinute", "toYear", "toMonth",
})  # fmt: skip


# ---- compiled expressions ---------------------------------------------------------------------


@dataclass
class Typed:
    sql: str
    type: str  # a ClickHouse type name, or "const"
    const: Any = None  # for constants: a str, int, float, bool, None, or _Stamp / _Uuid
    aggregate: bool = False
    name: str = ""  # the HogQL text, for unaliased column names

    @property
    def is_const(self) -> bool:
        return self.type == "const"


@dataclass(frozen=True)
class _Stamp:
    """A date-time constant: microseconds since the epoch (or NULL when ``us`` is None)."""

    us: int | None


@dataclass(frozen=True)
class _Uuid:
    text: str | None


@dataclass
class Compiled:
    """A query ready to run: its DuckDB SQL (without LIMIT) and what PostHog reports about it."""

    table: str
    sql: str
    columns: list[str]
    types: list[list[str]]
    limit: int | None
    hogql: str
    paginate: bool
    capped: bool
    applied_limit: int
    range_us: tuple[int | None, int | None]

    @property
    def fetch(self) -> int:
        return self.applied_limit + 1 if self.paginate else self.applied_limit

    def sql_with_limit(self) -> str:
        return f"{self.sql} LIMIT {self.fetch}"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _stamp_sql(stamp: _Stamp) -> str:
    if stamp.us is None:
        return "CAST(NULL AS TIMESTAMPTZ)"
    return f"CAST(make_timestamp(CAST({stamp.us} AS BIGINT)) AS TIMESTAMPTZ)"


_BASIC_DT = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?)?$")
_MICRO_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{1,6}$")
_MYSQL_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$|^\d{4}-\d{2}-\d{2}$")


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise HogQLError(f"Invalid time zone: {name}") from None


def _epoch_us(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _basic_datetime(text: str, tz: ZoneInfo, scale: int) -> int | None:
    """ClickHouse's plain reading of ``YYYY-MM-DD[ hh:mm:ss[.fraction]]`` at ``scale`` digits
    (extra digits are cut off), in ``tz``; None if the text is not in that form."""
    m = _BASIC_DT.match(text.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second, fraction = m.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                          int(second or 0), tzinfo=tz)  # fmt: skip
    except ValueError:
        return None
    digits = (fraction or "")[: max(0, min(scale, 6))]
    micros = int(digits.ljust(6, "0")) if digits else 0
    return _epoch_us(moment) + micros


def _best_effort(text: str, tz: ZoneInfo) -> int | None:
    """``parseDateTime64BestEffort(s, 6, tz)`` for the ISO-8601 forms (offset or ``Z`` honoured,
    the zone used when none is given)."""
    basic = _basic_datetime(text, tz, 6)
    if basic is not None:
        return basic
    try:
        moment = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return _epoch_us(moment)


#: ``events.person_id`` with persons on events (PostHog's default modes,
#: ``Team.person_on_events_mode_flag_based_default``): the person id stored on the event at
#: ingestion with merges applied (``person_distinct_id_overrides``, a LEFT JOIN), so no event is
#: dropped. The stand-in stores no person id on events: a live mapping stands for the override,
#: and a personless event gets a person id derived from its distinct id, as PostHog's are.
PERSON_ID_ON_EVENTS = "coalesce(pdi.person_id, md5('personless:' || t.distinct_id)::UUID)"


class Compiler:
    def __init__(
        self, query: Select, timezone: str = "UTC", *, persons_on_events: bool = True
    ) -> None:
        self.query = query
        self.timezone = timezone
        self.persons_on_events = persons_on_events
        name = query.table
        if name not in TABLES:
            if name in OTHER_POSTHOG_TABLES:
                raise unsupported(f"the table {name}")
            raise HogQLError(f"Unknown table `{name}`.")
        self.table = TABLES[name]
        self.table_names = {name} | ({query.table_alias} if query.table_alias else set())
        self.needs_pdi = False
        self.aliases: dict[str, Typed] = {}

    # -- fields and calls -------------------------------------------------------------------
    def field(self, node: Field) -> Typed:
        chain = list(node.chain)
        if len(chain) > 1 and chain[0] in self.table_names and chain[1] in self.table.columns:
            chain = chain[1:]
        head = chain[0]
        if len(chain) == 1 and head in self.aliases and head not in self.table.columns:
            return self.aliases[head]
        if head in self.table.json_columns and len(chain) > 1:
            return self.property(chain)
        if len(chain) == 1 and head in self.table.columns:
            column = self.table.columns[head]
            self.needs_pdi = self.needs_pdi or column.needs_pdi
            sql = PERSON_ID_ON_EVENTS if column.needs_pdi and self.persons_on_events else column.sql
            return Typed(sql, column.type, name=head)
        if head in ("person", "pdi", "poe", "session") or head.startswith(("$group_", "group_")):
            raise unsupported(f"the field {'.'.join(chain)}")
        raise HogQLError(f"Unable to resolve field: {head}")

    def property(self, chain: list[str]) -> Typed:
        """``properties.a.b``: ``replaceRegexpAll(nullIf(nullIf(JSONExtractRaw(properties, 'a',
        'b'), ''), 'null'), '^"|"$', '')``, the printer's access to a property of unknown type."""
        column = self.table.columns[chain[0]]
        pointer = "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in chain[1:])
        raw = f"CAST(json_extract({column.sql}, {_quote(pointer)}) AS VARCHAR)"
        sql = f"regexp_replace(nullif(nullif({raw}, ''), 'null'), '^\"|\"$', '', 'g')"
        return Typed(sql, T_NSTR, name=".".join(chain))

    def const_args(self, call: Call, lo: int, hi: int) -> list[Any]:
        if not lo <= len(call.args) <= hi:
            raise HogQLError(
                f"Function '{call.name}' expects {lo}"
                + (f" to {hi}" if hi != lo else "")
                + f" arguments, found {len(call.args)}"
            )
        values = []
        for arg in call.args:
            typed = self.expr(arg)
            if not typed.is_const:
                raise unsupported(f"{call.name}() of a column (only of literals)")
            values.append(typed.const)
        return values

    def call(self, node: Call) -> Typed:
        name = node.name
        if name.lower() == "count":
            if node.args:
                arg = self.expr(node.args[0])
                if len(node.args) > 1:
                    raise HogQLError(
                        f"Aggregation 'count' expects at most 1 argument, found {len(node.args)}"
                    )
                return Typed(f"count({arg.sql})", T_U64, aggregate=True, name="count()")
            return Typed("count(*)", T_U64, aggregate=True, name="count()")
        if name == "toTimeZone":
            # the wall time in another zone (the package asks toDate(toTimeZone(timestamp, 'UTC'))
            # for UTC days whatever the project's timezone)
            if len(node.args) != 2:
                raise HogQLError(f"Function '{name}' expects 2 arguments, found {len(node.args)}")
            arg, zone_arg = self.expr(node.args[0]), self.expr(node.args[1])
            zone = zone_arg.const if zone_arg.is_const else None
            if arg.type not in _DATETIMES or not isinstance(zone, str):
                raise unsupported("toTimeZone() of that expression")
            _zone(zone)
            return Typed(f"timezone('{zone}', {arg.sql})", arg.type, name=f"toTimeZone({arg.name})")
        if name in ("toDate", "to_date"):
            if len(node.args) != 1:
                raise HogQLError(f"Function '{name}' expects 1 argument, found {len(node.args)}")
            arg = self.expr(node.args[0])
            label = f"toDate({arg.name})"
            if arg.type in _DATETIMES:
                return Typed(f"CAST({arg.sql} AS DATE)", T_DATE, name=label)
            if arg.is_const and isinstance(arg.const, str):
                stamp = _basic_datetime(arg.const, ZoneInfo("UTC"), 0)
                return Typed("const", "const", const=_Stamp(stamp), name=label)
            raise unsupported(f"toDate() of {arg.type}")
        if name == "toDateTime64":
            args = self.const_args(node, 1, 3)
            text = args[0]
            scale = args[1] if len(args) > 1 else 6
            tz = _zone(args[2] if len(args) > 2 else self.timezone)
            if not isinstance(scale, int) or isinstance(scale, bool) or not 0 <= scale <= 9:
                raise HogQLError("toDateTime64: the scale must be an integer from 0 to 9")
            if isinstance(text, _Stamp):
                return Typed("const", "const", const=text, name="toDateTime64(...)")
            if not isinstance(text, str):
                raise unsupported("toDateTime64() of a non-string literal")
            us = _basic_datetime(text, tz, scale)
            if us is None:
                raise HogQLError(
                    f"Cannot parse string '{text}' as DateTime64({scale}): ClickHouse reads "
                    "'YYYY-MM-DD hh:mm:ss[.fraction]' here"
                )
            return Typed("const", "const", const=_Stamp(us), name="toDateTime64(...)")
        if name == "toDateTime":
            args = self.const_args(node, 1, 2)
            value = args[0]
            if isinstance(value, _Stamp):
                return Typed("const", "const", const=value, name="toDateTime(...)")
            if isinstance(value, int) and not isinstance(value, bool):
                return Typed("const", "const", const=_Stamp(value * 1_000_000))
            if not isinstance(value, str):
                raise unsupported("toDateTime() of this literal")
            if len(args) == 2:  # parseDateTime64BestEffortOrNull(s, 6, tz)
                if not isinstance(args[1], str):
                    raise HogQLError("toDateTime: the time zone must be a string")
                return Typed("const", "const", const=_Stamp(_best_effort(value, _zone(args[1]))))
            tz = _zone(self.timezone)
            if _MICRO_PATTERN.match(value):  # printed as toDateTime64(s, 6, tz)
                return Typed("const", "const", const=_Stamp(_basic_datetime(value, tz, 6)))
            if _MYSQL_PATTERN.match(value):  # printed as toDateTime(s, tz): whole seconds
                us = _basic_datetime(value, tz, 0)
                if us is None:
                    raise HogQLError(f"Cannot parse DateTime from String '{value}'")
                return Typed("const", "const", const=_Stamp(us))
            us = _best_effort(value, tz)  # parseDateTime64BestEffort(s, 6, tz)
            if us is None:
                raise HogQLError(f"Cannot read DateTime: unexpected text in '{value}'")
            return Typed("const", "const", const=_Stamp(us))
        if name == "toUUID":
            (value,) = self.const_args(node, 1, 1)
            if isinstance(value, _Uuid):
                return Typed("const", "const", const=value)
            try:
                text = str(uuidlib.UUID(str(value))) if isinstance(value, str) else None
            except ValueError:
                text = None  # accurateCastOrNull(s, 'UUID')
            return Typed("const", "const", const=_Uuid(text))
        if name in _KNOWN_FUNCTIONS:
            raise unsupported(f"the function {name}()")
        raise HogQLError(f"Unsupported function call '{name}(...)'")

    # -- expressions --------------------------------------------------------------------------
    def expr(self, node: Any) -> Typed:
        if isinstance(node, Const):
            return Typed("const", "const", const=node.value, name=repr(node.value))
        if isinstance(node, Field):
            return self.field(node)
        if isinstance(node, Call):
            return self.call(node)
        if isinstance(node, Cmp):
            return self.comparison(node.op, self.expr(node.left), self.expr(node.right))
        if isinstance(node, InList):
            return self.in_list(node)
        if isinstance(node, BoolOp):
            parts = [self.condition(e) for e in node.exprs]
            return Typed("(" + f" {node.op} ".join(parts) + ")", "Bool")
        if isinstance(node, Not):
            return Typed(f"(NOT {self.condition(node.expr)})", "Bool")
        raise unsupported(type(node).__name__)

    def condition(self, node: Any) -> str:
        typed = self.expr(node)
        if typed.type == "Bool":
            return typed.sql
        if typed.is_const and isinstance(typed.const, bool):
            return "TRUE" if typed.const else "FALSE"
        raise unsupported("a condition that is not a comparison")

    def literal_for(self, target: str, const: Any) -> str | None:
        """SQL for ``const`` compared with a ``target``-typed value; None for NULL."""
        if const is None:
            return None
        if target in _DATETIMES:
            if isinstance(const, _Stamp):
                return None if const.us is None else _stamp_sql(const)
            if isinstance(const, str):
                us = _basic_datetime(const, ZoneInfo("UTC"), 6)
                if us is None:
                    raise HogQLError(
                        f"Cannot parse string '{const}' as {target}: the stand-in reads "
                        "'YYYY-MM-DD[ hh:mm:ss[.fraction]]' (use toDateTime64('...', 6, 'UTC'))"
                    )
                return _stamp_sql(_Stamp(us))
            raise HogQLError(f"Cannot compare {target} with {const!r}")
        if target == T_UUID:
            if isinstance(const, _Uuid):
                return None if const.text is None else _quote(ck_of(const.text))
            if isinstance(const, str):
                try:
                    return _quote(ck_of(const))
                except ValueError:
                    raise HogQLError(
                        f"Cannot parse uuid {const}: Cannot parse UUID from String"
                    ) from None
            raise HogQLError(f"Cannot compare UUID with {const!r}")
        if target == T_DATE:
            if isinstance(const, _Stamp):
                return None if const.us is None else f"CAST({_stamp_sql(const)} AS DATE)"
            if isinstance(const, str) and re.match(r"^\d{4}-\d{2}-\d{2}$", const):
                return f"DATE {_quote(const)}"
            raise HogQLError(f"Cannot compare Date with {const!r}")
        if target in _STRINGS:
            if isinstance(const, str):
                return _quote(const)
            raise HogQLError(
                f"Illegal types of arguments: {target} and {type(const).__name__} cannot be "
                "compared"
            )
        if target in _INTS:
            if isinstance(const, bool) or not isinstance(const, int | float):
                raise HogQLError(f"Cannot compare {target} with {const!r}")
            return str(const)
        raise unsupported(f"comparing {target} with a literal")

    @staticmethod
    def sort_sql(typed: Typed) -> str:
        return f"ck({typed.sql})" if typed.type == T_UUID else typed.sql

    def comparison(self, op: str, left: Typed, right: Typed) -> Typed:
        flip = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}
        if left.is_const and not right.is_const:
            left, right, op = right, left, flip.get(op, op)
        if left.is_const:
            raise unsupported("a comparison of two literals")
        sql_op = {"==": "=", "!=": "<>"}.get(op, op)
        nullable = left.type == T_NSTR
        if right.is_const:
            literal = self.literal_for(left.type, right.const)
            target = self.sort_sql(left)
            if literal is None:  # a NULL: = is IS NULL, != is IS NOT NULL, the rest false
                if sql_op == "=":
                    return Typed(f"({left.sql} IS NULL)", "Bool")
                if sql_op == "<>":
                    return Typed(f"({left.sql} IS NOT NULL)", "Bool")
                return Typed("FALSE", "Bool")
            text = f"({target} {sql_op} {literal})"
        else:
            if _family(left.type) != _family(right.type):
                raise HogQLError(f"Illegal types of arguments: {left.type}, {right.type}")
            nullable = nullable or right.type == T_NSTR
            text = f"({self.sort_sql(left)} {sql_op} {self.sort_sql(right)})"
            if nullable and sql_op == "=":
                return Typed(f"coalesce({text}, {left.sql} IS NULL AND {right.sql} IS NULL)",
                             "Bool")  # fmt: skip
            if nullable and sql_op == "<>":
                return Typed(
                    f"coalesce({text}, ({left.sql} IS NULL) <> ({right.sql} IS NULL))", "Bool"
                )
        if nullable:
            return Typed(f"coalesce({text}, {'TRUE' if sql_op == '<>' else 'FALSE'})", "Bool")
        return Typed(text, "Bool")

    def in_list(self, node: InList) -> Typed:
        target = self.expr(node.expr)
        if target.is_const:
            raise unsupported("IN on a literal")
        literals = []
        for value in node.values:
            typed = self.expr(value)
            if not typed.is_const:
                raise unsupported("IN with a column in the list")
            literal = self.literal_for(target.type, typed.const)
            if literal is not None:
                literals.append(literal)
        if not literals:
            return Typed("TRUE" if node.negated else "FALSE", "Bool")
        op = "NOT IN" if node.negated else "IN"
        text = f"({self.sort_sql(target)} {op} ({', '.join(literals)}))"
        if target.type == T_NSTR:
            text = f"coalesce({text}, FALSE)"
        return Typed(text, "Bool")

    # -- the statement ------------------------------------------------------------------------
    def compile(self) -> Compiled:
        q = self.query
        rendered, columns, types = [], [], []
        has_aggregate = False
        for k, item in enumerate(q.items):
            typed = self.expr(item.expr)
            if typed.type == "Bool" or typed.is_const:
                raise unsupported("selecting a literal or a condition")
            has_aggregate = has_aggregate or typed.aggregate
            name = item.alias or typed.name or f"column_{k}"
            if item.alias:
                self.aliases[item.alias] = typed
            columns.append(name)
            types.append([name, typed.type])
            rendered.append(f"{_render(typed)} AS c{k}")
        where = self.condition(q.where) if q.where is not None else None
        group = [self.expr(e) for e in q.group_by]
        for g in group:
            if g.aggregate or g.is_const or g.type == "Bool":
                raise unsupported("GROUP BY of that expression")
        if group or has_aggregate:
            grouped = {g.sql for g in group}
            for item_typed, item in zip((self.expr(i.expr) for i in q.items), q.items, strict=True):
                if not item_typed.aggregate and item_typed.sql not in grouped:
                    label = item.alias or item_typed.name
                    raise HogQLError(
                        f"Column `{label}` is not under aggregate function and not in GROUP BY"
                    )
        order = []
        for expr, desc in q.order_by:
            typed = self.expr(expr)
            if typed.is_const or typed.type == "Bool":
                raise unsupported("ORDER BY of that expression")
            order.append(f"{self.sort_sql(typed)} {'DESC' if desc else 'ASC'}")
        source = f"{self.table.sql} AS t"
        if self.needs_pdi:
            # persons on events: a LEFT JOIN (overrides); off, join_with_person_distinct_ids_table()
            # is an INNER JOIN on distinct_id, which drops events without a live mapping.
            join = "LEFT JOIN" if self.persons_on_events else "INNER JOIN"
            source += f" {join} person_distinct_ids AS pdi ON t.distinct_id = pdi.distinct_id"
        sql = f"SELECT {', '.join(rendered)} FROM {source}"
        if where:
            sql += f" WHERE {where}"
        if group:
            sql += " GROUP BY " + ", ".join(g.sql for g in group)
        if order:
            sql += " ORDER BY " + ", ".join(order)
        paginate = q.limit is None
        applied = DEFAULT_RETURNED_ROWS if paginate else min(q.limit or 0, MAX_SELECT_RETURNED_ROWS)
        capped = q.limit is not None and q.limit > MAX_SELECT_RETURNED_ROWS
        return Compiled(
            table=q.table,
            sql=sql,
            columns=columns,
            types=types,
            limit=q.limit,
            hogql=print_hogql(q, DEFAULT_RETURNED_ROWS + 1 if paginate else applied),
            paginate=paginate,
            capped=capped,
            applied_limit=applied,
            range_us=self.time_range(),
        )

    def time_range(self) -> tuple[int | None, int | None]:
        """The [lower, upper) bounds the top-level AND puts on ``timestamp`` (events only)."""
        if self.query.table != "events" or self.query.where is None:
            return None, None
        where = self.query.where
        terms = where.exprs if isinstance(where, BoolOp) and where.op == "AND" else [where]
        lower: int | None = None
        upper: int | None = None
        for term in terms:
            if not isinstance(term, Cmp):
                continue
            left, right, op = term.left, term.right, term.op
            if isinstance(right, Field) and not isinstance(left, Field):
                left, right = right, left
                op = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}.get(op, op)
            if not isinstance(left, Field) or left.chain[-1] != "timestamp":
                continue
            try:
                value = self.expr(right)
                literal = value.const if value.is_const else None
                if isinstance(literal, str):
                    literal = _Stamp(_basic_datetime(literal, ZoneInfo("UTC"), 6))
            except HogQLError:
                continue
            if not isinstance(literal, _Stamp) or literal.us is None:
                continue
            if op in (">", ">="):
                lower = literal.us if lower is None else max(lower, literal.us)
            elif op in ("<", "<="):
                upper = literal.us if upper is None else min(upper, literal.us)
            elif op in ("=", "=="):
                lower = literal.us if lower is None else max(lower, literal.us)
                upper = literal.us if upper is None else min(upper, literal.us)
        return lower, upper


def _family(type_: str) -> str:
    if type_ in _DATETIMES:
        return "datetime"
    if type_ in _STRINGS:
        return "string"
    if type_ in _INTS:
        return "int"
    return type_


def _render(typed: Typed) -> str:
    """The SELECT expression whose Python value is what PostHog's JSON shows for the column."""
    if typed.type == T_UUID:
        return f"CAST({typed.sql} AS VARCHAR)"
    if typed.type in _DATETIMES:
        return f"fmt_ts({typed.sql})"
    if typed.type == T_DATE:
        return f"strftime({typed.sql}, '%Y-%m-%d')"
    return typed.sql


def compile_query(text: str, timezone: str = "UTC", *, persons_on_events: bool = True) -> Compiled:
    return Compiler(parse(text), timezone, persons_on_events=persons_on_events).compile()


# ---- printing the HogQL back (the response's ``hogql``) -----------------------------------------


def _print(node: Any) -> str:
    if isinstance(node, Const):
        if node.value is None:
            return "NULL"
        if isinstance(node.value, bool):
            return "true" if node.value else "false"
        if isinstance(node.value, str):
            return "'" + node.value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return str(node.value)
    if isinstance(node, Field):
        return ".".join(p if _IDENT.fullmatch(p) else f"`{p}`" for p in node.chain)
    if isinstance(node, Call):
        inner = "*" if node.star else ", ".join(_print(a) for a in node.args)
        return f"{node.name}({inner})"
    if isinstance(node, Cmp):
        op = {"==": "=", "<>": "!="}.get(node.op, node.op)
        return f"{_print(node.left)} {op} {_print(node.right)}"
    if isinstance(node, InList):
        values = ", ".join(_print(v) for v in node.values)
        return f"{_print(node.expr)} {'NOT IN' if node.negated else 'IN'} ({values})"
    if isinstance(node, BoolOp):
        return "(" + f" {node.op} ".join(_print(e) for e in node.exprs) + ")"
    if isinstance(node, Not):
        return f"NOT {_print(node.expr)}"
    return "?"


def print_hogql(q: Select, limit: int) -> str:
    items = ", ".join(_print(i.expr) + (f" AS {i.alias}" if i.alias else "") for i in q.items)
    text = f"SELECT {items} FROM {q.table}"
    if q.table_alias:
        text += f" AS {q.table_alias}"
    if q.where is not None:
        text += f" WHERE {_print(q.where)}"
    if q.group_by:
        text += " GROUP BY " + ", ".join(_print(g) for g in q.group_by)
    if q.order_by:
        text += " ORDER BY " + ", ".join(
            f"{_print(e)} {'DESC' if desc else 'ASC'}" for e, desc in q.order_by
        )
    return f"{text} LIMIT {limit}"


def day_span(lower_us: int | None, upper_us: int | None, now: datetime) -> tuple[int, int]:
    """A [lower, upper) range in microseconds with open ends filled in (the epoch, now)."""
    upper = upper_us if upper_us is not None else _epoch_us(now)
    lower = lower_us if lower_us is not None else _epoch_us(now - timedelta(days=3650))
    return lower, upper

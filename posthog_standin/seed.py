"""Deterministic, lazy seed data: projects, insights and dashboards (groups: ``group_seed``).

Nothing here is materialised as a list. Insight ``i`` and dashboard ``d`` are computed from
``(seed, index)`` when asked for, so a stand-in started with a million insights starts instantly
and serves a page in O(page size); short ids are a bijection of the id, so lookups need no table.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from . import shapes
from .exporter import RowsTable, exporter_rows
from .hashing import mix
from .shapes import SHAPED_KINDS, Frame, day_label
from .trends import DATE_ORIGIN, TrendTable

#: Anchor of every seeded timestamp, so data does not drift with the wall clock.
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

USERS: tuple[dict[str, Any], ...] = tuple(
    {
        "id": uid,
        "uuid": str(uuid.UUID(int=0x0195_0000_0000_7000_8000_0000_0000_0000 + uid)),
        "distinct_id": f"user-{uid}",
        "first_name": first,
        "last_name": last,
        "email": f"{first.lower()}@example.com",
        "is_email_verified": True,
        "hedgehog_config": None,
        "role_at_organization": "data",
    }
    for uid, first, last in ((1, "Ada", "Lovelace"), (2, "Grace", "Hopper"), (3, "Alan", "Turing"))
)

GROUP_TYPE_NAMES = ("organization", "company", "project", "team", "workspace")
#: PostHog allows at most five group types per project.
MAX_GROUP_TYPES = len(GROUP_TYPE_NAMES)

_INSIGHT_TITLES = (
    "Weekly signups",
    "Daily active users",
    "Pageviews",
    "Checkout conversions",
    "Trial starts",
    "Feature adoption",
    "Churned accounts",
    "Revenue events",
)
_EVENTS = ("$pageview", "signed_up", "purchase", "trial_started", "$autocapture")
#: ``$current_url`` breakdown values; PostHog labels such a series ``"<event> - <value>"``.
_BREAKDOWN_URLS = (
    "https://app.example.com/signup?plan=pro&utm_source=newsletter",
    "https://app.example.com/pricing?utm_campaign=spring-launch",
    "https://www.example.com/blog/how-we-ship-product-updates-every-week",
    "https://app.example.com/settings/billing/upgrade?from=usage-banner",
    "https://docs.example.com/getting-started/install-the-javascript-snippet",
    "https://app.example.com/onboarding/invite-your-team?step=3",
)
_DASHBOARD_NAMES = ("Growth", "Product health", "Revenue", "Onboarding", "Retention")

#: What an insight is saved as, by index ``i`` (the first rule that matches wins):
#: ``i % 40 == 39`` "empty" (no query, empty legacy filters: nothing a tabular export can use),
#: ``i % 10 == 9`` "hogql" (a DataTableNode over a HogQLQuery; the result is rows and columns),
#: ``i % 10 == 7`` "legacy" (saved with legacy ``filters`` only; PostHog answers the query it
#: derives from them, ``query_from_filters``, and ``filters: {}``; the result is trends-shaped),
#: ``i % 40 == 30`` "sql_truncated" (a SQL insight without LIMIT over more rows than PostHog
#: returns for a saved insight: the first 100 and ``hasMore: true``),
#: the kind :data:`_SHAPED_SLOTS` gives ``i % 40`` (each other PostHog insight kind once per 40
#: indexes, at 14-35 so all of them are among the first 40 insights; see ``shapes``),
#: else "trends" (an InsightVizNode over a TrendsQuery with a ``$current_url`` breakdown).
#: Indexes 0-9 are therefore trends, legacy (7) and hogql (9) only.
_SHAPED_SLOTS: dict[int, str] = {
    14: "trends_compare",
    15: "trends_formula",
    16: "trends_aggregate",
    18: "funnel_steps",
    20: "funnel_steps_breakdown",
    21: "funnel_trends",
    23: "funnel_time_to_convert",
    24: "retention",
    25: "lifecycle",
    26: "stickiness",
    28: "paths",
    31: "trends_series_identity",
    32: "retention_aggregated",
    33: "funnel_optional",
    34: "calendar_heatmap",
    35: "boxplot",
}
SQL_TRUNCATED_SLOT = 30
INSIGHT_KINDS = ("trends", "legacy", "hogql", "sql_truncated", "empty", *SHAPED_KINDS)
INSIGHT_KIND_RULES = {
    "empty": "i % 40 == 39",
    "hogql": "i % 10 == 9",
    "legacy": "i % 10 == 7",
    "sql_truncated": f"i % 40 == {SQL_TRUNCATED_SLOT}",
    **{kind: f"i % 40 == {slot}" for slot, kind in _SHAPED_SLOTS.items()},
    "trends": "otherwise",
}
#: ``types`` of a HogQL result: ``[name, ClickHouse type]`` per column.
_HOGQL_TYPES = ("String", "Date", "UInt64")
#: PostHog computes saved insights with ``LimitContext.QUERY_ASYNC``: a SELECT without LIMIT
#: returns ``DEFAULT_RETURNED_ROWS`` rows and ``hasMore`` (``posthog/hogql/constants.py``,
#: ``insights/paginators.py``); a tabular export of the query runs under ``LimitContext.EXPORT``
#: and renders up to ``CSV_EXPORT_LIMIT`` rows.
DEFAULT_RETURNED_ROWS = 100
CSV_EXPORT_LIMIT = 50_000
#: Rows the seeded SQL insight without LIMIT really has (its export renders all of them).
SQL_TRUNCATED_ROWS = 250
_SQL_TRUNCATED_COLUMNS = ("distinct_id", "events")

#: Base-62 alphabet and space of 8-character short ids.
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SHORT_SPACE = 62**8
_SHORT_MULT = 0x2545F4914F6CDD1D % _SHORT_SPACE  # odd and not a multiple of 31: invertible
_SHORT_MULT_INV = pow(_SHORT_MULT, -1, _SHORT_SPACE)


def iso_z(moment: datetime) -> str:
    """ISO-8601 in UTC with ``Z``, the way DRF renders PostHog datetimes."""
    text = moment.astimezone(UTC).isoformat()
    return text.replace("+00:00", "Z")


@dataclass(frozen=True)
class Project:
    """One seeded project (team); ids of its insights and dashboards start after ``*_base``."""

    id: int
    name: str
    seed: int
    n_insights: int
    n_dashboards: int
    n_group_types: int
    n_groups: int
    insight_base: int
    dashboard_base: int
    root_seed: int

    @property
    def uuid(self) -> str:
        return str(uuid.UUID(int=mix(self.seed, self.id, 1) << 64 | mix(self.seed, self.id, 2)))

    def to_json(self) -> dict[str, Any]:
        """The project object of ``GET /api/projects/:id/`` (trimmed to what clients read)."""
        return {
            "id": self.id,
            "uuid": self.uuid,
            "organization": str(uuid.UUID(int=mix(self.seed, 7) << 64 | mix(self.seed, 8))),
            "api_token": f"phc_{mix(self.seed, self.id, 3):016x}{mix(self.seed, self.id, 4):016x}",
            "name": self.name,
            "created_at": iso_z(EPOCH - timedelta(days=400 - self.id)),
            "timezone": "UTC",
            "is_demo": False,
            "access_control": False,
            "ingested_event": True,
            "completed_snapshot_onboarding": True,
            "has_completed_onboarding_for": {"product_analytics": True},
        }


@dataclass(frozen=True)
class Insight:
    """One seeded insight, computed from its project and index; its kind decides the saved query
    and the result's shape (see :data:`INSIGHT_KIND_RULES`)."""

    project: Project
    index: int

    @property
    def id(self) -> int:
        return self.project.insight_base + self.index + 1

    @property
    def _h(self) -> int:
        return mix(self.project.seed, self.project.id, 11, self.index)

    @property
    def short_id(self) -> str:
        return encode_short_id(self.id, self.project.root_seed)

    @property
    def name(self) -> str | None:
        if self.index % 11 == 10:
            return None  # unnamed: PostHog falls back to derived_name
        return f"{_INSIGHT_TITLES[self._h % len(_INSIGHT_TITLES)]} {self.index}"

    @property
    def derived_name(self) -> str:
        events = self.events or ("$pageview",)
        return f"{events[0]} count"

    @property
    def interval(self) -> str:
        return "week" if self.index % 4 == 3 else "day"

    @property
    def points(self) -> int:
        return 5 if self.interval == "week" else 8

    @property
    def kind(self) -> str:
        """How the insight is saved; see :data:`INSIGHT_KINDS`."""
        i = self.index
        if i % 40 == 39:
            return "empty"
        if i % 10 == 9:
            return "hogql"
        if i % 10 == 7:
            return "legacy"
        if i % 40 == SQL_TRUNCATED_SLOT:
            return "sql_truncated"
        if i % 40 in _SHAPED_SLOTS:
            return _SHAPED_SLOTS[i % 40]
        return "trends"

    @property
    def shaped(self) -> bool:
        """Whether the result comes from ``shapes`` (every kind but trends/legacy/hogql/empty)."""
        return self.kind in SHAPED_KINDS

    @property
    def events(self) -> tuple[str, ...]:
        """Series events; every 23rd trends-like insight (and every "empty" one) has none, so its
        CSV is the "No data" table. Other kinds have three (two for the ``A+B`` formula)."""
        first = self._h % len(_EVENTS)
        if self.shaped:
            count = 2 if self.kind == "trends_formula" else 3
        elif self.index % 23 == 22 or self.kind == "empty":
            return ()
        else:
            count = 1 + self.index % 3
        return tuple(_EVENTS[(first + k) % len(_EVENTS)] for k in range(count))

    @property
    def breakdown_values(self) -> tuple[str, ...]:
        """The ``$current_url`` each series is broken down to (one per event)."""
        first = (self._h >> 8) % len(_BREAKDOWN_URLS)
        return tuple(
            _BREAKDOWN_URLS[(first + 2 * k) % len(_BREAKDOWN_URLS)] for k in range(len(self.events))
        )

    @property
    def labels(self) -> tuple[str, ...]:
        """Series labels as PostHog writes them for a breakdown: ``<event> - <value>``, or just
        the value when the query has one series (``build_series_response``)."""
        if len(self.events) == 1:
            return self.breakdown_values
        return tuple(f"{e} - {v}" for e, v in zip(self.events, self.breakdown_values, strict=True))

    @property
    def saved(self) -> bool:
        return self.index % 3 != 2

    @property
    def favorited(self) -> bool:
        return self.index % 7 == 0

    @property
    def created_by(self) -> dict[str, Any]:
        return USERS[self.index % len(USERS)]

    @property
    def tags(self) -> list[str]:
        return ["growth"] if self.index % 5 == 0 else []

    @property
    def description(self) -> str:
        what = self.kind.replace("_", " ") if self.shaped else "trends"
        return f"Seeded {what} insight {self.index} of project {self.project.id}."

    @property
    def dashboard_ids(self) -> list[int]:
        """The first ``10 × dashboards`` insights sit on one dashboard each (round robin)."""
        n = self.project.n_dashboards
        if n == 0 or self.index >= 10 * n:
            return []
        return [self.project.dashboard_base + self.index % n + 1]

    @property
    def created_at(self) -> datetime:
        return EPOCH - timedelta(days=365) + timedelta(minutes=self.index)

    @property
    def updated_at(self) -> datetime:
        return self.created_at + timedelta(hours=6)

    @property
    def model_last_refresh(self) -> datetime | None:
        """The insight row's own ``last_refresh`` column (what ``basic=true`` reports): written
        by the old caching code long ago, never by the query cache; null for every sixth."""
        if self.index % 6 == 5:
            return None
        return self.updated_at + timedelta(minutes=30 + self.index % 60)

    @property
    def cache_key(self) -> str:
        """PostHog's ``filters_hash``; also the id of async query jobs for this insight."""
        return f"cache_{mix(self.project.seed, self.id, 99):016x}{mix(self.id, 98):016x}"

    @property
    def end_date(self) -> date:
        """The last point of the insight's date range."""
        return EPOCH.date() - timedelta(days=self.index % 10)

    @property
    def frame(self) -> Frame:
        """What a ``shapes`` result is computed from."""
        return Frame(self._h, self.events, self.interval, self.end_date, self.points)

    def table(self, labels: tuple[str, ...] | None = None) -> TrendTable:
        """This insight's rows; ``labels`` overrides the series (used for forced CSV row counts).

        Trends-shaped insights label a series ``<event> - <breakdown value>``; a HogQL insight's
        rows are ``(event, day, count)``, so its labels are the bare events.
        """
        step = 7 if self.interval == "week" else 1
        start = self.end_date - timedelta(days=step * (self.points - 1))
        if labels is None:
            labels = self.events if self.kind == "hogql" else self.labels
        return TrendTable(
            labels=labels,
            start_offset=(start - DATE_ORIGIN).days,
            step_days=step,
            key=self._h,
        )

    def export_table(self) -> TrendTable | RowsTable:
        """The rows of a tabular export of the insight's source, as PostHog's exporter lays
        them out: a HogQL select's rows as they are (extendable to any row count, for big
        exports), every row of a SQL insight the insight API cut short, the exporter's layout
        of the result for everything else (``exporter_rows``)."""
        if self.kind == "hogql":
            return self.table()
        if self.kind == "sql_truncated":
            return RowsTable(self.columns, tuple(tuple(r) for r in self.sql_rows()))
        source = (self.query_from_filters() or {}).get("source") or {}
        rows = exporter_rows(self.result(), breakdown_filter=source.get("breakdownFilter"))
        return RowsTable.from_rows(rows)

    @property
    def table_header(self) -> tuple[str, ...]:
        """Column names of a tabular export of this insight."""
        if self.kind == "hogql":
            return self.columns
        return self.export_table().header

    @property
    def row_count(self) -> int:
        """Rows of a tabular export (a HogQL select's: one per series and point)."""
        if self.kind == "hogql":
            return len(self.events) * self.points
        return len(self.export_table().rows)

    def values(self) -> list[float]:
        """The first series' counts (what a chart of the insight shows most prominently)."""
        if self.shaped:
            return shapes.chart_values(self.kind, self.frame)
        if not self.events:
            return []
        table = self.table()
        return [table.value(0, d) for d in range(self.points)]

    def total(self) -> float:
        """Sum of every count in the result (of the charted numbers, for ``shapes`` kinds)."""
        if self.shaped:
            return sum(self.values())
        table = self.table()
        return sum(table.value(s, d) for s in range(len(self.events)) for d in range(self.points))

    def result(self) -> list[Any] | dict[str, Any]:
        """The computed result as the insight API serves it: trends series dicts (like a
        TrendsQuery response) for "trends" and "legacy" insights, row lists for "hogql" ones
        (the first :data:`DEFAULT_RETURNED_ROWS` for "sql_truncated"), an empty list for
        "empty" ones, and the runner's shape for the others (a dict for funnel time to
        convert)."""
        if self.shaped:
            return shapes.result(self.kind, self.frame)
        if self.kind == "hogql":
            return [list(row) for row in self.table().iter_rows(self.row_count)]
        if self.kind == "sql_truncated":
            return self.sql_rows()[:DEFAULT_RETURNED_ROWS]
        table = self.table()
        days = [table.date(d) for d in range(self.points)]
        labels = [day_label(date.fromisoformat(d)) for d in days]
        series = []
        for s, (event, value) in enumerate(zip(self.events, self.breakdown_values, strict=True)):
            data = [table.value(s, d) for d in range(self.points)]
            series.append(
                {
                    "action": {
                        "id": event,
                        "type": "events",
                        "order": s,
                        "name": event,
                        "custom_name": None,
                        "math": "total",
                    },
                    "label": table.labels[s],
                    "breakdown_value": value,
                    "count": sum(data),
                    "data": data,
                    "labels": labels,
                    "days": days,
                }
            )
        return series

    def sql_rows(self) -> list[list[Any]]:
        """Every row of the "sql_truncated" select (``distinct_id``, ``events``), most first."""
        counts = sorted(
            (mix(self._h, 31, k) % 900 + 10 for k in range(SQL_TRUNCATED_ROWS)), reverse=True
        )
        return [[f"user-{k}", n] for k, n in enumerate(counts)]

    @property
    def has_more(self) -> bool | None:
        """``hasMore`` of the computed result: set for SQL results only."""
        if self.kind == "sql_truncated":
            return True
        return False if self.kind == "hogql" else None

    @property
    def columns(self) -> tuple[str, ...]:
        """Result columns of a SQL insight (only meaningful for "hogql" and "sql_truncated")."""
        if self.kind == "sql_truncated":
            return _SQL_TRUNCATED_COLUMNS
        return ("event", self.interval, "count")

    def result_columns(self) -> list[str] | None:
        """``columns`` of a computed result: set for SQL results only."""
        return list(self.columns) if self.kind in ("hogql", "sql_truncated") else None

    def result_types(self) -> list[list[str]] | None:
        """``types`` of a computed result: ``[name, type]`` pairs for SQL results only."""
        if self.kind == "sql_truncated":
            return [["distinct_id", "String"], ["events", "UInt64"]]
        if self.kind != "hogql":
            return None
        return [[name, kind] for name, kind in zip(self.columns, _HOGQL_TYPES, strict=True)]

    def hogql_text(self) -> str:
        """The HogQL select of a "hogql" (or, without LIMIT, "sql_truncated") insight."""
        if self.kind == "sql_truncated":
            return (
                "SELECT distinct_id, count() AS events FROM events "
                "GROUP BY distinct_id ORDER BY events DESC"
            )
        step = "Week" if self.interval == "week" else "Day"
        if self.events:
            where = "event IN (" + ", ".join(f"'{e}'" for e in self.events) + ")"
        else:
            where = "false"
        return (
            f"SELECT event, toStartOf{step}(timestamp) AS {self.interval}, count() AS count "
            f"FROM events WHERE {where} AND timestamp >= now() - INTERVAL {self.points} "
            f"{self.interval.upper()} GROUP BY event, {self.interval} ORDER BY {self.interval} ASC"
        )

    def query(self) -> dict[str, Any] | None:
        """The saved query: null for "legacy" and "empty" insights."""
        kind = self.kind
        if kind in ("legacy", "empty"):
            return None
        if kind == "hogql":
            return {
                "kind": "DataTableNode",
                "source": {"kind": "HogQLQuery", "query": self.hogql_text()},
            }
        if kind == "sql_truncated":
            return {
                "kind": "DataVisualizationNode",
                "source": {"kind": "HogQLQuery", "query": self.hogql_text()},
            }
        if self.shaped:
            return {"kind": "InsightVizNode", "source": shapes.query_source(kind, self.frame)}
        return {"kind": "InsightVizNode", "source": self._trends_source()}

    def query_from_filters(self) -> dict[str, Any] | None:
        """What PostHog's serializers answer as ``query``: the saved query, or for an insight
        saved with legacy filters the query PostHog derives from them (``query_from_filters``)."""
        if self.kind == "legacy":
            return {"kind": "InsightVizNode", "source": self._trends_source()}
        return self.query()

    def _trends_source(self) -> dict[str, Any]:
        return {
            "kind": "TrendsQuery",
            "series": [
                {"kind": "EventsNode", "event": e, "name": e, "math": "total"} for e in self.events
            ],
            "interval": self.interval,
            "dateRange": {"date_from": f"-{self.points - 1}{self.interval[0]}"},
            "breakdownFilter": {"breakdown": "$current_url", "breakdown_type": "event"},
        }

    def filters(self) -> dict[str, Any]:
        """The legacy ``filters`` an insight was saved with: set for "legacy" insights only."""
        if self.kind != "legacy":
            return {}
        return {
            "insight": "TRENDS",
            "events": [
                {"id": e, "type": "events", "order": k, "name": e, "math": "total"}
                for k, e in enumerate(self.events)
            ],
            "interval": self.interval,
            "date_from": f"-{self.points - 1}{self.interval[0]}",
            "breakdown": "$current_url",
            "breakdown_type": "event",
            "display": "ActionsLineGraph",
        }


@dataclass(frozen=True)
class Dashboard:
    project: Project
    index: int

    @property
    def id(self) -> int:
        return self.project.dashboard_base + self.index + 1

    @property
    def name(self) -> str:
        """Names need not be unique in PostHog: the sixth dashboard is a second "Growth"."""
        base = _DASHBOARD_NAMES[self.index % len(_DASHBOARD_NAMES)]
        if self.index < len(_DASHBOARD_NAMES) or self.index == len(_DASHBOARD_NAMES):
            return base
        return f"{base} {self.index}"

    @property
    def pinned(self) -> bool:
        return self.index == 0

    @property
    def tags(self) -> list[str]:
        return ["growth"] if self.index % len(_DASHBOARD_NAMES) == 0 else []

    def insight_indexes(self) -> list[int]:
        n = self.project.n_dashboards
        cap = min(10 * n, self.project.n_insights)
        return list(range(self.index, cap, n))


class Seed:
    """All seeded projects. Only integers live here; every object is computed on demand."""

    def __init__(
        self,
        *,
        seed: int,
        project_id: int,
        insights: int,
        dashboards: int,
        group_types: int,
        groups: int,
    ) -> None:
        self.seed = seed
        types = max(0, min(group_types, MAX_GROUP_TYPES))
        self.main = Project(
            id=project_id,
            name="Default project",
            seed=seed,
            n_insights=insights,
            n_dashboards=dashboards,
            n_group_types=types,
            n_groups=groups,
            insight_base=0,
            dashboard_base=0,
            root_seed=seed,
        )
        # A smaller second project so multi-project setups can be tested.
        self.staging = Project(
            id=project_id + 1,
            name="Staging",
            seed=seed + 1,
            n_insights=min(insights, 6),
            n_dashboards=min(dashboards, 1),
            n_group_types=min(types, 2),
            n_groups=min(groups, 40),
            insight_base=insights,
            dashboard_base=dashboards,
            root_seed=seed,
        )
        self.projects = {self.main.id: self.main, self.staging.id: self.staging}

    # ---- insights ---------------------------------------------------------------------------
    def insight_by_id(self, insight_id: int) -> Insight | None:
        for project in self.projects.values():
            index = insight_id - project.insight_base - 1
            if 0 <= index < project.n_insights:
                return Insight(project, index)
        return None

    def insight_by_short_id(self, short_id: str) -> Insight | None:
        insight_id = decode_short_id(short_id, self.seed)
        found = self.insight_by_id(insight_id) if insight_id is not None else None
        return found if found is not None and found.short_id == short_id else None

    # ---- dashboards -------------------------------------------------------------------------
    def dashboard_by_id(self, dashboard_id: int) -> Dashboard | None:
        for project in self.projects.values():
            index = dashboard_id - project.dashboard_base - 1
            if 0 <= index < project.n_dashboards:
                return Dashboard(project, index)
        return None


def encode_short_id(insight_id: int, seed: int) -> str:
    """8 base-62 characters, a bijection of the id (so lookups need no table)."""
    x = (insight_id * _SHORT_MULT + mix(seed, 5)) % _SHORT_SPACE
    chars = []
    for _ in range(8):
        x, rem = divmod(x, 62)
        chars.append(_B62[rem])
    return "".join(reversed(chars))


def base62_id(value: int) -> str:
    """8 base-62 characters of ``value`` (e.g. a notebook's short id)."""
    x = value % _SHORT_SPACE
    chars = []
    for _ in range(8):
        x, rem = divmod(x, 62)
        chars.append(_B62[rem])
    return "".join(reversed(chars))


def decode_short_id(short_id: str, seed: int) -> int | None:
    if len(short_id) != 8 or any(c not in _B62 for c in short_id):
        return None
    x = 0
    for c in short_id:
        x = x * 62 + _B62.index(c)
    return ((x - mix(seed, 5)) * _SHORT_MULT_INV) % _SHORT_SPACE


# ---- groups ---------------------------------------------------------------------------------

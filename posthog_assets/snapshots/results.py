"""Insight results as tidy rows: one function per PostHog result shape, no Dagster, no DuckDB.

PostHog's query runners return a different shape per insight kind (``posthog/hogql_queries/
insights/``); an analyst should not have to know them. :func:`flatten_insight` reads the kind
from the saved query (or the legacy ``filters``), checks the result has that kind's shape, and
returns rows for the tidy tables:

- ``insight_series``: a point of a Trends, Stickiness or Lifecycle series (and of a funnel's
  trends or time-to-convert view);
- ``funnel_steps``: a step of a funnel (per breakdown value), with conversion rates;
- ``retention_cells``: a cohort's count in one period;
- ``path_edges``: an edge between two path steps;
- ``insight_rows``: a HogQL/DataTable result row, as an object keyed by column name.

Every insight gets either rows or a reason (``unflattened``): no result, an empty one, a kind or
shape not known, or a display whose data the insight API does not carry. The caller keeps the
raw result and counts the reasons. Plain Python on purpose: results are small nested lists of
dicts, read one page at a time, so a loop beats building a DataFrame per insight.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

SERIES = "insight_series"
FUNNEL_STEPS = "funnel_steps"
RETENTION_CELLS = "retention_cells"
PATH_EDGES = "path_edges"
INSIGHT_ROWS = "insight_rows"
TIDY_TABLES = (SERIES, FUNNEL_STEPS, RETENTION_CELLS, PATH_EDGES, INSIGHT_ROWS)

#: Query kinds of an insight's source whose result is rows and columns.
ROW_QUERY_KINDS = frozenset(
    {"HogQLQuery", "EventsQuery", "ActorsQuery", "PersonsQuery", "GroupsQuery", "SessionsQuery"}
)
#: Legacy ``filters.insight`` values and the query kind they stand for.
LEGACY_KINDS = {
    "TRENDS": "TrendsQuery",
    "FUNNELS": "FunnelsQuery",
    "RETENTION": "RetentionQuery",
    "PATHS": "PathsQuery",
    "STICKINESS": "StickinessQuery",
    "LIFECYCLE": "LifecycleQuery",
}
#: PostHog reports path conversion times in milliseconds (``paths_query_runner.py`` multiplies
#: by 1000), funnel ones in seconds (``funnels/base.py``, ``dateDiff('second', ...)``).
PATHS_TIME_UNIT_S = 0.001

#: PostHog's breakdown sentinels (``posthog/hogql_queries/insights/utils/breakdowns.py``; the
#: numeric ones are 2^53-2 and 2^53-1, for numeric breakdowns) and the text its CSV exporter
#: shows for them instead.
BREAKDOWN_NULL_DISPLAY = "None (i.e. no value)"
BREAKDOWN_OTHER_DISPLAY = "Other (i.e. all remaining values)"
_BREAKDOWN_SENTINELS = {
    "$$_posthog_breakdown_null_$$": ("null", BREAKDOWN_NULL_DISPLAY),
    "9007199254740990": ("null", BREAKDOWN_NULL_DISPLAY),
    "$$_posthog_breakdown_other_$$": ("other", BREAKDOWN_OTHER_DISPLAY),
    "9007199254740991": ("other", BREAKDOWN_OTHER_DISPLAY),
}
#: Why an insight has no tidy rows although nothing went wrong while flattening.
NO_RESULT = "no result (null: a cold cache, or a query that failed or is still running)"
EMPTY_RESULT = "empty result"
#: Trends displays whose data is not a series of points (``trendsFilter.display``).
CALENDAR_HEATMAP = "CalendarHeatmap"
BOX_PLOT = "BoxPlot"
UNFLATTENED_DISPLAYS = {
    CALENDAR_HEATMAP: "CalendarHeatmap display: the day-by-hour grid stays as JSON in "
    "posthog.insights.result (calendar_heatmap_data); its total is not a data point",
    BOX_PLOT: "BoxPlot display: the per-interval statistics stay as JSON in "
    "posthog.insights.result (older PostHog versions keep them outside the insight's result)",
}


@dataclass
class Flattened:
    """The tidy rows of one insight (without the snapshot's constant columns)."""

    kind: str | None
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Why nothing was flattened from a result that was there; None when it was (or was empty).
    unflattened: str | None = None

    def add(self, table: str, row: dict[str, Any]) -> None:
        self.rows.setdefault(table, []).append(row)


class ShapeError(ValueError):
    """The result does not have the shape its kind promises."""


def insight_kind(insight: Mapping[str, Any]) -> str | None:
    """The result kind of an insight: ``trends``, ``stickiness``, ``lifecycle``,
    ``funnel_steps``, ``funnel_trends``, ``funnel_time_to_convert``, ``retention``, ``paths``,
    ``rows``; or the unknown query kind as it is; None with neither a query nor filters."""
    source = _query_source(insight.get("query"))
    if source is not None:
        kind = source.get("kind")
        if kind == "FunnelsQuery":
            funnels = source.get("funnelsFilter") or {}
            return _funnel_kind(funnels.get("funnelVizType"))
        if kind in ROW_QUERY_KINDS:
            return "rows"
        return _QUERY_KINDS.get(str(kind), str(kind)) if kind else None
    filters = insight.get("filters") or {}
    if not isinstance(filters, Mapping) or not filters:
        return None
    legacy = LEGACY_KINDS.get(str(filters.get("insight") or "TRENDS").upper())
    if legacy == "FunnelsQuery":
        return _funnel_kind(filters.get("funnel_viz_type"))
    return _QUERY_KINDS.get(legacy or "")


_QUERY_KINDS = {
    "TrendsQuery": "trends",
    "StickinessQuery": "stickiness",
    "LifecycleQuery": "lifecycle",
    "RetentionQuery": "retention",
    "PathsQuery": "paths",
}


def _funnel_kind(viz: Any) -> str:
    return {"trends": "funnel_trends", "time_to_convert": "funnel_time_to_convert"}.get(
        str(viz or "steps"), "funnel_steps"
    )


_SOURCE_WRAPPERS = frozenset({"InsightVizNode", "DataTableNode", "DataVisualizationNode"})


def _query_source(query: Any) -> Mapping[str, Any] | None:
    """The query that computes the result: an InsightVizNode's or DataTableNode's source."""
    if not isinstance(query, Mapping):
        return None
    source = query.get("source")
    if isinstance(source, Mapping) and query.get("kind") in _SOURCE_WRAPPERS:
        return source
    return query


def trends_display(insight: Mapping[str, Any]) -> str | None:
    """``trendsFilter.display`` of a TrendsQuery (or legacy ``filters.display``), if set."""
    source = _query_source(insight.get("query"))
    if source is not None:
        display = (source.get("trendsFilter") or {}).get("display")
    else:
        filters = insight.get("filters") or {}
        display = filters.get("display") if isinstance(filters, Mapping) else None
    return str(display) if display else None


def flatten_insight(insight: Mapping[str, Any]) -> Flattened:
    """Tidy rows of ``insight``'s result, or the reason there are none; never raises."""
    kind = insight_kind(insight)
    result = insight.get("result")
    if result is None:
        return Flattened(kind, unflattened=NO_RESULT)
    display = trends_display(insight) if kind == "trends" else None
    if display in UNFLATTENED_DISPLAYS:
        return Flattened(kind, unflattened=UNFLATTENED_DISPLAYS[str(display)])
    if result == [] or result == {}:
        return Flattened(kind, unflattened=EMPTY_RESULT)
    flatten = _FLATTENERS.get(kind or "")
    if flatten is None:
        why = f"unknown kind {kind!r}" if kind else "no query to tell the kind"
        return Flattened(kind, unflattened=why)
    out = Flattened(kind)
    try:
        flatten(insight, result, out)
    except (ShapeError, TypeError, ValueError, KeyError, AttributeError) as exc:
        out.rows = {}
        out.unflattened = f"{kind} result of an unexpected shape: {exc}"
    return out


# ------------------------------------------------------------------------------------------------
# Series: Trends, Stickiness, Lifecycle, funnel trends


def _series(insight: Mapping[str, Any], result: Any, out: Flattened) -> None:
    """One row per point; ``action`` carries what tells two series of one event apart (its
    position in the query, custom name and math), ``null`` for formula series."""
    for s_index, series in enumerate(_list_of_dicts(result)):
        action = series.get("action")
        action = action if isinstance(action, Mapping) else {}
        breakdown, breakdown_kind = _breakdown(series.get("breakdown_value"))
        common = {
            "series_index": s_index,
            "series_order": _int_or_none(action.get("order")),
            "label": _text(series.get("label")),
            "custom_name": _text(action.get("custom_name")),
            "math": _text(action.get("math")),
            "math_property": _text(action.get("math_property")),
            "breakdown_value": breakdown,
            "breakdown_kind": breakdown_kind,
            "compare_label": _text(series.get("compare_label")),
            "status": _text(series.get("status")),
        }
        data = series.get("data")
        if not data and series.get("aggregated_value") is not None:
            # Total-value displays (BoldNumber, pie, table, world map): one number per series.
            out.add(SERIES, _point(common, 0, None, None, _number(series["aggregated_value"])))
        elif isinstance(data, list):
            days = series.get("days") or []
            labels = series.get("labels") or []
            for p_index, value in enumerate(data):
                day = days[p_index] if p_index < len(days) else None
                x = labels[p_index] if p_index < len(labels) else day
                out.add(SERIES, _point(common, p_index, day, x, _number(value)))
        elif "aggregated_value" in series:
            # A total-value series with nothing to total (``aggregated_value: null``).
            out.add(SERIES, _point(common, 0, None, None, None))
        else:
            raise ShapeError(f"series {s_index} has neither data nor aggregated_value")


def _point(
    common: dict[str, Any], index: int, day: Any, x: Any, value: float | None
) -> dict[str, Any]:
    """A series' row for one point (``day`` None for a total)."""
    return {
        **common,
        "point_index": index,
        "day": _as_date(day),
        "period_start": _as_timestamp(day),
        "x": _text(x),
        "value": value,
    }


def _time_to_convert(insight: Mapping[str, Any], result: Any, out: Flattened) -> None:
    """A funnel's time-to-convert histogram: one point per bin (x: the bin's start in seconds)."""
    if not isinstance(result, Mapping) or not isinstance(result.get("bins"), list):
        raise ShapeError("time to convert without bins")
    for p_index, (start_s, count) in enumerate(result["bins"]):
        out.add(
            SERIES,
            {
                "series_index": 0,
                "label": "time to convert",
                "point_index": p_index,
                "x": _text(start_s),
                "value": _number(count),
            },
        )


# ------------------------------------------------------------------------------------------------
# Funnels, retention, paths, rows


def _funnel_steps(insight: Mapping[str, Any], result: Any, out: Flattened) -> None:
    """Steps, or (with a breakdown) one list of steps per breakdown value.

    Conversions are PostHog's UI's (``stepsWithConversionMetrics`` in ``funnelUtils.ts``): from
    the first step, and from the last step before that is not optional. An optional step
    (``optionalInFunnel``) is counted on its own (``funnel_udf.py``), so the step after it may
    count more people than it does; dividing by it would give a conversion above 1.
    """
    if not isinstance(result, list):
        raise ShapeError("funnel steps are not a list")
    optional = _optional_steps(insight)
    groups = result if result and isinstance(result[0], list) else [result]
    for steps in groups:
        steps = list(_list_of_dicts(steps))
        first = _count(steps[0].get("count")) if steps else None
        reference = first
        for step in steps:
            count = _count(step.get("count"))
            order = int(step["order"])
            breakdown, breakdown_kind = _breakdown(step.get("breakdown_value"))
            is_optional = order in optional
            out.add(
                FUNNEL_STEPS,
                {
                    "breakdown_value": breakdown,
                    "breakdown_kind": breakdown_kind,
                    "step_order": order,
                    "step_name": _text(step.get("custom_name") or step.get("name")),
                    "is_optional": is_optional,
                    "count": count,
                    "conversion_from_first": _ratio(count, first),
                    "conversion_from_previous": _ratio(count, reference),
                    "average_conversion_time_s": _number(step.get("average_conversion_time")),
                    "median_conversion_time_s": _number(step.get("median_conversion_time")),
                },
            )
            if not is_optional:
                reference = count


def _optional_steps(insight: Mapping[str, Any]) -> set[int]:
    """Orders of the steps marked ``optionalInFunnel`` (never the first) in the saved query."""
    source = _query_source(insight.get("query")) or {}
    series = source.get("series") if isinstance(source, Mapping) else None
    if not isinstance(series, list):
        return set()
    return {
        k for k, node in enumerate(series) if k and isinstance(node, Mapping)
        and node.get("optionalInFunnel")
    }  # fmt: skip


def _retention(insight: Mapping[str, Any], result: Any, out: Flattened) -> None:
    """Cohort x period cells. ``period_label`` is PostHog's bracket label (``Day 1-7`` with
    custom brackets, so ``period`` is the bracket's position, not a day count);
    ``aggregation_value`` is the metric of a sum/avg retention (``count`` is then people)."""
    cohort_index: dict[Any, int] = {}
    for c_index, cohort in enumerate(_list_of_dicts(result)):
        values = cohort.get("values")
        if not isinstance(values, list):
            raise ShapeError(f"cohort {c_index} has no values")
        breakdown, breakdown_kind = _breakdown(cohort.get("breakdown_value"))
        index = cohort_index[breakdown] = cohort_index.get(breakdown, -1) + 1
        for period, cell in enumerate(values):
            cell = cell if isinstance(cell, Mapping) else {"count": cell}
            out.add(
                RETENTION_CELLS,
                {
                    "breakdown_value": breakdown,
                    "breakdown_kind": breakdown_kind,
                    "cohort_index": index,
                    "cohort_label": _text(cohort.get("label")),
                    "cohort_date": _as_date(cohort.get("date")),
                    "cohort_start": _as_timestamp(cohort.get("date")),
                    "period": period,
                    "period_label": _text(cell.get("label")),
                    "count": _count(cell.get("count")),
                    "aggregation_value": _number(cell.get("aggregation_value")),
                },
            )


def _paths(insight: Mapping[str, Any], result: Any, out: Flattened) -> None:
    for e_index, edge in enumerate(_list_of_dicts(result)):
        ms = _number(edge.get("average_conversion_time"))
        out.add(
            PATH_EDGES,
            {
                "edge_index": e_index,
                "source": _text(edge["source"]),
                "target": _text(edge["target"]),
                "value": _count(edge.get("value")),
                "average_conversion_time_s": None if ms is None else ms * PATHS_TIME_UNIT_S,
            },
        )


def _rows(insight: Mapping[str, Any], result: Any, out: Flattened) -> None:
    """HogQL/DataTable results: each row as an object keyed by the result's column names."""
    if not isinstance(result, list):
        raise ShapeError("rows are not a list")
    columns = [str(c) for c in insight.get("columns") or []]
    for r_index, row in enumerate(result):
        if isinstance(row, Mapping):
            obj = dict(row)
        elif isinstance(row, list | tuple):
            names = (
                columns if len(columns) == len(row) else [f"column_{i}" for i in range(len(row))]
            )
            obj = dict(zip(names, row, strict=True))
        else:
            raise ShapeError(f"row {r_index} is a {type(row).__name__}")
        out.add(INSIGHT_ROWS, {"row_index": r_index, "row": obj})


_FLATTENERS = {
    "trends": _series,
    "stickiness": _series,
    "lifecycle": _series,
    "funnel_trends": _series,
    "funnel_time_to_convert": _time_to_convert,
    "funnel_steps": _funnel_steps,
    "retention": _retention,
    "paths": _paths,
    "rows": _rows,
}


# ------------------------------------------------------------------------------------------------
# Values


def _list_of_dicts(value: Any) -> Iterator[Mapping[str, Any]]:
    if not isinstance(value, list):
        raise ShapeError(f"expected a list, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise ShapeError(f"item {i} is a {type(item).__name__}, not an object")
        yield item


def _breakdown(value: Any) -> tuple[str | None, str | None]:
    """A breakdown value as text and its kind: ``value``, ``null`` or ``other`` (PostHog's
    sentinels, shown as its CSV exporter shows them); both None without a breakdown."""
    if value is None:
        return None, None
    parts = list(value) if isinstance(value, list | tuple) else [value]
    sentinels = [_BREAKDOWN_SENTINELS.get("" if p is None else str(p)) for p in parts]
    kinds = {s[0] for s in sentinels if s}
    texts = [s[1] if s else p for s, p in zip(sentinels, parts, strict=True)]
    text = _text(texts if isinstance(value, list | tuple) else texts[0])
    return text, "other" if "other" in kinds else "null" if "null" in kinds else "value"


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    """Labels and breakdown values as text. A list (PostHog sends a funnel's breakdown value as
    ``["Chrome"]``, a multi-property one as ``["Chrome", "Mac"]``) is joined with ``::``, as
    PostHog's own labels and CSV exports do."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return "::".join("" if v is None else str(v) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, default=str)
    return str(value)


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    return float(value)


def _count(value: Any) -> int | None:
    """A count PostHog sends as a number (sometimes ``3.0``): an integer, or a ShapeError."""
    number = _number(value)
    if number is None:
        return None
    if not number.is_integer():
        raise ShapeError(f"count {value!r} is not a whole number")
    return int(number)


def _ratio(part: int | None, whole: int | None) -> float | None:
    return None if part is None or not whole else part / whole


def _as_timestamp(value: Any) -> str | None:
    """A point's or cohort's start with its time (hourly intervals keep their hour): as PostHog
    wrote it, ``YYYY-MM-DD[ HH:MM:SS]`` in the project's time zone for trends, an ISO datetime
    with its offset for retention cohorts."""
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).isoformat(sep=" ")
    except ValueError:
        return None


def _as_date(value: Any) -> str | None:
    """An ISO date of a point, when the point is a date (not a stickiness interval number)."""
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10]).isoformat()
    except ValueError:
        try:
            return datetime.fromisoformat(value).date().isoformat()
        except ValueError:
            return None

"""Saved queries and results of the insight kinds besides plain trends, in the shapes PostHog's
query runners return (``posthog/hogql_queries/insights/``; ``docs/insight-results.md`` names the
runner each field comes from).

Every builder is a pure function of a :class:`Frame` (the insight's hash key, events and date
range), so results are deterministic, small and cheap to recompute on every request. Counts are
whole numbers written as integers (PostHog often sends them as floats, e.g. ``12.0``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from .hashing import mix

#: Kinds built here (plain "trends", "legacy", "hogql" and "empty" live in ``seed``).
SHAPED_KINDS = (
    "trends_compare",
    "trends_formula",
    "trends_aggregate",
    "funnel_steps",
    "funnel_steps_breakdown",
    "funnel_trends",
    "funnel_time_to_convert",
    "retention",
    "lifecycle",
    "stickiness",
    "paths",
    "trends_series_identity",
    "retention_aggregated",
    "funnel_optional",
    "calendar_heatmap",
    "boxplot",
)
#: ``funnelsFilter.funnelVizType`` of each funnel kind.
FUNNEL_VIZ = {
    "funnel_steps": "steps",
    "funnel_optional": "steps",
    "funnel_steps_breakdown": "steps",
    "funnel_trends": "trends",
    "funnel_time_to_convert": "time_to_convert",
}
FORMULA = "A+B"
#: Cohorts of a retention insight (``retentionFilter.totalIntervals``).
RETENTION_INTERVALS = 5
LIFECYCLE_STATUSES = ("new", "returning", "resurrecting", "dormant")
#: ``$browser`` values of a funnel breakdown; PostHog sends each as a one-item list.
_BROWSERS = ("Chrome", "Safari", "Firefox")
_PAGES = ("/home", "/pricing", "/signup", "/docs", "/blog", "/checkout", "/settings")
#: Bins of a time-to-convert histogram (PostHog returns ``bin_count + 1`` of them).
_TTC_BINS = 6
#: PostHog's breakdown sentinels (``posthog/hogql_queries/insights/utils/breakdowns.py``).
BREAKDOWN_NULL = "$$_posthog_breakdown_null_$$"
BREAKDOWN_OTHER = "$$_posthog_breakdown_other_$$"
BREAKDOWN_DISPLAY = {
    BREAKDOWN_NULL: "None (i.e. no value)",
    BREAKDOWN_OTHER: "Other (i.e. all remaining values)",
}
#: Two series of one event that differ only in math and custom name (``trends_series_identity``).
_IDENTITY_SERIES = (("total", "Views"), ("dau", "Users"))
_IDENTITY_BREAKDOWNS = ("Chrome", BREAKDOWN_NULL, BREAKDOWN_OTHER)
#: Custom retention brackets (``retentionCustomBrackets``) of ``retention_aggregated``.
RETENTION_BRACKETS = (1, 7)
_RETENTION_COHORTS = 4


def day_label(day: date) -> str:
    """PostHog's axis label for a day, e.g. ``1-Jan-2026`` (``format_label_date``)."""
    return f"{day.day}-{day.strftime('%b-%Y')}"


@dataclass(frozen=True)
class Frame:
    """What a seeded result is computed from: a hash key, the series events (at least two)
    and a date range of ``points`` intervals ending on ``end``."""

    key: int
    events: tuple[str, ...]
    interval: str
    end: date
    points: int

    @property
    def step(self) -> int:
        return 7 if self.interval == "week" else 1

    def dates(self, count: int | None = None, periods_back: int = 0) -> list[date]:
        """The last ``count`` interval starts, moved ``periods_back`` whole ranges earlier."""
        n = self.points if count is None else count
        last = self.end - timedelta(days=self.step * n * periods_back)
        return [last - timedelta(days=self.step * (n - 1 - k)) for k in range(n)]

    def num(self, lo: int, hi: int, *parts: int) -> int:
        """A deterministic integer in ``[lo, hi]`` for ``parts``."""
        return lo + mix(self.key, *parts) % (hi - lo + 1)


# ---- saved queries -------------------------------------------------------------------------


def _events_nodes(events: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"kind": "EventsNode", "event": e, "name": e, "math": "total"} for e in events]


def _date_range(frame: Frame, points: int | None = None) -> dict[str, Any]:
    n = frame.points if points is None else points
    return {"date_from": f"-{n - 1}{frame.interval[0]}"}


def _trends_source(frame: Frame, trends_filter: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "kind": "TrendsQuery",
        "series": _events_nodes(frame.events),
        "interval": frame.interval,
        "dateRange": _date_range(frame),
        "trendsFilter": trends_filter,
        **extra,
    }


def _funnel_source(kind: str, frame: Frame) -> dict[str, Any]:
    source: dict[str, Any] = {
        "kind": "FunnelsQuery",
        "series": _events_nodes(frame.events),
        "interval": frame.interval,
        "dateRange": _date_range(frame),
        "funnelsFilter": {
            "funnelVizType": FUNNEL_VIZ[kind],
            "funnelOrderType": "ordered",
            "funnelWindowInterval": 14,
            "funnelWindowIntervalUnit": "day",
        },
    }
    if kind == "funnel_steps_breakdown":
        source["breakdownFilter"] = {"breakdown": "$browser", "breakdown_type": "event"}
    if kind == "funnel_optional":
        source["series"][1]["optionalInFunnel"] = True  # never the first step
    return source


def _retention_source(frame: Frame) -> dict[str, Any]:
    start, back = frame.events[0], frame.events[1]
    return {
        "kind": "RetentionQuery",
        "dateRange": _date_range(frame, RETENTION_INTERVALS),
        "retentionFilter": {
            "period": frame.interval.title(),
            "totalIntervals": RETENTION_INTERVALS,
            "retentionType": "retention_first_time",
            "retentionReference": "total",
            "targetEntity": {"id": start, "name": start, "type": "events"},
            "returningEntity": {"id": back, "name": back, "type": "events"},
        },
    }


def _hourly(frame: Frame) -> list[datetime]:
    """``frame.points`` hours ending at 23:00 of the frame's last day."""
    last = datetime.combine(frame.end, time(23))
    return [last - timedelta(hours=frame.points - 1 - k) for k in range(frame.points)]


def query_source(kind: str, frame: Frame) -> dict[str, Any]:
    """The ``source`` of the InsightVizNode PostHog saves for an insight of ``kind``."""
    if kind == "trends_series_identity":
        event = frame.events[0]
        return {
            "kind": "TrendsQuery",
            "series": [
                {
                    "kind": "EventsNode",
                    "event": event,
                    "name": event,
                    "math": math,
                    "custom_name": custom,
                }
                for math, custom in _IDENTITY_SERIES
            ],  # fmt: skip
            "interval": "hour",
            "dateRange": {"date_from": f"-{frame.points - 1}h"},
            "breakdownFilter": {"breakdown": "$browser", "breakdown_type": "event"},
            "trendsFilter": {"display": "ActionsLineGraph"},
        }
    if kind == "retention_aggregated":
        source = _retention_source(frame)
        source["retentionFilter"].update(
            period="Hour",
            totalIntervals=_RETENTION_COHORTS,
            retentionCustomBrackets=list(RETENTION_BRACKETS),
            aggregationType="sum",
            aggregationProperty="revenue",
        )
        source["breakdownFilter"] = {"breakdown": "$browser", "breakdown_type": "event"}
        return source
    if kind == "calendar_heatmap":
        return _trends_source(
            Frame(frame.key, frame.events[:1], frame.interval, frame.end, frame.points),
            {"display": "CalendarHeatmap"},
        )
    if kind == "boxplot":
        source = _trends_source(
            Frame(frame.key, frame.events[:1], frame.interval, frame.end, frame.points),
            {"display": "BoxPlot"},
        )
        source["series"][0].update(math="sum", math_property="revenue")
        return source
    if kind == "trends_compare":
        return _trends_source(
            frame, {"display": "ActionsLineGraph"}, compareFilter={"compare": True}
        )
    if kind == "trends_formula":
        return _trends_source(frame, {"display": "ActionsLineGraph", "formula": FORMULA})
    if kind == "trends_aggregate":
        return _trends_source(frame, {"display": "BoldNumber"})
    if kind in FUNNEL_VIZ:
        return _funnel_source(kind, frame)
    if kind == "retention":
        return _retention_source(frame)
    if kind == "lifecycle":
        return {
            "kind": "LifecycleQuery",
            "series": _events_nodes(frame.events[:1]),
            "interval": frame.interval,
            "dateRange": _date_range(frame),
            "lifecycleFilter": {},
        }
    if kind == "stickiness":
        return {
            "kind": "StickinessQuery",
            "series": _events_nodes(frame.events[:2]),
            "interval": frame.interval,
            "dateRange": _date_range(frame),
            "stickinessFilter": {},
        }
    if kind == "paths":
        return {
            "kind": "PathsQuery",
            "dateRange": _date_range(frame),
            "pathsFilter": {"includeEventTypes": ["$pageview"], "stepLimit": 4, "edgeLimit": 50},
        }
    raise ValueError(f"not a shaped kind: {kind}")


# ---- trends variants -------------------------------------------------------------------------


def _action(event: str, order: int) -> dict[str, Any]:
    """The ``action`` of a trends series (``build_series_response``), trimmed."""
    return {
        "id": event,
        "type": "events",
        "order": order,
        "name": event,
        "custom_name": None,
        "math": "total",
    }


def _time_series(label: str, data: list[int], days: list[date]) -> dict[str, Any]:
    """The keys every time series shares; ``count`` is the sum of ``data``, as PostHog's."""
    return {
        "data": data,
        "labels": [day_label(d) for d in days],
        "days": [d.isoformat() for d in days],
        "count": sum(data),
        "label": label,
    }


def _counts(frame: Frame, series: int, n: int, salt: int = 0) -> list[int]:
    """``n`` counts of one series (``salt`` tells periods apart)."""
    return [frame.num(20, 400, 1, salt, series, d) for d in range(n)]


def _trends_compare(frame: Frame) -> list[dict[str, Any]]:
    """Current-period series first, then the previous period's, each marked by
    ``compare_label`` (the previous ones carry the earlier dates)."""
    results = []
    for compare_label, back in (("current", 0), ("previous", 1)):
        days = frame.dates(periods_back=back)
        for order, event in enumerate(frame.events):
            series = _time_series(event, _counts(frame, order, frame.points, back), days)
            series.update(action=_action(event, order), compare=True, compare_label=compare_label)
            results.append(series)
    return results


def _trends_formula(frame: Frame) -> list[dict[str, Any]]:
    """One series for ``A+B``: the operands are replaced, ``action`` is null."""
    a, b = (_counts(frame, s, frame.points) for s in (0, 1))
    series = _time_series(
        f"Formula ({FORMULA})", [x + y for x, y in zip(a, b, strict=True)], frame.dates()
    )
    series["action"] = None
    return [series]


def _trends_aggregate(frame: Frame) -> list[dict[str, Any]]:
    """Total-value display: ``aggregated_value``, empty ``data``/``days``, no ``labels``."""
    return [
        {
            "data": [],
            "days": [],
            "count": 0,
            "aggregated_value": sum(_counts(frame, order, frame.points)),
            "label": event,
            "action": _action(event, order),
        }
        for order, event in enumerate(frame.events)
    ]


# ---- funnels ---------------------------------------------------------------------------------


def _step_counts(frame: Frame, salt: int) -> list[int]:
    """People reaching each step: never more than at the step before."""
    counts = [frame.num(400, 2000, 2, salt)]
    for k in range(1, len(frame.events)):
        counts.append(counts[-1] * frame.num(35, 90, 3, salt, k) // 100)
    return counts


def _conversion_s(frame: Frame, salt: int, step: int) -> tuple[float, float]:
    """(average, median) seconds from the previous step."""
    average = frame.num(60, 86_400, 4, salt, step) + frame.num(0, 9, 5, salt, step) / 10
    return average, round(average * frame.num(40, 95, 6, salt, step) / 100, 1)


def _funnel_steps(frame: Frame, salt: int = 0, browser: str | None = None) -> list[dict[str, Any]]:
    """One funnel: a step dict per event (``_format_single_funnel``)."""
    steps = []
    for order, (event, count) in enumerate(
        zip(frame.events, _step_counts(frame, salt), strict=True)
    ):
        average, median = _conversion_s(frame, salt, order) if order else (None, None)
        step: dict[str, Any] = {
            "action_id": event,
            "name": event,
            "custom_name": None,
            "order": order,
            "people": [],
            "count": count,
            "type": "events",
            "average_conversion_time": average,
            "median_conversion_time": median,
        }
        if browser is not None:
            step.update(breakdown=[browser], breakdown_value=[browser])
        steps.append(step)
    return steps


def _funnel_steps_breakdown(frame: Frame) -> list[list[dict[str, Any]]]:
    """A funnel per ``$browser`` value, biggest first."""
    funnels = [_funnel_steps(frame, 1 + k, b) for k, b in enumerate(_BROWSERS)]
    return sorted(funnels, key=lambda steps: -steps[0]["count"])


def _funnel_trends(frame: Frame) -> list[dict[str, Any]]:
    """Conversion rate (percent) per entrance period; ``count`` is the number of periods."""
    data = []
    for d in range(frame.points):
        entered = frame.num(50, 500, 7, d)
        converted = entered * frame.num(5, 80, 8, d) // 100
        data.append(round(converted / entered * 100, 2))
    days = frame.dates()
    return [
        {
            "count": len(data),
            "data": data,
            "days": [d.isoformat() for d in days],
            "labels": [day_label(d) for d in days],
        }
    ]


def _funnel_time_to_convert(frame: Frame) -> dict[str, Any]:
    """A histogram of seconds to convert: ``bins`` of ``[start_seconds, people]``."""
    width = (60, 300, 3600)[frame.num(0, 2, 9)]
    start = width * frame.num(0, 5, 10)
    people = [frame.num(0, 120, 11, k) for k in range(_TTC_BINS)] + [0]
    bins = [[start + k * width, n] for k, n in enumerate(people)]
    weighted = sum((s + width / 2) * n for s, n in bins)
    average = round(weighted / sum(people), 2) if sum(people) else None
    return {"bins": bins, "average_conversion_time": average}


# ---- retention, lifecycle, stickiness, paths -----------------------------------------------


def _retention(frame: Frame) -> list[dict[str, Any]]:
    """A cohort per start interval; every cohort has ``RETENTION_INTERVALS`` values, zero for
    periods still in the future, and nobody returns more often than the cohort is big."""
    unit = frame.interval.title()
    cohorts = []
    for c, start in enumerate(frame.dates(RETENTION_INTERVALS)):
        size = frame.num(100, 999, 12, c)
        counts, current = [], size
        for period in range(RETENTION_INTERVALS):
            if period >= RETENTION_INTERVALS - c:
                counts.append(0)
                continue
            if period:
                current = current * frame.num(30, 90, 13, c, period) // 100
            counts.append(current)
        cohorts.append(
            {
                "values": [{"count": n, "label": f"{unit} {p}"} for p, n in enumerate(counts)],
                "label": f"{unit} {c}",
                "date": f"{start.isoformat()}T00:00:00Z",
                "breakdown_value": None,
            }
        )
    return cohorts


def _lifecycle(frame: Frame) -> list[dict[str, Any]]:
    """Four series in PostHog's order; dormant counts are negative."""
    event = frame.events[0]
    days = frame.dates()
    results = []
    for k, status in enumerate(LIFECYCLE_STATUSES):
        sign = -1 if status == "dormant" else 1
        data = [sign * frame.num(0, 150, 14, k, d) for d in range(frame.points)]
        series = _time_series(f"{event} - {status}", data, days)
        series.update(
            action={"id": event, "name": event, "type": "events", "order": 0, "math": "total"},
            status=status,
        )
        results.append(series)
    return results


def _stickiness(frame: Frame) -> list[dict[str, Any]]:
    """Per event: people active in exactly 1, 2, … N intervals (``days`` are those numbers)."""
    unit = frame.interval
    numbers = list(range(1, frame.points + 1))
    results = []
    for order, event in enumerate(frame.events[:2]):
        data, current = [], frame.num(200, 900, 15, order)
        for n in numbers:
            data.append(current)
            current = current * frame.num(30, 80, 16, order, n) // 100
        results.append(
            {
                "count": sum(data),
                "data": data,
                "days": numbers,
                "label": event,
                "labels": [f"{n} {unit}{'' if n == 1 else 's'}" for n in numbers],
                "action": {
                    "order": order,
                    "type": "events",
                    "name": event,
                    "id": event,
                    "custom_name": None,
                },
            }
        )
    return results


def _paths(frame: Frame) -> list[dict[str, Any]]:
    """Edges of a small path tree from two start pages, three steps deep; values positive,
    sorted like PostHog (value descending, then source, then target)."""
    first = frame.num(0, len(_PAGES) - 1, 17)
    pages = [_PAGES[(first + k) % len(_PAGES)] for k in range(len(_PAGES))]
    edges: dict[tuple[str, str], tuple[int, float]] = {}

    def add(source: str, target: str, value: int, salt: int) -> None:
        if value > 0 and (source, target) not in edges:
            edges[(source, target)] = (value, float(frame.num(500, 300_000, 18, salt)))

    for a, start in enumerate(pages[:2]):
        for b, middle in enumerate(pages[2 + 2 * a : 4 + 2 * a]):
            into = frame.num(100, 900, 19, a, b)
            add(f"1_{start}", f"2_{middle}", into, 10 * a + b)
            end = pages[(2 + 2 * a + b + 3) % len(pages)]
            onward = into * frame.num(20, 70, 20, a, b) // 100
            add(f"2_{middle}", f"3_{end}", onward, 50 + 10 * a + b)
    ordered = sorted(edges.items(), key=lambda item: (-item[1][0], item[0][0], item[0][1]))
    return [
        {"source": s, "target": t, "value": v, "average_conversion_time": ms}
        for (s, t), (v, ms) in ordered
    ]


def _trends_series_identity(frame: Frame) -> list[dict[str, Any]]:
    """Two series of one event that differ only in ``math`` and custom name, broken down by
    ``$browser`` with PostHog's null and "other" sentinels, per hour (``build_series_response``:
    with more than one series the label is ``<event> - <value>``)."""
    event = frame.events[0]
    hours = _hourly(frame)
    results = []
    for order, (math, custom) in enumerate(_IDENTITY_SERIES):
        for b, value in enumerate(_IDENTITY_BREAKDOWNS):
            data = [
                frame.num(0, 90 if math == "dau" else 400, 21, order, b, h)
                for h in range(len(hours))
            ]
            results.append(
                {
                    "data": data,
                    "labels": [f"{h.day}-{h.strftime('%b-%Y %H:%M')}" for h in hours],
                    "days": [h.strftime("%Y-%m-%d %H:%M:%S") for h in hours],
                    "count": sum(data),
                    "label": f"{event} - {BREAKDOWN_DISPLAY.get(value, value)}",
                    "action": {
                        "id": event,
                        "type": "events",
                        "order": order,
                        "name": event,
                        "custom_name": custom,
                        "math": math,
                        "math_property": None,
                    },  # fmt: skip
                    "breakdown_value": value,
                }
            )
    return results


def _retention_aggregated(frame: Frame) -> list[dict[str, Any]]:
    """Hourly cohorts per ``$browser`` value ("other" last), summing ``revenue``: each cell has
    ``aggregation_value`` beside ``count``, and bracket labels (``Hour 2-8``)."""
    labels = ["Hour 0"]
    start = 1
    for size in RETENTION_BRACKETS:
        end = start + size - 1
        labels.append(f"Hour {start}" if start == end else f"Hour {start}-{end}")
        start = end + 1
    first = datetime.combine(frame.end, time(0), tzinfo=UTC)
    cohorts = []
    for b, value in enumerate(("Chrome", BREAKDOWN_OTHER)):
        for c in range(_RETENTION_COHORTS):
            size = frame.num(50, 200, 22, b, c)
            values, current = [], size
            for k, label in enumerate(labels):
                if k:
                    current = current * frame.num(20, 80, 23, b, c, k) // 100
                revenue = round(current * frame.num(100, 5000, 24, b, c, k) / 100, 2)
                values.append({"count": current, "aggregation_value": revenue, "label": label})
            cohorts.append(
                {
                    "values": values,
                    "label": f"Hour {c}",
                    "date": (first + timedelta(hours=c)).isoformat().replace("+00:00", "Z"),
                    "breakdown_value": value,
                }
            )
    return cohorts


def _funnel_optional(frame: Frame) -> list[dict[str, Any]]:
    """Three steps, the second optional: counted on its own, so fewer people reach it than
    the third step (``funnel_udf.py``)."""
    steps = _funnel_steps(frame)
    first = steps[0]["count"]
    steps[1]["count"] = first * frame.num(10, 30, 25) // 100
    steps[2]["count"] = first * frame.num(40, 70, 26) // 100
    return steps


def _calendar_heatmap(frame: Frame) -> list[dict[str, Any]]:
    """``CalendarHeatmapTrendsQueryRunner``: one result, no points; the day-of-week by hour
    grid in ``calendar_heatmap_data``, ``count`` and ``aggregated_value`` its total."""
    event = frame.events[0]
    cells = [
        {"row": day, "column": hour, "value": frame.num(1, 60, 27, day, hour)}
        for day in range(1, 8)
        for hour in (9, 13, 17)
    ]
    total = sum(c["value"] for c in cells)
    rows = [
        {"row": d, "value": sum(c["value"] for c in cells if c["row"] == d)} for d in range(1, 8)
    ]
    columns = [
        {"column": h, "value": sum(c["value"] for c in cells if c["column"] == h)}
        for h in (9, 13, 17)
    ]
    return [
        {
            "action": {"id": event, "type": "events", "order": 0, "name": event, "math": "total"},
            "label": event,
            "data": [],
            "aggregated_value": total,
            "calendar_heatmap_data": {
                "data": cells,
                "rowAggregations": rows,
                "columnAggregations": columns,
                "allAggregations": total,
            },
            "count": total,
        }
    ]


def _boxplot(frame: Frame) -> list[dict[str, Any]]:
    """``BoxPlotTrendsQueryRunner`` (newest): one datum per series and interval, no points."""
    event = frame.events[0]
    datums = []
    for d, day in enumerate(frame.dates()):
        low = float(frame.num(1, 20, 28, d))
        quartiles = sorted(float(frame.num(int(low), 400, 29, d, k)) for k in range(5))
        datums.append(
            {
                "day": day.isoformat(),
                "label": day_label(day),
                "min": low,
                "p25": quartiles[1],
                "median": quartiles[2],
                "p75": quartiles[3],
                "max": quartiles[4],
                "mean": round(sum(quartiles) / 5, 2),
                "series_index": 0,
                "series_label": f"{event} - revenue",
            }
        )
    return datums


_BUILDERS: dict[str, Callable[[Frame], Any]] = {
    "trends_compare": _trends_compare,
    "trends_formula": _trends_formula,
    "trends_aggregate": _trends_aggregate,
    "funnel_steps": _funnel_steps,
    "funnel_steps_breakdown": _funnel_steps_breakdown,
    "funnel_trends": _funnel_trends,
    "funnel_time_to_convert": _funnel_time_to_convert,
    "retention": _retention,
    "lifecycle": _lifecycle,
    "stickiness": _stickiness,
    "paths": _paths,
    "trends_series_identity": _trends_series_identity,
    "retention_aggregated": _retention_aggregated,
    "funnel_optional": _funnel_optional,
    "calendar_heatmap": _calendar_heatmap,
    "boxplot": _boxplot,
}


def result(kind: str, frame: Frame) -> list[Any] | dict[str, Any]:
    """The query response's ``results`` for an insight of ``kind``."""
    return _BUILDERS[kind](frame)


def chart_values(kind: str, frame: Frame) -> list[float]:
    """The numbers a picture of the insight shows most prominently (first series, steps,
    cohort sizes, edges or bins)."""
    found = result(kind, frame)
    if isinstance(found, dict):
        return [n for _, n in found["bins"]]
    items = found[0] if found and isinstance(found[0], list) else found
    first = items[0] if items else {}
    if "aggregated_value" in first:
        return [s["aggregated_value"] for s in items]
    if "data" in first:
        return [abs(v) for v in first["data"]]
    if "values" in first:
        return [c["values"][0]["count"] for c in items]
    if "median" in first:
        return [item["median"] for item in items]
    return [item.get("count", item.get("value", 0)) for item in items]

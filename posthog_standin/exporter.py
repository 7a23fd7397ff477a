"""The table PostHog's CSV exporter makes of an insight result, as a fixed table of rows.

``_convert_response_to_csv_data`` in ``products/exports/backend/tasks/csv_exporter.py`` picks a
layout by the result's shape, not by the insight kind: SQL rows, funnel steps, retention cohorts,
trends-like series (trends, lifecycle, stickiness, funnel trends; one column per breakdown
property when the query has a ``breakdownFilter``, ``Total Sum`` for a total value), time-to-
convert bins, and anything else (path edges, box plot statistics) as the dicts are. The header
is every key in the order first seen over all rows, grouped by the part before a dot
(``_write_rows_to_jsonl``, ``_group_columns_by_prefix``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .shapes import BREAKDOWN_DISPLAY

Row = dict[str, Any]


def _funnel_rows(results: list[Any]) -> Iterator[Row]:
    groups = results if isinstance(results[0], list) else [results]
    for steps in groups:
        for step in steps:
            value = step.get("breakdown_value")
            yield {
                "name": step.get("custom_name") or step.get("action_id", ""),
                "breakdown_value": "" if value is None else "::".join(value),
                "action_id": step.get("action_id", ""),
                "count": step.get("count", ""),
                "median_conversion_time (seconds)": step.get("median_conversion_time", ""),
                "average_conversion_time (seconds)": step.get("average_conversion_time", ""),
            }


def _retention_rows(results: list[Row]) -> Iterator[Row]:
    for cohort in results:
        values = cohort.get("values") or []
        size = values[0]["count"] if values else 0
        if cohort.get("date"):
            line: Row = {"cohort": cohort["date"], "cohort size": size}
            line.update((v["label"], v["count"]) for v in values)
        else:
            line = {"cohort": cohort["label"], "cohort size": size}
            line.update((f"Period {k}", v["count"]) for k, v in enumerate(values))
        yield line


def _breakdown_properties(breakdown_filter: Mapping[str, Any] | None) -> list[str]:
    """The breakdown properties that become columns (none without a ``breakdownFilter``)."""
    if not breakdown_filter:
        return []
    listed = breakdown_filter.get("breakdowns") or []
    if not listed and "breakdown" in breakdown_filter:
        listed = [{"property": breakdown_filter["breakdown"]}]
    names = []
    for item in listed:
        name = item.get("property")
        names.append(", ".join(map(str, name)) if isinstance(name, list) else name)
    return names


def _series_rows(results: list[Row], breakdown_filter: Mapping[str, Any] | None) -> Iterator[Row]:
    """Trends-like: one wide row per series, date labels of the current period as columns."""
    comparing = results[0].get("compare_label")
    current = next((s for s in results if s.get("compare_label") == "current"), None)
    properties = _breakdown_properties(breakdown_filter)
    for index, item in enumerate(results):
        action = item.get("action")
        has_breakdown = "breakdown_value" in item and bool(properties)
        if has_breakdown and isinstance(action, dict) and action.get("name"):
            name = action["name"]
        else:
            name = item.get("label", f"Series #{index + 1}")
        if item.get("compare_label"):
            name = f"{name} - {item['compare_label']}"
        line: Row = {"series": name}
        if isinstance(action, dict) and action.get("custom_name"):
            line["custom name"] = action["custom_name"]
        if has_breakdown:
            value = item.get("breakdown_value")
            values = value if isinstance(value, list) else [value]
            for prop, part in zip(properties, values, strict=False):
                if prop:
                    text = "" if part is None else str(part)
                    line[prop] = BREAKDOWN_DISPLAY.get(text, text)
        if item.get("aggregated_value") is not None:
            line["Total Sum"] = item["aggregated_value"]
        elif item.get("data"):
            labels = ((current if comparing and current else item) or {}).get("labels") or []
            line.update((labels[k], v) for k, v in enumerate(item["data"]) if k < len(labels))
        yield line


def _sql_rows(results: list[Any], columns: list[str] | None) -> Iterator[Row]:
    for row in results:
        names = columns or [f"column_{k}" for k in range(len(row))]
        yield dict(zip(names, row, strict=False))


def exporter_rows(
    results: Any,
    columns: list[str] | None = None,
    types: list[Any] | None = None,
    breakdown_filter: Mapping[str, Any] | None = None,
) -> list[Row]:
    """The rows ``_convert_response_to_csv_data`` yields for a query response."""
    if isinstance(results, dict):
        return [{"bin": s, "value": n} for s, n in results.get("bins", [])]
    if not isinstance(results, list) or not results:
        return []
    first = results[0]
    if isinstance(first, list | tuple) and types:
        return list(_sql_rows(results, columns))
    if isinstance(first, list | tuple) or first.get("action_id"):
        return list(_funnel_rows(results))
    if first.get("values") and first.get("label"):
        return list(_retention_rows(results))
    if isinstance(first.get("data"), list) or (
        first.get("data") is None and "aggregated_value" in first
    ):
        return list(_series_rows(results, breakdown_filter))
    return [dict(item) for item in results]


def csv_header(rows: Iterable[Row]) -> tuple[str, ...]:
    """Every key in the order first seen, grouped by the part before a dot."""
    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                groups.setdefault(key.split(".")[0], []).append(key)
    return tuple(key for keys in groups.values() for key in keys)


def _cell(value: Any) -> Any:
    """A cell as the CSV renderer writes it: ``None`` is empty, the rest ``str()``-ed by csv."""
    return "" if value is None else value


@dataclass(frozen=True)
class RowsTable:
    """A fixed table (header + rows) with the interface of :class:`~.trends.TrendTable`, so a
    tabular export renders it the same way; asked for more rows than it has (a forced row
    count), it repeats them."""

    header: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    @classmethod
    def from_rows(cls, rows: list[Row]) -> RowsTable:
        header = csv_header(rows)
        return cls(header, tuple(tuple(row.get(h) for h in header) for row in rows))

    @cached_property
    def _lines(self) -> tuple[str, ...]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        lines = []
        for row in self.rows:
            writer.writerow([_cell(v) for v in row])
            lines.append(buffer.getvalue())
            buffer.seek(0)
            buffer.truncate()
        return tuple(lines)

    def rows_bytes(self, rows: int) -> int:
        """Byte size of the first ``rows`` CSV data rows."""
        if not self.rows:
            return 0
        sizes = [len(line.encode()) for line in self._lines]
        full, rest = divmod(rows, len(sizes))
        return full * sum(sizes) + sum(sizes[:rest])

    def csv_lines(self, start: int, stop: int) -> str:
        lines = self._lines
        return "".join(lines[r % len(lines)] for r in range(start, stop)) if lines else ""

    def iter_rows(self, rows: int) -> Iterable[tuple[Any, ...]]:
        for r in range(rows if self.rows else 0):
            yield self.rows[r % len(self.rows)]

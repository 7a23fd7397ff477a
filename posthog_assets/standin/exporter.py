"""The table PostHog's CSV exporter makes of an insight result, as a fixed table of rows.

``_convert_response_to_csv_data`` in ``posthog/tasks/exports/csv_exporter.py`` picks a layout by
the result's shape, not by the insight kind: funnel steps, retention cohorts, trends-like series
(trends, lifecycle, stickiness, funnel trends), time-to-convert bins, and anything else (path
edges) as the dicts are. The header is the first row's keys, as ``_export_to_dict`` sets it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

Row = dict[str, Any]


def _funnel_rows(results: list[Any]) -> Iterator[Row]:
    groups = results if isinstance(results[0], list) else [results]
    for steps in groups:
        for step in steps:
            yield {
                "name": step.get("custom_name") or step.get("action_id", ""),
                "breakdown_value": "::".join(step.get("breakdown_value", [])),
                "action_id": step.get("action_id", ""),
                "count": step.get("count", ""),
                "median_conversion_time (seconds)": step.get("median_conversion_time", ""),
                "average_conversion_time (seconds)": step.get("average_conversion_time", ""),
            }


def _retention_rows(results: list[Row]) -> Iterator[Row]:
    for cohort in results:
        values = cohort["values"]
        if cohort.get("date"):
            line: Row = {"cohort": cohort["date"], "cohort size": values[0]["count"]}
            line.update((v["label"], v["count"]) for v in values)
        else:
            line = {"cohort": cohort["label"], "cohort size": values[0]["count"]}
            line.update((f"Period {k}", v["count"]) for k, v in enumerate(values))
        yield line


def _series_rows(results: list[Row]) -> Iterator[Row]:
    """Trends-like: one wide row per series, date labels of the current period as columns."""
    comparing = results[0].get("compare_label")
    current = next((s for s in results if s.get("compare_label") == "current"), None)
    for index, item in enumerate(results):
        label = item.get("label", f"Series #{index + 1}")
        compare_label = item.get("compare_label", "")
        line: Row = {"series": f"{label} - {compare_label}" if compare_label else label}
        action = item.get("action")
        if isinstance(action, dict) and action.get("custom_name"):
            line["custom name"] = action["custom_name"]
        value = item.get("breakdown_value")
        if value is not None:
            line["breakdown"] = (
                "::".join(str(v) for v in value) if isinstance(value, list) else str(value)
            )
        if item.get("aggregated_value"):
            line["total count"] = item["aggregated_value"]
        else:
            labels = (current if comparing and current else item)["labels"]
            line.update((labels[k], v) for k, v in enumerate(item["data"]))
            if item.get("data"):
                line["total"] = sum(item["data"])
        yield line


def _hogql_rows(results: list[Any], columns: list[str] | None) -> Iterator[Row]:
    for row in results:
        names = columns or [f"column_{k}" for k in range(len(row))]
        yield dict(zip(names, row, strict=False))


def exporter_rows(
    results: Any, columns: list[str] | None = None, types: list[Any] | None = None
) -> list[Row]:
    """The rows ``_convert_response_to_csv_data`` yields for a query response."""
    if isinstance(results, dict):
        return [{"bin": s, "value": n} for s, n in results.get("bins", [])]
    if not isinstance(results, list) or not results:
        return []
    first = results[0]
    if isinstance(first, list | tuple):
        return list(_hogql_rows(results, columns) if types else _funnel_rows(results))
    if first.get("action_id"):
        return list(_funnel_rows(results))
    if first.get("values") and first.get("label"):
        return list(_retention_rows(results))
    if isinstance(first.get("data"), list):
        return list(_series_rows(results))
    return [dict(item) for item in results]


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
        header = tuple(rows[0]) if rows else ()
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

"""Trends result rows as a table: the seeded ``(series, date, count)`` rows of an insight,
extended to any row count for big CSV/XLSX exports, generated lazily and cheaply."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date

from .hashing import MASK64, mix

#: Day 0 of :meth:`TrendTable.date` offsets.
DATE_ORIGIN = date(2000, 1, 1)


@functools.cache
def _date_strings() -> tuple[str, ...]:
    """Every day of 2000-2099 as ``YYYY-MM-DD``: table lookups keep huge CSV renders cheap."""
    first = DATE_ORIGIN.toordinal()
    last = date(2099, 12, 31).toordinal()
    return tuple(date.fromordinal(o).isoformat() for o in range(first, last + 1))


@functools.cache
def _count_cells() -> tuple[str, ...]:
    """4096 pseudo-random ``,NNN\\r\\n`` row endings; a row picks one by a Fibonacci hash."""
    return tuple(f",{100 + mix(0xC0FFEE, k) % 900}\r\n" for k in range(4096))


@dataclass(frozen=True)
class TrendTable:
    """Rows ``(series, date, count)`` of a trends result, defined for any row count.

    Row ``r`` is series ``r % S`` on day ``r // S``; the first ``S * points`` rows are exactly the
    insight's seeded result, and further rows continue the same pattern for big CSV exports.
    Counts always have three digits and dates ten characters, so a render's byte size has a
    closed form (needed for ``Content-Length`` on a streamed multi-hundred-MB CSV), and counts
    come from a precomputed table so generating millions of rows stays cheap. Series labels carry
    a URL breakdown, so rows are about 90 bytes, like real breakdown exports.
    """

    labels: tuple[str, ...]
    start_offset: int  # days since 2000-01-01 of the first point
    step_days: int
    key: int

    @functools.cached_property
    def _series(self) -> tuple[tuple[str, int], ...]:
        """Per series: the row start ``<label>,`` and the hash key of its counts."""
        return tuple((f"{label},", mix(self.key, s)) for s, label in enumerate(self.labels))

    def value(self, series: int, day: int) -> int:
        skey = self._series[series][1]
        return int(_count_cells()[((day * 0x9E3779B97F4A7C15 + skey) & MASK64) >> 52][1:4])

    def date(self, day: int) -> str:
        dates = _date_strings()
        return dates[(self.start_offset + day * self.step_days) % len(dates)]

    def rows_bytes(self, rows: int) -> int:
        """Byte size of ``rows`` CSV data rows (``<label>,YYYY-MM-DD,NNN\\r\\n`` each)."""
        width = len(self.labels)
        total = 0
        for s, (head, _) in enumerate(self._series):
            count = 0 if s >= rows else (rows - 1 - s) // width + 1
            total += count * (len(head) + 10 + 6)
        return total

    def csv_lines(self, start: int, stop: int) -> str:
        """CSV text of rows ``[start, stop)``; the hot loop of big exports."""
        width = len(self.labels)
        dates = _date_strings()
        n_dates = len(dates)
        cells = _count_cells()
        offset, step = self.start_offset, self.step_days
        first_day, last_day = start // width, (stop - 1) // width + 1
        lines = [
            f"{head}{day_text}{cells[((d * 0x9E3779B97F4A7C15 + skey) & MASK64) >> 52]}"
            for d in range(first_day, last_day)
            for day_text in (dates[(offset + d * step) % n_dates],)
            for head, skey in self._series
        ]
        cut = first_day * width
        return "".join(lines[start - cut : stop - cut])

    def iter_rows(self, rows: int) -> Iterable[tuple[str, str, int]]:
        width = len(self.labels)
        for r in range(rows):
            day, s = divmod(r, width)
            yield self.labels[s], self.date(day), self.value(s, day)

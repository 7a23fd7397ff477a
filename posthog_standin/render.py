"""Export content: real PNG/XLSX/GIF files, container-shaped video bytes and streamed CSV.

Bytes are a pure function of the export record and the seed, so repeated downloads are identical
(clients compare sha256). CSV is never held in memory: it is generated in chunks while it is sent,
and its size is known up front (fixed-width rows) so the response still has a Content-Length.
"""

from __future__ import annotations

import io
import re
import struct
import unicodedata
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from .exporter import RowsTable, exporter_rows
from .hashing import mix
from .seed import CSV_EXPORT_LIMIT, Insight, Seed
from .shapes import day_label
from .trends import TrendTable

PNG = "image/png"
PDF = "application/pdf"
CSV = "text/csv"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
WEBM = "video/webm"
MP4 = "video/mp4"
GIF = "image/gif"
JSON = "application/json"

#: The create serializer's choices (ExportFormatEnum) and each one's file extension.
EXTENSIONS: dict[str, str] = {
    PNG: "png",
    PDF: "pdf",
    CSV: "csv",
    XLSX: "xlsx",
    WEBM: "webm",
    MP4: "mp4",
    GIF: "gif",
    JSON: "json",
}
VIDEO_FORMATS = (WEBM, MP4, GIF)
TABULAR_FORMATS = (CSV, XLSX)

NO_DATA_CSV = "error\r\nNo data available or unable to format for export.\r\n"
NO_DATA_TEXT = "No data available or unable to format for export."
#: Rows per generated CSV chunk (about 0.3-1 MB of text).
CSV_CHUNK_ROWS = 20_000
#: A workbook is built in memory by openpyxl (about 5k rows a second), so big row counts are
#: capped; CSV has no cap.
XLSX_MAX_ROWS = 20_000

#: A legacy ``export_context.path`` naming one insight (either prefix, optional trailing slash,
#: optional query string).
_INSIGHT_PATH = re.compile(r"/api/(?:projects|environments)/([^/?]+)/insights/(\d+)/?(?:\?.*)?")
#: ``str(KeyError("path"))``: what PostHog's tabular exporter records when the export has
#: neither ``source`` nor ``path`` (``get_from_insights_api`` reads ``export_context["path"]``).
MISSING_PATH = "'path'"
DASHBOARD_TABULAR = (
    "Exporting a dashboard to CSV or Excel is not supported. Export its insights instead."
)
#: Events named in a HogQL select, e.g. ``event IN ('$pageview', 'signed_up')`` or ``event = 'x'``.
_HOGQL_EVENTS = re.compile(r"event\s*(?:=|IN\s*\()\s*((?:'[^']*'\s*,?\s*)+)", re.IGNORECASE)


def slugify(value: str) -> str:
    """Django's ``slugify``: ASCII, lower case, runs of spaces/dashes become one dash."""
    text = unicodedata.normalize("NFKD", str(value)).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text.lower())
    return re.sub(r"[-\s]+", "-", text).strip("-_")


def filename_for(
    export_format: str,
    created_at: datetime,
    export_context: Any,
    dashboard_name: str | None,
    insight: Insight | None,
) -> str:
    """``<base>-<YYYY-mm-dd-HHMMSS>.<ext>`` with PostHog's choice of base (``filename`` of
    ``ExportedAsset`` in ``products/exports/backend/models/exported_asset.py``)."""
    context_name = export_context.get("filename") if isinstance(export_context, dict) else None
    if context_name:
        base = slugify(context_name)
    elif dashboard_name is not None:
        base = f"export-{slugify(dashboard_name)}"
    elif insight is not None:
        base = f"export-{slugify(insight.name or insight.derived_name or 'insight')}"
    else:
        base = "export"
    return f"{base}-{created_at.strftime('%Y-%m-%d-%H%M%S')}.{EXTENSIONS[export_format]}"


# ---- which rows a tabular export has -------------------------------------------------------


@dataclass(frozen=True)
class CsvPlan:
    """The rows a CSV/XLSX export renders: a table cut to ``rows`` rows under ``header``."""

    table: TrendTable | RowsTable
    rows: int
    header: tuple[str, ...]

    @property
    def header_line(self) -> str:
        return ",".join(self.header) + "\r\n"

    @property
    def size(self) -> int:
        if self.rows == 0 or not self.header:
            return len(NO_DATA_CSV)
        return len(self.header_line) + self.table.rows_bytes(self.rows)

    def chunks(self) -> Iterator[bytes]:
        if self.rows == 0 or not self.header:
            yield NO_DATA_CSV.encode()
            return
        yield self.header_line.encode()
        for start in range(0, self.rows, CSV_CHUNK_ROWS):
            yield self.table.csv_lines(start, min(self.rows, start + CSV_CHUNK_ROWS)).encode()


def source_insight(seed: Seed, insight_id: int | None, export_context: Any) -> Insight | None:
    """The insight whose picture an image export shows: its ``insight`` or a ``path`` to one."""
    if insight_id is not None:
        return seed.insight_by_id(insight_id)
    path = export_context.get("path") if isinstance(export_context, dict) else None
    match = _INSIGHT_PATH.fullmatch(path) if isinstance(path, str) else None
    return seed.insight_by_id(int(match.group(2))) if match else None


def _insight_plan(insight: Insight, csv_rows: int | None) -> CsvPlan:
    """The insight's export table, cut at PostHog's export row limit (``csv_rows`` forces a
    row count, repeating the rows, for big-file tests)."""
    rows = min(insight.row_count, CSV_EXPORT_LIMIT) if csv_rows is None else csv_rows
    return CsvPlan(insight.export_table(), rows, insight.table_header)


def _clean(label: str) -> str:
    return re.sub(r"[,\"\r\n]", "_", label)


def _source_plan(seed: Seed, source: dict[str, Any], csv_rows: int | None) -> CsvPlan:
    """A generic table for a query node: PostHog's trends layout for a TrendsQuery (or an
    InsightVizNode around one), ``event,day,count`` rows for HogQL (a DataTableNode around one,
    too)."""
    node = source
    if node.get("kind") in ("InsightVizNode", "DataTableNode", "DataVisualizationNode"):
        inner = node.get("source")
        node = inner if isinstance(inner, dict) else {}
    events: tuple[str, ...] = ()
    if node.get("kind") == "HogQLQuery":
        match = _HOGQL_EVENTS.search(str(node.get("query") or ""))
        if match:
            events = tuple(re.findall(r"'([^']*)'", match.group(1)))
        labels = tuple(_clean(e) for e in events) or ("$pageview",)
        table = TrendTable(labels, start_offset=9000, step_days=1, key=mix(seed.seed, 77))
        rows = len(labels) * 8 if csv_rows is None else csv_rows
        return CsvPlan(table, rows, ("event", "day", "count"))
    series = node.get("series")
    events = tuple(
        str(s.get("event"))
        for s in (series if isinstance(series, list) else [])
        if isinstance(s, dict) and s.get("event")
    )
    labels = tuple(_clean(e) for e in events) or ("$pageview",)
    table = TrendTable(labels, start_offset=9000, step_days=1, key=mix(seed.seed, 77))
    days = [table.date(d) for d in range(8)]
    result = [
        {
            "label": label,
            "data": [table.value(s, d) for d in range(8)],
            "labels": [day_label(date.fromisoformat(day)) for day in days],
            "days": days,
        }
        for s, label in enumerate(labels)
    ]
    rows_table = RowsTable.from_rows(exporter_rows(result))
    rows = len(rows_table.rows) if csv_rows is None else csv_rows
    return CsvPlan(rows_table, rows, rows_table.header)


def csv_plan(
    seed: Seed,
    project_id: int,
    insight_id: int | None,
    dashboard_id: int | None,
    export_context: Any,
    csv_rows: int | None,
) -> CsvPlan | str:
    """The rows of a CSV/XLSX export, or the ``exception`` text it ends with.

    Follows ``_export_to_dict`` in PostHog's ``products/exports/backend/tasks/csv_exporter.py``:
    a ``source`` query is run (here: the linked insight's table if there is one, else a generic
    table for the node); without one, ``get_from_insights_api`` reads ``export_context["path"]``,
    so an export that has neither fails with the ``KeyError`` text ``'path'``, even when it names
    an insight.
    """
    if dashboard_id is not None and insight_id is None:
        return DASHBOARD_TABULAR
    context = export_context if isinstance(export_context, dict) else {}
    source = context.get("source")
    if source:
        insight = seed.insight_by_id(insight_id) if insight_id is not None else None
        if insight is not None:
            return _insight_plan(insight, csv_rows)
        if not isinstance(source, dict):
            return f"Invalid query source: expected an object, got {type(source).__name__}"
        return _source_plan(seed, source, csv_rows)
    if "path" not in context:
        return MISSING_PATH
    path = context["path"]
    match = _INSIGHT_PATH.fullmatch(path) if isinstance(path, str) else None
    insight = seed.insight_by_id(int(match.group(2))) if match else None
    if (
        match is None
        or insight is None
        or insight.project.id != project_id
        or match.group(1) not in (str(project_id), "@current")
    ):
        return f"404 Client Error: Not Found for url: {path}"
    return _insight_plan(insight, csv_rows)


async def stream_bytes(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Async wrapper: each chunk is generated between sends, so memory stays flat."""
    for chunk in chunks:
        yield chunk


# ---- binary formats ------------------------------------------------------------------------


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_image(values: Sequence[float], key: int, width: int = 320, height: int = 200) -> bytes:
    """A real RGB PNG: a coloured title band and one bar per value (a tiny chart)."""
    background = bytes((248, 248, 250))
    band = bytes(((key >> 16) & 0x7F | 0x40, (key >> 8) & 0x7F | 0x40, key & 0x7F | 0x80))
    bar = bytes(((key >> 40) & 0x7F, (key >> 32) & 0x7F | 0x40, (key >> 24) & 0x7F | 0x80))
    values = values or [0]
    top, bottom, left, right = 36, height - 12, 12, width - 12
    slot = (right - left) / len(values)
    peak = max(values) or 1
    bars = []
    for k, v in enumerate(values):
        x0 = int(left + k * slot + slot * 0.15)
        x1 = max(x0 + 1, int(left + (k + 1) * slot - slot * 0.15))
        bars.append((x0, x1, bottom - int((bottom - top) * v / peak)))
    raw = bytearray()
    for y in range(height):
        row = bytearray((band if y < 24 else background) * width)
        for x0, x1, y_top in bars:
            if y_top <= y < bottom:
                row[x0 * 3 : x1 * 3] = bar * (x1 - x0)
        raw += b"\x00" + row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(bytes(raw), 6))
        + _png_chunk(b"IEND", b"")
    )


def gif_image(label: str) -> bytes:
    """A valid 1×1 GIF89a carrying ``label`` in a comment block (deterministic per export)."""
    comment = label.encode("ascii", "replace")[:255]
    return (
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
        + b"!\xfe"
        + bytes((len(comment),))
        + comment
        + b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )


def video_bytes(export_format: str, key: int, size: int = 64 * 1024) -> bytes:
    """Container-shaped bytes (right magic numbers, deterministic payload); not playable video."""
    payload = bytearray()
    x = key
    while len(payload) < size:
        x = mix(x, len(payload))
        payload += x.to_bytes(8, "little")
    if export_format == MP4:
        ftyp = struct.pack(">I", 24) + b"ftypmp42" + b"\x00\x00\x00\x00" + b"mp42isom"
        return ftyp + struct.pack(">I", 8 + len(payload)) + b"mdat" + bytes(payload)
    return b"\x1a\x45\xdf\xa3" + bytes(payload)  # EBML magic of Matroska/WebM


def xlsx_workbook(plan: CsvPlan) -> bytes:
    """A real workbook via openpyxl (write-only mode), capped at :data:`XLSX_MAX_ROWS` rows."""
    from openpyxl import Workbook  # imported lazily: only XLSX exports need it

    workbook = Workbook(write_only=True)
    sheet = workbook.create_sheet("Sheet1")
    if plan.rows == 0:
        sheet.append(["error"])
        sheet.append([NO_DATA_TEXT])
    else:
        sheet.append(list(plan.header))
        for row in plan.table.iter_rows(min(plan.rows, XLSX_MAX_ROWS)):
            sheet.append(list(row))
    fixed = datetime(2026, 1, 1)
    workbook.properties.created = fixed
    workbook.properties.modified = fixed
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()

"""What a person sees of an export in the Dagster UI: a PNG inline, the head of a CSV/XLSX as a
table, row and column counts. Read from the head of the file only, never the whole thing."""

from __future__ import annotations

import base64
import contextlib
import csv
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

#: Embed a PNG in the UI only below this size (base64 grows it by a third; event rows stay small).
PNG_PREVIEW_MAX_BYTES = 150_000
PREVIEW_ROWS = 10
PREVIEW_MAX_COLUMNS = 20
PREVIEW_MAX_CELL = 60
#: Up to this size CSV rows are counted exactly with the csv module; above it, by line count.
CSV_EXACT_COUNT_MAX_BYTES = 64 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PostHog's tabular exports stop at ``CSV_EXPORT_LIMIT`` rows without saying so
#: (``posthog/hogql/constants.py``: 50,000 in the version read, 300,000 in earlier ones): a file
#: with exactly that many rows may be cut short.
POSTHOG_EXPORT_ROW_LIMITS = (50_000, 300_000)


def file_preview_metadata(path: Path, export_format: str) -> dict[str, Any]:
    """Format-specific facts read from the head of the file only (never the whole thing)."""
    try:
        if export_format == "image/png":
            return _png_preview(path)
        if export_format == "text/csv":
            meta = _csv_preview(path)
        elif export_format.endswith("spreadsheetml.sheet"):
            meta = _xlsx_preview(path)
        else:
            return {}
    except Exception as exc:  # a preview must never fail the export itself
        return {"preview": dg.MetadataValue.text(f"No preview: {exc}")}
    rows = meta["dagster/row_count"].value
    meta["at_posthog_row_limit"] = dg.MetadataValue.bool(rows in POSTHOG_EXPORT_ROW_LIMITS)
    return meta


def png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the IHDR chunk, or None if this is not a PNG."""
    with path.open("rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _png_preview(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    dims = png_size(path)
    meta: dict[str, Any] = {}
    if dims:
        meta["image_width"] = dg.MetadataValue.int(dims[0])
        meta["image_height"] = dg.MetadataValue.int(dims[1])
    if size <= PNG_PREVIEW_MAX_BYTES and dims:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        meta["preview"] = dg.MetadataValue.md(f"![export preview](data:image/png;base64,{data})")
    else:
        meta["preview"] = dg.MetadataValue.md(
            f"_Preview not embedded: the image is {size / 1e6:.1f} MB (limit "
            f"{PNG_PREVIEW_MAX_BYTES // 1000} kB); open the file at `path`._"
        )
    return meta


def _csv_preview(path: Path) -> dict[str, Any]:
    head = pd.read_csv(path, nrows=PREVIEW_ROWS, dtype=str, keep_default_na=False)
    rows, method = count_csv_rows(path)
    return {
        "dagster/row_count": dg.MetadataValue.int(rows),
        "row_count_method": dg.MetadataValue.text(method),
        "columns": dg.MetadataValue.int(len(head.columns)),
        "preview": preview_table([str(c) for c in head.columns], head.values.tolist()),
    }


def count_csv_rows(path: Path) -> tuple[int, str]:
    """Data rows (header excluded), streaming: exact for small files, line count for big ones."""
    if path.stat().st_size <= CSV_EXACT_COUNT_MAX_BYTES:
        with path.open(newline="", encoding="utf-8", errors="replace") as fh:
            total = sum(1 for _ in csv.reader(fh))
        return max(0, total - 1), "exact"
    lines = 0
    last = b"\n"
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":
        lines += 1
    return max(0, lines - 1), "lines (approximate if cells contain line breaks)"


def _xlsx_preview(path: Path) -> dict[str, Any]:
    import openpyxl

    with contextlib.closing(openpyxl.load_workbook(path, read_only=True, data_only=True)) as wb:
        ws = wb.active
        if ws is None:
            return {}
        max_row, max_col = ws.max_row, ws.max_column
        rows = [list(r) for r in ws.iter_rows(max_row=PREVIEW_ROWS + 1, values_only=True)]
        if max_row is None or max_col is None:  # no <dimension>: count by streaming
            max_row = sum(1 for _ in ws.iter_rows(values_only=True))
            max_col = max((len(r) for r in rows), default=0)
    header = [str(c) if c is not None else "" for c in (rows[0] if rows else [])]
    return {
        "dagster/row_count": dg.MetadataValue.int(max(0, int(max_row) - 1)),
        "columns": dg.MetadataValue.int(int(max_col)),
        "sheets": dg.MetadataValue.int(len(wb.sheetnames)),
        "preview": preview_table(header, rows[1:]),
    }


def preview_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> dg.MetadataValue:
    """The head of a table as Dagster's table metadata: cells are shown as plain text.

    Not Markdown: cells are insight results, and breakdown or property values come from anyone
    who sends events with the project's public token, so a cell like ``![x](https://...)`` or
    ``[Re-auth](https://...)`` would load a remote image (a beacon with the viewer's address)
    or show a native-looking link. Columns and cell width are capped.
    """
    names: list[str] = []
    for k, raw in enumerate(list(header)[:PREVIEW_MAX_COLUMNS]):
        name = _cell(raw) or f"column_{k}"
        while name in names:
            name = f"{name}_"
        names.append(name)
    records = [
        dg.TableRecord({n: _cell(row[k] if k < len(row) else None) for k, n in enumerate(names)})
        for row in list(rows)[:PREVIEW_ROWS]
    ]
    schema = dg.TableSchema(columns=[dg.TableColumn(name=n, type="string") for n in names])
    return dg.MetadataValue.table(records=records, schema=schema)


def _cell(value: Any) -> str:
    text = "" if value is None else str(value).replace("\r", " ").replace("\n", " ")
    return text if len(text) <= PREVIEW_MAX_CELL else text[: PREVIEW_MAX_CELL - 1] + "…"

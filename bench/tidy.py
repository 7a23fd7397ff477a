"""Benchmark: flattening insight results into tidy rows, three ways, per page as the snapshot does.

    python bench/tidy.py            # 10,000 trends insights, 3 series x 30 days each
    python bench/tidy.py --quick    # 1,000

The snapshot flattens each page of 100 insights as it arrives (memory stays flat with the number
of insights), so each way is timed on pages of 100 and the per-insight cost reported:

- ``python``: :func:`posthog_assets.snapshots.results.flatten_insight` (what the package uses);
- ``pandas``: ``json_normalize`` of the series, then ``explode`` of data/days/labels;
- ``duckdb``: the page as NDJSON read by DuckDB, ``unnest`` of the result array and of the points
  in SQL, page by page;
- ``duckdb_once``: the same SQL once over every page's NDJSON file, already on disk (what the
  write step could do from the staged insights instead; writing the files is not timed).

Every way must produce the same number of rows; the figures are printed as ``name=value``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAGE = 100
SERIES = 3
DAYS = 30


def make_insight(i: int) -> dict[str, Any]:
    """A TrendsQuery insight with a breakdown, shaped as PostHog serves it."""
    start = date(2026, 1, 1)
    days = [(start + timedelta(days=d)).isoformat() for d in range(DAYS)]
    labels = [f"{d.day}-{d.strftime('%b-%Y')}" for d in map(date.fromisoformat, days)]
    result = []
    for s in range(SERIES):
        data = [(i * 7 + s * 3 + d) % 50 for d in range(DAYS)]
        result.append(
            {
                "action": {"id": "$pageview", "type": "events", "order": s, "name": "$pageview"},
                "label": f"$pageview - browser {s}",
                "breakdown_value": f"browser {s}",
                "count": float(sum(data)),
                "data": data,
                "days": days,
                "labels": labels,
            }
        )
    return {
        "id": i + 1,
        "query": {"kind": "InsightVizNode", "source": {"kind": "TrendsQuery", "series": []}},
        "result": result,
    }


def with_python(page: list[dict[str, Any]]) -> int:
    from posthog_assets.snapshots.results import SERIES as TABLE
    from posthog_assets.snapshots.results import flatten_insight

    return sum(len(flatten_insight(i).rows.get(TABLE, [])) for i in page)


def with_pandas(page: list[dict[str, Any]]) -> int:
    import pandas as pd

    records = [
        {"insight_id": i["id"], "series_index": s, **series}
        for i in page
        for s, series in enumerate(i["result"])
    ]
    frame = pd.json_normalize(records)[
        ["insight_id", "series_index", "label", "breakdown_value", "data", "days", "labels"]
    ]
    frame = frame.explode(["data", "days", "labels"], ignore_index=True)
    frame["day"] = pd.to_datetime(frame["days"]).dt.date
    frame["value"] = frame["data"].astype(float)
    rows = frame.to_dict("records")  # what staging writes: one dict per row
    return len(rows)


def write_page(page: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("\n".join(json.dumps({"id": i["id"], "result": i["result"]}) for i in page))
    return path


def with_duckdb(page: list[dict[str, Any]], folder: Path) -> int:
    return unnest_in_duckdb([write_page(page, folder / "page.ndjson")])


def unnest_in_duckdb(paths: list[Path]) -> int:
    import duckdb

    with duckdb.connect() as conn:
        rows = conn.execute(
            """
            WITH s AS (
                SELECT id, unnest(range(len(result::JSON[])::BIGINT)) AS si,
                       unnest(result::JSON[]) AS series
                FROM read_json($p, columns = {id: 'BIGINT', result: 'JSON'})
            )
            SELECT id, si, series->>'label', series->>'breakdown_value',
                   unnest(range(json_array_length(series->'data')::BIGINT)) AS pi,
                   unnest(json_extract(series, '$.data[*]'))::DOUBLE AS value,
                   unnest(json_extract_string(series, '$.days[*]'))::DATE AS day,
                   unnest(json_extract_string(series, '$.labels[*]')) AS x
            FROM s
            """,
            {"p": [str(p) for p in paths]},
        ).fetchall()
    return len(rows)


def timed(fn: Any, pages: list[list[dict[str, Any]]]) -> tuple[float, int]:
    started = time.perf_counter()
    rows = sum(fn(page) for page in pages)
    return time.perf_counter() - started, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 1_000 if args.quick else 10_000
    insights = [make_insight(i) for i in range(n)]
    pages = [insights[k : k + PAGE] for k in range(0, n, PAGE)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ways = {
            "python": with_python,
            "pandas": with_pandas,
            "duckdb": lambda page: with_duckdb(page, folder),
        }
        for fn in ways.values():  # warm-up: imports, first connection
            fn(pages[0])
        results = {name: timed(fn, pages) for name, fn in ways.items()}
        files = [
            write_page(page, folder / f"staged-{k:05d}.ndjson") for k, page in enumerate(pages)
        ]
        started = time.perf_counter()
        rows = unnest_in_duckdb(files)
        results["duckdb_once"] = (time.perf_counter() - started, rows)
    counts = {rows for _, rows in results.values()}
    assert counts == {n * SERIES * DAYS}, f"the ways disagree on the row count: {results}"
    print(f"Flattening {n:,} trends insights ({SERIES} series x {DAYS} points) in pages of {PAGE}")
    for name, (seconds, rows) in results.items():
        print(
            f"tidy_{name}_us_per_insight={seconds / n * 1e6:.0f}  ({rows:,} rows, {seconds:.2f} s)"
        )
    python_s = results["python"][0]
    print(f"tidy_pandas_vs_python={results['pandas'][0] / python_s:.2f}")
    print(f"tidy_duckdb_vs_python={results['duckdb'][0] / python_s:.2f}")
    print(f"tidy_duckdb_once_vs_python={results['duckdb_once'][0] / python_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

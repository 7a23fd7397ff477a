"""Benchmark of the export assets against a local stand-in (no network beyond 127.0.0.1).

1. Concurrency: wall time of a run materializing 20 exports that each take 3 s to render, versus
   a run with 1 such export (goal: ratio < 2).
2. Big download: peak RSS above the process baseline while the client streams a ~500 MB CSV export
   to disk (goal: < 100 MB), and its throughput relative to a plain ``requests`` stream of the
   same URL written to disk the same way (goal: >= 0.8).

Run from the repository root: ``python bench/exports.py``. Besides a table it prints the lines
``concurrent_exports_ratio=…``, ``download_rss_mb=…`` and ``download_throughput_ratio=…``.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import dagster as dg
import psutil
import requests

from posthog_assets.api.client import PostHogClient
from posthog_assets.config import ExportConfig, PostHogProject
from posthog_assets.exports.assets import build_posthog_export_assets
from posthog_assets.exports.runner import tabular_context
from posthog_assets.resources import PostHogResource
from posthog_standin.server import StandinProcess

MB = 1024 * 1024
CHUNK = 1 << 20


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _project(resource: PostHogResource, n: int) -> PostHogProject:
    exports = tuple(
        ExportConfig(name=f"chart_{i:02d}", insight=1 + i, format="image/png") for i in range(n)
    )
    return PostHogProject(resource=resource, exports=exports)  # "default": resource key "posthog"


def run_exports(standin: StandinProcess, n: int, export_dir: Path) -> float:
    """Wall seconds of one ``dg.materialize`` of ``n`` export assets (default poll settings)."""
    resource = PostHogResource(
        host=standin.url,
        project_id=str(standin.project_id),
        personal_api_key=standin.key,
        export_dir=str(export_dir),
    )
    assets = build_posthog_export_assets(project=_project(resource, n), retry_policy=None)
    started = time.monotonic()
    result = dg.materialize(assets, resources={"posthog": resource})
    wall = time.monotonic() - started
    if not result.success or len(result.get_asset_materialization_events()) != n:
        raise SystemExit(f"the {n}-export run failed")
    return wall


class PeakRss:
    """Samples this process's RSS in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.proc = psutil.Process()
        self.interval_s = interval_s
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def plain_download(url: str, key: str, dest: Path) -> int:
    """The baseline: ``requests`` streaming the same URL to a file, nothing else."""
    written = 0
    with (
        requests.get(
            url, headers={"Authorization": f"Bearer {key}"}, stream=True, timeout=(10, 60)
        ) as resp,
        dest.open("wb") as out,
    ):
        resp.raise_for_status()
        for chunk in resp.iter_content(chunk_size=CHUNK):
            out.write(chunk)
            written += len(chunk)
    return written


def big_csv_export(standin: StandinProcess, client: PostHogClient, target_mb: int) -> int:
    """Create a CSV export of about ``target_mb`` MB; return its id."""
    ctl = standin.control
    ctl.configure(csv_rows=10_000)
    source = tabular_context(client.get_insight(2, basic=True), client.project_id)
    probe = client.create_export("text/csv", insight=2, export_context=source)
    head = requests.head(
        client.url(f"exports/{probe['id']}/content/"),
        headers={"Authorization": f"Bearer {standin.key}"},
        timeout=30,
    )
    size = int(head.headers.get("Content-Length") or 0)
    if not size:  # HEAD not supported: fetch the small probe once
        size = len(
            requests.get(
                head.url, headers={"Authorization": f"Bearer {standin.key}"}, timeout=30
            ).content
        )
    rows = int(10_000 * target_mb * MB / max(size, 1))
    ctl.configure(csv_rows=rows)
    export = client.create_export("text/csv", insight=2, export_context=source)
    ctl.configure(csv_rows=None)
    return int(export["id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render-s", type=float, default=3.0)
    parser.add_argument("--exports", type=int, default=20)
    parser.add_argument("--csv-mb", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for the downloads")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="posthog-bench-"))
    os.environ.setdefault("DAGSTER_HOME", str(tmp / "dagster_home"))
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    standin = StandinProcess(insights=max(30, args.exports + 2)).start()
    try:
        ctl = standin.control
        ctl.reset()
        ctl.configure(export_delay_s=args.render_s)  # PostHog holds each POST until rendered
        run_exports(standin, 1, tmp / "warmup")  # imports, first-run costs
        wall_1 = run_exports(standin, 1, tmp / "one")
        progress(f"1 export: {wall_1:.2f}s")
        wall_n = run_exports(standin, args.exports, tmp / "many")
        progress(f"{args.exports} exports: {wall_n:.2f}s")
        ratio = wall_n / wall_1
        ctl.configure(export_delay_s=0)

        client = PostHogClient(standin.url, standin.project_id, standin.key)
        export_id = big_csv_export(standin, client, args.csv_mb)
        progress(f"created CSV export {export_id} of about {args.csv_mb} MB")
        url = client.url(f"exports/{export_id}/content/")
        ours_s, plain_s, rss_over = [], [], []
        size = 0
        for _ in range(args.repeats):
            dest = tmp / "plain.csv"
            t0 = time.monotonic()
            size = plain_download(url, standin.key, dest)
            plain_s.append(time.monotonic() - t0)
            progress(f"plain download of {size / MB:.0f} MB: {plain_s[-1]:.2f}s")
            dest.unlink()

            gc.collect()
            baseline = psutil.Process().memory_info().rss
            dest = tmp / "ours.csv"
            with PeakRss() as sampler:
                t0 = time.monotonic()
                result = client.download_export_content(export_id, dest)
                ours_s.append(time.monotonic() - t0)
            rss_over.append((sampler.peak - baseline) / MB)
            progress(f"our download: {ours_s[-1]:.2f}s, peak RSS +{rss_over[-1]:.1f} MB")
            if result.bytes != size:
                raise SystemExit(f"downloaded {result.bytes} bytes, expected {size}")
            dest.unlink()
        client.close()
    finally:
        standin.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    ours_best, plain_best = min(ours_s), min(plain_s)
    throughput_ratio = plain_best / ours_best
    rss_mb = max(rss_over)
    rows = [
        (f"1 export, {args.render_s:.0f} s render", f"{wall_1:.2f} s", ""),
        (
            f"{args.exports} exports, {args.render_s:.0f} s render each",
            f"{wall_n:.2f} s",
            f"ratio {ratio:.2f} (goal < 2)",
        ),
        (
            f"CSV download, ours ({size / MB:.0f} MB)",
            f"{ours_best:.2f} s",
            f"{size / MB / ours_best:.0f} MB/s",
        ),
        (
            "CSV download, plain requests",
            f"{plain_best:.2f} s",
            f"{size / MB / plain_best:.0f} MB/s",
        ),
        ("throughput ours / plain", f"{throughput_ratio:.2f}", "goal >= 0.8"),
        ("peak RSS over baseline", f"{rss_mb:.1f} MB", "goal < 100 MB"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'value':>10}  note")
    print("-" * (width + 30))
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    print(f"concurrent_exports_ratio={ratio:.3f}")
    print(f"download_rss_mb={rss_mb:.1f}")
    print(f"download_throughput_ratio={throughput_ratio:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

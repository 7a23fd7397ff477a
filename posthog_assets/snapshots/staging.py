"""Staged rows: what a snapshot's fetch step hands to its write step, on disk.

The fetch step appends each page's rows to newline-delimited JSON files as the page arrives, so
memory stays flat however many rows there are; only the small :class:`StagedSnapshot` (file names,
counts, scope) passes between the steps. Staging lives next to the DuckDB file, one folder per run
and asset; what finished runs leave behind is removed by the next fetch. The rows are customer
data: folders are made 0700 and never followed as symlinks, files are 0600.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import dagster as dg

from posthog_assets.api.private_files import UnsafePath, make_dir, open_private

#: Folder (next to the DuckDB file) that holds staging files between the fetch and write steps.
STAGING_DIRNAME = ".posthog_staging"
#: Written into an asset's staging folder once its fetch step has finished.
STAGED_MARKER = ".fetched"
#: A failed run's finished fetches stay this long, so "re-execute from failure" can still write
#: them; an unfinished fetch of a finished run is removed at once (no step will read it).
FAILED_STAGING_KEEP_S = 7 * 24 * 3600.0
#: A staging file is closed and a new one started past this size. DuckDB reads a list of small
#: NDJSON files with less memory than one big file, so the write step's peak stays flat.
STAGING_ROTATE_BYTES = 4 << 20


class StagedRows:
    """Appends rows as NDJSON to ``<stem>-NNNNN.ndjson`` files as pages arrive; thread-safe.
    Only the table's staged columns are written, so a payload's extra keys never reach DuckDB.
    """

    def __init__(
        self, stem: Path, columns: Iterable[str], *, rotate_bytes: int = STAGING_ROTATE_BYTES
    ) -> None:
        self.stem = Path(stem)
        make_dir(self.stem.parent)
        self._columns = tuple(columns)
        self._rotate_bytes = rotate_bytes
        self._lock = threading.Lock()
        self.files: list[str] = []
        self._fh: IO[str] | None = None
        self._size = 0
        self.rows = 0
        self._closed = False

    def _next_file(self) -> IO[str]:
        if self._fh is not None:
            self._fh.close()
        path = self.stem.with_name(f"{self.stem.name}-{len(self.files):05d}.ndjson")
        self.files.append(str(path))
        self._size = 0
        fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self._fh = os.fdopen(fd, "w", encoding="utf-8", buffering=1 << 20)
        return self._fh

    def write(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Serialise ``rows`` (outside the lock) and append them; return how many were written."""
        cols = self._columns
        return self._append(
            [
                json.dumps({c: row.get(c) for c in cols}, separators=(",", ":"), default=str)
                for row in rows
            ]
        )

    def write_lists(self, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """Rows as lists in the order of ``columns`` (a query's answer, as it came): one dict
        per row, not two. ``columns`` must be the staged columns."""
        if sorted(columns) != sorted(self._columns):
            raise ValueError(f"{self.stem.name}: columns {list(columns)} are not the staged ones")
        names = list(columns)
        return self._append(
            [
                json.dumps(dict(zip(names, row, strict=True)), separators=(",", ":"), default=str)
                for row in rows
            ]  # fmt: skip
        )

    def _append(self, lines: list[str]) -> int:
        if not lines:
            return 0
        text = "\n".join(lines) + "\n"
        with self._lock:
            if self._closed:
                raise RuntimeError(f"staging {self.stem.name} is already closed")
            fh = self._fh
            if fh is None or self._size >= self._rotate_bytes:
                fh = self._next_file()
            fh.write(text)
            self._size += len(text)
            self.rows += len(lines)
        return len(lines)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> StagedRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class StagedPart:
    """The staged rows of one companion table."""

    files: list[str]
    rows: int


@dataclass
class StagedSnapshot:
    """What a fetch step hands to its write step: small, picklable, no row data."""

    files: list[str]
    rows: int
    scope: dict[str, Any]
    snapshot_at: str
    stats: dict[str, Any] = field(default_factory=dict)
    #: Companion tables' staged rows, by table name (written in the same transaction).
    companions: dict[str, StagedPart] = field(default_factory=dict)

    @property
    def all_files(self) -> list[str]:
        return [*self.files, *(f for part in self.companions.values() for f in part.files)]


def staging_root(database: str | Path) -> Path:
    """Staging lives next to the DuckDB file, on the same disk as the data it becomes; a
    symlink in its place is refused (the package made no such thing)."""
    if str(database) in (":memory:", ""):
        raise ValueError("snapshot assets need a DuckDB file path, not ':memory:'")
    root = Path(database).resolve().parent / STAGING_DIRNAME
    if root.is_symlink():
        raise UnsafePath(root, "is a symlink")
    return root


def staging_dir(database: str | Path, run_id: str, name: str) -> Path:
    """A fresh per-run, per-asset folder, 0700 (a retried fetch starts from an empty one). Every
    level is checked before use, so neither the removal of a retried fetch's folder nor the new
    files can be pointed elsewhere by a symlink."""
    run_folder = make_dir(make_dir(staging_root(database)) / run_id)
    folder = run_folder / name
    if os.path.lexists(folder):
        shutil.rmtree(make_dir(folder))
    return make_dir(folder)


def remove_staging(files: Sequence[str | Path]) -> None:
    """Delete staged files and their (then empty) folders once their rows are committed."""
    folders = set()
    for f in files:
        p = Path(f)
        p.unlink(missing_ok=True)
        folders.add(p.parent)
    for folder in folders:
        (folder / STAGED_MARKER).unlink(missing_ok=True)
        for candidate in (folder, folder.parent):
            with suppress(OSError):
                candidate.rmdir()


def remove_stale_staging(
    database: str | Path, instance: dg.DagsterInstance, *, now: float | None = None
) -> list[Path]:
    """Delete what finished runs left in staging: a killed or failed fetch's partial files at
    once, a failed run's finished fetch after ``FAILED_STAGING_KEEP_S``. Runs still going, or
    unknown to this instance (another Dagster home may share the folder), are left alone.
    """
    root = staging_root(database)
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    removed: list[Path] = []
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        run = instance.get_run_by_id(run_dir.name)
        if run is None or not run.is_finished:
            continue
        for folder in [p for p in run_dir.iterdir() if p.is_dir() and not p.is_symlink()]:
            marker = folder / STAGED_MARKER
            fetched = marker.exists()
            if (
                fetched
                and run.status != dg.DagsterRunStatus.SUCCESS
                and now - marker.stat().st_mtime < FAILED_STAGING_KEEP_S
            ):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        with suppress(OSError):
            run_dir.rmdir()
    return removed

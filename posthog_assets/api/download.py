"""Streamed, atomic downloads: the bytes go to a temporary ``.part`` file next to the
destination, are hashed on the way, and the file is renamed into place only when complete.

Reading the socket and writing/hashing the file run on two threads joined by a small bounded
queue, so the download keeps pace with a plain ``requests`` stream (hashing and disk writes
release the GIL) while memory stays flat (at most a few chunks in flight).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import requests

from posthog_assets.api.errors import PostHogDownloadError
from posthog_assets.api.private_files import is_local_disk_error

DOWNLOAD_CHUNK_BYTES = 1 << 20
#: Chunks read ahead of the writer at most (memory bound: this many chunks).
DOWNLOAD_QUEUE_CHUNKS = 8
#: Held while a temp file is created and locked, and while stale ones are removed, so a cleaner in
#: this process never sees a brand-new ``.part`` before its writer has locked it.
_PART_LOCK = threading.Lock()


@dataclass(frozen=True)
class DownloadResult:
    """What a streamed download wrote."""

    path: Path
    bytes: int
    sha256: str
    redirected: bool


class _Writer(threading.Thread):
    """Writes and hashes the chunks the reading thread queues; ``None`` ends the file."""

    def __init__(self, out: object, chunks: queue.Queue[bytes | None]) -> None:
        super().__init__(name="posthog-download-writer", daemon=True)
        self.out = out
        self.chunks = chunks
        self.digest = hashlib.sha256()
        self.error: BaseException | None = None

    def run(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            if self.error is not None:
                continue  # keep draining so the reader never blocks on a full queue
            try:
                self.out.write(chunk)  # type: ignore[attr-defined]
                self.digest.update(chunk)
            except BaseException as exc:  # reported to the reading thread
                self.error = exc


def stream_to_file(
    resp: requests.Response,
    dest: Path,
    *,
    chunk_bytes: int = DOWNLOAD_CHUNK_BYTES,
    redirected: bool = False,
) -> DownloadResult:
    """Stream ``resp``'s body to ``dest`` atomically; a short or broken body is an error."""
    # With a Content-Encoding, Content-Length counts the encoded bytes, not what we write.
    expected = None if resp.headers.get("Content-Encoding") else resp.headers.get("Content-Length")
    written = 0
    with _PART_LOCK:
        fd, tmp_name = tempfile.mkstemp(
            dir=dest.parent, prefix=f".{dest.name}.{os.getpid()}.", suffix=".part"
        )
        # Held until the file is closed (or the process dies): this .part is being written.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=DOWNLOAD_QUEUE_CHUNKS)
            writer = _Writer(out, chunks)
            writer.start()
            try:
                for chunk in resp.iter_content(chunk_size=chunk_bytes):
                    if writer.error is not None:
                        break
                    chunks.put(chunk)
                    written += len(chunk)
            except (requests.exceptions.RequestException, OSError) as exc:
                raise PostHogDownloadError(
                    f"download of {dest.name} broke off after {written} bytes "
                    f"({type(exc).__name__})"
                ) from None
            finally:
                chunks.put(None)
                writer.join()
            if writer.error is not None and is_local_disk_error(writer.error):
                raise writer.error  # the disk, not the download: a retry would fail the same way
            if writer.error is not None:
                raise PostHogDownloadError(
                    f"writing {dest.name} failed after {written} bytes "
                    f"({type(writer.error).__name__}: {writer.error})"
                ) from None
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and int(expected) != written:
            raise PostHogDownloadError(
                f"download of {dest.name} ended at {written} of {expected} bytes"
            )
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return DownloadResult(
        path=dest, bytes=written, sha256=writer.digest.hexdigest(), redirected=redirected
    )


def remove_stale_parts(folder: Path) -> list[Path]:
    """Delete the ``.part`` files of downloads whose process died (SIGKILL, OOM, power loss).

    A live download holds an exclusive ``flock`` on its ``.part`` (the kernel drops it when the
    process dies), so a file we can lock has no writer left, unless another live process (pid in
    the name) has just created it and not locked it yet: that one waits for the next download.
    """
    removed: list[Path] = []
    with _PART_LOCK:
        for part in folder.glob(".*.part"):
            try:
                # a planted symlink or FIFO is neither followed nor waited on
                fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # a download in progress
            try:
                pid = _part_writer_pid(part.name)
                if pid is None or pid == os.getpid() or not _process_alive(pid):
                    part.unlink(missing_ok=True)
                    removed.append(part)
            finally:
                os.close(fd)
    return removed


def _part_writer_pid(name: str) -> int | None:
    """The writer's pid from ``.<file>.<pid>.<random>.part`` (None for other names)."""
    pieces = name.removesuffix(".part").rsplit(".", 2)
    return int(pieces[1]) if len(pieces) == 3 and pieces[1].isdigit() else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

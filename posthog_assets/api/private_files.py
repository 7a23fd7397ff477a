"""Local files only their owner can touch, and local disk errors a retry cannot cure.

Why: other local users may reach the package's state places first (a shared temp dir, a folder
they created, a planted symlink) and redirect our writes onto the user's own files (``~/.bashrc``
through a symlinked state file), feed us endless input (``/dev/zero``) or plant state that blocks
runs. So state folders must be this user's own, writable by nobody else; files are opened
without following symlinks, checked on the open descriptor, and read capped.

No Dagster here: the HTTP layer uses it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

#: Largest state or marker file read back; a bigger one is treated as corrupt.
MAX_READ_BYTES = 1 << 20
#: Errors of the local disk or its permissions: the same write fails again on a retry.
LOCAL_DISK_ERRNOS = frozenset(
    {
        errno.ENOTDIR,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENAMETOOLONG,
    }
)

_umask_lock = threading.Lock()
_umask_users = 0
_saved_umask = 0


class UnsafePath(OSError):
    """A path another local user could have planted or could change; the message names it."""

    def __init__(self, path: str | os.PathLike[str], why: str) -> None:
        super().__init__(f"refusing {path}: it {why}")
        self.path = Path(path)
        self.why = why

    def __reduce__(self) -> tuple[type[UnsafePath], tuple[Path, str]]:
        return type(self), (self.path, self.why)  # survives pickling (another process)


class FileTooLarge(ValueError):
    """A file holds more than the caller will read: treat it as corrupt."""


def is_local_disk_error(exc: BaseException) -> bool:
    """A full, read-only or refused disk, or a path that is not what it must be: fail at once."""
    return isinstance(exc, UnsafePath) or (
        isinstance(exc, OSError) and exc.errno in LOCAL_DISK_ERRNOS
    )


def disk_error_message(setting: str, path: str | os.PathLike[str], exc: OSError) -> str:
    """``<setting>: cannot write <path>: <why>``, so the user knows which setting to fix."""
    why = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
    return f"{setting}: cannot write {path}: {why}"


def make_dir(path: str | os.PathLike[str]) -> Path:
    """A folder the package makes: missing ones (parents too) are created 0700; a symlink or a
    non-folder in its place is refused, so nothing we write lands where someone else pointed."""
    path = Path(path)
    _create_missing(path)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePath(path, "is a symlink")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(path, "is not a directory")
    return path


def private_dir(path: str | os.PathLike[str]) -> Path:
    """A folder only this user can change (created 0700 when missing), for state others must not
    plant or swap files in: ours, writable by nobody else, and not inside a folder where anyone
    can rename entries (world-writable without sticky bit)."""
    path = make_dir(path)
    info = os.lstat(path)
    if info.st_uid != os.getuid():
        raise UnsafePath(path, f"is owned by uid {info.st_uid}")
    if info.st_mode & 0o022:
        raise UnsafePath(path, f"is writable by others (mode {_mode(info)})")
    parent = os.stat(path.parent)
    if parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX:
        raise UnsafePath(
            path, f"is in {path.parent}, which any user can change (mode {_mode(parent)})"
        )
    return path


def open_private(path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> int:
    """Open a file of ours: never through a symlink, only a regular file this user owns with one
    link (a hard link would send writes elsewhere). ``O_TRUNC`` is applied after the checks.
    A wider mode than 0600 (an older version's file) is narrowed."""
    truncate = flags & os.O_TRUNC
    flags = (flags & ~os.O_TRUNC) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise UnsafePath(path, "is a symlink") from None
        raise
    try:
        _check_file(fd, path)
        if truncate:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_capped(fd: int, limit: int = MAX_READ_BYTES) -> bytes:
    """The whole file from offset 0, refusing more than ``limit`` bytes (memory stays bounded)."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit and (chunk := os.pread(fd, limit + 1 - size, size)):
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise FileTooLarge(f"more than {limit} bytes")
    return b"".join(chunks)


def read_private(path: str | os.PathLike[str], limit: int = MAX_READ_BYTES) -> bytes:
    """A small file of ours, read whole (see :func:`open_private`, :func:`read_capped`)."""
    fd = open_private(path, os.O_RDONLY)
    try:
        return read_capped(fd, limit)
    finally:
        os.close(fd)


def replace_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``<path>.tmp`` (0600, no symlink followed), then rename it over
    ``path``: readers see the old or the new content, and a failed write leaves no ``.tmp``."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def owner_only_umask() -> Iterator[None]:
    """Files and folders this process creates meanwhile are for this user only (for code we do
    not control, like DuckDB). Nested and concurrent uses restore the umask once, after the last.
    """
    global _umask_users, _saved_umask
    with _umask_lock:
        if _umask_users == 0:
            _saved_umask = os.umask(0o077)
            os.umask(_saved_umask | 0o077)
        _umask_users += 1
    try:
        yield
    finally:
        with _umask_lock:
            _umask_users -= 1
            if _umask_users == 0:
                os.umask(_saved_umask)


def _create_missing(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700 (not the umask's default)."""
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile: checked by the caller
            os.mkdir(folder, 0o700)


def _check_file(fd: int, path: str | os.PathLike[str]) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePath(path, "is not a regular file")
    if info.st_uid != os.getuid():
        raise UnsafePath(path, f"is owned by uid {info.st_uid}")
    if info.st_nlink > 1:
        raise UnsafePath(path, f"has {info.st_nlink} hard links")
    if info.st_mode & 0o077:
        os.fchmod(fd, 0o600)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _mode(info: os.stat_result) -> str:
    return f"{stat.S_IMODE(info.st_mode):04o}"

"""Create (or resume) one PostHog export, poll it until it has content, stream it to disk.

No Dagster here: :mod:`posthog_assets.exports.assets` runs many of these in threads, and the
benchmark drives it directly.

- **No duplicate exports.** Every export carries a deterministic ``export_context.filename`` tag
  (from asset key + run/partition). Before a POST we look for a pending or ready export of ours
  with that tag (by an id recorded on disk, then in the exports list, newest first), so a retried
  or crashed step resumes instead of rendering again.
- **Finite, visible polling.** Backoff with jitter up to a total ``timeout_s``, then a failure
  naming the id, elapsed time and last state (the next attempt resumes that export).
- **Safe paths.** The server's filename is reduced to a plain name inside
  ``<export_dir>/<asset name>/`` (made 0700, never followed as a symlink); pending markers are
  0600 files in a folder only this user can write.
- **Local disk errors fail at once** with :class:`ExportDiskError` naming ``export_dir``: a retry
  would only fail again.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from posthog_assets.api.client import PostHogClient
from posthog_assets.api.errors import (
    PostHogConnectionError,
    PostHogError,
    PostHogExportFailed,
    PostHogNotFoundError,
    PostHogPollTimeout,
    PostHogServerError,
)
from posthog_assets.api.polling import PollPolicy
from posthog_assets.api.private_files import (
    disk_error_message,
    is_local_disk_error,
    make_dir,
    private_dir,
    read_private,
    replace_private,
)
from posthog_assets.common import parse_time
from posthog_assets.config import EXPORT_FORMATS, TABULAR_FORMATS

logger = logging.getLogger(__name__)

#: How many of our own exports (newest first) to scan for a resumable one before creating anew.
LOOKUP_LIMIT = 300
#: After a POST that got no answer: look for the export in the list this often, this far apart.
#: PostHog creates the row before it renders, so the first look nearly always finds it.
POST_LOOKUP_ATTEMPTS = 3
POST_LOOKUP_WAIT_S = 1.0
#: Saved-query kinds whose ``source`` is what the tabular exporter runs (posthog/schema.py).
_WRAPPER_KINDS = frozenset({"InsightVizNode", "DataVisualizationNode"})
#: Exports older than this are never resumed (PostHog's envelope for PNG/CSV/XLSX is ~10 min).
LOOKUP_MAX_AGE_S = 2 * 24 * 3600.0
PENDING_MARKER_DIR = ".posthog-pending"
#: A pending marker's ``.tmp`` older than this was left by a killed writer (writing one takes
#: microseconds): the next export into the folder removes it.
STALE_MARKER_TMP_S = 60.0

#: Lower-cased fragments of PostHog ``exception`` texts that are worth another attempt: the
#: synthetic stuck-export text, render/query timeouts, transient infrastructure failures.
RETRYABLE_EXCEPTION_MARKERS: tuple[str, ...] = (
    "failed without throwing an exception",
    "timed out",
    "timeout",
    "temporarily",
    "unavailable",
    "try again later",
    "server error",
    "connection",
    "throttled",
    "too many requests",
    "at capacity",
)
#: Fragments that mark a user error even if a retryable word also appears (checked first).
NON_RETRYABLE_EXCEPTION_MARKERS: tuple[str, ...] = (
    "not supported",
    "is required",
    "invalid",
    "does not belong",
    "could not verify its original authorization",
    "permission",
    "not found",
    "no data available",
    "columns",
)


def exception_is_retryable(text: str | None) -> bool:
    """Whether a new export may succeed, from PostHog's ``exception`` text: the response carries
    no failure class (``failure_type`` is not serialized), so the text is all we have."""
    lowered = (text or "").lower()
    if any(m in lowered for m in NON_RETRYABLE_EXCEPTION_MARKERS):
        return False
    return any(m in lowered for m in RETRYABLE_EXCEPTION_MARKERS)


@dataclass(frozen=True)
class ExportRequest:
    """One logical export. ``dedup_key`` must be the same for every attempt of the same run."""

    asset_name: str
    export_format: str
    dedup_key: str
    insight: int | None = None
    dashboard: int | None = None
    export_context: Mapping[str, Any] | None = None

    @property
    def extension(self) -> str:
        return EXPORT_FORMATS.get(self.export_format, "bin")

    @property
    def tag(self) -> str:
        """The ``export_context.filename`` that marks this logical export as ours."""
        digest = hashlib.sha256(self.dedup_key.encode()).hexdigest()[:16]
        base = str((self.export_context or {}).get("filename") or self.asset_name)
        return f"{base}-dg{digest}"

    @property
    def target(self) -> str:
        if self.insight is not None:
            return f"insight {self.insight}"
        if self.dashboard is not None:
            return f"dashboard {self.dashboard}"
        return "query"

    @property
    def needs_source(self) -> bool:
        """A CSV/XLSX of an insight renders only from ``export_context.source`` or ``.path``:
        without either, PostHog's tabular exporter (``csv_exporter.py``) fails with
        ``KeyError('path')``, retried for up to 35 minutes, and never gives a file."""
        context = self.export_context or {}
        return (
            self.export_format in TABULAR_FORMATS
            and self.insight is not None
            and not context.get("source")
            and not context.get("path")
        )

    def body_context(self, built: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What is sent: what we built, then the user's keys (they win), then our tag."""
        return {**dict(built or {}), **dict(self.export_context or {}), "filename": self.tag}


def tabular_context(insight: Mapping[str, Any], project_id: int | str) -> dict[str, Any]:
    """``export_context`` that lets PostHog render an insight as CSV/XLSX: the query node the
    exporter runs (an ``InsightVizNode``'s ``source``, any other query as it is) or, for legacy
    ``filters``, a ``path`` to the insight's API route; PostHogExportFailed without either."""
    query = insight.get("query")
    if isinstance(query, Mapping) and query.get("kind"):
        if query["kind"] in _WRAPPER_KINDS and isinstance(query.get("source"), Mapping):
            return {"source": dict(query["source"])}
        if query["kind"] not in _WRAPPER_KINDS:
            return {"source": dict(query)}
    if isinstance(insight.get("filters"), Mapping) and insight["filters"]:
        return {"path": f"/api/projects/{project_id}/insights/{insight['id']}/"}
    name = insight.get("name") or insight.get("derived_name") or "unnamed"
    raise PostHogExportFailed(
        f"insight {insight.get('id')} ('{name}') has neither a saved query nor legacy filters, so "
        "PostHog has nothing to render as a table; give the export an export_context.source "
        "(a query) or export it as PNG",
        retryable=False,
    )


@dataclass(frozen=True)
class ExportOutcome:
    """What happened to one export, besides its request: the file, and how it was got."""

    export_id: int
    server_filename: str | None
    path: Path
    bytes: int
    sha256: str
    created_at: str | None
    expires_after: str | None
    downloaded_at: str
    poll_count: int
    wait_s: float
    resumed: bool
    recreated: bool
    post_count: int = 0
    states: tuple[str, ...] = field(default=(), repr=False)


def safe_filename(name: str | None, extension: str, fallback: str) -> str:
    """A plain file name from an untrusted server ``filename``: only ``[A-Za-z0-9._-]``, no
    directories or ``..``, never a leading dot, always ending with ``.<extension>``."""
    text = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(ch for ch in text if ch.isprintable() and ord(ch) >= 32)
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    text = re.sub(r"\.{2,}", ".", text).strip(".-_ ")
    suffix = f".{extension}"
    stem = text[: -len(suffix)] if text.lower().endswith(suffix) else text
    stem = stem.strip(".-_ ")[:150]
    if not stem:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", fallback).strip("-") or "export"
    return f"{stem}{suffix}"


def safe_dirname(name: str) -> str:
    """A single path component for the asset's folder."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "export"
    return cleaned[:150]


class ExportDiskError(OSError):
    """An export's folder or files cannot be written (full, read-only, not a folder, refused);
    a retry would fail the same way. ``export_id`` is the PostHog export already created, if any.
    """

    retryable = False

    def __init__(self, message: str, *, export_id: int | None = None) -> None:
        super().__init__(message)
        self.export_id = export_id

    @classmethod
    def of(cls, folder: Path, cause: OSError, export_id: int | None) -> ExportDiskError:
        """Names ``export_dir``, the folder, the cause and the export PostHog made meanwhile."""
        message = disk_error_message("export_dir", folder, cause)
        if export_id is not None:
            message += f" (PostHog export {export_id} was created but could not be saved)"
        return cls(message, export_id=export_id)


def _describe(export: Mapping[str, Any]) -> str:
    if export.get("exception"):
        return "failed"
    return "ready" if export.get("has_content") else "pending"


class ExportRunner:
    """Runs :class:`ExportRequest`s against one :class:`PostHogClient`; safe to share by threads.
    Files land in ``<export_dir>/<asset name>/``; ``poll`` paces ``GET /exports/:id/``."""

    def __init__(
        self,
        client: PostHogClient,
        export_dir: str | os.PathLike[str],
        *,
        poll: PollPolicy | None = None,
        log: logging.Logger | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.export_dir = Path(export_dir).absolute()  # recorded paths must not depend on cwd
        self.poll = poll or PollPolicy()
        self.log = log or logger
        self._sleep = sleep
        self._contexts: dict[int, dict[str, Any]] = {}  # by insight id

    # ------------------------------------------------------------------ public

    def run(
        self, request: ExportRequest, *, exclude_ids: Collection[int] = (), scan_list: bool = True
    ) -> ExportOutcome:
        """Resume or create the export, wait for content, download it; re-create once on a 404.

        ``exclude_ids`` are exports already materialized, never reused. ``scan_list=False`` (for
        the first attempt of a fresh run) saves the exports-list search; the recorded id is
        always tried.
        """
        current: dict[str, Any] = {}
        try:
            return self._run(request, exclude_ids, current, scan_list)
        except PostHogError as exc:
            # Let callers (failure metadata, the retry sensor) name the export that failed.
            exc.export_id = current.get("id")
            raise
        except OSError as exc:
            if not is_local_disk_error(exc):
                raise
            folder = self.export_dir / safe_dirname(request.asset_name)
            raise ExportDiskError.of(folder, exc, current.get("id")) from exc

    def _run(
        self,
        request: ExportRequest,
        exclude_ids: Collection[int],
        current: dict[str, Any],
        scan_list: bool,
    ) -> ExportOutcome:
        started = time.monotonic()
        folder = make_dir(self.export_dir / safe_dirname(request.asset_name))
        self._remove_stale_marker_tmps(folder)
        export = self.find_resumable(request, exclude_ids=exclude_ids, scan_list=scan_list)
        resumed = export is not None
        if export is None:
            export = self._create(request)
        else:
            self.log.info(
                "%s: resuming PostHog export %s (%s) instead of creating a new one",
                request.asset_name,
                export["id"],
                _describe(export),
            )
        recreated = False
        polls = 0
        states: list[str] = []
        while True:
            current["id"] = export["id"]
            self._record_pending(request, export)
            try:
                export, n, seen = self._wait_for_content(request, export)
                polls += n
                states.extend(seen)
                download = self.client.download_export_content(
                    int(export["id"]), folder / self._local_name(request, export)
                )
                break
            except PostHogNotFoundError:
                if recreated:
                    self._forget_pending(request)
                    raise
                self.log.warning(
                    "%s: PostHog export %s is gone (expired or lost, 404); creating a fresh one "
                    "(once)",
                    request.asset_name,
                    export["id"],
                )
                recreated = True
                export = self._create(request)
            except PostHogExportFailed:
                self._forget_pending(request)
                raise
        self._forget_pending(request)
        return ExportOutcome(
            export_id=int(export["id"]),
            server_filename=export.get("filename"),
            path=download.path,
            bytes=download.bytes,
            sha256=download.sha256,
            created_at=export.get("created_at"),
            expires_after=export.get("expires_after"),
            downloaded_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            poll_count=polls,
            wait_s=round(time.monotonic() - started, 3),
            resumed=resumed,
            recreated=recreated,
            post_count=int(not resumed) + int(recreated),
            states=tuple(states),
        )

    def find_resumable(
        self, request: ExportRequest, *, exclude_ids: Collection[int] = (), scan_list: bool = True
    ) -> dict[str, Any] | None:
        """Our own still-useful export for this request (pending, or ready but not recorded):
        the id an earlier attempt recorded first, then the exports list (newest first, bounded)."""
        listed = self._iter_own(request) if scan_list else ()
        candidates = itertools.chain(self._recorded(request, exclude_ids), listed)
        return next((e for e in candidates if self._usable(e, request, exclude_ids)), None)

    # ------------------------------------------------------------------ create / poll

    def _built_context(self, request: ExportRequest) -> dict[str, Any] | None:
        """The ``source``/``path`` PostHog needs for a CSV/XLSX of an insight (one basic GET)."""
        if not request.needs_source or request.insight is None:
            return None
        if request.insight not in self._contexts:  # dict reads and writes are thread-safe
            insight = self.client.get_insight(request.insight, basic=True)
            self._contexts[request.insight] = tabular_context(insight, self.client.project_id)
        return self._contexts[request.insight]

    def _create(self, request: ExportRequest) -> dict[str, Any]:
        try:
            built = self._built_context(request)
        except PostHogExportFailed as exc:
            raise PostHogExportFailed(
                f"{request.asset_name}: cannot export {request.target} as "
                f"{request.extension.upper()}: {exc}",
                retryable=False,
            ) from None
        try:
            export = self.client.create_export(
                request.export_format,
                insight=request.insight,
                dashboard=request.dashboard,
                export_context=request.body_context(built),
            )
        except (PostHogConnectionError, PostHogServerError) as exc:
            # The POST may have reached PostHog: PostHog holds it open while it renders, and the
            # row is in the list from the start. Look for it rather than POST a second export.
            sent = not isinstance(exc, PostHogConnectionError) or exc.request_sent
            found = self._find_after_post(request) if sent else None
            if found is None:
                raise
            self.log.warning(
                "%s: POST /exports/ got no answer (%s); following PostHog export %s, which it "
                "created, instead of creating another",
                request.asset_name,
                exc,
                found["id"],
            )
            return found
        self.log.info(
            "%s: created PostHog export %s (%s of %s): %s",
            request.asset_name,
            export.get("id"),
            request.extension,
            request.target,
            _describe(export),
        )
        return export

    def _find_after_post(self, request: ExportRequest) -> dict[str, Any] | None:
        for attempt in range(POST_LOOKUP_ATTEMPTS):
            if attempt:
                self._sleep(POST_LOOKUP_WAIT_S)
            found = self.find_resumable(request)
            if found is not None:
                return found
        return None

    def _wait_for_content(
        self, request: ExportRequest, export: dict[str, Any]
    ) -> tuple[dict[str, Any], int, list[str]]:
        """Poll until ``has_content`` or ``exception``; return (export, polls, states seen)."""
        start = time.monotonic()
        waits = self.poll.waits()
        polls = 0
        states = [_describe(export)]
        export_id = int(export["id"])
        while True:
            if export.get("exception"):
                raise self._failed(request, export)
            if export.get("has_content"):
                return export, polls, states
            elapsed = time.monotonic() - start
            remaining = self.poll.timeout_s - elapsed
            if remaining <= 0:
                raise PostHogPollTimeout(
                    f"{request.asset_name}: PostHog export {export_id} ({request.extension} of "
                    f"{request.target}) still {_describe(export)} after {elapsed:.1f}s "
                    f"(poll_timeout_s={self.poll.timeout_s:g}, {polls} polls); last state: "
                    f"has_content={export.get('has_content')}, exception="
                    f"{export.get('exception')!r}. A re-run resumes export {export_id} "
                    "instead of creating another."
                )
            self._sleep(max(0.0, min(next(waits), remaining)))
            export = self.client.get_export(export_id)
            polls += 1
            states.append(_describe(export))
            self.log.info(
                "%s: export %s poll %d after %.1fs: %s",
                request.asset_name,
                export_id,
                polls,
                time.monotonic() - start,
                _describe(export),
            )

    def _failed(self, request: ExportRequest, export: Mapping[str, Any]) -> PostHogExportFailed:
        text = str(export.get("exception"))
        retryable = exception_is_retryable(text)
        hint = (
            "PostHog's side failed; a new attempt may succeed."
            if retryable
            else "This is final for this export: fix the configuration (format, target, "
            "export_context) before retrying."
        )
        return PostHogExportFailed(
            f"{request.asset_name}: PostHog export {export.get('id')} ({request.export_format} "
            f"of {request.target}) failed: {text} {hint}",
            retryable=retryable,
            detail=text,
        )

    # ------------------------------------------------------------------ lookup helpers

    def _iter_own(self, request: ExportRequest) -> Iterator[dict[str, Any]]:
        now = datetime.now(UTC)
        for n, export in enumerate(self.client.iter_exports(export_format=request.export_format)):
            if n >= LOOKUP_LIMIT:
                return
            created = parse_time(export.get("created_at"))
            if created is not None and (now - created).total_seconds() > LOOKUP_MAX_AGE_S:
                return  # newest first: everything after this is older still
            yield export

    def _usable(
        self, export: Mapping[str, Any], request: ExportRequest, exclude_ids: Collection[int]
    ) -> bool:
        context = export.get("export_context") or {}
        return (
            isinstance(context, Mapping)
            and context.get("filename") == request.tag
            and export.get("export_format") == request.export_format
            and export.get("insight") == request.insight
            and export.get("dashboard") == request.dashboard
            and not export.get("exception")
            and int(export.get("id", -1)) not in exclude_ids
        )

    def _local_name(self, request: ExportRequest, export: Mapping[str, Any]) -> str:
        return safe_filename(
            export.get("filename"), request.extension, f"{request.asset_name}-{export.get('id')}"
        )

    # ------------------------------------------------------------------ recorded id

    def _marker(self, request: ExportRequest) -> Path:
        name = f"{request.tag.rsplit('-dg', 1)[-1]}.json"
        return self.export_dir / safe_dirname(request.asset_name) / PENDING_MARKER_DIR / name

    def _record_pending(self, request: ExportRequest, export: Mapping[str, Any]) -> None:
        marker = self._marker(request)
        private_dir(marker.parent)
        data = json.dumps({"export_id": int(export["id"]), "tag": request.tag})
        replace_private(marker, data.encode())

    def _recorded(
        self, request: ExportRequest, exclude_ids: Collection[int]
    ) -> Iterator[dict[str, Any]]:
        """The export whose id is recorded, if PostHog still has it; a missing, foreign, planted
        (symlink) or oversized marker records none."""
        try:
            data = json.loads(read_private(self._marker(request)))
            recorded = int(data["export_id"]) if data.get("tag") == request.tag else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return
        if recorded is not None and recorded not in exclude_ids:
            with contextlib.suppress(PostHogNotFoundError):
                yield self.client.get_export(recorded)

    def _remove_stale_marker_tmps(self, folder: Path) -> None:
        """Delete pending-marker ``.tmp`` files left by a failed (empty: disk full) or killed
        (old) write. Only another run of the same asset writes here meanwhile, and its ``.tmp``
        is empty for microseconds; losing that race fails its export as retryable."""
        pending = folder / PENDING_MARKER_DIR
        if pending.is_symlink() or not pending.is_dir():
            return
        cutoff = time.time() - STALE_MARKER_TMP_S
        for tmp in pending.glob("*.tmp"):
            with contextlib.suppress(OSError):
                info = tmp.lstat()
                if info.st_size == 0 or info.st_mtime < cutoff:
                    tmp.unlink()
                    self.log.warning("Removed %s, left by a failed pending-marker write", tmp)

    def _forget_pending(self, request: ExportRequest) -> None:
        marker = self._marker(request)
        marker.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other markers may still be there
            marker.parent.rmdir()


def failure_kind(exc: BaseException) -> tuple[str, bool]:
    """(kind, retryable) of an exception raised while running an export."""
    if isinstance(exc, PostHogError | ExportDiskError):
        return type(exc).__name__, bool(exc.retryable)
    if isinstance(exc, OSError):
        return "OSError", not is_local_disk_error(exc)
    return type(exc).__name__, False

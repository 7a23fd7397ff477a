"""The vocabulary several parts of the package share: run tags, metadata keys, resource keys,
and the few helpers that read them (time stamps, file hashes).

It sits below the exports and snapshots folders and imports nothing of theirs, so no two of them
need each other. Pool names live in :mod:`posthog_assets.pools`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: The DuckDB resource every writer and check uses.
DUCKDB_RESOURCE_KEY = "duckdb"

#: Run tag that pins which logical exports a run resumes (set by the retry sensor on its runs).
TAG_DEDUP_ROOT = "posthog/export_dedup_root"
#: Run tags of the expiry sensor's runs: which export they refresh, and why.
TAG_REFRESH_OF = "posthog/refresh_of"
TAG_EXPIRY_REASON = "posthog/expiry_reason"
#: Run tags of the retry sensor's runs: which attempt, retrying which failed run.
TAG_RETRY_ATTEMPT = "posthog/retry_attempt"
TAG_RETRY_OF = "posthog/retry_of"
#: Dagster's own tag of a re-execution's original run.
TAG_ROOT_RUN_ID = "dagster/root_run_id"

#: Key of the ``dg.Failure`` metadata entry listing failed exports (read by the retry sensor).
FAILURES_METADATA_KEY = "posthog_export_failures"


def dedup_root_from_tags(tags: Mapping[str, str], run_id: str) -> str:
    """What makes two attempts "the same logical export".

    A step retry (same run), a re-execution (same ``dagster/root_run_id``) and a retry-sensor run
    (``posthog/export_dedup_root``) keep it, so they resume; a new scheduled run does not.
    Callers pass the run's ``root_run_id`` (else its id) as ``run_id``: a re-execution made with
    ``dg.execute_job(..., reexecution_options=...)`` records its root there and sets no tag.
    """
    return tags.get(TAG_DEDUP_ROOT) or tags.get(TAG_ROOT_RUN_ID) or run_id


def parse_time(value: Any) -> datetime | None:
    """PostHog's ISO timestamps (``...Z``) as aware datetimes; None when absent or malformed."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat()


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Streamed sha256 (constant memory for any size)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()

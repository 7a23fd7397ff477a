"""Sensors that keep exports fresh (expiry) and retry exports that failed for a passing reason.

Both keep a JSON cursor, stop well inside Dagster's 60 s evaluation budget (the rest waits for the
next tick), return ``SkipReason`` when there is nothing to do, and default to STOPPED.

``run_key`` design (a run_key deduplicates forever):

- expiry: ``expiry:<asset>:<export_id>:<attempt>``. The export id changes with every successful
  re-materialization, so a later expiry always gets a fresh key; ``attempt`` grows (from the runs
  already tagged for that export, and the cursor) when a refresh run did not produce a new export,
  so a later legitimate request is never swallowed by an old key.
- retry: ``posthog-retry:<failed run id>:<attempt>``. Each failed run is answered at most once
  (re-reading the same failure, e.g. after a cursor reset, gives the same key: no double retry),
  and every new failure is a new run id, so the key never blocks a run we want.
"""

import json
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import asdict, dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import dagster as dg

from posthog_assets.api.errors import (
    PostHogAuthError,
    PostHogError,
    PostHogNotFoundError,
    PostHogPermissionError,
)
from posthog_assets.common import (
    FAILURES_METADATA_KEY,
    TAG_DEDUP_ROOT,
    TAG_EXPIRY_REASON,
    TAG_REFRESH_OF,
    TAG_RETRY_ATTEMPT,
    TAG_RETRY_OF,
    dedup_root_from_tags,
    file_sha256,
    materialization_values,
    parse_time,
)
from posthog_assets.config import ProjectConfig
from posthog_assets.resources import PostHogResource

DEFAULT_EXPIRY_MARGIN_S = 24 * 3600.0
DEFAULT_REREQUEST_AFTER_S = 6 * 3600.0
#: Dagster kills a sensor evaluation after 60 s; stop looping well before.
DEFAULT_TIME_BUDGET_S = 20.0
#: PostHog lookups inside a tick: short retries and timeouts, a few at a time.
SENSOR_RETRY_BUDGET_S = 8.0
SENSOR_READ_TIMEOUT_S = 8.0
SENSOR_LOOKUP_WORKERS = 4
DEFAULT_RETRY_BACKOFF_S = 300.0
DEFAULT_RETRY_BACKOFF_MAX_S = 3600.0
DEFAULT_RETRY_MAX_ATTEMPTS = 3

_ACTIVE_STATUSES = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.MANAGED,
}


def _load_json(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------- cursors


@dataclass
class HashedFile:
    """A downloaded file's identity when it was last hashed, and whether it matched."""

    export_id: int
    size: int
    mtime_ns: int
    matches: bool


@dataclass
class RefreshRequested:
    """A refresh run requested for an export: which attempt, and when (epoch seconds)."""

    export_id: int
    attempt: int
    at: float


@dataclass
class ExpiryCursor:
    """Where the expiry sensor stopped, which files it already hashed, what it requested."""

    offset: int = 0
    hashed: dict[str, HashedFile] = field(default_factory=dict)
    requested: dict[str, RefreshRequested] = field(default_factory=dict)

    @classmethod
    def load(cls, raw: str | None, keep: Collection[str]) -> "ExpiryCursor":
        """The cursor, forgiving anything malformed (a broken cursor must not stop the sensor)."""
        data = _load_json(raw)

        def records(name: str, record: type[Any]) -> dict[str, Any]:
            out = {}
            for key, value in dict(data.get(name) or {}).items():
                if key not in keep or not isinstance(value, dict):
                    continue
                try:
                    out[key] = record(**value)
                except TypeError:
                    continue
            return out

        offset = data.get("offset")
        return cls(
            offset=offset if isinstance(offset, int) else 0,
            hashed=records("hashed", HashedFile),
            requested=records("requested", RefreshRequested),
        )

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class PendingRetry:
    """A retry run the retry sensor will request once ``due`` (epoch seconds) has passed."""

    due: float
    run_key: str
    assets: list[str]
    tags: dict[str, str]


@dataclass
class RetryCursor:
    """The last failure event read, and the retries waiting for their time."""

    after: int | None = None
    pending: list[PendingRetry] = field(default_factory=list)

    @classmethod
    def load(cls, raw: str | None) -> "RetryCursor":
        data = _load_json(raw)
        pending = []
        for item in data.get("pending") or []:
            try:
                pending.append(PendingRetry(**item))
            except TypeError:
                continue
        after = data.get("after")
        return cls(after=after if isinstance(after, int) else None, pending=pending)

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _sensor_name(project: ProjectConfig, what: str) -> str:
    return "_".join([*project.key_prefix, what])


# ---------------------------------------------------------------------- expiry


def build_posthog_export_expiry_sensor(
    *,
    project: ProjectConfig,
    export_keys: Sequence[dg.AssetKey],
    log_key: dg.AssetKey | None = None,
    name: str | None = None,
    margin_s: float = DEFAULT_EXPIRY_MARGIN_S,
    rerequest_after_s: float = DEFAULT_REREQUEST_AFTER_S,
    minimum_interval_seconds: int = 3600,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    max_requests_per_tick: int = 100,
    check_posthog: bool = True,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
    clock: Callable[[], float] = time.time,
) -> dg.SensorDefinition:
    """Re-materialize an export that expires within ``margin_s``, is gone from PostHog, or whose
    file is gone/changed.

    The recorded ``expires_after`` and the local file are checked first (no HTTP). Exports that
    pass are then looked up in PostHog (``GET exports/:id/``, a few at a time, with a short retry
    budget): a 404 means PostHog expired or deleted it early, and a changed ``expires_after``
    replaces the recorded one. A lookup that fails for a passing reason is retried next tick; a
    401/403 fails the tick with the missing scope (``export:read``).

    Args:
        export_keys: The export assets to watch (their latest materialization's metadata).
        log_key: The DuckDB log asset, requested along so the new row gets written.
        margin_s: Refresh this long before ``expires_after``.
        rerequest_after_s: If a refresh produced no new export, ask again after this long.
        time_budget_s: Stop this long into an evaluation; the rest waits for the next tick.
        check_posthog: Ask PostHog about each export (needs the project's resource).
    """
    keys = list(export_keys)
    extra = [log_key] if log_key is not None else []
    by_name = {k.to_user_string(): k for k in keys}

    @dg.sensor(
        name=name or _sensor_name(project, "export_expiry_sensor"),
        target=dg.AssetSelection.assets(*keys, *extra),
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        required_resource_keys={project.resource_key} if check_posthog else set(),
        description="Re-exports PostHog exports that are about to expire, are gone from PostHog, "
        "or whose file is missing or changed.",
    )
    def _expiry_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        started = clock()
        cursor = ExpiryCursor.load(context.cursor, keep=by_name)
        hashed, requested = cursor.hashed, cursor.requested
        offset = cursor.offset % max(1, len(keys))
        order = keys[offset:] + keys[:offset]
        latest = context.instance.get_latest_materialization_events(keys)

        # Pass 1, local only: what was recorded and what is on disk.
        seen: list[tuple[dg.AssetKey, Any, str | None]] = []
        next_offset = 0
        for i, key in enumerate(order):
            if clock() - started > time_budget_s:
                next_offset = (offset + i) % len(keys)
                context.log.info(
                    "Stopping after %d of %d exports (time budget); continuing next tick",
                    i,
                    len(keys),
                )
                break
            md = materialization_values(latest.get(key))
            if md.get("export_id") is None:
                continue  # never exported: that is the schedule's job, not ours
            reason = _expiry_reason(md, clock(), margin_s, hashed, key.to_user_string())
            seen.append((key, md["export_id"], reason))

        # Pass 2: ask PostHog about the exports that look fine here.
        if check_posthog:
            unknown = [export_id for _, export_id, reason in seen if reason is None]
            remaining = time_budget_s - (clock() - started)
            if unknown and remaining > 1:
                resource = getattr(context.resources, project.resource_key)
                remote = _posthog_reasons(
                    resource, unknown, clock(), margin_s, remaining, context.log
                )
                seen = [(k, e, r or remote.get(e)) for k, e, r in seen]

        requests: list[dg.RunRequest] = []
        for key, export_id, reason in seen:
            name_ = key.to_user_string()
            prev = requested.get(name_)
            if prev and prev.export_id != export_id:
                requested.pop(name_, None)  # re-exported since: forget the old request
                prev = None
            if reason is None or len(requests) >= max_requests_per_tick:
                continue
            if prev and clock() - prev.at < rerequest_after_s:
                continue  # already asked for this export
            refresh_of = f"{name_}:{export_id}"
            runs = context.instance.get_run_records(
                dg.RunsFilter(tags={TAG_REFRESH_OF: refresh_of}), limit=1
            )
            if runs and runs[0].dagster_run.status in _ACTIVE_STATUSES:
                continue  # a refresh is under way
            if runs and runs[0].end_time and clock() - runs[0].end_time < rerequest_after_s:
                continue  # a refresh just finished without a new export: cool down
            launched = context.instance.get_runs_count(
                dg.RunsFilter(tags={TAG_REFRESH_OF: refresh_of})
            )
            attempt = max(launched, prev.attempt if prev else 0) + 1
            context.log.info("Requesting %s: %s (attempt %d)", name_, reason, attempt)
            requests.append(
                dg.RunRequest(
                    run_key=f"expiry:{name_}:{export_id}:{attempt}",
                    asset_selection=[key, *extra],
                    tags={TAG_REFRESH_OF: refresh_of, TAG_EXPIRY_REASON: reason[:200]},
                )
            )
            requested[name_] = RefreshRequested(int(export_id), attempt, clock())

        new_cursor = ExpiryCursor(next_offset, hashed, requested).dump()
        if not requests:
            return dg.SensorResult(
                skip_reason=dg.SkipReason(
                    f"All {len(keys)} exports are fresh (none expires within {margin_s:g}s, "
                    "PostHog still has them or could not be asked, files present and intact) "
                    "or already requested."
                ),
                cursor=new_cursor,
            )
        return dg.SensorResult(run_requests=requests, cursor=new_cursor)

    return _expiry_sensor


def _expires_reason(expires_after: Any, now: float, margin_s: float) -> str | None:
    expires_at = parse_time(expires_after)
    if expires_at is None or expires_at.timestamp() - margin_s > now:
        return None
    when = expires_at.astimezone(UTC).isoformat()
    return f"expired at {when}" if expires_at.timestamp() <= now else f"expires at {when}"


def _expiry_reason(
    md: Mapping[str, Any],
    now: float,
    margin_s: float,
    hashed: dict[str, HashedFile],
    name: str,
) -> str | None:
    """Why this export needs a new materialization, or None. Hashes only changed files."""
    reason = _expires_reason(md.get("expires_after"), now, margin_s)
    if reason is not None:
        return reason
    path = Path(str(md.get("path") or ""))
    if not md.get("path") or not path.is_file():
        hashed.pop(name, None)
        return f"file {path} is missing"
    stat = path.stat()
    if isinstance(md.get("bytes"), int) and stat.st_size != md["bytes"]:
        return f"file size {stat.st_size} differs from recorded {md['bytes']}"
    cached = hashed.get(name)
    if cached is not None and (cached.export_id, cached.size, cached.mtime_ns) == (
        md.get("export_id"),
        stat.st_size,
        stat.st_mtime_ns,
    ):
        ok = cached.matches
    else:
        ok = file_sha256(path) == md.get("sha256")
        hashed[name] = HashedFile(int(md["export_id"]), stat.st_size, stat.st_mtime_ns, ok)
    return None if ok else "file sha256 differs from the recorded download"


def _posthog_reasons(
    resource: PostHogResource,
    export_ids: Sequence[Any],
    now: float,
    margin_s: float,
    budget_s: float,
    log: logging.Logger,
) -> dict[Any, str]:
    """Export id -> why PostHog says it needs refreshing; lookups overlap, bounded by the budget."""
    client = resource.get_client(
        retry_budget_s=min(SENSOR_RETRY_BUDGET_S, budget_s / 2),
        read_timeout_s=min(SENSOR_READ_TIMEOUT_S, budget_s / 2),
    )

    def ask(export_id: Any) -> str | None:
        try:
            data = client.get_export(int(export_id))
        except PostHogNotFoundError:
            return f"export {export_id} is gone from PostHog (expired or deleted)"
        return _expires_reason(data.get("expires_after"), now, margin_s)

    reasons: dict[Any, str] = {}
    pool = ThreadPoolExecutor(max_workers=SENSOR_LOOKUP_WORKERS, thread_name_prefix="posthog")
    futures = {pool.submit(ask, export_id): export_id for export_id in export_ids}
    try:
        for future in as_completed(futures, timeout=budget_s):
            export_id = futures[future]
            try:
                reason = future.result()
            except (PostHogAuthError, PostHogPermissionError):
                raise  # the message names the missing scope; every lookup would fail alike
            except PostHogError as exc:
                log.warning(
                    "Could not look up export %s in PostHog (next tick): %s", export_id, exc
                )
                continue
            if reason is not None:
                reasons[export_id] = reason
    except FuturesTimeout:
        log.warning("PostHog lookups ran out of time; the rest are checked next tick")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return reasons


# ---------------------------------------------------------------------- retry


def build_posthog_export_retry_sensor(
    *,
    project: ProjectConfig,
    export_assets: Sequence[dg.AssetsDefinition],
    log_key: dg.AssetKey | None = None,
    name: str | None = None,
    max_attempts: int = DEFAULT_RETRY_MAX_ATTEMPTS,
    backoff_s: float = DEFAULT_RETRY_BACKOFF_S,
    backoff_max_s: float = DEFAULT_RETRY_BACKOFF_MAX_S,
    lookback_s: float = 24 * 3600.0,
    minimum_interval_seconds: int = 60,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    max_runs_per_tick: int = 100,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
    clock: Callable[[], float] = time.time,
) -> dg.SensorDefinition:
    """Re-request export assets of failed runs whose failure is retryable, after a backoff.

    How the failure kind is known: the export step raises ``dg.Failure`` with metadata
    ``posthog_export_failures`` (asset key, export id, error class, ``retryable``), derived from
    the typed client errors (timeouts, 5xx, 429, dropped downloads and retryable PostHog
    ``exception`` texts are retryable; 4xx, auth and user-error exceptions are not). A planned
    export that failed without that record (crash, killed worker) counts as retryable. Attempts
    are counted in the ``posthog/retry_attempt`` tag of the runs this sensor launches.

    Args:
        export_assets: The project's export assets.
        log_key: The DuckDB log asset, requested along with retried exports.
        max_attempts: Total sensor-launched retries per chain of failures.
        backoff_s: Wait before retry n is ``backoff_s * 2**(n-1)``, capped at ``backoff_max_s``.
        lookback_s: On the first tick (no cursor), look at failures this far back.
    """
    keys = [k for a in export_assets for k in a.keys]
    ours = set(keys) | ({log_key} if log_key else set())
    target_keys = [*keys, *([log_key] if log_key else [])]

    @dg.sensor(
        name=name or _sensor_name(project, "export_retry_sensor"),
        target=dg.AssetSelection.assets(*target_keys),
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description="Retries PostHog exports of failed runs when the failure is retryable "
        f"(up to {max_attempts} attempts, with backoff).",
    )
    def _retry_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        started = clock()
        cursor = RetryCursor.load(context.cursor)
        after, pending = cursor.after, cursor.pending

        if after is None:
            records_filter = dg.RunStatusChangeRecordsFilter(
                event_type=dg.DagsterEventType.RUN_FAILURE,
                after_timestamp=float(started - lookback_s),
            )
        else:
            records_filter = dg.RunStatusChangeRecordsFilter(
                event_type=dg.DagsterEventType.RUN_FAILURE, after_storage_id=int(after)
            )
        result = context.instance.fetch_run_status_changes(
            records_filter, limit=max_runs_per_tick, ascending=True
        )
        for record in result.records:
            if clock() - started > time_budget_s:
                context.log.info("Time budget used; remaining failed runs wait for the next tick")
                break
            after = record.storage_id
            plan = _plan_retry(context, record.run_id, ours, log_key, max_attempts)
            if plan is None:
                continue
            attempt, assets, tags, retry_at = plan
            delay = min(backoff_s * 2 ** (attempt - 1), backoff_max_s)
            # Never before PostHog's rate limit lets requests through again.
            due = max(record.timestamp + delay, retry_at or 0.0)
            delay = due - record.timestamp
            pending.append(
                PendingRetry(due, f"posthog-retry:{record.run_id}:{attempt}", assets, tags)
            )
            context.log.info(
                "Will retry %s from failed run %s in %.0fs (attempt %d of %d)",
                ", ".join(assets),
                record.run_id,
                delay,
                attempt,
                max_attempts,
            )

        now = clock()
        ready = [p for p in pending if p.due <= now]
        waiting = [p for p in pending if p.due > now]
        requests = [
            dg.RunRequest(
                run_key=p.run_key,
                asset_selection=[dg.AssetKey.from_user_string(a) for a in p.assets],
                tags=p.tags,
            )
            for p in ready
        ]
        new_cursor = RetryCursor(after, waiting).dump()
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=new_cursor)
        if waiting:
            soonest = min(p.due for p in waiting)
            message = f"{len(waiting)} retry(ies) waiting for backoff; next in {soonest - now:.0f}s"
        else:
            message = "No retryable PostHog export failures."
        return dg.SensorResult(skip_reason=dg.SkipReason(message), cursor=new_cursor)

    return _retry_sensor


def _plan_retry(
    context: dg.SensorEvaluationContext,
    run_id: str,
    ours: set[dg.AssetKey],
    log_key: dg.AssetKey | None,
    max_attempts: int,
) -> tuple[int, list[str], dict[str, str], float | None] | None:
    """(attempt, asset keys, tags, not-before time) for one failed run, or None (not ours/final).

    A failure that recorded ``retry_at`` (PostHog's rate limit said when) is retried then, even
    when the step itself could not wait that long.
    """
    instance = context.instance
    run = instance.get_run_by_id(run_id)
    if run is None:
        return None
    planned: set[dg.AssetKey] = set()
    done: set[dg.AssetKey] = set()
    recorded: dict[str, dict[str, Any]] = {}
    conn = instance.get_records_for_run(
        run_id,
        of_type={
            dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
            dg.DagsterEventType.ASSET_MATERIALIZATION,
            dg.DagsterEventType.STEP_FAILURE,
        },
    )
    for rec in conn.records:
        event = rec.event_log_entry.dagster_event
        if event is None:
            continue
        if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED:
            if event.asset_key in ours:
                planned.add(event.asset_key)
        elif event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
            done.add(event.asset_key)  # type: ignore[arg-type]
        else:
            data = event.step_failure_data
            user = data.user_failure_data if data else None
            entry = user.metadata.get(FAILURES_METADATA_KEY) if user else None
            for item in (entry.value if entry is not None else None) or []:
                if isinstance(item, dict) and "asset_key" in item:
                    recorded[item["asset_key"]] = item
    failed = planned - done
    if not failed:
        return None
    exports_failed = sorted(k.to_user_string() for k in failed if k != log_key)
    retry: list[str] = []
    retry_at = 0.0
    for name in exports_failed:
        info = recorded.get(name)
        if info is None or info.get("retryable", True) or info.get("retry_at"):
            retry.append(name)
            if info is not None and isinstance(info.get("retry_at"), int | float):
                retry_at = max(retry_at, float(info["retry_at"]))
        else:
            context.log.warning(
                "Not retrying %s (failed run %s): %s is not retryable: %s",
                name,
                run_id,
                info.get("kind"),
                str(info.get("message", ""))[:300],
            )
    if not retry and exports_failed:
        return None  # every export failure was final; the log catches up on its next run
    attempt = int(run.tags.get(TAG_RETRY_ATTEMPT, "0") or 0) + 1
    if attempt > max_attempts:
        context.log.warning(
            "Giving up on %s: run %s was already retry %d of %d",
            ", ".join(retry) or "the exports log",
            run_id,
            attempt - 1,
            max_attempts,
        )
        return None
    assets = list(retry)
    if log_key is not None:
        assets.append(log_key.to_user_string())
    tags = {
        TAG_RETRY_ATTEMPT: str(attempt),
        TAG_RETRY_OF: run_id,
        TAG_DEDUP_ROOT: dedup_root_from_tags(run.tags, run.root_run_id or run_id),
    }
    return attempt, assets, tags, retry_at or None

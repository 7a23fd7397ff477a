"""Sensors that keep exports fresh (expiry) and retry exports that failed for a passing reason.

Both keep a serialized cursor record, stop well inside Dagster's 60 s evaluation budget (the rest
waits for the next tick) and default to STOPPED; each pass of a tick is a function below.

``run_key`` design (a run_key deduplicates forever):

- expiry: ``expiry:<asset>:<export_id>:<attempt>``. The export id changes with every successful
  re-materialization, so a later expiry always gets a fresh key; ``attempt`` grows (from the runs
  already tagged for that export, and the cursor) when a refresh run did not produce a new export,
  so a later legitimate request is never swallowed by an old key.
- retry: ``posthog-retry:<failed run id>:<attempt>``. Each failed run is answered at most once
  (re-reading the same failure, e.g. after a cursor reset, gives the same key: no double retry),
  and every new failure is a new run id, so the key never blocks a run we want.
"""

import functools
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
from dagster_shared.record import copy, record
from dagster_shared.serdes import deserialize_value, serialize_value, whitelist_for_serdes

from posthog_assets.api.errors import (
    PostHogAuthError,
    PostHogError,
    PostHogNotFoundError,
    PostHogPermissionError,
)
from posthog_assets.common import (
    TAG_DEDUP_ROOT,
    TAG_EXPIRY_REASON,
    TAG_REFRESH_OF,
    TAG_RETRY_ATTEMPT,
    TAG_RETRY_OF,
    dedup_root_from_tags,
    file_sha256,
    parse_time,
)
from posthog_assets.config import PostHogProject
from posthog_assets.exports.records import ExportFailure, ExportMaterialization

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
_RUN_EVENTS = {
    dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
    dg.DagsterEventType.ASSET_MATERIALIZATION,
    dg.DagsterEventType.STEP_FAILURE,
}

# ---------------------------------------------------------------------- cursors


@whitelist_for_serdes(storage_name="PostHogHashedFile")
@record
class HashedFile:
    """A downloaded file's identity when it was last hashed, and whether it matched."""

    export_id: int
    size: int
    mtime_ns: int
    matches: bool


@whitelist_for_serdes(storage_name="PostHogRefreshRequested")
@record
class RefreshRequested:
    """A refresh run requested for an export: which attempt, and when (epoch seconds)."""

    export_id: int
    attempt: int
    at: float


@whitelist_for_serdes(storage_name="PostHogExpiryCursor")
@record
class ExpiryCursor:
    """Where the expiry sensor stopped, which files it already hashed, what it requested."""

    offset: int = 0
    hashed: Mapping[str, HashedFile] = {}
    requested: Mapping[str, RefreshRequested] = {}


@whitelist_for_serdes(storage_name="PostHogPendingRetry")
@record
class PendingRetry:
    """A retry run the retry sensor will request once ``due`` (epoch seconds) has passed."""

    due: float
    run_key: str
    assets: Sequence[str]
    tags: Mapping[str, str]


@whitelist_for_serdes(storage_name="PostHogRetryCursor")
@record
class RetryCursor:
    """The last failure event read, and the retries waiting for their time."""

    after: int | None = None
    pending: Sequence[PendingRetry] = ()


_Cursor = TypeVar("_Cursor", ExpiryCursor, RetryCursor)


def _read_cursor(raw: str | None, fresh: _Cursor) -> _Cursor:
    """The stored cursor, or ``fresh`` when there is none or it cannot be read (one written by an
    older version, say): a broken cursor must not stop the sensor."""
    if not raw:
        return fresh
    try:
        return deserialize_value(raw, as_type=type(fresh))
    except Exception:
        return fresh


# ---------------------------------------------------------------------- shared by both sensors


class _Budget:
    """What is left of a tick's time budget."""

    def __init__(self, clock: Callable[[], float], limit_s: float) -> None:
        self.clock, self.limit_s, self.started = clock, limit_s, clock()

    def left(self) -> float:
        return self.limit_s - (self.clock() - self.started)


def _result(
    requests: list[dg.RunRequest], cursor: ExpiryCursor | RetryCursor, skip: str
) -> dg.SensorResult:
    """The tick's run requests or, when there are none, why; the new cursor either way."""
    return dg.SensorResult(
        run_requests=requests,
        skip_reason=None if requests else skip,
        cursor=serialize_value(cursor),
    )


def _sensor_name(project: PostHogProject, what: str) -> str:
    return "_".join([*project.key_prefix, what])


def _with_log(keys: Sequence[dg.AssetKey], log_key: dg.AssetKey | None) -> list[dg.AssetKey]:
    return [*keys, *([log_key] if log_key is not None else [])]


# ---------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class ExpiryCheck:
    """Why an export needs a new materialization (None: it does not), and what to remember of
    its file's hash for the next tick (None: nothing)."""

    reason: str | None
    hashed: HashedFile | None


def check_expiry(
    export: ExportMaterialization, now: float, margin_s: float, hashed: HashedFile | None = None
) -> ExpiryCheck:
    """From the recorded ``expires_after`` and the file on disk (no HTTP); the file is hashed
    only when it changed since ``hashed``."""
    reason = _expires_reason(export.expires_after, now, margin_s)
    if reason is not None:
        return ExpiryCheck(reason, hashed)
    path = Path(export.path or "")
    if not export.path or not path.is_file():
        return ExpiryCheck(f"file {path} is missing", None)
    stat = path.stat()
    if export.bytes is not None and stat.st_size != export.bytes:
        return ExpiryCheck(f"file size {stat.st_size} differs from recorded {export.bytes}", hashed)
    seen = (export.export_id, stat.st_size, stat.st_mtime_ns)
    if hashed is None or (hashed.export_id, hashed.size, hashed.mtime_ns) != seen:
        matches = file_sha256(path) == export.sha256
        hashed = HashedFile(export_id=seen[0], size=seen[1], mtime_ns=seen[2], matches=matches)
    reason = None if hashed.matches else "file sha256 differs from the recorded download"
    return ExpiryCheck(reason, hashed)


def _expires_reason(expires_after: Any, now: float, margin_s: float) -> str | None:
    expires_at = parse_time(expires_after)
    if expires_at is None or expires_at.timestamp() - margin_s > now:
        return None
    when = expires_at.astimezone(UTC).isoformat()
    return f"expired at {when}" if expires_at.timestamp() <= now else f"expires at {when}"


def plan_refresh(
    export_id: int,
    now: float,
    requested: RefreshRequested | None,
    last_run: dg.RunRecord | None,
    launched: int,
    rerequest_after_s: float = DEFAULT_REREQUEST_AFTER_S,
) -> RefreshRequested | None:
    """The refresh to request for an export that needs one, or None: it was ``requested``
    within ``rerequest_after_s``, or the last run tagged for it is under way or just ended
    without a new export. ``launched`` runs are tagged for it already: the attempt counts on."""
    if requested is not None and now - requested.at < rerequest_after_s:
        return None
    if last_run and last_run.dagster_run.status in _ACTIVE_STATUSES:
        return None
    if last_run and last_run.end_time and now - last_run.end_time < rerequest_after_s:
        return None
    attempt = max(launched, requested.attempt if requested else 0) + 1
    return RefreshRequested(export_id=export_id, attempt=attempt, at=float(now))


@dataclass(frozen=True)
class RetryPlan:
    """One failed run's retry, to request once due (None: nothing of ours failed, every failure
    is final, or the retries are used up), what to warn about, and what to note."""

    pending: PendingRetry | None = None
    warnings: tuple[str, ...] = ()
    note: str | None = None


def plan_retry(
    run: dg.DagsterRun,
    failed: Collection[str],
    failures: Mapping[str, ExportFailure],
    failed_at: float,
    *,
    log_key: str | None = None,
    max_attempts: int = DEFAULT_RETRY_MAX_ATTEMPTS,
    backoff_s: float = DEFAULT_RETRY_BACKOFF_S,
    backoff_max_s: float = DEFAULT_RETRY_BACKOFF_MAX_S,
) -> RetryPlan:
    """The retry of ``run``'s ``failed`` assets (planned, not materialized), given what its step
    recorded about each export (``failures``, by asset key; none: a crash, retryable).

    A recorded ``retry_at`` (PostHog's rate limit said when) is honoured even when the step
    could not wait that long. Retry n waits ``backoff_s * 2**(n-1)``, at most ``backoff_max_s``,
    after ``failed_at``; the exports log (``log_key``) always comes along.
    """
    retry: list[str] = []
    warnings: list[str] = []
    for name in sorted(n for n in failed if n != log_key):
        failure = failures.get(name)
        if failure is None or failure.retryable or failure.retry_at:
            retry.append(name)
        else:
            warnings.append(
                f"Not retrying {name} (failed run {run.run_id}): {failure.kind} is not "
                f"retryable: {failure.message[:300]}"
            )
    if not failed or (warnings and not retry):
        return RetryPlan(warnings=tuple(warnings))  # the log catches up on its next run
    attempt = int(run.tags.get(TAG_RETRY_ATTEMPT, "0") or 0) + 1
    if attempt > max_attempts:
        what = ", ".join(retry) or "the exports log"
        warnings.append(
            f"Giving up on {what}: run {run.run_id} was already retry {attempt - 1} "
            f"of {max_attempts}"
        )
        return RetryPlan(warnings=tuple(warnings))
    retry_at = max((f.retry_at or 0.0 for n in retry if (f := failures.get(n))), default=0.0)
    delay = min(backoff_s * 2 ** (attempt - 1), backoff_max_s)
    pending = PendingRetry(
        due=float(max(failed_at + delay, retry_at)),
        run_key=f"posthog-retry:{run.run_id}:{attempt}",
        assets=[*retry, *([log_key] if log_key else [])],
        tags={
            TAG_RETRY_ATTEMPT: str(attempt),
            TAG_RETRY_OF: run.run_id,
            TAG_DEDUP_ROOT: dedup_root_from_tags(run.tags, run.root_run_id or run.run_id),
        },
    )
    note = (
        f"Will retry {', '.join(pending.assets)} from failed run {run.run_id} in "
        f"{pending.due - failed_at:.0f}s (attempt {attempt} of {max_attempts})"
    )
    return RetryPlan(pending, tuple(warnings), note)


# ---------------------------------------------------------------------- expiry


def build_posthog_export_expiry_sensor(
    *,
    project: PostHogProject,
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
    file is gone/changed; ``log_key`` (the DuckDB log asset) is requested along.

    The recorded ``expires_after`` and the local file are checked first (no HTTP). With
    ``check_posthog``, exports that pass are then looked up (``GET exports/:id/``, a few at a
    time, short retries): a 404 means PostHog expired or deleted it early, and a changed
    ``expires_after`` replaces the recorded one. A lookup that fails for a passing reason is
    retried next tick; a 401/403 fails the tick with the missing scope (``export:read``). A
    refresh that produced no new export is asked again after ``rerequest_after_s``.
    """
    keys = list(export_keys)
    fresh = (
        f"All {len(keys)} exports are fresh (none expires within {margin_s:g}s, PostHog still "
        "has them or could not be asked, files present and intact) or already requested."
    )

    @dg.sensor(
        name=name or _sensor_name(project, "export_expiry_sensor"),
        target=dg.AssetSelection.assets(*_with_log(keys, log_key)),
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        required_resource_keys={project.resource_key} if check_posthog else set(),
        description="Re-exports PostHog exports that are about to expire, are gone from PostHog, "
        "or whose file is missing or changed.",
    )
    def _expiry_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        budget = _Budget(clock, time_budget_s)
        cursor = _read_cursor(context.cursor, ExpiryCursor())
        seen, cursor = _check_locally(context, keys, cursor, margin_s, budget)
        if check_posthog:
            seen = _ask_posthog(context, project.resource_key, seen, margin_s, budget)
        requests, cursor = _refresh_requests(
            context, seen, cursor, log_key, max_requests_per_tick, rerequest_after_s, clock
        )
        return _result(requests, cursor, fresh)

    return _expiry_sensor


#: An export the expiry sensor saw: key, export id, why it needs a refresh (None: it does not).
_Seen = tuple[dg.AssetKey, int, str | None]


def _check_locally(
    context: dg.SensorEvaluationContext,
    keys: Sequence[dg.AssetKey],
    cursor: ExpiryCursor,
    margin_s: float,
    budget: _Budget,
) -> tuple[list[_Seen], ExpiryCursor]:
    """Pass 1, no HTTP: :func:`check_expiry` for each export, round robin from the cursor's
    offset until the budget is spent. The new cursor starts the next tick where this one stopped
    and forgets the hashes and requests of exports since removed or re-exported."""
    names = {k.to_user_string() for k in keys}
    hashed = {k: v for k, v in cursor.hashed.items() if k in names}
    requested = {k: v for k, v in cursor.requested.items() if k in names}
    offset, stopped_at = cursor.offset % max(1, len(keys)), 0
    latest = context.instance.get_latest_materialization_events(keys)
    seen: list[_Seen] = []
    for i, key in enumerate(keys[offset:] + keys[:offset]):
        if budget.left() < 0:
            context.log.info(
                "Stopping after %d of %d exports (time budget); continuing next tick", i, len(keys)
            )
            stopped_at = (offset + i) % len(keys)
            break
        export = ExportMaterialization.from_event(latest.get(key))
        if export is None:
            continue  # never exported: that is the schedule's job, not ours
        name = key.to_user_string()
        check = check_expiry(export, budget.clock(), margin_s, hashed.pop(name, None))
        if check.hashed is not None:
            hashed[name] = check.hashed
        if name in requested and requested[name].export_id != export.export_id:
            del requested[name]  # re-exported since: forget the old request
        seen.append((key, export.export_id, check.reason))
    return seen, ExpiryCursor(offset=stopped_at, hashed=hashed, requested=requested)


def _ask_posthog(
    context: dg.SensorEvaluationContext,
    resource_key: str,
    seen: list[_Seen],
    margin_s: float,
    budget: _Budget,
) -> list[_Seen]:
    """Pass 2: ``seen`` with the reasons PostHog gives for the exports that look fine here; a
    few lookups at a time, with short retries, within what is left of the budget."""
    unknown = [export_id for _, export_id, reason in seen if reason is None]
    left, now = budget.left(), budget.clock()
    if not unknown or left <= 1:
        return seen
    client = getattr(context.resources, resource_key).get_client(
        retry_budget_s=min(SENSOR_RETRY_BUDGET_S, left / 2),
        read_timeout_s=min(SENSOR_READ_TIMEOUT_S, left / 2),
    )
    remote: dict[int, str | None] = {}
    pool = ThreadPoolExecutor(max_workers=SENSOR_LOOKUP_WORKERS, thread_name_prefix="posthog")
    futures = {pool.submit(client.get_export, export_id): export_id for export_id in unknown}
    try:
        for future in as_completed(futures, timeout=left):
            export_id = futures[future]
            try:
                expires_after = future.result().get("expires_after")
                remote[export_id] = _expires_reason(expires_after, now, margin_s)
            except PostHogNotFoundError:
                remote[export_id] = f"export {export_id} is gone from PostHog (expired or deleted)"
            except (PostHogAuthError, PostHogPermissionError):
                raise  # the message names the missing scope; every lookup would fail alike
            except PostHogError as exc:
                context.log.warning(
                    "Could not look up export %s in PostHog (next tick): %s", export_id, exc
                )
    except FuturesTimeout:
        context.log.warning("PostHog lookups ran out of time; the rest are checked next tick")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return [(key, e, reason or remote.get(e)) for key, e, reason in seen]


def _refresh_requests(
    context: dg.SensorEvaluationContext,
    seen: Sequence[_Seen],
    cursor: ExpiryCursor,
    log_key: dg.AssetKey | None,
    limit: int,
    rerequest_after_s: float,
    clock: Callable[[], float],
) -> tuple[list[dg.RunRequest], ExpiryCursor]:
    """Pass 3: a run per export that needs one (at most ``limit``), as :func:`plan_refresh`
    decides from the runs already tagged for it; the cursor remembers what was requested."""
    requests: list[dg.RunRequest] = []
    requested = dict(cursor.requested)
    for key, export_id, reason in seen:
        if reason is None or len(requests) >= limit:
            continue
        name = key.to_user_string()
        refresh_of = f"{name}:{export_id}"
        runs = context.instance.get_run_records(dg.RunsFilter(tags={TAG_REFRESH_OF: refresh_of}))
        last = runs[0] if runs else None  # newest first
        ask = plan_refresh(
            export_id, clock(), requested.get(name), last, len(runs), rerequest_after_s
        )
        if ask is None:
            continue
        context.log.info("Requesting %s: %s (attempt %d)", name, reason, ask.attempt)
        requests.append(
            dg.RunRequest(
                run_key=f"expiry:{refresh_of}:{ask.attempt}",
                asset_selection=_with_log([key], log_key),
                tags={TAG_REFRESH_OF: refresh_of, TAG_EXPIRY_REASON: reason[:200]},
            )
        )
        requested[name] = ask
    return requests, copy(cursor, requested=requested)


# ---------------------------------------------------------------------- retry


def build_posthog_export_retry_sensor(
    *,
    project: PostHogProject,
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
    """Re-request export assets of failed runs whose failure is retryable, after a backoff
    (see :func:`plan_retry`); ``log_key`` (the DuckDB log asset) is requested along.

    The export step's ``dg.Failure`` lists each failed export with ``retryable``, derived from the
    typed client errors (timeouts, 5xx, 429, dropped downloads and retryable PostHog
    ``exception`` texts are; 4xx, auth and user errors are not). ``max_attempts`` caps the
    ``posthog/retry_attempt`` tag of the runs this sensor launches; the first tick (no cursor)
    looks ``lookback_s`` back.
    """
    target = _with_log([k for a in export_assets for k in a.keys], log_key)
    ours = set(target)
    plan = functools.partial(
        plan_retry,
        log_key=log_key.to_user_string() if log_key else None,
        max_attempts=max_attempts,
        backoff_s=backoff_s,
        backoff_max_s=backoff_max_s,
    )

    @dg.sensor(
        name=name or _sensor_name(project, "export_retry_sensor"),
        target=dg.AssetSelection.assets(*target),
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description="Retries PostHog exports of failed runs when the failure is retryable "
        f"(up to {max_attempts} attempts, with backoff).",
    )
    def _retry_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        budget = _Budget(clock, time_budget_s)
        cursor = _read_cursor(context.cursor, RetryCursor())
        cursor = _plan_retries(context, cursor, lookback_s, ours, plan, budget, max_runs_per_tick)
        return _request_due(cursor, clock())

    return _retry_sensor


def _plan_retries(
    context: dg.SensorEvaluationContext,
    cursor: RetryCursor,
    lookback_s: float,
    ours: Collection[dg.AssetKey],
    plan: Callable[[dg.DagsterRun, set[str], dict[str, ExportFailure], float], RetryPlan],
    budget: _Budget,
    limit: int,
) -> RetryCursor:
    """Pass 1: ``plan`` the retry of each run that failed since the cursor (on the first tick:
    within ``lookback_s``) until the budget is spent; the new cursor holds them."""
    after, pending = cursor.after, list(cursor.pending)
    changes = context.instance.fetch_run_status_changes(
        dg.RunStatusChangeRecordsFilter(
            event_type=dg.DagsterEventType.RUN_FAILURE,
            after_storage_id=after,
            after_timestamp=budget.started - lookback_s if after is None else None,
        ),
        limit=limit,
        ascending=True,
    )
    for change in changes.records:
        if budget.left() < 0:
            context.log.info("Time budget used; remaining failed runs wait for the next tick")
            break
        after = change.storage_id
        run = context.instance.get_run_by_id(change.run_id)
        if run is None:
            continue
        decided = plan(run, *_failed_assets(context.instance, run.run_id, ours), change.timestamp)
        for warning in decided.warnings:
            context.log.warning(warning)
        if decided.pending is not None:
            pending.append(decided.pending)
            context.log.info(decided.note)
    return RetryCursor(after=after, pending=pending)


def _failed_assets(
    instance: dg.DagsterInstance, run_id: str, ours: Collection[dg.AssetKey]
) -> tuple[set[str], dict[str, ExportFailure]]:
    """Our assets the run planned and did not materialize, and the export failures its steps
    recorded (by asset key)."""
    records = instance.get_records_for_run(run_id, of_type=_RUN_EVENTS).records
    events = [e for r in records if (e := r.event_log_entry.dagster_event) is not None]
    planned = {e.asset_key for e in events if e.is_asset_materialization_planned}
    done = {e.asset_key for e in events if e.is_step_materialization}
    failures = {
        f.asset_key: f
        for e in events
        if e.is_step_failure and e.step_failure_data.user_failure_data
        for f in ExportFailure.from_metadata(e.step_failure_data.user_failure_data.metadata)
    }
    return {k.to_user_string() for k in planned - done if k in ours}, failures


def _request_due(cursor: RetryCursor, now: float) -> dg.SensorResult:
    """Pass 2: request the retries that are due; the others wait in the cursor."""
    requests = [
        dg.RunRequest(
            run_key=p.run_key,
            asset_selection=[dg.AssetKey.from_user_string(a) for a in p.assets],
            tags=p.tags,
        )
        for p in cursor.pending
        if p.due <= now
    ]
    waiting = [p for p in cursor.pending if p.due > now]
    skip = "No retryable PostHog export failures."
    if waiting:
        next_in = min(p.due for p in waiting) - now
        skip = f"{len(waiting)} retry(ies) waiting for backoff; next in {next_in:.0f}s"
    return _result(requests, copy(cursor, pending=waiting), skip)

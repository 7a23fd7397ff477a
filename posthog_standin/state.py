"""Everything the stand-in mutates: config overrides, keys, exports, insight caches, async query
jobs, removed groups, faults, throttles, the request log and counters; HogQL query results,
jobs, concurrency slots and the query log; the catalog (annotations, cohorts, feature flags,
actions, experiments) the control plane soft-deletes and adds to; and (through each project's
``EventStore``) the events and persons the control plane added.

The seed is immutable; this is the only place that grows, and ``reset()`` brings all of it back to
the state right after start-up (the ids of new exports keep counting up, so a client can never
mistake an export, or a catalog object the control plane added, from an earlier test for a new
one).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from .catalog_seed import KINDS, Catalog
from .events_db import EventStore
from .faults import FaultBook, RateLimiter
from .seed import Insight, Seed

#: Freshness thresholds per interval: (default, lazy) seconds (``posthog/caching/utils.py``,
#: ``staleness_threshold_map`` and its lazy twin).
_THRESHOLDS: dict[str, tuple[float, float]] = {
    "minute": (300, 900),
    "hour": (3600, 7200),
    "day": (6 * 3600, 12 * 3600),
    "week": (86400, 86400),
    "month": (86400, 86400),
}
#: PostHog's default refresh frequency: next_allowed_client_refresh = last_refresh + this.
CLIENT_REFRESH_S = 60.0
CACHE_STATES = ("cold", "fresh", "stale", "stale_soft")
REQUEST_LOG_MAX = 20_000
QUERY_LOG_MAX = 20_000
#: ``query`` route throttles: "legacy" (HogQLQuery POSTs under ``HogQLQueryThrottle``, 120/hour;
#: polls and other kinds under the ClickHouse throttles) or "current" (every /query/ request under
#: ``APIQueriesBurstThrottle`` + ``APIQueriesSustainedThrottle``, 240/minute + 2400/hour), as
#: ``QueryViewSet.get_throttles`` chooses by team (``posthog/api/query.py``).
QUERY_THROTTLE_TIERS = ("legacy", "current")


def thresholds(interval: str) -> tuple[float, float]:
    return _THRESHOLDS.get(interval, (6 * 3600, 12 * 3600))


@dataclass
class Config:
    """Behaviour switches: ``POST /_standin/config`` overrides them, reset restores these.

    The defaults are PostHog Cloud's behaviour; the kinder variants are opt-in.
    """

    export_delay_s: float = 0.0
    export_delay_by_format: dict[str, float] = field(default_factory=dict)
    export_delay_by_target: dict[str, float] = field(default_factory=dict)
    export_post_held: bool = True
    video_delay_s: float = 2.0
    content_redirect: bool = True
    content_not_ready_status: int = 404
    presign_ttl_s: float = 3600.0
    stuck_threshold_s: float = 630.0
    stuck_threshold_video_s: float = 4530.0
    csv_rows: int | None = None
    async_delay_s: float = 0.5
    compute_delay_s: float = 0.0
    query_fail_insights: dict[int, str | None] = field(default_factory=dict)
    query_crash_insights: list[int] = field(default_factory=list)
    concurrency_limit_insights: list[int] = field(default_factory=list)
    #: Insights whose finished async job leaves the cache as it was, as when an overlapping job
    #: of the same cache key was skipped (``execute_async.py``): only ``/query/:id/``'s
    #: ``query_status.results`` holds the new result.
    uncached_job_insights: list[int] = field(default_factory=list)
    force_cache_shows_running_job: bool = False
    #: The newest serializers answer the query PostHog derives from legacy filters, and
    #: ``filters: {}``; False: an older PostHog (``query: null`` with the filters).
    insight_query_from_filters: bool = True
    #: Whether the key owner's organisation has paid tagging; without it every ``tags`` field
    #: is empty (``posthog/api/tagged_item.py``), while the ``tags`` list filter still works.
    tagging_licensed: bool = False
    stable_default_order: bool = False
    rate_limits: bool = True
    rate_limit_overrides: dict[str, str] = field(default_factory=dict)
    environments_sunset: bool = True
    crm_notebooks: bool = True
    property_values_envelope: bool = False
    #: ``/query/`` throttles. "current" is every team's but those PostHog still lists as legacy
    #: (``API_QUERIES_LEGACY_TEAM_LIST``): every /query/ request (HogQL, polls) under the
    #: API-queries throttles, 240/minute and 2,400/hour. "legacy": HogQL POSTs 120/hour.
    query_throttle_tier: str = "current"
    #: ``get_api_personal_rate_limiter`` (``posthog/clickhouse/client/limit.py``): 3 queries
    #: per organisation at once; a query waits up to 30 s for a slot, then 429.
    query_max_concurrency: int = 3
    query_slot_wait_s: float = 30.0
    #: The simulated ClickHouse execution: a query whose estimated time (rows scanned x
    #: ``query_cost_per_row_s`` + days of its timestamp range x ``query_cost_per_day_s``) is above
    #: ``query_max_execution_s`` runs that long and fails with 504 (``max_execution_time = 10``
    #: for personal-API-key queries in ``HogQLQueryRunner._calculate``).
    query_max_execution_s: float = 10.0
    query_cost_per_row_s: float = 1e-8
    query_cost_per_day_s: float = 0.0
    #: Time every computed query takes on top of DuckDB's own (holding its concurrency slot).
    query_latency_s: float = 0.05
    #: A blocking HogQL query is served from the cache while its result is younger than this
    #: (``is_stale`` with the "minute" interval: 5 minutes, ``posthog/caching/utils.py``).
    hogql_cache_stale_s: float = 300.0
    #: ``events.person_id`` as PostHog's default persons-on-events modes give it (no event
    #: dropped); false: the "disabled" mode's INNER JOIN, which drops events whose distinct id
    #: has no live person (personless events).
    persons_on_events: bool = True
    #: ``GET experiments/`` with the metric definitions (``ExperimentSerializer``, as PostHog's
    #: November 2025 schema lists it); false: the newest PostHog's ``ExperimentBasicSerializer``,
    #: whose list leaves out ``metrics``, ``metrics_secondary``, ``saved_metrics`` and
    #: ``secondary_metrics`` (``GET experiments/:id/`` still has them).
    experiments_list_metrics: bool = True

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["query_fail_insights"] = {str(k): v for k, v in self.query_fail_insights.items()}
        return data

    def apply(self, data: dict[str, Any]) -> None:
        """Validate and apply overrides; raises ``ValueError`` naming the bad field."""
        floats = ("export_delay_s", "video_delay_s", "presign_ttl_s", "stuck_threshold_s",
                  "stuck_threshold_video_s", "async_delay_s", "compute_delay_s",
                  "query_slot_wait_s", "query_max_execution_s", "query_cost_per_row_s",
                  "query_cost_per_day_s", "query_latency_s", "hogql_cache_stale_s")  # fmt: skip
        bools = ("content_redirect", "rate_limits", "environments_sunset", "export_post_held",
                 "force_cache_shows_running_job", "stable_default_order", "crm_notebooks",
                 "property_values_envelope", "insight_query_from_filters",
                 "tagging_licensed", "persons_on_events",
                 "experiments_list_metrics")  # fmt: skip
        id_lists = ("query_crash_insights", "concurrency_limit_insights", "uncached_job_insights")
        for name, value in data.items():
            if name in floats:
                setattr(self, name, _number(name, value))
            elif name in bools:
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be a boolean")
                setattr(self, name, value)
            elif name in id_lists:
                setattr(self, name, [int(v) for v in value])
            elif name == "export_delay_by_format":
                self.export_delay_by_format = {str(k): _number(name, v) for k, v in value.items()}
            elif name == "export_delay_by_target":
                targets = {str(k): _number(name, v) for k, v in value.items()}
                for target in targets:
                    kind, _, ident = target.partition(":")
                    if kind not in ("insight", "dashboard") or not ident.isdigit():
                        raise ValueError(
                            f"export_delay_by_target keys look like 'insight:<id>' or "
                            f"'dashboard:<id>', not {target!r}"
                        )
                self.export_delay_by_target = targets
            elif name == "content_not_ready_status":
                if value not in (404, 425) or isinstance(value, bool):
                    raise ValueError("content_not_ready_status must be 404 or 425")
                self.content_not_ready_status = value
            elif name == "csv_rows":
                if value is not None and (not isinstance(value, int) or value < 0):
                    raise ValueError("csv_rows must be a non-negative integer or null")
                self.csv_rows = value
            elif name == "query_fail_insights":
                if isinstance(value, dict):
                    self.query_fail_insights = {int(k): v for k, v in value.items()}
                else:
                    self.query_fail_insights = {int(v): None for v in value}
            elif name == "rate_limit_overrides":
                self.rate_limit_overrides = {str(k): str(v) for k, v in value.items()}
            elif name == "query_throttle_tier":
                if value not in QUERY_THROTTLE_TIERS:
                    raise ValueError(f"query_throttle_tier must be one of {QUERY_THROTTLE_TIERS}")
                self.query_throttle_tier = value
            elif name == "query_max_concurrency":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError("query_max_concurrency must be a positive integer")
                self.query_max_concurrency = value
            else:
                raise ValueError(f"unknown config field {name!r}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a non-negative number")
    return float(value)


@dataclass
class KeyInfo:
    """A personal API key: its scopes, the projects it may use and the user who owns it.

    ``projects`` restricts the key itself (PostHog's ``scoped_teams``); ``user_projects`` is the
    owner's membership. ``None`` means every project for either.
    """

    key: str
    scopes: tuple[str, ...]
    projects: frozenset[int] | None
    current_project: int
    user_id: int = 1
    user_projects: frozenset[int] | None = None

    def has_scope(self, scope: str) -> bool:
        if not self.scopes or "*" in self.scopes or scope in self.scopes:
            return True
        obj, _, action = scope.partition(":")
        return action == "read" and f"{obj}:write" in self.scopes


@dataclass
class ExportRecord:
    """One exported asset. Readiness is lazy: ``ready_at`` is compared with the clock on read."""

    id: int
    project_id: int
    user_id: int
    export_format: str
    dashboard: int | None
    insight: int | None
    export_context: Any
    created: float
    created_at: datetime
    expires_after: datetime
    ready_at: float | None  # None: never finishes (stays pending, later "stuck")
    filename: str = ""
    failure: str | None = None  # exception text once ready_at has passed
    csv_rows: int | None = None  # the csv_rows override in force at creation
    content_lost: bool = False
    content: bytes | None = None  # rendered bytes (all formats but CSV, which streams)
    render_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


@dataclass
class QueryJob:
    """An async insight calculation; it completes lazily when someone looks after ``end``."""

    id: str
    project_id: int
    insight_id: int
    task_id: str
    start: float
    end: float
    outcome: str  # "ok" | "error" (400 with message) | "crash" (500) | "concurrency"
    message: str | None = None
    settled: bool = False

    def complete(self, now: float) -> bool:
        return now >= self.end


class InsightCache:
    """When each insight's result was last computed (``None`` = cold).

    A blanket state (``set_all``) is stored once and applied per insight on read, so setting a
    million insights warm costs nothing.
    """

    def __init__(self) -> None:
        self.default: tuple[str, float] = ("cold", 0.0)
        self.entries: dict[int, float | None] = {}

    @staticmethod
    def last_refresh_for(state: str, insight: Insight, at: float) -> float | None:
        default_s, lazy_s = thresholds(insight.interval)
        if state == "cold":
            return None
        if state == "fresh":
            return at
        if state == "stale_soft":
            return at - default_s - 60
        return at - max(default_s, lazy_s) - 60  # stale even by the lazy thresholds

    def get(self, insight: Insight) -> float | None:
        if insight.id in self.entries:
            return self.entries[insight.id]
        state, at = self.default
        return self.last_refresh_for(state, insight, at)

    def put(self, insight: Insight, last_refresh: float | None) -> None:
        self.entries[insight.id] = last_refresh

    def set_state(self, insight: Insight, state: str, now: float) -> None:
        self.entries[insight.id] = self.last_refresh_for(state, insight, now)

    def set_all(self, state: str, now: float) -> None:
        self.entries.clear()
        self.default = (state, now)


@dataclass
class HogQLJob:
    """An async HogQL query (``refresh: async`` / ``force_async``), run by a background task."""

    id: str
    project_id: int
    query: str
    task_id: str
    start: float
    pickup: float | None = None
    end: float | None = None
    complete: bool = False
    error: bool = False
    error_message: str | None = None
    results: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


@dataclass
class HogQLCacheEntry:
    """A computed HogQL response (``is_cached``/``query_status`` are set when served)."""

    body: dict[str, Any]
    last_refresh: float


@dataclass
class Stats:
    exports_created: int = 0
    notebooks_created: int = 0
    faults_fired: int = 0
    throttled_429: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    requests_by_route: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["requests_by_route"] = dict(self.requests_by_route)
        return data


class State:
    """The mutable half of the stand-in; one instance per process, shared by both listeners."""

    def __init__(
        self,
        seed: Seed,
        *,
        key: str,
        base_config: Config,
        events: dict[int, EventStore] | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self.seed = seed
        #: The catalog as seeded (annotations, cohorts, flags, actions, experiments); ``reset``
        #: restores a copy of it, which the control plane may change.
        empty = Catalog({kind: {} for kind in KINDS}, dict.fromkeys(KINDS, 1))
        self.catalog_seed = catalog or empty
        self.default_key = key
        self.base_config = base_config
        self.storage_url = ""
        self.next_export_id = 1
        #: Each project's events and persons (project id -> store); reset empties what the
        #: control plane added.
        self.events: dict[int, EventStore] = events or {}
        self.hogql_jobs: dict[str, HogQLJob] = {}
        self.reset()

    def reset(self) -> None:
        #: Requests that began before this instant belong to an earlier test: not logged.
        self.log_since = self.now()
        self.config = copy.deepcopy(self.base_config)
        self.keys: dict[str, KeyInfo] = {
            self.default_key: KeyInfo(self.default_key, ("*",), None, self.seed.main.id)
        }
        self.exports: dict[int, ExportRecord] = {}
        self.storage_tokens: dict[str, tuple[int, float]] = {}  # token -> (export id, expiry)
        self.fail_next: tuple[int, str] = (0, "")
        self.cache = InsightCache()
        self.jobs: dict[str, QueryJob] = {}
        self.removed_groups: dict[tuple[int, int], set[int]] = {}
        #: Notebooks ``groups/find`` created: (project, type index, group key) -> short id.
        self.notebooks: dict[tuple[int, int, str], str] = {}
        self.faults = FaultBook()
        self.limiter = RateLimiter(self.config.rate_limit_overrides)
        self.log: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_MAX)
        self.stats = Stats()
        for job in getattr(self, "hogql_jobs", {}).values():
            if job.task is not None and not job.task.done():
                job.task.cancel()
        self.hogql_jobs = {}
        self.hogql_cache: dict[tuple[int, str], HogQLCacheEntry] = {}
        #: Running HogQL queries per organisation (the concurrency limiter's slots).
        self.query_slots: Counter[str] = Counter()
        self.query_log: deque[dict[str, Any]] = deque(maxlen=QUERY_LOG_MAX)
        for store in self.events.values():
            store.reset()
        previous = getattr(self, "catalog", None)
        self.catalog = self.catalog_seed.copy()
        if previous is not None:
            for kind in KINDS:
                ids = self.catalog.next_ids
                ids[kind] = max(ids[kind], previous.next_ids[kind])
        #: Counts catalog list requests: rows tied by the ordering come back in a new order each.
        self.catalog_requests = 0

    @staticmethod
    def now() -> float:
        return time.time()

    def configure(self, data: dict[str, Any]) -> None:
        """Apply a config change atomically (a bad field changes nothing)."""
        candidate = copy.deepcopy(self.config)
        fail_next = data.pop("export_fail_next", None)
        candidate.apply(data)
        if "rate_limit_overrides" in data:
            self.limiter.configure(candidate.rate_limit_overrides)
        if fail_next is not None:
            self.fail_next = (int(fail_next.get("count", 1)), str(fail_next.get("exception", "")))
        self.config = candidate

    def removed(self, project_id: int, type_index: int) -> set[int]:
        return self.removed_groups.get((project_id, type_index), set())

    def record(self, entry: dict[str, Any]) -> None:
        """Log a request, unless it began before the last reset or log clearing (a slow request
        of an earlier test that ends now)."""
        if entry.get("ts", self.log_since) >= self.log_since:
            self.log.append(entry)

"""The configuration model: a project's exports, its insights snapshot and its group snapshots,
as ``defs.yaml``, a YAML file of the same format (``POSTHOG_ASSETS_CONFIG``) or Python give them.

Validated with pydantic when definitions load, so a wrong field fails before any run starts, with
a message naming the entry and the field; the host and the project id are judged here, once,
wherever they are written. No Dagster import here (the resource, which holds the connection
settings, is Dagster's: :mod:`posthog_assets.resources`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from posthog_assets.resources import PostHogResource

ENV_HOST = "POSTHOG_HOST"
ENV_PROJECT_ID = "POSTHOG_PROJECT_ID"
ENV_API_KEY = "POSTHOG_PERSONAL_API_KEY"
ENV_CONFIG = "POSTHOG_ASSETS_CONFIG"

DEFAULT_DUCKDB_PATH = "data/posthog.duckdb"
DEFAULT_EXPORT_DIR = "data/exports"
DEFAULT_PROJECT_NAME = "default"
#: 06:00 UTC: after PostHog's nightly cache warming, before most people look at dashboards.
INSIGHTS_SCHEDULE_CRON = "0 6 * * *"
#: Groups change slowly; once a day, an hour after the insights.
GROUPS_SCHEDULE_CRON = "0 7 * * *"
#: 02:00 UTC: yesterday is over, and the lookback re-reads the days before it.
EVENTS_SCHEDULE_CRON = "0 2 * * *"
PERSONS_SCHEDULE_CRON = "0 3 * * *"
#: PostHog's ``MAX_SELECT_RETURNED_ROWS``: a larger LIMIT is silently lowered to it.
MAX_QUERY_ROWS = 50_000
#: A property promoted to its own column: ``$browser``, ``plan``, ``utm_source`` ...
_PROPERTY_RE = r"^\$?[A-Za-z_][A-Za-z0-9_]*$"

#: PostHog's ``refresh`` modes for insights (posthog/utils.py, query_runner.py) and their effect.
REFRESH_MODES: dict[str, str] = {
    "blocking": "Cached if fresh, else computed now (synchronous). Good default for snapshots.",
    "force_blocking": "Always computed now, ignoring the cache (slowest, freshest).",
    "force_cache": (
        "Cache only, never computes: PostHog's default. A cold cache gives result null."
    ),
    "async": (
        "Cached if fresh; otherwise starts a background query (query_status) that this package "
        "follows via /query/:id/ and then re-reads from cache."
    ),
    "force_async": "Always starts a background query, then follows it to completion.",
    "lazy_async": ("Like async, but only recomputes when stale by the longer 'lazy' thresholds."),
    "async_except_on_cache_miss": (
        "Only POST /query/ honours it: the insights endpoints silently treat it as force_cache, so "
        "expect null results on a cold cache (the asset warns and counts them)."
    ),
}
RefreshMode = Literal[
    "async",
    "async_except_on_cache_miss",
    "blocking",
    "force_async",
    "force_blocking",
    "force_cache",
    "lazy_async",
]
ASYNC_REFRESH_MODES = frozenset({"async", "force_async", "lazy_async"})
BLOCKING_REFRESH_MODES = frozenset({"blocking", "force_blocking"})

PNG = "image/png"
CSV = "text/csv"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
PDF = "application/pdf"
#: The formats PostHog renders for an insight or dashboard, and their file extensions.
EXPORT_FORMATS: dict[str, str] = {PNG: "png", CSV: "csv", XLSX: "xlsx"}
TABULAR_FORMATS = frozenset({CSV, XLSX})
ExportFormat = Literal[
    "image/png",
    "text/csv",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
]
PDF_REFUSED = (
    "PostHog accepts application/pdf but never renders it (its image exporter raises "
    "'Export to format application/pdf is not supported for insights' and retries it for up "
    "to 35 minutes); use image/png"
)

_NAME_RE = r"^[a-z][a-z0-9_]*$"
#: Asset names of exports may carry a PostHog short id, which is case-sensitive.
_EXPORT_NAME_RE = r"^[A-Za-z][A-Za-z0-9_]*$"


def matching(value: str, pattern: str, what: str) -> str:
    """``value`` if it matches ``pattern``, else a message saying what it must be."""
    if not re.fullmatch(pattern.strip("^$"), value):
        raise ValueError(f"must be {what}, got {value!r}")
    return value


def positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return value


def validate_cron(value: str) -> str:
    """Five cron fields, as Dagster schedules take them."""
    if len(value.split()) != 5 or not re.fullmatch(r"[\d*/,\- A-Za-z]+", value):
        raise ValueError(f"schedule must be a cron expression of five fields, got {value!r}")
    return value


# ------------------------------------------------------------------ where PostHog is


def validate_host(host: str, *, field_name: str = "host", allow_http: bool = False) -> str:
    """Require an absolute http(s) URL, and https unless the host is on this machine.

    A personal API key sent over plain http to another machine is a leaked key; ``allow_http``
    (``allow_insecure_http``) admits a self-hosted PostHog reached over a private network.
    """
    text = host.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{field_name} must be an absolute URL such as https://us.posthog.com, got {host!r}"
        )
    if "\\" in text or "@" in parts.netloc or not _round_trips(parts):
        # urlsplit and requests read such a netloc differently: the checks below would judge
        # one host while the key went to another
        shown = f"{parts.scheme}://***@{parts.hostname}" if "@" in parts.netloc else text
        raise ValueError(
            f"{field_name} must be scheme://host[:port] with no user name, password or "
            f"backslash, got {shown!r}"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{field_name} must be the bare base URL without a path, got {host!r}")
    if is_insecure(host) and not allow_http:
        raise ValueError(
            f"{field_name} must use https for a remote host ({parts.hostname}); plain http is "
            "allowed only for loopback addresses, or with allow_insecure_http: true for a "
            "self-hosted PostHog inside a private network"
        )
    return f"{parts.scheme}://{parts.netloc}"


def _round_trips(parts: SplitResult) -> bool:
    """The netloc is exactly ``host[:port]`` as parsed (no stray characters requests would see
    differently)."""
    try:
        port = parts.port
    except ValueError:
        return False
    hostname = parts.hostname or ""
    shown = f"[{hostname}]" if ":" in hostname else hostname
    return parts.netloc.lower() == (f"{shown}:{port}" if port is not None else shown)


def is_insecure(host: str) -> bool:
    """Plain http to a machine other than this one (the key would cross a network in clear)."""
    parts = urlsplit(host.strip())
    return parts.scheme == "http" and not _is_loopback(parts.hostname or "")


def _is_loopback(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def parse_project_id(value: Any, *, field_name: str = "project_id") -> int | str:
    """PostHog accepts an integer id or ``@current``; anything else is a 404 later, so fail now."""
    if isinstance(value, bool):
        raise ValueError(f"{field_name} must be an integer or '@current', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{field_name} must be a positive integer, got {value}")
        return value
    text = str(value).strip()
    if text == "@current":
        return text
    if re.fullmatch(r"\d+", text) and int(text) > 0:
        return int(text)
    raise ValueError(f"{field_name} must be an integer or '@current', got {value!r}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExportConfig(_Model):
    """One export of an insight or a dashboard; becomes one asset."""

    name: str = Field(description="Asset name (letters, digits, _).")
    insight: int | None = Field(default=None, description="Insight id to export.")
    dashboard: int | None = Field(default=None, description="Dashboard id to export.")
    format: ExportFormat = Field(description="MIME type: PNG, CSV or XLSX.")
    export_context: dict[str, Any] | None = Field(
        default=None,
        description="Sent to PostHog; its keys win over what the package builds (for a CSV/XLSX "
        "of an insight: the saved query's 'source', or a 'path' for legacy insights).",
    )
    description: str | None = None

    _name = field_validator("name")(lambda v: matching(v, _EXPORT_NAME_RE, "letters, digits, _"))
    _ids = field_validator("insight", "dashboard")(lambda v: v if v is None else positive(v))

    @field_validator("format", mode="before")
    @classmethod
    def _renderable(cls, value: Any) -> Any:
        if value == PDF:
            raise ValueError(PDF_REFUSED)
        return value

    @model_validator(mode="after")
    def _one_target(self) -> ExportConfig:
        if (self.insight is None) == (self.dashboard is None):
            raise ValueError("give exactly one of 'insight' or 'dashboard'")
        if self.dashboard is not None and self.format in TABULAR_FORMATS:
            raise ValueError(
                "PostHog exports a dashboard only as image/png; export its insights as "
                f"{EXPORT_FORMATS[self.format].upper()} instead"
            )
        return self


#: The default mode: fresh results where PostHog has them cached, a background recalculation
#: where not, followed in bulk. A blocking mode computes every stale insight of a page inside
#: one request, one after another; async costs about one request per 100 insights per round.
DEFAULT_REFRESH: RefreshMode = "async"
#: PostHog's insights endpoints silently treat this mode as ``force_cache`` (``posthog/utils.py``,
#: ``refresh_requested_by_client``); only ``POST /query/`` honours it.
ASYNC_EXCEPT_ON_CACHE_MISS = "async_except_on_cache_miss"
DEFAULT_PAGE_SIZE = 100
#: In a blocking mode PostHog computes each stale insight of a page inside the request, one after
#: another: a few per request keeps each request short.
DEFAULT_BLOCKING_PAGE_SIZE = 5


class InsightFetchOptions(_Model):
    """How the insights snapshot reads insights. The project's ``insights:`` section gives them;
    a run may override any of them (:meth:`merged`, the one merge rule)."""

    refresh: RefreshMode = Field(default=DEFAULT_REFRESH, description="PostHog refresh mode.")
    short_id: str | None = Field(default=None, description="Only the insight of this short id.")
    created_by: list[int] | None = Field(
        default=None, description="Only insights created by these user ids."
    )
    basic: bool = Field(default=False, description="Metadata only: no results are computed.")
    page_size: int | None = Field(
        default=None,
        description="Insights per list request (default: 100, or 5 in blocking modes, where "
        "PostHog computes every stale insight of a page inside the request).",
    )
    query_poll_timeout_s: float = Field(
        default=300.0, description="Give up following background queries after this long."
    )
    poll_workers: int = Field(
        default=4, description="Threads asking about stalled queries (GET /query/:id/) at once."
    )
    concurrency_limit_retries: int = Field(
        default=2,
        description="Re-read an insight refused with concurrency_limit_exceeded this many times.",
    )
    prefetch_pages: int = Field(
        default=2, description="Insight pages requested ahead of the one being staged (1: none)."
    )
    #: A unique sort field (PostHog's default order has ties, so unordered pages overlap and
    #: skip rows); "" sends none.
    order: str = Field(default="id", description="Sort field of the list ('' sends none).")

    @field_validator("page_size")
    @classmethod
    def _page_size(cls, value: int | None) -> int | None:
        if value is not None and not 0 < value <= 1000:
            raise ValueError(f"must be 1 to 1000, got {value}")
        return value

    @field_validator("query_poll_timeout_s", "poll_workers", "prefetch_pages")
    @classmethod
    def _positive(cls, value: float) -> float:
        return positive(value)

    @field_validator("concurrency_limit_retries")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"must be 0 or more, got {value}")
        return value

    def merged(self, overrides: Mapping[str, Any]) -> Self:
        """These options with every given (non-None) override, validated again."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return self.model_validate({**self.model_dump(), **given}) if given else self

    @property
    def effective_refresh(self) -> str:
        """What PostHog's insights endpoints actually do with the mode."""
        return "force_cache" if self.refresh == ASYNC_EXCEPT_ON_CACHE_MISS else self.refresh

    @property
    def recorded_refresh(self) -> str | None:
        """The ``refresh`` column: the mode, or NULL for metadata-only (basic) runs."""
        return None if self.basic else self.refresh

    @property
    def effective_page_size(self) -> int:
        if self.page_size:
            return self.page_size
        if not self.basic and self.refresh in BLOCKING_REFRESH_MODES:
            return DEFAULT_BLOCKING_PAGE_SIZE
        return DEFAULT_PAGE_SIZE

    @property
    def follows_queries(self) -> bool:
        return not self.basic and self.effective_refresh in ASYNC_REFRESH_MODES

    def filters(self) -> dict[str, Any]:
        """The list filters sent with every insights request."""
        return {
            "short_id": self.short_id,
            "created_by": self.created_by or None,
            "order": self.order,
        }


class InsightsConfig(InsightFetchOptions):
    """The project's ``insights:`` section: the snapshot's options, its schedule, on or off."""

    enabled: bool = True
    schedule: str = Field(
        default=INSIGHTS_SCHEDULE_CRON,
        description="Cron (UTC) of the daily snapshot schedule (stopped until turned on): 06:00, "
        "after PostHog's nightly cache warming, before most people look at dashboards.",
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        return validate_cron(value)


class TrackedGroup(_Model):
    group_type_index: int
    group_key: str

    @field_validator("group_type_index")
    @classmethod
    def _index(cls, value: int) -> int:
        if not 0 <= value <= 4:
            raise ValueError(f"must be 0 to 4 (PostHog has at most five group types), got {value}")
        return value

    @field_validator("group_key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value


class GroupsConfig(_Model):
    """Which group data to snapshot."""

    enabled: bool = True
    property_values: bool = True
    tracked: list[TrackedGroup] = Field(default_factory=list)
    schedule: str = Field(
        default=GROUPS_SCHEDULE_CRON,
        description="Cron (UTC) of the daily groups snapshot schedule (stopped until turned on).",
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        return validate_cron(value)


def query_page_size(value: int) -> int:
    """Rows per HogQL query: PostHog silently lowers a larger LIMIT, which would end paging."""
    if not 0 < value <= MAX_QUERY_ROWS:
        raise ValueError(
            f"must be 1 to {MAX_QUERY_ROWS} (PostHog silently returns at most {MAX_QUERY_ROWS} "
            f"rows per query), got {value}"
        )
    return value


class EventsConfig(_Model):
    """The ``posthog/events`` asset: one partition per UTC day of the events' ``timestamp``."""

    start_date: str = Field(
        description="The first day (UTC, YYYY-MM-DD) to read: the first partition."
    )
    event_names: list[str] = Field(
        default_factory=list, description="Only these events (default: every event)."
    )
    properties: list[str] = Field(
        default_factory=list,
        description="Event properties promoted to their own VARCHAR column, named prop_<name> "
        "($browser -> prop_browser); every property stays in the properties JSON.",
    )
    lookback_days: int = Field(
        default=3,
        description="The schedule re-reads the last N whole days (late events land in them).",
    )
    page_size: int = Field(
        default=MAX_QUERY_ROWS, description="Rows per query (PostHog returns at most 50,000)."
    )
    min_window_s: float = Field(
        default=60.0,
        description="A page that hits PostHog's execution time limit is asked again over half "
        "its time range, down to this many seconds; then asynchronously.",
    )
    schedule: str = Field(
        default=EVENTS_SCHEDULE_CRON,
        description="Cron (UTC) of the lookback schedule (stopped until turned on).",
    )

    _cron = field_validator("schedule")(lambda v: validate_cron(v))

    @field_validator("start_date", mode="before")
    @classmethod
    def _date(cls, value: Any) -> str:
        try:
            return dt.date.fromisoformat(str(value)).isoformat()
        except ValueError:
            raise ValueError(f"must be a date as YYYY-MM-DD, got {value!r}") from None

    _page_size = field_validator("page_size")(lambda v: query_page_size(v))

    @field_validator("lookback_days")
    @classmethod
    def _lookback(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be 1 or more, got {value}")
        return value

    @field_validator("min_window_s")
    @classmethod
    def _window(cls, value: float) -> float:
        return positive(value)

    @field_validator("event_names")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        if any(not name for name in value):
            raise ValueError("event names must not be empty")
        return value

    @field_validator("properties")
    @classmethod
    def _properties(cls, value: list[str]) -> list[str]:
        columns: dict[str, str] = {}
        for name in value:
            matching(
                name, _PROPERTY_RE, "a property name of letters, digits and _ (may start with $)"
            )
            column = property_column(name)
            if column in columns:
                raise ValueError(f"{columns[column]!r} and {name!r} would both be {column}")
            columns[column] = name
        return value


def property_column(name: str) -> str:
    """The column a promoted event property gets: ``$browser`` -> ``prop_browser``."""
    return "prop_" + name.lstrip("$").lower()


class PersonsConfig(_Model):
    """The ``posthog/persons`` and ``posthog/person_distinct_ids`` snapshot."""

    enabled: bool = True
    page_size: int = Field(
        default=MAX_QUERY_ROWS, description="Rows per query (PostHog returns at most 50,000)."
    )
    schedule: str = Field(
        default=PERSONS_SCHEDULE_CRON,
        description="Cron (UTC) of the daily persons snapshot schedule (stopped until turned on).",
    )

    _cron = field_validator("schedule")(lambda v: validate_cron(v))
    _page_size = field_validator("page_size")(lambda v: query_page_size(v))


#: The project's other objects, each a daily snapshot table (``catalog:``); ``all`` is every one
#: but the experiments' results, which spend the key's query budget.
CATALOG_TABLES = (
    "annotations", "cohorts", "feature_flags", "actions", "dashboards", "experiments",
    "experiment_results",
)  # fmt: skip
CATALOG_SCHEDULE_CRON = "0 4 * * *"


def catalog_names(value: Any) -> tuple[str, ...]:
    """``all`` or a list of :data:`CATALOG_TABLES` names, in that order, each once."""
    if value is None:
        return ()
    if value == "all":
        return CATALOG_TABLES[:-1]
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"catalog must be 'all' or a list of {', '.join(CATALOG_TABLES)}")
    unknown = sorted(set(value) - set(CATALOG_TABLES))
    if unknown:
        raise ValueError(
            f"catalog: unknown table(s) {', '.join(unknown)}; known: {', '.join(CATALOG_TABLES)}"
        )
    return tuple(n for n in CATALOG_TABLES if n in value)


@dataclass(frozen=True)
class PostHogProject:
    """One PostHog project as the definitions are built from it: its name, its resource, what it
    exports and snapshots, and where the DuckDB tables live.

    The project named ``default`` keeps the unprefixed names (asset keys ``posthog/...``, resource
    ``posthog``); any other gets ``posthog/<name>/...`` and ``posthog_<name>``, so a second project
    added later never renames the first.
    """

    resource: PostHogResource
    name: str = DEFAULT_PROJECT_NAME
    exports: tuple[ExportConfig, ...] = ()
    insights: InsightsConfig = field(default_factory=lambda: InsightsConfig())
    groups: GroupsConfig = field(default_factory=lambda: GroupsConfig())
    duckdb_path: str = DEFAULT_DUCKDB_PATH
    #: Off unless given: events and persons spend the key's query budget.
    events: EventsConfig | None = None
    persons: PersonsConfig | None = None
    #: Daily snapshots of the project's other objects (:data:`CATALOG_TABLES`).
    catalog: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        matching(self.name, _NAME_RE, "lower_snake_case")
        names = [e.name for e in self.exports]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"project '{self.name}': two exports named {', '.join(dupes)}")

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_PROJECT_NAME

    @property
    def resource_key(self) -> str:
        return "posthog" if self.is_default else f"posthog_{self.name}"

    @property
    def project_id(self) -> str | None:
        """The project id as written (None when it is read from the environment at run time)."""
        value = self.resource.project_id
        return value if type(value) is str else None

    @property
    def key_prefix(self) -> tuple[str, ...]:
        return ("posthog",) if self.is_default else ("posthog", self.name)


def error_lines(data: Any, err: ValidationError, prefix: tuple[Any, ...] = ()) -> list[str]:
    """One line per problem: where (entry and field, as the user wrote them) and why. Values are
    never echoed (a mistyped field may hold a secret)."""
    lines = []
    for e in err.errors():
        where = _describe_loc(data, [*prefix, *e["loc"]])
        message = str(e["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if e["type"] == "extra_forbidden":
            message = "not a known field (a typo?)"
        lines.append(f"{where}: {message}")
    return lines


def _describe_loc(data: Any, loc: list[Any]) -> str:
    """Turn ('exports', 1, 'export_format') into "exports[1] (name 'x'), field 'export_format'"."""
    parts: list[str] = []
    node = data
    fields: list[str] = []
    for item in loc:
        if isinstance(item, int):
            name = (
                node[item].get("name")
                if isinstance(node, list) and isinstance(node[item], dict)
                else None
            )
            parts[-1] = f"{parts[-1]}[{item}]" + (f" (name '{name}')" if name else "")
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            if isinstance(node, dict) and item in node and isinstance(node[item], list | dict):
                parts.append(str(item))
                node = node[item]
            else:
                fields.append(str(item))
                node = node.get(item) if isinstance(node, dict) else None
    where = ".".join(parts) if parts else "top level"
    if fields:
        where += f", field '{'.'.join(fields)}'"
    return where

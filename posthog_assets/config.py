"""The YAML configuration (``posthog_assets.yaml``) and the environment contract.

Everything here is validated with pydantic when definitions load, so a wrong field fails before any
run starts, with a message naming the file, the entry and the field. No Dagster import here.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

ENV_HOST = "POSTHOG_HOST"
ENV_PROJECT_ID = "POSTHOG_PROJECT_ID"
ENV_API_KEY = "POSTHOG_PERSONAL_API_KEY"
ENV_CONFIG = "POSTHOG_ASSETS_CONFIG"
ENV_DUCKDB = "POSTHOG_ASSETS_DUCKDB"
ENV_EXPORT_DIR = "POSTHOG_ASSETS_EXPORT_DIR"

DEFAULT_CONFIG_PATH = "posthog_assets.yaml"
DEFAULT_DUCKDB_PATH = "data/posthog.duckdb"
DEFAULT_EXPORT_DIR = "data/exports"
DEFAULT_PROJECT_NAME = "default"
#: 06:00 UTC: after PostHog's nightly cache warming, before most people look at dashboards.
INSIGHTS_SCHEDULE_CRON = "0 6 * * *"
#: Groups change slowly; once a day, an hour after the insights.
GROUPS_SCHEDULE_CRON = "0 7 * * *"

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
ApiPrefixName = Literal["projects", "environments"]


class ConfigError(ValueError):
    """The configuration is wrong; the message names the file, the entry and the field."""


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
    export_format: ExportFormat = Field(description="MIME type: PNG, CSV or XLSX.")
    export_context: dict[str, Any] | None = Field(
        default=None,
        description="Sent to PostHog; its keys win over what the package builds (for a CSV/XLSX "
        "of an insight: the saved query's 'source', or a 'path' for legacy insights).",
    )
    description: str | None = None

    _name = field_validator("name")(lambda v: matching(v, _EXPORT_NAME_RE, "letters, digits, _"))
    _ids = field_validator("insight", "dashboard")(lambda v: v if v is None else positive(v))

    @field_validator("export_format", mode="before")
    @classmethod
    def _renderable(cls, value: Any) -> Any:
        if value == PDF:
            raise ValueError(PDF_REFUSED)
        return value

    @model_validator(mode="after")
    def _one_target(self) -> ExportConfig:
        if (self.insight is None) == (self.dashboard is None):
            raise ValueError("give exactly one of 'insight' or 'dashboard'")
        if self.dashboard is not None and self.export_format in TABULAR_FORMATS:
            raise ValueError(
                "PostHog exports a dashboard only as image/png; export its insights as "
                f"{EXPORT_FORMATS[self.export_format].upper()} instead"
            )
        return self


#: The default mode: fresh results where PostHog has them cached, a background recalculation
#: where not, followed in bulk. A blocking mode computes every stale insight of a page inside
#: one request, one after another; async costs about one request per 100 insights per round.
DEFAULT_REFRESH: RefreshMode = "async"


class InsightsConfig(_Model):
    """How insight snapshots are taken."""

    enabled: bool = True
    refresh: RefreshMode = Field(default=DEFAULT_REFRESH, description="PostHog refresh mode.")
    short_id: str | None = None
    created_by: list[int] | None = None
    basic: bool = False
    page_size: int | None = Field(
        default=None,
        description="Insights per list request (default: 100, or 5 in blocking modes, where "
        "PostHog computes every stale insight of a page inside the request).",
    )
    query_poll_timeout_s: float = 300.0
    schedule: str = Field(
        default=INSIGHTS_SCHEDULE_CRON,
        description="Cron (UTC) of the daily snapshot schedule (stopped until turned on): 06:00, "
        "after PostHog's nightly cache warming, before most people look at dashboards.",
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        return validate_cron(value)

    @field_validator("page_size")
    @classmethod
    def _page_size(cls, value: int | None) -> int | None:
        if value is not None and not 0 < value <= 1000:
            raise ValueError(f"must be 1 to 1000, got {value}")
        return value

    _timeout = field_validator("query_poll_timeout_s")(lambda v: positive(v))


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


class ProjectConfig(_Model):
    """One PostHog project (e.g. production, staging): one resource and one asset-key prefix.

    The project named ``default`` keeps the unprefixed names (asset keys ``posthog/...``,
    resource ``posthog``); any other gets ``posthog/<name>/...`` and ``posthog_<name>``. So a
    second project added later never renames the first. Host, project id and key come from the
    environment when the run starts (``POSTHOG_HOST``, ``POSTHOG_PROJECT_ID``, ``api_key_env``)
    unless given here.
    """

    name: str = DEFAULT_PROJECT_NAME
    #: Before ``host``, whose check reads it.
    allow_insecure_http: bool = False
    host: str | None = None
    project_id: int | str | None = None
    api_key_env: str = ENV_API_KEY
    #: The variables read for the host and project id when they are left out (``{{ env.X }}``
    #: in a component names another one).
    host_env: str = ENV_HOST
    project_id_env: str = ENV_PROJECT_ID
    api_prefix: ApiPrefixName = "projects"
    exports: list[ExportConfig] = Field(default_factory=list)
    #: When a project of ``projects:`` leaves these out, the file's top-level sections apply.
    insights: InsightsConfig = Field(default_factory=InsightsConfig)
    groups: GroupsConfig = Field(default_factory=GroupsConfig)

    _name = field_validator("name")(lambda v: matching(v, _NAME_RE, "lower_snake_case"))
    _env = field_validator("api_key_env", "host_env", "project_id_env")(
        lambda v: matching(v, r"^[A-Za-z_][A-Za-z0-9_]*$", "an environment variable name")
    )

    @field_validator("project_id", mode="before")
    @classmethod
    def _check_project_id(cls, value: Any) -> int | str | None:
        return None if value is None else parse_project_id(value)

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str | None, info: ValidationInfo) -> str | None:
        allow_http = bool(info.data.get("allow_insecure_http"))
        return None if value is None else validate_host(value, allow_http=allow_http)

    @model_validator(mode="after")
    def _unique_exports(self) -> ProjectConfig:
        _require_unique([e.name for e in self.exports], f"project '{self.name}' exports")
        return self

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_PROJECT_NAME

    @property
    def resource_key(self) -> str:
        return "posthog" if self.is_default else f"posthog_{self.name}"

    @property
    def key_prefix(self) -> tuple[str, ...]:
        return ("posthog",) if self.is_default else ("posthog", self.name)


class PostHogAssetsConfig(_Model):
    """The whole file."""

    projects: list[ProjectConfig] | None = None
    exports: list[ExportConfig] = Field(default_factory=list)
    insights: InsightsConfig = Field(default_factory=InsightsConfig)
    groups: GroupsConfig = Field(default_factory=GroupsConfig)

    @model_validator(mode="after")
    def _unique_names(self) -> PostHogAssetsConfig:
        if self.projects is not None:
            if self.exports:
                raise ValueError(
                    "with 'projects:' set, list exports under each project ('projects[i].exports')"
                )
            _require_unique([p.name for p in self.projects], "projects")
            for p in self.projects:
                missing = [f for f in ("host", "project_id") if getattr(p, f) is None]
                if missing and not p.is_default:
                    raise ValueError(f"project '{p.name}' needs {' and '.join(missing)}")
        _require_unique([e.name for e in self.exports], "exports")
        return self


def _require_unique(names: list[str], where: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate name(s) in {where}: {', '.join(dupes)}")


@dataclass(frozen=True)
class Settings:
    """The resolved configuration: projects plus where data lands."""

    config_path: Path
    projects: tuple[ProjectConfig, ...]
    duckdb_path: Path
    export_dir: Path
    raw: PostHogAssetsConfig = field(repr=False)


def _format_error(path: Path, data: Any, err: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    lines += [f"  - {line}" for line in error_lines(data, err)]
    return "\n".join(lines)


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


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read and validate the YAML config and the env vars. No network access."""
    env = os.environ if env is None else env
    config_path = Path(path or env.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH)
    if config_path.exists():
        try:
            data = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_path}: not valid YAML: {exc}") from None
    elif path is not None or env.get(ENV_CONFIG):
        raise ConfigError(f"{config_path}: configuration file not found ({ENV_CONFIG})")
    else:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path}: the top level must be a mapping of sections")
    try:
        raw = PostHogAssetsConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(config_path, data, err)) from None

    env_host = env.get(ENV_HOST)
    env_pid = env.get(ENV_PROJECT_ID)
    try:  # checked now, read again when a run starts (the env of the process that runs)
        if env_host:
            validate_host(env_host, field_name=ENV_HOST)
        if env_pid:
            parse_project_id(env_pid, field_name=ENV_PROJECT_ID)
    except ValueError as exc:
        raise ConfigError(f"environment: {exc}") from None

    if raw.projects is None:
        projects: tuple[ProjectConfig, ...] = (
            ProjectConfig(exports=raw.exports, insights=raw.insights, groups=raw.groups),
        )
    else:
        projects = tuple(
            p.model_copy(
                update={
                    name: getattr(raw, name)
                    for name in ("insights", "groups")
                    if name not in p.model_fields_set
                }
            )
            for p in raw.projects
        )
    return Settings(
        config_path=config_path,
        projects=projects,
        duckdb_path=Path(env.get(ENV_DUCKDB) or DEFAULT_DUCKDB_PATH),
        export_dir=Path(env.get(ENV_EXPORT_DIR) or DEFAULT_EXPORT_DIR),
        raw=raw,
    )

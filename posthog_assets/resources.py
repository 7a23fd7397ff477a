"""``PostHogResource``: one PostHog project's credentials and settings, handing out one client.

Config is checked when a run starts (``setup_for_execution``), before any HTTP call, so a bad host,
project id or missing key fails the launch with a message that names the field.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
from dagster._utils.cached_method import cached_method
from dagster_duckdb import DuckDBResource
from pydantic import Field, PrivateAttr

from posthog_assets.api.client import PostHogClient, RetrySettings
from posthog_assets.api.polling import (
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_POLL_MAX_INTERVAL_S,
    DEFAULT_POLL_TIMEOUT_S,
    PollPolicy,
)
from posthog_assets.api.private_files import open_private, private_dir
from posthog_assets.api.ratelimit import (
    DEFAULT,
    ENV_RATE_LIMIT_URL,
    INSIGHTS,
    POSTHOG_CLOUD_LIMITS,
    QUERY,
    GateState,
    RedisState,
    default_state_dir,
    parse_rate,
    shared_state_path,
    validate_redis_url,
)
from posthog_assets.config import (
    DEFAULT_EXPORT_DIR,
    ENV_API_KEY,
    is_insecure,
    parse_project_id,
    validate_host,
)

#: The Dagster config-schema flag that masks a field in the UI (no public API for it yet).
SECRET_FIELD = {"dagster__is_secret": True}
#: What the UI shows (and the launchpad sends back) in place of a secret field's value.
UI_SECRET_MASK = "********"
#: How errors name the shared gate's Redis setting (the field, and the env var behind it).
RATE_LIMIT_URL_SETTING = f"rate_limit_url or ${ENV_RATE_LIMIT_URL}"


class PostHogResource(dg.ConfigurableResource):
    """Credentials and HTTP settings for one PostHog project."""

    host: str = Field(
        description="PostHog base URL, e.g. https://us.posthog.com. Pinned by the definitions: "
        "a launch that sends the key elsewhere is refused."
    )
    project_id: str = Field(description="Numeric project id (or '@current').")
    personal_api_key: str = Field(
        description="Personal API key (phx_...); set it from an env var with dg.EnvVar: a literal "
        "value is stored in clear in run storage (the job snapshot). The launchpad's mask "
        "('********') stands for the definitions' value.",
        json_schema_extra=SECRET_FIELD,
        repr=False,
    )
    api_prefix: str = Field(
        default="projects",
        description="'projects' (/api/projects/:id/) or 'environments' (/api/environments/:id/, "
        "the older alias PostHog has deprecated).",
    )
    allow_insecure_http: bool = Field(
        default=False,
        description="Allow plain http to a host that is not this machine (a self-hosted PostHog "
        "inside a private network): the key crosses the network unencrypted. Warned once a run.",
    )
    export_dir: str = Field(
        default=DEFAULT_EXPORT_DIR, description="Folder that export files are written to."
    )
    connect_timeout_s: float = Field(default=10.0, description="TCP connect timeout.")
    read_timeout_s: float = Field(default=60.0, description="Timeout waiting for a response.")
    export_post_timeout_s: float = Field(
        default=60.0,
        description="Timeout waiting for the answer to POST /exports/, which PostHog holds open "
        "until rendering ends. After it, the export is followed in the list (never re-created).",
    )
    max_attempts: int = Field(default=6, description="Attempts per request (429/5xx/resets).")
    backoff_initial_s: float = Field(default=0.5, description="First retry backoff.")
    backoff_max_s: float = Field(default=30.0, description="Largest retry backoff.")
    retry_budget_s: float = Field(default=180.0, description="Total time to keep retrying.")
    pace_requests: bool = Field(
        default=True,
        description="Hold requests back so the key stays under PostHog's throttles "
        "(insight_rate_limits, query_rate_limits, default_rate_limits); off: pause only when "
        "PostHog answers 429.",
    )
    insight_rate_limits: list[str] = Field(
        default=[str(w) for w in POSTHOG_CLOUD_LIMITS[INSIGHTS]],
        description="PostHog's throttles of the insight and query routes per key (Cloud: "
        "240/minute, 1200/hour).",
    )
    query_rate_limits: list[str] = Field(
        default=[str(w) for w in POSTHOG_CLOUD_LIMITS[QUERY]],
        description="PostHog's throttles of /query/ (HogQL, query status) per key: 240/minute, "
        "2400/hour on PostHog's current tier; a team on the legacy tier has 120/hour.",
    )
    max_concurrent_queries: int = Field(
        default=3,
        description="HogQL queries in flight at once per client: PostHog runs 3 per "
        "organisation and queues the rest for up to 30 s, then answers 429.",
    )
    default_rate_limits: list[str] = Field(
        default=[str(w) for w in POSTHOG_CLOUD_LIMITS[DEFAULT]],
        description="PostHog's throttles of every other route per key (Cloud: 480/minute, "
        "4800/hour).",
    )
    shared_rate_limit: bool = Field(
        default=True,
        description="Share the request log and Retry-After pauses with every process on this "
        "machine that uses the same key and host (the steps of a multiprocess run, concurrent "
        "runs), through a hashed state file in $POSTHOG_ASSETS_RATE_LIMIT_DIR or a per-user "
        "folder, or across hosts through Redis (rate_limit_url). Off: each step process paces "
        "on its own.",
    )
    rate_limit_url: str | None = Field(
        default=None,
        description="Redis that shares the request log and Retry-After pauses across hosts, "
        "e.g. redis://host:6379/0 (also rediss://, unix://): every worker using the same key "
        "and host, on any machine, spends one budget. Unset: $POSTHOG_ASSETS_RATE_LIMIT_URL, "
        "read when the client is built (each worker's env decides); neither: the per-machine "
        "state file. Used only with shared_rate_limit. Secret (it may hold a password): set it "
        "with dg.EnvVar or the env var, not as a literal.",
        json_schema_extra=SECRET_FIELD,
        repr=False,
    )
    poll_interval_s: float = Field(
        default=DEFAULT_POLL_INTERVAL_S, description="First wait between export/query polls."
    )
    poll_max_interval_s: float = Field(
        default=DEFAULT_POLL_MAX_INTERVAL_S, description="Longest wait between polls."
    )
    poll_timeout_s: float = Field(
        default=DEFAULT_POLL_TIMEOUT_S, description="Give up polling after this many seconds."
    )

    _run_id: str | None = PrivateAttr(default=None)
    #: The key as the definitions give it (what the launchpad's mask stands for).
    _defined_key: str | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        defined = _as_defined(context)
        if defined is not None:
            self._defined_key = resolved_value(defined.personal_api_key)
            _check_pinned_host(self.host, defined.host)
            _warn_if_literal("personal_api_key", defined.personal_api_key, context)
            url = defined.rate_limit_url
            if url and ("@" in url or "password=" in url):  # a Redis password written out
                _warn_if_literal("rate_limit_url", url, context)
        self.validate_settings()
        self._run_id = context.run.run_id if context.run is not None else None
        if is_insecure(self.host) and self._first_in_run("insecure-http"):
            (context.log or logging.getLogger(__name__)).warning(
                "allow_insecure_http: the PostHog key is sent over plain http to %s; use https "
                "unless this network is private.",
                self.host,
            )

    def _run_marker(self, topic: str) -> Path | None:
        """A file whose creation claims this run's one message about ``topic`` (steps of a run
        are separate processes), in a folder only this user can write; None without a run or
        when that folder is unsafe (then every step says it: noisy, never redirected)."""
        if not self._run_id:
            return None
        digest = hashlib.sha256(f"{self._run_id}\n{self.host}".encode()).hexdigest()[:24]
        try:
            folder = private_dir(private_dir(default_state_dir()) / "warned")
        except OSError as exc:
            logging.getLogger(__name__).warning("not marking run messages: %s", exc)
            return None
        return folder / f"{topic}-{digest}"

    def _first_in_run(self, topic: str) -> bool:
        marker = self._run_marker(topic)
        if marker is None:
            return True
        try:  # O_EXCL: an existing name, symlink or not, means the message was claimed
            os.close(open_private(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        except OSError:
            return True
        return True

    def __init__(self, **fields: Any) -> None:
        """Settings written in defs.yaml or code are checked where they are written; a value
        from the environment when a run starts (:meth:`validate_settings`)."""
        super().__init__(**fields)
        self._check_settings(skip_env=True)

    def validate_settings(self) -> None:
        """Fail with the field's name before any request is sent."""
        self._check_settings(skip_env=False)
        if not self.api_key.strip():
            raise ValueError(
                "personal_api_key is empty: set the environment variable that holds the key "
                f"(e.g. {ENV_API_KEY})"
            )

    def _check_settings(self, *, skip_env: bool) -> None:
        def given(value: Any) -> bool:
            return not (skip_env and isinstance(value, dg.EnvVar))

        try:
            if given(self.host):
                validate_host(self.host, allow_http=self.allow_insecure_http)
            if given(self.project_id):
                parse_project_id(self.project_id)
        except ValueError as exc:
            field = "host" if str(exc).startswith("host") else "project_id"
            variable = _variable_holding(getattr(self, field))
            raise ValueError(f"{exc} (read from {variable})" if variable else str(exc)) from None
        if given(self.api_prefix) and self.api_prefix not in ("environments", "projects"):
            raise ValueError(
                f"api_prefix must be 'environments' or 'projects', got {self.api_prefix!r}"
            )
        numbers = {
            "connect_timeout_s": self.connect_timeout_s,
            "read_timeout_s": self.read_timeout_s,
            "export_post_timeout_s": self.export_post_timeout_s,
            "poll_interval_s": self.poll_interval_s,
            "poll_max_interval_s": self.poll_max_interval_s,
            "poll_timeout_s": self.poll_timeout_s,
            "retry_budget_s": self.retry_budget_s,
        }
        for name, value in numbers.items():
            if value <= 0:
                raise ValueError(f"{name} must be greater than 0, got {value}")
        for name, count in (
            ("max_attempts", self.max_attempts),
            ("max_concurrent_queries", self.max_concurrent_queries),
        ):
            if count < 1:
                raise ValueError(f"{name} must be at least 1, got {count}")
        self.rate_limits()
        url = self.rate_limit_url if skip_env else self.resolved_rate_limit_url()
        if url and given(url) and url != UI_SECRET_MASK:
            validate_redis_url(url, RATE_LIMIT_URL_SETTING)

    def resolved_rate_limit_url(self) -> str | None:
        """The field, else ``$POSTHOG_ASSETS_RATE_LIMIT_URL`` (read now: each worker's env
        decides); the UI's mask stands for "unchanged", i.e. the env var."""
        url = (self.rate_limit_url or "").strip()
        if not url or url == UI_SECRET_MASK:
            url = os.environ.get(ENV_RATE_LIMIT_URL, "").strip()
        return url or None

    def rate_limit_state(self, host: str, key: str) -> Path | GateState | None:
        """Where the gate lives: Redis when a URL is set, else the machine's file; None when
        sharing is off (each client paces on its own)."""
        if not self.shared_rate_limit:
            return None
        url = self.resolved_rate_limit_url()
        if url is None:
            return shared_state_path(host, key)
        return RedisState(url, host, key, setting=RATE_LIMIT_URL_SETTING)

    def rate_limits(self) -> dict[str, tuple[Any, ...]] | None:
        """The throttles to stay under, parsed; None when pacing is off."""
        parsed = {}
        for name, klass, texts in (
            ("insight_rate_limits", INSIGHTS, self.insight_rate_limits),
            ("query_rate_limits", QUERY, self.query_rate_limits),
            ("default_rate_limits", DEFAULT, self.default_rate_limits),
        ):
            try:
                parsed[klass] = tuple(parse_rate(t) for t in texts)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return parsed if self.pace_requests else None

    @property
    def api_key(self) -> str:
        """The key; the UI's mask stands for "unchanged", i.e. the definitions' key (never an
        environment variable a launch could name)."""
        if self.personal_api_key == UI_SECRET_MASK:
            return self._defined_key or ""
        return self.personal_api_key or ""

    @cached_method
    def get_client(
        self,
        log: logging.Logger | None = None,
        *,
        retry_budget_s: float | None = None,
        read_timeout_s: float | None = None,
    ) -> PostHogClient:
        """One client (one HTTP session, one rate-limit gate) per run, shared by all threads.

        ``retry_budget_s``/``read_timeout_s`` tighten the configured values for callers with a
        deadline of their own (a sensor tick must end within Dagster's 60 s).
        """
        self.validate_settings()
        host = validate_host(self.host, allow_http=self.allow_insecure_http)
        key = self.api_key.strip()
        budget = self.retry_budget_s if retry_budget_s is None else retry_budget_s
        read_timeout = self.read_timeout_s if read_timeout_s is None else read_timeout_s
        # one deprecation warning per run, whichever step sees it first
        marker = self._run_marker("deprecation")
        return PostHogClient(
            host,
            parse_project_id(self.project_id),
            key,
            api_prefix=self.api_prefix,  # type: ignore[arg-type]
            connect_timeout_s=min(self.connect_timeout_s, read_timeout),
            read_timeout_s=min(self.read_timeout_s, read_timeout),
            post_timeout_s=min(self.export_post_timeout_s, read_timeout_s or math.inf),
            retry=RetrySettings(
                max_attempts=self.max_attempts,
                backoff_initial_s=self.backoff_initial_s,
                backoff_max_s=min(self.backoff_max_s, budget),
                total_budget_s=min(self.retry_budget_s, budget),
            ),
            rate_limits=self.rate_limits(),
            rate_limit_state=self.rate_limit_state(host, key),
            max_concurrent_queries=self.max_concurrent_queries,
            deprecation_marker=marker,
            log=log,
        )

    @property
    def stored_project_id(self) -> str:
        """The project id as every DuckDB table stores it: text, normalised."""
        return str(parse_project_id(self.project_id))

    def poll_policy(self, timeout_s: float | None = None) -> PollPolicy:
        """How to poll PostHog (exports, async calculations); ``timeout_s`` overrides the total."""
        return PollPolicy(
            interval_s=self.poll_interval_s,
            max_interval_s=self.poll_max_interval_s,
            timeout_s=timeout_s or self.poll_timeout_s,
        )

    @property
    def export_path(self) -> Path:
        return Path(self.export_dir)


def _as_defined(context: dg.InitResourceContext) -> PostHogResource | None:
    """This resource as the definitions built it, before run config: Dagster initialises each
    run's copy from the definitions' object (``resource_fn`` is its bound method)."""
    try:
        resource_def = context.resource_def
    except dg.DagsterInvariantViolationError:  # initialised outside a run (the state refresh)
        return None
    defined = getattr(getattr(resource_def, "resource_fn", None), "__self__", None)
    return defined if isinstance(defined, PostHogResource) else None


def _variable_holding(value: Any) -> str | None:
    """The environment variable holding exactly ``value``: Dagster builds a run's resource from
    the variables' values, and the person fixes the variable, not the definitions."""
    found = sorted(k for k, v in os.environ.items() if isinstance(value, str) and v == value)
    return f"the environment variable {found[0]}" if found else None


def resolved_value(value: str | None) -> str | None:
    """A field's value as the definitions give it: an ``EnvVar`` is read here and now."""
    if isinstance(value, dg.EnvVar):
        return os.environ.get(value.env_var_name) or None
    return value


def _check_pinned_host(host: str, defined: str) -> None:
    """Refuse a run whose config sends the key to another host than the definitions name: run
    config comes from whoever can launch (the launchpad, a GraphQL call), the key does not."""
    pinned = resolved_value(defined)
    source = (
        f"the environment variable {defined.env_var_name}"
        if isinstance(defined, dg.EnvVar)
        else "the definitions"
    )
    if not pinned:
        raise ValueError(
            f"host: {source} is not set where this run executes, and a host given in run config "
            "is not accepted in its place (it would decide where the PostHog key is sent)"
        )
    if _origin(host) != _origin(pinned):
        raise ValueError(
            f"host: this run's config would send the PostHog key to {host.strip()!r}, but "
            f"{source} pins {pinned!r}. A launch may not change where the key goes: change the "
            "host in the definitions (defs.yaml or code) and reload the code location."
        )


def _origin(host: str) -> str:
    parts = urlsplit(host.strip())
    return f"{parts.scheme}://{parts.netloc}".lower()


_WARNED_LITERAL: set[str] = set()


def _warn_if_literal(field: str, defined: str, context: dg.InitResourceContext) -> None:
    """A literal secret is a config value Dagster stores in clear in run storage (the job
    snapshot, the webserver's debug download): say so once per process, with the fix."""
    if isinstance(defined, dg.EnvVar) or not defined or defined in _WARNED_LITERAL:
        return
    _WARNED_LITERAL.add(defined)
    variable = "POSTHOG_PERSONAL_API_KEY" if field == "personal_api_key" else ENV_RATE_LIMIT_URL
    (context.log or logging.getLogger(__name__)).warning(
        f"{field} is written literally in the definitions: Dagster stores it in clear in run "
        f"storage with every run. Set it from an environment variable instead: "
        f"{field}=dg.EnvVar('{variable}')."
    )


@functools.cache
def duckdb_resource(database: str) -> DuckDBResource:
    """One resource object per file: every project (and every component instance) writing the
    same DuckDB file shares it, as Dagster requires of one resource key."""
    return DuckDBResource(database=database)

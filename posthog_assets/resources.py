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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from posthog_assets.api.ratelimit import (
    DEFAULT,
    ENV_RATE_LIMIT_URL,
    INSIGHTS,
    POSTHOG_CLOUD_LIMITS,
    GateState,
    RedisState,
    default_state_dir,
    parse_rate,
    shared_state_path,
    validate_redis_url,
)
from posthog_assets.common import DUCKDB_RESOURCE_KEY
from posthog_assets.config import (
    DEFAULT_EXPORT_DIR,
    ENV_API_KEY,
    ENV_HOST,
    ENV_PROJECT_ID,
    ProjectConfig,
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

    host: str = Field(description="PostHog base URL, e.g. https://us.posthog.com.")
    project_id: str = Field(description="Numeric project id (or '@current').")
    personal_api_key: str = Field(
        description="Personal API key (phx_...); set it from an env var with dg.EnvVar.",
        json_schema_extra=SECRET_FIELD,
    )
    api_key_env: str = Field(
        default=ENV_API_KEY,
        description=(
            "Env var holding the key. Used when the launchpad sends back the UI's masked value "
            "('********') for personal_api_key, so a run launched from the UI keeps the real key."
        ),
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
        "(insight_rate_limits, default_rate_limits); off: pause only when PostHog answers 429.",
    )
    insight_rate_limits: list[str] = Field(
        default=[str(w) for w in POSTHOG_CLOUD_LIMITS[INSIGHTS]],
        description="PostHog's throttles of the insight and query routes per key (Cloud: "
        "240/minute, 1200/hour).",
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
        "runs), through a hashed state file in $POSTHOG_ASSETS_RATE_LIMIT_DIR or the temp dir, "
        "or across hosts through Redis (rate_limit_url). Off: each step process paces on its own.",
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

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
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
        are separate processes)."""
        if not self._run_id:
            return None
        digest = hashlib.sha256(f"{self._run_id}\n{self.host}".encode()).hexdigest()[:24]
        return default_state_dir() / "warned" / f"{topic}-{digest}"

    def _first_in_run(self, topic: str) -> bool:
        marker = self._run_marker(topic)
        if marker is None:
            return True
        try:
            marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return False
        except OSError:
            return True
        return True

    def validate_settings(self) -> None:
        """Fail with the field's name before any request is sent."""
        validate_host(self.host, field_name="host", allow_http=self.allow_insecure_http)
        parse_project_id(self.project_id, field_name="project_id")
        if not self.api_key.strip():
            raise ValueError(
                "personal_api_key is empty: set the env var that holds the key "
                f"({self.api_key_env})"
            )
        if self.api_prefix not in ("environments", "projects"):
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
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        self.rate_limits()
        url = self.resolved_rate_limit_url()
        if url is not None:
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
            ("default_rate_limits", DEFAULT, self.default_rate_limits),
        ):
            try:
                parsed[klass] = tuple(parse_rate(t) for t in texts)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return parsed if self.pace_requests else None

    @property
    def api_key(self) -> str:
        """The key; the UI's mask stands for "unchanged", i.e. the key from ``api_key_env``."""
        if self.personal_api_key == UI_SECRET_MASK:
            return os.environ.get(self.api_key_env, "")
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


def build_posthog_resource(project: ProjectConfig, export_dir: str | Path) -> PostHogResource:
    """The resource of one project: what the project does not give is read from the environment
    when a run starts (so the env of the process that runs decides), the key always is unless the
    caller resolved it already."""
    host = project.host or dg.EnvVar(ENV_HOST)
    project_id = str(project.project_id) if project.project_id else dg.EnvVar(ENV_PROJECT_ID)
    return PostHogResource(
        host=host,
        project_id=project_id,
        personal_api_key=project.personal_api_key or dg.EnvVar(project.api_key_env),
        api_key_env=project.api_key_env,
        api_prefix=project.api_prefix,
        allow_insecure_http=project.allow_insecure_http,
        export_dir=str(export_dir),
    )


@functools.cache
def duckdb_resource(database: str) -> DuckDBResource:
    """One resource object per file: every project (and every component instance) writing the
    same DuckDB file shares it, as Dagster requires of one resource key."""
    return DuckDBResource(database=database)


def build_resources(
    projects: Sequence[ProjectConfig], *, duckdb_path: str | Path, export_dir: str | Path
) -> dict[str, Any]:
    """One ``PostHogResource`` per project plus the shared ``duckdb`` resource."""
    resources: dict[str, Any] = {
        p.resource_key: build_posthog_resource(p, export_dir) for p in projects
    }
    resources[DUCKDB_RESOURCE_KEY] = duckdb_resource(str(duckdb_path))
    return resources

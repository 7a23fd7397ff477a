"""``PostHogProjectComponent``: one PostHog project in a ``defs.yaml``.

A state-backed component: what it must know about the project (its insights and dashboards, to
resolve export selections) is fetched by ``dg utils refresh-defs-state`` and stored; loading the
definitions reads only that, so a reload makes no API call and works with PostHog unreachable.
When the state is missing, a ``dg`` command (development) fetches it once; anywhere else the load
fails saying which command to run.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import dagster as dg
from dagster._utils.env import using_dagster_dev
from dagster.components import (
    ComponentLoadContext,
    DefsStateConfig,
    DefsStateConfigArgs,
    Model,
    Resolvable,
    ResolvedDefsStateConfig,
    StateBackedComponent,
)
from dagster.components.resolved.context import ResolutionContext
from dagster.components.resolved.errors import ResolutionException
from dagster.components.scaffold.scaffold import scaffold_with
from dagster.components.utils.translation import TranslationFnResolver
from dagster_shared.serdes.objects.models.defs_state_info import DefsStateManagementType
from pydantic import Field, field_validator, model_validator

from posthog_assets.api.client import PostHogClient
from posthog_assets.build import build_posthog_assets_definitions
from posthog_assets.component.scaffolder import PostHogProjectScaffolder
from posthog_assets.component.selection import (
    ExportSelection,
    SelectionError,
    select_exports,
    selected_tags,
)
from posthog_assets.component.state import fetch_project_state, read_state, write_state
from posthog_assets.config import (
    DEFAULT_DUCKDB_PATH,
    DEFAULT_EXPORT_DIR,
    DEFAULT_PROJECT_NAME,
    ENV_API_KEY,
    ENV_HOST,
    ENV_PROJECT_ID,
    ApiPrefixName,
    GroupsConfig,
    InsightsConfig,
    ProjectConfig,
    matching,
    parse_project_id,
    validate_host,
)
from posthog_assets.translator import (
    DagsterPostHogTranslator,
    PostHogExportProps,
    PostHogSnapshotProps,
)

PostHogProps = PostHogExportProps | PostHogSnapshotProps
TranslationFn = Callable[[dg.AssetSpec, PostHogProps], dg.AssetSpec]


#: ``{{ env.NAME }}`` or ``{{ env('NAME') }}`` and nothing else.
_ENV_TEMPLATE = re.compile(
    r"""^\{\{\s*env(?:\.([A-Za-z_][A-Za-z0-9_]*)|\(\s*['"]([A-Za-z_][A-Za-z0-9_]*)['"]\s*\))\s*\}\}$"""
)


@dataclass(frozen=True)
class ApiKey:
    """Where the personal API key comes from: an environment variable (kept as ``dg.EnvVar``, so
    the UI and run config show its name) or, discouraged, a literal."""

    env: str | None = None
    value: str | None = field(default=None, repr=False)


def resolve_api_key(context: ResolutionContext, raw: Any) -> ApiKey | None:
    """``{{ env.NAME }}`` stays a reference to ``NAME`` (which must be set); anything else is
    rendered as usual and used as the key itself."""
    if raw is None:
        return None
    match = _ENV_TEMPLATE.match(str(raw).strip())
    if match:
        name = match.group(1) or match.group(2)
        if not os.environ.get(name):
            raise ResolutionException(
                f"project.personal_api_key: environment variable {name} is not set (it holds "
                "the PostHog personal API key)"
            )
        return ApiKey(env=name)
    value = context.resolve_value(raw, as_type=str)
    if not value:
        raise ResolutionException("project.personal_api_key: empty")
    return ApiKey(value=str(value))


class PostHogProjectModel(Resolvable, Model):
    """The project: where it is and how to authenticate."""

    name: str = Field(
        default=DEFAULT_PROJECT_NAME,
        description="'default' keeps the unprefixed names (posthog/...); any other name gets "
        "posthog/<name>/... and its own resource, jobs and sensors.",
    )
    host: str | None = Field(
        default=None,
        description="https://us.posthog.com, https://eu.posthog.com or a self-hosted URL; "
        "unset: POSTHOG_HOST, read when a run starts or the state is refreshed.",
    )
    project_id: int | str | None = Field(
        default=None,
        description="Numeric project id (Settings > Project); unset: POSTHOG_PROJECT_ID.",
    )
    personal_api_key: Annotated[
        ApiKey | None,
        dg.Resolver(
            lambda context, raw: resolve_api_key(context, raw),
            model_field_type=str | None,
            inject_before_resolve=False,
            description="The personal API key as '{{ env.POSTHOG_PERSONAL_API_KEY }}': the "
            "variable must be set when the definitions load, and runs read it then (the UI "
            "shows its name, never its value). Left out: api_key_env, read when a run starts.",
        ),
    ] = None
    api_key_env: str = Field(default=ENV_API_KEY, description="Env var holding the key.")
    api_prefix: ApiPrefixName = Field(
        default="projects", description="'projects', or the deprecated 'environments'."
    )
    allow_insecure_http: bool = Field(
        default=False,
        description="Allow plain http to a self-hosted PostHog inside a private network.",
    )

    @field_validator("project_id", mode="before")
    @classmethod
    def _project_id(cls, value: Any) -> int | str | None:
        return None if value in (None, "") else parse_project_id(value)

    @field_validator("host", mode="before")
    @classmethod
    def _empty_host(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return matching(value, r"^[a-z][a-z0-9_]*$", "lower_snake_case")


def _translation_vars(props: PostHogProps) -> dict[str, Any]:
    return {"props": props, "project": props.project}


_TRANSLATION_RESOLVER = TranslationFnResolver(template_vars_for_translation_fn=_translation_vars)


@scaffold_with(PostHogProjectScaffolder)
class PostHogProjectComponent(StateBackedComponent, Model, Resolvable):
    """A PostHog project: export assets chosen by selection, the daily insights snapshot, the
    group snapshots, their checks, sensors and schedules.

    Attributes:
        project: Host, project id, key and API prefix.
        exports: What to export, by id, short id, tag, dashboard, name search, favourites, or
            every dashboard, each with a format.
        insights: The insights snapshot (refresh mode, schedule, filters).
        groups: The group snapshots (property values, tracked groups, schedule).
        translation: Asset attributes for every asset (``key``, ``group_name``, ``tags``, ...).
    """

    project: PostHogProjectModel
    exports: list[ExportSelection] = Field(default_factory=list)
    insights: InsightsConfig = Field(default_factory=InsightsConfig)
    groups: GroupsConfig = Field(default_factory=GroupsConfig)
    duckdb_path: str = DEFAULT_DUCKDB_PATH
    export_dir: str = DEFAULT_EXPORT_DIR
    translation: Annotated[TranslationFn, _TRANSLATION_RESOLVER] | None = Field(
        default=None,
        description="Asset attributes for every asset this component builds (key, group_name, "
        "tags, owners, ...); templates see 'props' and 'project'.",
    )
    defs_state: ResolvedDefsStateConfig = Field(
        default_factory=lambda: DefsStateConfigArgs(
            management_type=DefsStateManagementType.LOCAL_FILESYSTEM, refresh_if_dev=False
        ),
        description="Where the project's state is stored; LOCAL_FILESYSTEM by default, refreshed "
        "only by `dg utils refresh-defs-state` (or once, when missing, by a dg command).",
    )

    @model_validator(mode="after")
    def _check_host(self) -> PostHogProjectComponent:
        if self.project.host is not None:
            validate_host(
                self.project.host,
                field_name="project.host",
                allow_http=self.project.allow_insecure_http,
            )
        return self

    @property
    def defs_state_config(self) -> DefsStateConfig:
        return DefsStateConfig.from_args(
            self.defs_state, default_key=f"PostHogProjectComponent[{self.project.name}]"
        )

    @cached_property
    def translator(self) -> DagsterPostHogTranslator:
        if self.translation is None:
            return DagsterPostHogTranslator()
        return TranslatedPostHogTranslator(self.translation)

    def client(self) -> PostHogClient:
        """A client for refreshing the state; what ``project`` leaves out comes from the env."""
        project = self.project
        host = project.host or os.environ.get(ENV_HOST)
        project_id = project.project_id or os.environ.get(ENV_PROJECT_ID)
        key = self.api_key_value()
        missing = [
            name
            for name, value in (
                (f"project.host (or {ENV_HOST})", host),
                (f"project.project_id (or {ENV_PROJECT_ID})", project_id),
                (f"project.personal_api_key (or {self.api_key_env})", key),
            )
            if not value
        ]
        if missing:
            raise ValueError(
                f"cannot read the project's insights and dashboards: {', '.join(missing)} not set"
            )
        return PostHogClient(
            validate_host(str(host), allow_http=project.allow_insecure_http),
            parse_project_id(project_id),
            key,
            api_prefix=project.api_prefix,
        )

    @property
    def api_key_env(self) -> str:
        """The variable the key is read from (unless the key is a literal)."""
        key = self.project.personal_api_key
        return (key.env if key and key.env else None) or self.project.api_key_env

    def api_key_value(self) -> str:
        key = self.project.personal_api_key
        if key is not None and key.value:
            return key.value
        return os.environ.get(self.api_key_env, "")

    def write_state_to_path(self, state_path: Path) -> None:
        insight_tags, dashboard_tags = selected_tags(self.exports)
        client = self.client()
        try:
            state = fetch_project_state(
                client, insight_tags=insight_tags, dashboard_tags=dashboard_tags
            )
            write_state(state_path, state)
        finally:
            client.close()

    def project_config(
        self, context: ComponentLoadContext, state_path: Path | None
    ) -> ProjectConfig:
        """The project with its exports resolved against the stored state."""
        exports = []
        if self.exports:
            if state_path is None or not state_path.exists():
                state_path = self._state_when_missing(context)
            try:
                exports = select_exports(self.exports, read_state(state_path))
            except SelectionError as exc:
                raise ValueError(f"{context.path}: {exc}") from None
        return ProjectConfig(
            name=self.project.name,
            host=self.project.host,
            project_id=self.project.project_id,
            api_key_env=self.api_key_env,
            personal_api_key=(self.project.personal_api_key or ApiKey()).value,
            api_prefix=self.project.api_prefix,
            allow_insecure_http=self.project.allow_insecure_http,
            exports=exports,
            insights=self.insights,
            groups=self.groups,
        )

    def _state_when_missing(self, context: ComponentLoadContext) -> Path:
        """In development (a ``dg`` command) fetch the missing state once; elsewhere say what to
        run, rather than load an empty asset graph."""
        if not using_dagster_dev():
            raise ValueError(
                f"{context.path}: the stored PostHog state of this component is missing, so its "
                "export selections cannot be resolved. Run `dg utils refresh-defs-state` where "
                "the code location is built (it reads the project's insights and dashboards "
                f"from {self.project.host or ENV_HOST}, project "
                f"{self.project.project_id or ENV_PROJECT_ID})."
            )
        asyncio.run(self.refresh_state(context.project_root))
        from dagster.components.utils.project_paths import get_local_state_path

        return get_local_state_path(self.defs_state_config.key, context.project_root)

    def build_defs_from_state(
        self, context: ComponentLoadContext, state_path: Path | None
    ) -> dg.Definitions:
        project = self.project_config(context, state_path)
        return build_posthog_assets_definitions(
            project,
            duckdb_path=self.duckdb_path,
            export_dir=self.export_dir,
            translator=self.translator,
            main_job=False,
        )


class TranslatedPostHogTranslator(DagsterPostHogTranslator):
    """The default specs, then the component's ``translation:`` applied to each."""

    def __init__(self, fn: TranslationFn) -> None:
        self.fn = fn

    def get_asset_spec(self, props: PostHogProps) -> dg.AssetSpec:
        return self.fn(super().get_asset_spec(props), props)

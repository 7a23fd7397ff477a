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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from posthog_assets.api.client import PostHogClient
from posthog_assets.api.errors import PostHogError
from posthog_assets.build import build_posthog_assets_definitions
from posthog_assets.component.scaffolder import PostHogProjectScaffolder
from posthog_assets.component.selection import (
    ExportSelection,
    SelectionError,
    select_exports,
    selected_tags,
)
from posthog_assets.component.state import (
    ProjectState,
    StateRefreshFailed,
    fetch_project_state,
    read_state,
    write_state,
)
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
    error_lines,
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


#: ``{{ env.NAME }}``, ``{{ env('NAME') }}`` or ``{{ env('NAME', 'default') }}``.
_ENV_TEMPLATE = re.compile(
    r"""^\{\{\s*env(?:\.([A-Za-z_][A-Za-z0-9_]*)|\(\s*['"]([A-Za-z_][A-Za-z0-9_]*)['"]\s*"""
    r"""(?:,\s*(?:'[^']*'|"[^"]*"|None)\s*)?\))\s*\}\}$"""
)
LITERAL_KEY_REFUSED = (
    "project.personal_api_key must name the environment variable that holds the key, as "
    "'{{ env.POSTHOG_PERSONAL_API_KEY }}' (or {{ env('NAME') }}): a key written in defs.yaml "
    "would be stored in clear in Dagster's run storage with every run, and templates that "
    "transform the value cannot stay a reference to the variable. The value is not shown."
)


def env_name(raw: Any) -> str | None:
    """The variable an ``{{ env.NAME }}`` template names, else None."""
    match = _ENV_TEMPLATE.match(str(raw).strip()) if isinstance(raw, str) else None
    return (match.group(1) or match.group(2)) if match else None


def resolve_setting(context: ResolutionContext, raw: Any) -> Any:
    """A value, or a ``dg.EnvVar`` for a template naming one environment variable: read where
    it is used (a run, the state refresh), and named in every message about it."""
    name = env_name(raw)
    if name is not None:
        return dg.EnvVar(name)
    return context.resolve_value(raw) if isinstance(raw, str) else raw


def validated(section: str, adapter: TypeAdapter[Any]) -> Callable[[ResolutionContext, Any], Any]:
    """A resolver that validates a section itself, so an error names the entry, the field and
    the reason (the schema check would say "not valid under any of the given schemas")."""

    def resolve(context: ResolutionContext, raw: Any) -> Any:
        try:
            return adapter.validate_python(raw)
        except ValidationError as err:
            raise ResolutionException(
                "; ".join(error_lines({section: raw}, err, (section,)))
            ) from None

    return resolve


_SECRET_SETTINGS = ("personal_api_key",)
_ENV_SETTINGS = ("host", "project_id")


def resolve_project(context: ResolutionContext, raw: Any) -> PostHogProjectModel:
    """``project:``: settings naming an environment variable stay references to it (the key
    must), the rest is rendered; errors name the field, never a value."""
    if not isinstance(raw, dict):
        raise ResolutionException("project must be a mapping (host, project_id, ...)")
    values: dict[str, Any] = {}
    from_env: dict[str, dg.EnvVar] = {}
    for name, value in raw.items():
        if name in _SECRET_SETTINGS:
            values[name] = resolve_api_key(context, value)
        elif name in _ENV_SETTINGS and isinstance(
            setting := resolve_setting(context, value), dg.EnvVar
        ):
            from_env[name] = setting
        elif name in _ENV_SETTINGS:
            values[name] = setting
        else:
            values[name] = context.resolve_value(value) if isinstance(value, str) else value
    try:
        # an EnvVar stays one (validation would make it a plain string): set after the checks
        return PostHogProjectModel.model_validate(values).model_copy(update=from_env)
    except ValidationError as err:
        shown = {"project": {k: v for k, v in raw.items() if k not in _SECRET_SETTINGS}}
        raise ResolutionException(
            "; ".join(error_lines(shown, err, ("project",)))
            + f" (the fields are: {', '.join(PostHogProjectModel.model_fields)})"
        ) from None


def resolve_api_key(context: ResolutionContext, raw: Any) -> str | None:
    """The name of the environment variable holding the key: it stays a ``dg.EnvVar`` (the UI
    and run storage see the name, never the value); a literal key is refused."""
    if raw is None:
        return None
    name = env_name(raw)
    if name is None:
        raise ResolutionException(LITERAL_KEY_REFUSED)
    if not os.environ.get(name):
        raise ResolutionException(
            f"project.personal_api_key: environment variable {name} is not set (it holds "
            "the PostHog personal API key)"
        )
    return name


class PostHogProjectModel(BaseModel):
    """The project: where it is and how to authenticate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        default=DEFAULT_PROJECT_NAME,
        description="'default' keeps the unprefixed names (posthog/...); any other name gets "
        "posthog/<name>/... and its own resource, jobs and sensors.",
    )
    host: str | None = Field(
        default=None,
        description="https://us.posthog.com, https://eu.posthog.com or a self-hosted URL, or "
        "'{{ env.NAME }}' (read when a run starts or the state is refreshed); unset: "
        "POSTHOG_HOST.",
    )
    project_id: int | str | None = Field(
        default=None,
        description="Numeric project id (Settings > Project), or '{{ env.NAME }}'; unset: "
        "POSTHOG_PROJECT_ID.",
    )
    personal_api_key: str | None = Field(
        default=None,
        description="The personal API key as '{{ env.POSTHOG_PERSONAL_API_KEY }}': the "
        "variable must be set when the definitions load, and runs read it then (the UI shows "
        "its name, never its value); a literal key is refused. Left out: api_key_env.",
    )
    api_key_env: str = Field(
        default=ENV_API_KEY,
        description="Env var holding the key, when personal_api_key is left out.",
    )
    api_prefix: ApiPrefixName = Field(
        default="projects", description="'projects', or the deprecated 'environments'."
    )
    allow_insecure_http: bool = Field(
        default=False,
        description="Allow plain http to a self-hosted PostHog inside a private network.",
    )

    @field_validator("project_id", mode="before")
    @classmethod
    def _project_id(cls, value: Any) -> Any:
        if isinstance(value, dg.EnvVar):
            return value
        return None if value in (None, "") else parse_project_id(value)

    @field_validator("host", mode="before")
    @classmethod
    def _empty_host(cls, value: Any) -> Any:
        return None if value == "" else value

    @property
    def host_env(self) -> str:
        return self.host.env_var_name if isinstance(self.host, dg.EnvVar) else ENV_HOST

    @property
    def project_id_env(self) -> str:
        found = self.project_id
        return found.env_var_name if isinstance(found, dg.EnvVar) else ENV_PROJECT_ID

    @property
    def literal_host(self) -> str | None:
        return None if isinstance(self.host, dg.EnvVar) else self.host

    @property
    def literal_project_id(self) -> int | str | None:
        return None if isinstance(self.project_id, dg.EnvVar) else self.project_id

    def current_host(self) -> str | None:
        """The host now: written in defs.yaml, or read from its variable."""
        return self.literal_host or os.environ.get(self.host_env) or None

    def current_project_id(self) -> str | None:
        found = self.literal_project_id or os.environ.get(self.project_id_env)
        return None if found in (None, "") else str(found)

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

    project: Annotated[
        PostHogProjectModel,
        dg.Resolver(
            resolve_project,
            model_field_type=dict[str, Any],
            inject_before_resolve=False,
            description="name, host, project_id, personal_api_key, api_key_env, api_prefix, "
            "allow_insecure_http.",
        ),
    ]
    exports: Annotated[
        list[ExportSelection],
        dg.Resolver(
            validated("exports", TypeAdapter(list[ExportSelection])),
            model_field_type=list[dict[str, Any]],
            description="Each entry: one of insight, insights, dashboard, dashboards; format; "
            "name (for a single object), export_context, description.",
        ),
    ] = Field(default_factory=list)
    insights: Annotated[
        InsightsConfig,
        dg.Resolver(
            validated("insights", TypeAdapter(InsightsConfig)),
            model_field_type=dict[str, Any],
            description="refresh, schedule, page_size, short_id, created_by, basic, "
            "query_poll_timeout_s, enabled.",
        ),
    ] = Field(default_factory=InsightsConfig)
    groups: Annotated[
        GroupsConfig,
        dg.Resolver(
            validated("groups", TypeAdapter(GroupsConfig)),
            model_field_type=dict[str, Any],
            description="enabled, property_values, tracked, schedule.",
        ),
    ] = Field(default_factory=GroupsConfig)
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
        if self.project.literal_host is not None:
            validate_host(
                self.project.literal_host,
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
        host = project.current_host()
        project_id = project.current_project_id()
        key = self.api_key_value()
        missing = [
            name
            for name, value in (
                (_where("project.host", project.literal_host, project.host_env), host),
                (
                    _where(
                        "project.project_id", project.literal_project_id, project.project_id_env
                    ),
                    project_id,
                ),
                (f"the environment variable {self.api_key_env} (the personal API key)", key),
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
        """The variable the key is read from."""
        return self.project.personal_api_key or self.project.api_key_env

    def api_key_value(self) -> str:
        return os.environ.get(self.api_key_env, "")

    def write_state_to_path(self, state_path: Path) -> None:
        """Read the project's insights and dashboards; a failure ends ``dg utils
        refresh-defs-state`` with its reason, not a traceback, and keeps the old state."""
        insight_tags, dashboard_tags = selected_tags(self.exports)
        try:
            client = self.client()
            try:
                state = fetch_project_state(
                    client, insight_tags=insight_tags, dashboard_tags=dashboard_tags
                )
            finally:
                client.close()
        except (PostHogError, ValueError) as exc:
            raise StateRefreshFailed(
                f"the PostHog state of project '{self.project.name}' was not refreshed (the "
                f"stored one, if any, is kept): {exc}"
            ) from None
        write_state(state_path, state)

    def project_config(
        self, context: ComponentLoadContext, state_path: Path | None
    ) -> ProjectConfig:
        """The project with its exports resolved against the stored state."""
        exports = []
        if self.exports:
            if state_path is None or not state_path.exists():
                state_path = self._state_when_missing(context)
            state = read_state(state_path)
            self._check_state_is_of_this_project(context, state)
            try:
                exports = select_exports(self.exports, state)
            except SelectionError as exc:
                raise ValueError(f"{context.path}: {exc}") from None
        return ProjectConfig(
            name=self.project.name,
            host=self.project.literal_host,
            project_id=self.project.literal_project_id,
            host_env=self.project.host_env,
            project_id_env=self.project.project_id_env,
            api_key_env=self.api_key_env,
            api_prefix=self.project.api_prefix,
            allow_insecure_http=self.project.allow_insecure_http,
            exports=exports,
            insights=self.insights,
            groups=self.groups,
        )

    def _check_state_is_of_this_project(
        self, context: ComponentLoadContext, state: ProjectState
    ) -> None:
        """The selections resolve against what the state was read from: after the host or the
        project id changed (or its variable is unset) they would name another project's
        objects, and the first launch would fail minutes later."""
        project = self.project
        host, project_id = project.current_host(), project.current_project_id()
        unset = [
            _where(name, literal, env)
            for name, literal, env, value in (
                ("project.host", project.literal_host, project.host_env, host),
                (
                    "project.project_id",
                    project.literal_project_id,
                    project.project_id_env,
                    project_id,
                ),
            )  # fmt: skip
            if value is None
        ]
        fix = "run `dg utils refresh-defs-state` to read the state of the project configured now"
        if unset:
            raise ValueError(
                f"{context.path}: the stored PostHog state was read from {state.host}, project "
                f"{state.project_id}, but {' and '.join(unset)} is not set, so nothing says it is "
                f"this project's: set it, or {fix}"
            )
        now = (_normal_host(str(host)), str(parse_project_id(project_id)))
        then = (_normal_host(state.host), str(state.project_id))
        if now != then:
            raise ValueError(
                f"{context.path}: the stored PostHog state was read from {then[0]}, project "
                f"{then[1]}, but this component is configured for {now[0]}, project {now[1]}: "
                f"{fix}"
            )

    def _state_when_missing(self, context: ComponentLoadContext) -> Path:
        """In development (a ``dg`` command) fetch the missing state once; elsewhere say what to
        run, rather than load an empty asset graph."""
        if not using_dagster_dev():
            raise ValueError(
                f"{context.path}: the stored PostHog state of this component is missing, so its "
                "export selections cannot be resolved. Run `dg utils refresh-defs-state` where "
                "the code location is built (it reads the project's insights and dashboards "
                f"from {self.project.literal_host or self.project.host_env}, project "
                f"{self.project.literal_project_id or self.project.project_id_env})."
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


def _normal_host(host: str) -> str:
    try:
        return validate_host(host, allow_http=True).lower()
    except ValueError:
        return host.strip().rstrip("/").lower()


def _where(field_name: str, literal: Any, env: str) -> str:
    """How a message names a setting: the field, or the variable it is read from."""
    return field_name if literal is not None else f"the environment variable {env} ({field_name})"


class TranslatedPostHogTranslator(DagsterPostHogTranslator):
    """The default specs, then the component's ``translation:`` applied to each."""

    def __init__(self, fn: TranslationFn) -> None:
        self.fn = fn

    def get_asset_spec(self, props: PostHogProps) -> dg.AssetSpec:
        return self.fn(super().get_asset_spec(props), props)

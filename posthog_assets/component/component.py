"""``PostHogProjectComponent``: one PostHog project in a ``defs.yaml``.

A state-backed component: what it must know about the project (its insights and dashboards, to
resolve export selections) is fetched by ``dg utils refresh-defs-state`` and stored; loading the
definitions reads only that, so a reload makes no API call and works with PostHog unreachable.
When a selection needs the state and it is missing, a ``dg`` command (development) fetches it
once; anywhere else the load fails saying which command to run. Selections by id need no state.

``project:`` is the project's :class:`PostHogResource`: every resource setting can be written
there. A setting written as ``{{ env.NAME }}`` (or ``{{ env('NAME') }}``, with or without a
default) stays a ``dg.EnvVar``: read where it is used (a run, the state refresh) and named in every
message about it; the UI and run storage see the variable's name, never its value. A secret
written literally is refused. Sections are validated by their own resolvers rather than by the
schema check, so an error names the entry, the field and the reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
from pydantic import Field, TypeAdapter, ValidationError

from posthog_assets.api.errors import PostHogError
from posthog_assets.build import build_project_definitions
from posthog_assets.component.scaffolder import PostHogProjectScaffolder
from posthog_assets.component.selection import (
    ExportSelection,
    SelectionError,
    needs_state,
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
    DEFAULT_PROJECT_NAME,
    ENV_API_KEY,
    ENV_HOST,
    ENV_PROJECT_ID,
    EventsConfig,
    GroupsConfig,
    InsightsConfig,
    PersonsConfig,
    PostHogProject,
    catalog_names,
    error_lines,
    matching,
    parse_project_id,
    validate_host,
)
from posthog_assets.exports.assets import posthog_exports
from posthog_assets.resources import PostHogResource, resolved_value
from posthog_assets.translator import (
    DagsterPostHogTranslator,
    PostHogExportProps,
    PostHogSnapshotProps,
)

#: ``{{ env.NAME }}``, ``{{ env('NAME') }}`` or ``{{ env('NAME', 'default') }}``.
_ENV_TEMPLATE = re.compile(
    r"""^\{\{\s*env(?:\.([A-Za-z_][A-Za-z0-9_]*)|\(\s*['"]([A-Za-z_][A-Za-z0-9_]*)['"]\s*"""
    r"""(?:,\s*(?:'[^']*'|"[^"]*"|None)\s*)?\))\s*\}\}$"""
)
#: Read from the environment when left out (the resource's ``host`` and ``project_id``).
_ENV_DEFAULTS = {"host": ENV_HOST, "project_id": ENV_PROJECT_ID}
#: Settings that stay a reference to their variable (read when a run starts); others written
#: as a template are rendered when the definitions load, as Dagster renders them.
_BY_REFERENCE = frozenset({"host", "project_id", "personal_api_key", "rate_limit_url"})
LITERAL_KEY_REFUSED = (
    "project.personal_api_key must name the environment variable that holds the key, as "
    "'{{ env.POSTHOG_PERSONAL_API_KEY }}' (or {{ env('NAME') }}): a key written in defs.yaml "
    "would be stored in clear in Dagster's run storage with every run, and templates that "
    "transform the value cannot stay a reference to the variable. The value is not shown."
)
LITERAL_REDIS_PASSWORD_REFUSED = (
    "project.rate_limit_url holds a password: write it as '{{ env.POSTHOG_ASSETS_RATE_LIMIT_URL "
    "}}' (a password in defs.yaml would be stored in clear in run storage). The value is not shown."
)


@dataclass(frozen=True)
class ProjectSettings:
    """``project:`` resolved: the project's name (its keys' prefix) and its resource."""

    name: str
    resource: PostHogResource

    def current(self, field: str) -> str | None:
        """A setting's value now: as written, or read from its variable (None when unset)."""
        value = resolved_value(getattr(self.resource, field))
        return None if value in (None, "") else str(value)

    def source(self, field: str) -> str:
        """How a message names a setting: the field, or the variable it is read from."""
        value = getattr(self.resource, field)
        if isinstance(value, dg.EnvVar):
            return f"the environment variable {value.env_var_name} (project.{field})"
        return f"project.{field}"


def env_name(raw: Any) -> str | None:
    """The variable an ``{{ env.NAME }}`` template names, else None."""
    match = _ENV_TEMPLATE.match(raw.strip()) if isinstance(raw, str) else None
    return (match.group(1) or match.group(2)) if match else None


def resolve_project(context: ResolutionContext, raw: Any) -> ProjectSettings:
    """``project:`` as :class:`ProjectSettings`; errors name the field, never a value."""
    if not isinstance(raw, dict):
        raise ResolutionException("project must be a mapping (host, project_id, ...)")
    values = dict(raw)
    name = str(values.pop("name", DEFAULT_PROJECT_NAME))
    key_env = values.pop("api_key_env", None)  # the variable, when personal_api_key is left out
    key_written = "personal_api_key" in values
    values.setdefault("personal_api_key", "{{ env.%s }}" % (key_env or ENV_API_KEY))
    unknown = sorted(set(values) - set(PostHogResource.model_fields))
    if unknown:
        raise ResolutionException(
            f"project, field '{unknown[0]}': not a known field (a typo?) (the fields are: "
            f"name, {', '.join(_resource_fields())})"
        )
    fields: dict[str, Any] = {}
    for field, value in values.items():
        variable = env_name(value) if field in _BY_REFERENCE else None
        if variable is not None:
            if field == "personal_api_key" and key_written and not os.environ.get(variable):
                raise ResolutionException(
                    f"project.personal_api_key: environment variable {variable} is not set (it "
                    "holds the PostHog personal API key)"
                )
            fields[field] = dg.EnvVar(variable)
        elif field == "personal_api_key":
            raise ResolutionException(LITERAL_KEY_REFUSED)
        elif field == "rate_limit_url" and isinstance(value, str) and "@" in value:
            raise ResolutionException(LITERAL_REDIS_PASSWORD_REFUSED)
        else:
            fields[field] = context.resolve_value(value) if isinstance(value, str) else value
    for field, variable in _ENV_DEFAULTS.items():
        if fields.get(field) in (None, ""):
            fields[field] = dg.EnvVar(variable)
    if isinstance(fields.get("project_id"), int):
        fields["project_id"] = str(fields["project_id"])
    try:
        matching(name, r"^[a-z][a-z0-9_]*$", "lower_snake_case")
    except ValueError as exc:
        raise ResolutionException(f"project.name {exc}") from None
    try:
        return ProjectSettings(name=name, resource=PostHogResource(**fields))
    except (ValidationError, ValueError, TypeError) as err:
        shown = {"project": {k: v for k, v in raw.items() if k != "personal_api_key"}}
        lines = (
            error_lines(shown, err, ("project",))
            if isinstance(err, ValidationError)
            else [f"project.{err}"]
        )
        raise ResolutionException(
            "; ".join(lines) + f" (the fields are: name, {', '.join(_resource_fields())})"
        ) from None


def default_project() -> ProjectSettings:
    """``project:`` left out: the project named ``default``, everything from the environment
    (``POSTHOG_HOST``, ``POSTHOG_PROJECT_ID``, ``POSTHOG_PERSONAL_API_KEY``)."""
    return resolve_project(ResolutionContext.default(), {})


def _resource_fields() -> list[str]:
    return list(PostHogResource.model_fields)


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


def _catalog(raw: Any) -> tuple[str, ...]:
    try:
        return catalog_names(raw)
    except ValueError as exc:
        raise ResolutionException(str(exc)) from None


PostHogProps = PostHogExportProps | PostHogSnapshotProps
TranslationFn = Callable[[dg.AssetSpec, PostHogProps], dg.AssetSpec]
logger = logging.getLogger(__name__)

#: Project names taken by the components of the latest loads (one component tree each): a second
#: component of the same name would share its resource, keys and stored state. Bounded: a
#: long-running server reloads many times, and component trees cannot be weakly referenced.
_NAMES: OrderedDict[int, tuple[Any, dict[str, Path]]] = OrderedDict()
_NAMES_KEPT = 8


def _translation_vars(props: PostHogProps) -> dict[str, Any]:
    return {"props": props, "project": props.project}


@scaffold_with(PostHogProjectScaffolder)
class PostHogProjectComponent(StateBackedComponent, Model, Resolvable):
    """A PostHog project: export assets chosen by selection, the daily insights snapshot, the
    group snapshots, their checks, sensors and schedules.

    Example:
        .. code-block:: yaml

            type: posthog_assets.PostHogProjectComponent
            attributes:
              project:                       # the project's PostHogResource: every field
                host: https://eu.posthog.com
                project_id: 12345
                personal_api_key: "{{ env.POSTHOG_PERSONAL_API_KEY }}"
              exports:
                - dashboards: all            # every dashboard, as PNG
                - insight: 42                # by id: needs no stored state
                  format: text/csv
              insights: {refresh: async, schedule: "0 6 * * *"}

    Attributes:
        project: The project's name and its :class:`PostHogResource` (host, project id, key,
            timeouts, retries, rate limits, export folder).
        exports: What to export, by id, short id, tag, dashboard, name search, favourites, or
            every dashboard, each with a format.
        insights: The insights snapshot (refresh mode, schedule, filters).
        groups: The group snapshots (property values, tracked groups, schedule).
        events: The events, one partition per UTC day, through HogQL (off unless given).
        persons: The persons and their distinct ids, through HogQL (off unless given).
        duckdb_path: The DuckDB file of the snapshots and the exports log.
        translation: Asset attributes for every asset (``key``, ``group_name``, ``tags``, ...).
    """

    project: Annotated[
        ProjectSettings,
        dg.Resolver(
            resolve_project,
            model_field_type=dict[str, Any],
            inject_before_resolve=False,
            description="name (default: 'default'), and any PostHogResource field: host, "
            "project_id, personal_api_key ('{{ env.NAME }}'), api_prefix, allow_insecure_http, "
            "export_dir, timeouts, retries, rate limits. Left out: everything from "
            "POSTHOG_HOST, POSTHOG_PROJECT_ID and POSTHOG_PERSONAL_API_KEY.",
        ),
    ] = Field(default_factory=default_project)
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
    events: Annotated[
        EventsConfig | None,
        dg.Resolver(
            validated("events", TypeAdapter(EventsConfig | None)),
            model_field_type=dict[str, Any] | None,
            description="The daily-partitioned posthog/events asset (off unless given): "
            "start_date, event_names, properties, lookback_days, page_size, min_window_s, "
            "schedule.",
        ),
    ] = None
    persons: Annotated[
        PersonsConfig | None,
        dg.Resolver(
            validated("persons", TypeAdapter(PersonsConfig | None)),
            model_field_type=dict[str, Any] | None,
            description="The posthog/persons and posthog/person_distinct_ids snapshot (off "
            "unless given): enabled, page_size, schedule.",
        ),
    ] = None
    catalog: Annotated[
        tuple[str, ...],
        dg.Resolver(
            lambda _, raw: _catalog(raw),
            model_field_type=str | list[str] | None,
            description="'all', or a list of annotations, cohorts, feature_flags, actions, "
            "dashboards, experiments, experiment_results (off unless given; 'all' leaves out "
            "experiment_results, which spend the query budget): daily snapshot tables.",
        ),
    ] = ()
    duckdb_path: str = DEFAULT_DUCKDB_PATH
    translation: (
        Annotated[
            TranslationFn,
            TranslationFnResolver(template_vars_for_translation_fn=_translation_vars),
        ]
        | None
    ) = Field(
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

    # ---------------------------------------------------------------- hooks

    def get_asset_spec(self, props: PostHogProps) -> dg.AssetSpec:
        """The spec of every asset this component builds (exports, snapshot tables); checks,
        jobs and sensors follow the keys it gives. Override to customise in Python, or set
        ``translation:`` in ``defs.yaml``.

        Example:
            .. code-block:: python

                class MyPostHog(PostHogProjectComponent):
                    def get_asset_spec(self, props):
                        spec = super().get_asset_spec(props)
                        return spec.replace_attributes(owners=["team:analytics"])
        """
        spec = DagsterPostHogTranslator().get_asset_spec(props)
        return self.translation(spec, props) if self.translation is not None else spec

    def execute(
        self, context: dg.AssetExecutionContext, posthog: PostHogResource
    ) -> Iterable[dg.MaterializeResult]:
        """Runs the export step: every selected export, concurrently. Override to add work
        before or after, or to post-process what it yields.

        Example:
            .. code-block:: python

                class MyPostHog(PostHogProjectComponent):
                    def execute(self, context, posthog):
                        for result in super().execute(context, posthog):
                            context.log.info(f"exported {result.asset_key}")
                            yield result
        """
        return posthog_exports(context, posthog)

    @cached_property
    def translator(self) -> DagsterPostHogTranslator:
        return _ComponentTranslator(self)

    # ---------------------------------------------------------------- state

    @property
    def defs_state_config(self) -> DefsStateConfig:
        return DefsStateConfig.from_args(
            self.defs_state, default_key=f"PostHogProjectComponent[{self.project.name}]"
        )

    def write_state_to_path(self, state_path: Path) -> None:
        """Read the project's insights and dashboards with the project's own client (its
        retries, timeouts and rate limits); a failure ends ``dg utils refresh-defs-state`` with
        its reason, not a traceback, and keeps the old state."""
        insight_tags, dashboard_tags = selected_tags(self.exports)
        project = self.project
        try:
            missing = [
                project.source(f) for f in ("host", "project_id") if project.current(f) is None
            ]
            if missing:
                raise ValueError(
                    "cannot read the project's insights and dashboards: "
                    f"{' and '.join(missing)} not set"
                )
            client = project.resource.process_config_and_initialize().get_client(log=logger)
            try:
                state = fetch_project_state(
                    client, insight_tags=insight_tags, dashboard_tags=dashboard_tags
                )
            finally:
                client.close()
        except (PostHogError, ValueError, dg.DagsterError) as exc:
            raise StateRefreshFailed(
                f"the PostHog state of project '{project.name}' was not refreshed (the "
                f"stored one, if any, is kept): {exc}"
            ) from None
        write_state(state_path, state)

    def build_defs_from_state(
        self, context: ComponentLoadContext, state_path: Path | None
    ) -> dg.Definitions:
        self._claim_name(context)
        state = None
        if any(needs_state(e) for e in self.exports):
            if state_path is None or not state_path.exists():
                state_path = self._state_when_missing(context)
            state = read_state(state_path)
            self._check_state_is_of_this_project(context, state)
        return build_project_definitions(
            self.build_project(state, where=str(context.path)),
            translator=self.translator,
            execute=self.execute,
        )

    def build_project(self, state: ProjectState | None, *, where: str) -> PostHogProject:
        """The project, its selections resolved (against ``state`` where they need it)."""
        warnings: list[str] = []
        try:
            exports = select_exports(self.exports, state, warnings) if self.exports else []
        except SelectionError as exc:
            raise ValueError(f"{where}: {exc}") from None
        for warning in warnings:
            logger.warning("%s: %s", where, warning)
        return PostHogProject(
            resource=self.project.resource,
            name=self.project.name,
            exports=tuple(exports),
            insights=self.insights,
            groups=self.groups,
            events=self.events,
            persons=self.persons,
            catalog=self.catalog,
            duckdb_path=self.duckdb_path,
        )

    def _claim_name(self, context: ComponentLoadContext) -> None:
        """Two components of one name would share a resource key, asset keys and a stored
        state: fail naming both files."""
        tree = getattr(context, "component_tree", None)
        if tree is None:
            return
        if id(tree) not in _NAMES or _NAMES[id(tree)][0] is not tree:
            _NAMES[id(tree)] = (tree, {})
            while len(_NAMES) > _NAMES_KEPT:
                _NAMES.popitem(last=False)
        taken = _NAMES[id(tree)][1]
        here = context.path / "defs.yaml" if context.path.is_dir() else context.path
        other = taken.setdefault(self.project.name, here)
        if other != here:
            raise ValueError(
                f"{here} and {other} both configure the PostHog project named "
                f"'{self.project.name}': give one of them another project.name (each project "
                "gets its own resource, asset keys and stored state)"
            )

    def _check_state_is_of_this_project(
        self, context: ComponentLoadContext, state: ProjectState
    ) -> None:
        """The selections resolve against what the state was read from: after the host or the
        project id changed (or its variable is unset) they would name another project's
        objects, and the first launch would fail minutes later."""
        project = self.project
        fix = "run `dg utils refresh-defs-state` to read the state of the project configured now"
        unset = [project.source(f) for f in ("host", "project_id") if project.current(f) is None]
        if unset:
            verb = "are" if len(unset) > 1 else "is"
            raise ValueError(
                f"{context.path}: the stored PostHog state was read from {state.host}, project "
                f"{state.project_id}, but {' and '.join(unset)} {verb} not set, so nothing says "
                f"it is this project's: set it, or {fix}"
            )
        now = (
            _normal_host(str(project.current("host"))),
            _normal_project_id(str(project.current("project_id"))),
        )
        then = (_normal_host(state.host), _normal_project_id(str(state.project_id)))
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
            project = self.project
            raise ValueError(
                f"{context.path}: the stored PostHog state of this component is missing, so its "
                "export selections cannot be resolved. Run `dg utils refresh-defs-state` where "
                "the code location is built (it reads the project's insights and dashboards "
                f"from {project.current('host') or project.source('host')}, project "
                f"{project.current('project_id') or project.source('project_id')})."
            )
        asyncio.run(self.refresh_state(context.project_root))
        from dagster.components.utils.project_paths import get_local_state_path

        return get_local_state_path(self.defs_state_config.key, context.project_root)


def _normal_host(host: str) -> str:
    try:
        return validate_host(host, allow_http=True).lower()
    except ValueError:
        return host.strip().rstrip("/").lower()


def _normal_project_id(value: str) -> str:
    try:
        return str(parse_project_id(value))
    except ValueError:
        return value


class _ComponentTranslator(DagsterPostHogTranslator):
    """Every spec through the component's :meth:`~PostHogProjectComponent.get_asset_spec`."""

    def __init__(self, component: PostHogProjectComponent) -> None:
        self.component = component

    def get_asset_spec(self, props: PostHogProps) -> dg.AssetSpec:
        return self.component.get_asset_spec(props)

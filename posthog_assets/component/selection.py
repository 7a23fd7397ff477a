"""Which insights and dashboards to export, chosen by selection rather than hand-typed ids.

Each entry of a component's ``exports:`` selects objects of the stored project state (by id,
short id, tag, dashboard membership, name search, favourites, or every dashboard) in one format;
each becomes one export asset. Names are stable: an insight's comes from its short id (a renamed
insight keeps its asset), a dashboard's from its id, unless the entry names its single object.
An entry naming its object by numeric id (``insight: 42``) needs no stored state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from posthog_assets.component.state import DashboardRecord, InsightRecord, ProjectState
from posthog_assets.config import (
    EXPORT_FORMATS,
    PDF,
    PDF_REFUSED,
    PNG,
    ExportConfig,
    ExportFormat,
    matching,
)

_SELECTORS = ("insight", "insights", "dashboard", "dashboards")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InsightFilter(_Strict):
    """Insights matching every given criterion."""

    ids: list[int] | None = Field(default=None, description="Numeric insight ids.")
    short_ids: list[str] | None = Field(default=None, description="8-character short ids.")
    tag: str | None = Field(default=None, description="Insights carrying this tag.")
    dashboard: int | str | None = Field(
        default=None, description="Insights on this dashboard (its id or exact name)."
    )
    search: str | None = Field(
        default=None, description="Name contains this text (case-insensitive)."
    )
    favorited: bool | None = Field(default=None, description="Only (or never) favourites.")

    @model_validator(mode="after")
    def _not_empty(self) -> InsightFilter:
        if all(v is None for v in self.model_dump().values()):
            raise ValueError(
                "give at least one of ids, short_ids, tag, dashboard, search, favorited"
            )
        return self


class DashboardFilter(_Strict):
    """Dashboards matching every given criterion."""

    ids: list[int] | None = None
    tag: str | None = None
    search: str | None = Field(default=None, description="Name contains this text.")


class ExportSelection(_Strict):
    """One entry of ``exports:``: what to export, in which format."""

    insight: int | str | None = Field(
        default=None, description="One insight: numeric id or 8-character short id."
    )
    insights: InsightFilter | None = Field(default=None, description="Insights by filter.")
    dashboard: int | str | None = Field(
        default=None, description="One dashboard: id or exact name."
    )
    dashboards: Literal["all"] | DashboardFilter | None = Field(
        default=None, description="'all', or dashboards by filter."
    )
    format: ExportFormat = Field(default=PNG, description="image/png, text/csv or the XLSX MIME.")
    name: str | None = Field(
        default=None, description="Asset name, for an entry that selects exactly one object."
    )
    export_context: dict[str, Any] | None = None
    description: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else matching(value, r"^[A-Za-z][A-Za-z0-9_]*$", "a name")

    @field_validator("format", mode="before")
    @classmethod
    def _renderable(cls, value: Any) -> Any:
        if value == PDF:
            raise ValueError(PDF_REFUSED)
        return value

    @field_validator("insight", "dashboard")
    @classmethod
    def _positive_id(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"an id must be a positive integer, got {value}")
        return value

    @model_validator(mode="after")
    def _one_selector(self) -> ExportSelection:
        given = [k for k in _SELECTORS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of insight, insights, dashboard, dashboards"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.name and self.selector in ("insights", "dashboards"):
            raise ValueError("name is only for an entry that selects one insight or dashboard")
        return self

    @property
    def selector(self) -> str:
        return next(k for k in _SELECTORS if getattr(self, k) is not None)

    def describe(self) -> str:
        value = getattr(self, self.selector)
        shown = value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else value
        return f"{self.selector}: {shown}"


class SelectionError(ValueError):
    """An entry selects nothing, or names an object the stored state does not have."""


def selected_tags(selections: Sequence[ExportSelection]) -> tuple[set[str], set[str]]:
    """The insight tags and dashboard tags the selections filter by (the state refresh asks
    PostHog which objects carry them)."""
    insight_tags = {e.insights.tag for e in selections if e.insights and e.insights.tag}
    dashboard_tags = {
        e.dashboards.tag
        for e in selections
        if isinstance(e.dashboards, DashboardFilter) and e.dashboards.tag
    }
    return insight_tags, dashboard_tags


def needs_state(entry: ExportSelection) -> bool:
    """Whether resolving the entry needs the stored state (everything but a numeric id)."""
    return not isinstance(getattr(entry, entry.selector), int)


def select_exports(
    selections: Sequence[ExportSelection],
    state: ProjectState | None,
    warnings: list[str] | None = None,
) -> list[ExportConfig]:
    """Resolve every entry into export configurations (one per object), against ``state``
    where the entry needs it.

    A filter that matches nothing adds a line to ``warnings`` and no asset: a tag removed in
    PostHog must not take the code location down. A single object the state does not have, or a
    name given twice, raises :class:`SelectionError` naming the entry and what could explain it.
    """
    exports: dict[str, ExportConfig] = {}
    origin: dict[str, tuple[str, str]] = {}  # asset name: (the entry, its object) that took it
    for index, entry in enumerate(selections):
        where = f"exports[{index}] ({entry.describe()})"
        if entry.selector in ("dashboard", "dashboards") and entry.format != PNG:
            raise SelectionError(f"{where}: PostHog exports a dashboard only as image/png")
        targets = _targets(entry, state, where, warnings if warnings is not None else [])
        for kind, object_id, name in targets:
            if name in origin:
                first, target = origin[name]
                raise SelectionError(
                    f"{where} selects {kind} {object_id} a second time, as {first} did"
                    if target == f"{kind} {object_id}"
                    else f"{where} names its asset {name!r}, as {first} does for "
                    f"{target}: give one of them another name"
                )
            origin[name] = (f"exports[{index}]", f"{kind} {object_id}")
            exports[name] = ExportConfig(
                name=name,
                format=entry.format,
                export_context=entry.export_context,
                description=entry.description,
                **{kind: object_id},
            )
    return list(exports.values())


def _targets(
    entry: ExportSelection, state: ProjectState | None, where: str, warnings: list[str]
) -> list[tuple[str, int, str]]:
    """(kind, id, asset name) of every object the entry selects."""
    ext = EXPORT_FORMATS[entry.format]
    if isinstance(entry.insight, int):
        return [("insight", entry.insight, entry.name or f"insight_{entry.insight}_{ext}")]
    if isinstance(entry.dashboard, int):
        return [("dashboard", entry.dashboard, entry.name or f"dashboard_{entry.dashboard}_{ext}")]
    if state is None:
        raise SelectionError(f"{where} needs the stored state, and none was read")
    kind = "insight" if entry.selector in ("insight", "insights") else "dashboard"
    if kind == "insight":
        found = [(i.id, i.short_id or i.id) for i in _insights(entry, state, where)]
    else:
        found = [(d.id, d.id) for d in _dashboards(entry, state, where)]
    targets = [(kind, id_, entry.name or f"{kind}_{label}_{ext}") for id_, label in found]
    if not targets:
        empty = f"{where} matches no {kind} of the state of {state.fetched_at}"
        why = _why_nothing(entry, state, kind)
        if entry.selector == kind:  # one object, named: a mistake in the file
            raise SelectionError(f"{empty}. {why}")
        warnings.append(f"{empty}, so it builds no asset. {why}")
    return targets


def _insights(entry: ExportSelection, state: ProjectState, where: str) -> list[InsightRecord]:
    if entry.insight is not None:
        wanted = str(entry.insight)
        return [i for i in state.insights if str(i.id) == wanted or i.short_id == wanted][:1]
    f = entry.insights
    assert f is not None
    board_ids: set[int] | None = None
    if f.dashboard is not None:
        board_ids = {d.id for d in _one_dashboard(f.dashboard, state, where)}
    tagged = set(state.insight_tags[f.tag]) if f.tag in state.insight_tags else None
    return [
        i
        for i in state.insights
        if (f.ids is None or i.id in f.ids)
        and (f.short_ids is None or i.short_id in f.short_ids)
        and (f.tag is None or (i.id in tagged if tagged is not None else f.tag in i.tags))
        and (board_ids is None or board_ids.intersection(i.dashboards))
        and (f.search is None or f.search.lower() in i.title.lower())
        and (f.favorited is None or i.favorited == f.favorited)
    ]


def _dashboards(entry: ExportSelection, state: ProjectState, where: str) -> list[DashboardRecord]:
    if entry.dashboard is not None:
        return _one_dashboard(entry.dashboard, state, where)
    f = entry.dashboards
    if f == "all":
        return list(state.dashboards)
    assert isinstance(f, DashboardFilter)
    tagged = set(state.dashboard_tags[f.tag]) if f.tag in state.dashboard_tags else None
    return [
        d
        for d in state.dashboards
        if (f.ids is None or d.id in f.ids)
        and (f.tag is None or (d.id in tagged if tagged is not None else f.tag in d.tags))
        and (f.search is None or f.search.lower() in d.name.lower())
    ]


def _one_dashboard(wanted: int | str, state: ProjectState, where: str) -> list[DashboardRecord]:
    """The dashboard with this id, else the one with exactly this name; PostHog does not make
    names unique, so two of one name are an error naming both."""
    by_id = [d for d in state.dashboards if str(d.id) == str(wanted)]
    if by_id:
        return by_id
    named = [d for d in state.dashboards if d.name == str(wanted)]
    if len(named) > 1:
        ids = " and ".join(str(d.id) for d in named)
        raise SelectionError(
            f"{where}: {len(named)} dashboards are named {str(wanted)!r} (ids {ids}): select "
            "one by its id"
        )
    return named


def _why_nothing(entry: ExportSelection, state: ProjectState, kind: str) -> str:
    """What could explain an empty selection of ``kind`` (insight or dashboard), by criterion."""
    single = entry.insight if kind == "insight" else entry.dashboard
    f = entry.insights if kind == "insight" else entry.dashboards
    known_tags = state.insight_tags if kind == "insight" else state.dashboard_tags
    reasons = []
    if single is not None:
        named = "id or short id" if kind == "insight" else "id or exact name"
        reasons.append(f"no {kind} has the {named} {single!r}")
    if f == "all":
        reasons.append("the project has no dashboard")
    elif isinstance(f, BaseModel):
        given = {k: v for k, v in f.model_dump().items() if v is not None}
        if "tag" in given and given["tag"] in known_tags:
            reasons.append(f"no {kind} carries the tag {given['tag']!r} (tags match exactly)")
        elif "tag" in given:
            reasons.append(
                f"the state was read before a selection named the tag {given['tag']!r}, so it "
                f"does not know which {kind}s carry it"
            )
        if "dashboard" in given:
            reasons.append(f"no dashboard with id or exact name {given['dashboard']!r} holds one")
        if "search" in given:
            reasons.append(f"no {kind}'s name contains {given['search']!r} (names only)")
        if "ids" in given or "short_ids" in given:
            reasons.append("none of the listed ids exists")
        if "favorited" in given:
            reasons.append(f"no insight is {'a' if given['favorited'] else 'not a'} favourite")
        if len(given) > 1:
            reasons.append(f"no {kind} meets every criterion at once (they are AND-ed)")
    reasons.append(f"the {kind} was created after the state was read")
    hint = "Run `dg utils refresh-defs-state` after changing the selection or the project."
    return f"Possible reasons: {'; '.join(reasons)}. {hint}"

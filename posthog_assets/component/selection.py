"""Which insights and dashboards to export, chosen by selection rather than hand-typed ids.

Each entry of a component's ``exports:`` selects one or more objects of the stored project state
(by id, short id, tag, dashboard membership, name search, favourites, or every dashboard) and
gives their format; each selected object becomes one export asset. Asset names are stable: an
insight's comes from its short id (a renamed insight keeps its asset), a dashboard's from its id,
unless the entry names a single object itself.
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

    @model_validator(mode="after")
    def _one_selector(self) -> ExportSelection:
        given = [k for k in ("insight", "insights", "dashboard", "dashboards") if getattr(self, k)]
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
        kinds = ("insight", "insights", "dashboard", "dashboards")
        return next(k for k in kinds if getattr(self, k))

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


def select_exports(
    selections: Sequence[ExportSelection], state: ProjectState
) -> list[ExportConfig]:
    """Resolve every entry against the stored state into export configurations (one per object).

    Raises:
        SelectionError: An entry matched nothing, or a name that is not unique (the message
            names the entry, and what could explain it).
    """
    exports: dict[str, ExportConfig] = {}
    origin: dict[str, str] = {}
    for index, entry in enumerate(selections):
        where = f"exports[{index}] ({entry.describe()})"
        if entry.selector in ("insight", "insights"):
            insights = _insights(entry, state, where)
            if not insights:
                raise SelectionError(
                    f"{where} matches no insight of the state of {state.fetched_at}. "
                    + _why_no_insight(entry, state)
                )
            targets = [("insight", i.id, _insight_name(i, entry)) for i in insights]
        else:
            if entry.format != PNG:
                raise SelectionError(f"{where}: PostHog exports a dashboard only as image/png")
            boards = _dashboards(entry, state, where)
            if not boards:
                raise SelectionError(
                    f"{where} matches no dashboard of the state of {state.fetched_at}. "
                    + _why_no_dashboard(entry, state)
                )
            targets = [("dashboard", d.id, _dashboard_name(d, entry)) for d in boards]
        for kind, object_id, name in targets:
            if name in exports:
                earlier = exports[name]
                target = (
                    f"insight {earlier.insight}"
                    if earlier.insight
                    else f"dashboard {earlier.dashboard}"
                )
                raise SelectionError(
                    f"{where} selects {kind} {object_id} a second time, as {origin[name]} did"
                    if target == f"{kind} {object_id}"
                    else f"{where} names its asset {name!r}, as {origin[name]} does for "
                    f"{target}: give one of them another name"
                )
            origin[name] = f"exports[{index}]"
            exports[name] = ExportConfig(
                name=name,
                export_format=entry.format,
                export_context=entry.export_context,
                description=entry.description,
                **{kind: object_id},
            )
    return list(exports.values())


def _insights(entry: ExportSelection, state: ProjectState, where: str) -> list[InsightRecord]:
    if entry.insight is not None:
        wanted = str(entry.insight)
        return [i for i in state.insights if str(i.id) == wanted or i.short_id == wanted][:1]
    f = entry.insights
    assert f is not None
    board_ids: set[int] | None = None
    if f.dashboard is not None:
        board_ids = {d.id for d in _one_dashboard(f.dashboard, state, where)}
    tagged = None
    if f.tag is not None and f.tag in state.insight_tags:
        tagged = set(state.insight_tags[f.tag])
    found = []
    for i in state.insights:
        if f.ids is not None and i.id not in f.ids:
            continue
        if f.short_ids is not None and i.short_id not in f.short_ids:
            continue
        if f.tag is not None and not (i.id in tagged if tagged is not None else f.tag in i.tags):
            continue
        if board_ids is not None and not board_ids.intersection(i.dashboards):
            continue
        if f.search is not None and f.search.lower() not in i.title.lower():
            continue
        if f.favorited is not None and i.favorited != f.favorited:
            continue
        found.append(i)
    return found


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


def _why_no_insight(entry: ExportSelection, state: ProjectState) -> str:
    """What could explain an empty selection, for the criteria it uses."""
    reasons = []
    f = entry.insights
    if entry.insight is not None:
        reasons.append(f"no insight has the id or short id {entry.insight!r}")
    if f is not None:
        if f.tag is not None:
            if f.tag in state.insight_tags:
                reasons.append(f"no insight carries the tag {f.tag!r} (tags match exactly)")
            else:
                reasons.append(
                    f"the state was read before a selection named the tag {f.tag!r}, so it "
                    "does not know which insights carry it"
                )
        if f.dashboard is not None:
            reasons.append(f"no dashboard with id or exact name {f.dashboard!r} holds an insight")
        if f.search is not None:
            reasons.append(f"no insight's name contains {f.search!r} (names only)")
        if f.ids is not None or f.short_ids is not None:
            reasons.append("none of the listed ids exists")
        if f.favorited is not None:
            reasons.append(f"no insight is {'a' if f.favorited else 'not a'} favourite")
        if len([v for v in f.model_dump().values() if v is not None]) > 1:
            reasons.append("no insight meets every criterion at once (they are AND-ed)")
    reasons.append("the object was created after the state was read")
    return (
        "Possible reasons: "
        + "; ".join(reasons)
        + ". Run `dg utils refresh-defs-state` after changing the selection or the project."
    )


def _why_no_dashboard(entry: ExportSelection, state: ProjectState) -> str:
    reasons = []
    if entry.dashboard is not None:
        reasons.append(f"no dashboard has the id or exact name {entry.dashboard!r}")
    f = entry.dashboards
    if isinstance(f, DashboardFilter):
        if f.tag is not None and f.tag not in state.dashboard_tags:
            reasons.append(
                f"the state was read before a selection named the tag {f.tag!r}, so it does "
                "not know which dashboards carry it"
            )
        elif f.tag is not None:
            reasons.append(f"no dashboard carries the tag {f.tag!r} (tags match exactly)")
        if f.search is not None:
            reasons.append(f"no dashboard's name contains {f.search!r}")
        if f.ids is not None:
            reasons.append("none of the listed ids exists")
    if f == "all":
        reasons.append("the project has no dashboard")
    reasons.append("the dashboard was created after the state was read")
    return (
        "Possible reasons: "
        + "; ".join(reasons)
        + ". Run `dg utils refresh-defs-state` after changing the selection or the project."
    )


def _insight_name(insight: InsightRecord, entry: ExportSelection) -> str:
    return entry.name or f"insight_{insight.short_id or insight.id}_{EXPORT_FORMATS[entry.format]}"


def _dashboard_name(board: DashboardRecord, entry: ExportSelection) -> str:
    return entry.name or f"dashboard_{board.id}_{EXPORT_FORMATS[entry.format]}"

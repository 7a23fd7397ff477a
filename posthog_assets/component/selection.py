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
from posthog_assets.config import EXPORT_FORMATS, PNG, ExportConfig, ExportFormat, matching


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


def select_exports(
    selections: Sequence[ExportSelection], state: ProjectState
) -> list[ExportConfig]:
    """Resolve every entry against the stored state into export configurations (one per object).

    Raises:
        SelectionError: An entry matched nothing (the message names the entry and its selector).
    """
    exports: dict[str, ExportConfig] = {}
    for index, entry in enumerate(selections):
        where = f"exports[{index}] ({entry.describe()})"
        if entry.selector in ("insight", "insights"):
            insights = _insights(entry, state)
            if not insights:
                raise SelectionError(
                    f"{where} matches no insight of the state of {state.fetched_at}"
                )
            targets = [("insight", i.id, _insight_name(i, entry)) for i in insights]
        else:
            if entry.format != PNG:
                raise SelectionError(f"{where}: PostHog exports a dashboard only as image/png")
            boards = _dashboards(entry, state)
            if not boards:
                raise SelectionError(
                    f"{where} matches no dashboard of the state of {state.fetched_at}"
                )
            targets = [("dashboard", d.id, _dashboard_name(d, entry)) for d in boards]
        for kind, object_id, name in targets:
            if name in exports:
                raise SelectionError(f"{where} selects {kind} {object_id} a second time ({name})")
            exports[name] = ExportConfig(
                name=name,
                export_format=entry.format,
                export_context=entry.export_context,
                description=entry.description,
                **{kind: object_id},
            )
    return list(exports.values())


def _insights(entry: ExportSelection, state: ProjectState) -> list[InsightRecord]:
    if entry.insight is not None:
        wanted = str(entry.insight)
        return [i for i in state.insights if str(i.id) == wanted or i.short_id == wanted][:1]
    f = entry.insights
    assert f is not None
    board_ids: set[int] | None = None
    if f.dashboard is not None:
        board_ids = {d.id for d in state.dashboards if _is_dashboard(d, f.dashboard)}
    found = []
    for i in state.insights:
        if f.ids is not None and i.id not in f.ids:
            continue
        if f.short_ids is not None and i.short_id not in f.short_ids:
            continue
        if f.tag is not None and f.tag not in i.tags:
            continue
        if board_ids is not None and not board_ids.intersection(i.dashboards):
            continue
        if f.search is not None and f.search.lower() not in i.title.lower():
            continue
        if f.favorited is not None and i.favorited != f.favorited:
            continue
        found.append(i)
    return found


def _dashboards(entry: ExportSelection, state: ProjectState) -> list[DashboardRecord]:
    if entry.dashboard is not None:
        return [d for d in state.dashboards if _is_dashboard(d, entry.dashboard)][:1]
    f = entry.dashboards
    if f == "all":
        return list(state.dashboards)
    assert isinstance(f, DashboardFilter)
    return [
        d
        for d in state.dashboards
        if (f.ids is None or d.id in f.ids)
        and (f.tag is None or f.tag in d.tags)
        and (f.search is None or f.search.lower() in d.name.lower())
    ]


def _is_dashboard(board: DashboardRecord, wanted: int | str) -> bool:
    return str(board.id) == str(wanted) or board.name == str(wanted)


def _insight_name(insight: InsightRecord, entry: ExportSelection) -> str:
    return entry.name or f"insight_{insight.short_id or insight.id}_{EXPORT_FORMATS[entry.format]}"


def _dashboard_name(board: DashboardRecord, entry: ExportSelection) -> str:
    return entry.name or f"dashboard_{board.id}_{EXPORT_FORMATS[entry.format]}"

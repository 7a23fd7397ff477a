"""What a component needs to know about its PostHog project, fetched once and stored.

``dg utils refresh-defs-state`` writes it (one metadata-only pass over the insights list and one
over the dashboards, no calculation); loading the definitions only reads it, so a code-location
reload never spends rate limit and works with PostHog unreachable.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import click

from posthog_assets.api.client import PostHogClient

STATE_VERSION = 2
#: States this version reads (version 1 has no tag memberships: a tag selection asks to refresh).
READABLE_VERSIONS = (1, 2)
#: Dashboards are few: one page of this many (so no order is needed), checked against ``count``.
DASHBOARDS_PAGE = 1000


@dataclass(frozen=True)
class InsightRecord:
    id: int
    short_id: str
    name: str | None
    derived_name: str | None
    tags: list[str] = field(default_factory=list)
    favorited: bool = False
    dashboards: list[int] = field(default_factory=list)

    @property
    def title(self) -> str:
        return self.name or self.derived_name or f"insight {self.id}"


@dataclass(frozen=True)
class DashboardRecord:
    id: int
    name: str
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ProjectState:
    """The project's insights and dashboards when the state was refreshed."""

    host: str
    project_id: str
    fetched_at: str
    insights: list[InsightRecord]
    dashboards: list[DashboardRecord]
    #: Ids of the insights (dashboards) carrying each tag a selection names, as PostHog's own
    #: ``tags`` filter finds them: the ``tags`` of list responses are empty unless the key
    #: owner's organisation has paid tagging, while the filter works for everyone.
    insight_tags: dict[str, list[int]] = field(default_factory=dict)
    dashboard_tags: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"version": STATE_VERSION, **asdict(self)}, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ProjectState:
        data = json.loads(text)
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"stored PostHog state has version {data.get('version')}, expected "
                f"{STATE_VERSION}: run `dg utils refresh-defs-state` again"
            )
        return cls(
            host=data["host"],
            project_id=str(data["project_id"]),
            fetched_at=data["fetched_at"],
            insights=[InsightRecord(**i) for i in data["insights"]],
            dashboards=[DashboardRecord(**d) for d in data["dashboards"]],
            insight_tags={str(k): list(v) for k, v in (data.get("insight_tags") or {}).items()},
            dashboard_tags={str(k): list(v) for k, v in (data.get("dashboard_tags") or {}).items()},
        )


class StateRefreshFailed(click.ClickException):
    """The state could not be read: a click error, so ``dg`` prints the message, no traceback."""


class StateIncomplete(ValueError):
    """Fewer insights were read than PostHog's ``count`` says exist."""


def fetch_project_state(
    client: PostHogClient, *, insight_tags: Iterable[str] = (), dashboard_tags: Iterable[str] = ()
) -> ProjectState:
    """Read the project's insights (metadata only, ``order=id``, checked against ``count``) and
    dashboards, and which of them carry each of the given tags (PostHog's own filter)."""
    insights: dict[int, InsightRecord] = {}
    reported: int | None = None
    for page in client.iter_insight_pages(basic=True):
        reported = page.count if reported is None else reported
        for i in page.results:
            insights[int(i["id"])] = InsightRecord(
                id=int(i["id"]),
                short_id=str(i.get("short_id") or ""),
                name=i.get("name"),
                derived_name=i.get("derived_name"),
                tags=[str(t) for t in i.get("tags") or []],
                favorited=bool(i.get("favorited")),
                dashboards=[int(d) for d in i.get("dashboards") or []],
            )
    if reported is not None and len(insights) < reported:
        now = client.list_insights(limit=1, basic=True).get("count")
        expected = min(reported, now) if isinstance(now, int) else reported
        if len(insights) < expected:
            raise StateIncomplete(
                f"read {len(insights)} distinct insights but PostHog reports {expected}: the "
                "list changed while it was read (insights added or deleted); run "
                "`dg utils refresh-defs-state` again"
            )
    page = client.get_json("dashboards/", {"limit": DASHBOARDS_PAGE}, scopes=("dashboard:read",))
    results = list(page.get("results") or [])
    if page.get("next") or len(results) < int(page.get("count") or 0):
        raise ValueError(f"more than {DASHBOARDS_PAGE} dashboards: not supported yet")
    dashboards = [
        DashboardRecord(
            id=int(d["id"]), name=str(d.get("name") or ""), tags=list(d.get("tags") or [])
        )
        for d in results
        if not d.get("deleted")
    ]
    tagged_insights = {
        tag: sorted(
            int(i["id"])
            for page in client.iter_insight_pages(basic=True, tags=json.dumps([tag]))
            for i in page.results
        )
        for tag in sorted(set(insight_tags))
    }
    tagged_dashboards = {
        tag: sorted(
            int(d["id"])
            for d in client.get_json(
                "dashboards/", {"limit": DASHBOARDS_PAGE, "tags": tag}, scopes=("dashboard:read",)
            ).get("results")
            or []
        )
        for tag in sorted(set(dashboard_tags))
    }
    return ProjectState(
        host=client.host,
        project_id=str(client.project_id),
        fetched_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        insights=list(insights.values()),
        dashboards=dashboards,
        insight_tags=tagged_insights,
        dashboard_tags=tagged_dashboards,
    )


def write_state(path: Path, state: ProjectState) -> None:
    """Atomically: a load never reads half a state, and two refreshes never mix theirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(state.to_json())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(path: Path) -> ProjectState:
    """The stored state; a torn, empty or foreign file is named with the command to rewrite it."""
    try:
        return ProjectState.from_json(path.read_text())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(
            f"the stored PostHog state {path} cannot be read ({type(exc).__name__}: {detail}): "
            "run `dg utils refresh-defs-state` to write it again"
        ) from None

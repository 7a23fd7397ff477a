"""Projects and dashboards: just enough for ``@current``, multi-project setups and the dashboard
foreign key of exports."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

from . import errors
from .auth import Ctx
from .pagination import limit_offset_page
from .seed import USERS, Dashboard, Insight, Project, iso_z
from .state import KeyInfo, State


def visible_projects(state: State, key: KeyInfo) -> list[Project]:
    allowed = [
        p for p in state.seed.projects.values() if key.projects is None or p.id in key.projects
    ]
    return [p for p in allowed if key.user_projects is None or p.id in key.user_projects]


async def list_projects(ctx: Ctx) -> Response:
    """``GET /api/projects/``: the projects this key may use (``ctx.project`` is unused here)."""
    projects = visible_projects(ctx.state, ctx.key)
    page = limit_offset_page(
        ctx.request,
        len(projects),
        lambda offset, limit: [p.to_json() for p in projects[offset : offset + limit]],
    )
    return JSONResponse(page)


async def retrieve_project(ctx: Ctx) -> Response:
    return JSONResponse(ctx.project.to_json())


def dashboard_json(state: State, board: Dashboard, with_tiles: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": board.id,
        "name": board.name,
        "description": f"Seeded dashboard {board.index}.",
        "pinned": board.pinned,
        "created_at": iso_z(Insight(board.project, 0).created_at),
        "created_by": USERS[board.index % len(USERS)],
        "deleted": False,
        "tags": board.tags if state.config.tagging_licensed else [],
        "filters": {},
    }
    if with_tiles:
        tiles = []
        for i in board.insight_indexes():
            insight = Insight(board.project, i)
            tiles.append(
                {
                    "id": insight.id * 10,
                    "insight": {
                        "id": insight.id,
                        "short_id": insight.short_id,
                        "name": insight.name,
                        "derived_name": insight.derived_name,
                    },
                    "color": None,
                    "layouts": {},
                }
            )
        body["tiles"] = tiles
    return body


async def list_dashboards(ctx: Ctx) -> Response:
    """``DashboardsViewSet``: ordered ``("-pinned", "name")`` (names need not be unique);
    ``?tags=a&tags=b`` (repeated, any of them) filters without a licence check."""
    project = ctx.project
    boards = [Dashboard(project, d) for d in range(project.n_dashboards)]
    wanted = set(ctx.request.query_params.getlist("tags"))
    if wanted:
        boards = [b for b in boards if wanted.intersection(b.tags)]
    boards.sort(key=lambda b: (not b.pinned, b.name, b.id))
    page = limit_offset_page(
        ctx.request,
        len(boards),
        lambda offset, limit: [
            dashboard_json(ctx.state, b, with_tiles=False) for b in boards[offset : offset + limit]
        ],
    )
    return JSONResponse(page)


async def retrieve_dashboard(ctx: Ctx) -> Response:
    raw = ctx.request.path_params["dashboard_id"]
    board = ctx.state.seed.dashboard_by_id(int(raw)) if raw.isdigit() else None
    if board is None or board.project.id != ctx.project.id:
        raise errors.not_found()
    return JSONResponse(dashboard_json(ctx.state, board, with_tiles=True))

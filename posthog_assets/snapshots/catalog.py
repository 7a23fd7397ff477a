"""The rest of a PostHog project as daily snapshot tables: annotations, cohorts, feature flags
(with their variants), actions, dashboards (with which insight sits on which) and experiments.

Each table is its declaration, its flattener and a :class:`Catalog` entry saying how PostHog
lists it (its viewset in ``posthog/api/``):

- a list with a unique ``order`` it accepts (feature flags: ``order=id``) is paged;
- a list with no unique order (annotations ``-date_marker``, cohorts ``-created_at``,
  experiments ``-created_at``: ties come back in any order, so consecutive pages overlap and skip)
  is read as ONE page: a first request learns ``count``, a second asks ``limit=count``;
- actions are not paginated at all (``{"results": [...]}``).

PostHog leaves soft-deleted objects out of its lists; a row that still says ``deleted: true`` is
skipped and counted. Every list is checked against the ``count`` PostHog reported: fewer distinct
objects than that fails the fetch and writes nothing.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from posthog_assets.api.client import PostHogClient
from posthog_assets.api.errors import PostHogError
from posthog_assets.snapshots.source import SnapshotSource, StageRequest
from posthog_assets.tables import Table, columns

CATALOG_GROUP = "posthog_catalog"
#: The first request's page; a longer list without a unique order is then asked as one page.
FIRST_PAGE = 1000

Row = dict[str, Any]


class CatalogIncomplete(PostHogError):
    """Fewer distinct objects were read than PostHog's ``count`` says exist."""


def _table(name: str, description: str, spec: str, key: tuple[str, ...] = ("id",)) -> Table:
    return Table(
        name=name, description=description, group=CATALOG_GROUP, columns=columns(spec), key=key,
        daily=True,
    )  # fmt: skip


ANNOTATIONS = _table(
    "annotations",
    "PostHog's annotations (project and organisation ones), one snapshot a day.",
    """
    id                BIGINT       The annotation's id.
    content           VARCHAR      Its text.
    date_marker       TIMESTAMPTZ  The moment it marks on charts.
    scope             VARCHAR      project, organization, dashboard_item (an insight) or dashboard.
    insight_id        BIGINT       The insight it belongs to (scope dashboard_item).
    insight_short_id  VARCHAR      That insight's short id.
    dashboard_id      BIGINT       The dashboard it belongs to.
    creation_type     VARCHAR      USR (a person) or GIT (an integration).
    created_by        VARCHAR      Its creator's email.
    created_at        TIMESTAMPTZ  When it was created.
    updated_at        TIMESTAMPTZ  When it last changed.
    tags              JSON         Its tags.
    """,
)
COHORTS = _table(
    "cohorts",
    "PostHog's cohorts with their definitions and last calculation, one snapshot a day.",
    """
    id                  BIGINT       The cohort's id.
    name                VARCHAR      Its name.
    description         VARCHAR      Its description.
    is_static           BOOLEAN      A fixed list of people (else computed from filters).
    count               BIGINT       People in it at the last calculation.
    filters             JSON         Its definition (PostHog's filters).
    query               JSON         Its definition as a query, when it has one.
    is_calculating      BOOLEAN      A calculation was running.
    last_calculation    TIMESTAMPTZ  When it was last calculated.
    errors_calculating  INTEGER      Failed calculations in a row.
    created_by          VARCHAR      Its creator's email.
    created_at          TIMESTAMPTZ  When it was created.
    """,
)
FEATURE_FLAGS = _table(
    "feature_flags",
    "PostHog's feature flags, one snapshot a day; their variants are in feature_flag_variants.",
    """
    id                            BIGINT       The flag's id.
    key                           VARCHAR      The key code asks for.
    name                          VARCHAR      Its description.
    active                        BOOLEAN      Whether it is on.
    rollout_percentage            DOUBLE       The rollout of a simple flag (one condition, no
                                               properties); NULL otherwise: see release_conditions.
    release_conditions            JSON         Its condition groups (properties, rollout, variant).
    filters                       JSON         Everything of its definition (groups, variants,
                                               payloads).
    ensure_experience_continuity  BOOLEAN      A person keeps their value across identities.
    tags                          JSON         Its tags.
    version                       BIGINT       Its version.
    created_by                    VARCHAR      Its creator's email.
    created_at                    TIMESTAMPTZ  When it was created.
    updated_at                    TIMESTAMPTZ  When it last changed.
    """,
)
FEATURE_FLAG_VARIANTS = _table(
    "feature_flag_variants",
    "The variants of each multivariate feature flag, one snapshot a day.",
    """
    flag_id             BIGINT   The flag (feature_flags.id).
    flag_key            VARCHAR  The flag's key.
    variant_key         VARCHAR  The variant's key.
    variant_name        VARCHAR  Its description.
    rollout_percentage  DOUBLE   Its share of the flag's rollout.
    """,
    key=("flag_id", "variant_key"),
)
ACTIONS = _table(
    "actions",
    "PostHog's actions (named combinations of events), one snapshot a day.",
    """
    id                  BIGINT       The action's id.
    name                VARCHAR      Its name.
    description         VARCHAR      Its description.
    steps               JSON         What matches it (event, url, selector, text, properties).
    tags                JSON         Its tags.
    created_by          VARCHAR      Its creator's email.
    created_at          TIMESTAMPTZ  When it was created.
    last_calculated_at  TIMESTAMPTZ  When PostHog last calculated it.
    """,
)
DASHBOARDS = _table(
    "dashboards",
    "PostHog's dashboards, one snapshot a day; which insight sits on which is dashboard_tiles.",
    """
    id                BIGINT       The dashboard's id.
    name              VARCHAR      Its name.
    description       VARCHAR      Its description.
    pinned            BOOLEAN      Pinned in PostHog's sidebar.
    is_shared         BOOLEAN      Shared publicly.
    tags              JSON         Its tags.
    created_by        VARCHAR      Its creator's email.
    created_at        TIMESTAMPTZ  When it was created.
    last_accessed_at  TIMESTAMPTZ  When someone last opened it.
    """,
)
DASHBOARD_TILES = _table(
    "dashboard_tiles",
    "Which insight sits on which dashboard (insight tiles; text tiles are left out), one "
    "snapshot a day.",
    """
    dashboard_id      BIGINT   The dashboard (dashboards.id).
    insight_id        BIGINT   The insight on it (insights.id).
    insight_short_id  VARCHAR  That insight's short id.
    tile_id           BIGINT   The tile's id.
    """,
    key=("dashboard_id", "insight_id"),
)
EXPERIMENTS = _table(
    "experiments",
    "PostHog's experiments with their metrics, one snapshot a day.",
    """
    id                 BIGINT       The experiment's id.
    name               VARCHAR      Its name.
    description        VARCHAR      Its description.
    feature_flag_key   VARCHAR      The flag that splits its variants.
    status             VARCHAR      draft (not started), running or complete (ended).
    start_date         TIMESTAMPTZ  When it was launched.
    end_date           TIMESTAMPTZ  When it ended.
    archived           BOOLEAN      Archived in PostHog.
    stats_method       VARCHAR      bayesian or frequentist.
    variants           JSON         Its variants and their rollout (parameters).
    metrics            JSON         Its primary metrics.
    metrics_secondary  JSON         Its secondary metrics.
    created_by         VARCHAR      Its creator's email.
    created_at         TIMESTAMPTZ  When it was created.
    updated_at         TIMESTAMPTZ  When it last changed.
    """,
)


def experiment_status(item: Mapping[str, Any]) -> str:
    """PostHog's UI's status: draft until launched, complete once it has an end date."""
    if not item.get("start_date"):
        return "draft"
    return "complete" if item.get("end_date") else "running"


def flattener(table: Table, derive: Callable[[Row], Row] | None = None) -> Callable[[Row], Row]:
    """One row per object: every column PostHog names the same way, the creator's email, and
    what ``derive`` computes (renamed or nested fields)."""
    names = [c for c in table.staged_columns if c != "created_by"]

    def flatten(item: Row) -> Row:
        user = item.get("created_by")
        row = {n: item.get(n) for n in names}
        row["created_by"] = user.get("email") if isinstance(user, dict) else None
        return {**row, **derive(item)} if derive is not None else row

    return flatten


def _filters(flag: Row) -> Row:
    return flag.get("filters") or {}


def _flag_variants(f: Row) -> Iterator[Row]:
    multivariate = _filters(f).get("multivariate") or {}
    for v in multivariate.get("variants") or []:
        yield {
            "flag_id": f["id"],
            "flag_key": f.get("key"),
            "variant_key": v.get("key"),
            "variant_name": v.get("name"),
            "rollout_percentage": v.get("rollout_percentage"),
        }


def _experiment(e: Row) -> Row:
    return {
        "status": experiment_status(e),
        "stats_method": (e.get("stats_config") or {}).get("method") or "bayesian",
        "variants": (e.get("parameters") or {}).get("feature_flag_variants"),
    }


@dataclass(frozen=True)
class Catalog:
    """How one of PostHog's lists is read and flattened.

    Attributes:
        table: Its table.
        path: Its route below the project.
        scope: The API key scope it needs (named in a 403).
        flatten: One row of ``table`` per object.
        order: A unique order the list accepts (then it is paged); None: read as one page.
        companion: A table flattened from the same objects (rows per object), or None.
        detail_field: See below.
    """

    table: Table
    path: str
    scope: str
    flatten: Callable[[Row], Row]
    order: str | None = None
    companion: tuple[Table, Callable[[Row], Iterable[Row]]] | None = None
    #: A field the list may leave out (a lighter list serializer): objects without it are read
    #: one by one (``GET <path><id>/``).
    detail_field: str | None = None


CATALOG: dict[str, Catalog] = {
    "annotations": Catalog(
        ANNOTATIONS, "annotations/", "annotation:read",
        flattener(ANNOTATIONS, lambda a: {"insight_id": a.get("dashboard_item")}),
    ),
    "cohorts": Catalog(COHORTS, "cohorts/", "cohort:read", flattener(COHORTS)),
    "feature_flags": Catalog(
        FEATURE_FLAGS, "feature_flags/", "feature_flag:read",
        flattener(FEATURE_FLAGS, lambda f: {"release_conditions": _filters(f).get("groups")}),
        order="id",
        companion=(FEATURE_FLAG_VARIANTS, _flag_variants),
    ),
    "actions": Catalog(ACTIONS, "actions/", "action:read", flattener(ACTIONS)),
    "dashboards": Catalog(DASHBOARDS, "dashboards/", "dashboard:read", flattener(DASHBOARDS)),
    "experiments": Catalog(
        EXPERIMENTS, "experiments/", "experiment:read", flattener(EXPERIMENTS, _experiment),
        detail_field="metrics",
    ),
}  # fmt: skip


@dataclass
class ListRead:
    """Every object of a list, and what PostHog said about it."""

    items: list[Row]
    count: int | None
    requests: int


def read_list(client: PostHogClient, catalog: Catalog) -> ListRead:
    """Every object of ``catalog``'s list (see the module docstring for how).

    Always below ``/api/projects/``: PostHog registers these lists on the projects router only.
    """
    path = f"/api/projects/{client.project_id}/{catalog.path}"
    scopes = (catalog.scope,)
    params: dict[str, Any] = {"limit": FIRST_PAGE}
    if catalog.order:
        params["order"] = catalog.order
    items: list[Row] = []
    count: int | None = None
    requests = 0
    for page in client.iter_pages(path, params, scopes=scopes):
        requests += 1
        count = page.get("count") if count is None else count
        items += page.get("results") or []
        if catalog.order is None and isinstance(count, int) and len(items) < count:
            # no unique order: ask for everything in one page instead of paging on
            page = client.get_json(path, {"limit": count}, scopes=scopes)
            items, count = list(page.get("results") or []), page.get("count")
            requests += 1
            break
    if catalog.detail_field:
        for i, item in enumerate(items):
            if catalog.detail_field not in item and not item.get("deleted"):
                items[i] = client.get_json(f"{path}{item['id']}/", scopes=scopes)
                requests += 1
    return ListRead(items, count if isinstance(count, int) else None, requests)


def live_objects(read: ListRead, what: str) -> tuple[list[Row], int]:
    """The distinct objects not marked deleted, and how many were; a shortfall against PostHog's
    ``count`` raises :class:`CatalogIncomplete`."""
    seen: dict[Any, Row] = {}
    for item in read.items:
        seen.setdefault(item.get("id"), item)
    live = [i for i in seen.values() if not i.get("deleted")]
    deleted = len(seen) - len(live)
    if read.count is not None and len(seen) < read.count:
        raise CatalogIncomplete(
            f"read {len(seen)} distinct {what} but PostHog reports {read.count}: the list "
            "changed while it was read; nothing was written (run it again)"
        )
    return live, deleted


class CatalogSource(SnapshotSource):
    """One catalog table (and its companion), from one read of its list."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.table = catalog.table
        self.companions = (catalog.companion[0],) if catalog.companion else ()

    def stage(self, request: StageRequest) -> dict[str, Any]:
        read = read_list(request.client, self.catalog)
        live, deleted = live_objects(read, self.table.name)
        rows = request.staging.write(self.catalog.flatten(i) for i in live)
        if self.catalog.companion is not None:
            table, flatten = self.catalog.companion
            request.companions[table.name].write(r for i in live for r in flatten(i))
        return {
            "rows": rows,
            "posthog_count": read.count,
            "deleted_skipped": deleted,
            "list_requests": read.requests,
        }


class DashboardsSource(CatalogSource):
    """Dashboards, and their insight tiles from the insights list (metadata only, ``order=id``,
    the read the component's state makes): no per-dashboard request, which PostHog would also
    count as someone opening the dashboard (``last_accessed_at``)."""

    def __init__(self) -> None:
        super().__init__(CATALOG["dashboards"])
        self.companions = (DASHBOARD_TILES,)

    def stage(self, request: StageRequest) -> dict[str, Any]:
        figures = super().stage(request)
        tiles = request.companions[DASHBOARD_TILES.name]
        insights = reported = 0
        for page in request.client.iter_insight_pages(basic=True):
            reported = page.count
            insights += len(page.results)
            tiles.write(
                {
                    "dashboard_id": t.get("dashboard_id"),
                    "insight_id": i["id"],
                    "insight_short_id": i.get("short_id"),
                    "tile_id": t.get("id"),
                }
                for i in page.results
                for t in i.get("dashboard_tiles")
                or [{"dashboard_id": d} for d in i.get("dashboards") or []]
            )
        return {**figures, "insights_read_for_tiles": insights, "posthog_insights": reported}


def _tiles(insight: Row) -> list[Row]:
    """An insight's tiles (``dashboard_tiles``; older PostHog: only ``dashboards`` ids)."""
    tiles = insight.get("dashboard_tiles")
    if tiles is not None:
        return list(tiles)
    return [{"dashboard_id": d} for d in insight.get("dashboards") or []]


def catalog_sources(names: Iterable[str]) -> list[SnapshotSource]:
    return [DashboardsSource() if n == "dashboards" else CatalogSource(CATALOG[n]) for n in names]

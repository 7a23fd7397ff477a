"""Deterministic seed of each project's catalog: annotations, cohorts, feature flags, actions and
experiments (the objects ``catalog`` serves).

Sizes count LIVE rows; soft-deleted rows (``deleted: true``) come on top, one after every seven
live ones (``ceil(live / 7)`` of them, the last one as the final row when the count is small), so
about one row in eight is deleted and a list's ``count`` equals the size asked for. Ids are per
kind and global over the projects: the main project's rows are 1..N, Staging's follow.

Rows are stored as the API shows them, plus private ``_``-keys the serializers read (project,
row number). Fields computed from other objects (a flag's ``experiment_set``, an experiment's
``feature_flag``, ``is_simple_flag``...) are filled in when served, so control-plane changes show.
"""

from __future__ import annotations

import copy
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .hashing import mix
from .seed import EPOCH, USERS, Dashboard, Insight, Project, Seed, iso_z

KINDS = ("annotation", "cohort", "feature_flag", "action", "experiment")
Row = dict[str, Any]

_ANNOTATION_TEXTS = ("Deployed v2 pricing page", "Marketing campaign launched",
                     "Outage: ingestion", "Released onboarding checklist", "Holiday traffic",
                     "Changed signup flow")  # fmt: skip
_COHORT_NAMES = ("Power users", "Trial users", "Churn risk", "Enterprise accounts", "New signups")
_FLAG_WORDS = ("new-onboarding", "billing-v2", "dark-mode", "search-beta", "export-csv",
               "ai-summaries", "fast-checkout")  # fmt: skip
_ACTION_NAMES = ("Signed up", "Clicked pricing CTA", "Viewed docs", "Started trial",
                 "Invited teammate")  # fmt: skip
_EXPERIMENT_NAMES = ("Checkout redesign", "Pricing page copy", "Onboarding emails",
                     "Search ranking", "Trial length")  # fmt: skip
#: Status of an experiment by its live index modulo 4 (so the default four have one of each
#: kind: a finished two-variant experiment with two metrics, two running, one draft).
_EXPERIMENT_CYCLE = ("finished", "running", "running", "draft")


@dataclass(frozen=True)
class CatalogSizes:
    """Live rows per project kind (the main project's; Staging gets a few)."""

    annotations: int = 30
    cohorts: int = 20
    feature_flags: int = 40
    actions: int = 15
    experiments: int = 4

    def live(self, kind: str) -> int:
        return {
            "annotation": self.annotations,
            "cohort": self.cohorts,
            "feature_flag": self.feature_flags,
            "action": self.actions,
            "experiment": self.experiments,
        }[kind]

    def staging(self) -> CatalogSizes:
        return CatalogSizes(
            annotations=min(self.annotations, 5),
            cohorts=min(self.cohorts, 5),
            feature_flags=min(self.feature_flags, 5),
            actions=min(self.actions, 5),
            experiments=min(self.experiments, 2),
        )


def total_rows(live: int) -> int:
    """Live rows plus the deleted ones mixed in among them."""
    return live + math.ceil(live / 7) if live > 0 else 0


def deleted_rows(live: int) -> frozenset[int]:
    """Row numbers (0-based) of the deleted rows: every eighth, the last one capped to the end."""
    total = total_rows(live)
    return frozenset(min(8 * k + 7, total - 1) for k in range(total - live))


def experiments_that_fit(experiments: int, flags: int) -> int:
    """Each experiment (deleted ones too) has its own live flag: at most as many as there are."""
    n = max(0, experiments)
    while n > 0 and total_rows(n) > flags:
        n -= 1
    return n


def seeded_uuid(*parts: int) -> str:
    return str(uuid.UUID(int=(mix(*parts, 1) << 64) | mix(*parts, 2)))


def user(index: int) -> dict[str, Any]:
    return dict(USERS[index % len(USERS)])


def _at(moment: datetime) -> str:
    return iso_z(moment)


@dataclass
class Catalog:
    """Every project's rows per kind, in id order; ``copy()`` is what ``reset`` restores."""

    rows: dict[str, dict[int, list[Row]]]
    next_ids: dict[str, int]

    def copy(self) -> Catalog:
        return Catalog(copy.deepcopy(self.rows), dict(self.next_ids))

    def project_rows(self, kind: str, project_id: int) -> list[Row]:
        return self.rows[kind].setdefault(project_id, [])

    def find(self, kind: str, object_id: int) -> Row | None:
        for rows in self.rows[kind].values():
            for row in rows:
                if row["id"] == object_id:
                    return row
        return None


# ---- builders, one per kind ---------------------------------------------------------------------


def _annotation(project: Project, r: int, object_id: int, deleted: bool) -> Row:
    h = mix(project.seed, project.id, 41, r)
    scope = ("project", "organization", "dashboard_item", "dashboard")[r % 4]
    insight = Insight(project, r % project.n_insights) if project.n_insights else None
    board = Dashboard(project, r % project.n_dashboards) if project.n_dashboards else None
    if (scope == "dashboard_item" and insight is None) or (scope == "dashboard" and board is None):
        scope = "project"
    git = r % 5 == 4
    created = EPOCH - timedelta(days=90) + timedelta(hours=5 * r)
    return {
        "id": object_id,
        "content": f"{_ANNOTATION_TEXTS[h % len(_ANNOTATION_TEXTS)]} #{r}",
        # Six distinct markers: many annotations share one (the list orders by it alone).
        "date_marker": _at(EPOCH - timedelta(days=60) + timedelta(days=7 * (r % 6))),
        "creation_type": "GIT" if git else "USR",
        "dashboard_item": insight.id if scope == "dashboard_item" and insight else None,
        "dashboard_id": board.id if scope == "dashboard" and board else None,
        "created_by": None if git else user(r),
        "created_at": _at(created),
        "updated_at": _at(created + timedelta(minutes=30 + r % 50)),
        "deleted": deleted,
        "scope": scope,
        "emoji": "🚀" if r % 7 == 3 else None,
        "hidden_in_user_interface": r % 11 == 10,
        "tags": ["release"] if r % 3 == 0 else [],
        "_project": project.id,
    }


def _cohort_filters(kind: str, r: int) -> dict[str, Any]:
    if kind == "static":
        return {"properties": {"type": "AND", "values": []}}
    if kind == "behavioral":
        value = {"key": "purchase", "type": "behavioral", "value": "performed_event",
                 "negation": False, "event_type": "events", "time_value": str(7 + r % 30),
                 "time_interval": "day"}  # fmt: skip
    else:
        value = {"key": "email", "type": "person", "value": "@example.com",
                 "negation": False, "operator": "icontains"}  # fmt: skip
    return {"properties": {"type": "OR", "values": [{"type": "AND", "values": [value]}]}}


def _cohort(project: Project, r: int, object_id: int, deleted: bool) -> Row:
    h = mix(project.seed, project.id, 42, r)
    kind = ("static", "person_property", "person_property", "behavioral", "person_property")[r % 5]
    # Three cohorts per creation instant: the list's only ordering (-created_at) leaves ties.
    created = EPOCH - timedelta(days=120) + timedelta(days=r // 3)
    never_calculated = r % 10 == 7
    return {
        "id": object_id,
        "name": f"{_COHORT_NAMES[h % len(_COHORT_NAMES)]} {r}",
        "description": f"Seeded {kind.replace('_', ' ')} cohort {r}.",
        "groups": [],
        "deleted": deleted,
        "filters": _cohort_filters(kind, r),
        "query": None,
        "is_calculating": r % 9 == 4,
        "created_by": user(r + 1),
        "created_at": _at(created),
        "last_calculation": None if never_calculated else _at(created + timedelta(days=1, hours=r)),
        "errors_calculating": 2 if r % 6 == 5 else 0,
        "count": None if never_calculated else 50 + h % 5000,
        "is_static": kind == "static",
        "cohort_type": kind,
        "experiment_set": [],
        "_project": project.id,
    }


def _variants(keys_and_shares: list[tuple[str, int]]) -> list[dict[str, Any]]:
    return [
        {"key": key, "name": key.replace("-", " ").title(), "rollout_percentage": share}
        for key, share in keys_and_shares
    ]


def split(count: int) -> list[tuple[str, int]]:
    """``count`` variants (control first) whose shares sum to 100."""
    keys = ["control", "test", *[f"test-{k}" for k in range(2, count)]]
    base = 100 // count
    shares = [base + (1 if k < 100 - base * count else 0) for k in range(count)]
    return list(zip(keys, shares, strict=True))


def _flag_filters(r: int, variants: list[dict[str, Any]] | None) -> dict[str, Any]:
    shape = r % 5
    person = {"key": "email", "type": "person", "value": ["@example.com"], "operator": "icontains"}
    rollout = (100, 50, 25, 10, 0)[r % 5]
    filters: dict[str, Any] = {"groups": [], "multivariate": None, "payloads": {}}
    if variants is not None:
        filters["multivariate"] = {"variants": variants}
    if shape in (0, 4):  # simple: one condition, no properties
        filters["groups"] = [{"properties": [], "rollout_percentage": rollout, "variant": None}]
    elif shape == 1:
        filters["groups"] = [{"properties": [person], "rollout_percentage": 100, "variant": None}]
    elif shape == 2:
        filters["groups"] = [
            {"properties": [person], "rollout_percentage": 100, "variant": None},
            {"properties": [], "rollout_percentage": 20, "variant": None},
        ]
    else:  # group-based (companies): never simple
        filters["aggregation_group_type_index"] = 0
        group = {"key": "plan", "type": "group", "value": ["enterprise"], "operator": "exact",
                 "group_type_index": 0}  # fmt: skip
        filters["groups"] = [{"properties": [group], "rollout_percentage": 100, "variant": None}]
    if variants is None and shape == 0:
        filters["payloads"] = {"true": '{"enabled": true}'}
    return filters


def _flag(project: Project, r: int, object_id: int, deleted: bool, live_index: int | None) -> Row:
    h = mix(project.seed, project.id, 43, r)
    multivariate = live_index is not None and live_index % 3 == 1
    variants = _variants(split(2 + h % 3)) if multivariate else None
    created = EPOCH - timedelta(days=150) + timedelta(hours=6 * (r // 3))  # ties of three
    return {
        "id": object_id,
        "name": "" if r % 4 == 2 else f"Gates {_FLAG_WORDS[h % len(_FLAG_WORDS)]} ({r})",
        "key": f"{_FLAG_WORDS[h % len(_FLAG_WORDS)]}-{r}",
        "filters": _flag_filters(r, variants),
        "deleted": deleted,
        "active": r % 6 != 5,
        "created_by": user(r),
        "created_at": _at(created),
        "updated_at": _at(created + timedelta(days=r % 5, hours=1)),
        "version": 1 + r % 4,
        "last_modified_by": user(r + r % 2),
        "ensure_experience_continuity": r % 7 == 0,
        "surveys": [],
        "features": [],
        "rollback_conditions": None,
        "performed_rollback": False,
        "can_edit": True,
        "tags": ["checkout"] if r % 4 == 1 else [],
        "evaluation_tags": [],
        "usage_dashboard": None,
        "analytics_dashboards": [],
        "has_enriched_analytics": False,
        "user_access_level": "editor",
        "is_remote_configuration": False,
        "has_encrypted_payloads": False,
        "evaluation_runtime": "server" if r % 9 == 3 else "all",
        "_project": project.id,
    }


#: What ``build_selector_regex`` makes of ``button.cta``.
_CTA_REGEX = r'(^|;)button.*?\.cta([-_a-zA-Z0-9\.:"= ]*?)?($|;|:([^;^\s]*(;|$|\s)))'


def _step(r: int, k: int) -> dict[str, Any]:
    empty = dict.fromkeys(("event", "properties", "selector", "selector_regex", "tag_name",
                           "text", "text_matching", "href", "href_matching", "url",
                           "url_matching"))  # fmt: skip
    if (r + k) % 3 == 0:
        return {**empty, "event": "$autocapture", "selector": "button.cta", "tag_name": "button",
                "selector_regex": _CTA_REGEX, "text": "Start trial",
                "text_matching": "exact"}  # fmt: skip
    if (r + k) % 3 == 1:
        return {**empty, "event": "$pageview", "properties": [],
                "url": "https://app.example.com/pricing", "url_matching": "contains"}  # fmt: skip
    prop = {"key": "plan", "type": "event", "value": ["pro"], "operator": "exact"}
    return {**empty, "event": "signed_up", "properties": [prop]}


def _action(project: Project, r: int, object_id: int, deleted: bool) -> Row:
    created = EPOCH - timedelta(days=100) + timedelta(days=r)
    return {
        "id": object_id,
        "name": f"{_ACTION_NAMES[r % len(_ACTION_NAMES)]} {r}",
        "description": f"Seeded action {r}.",
        "tags": ["funnel"] if r % 4 == 0 else [],
        "post_to_slack": r % 5 == 0,
        "slack_message_format": "[action.name] triggered by [person]" if r % 5 == 0 else "",
        "steps": [_step(r, k) for k in range(1 + r % 2)],
        "created_at": _at(created),
        "created_by": user(r + 2),
        "deleted": deleted,
        "is_calculating": False,
        # Three actions per instant: the list orders by -last_calculated_at, then name.
        "last_calculated_at": _at(EPOCH - timedelta(days=1) - timedelta(hours=2 * (r // 3))),
        "team_id": project.id,
        "is_action": True,
        "bytecode_error": None,
        "pinned_at": _at(created + timedelta(days=2)) if r % 7 == 2 else None,
        "creation_context": None,
        "user_access_level": "editor",
        "_project": project.id,
    }


def _metrics(project: Project, j: int, status: str, frequentist: bool) -> list[dict[str, Any]]:
    def uid(k: int) -> str:
        return seeded_uuid(project.seed, project.id, 45, j, k)

    mean = {"kind": "ExperimentMetric", "metric_type": "mean", "uuid": uid(0),
            "name": "Purchases per user", "source": {"kind": "EventsNode", "event": "purchase"},
            "goal": "increase"}  # fmt: skip
    funnel = {"kind": "ExperimentMetric", "metric_type": "funnel", "uuid": uid(1),
              "name": "Pricing to purchase",
              "series": [{"kind": "EventsNode", "event": "$pageview"},
                         {"kind": "EventsNode", "event": "purchase"}],
              "goal": "increase"}  # fmt: skip
    revenue = {"kind": "ExperimentMetric", "metric_type": "mean", "uuid": uid(2),
               "name": "Revenue per user", "goal": "increase",
               "source": {"kind": "EventsNode", "event": "purchase", "math": "sum",
                          "math_property": "revenue"}}  # fmt: skip
    if status == "finished":
        return [mean, funnel]
    if status == "draft":
        return [mean]
    return [mean] if frequentist else [funnel, revenue]


def _experiment(
    project: Project, j: int, object_id: int, deleted: bool, live_index: int | None, flag: Row
) -> Row:
    status = _EXPERIMENT_CYCLE[(live_index if live_index is not None else 1) % 4]
    frequentist = live_index is not None and live_index % 4 == 1
    created = EPOCH - timedelta(days=60) + timedelta(days=j, hours=j)
    start = None if status == "draft" else created + timedelta(days=2)
    end = start + timedelta(days=21) if status == "finished" and start else None
    base = _EXPERIMENT_NAMES[j % len(_EXPERIMENT_NAMES)]
    metrics = _metrics(project, j, status, frequentist)
    return {
        "id": object_id,
        "name": base if j < len(_EXPERIMENT_NAMES) else f"{base} {j}",
        "description": f"Seeded {status} experiment {j}.",
        "start_date": _at(start) if start else None,
        "end_date": _at(end) if end else None,
        "feature_flag_key": flag["key"],
        "holdout": None,
        "exposure_cohort": None,
        "secondary_metrics": [],
        "saved_metrics": [],
        "filters": {},
        "metrics": metrics,
        "metrics_secondary": [],
        "stats_config": {"method": "frequentist" if frequentist else "bayesian"},
        "archived": False,
        "deleted": deleted,
        "type": "product",
        "created_at": _at(created),
        "updated_at": _at((end or start or created) + timedelta(hours=1)),
        "created_by": user(j),
        "exposure_criteria": {"filterTestAccounts": True},
        "conclusion": "won" if status == "finished" else None,
        "conclusion_comment": "Test beat control." if status == "finished" else None,
        "primary_metrics_ordered_uuids": [m["uuid"] for m in metrics],
        "secondary_metrics_ordered_uuids": [],
        "user_access_level": "editor",
        "_project": project.id,
        "_flag": flag["id"],
    }


def _link_flag(flag: Row, experiment: Row, variants: int) -> None:
    """Turn a seeded flag into the experiment's: its key, variants, creation and activity."""
    slug = experiment["name"].lower().replace(" ", "-")
    flag["key"] = experiment["feature_flag_key"] = f"{slug}-exp-{experiment['id']}"
    flag["name"] = f"Feature Flag for Experiment {experiment['name']}"
    flag["filters"] = {
        "groups": [{"properties": [], "rollout_percentage": 100, "variant": None}],
        "multivariate": {"variants": _variants(split(variants))},
        "payloads": {},
    }
    flag["active"] = experiment["start_date"] is not None
    flag["created_at"] = experiment["created_at"]
    flag["updated_at"] = experiment["updated_at"]
    flag["created_by"] = flag["last_modified_by"] = experiment["created_by"]


def build_catalog(seed: Seed, sizes: CatalogSizes) -> Catalog:
    rows: dict[str, dict[int, list[Row]]] = {kind: {} for kind in KINDS}
    next_ids = dict.fromkeys(KINDS, 1)
    for project in seed.projects.values():
        wanted = sizes if project.id == seed.main.id else sizes.staging()
        for kind in KINDS:
            live = wanted.live(kind)
            if kind == "experiment":
                live = experiments_that_fit(live, wanted.feature_flags)
            gone = deleted_rows(live)
            out: list[Row] = []
            live_index = 0
            for r in range(total_rows(live)):
                object_id = next_ids[kind]
                next_ids[kind] += 1
                deleted = r in gone
                index = None if deleted else live_index
                live_index += 0 if deleted else 1
                if kind == "annotation":
                    out.append(_annotation(project, r, object_id, deleted))
                elif kind == "cohort":
                    out.append(_cohort(project, r, object_id, deleted))
                elif kind == "feature_flag":
                    out.append(_flag(project, r, object_id, deleted, index))
                elif kind == "action":
                    out.append(_action(project, r, object_id, deleted))
                else:
                    flags = [f for f in rows["feature_flag"][project.id] if not f["deleted"]]
                    flag = flags[r]
                    experiment = _experiment(project, r, object_id, deleted, index, flag)
                    variants = len(experiment_variant_keys(experiment, index))
                    _link_flag(flag, experiment, variants)
                    out.append(experiment)
            rows[kind][project.id] = out
    return Catalog(rows, next_ids)


def experiment_variant_keys(experiment: Row, live_index: int | None) -> list[str]:
    """Two variants for finished, frequentist and draft experiments; three for the others."""
    status = _EXPERIMENT_CYCLE[(live_index if live_index is not None else 1) % 4]
    three = status == "running" and experiment["stats_config"]["method"] == "bayesian"
    return [key for key, _ in split(3 if three else 2)]


def add_row(catalog: Catalog, kind: str, project: Project, fields: dict[str, Any]) -> Row:
    """A new row of ``kind`` in ``project``: the seed's defaults for the next row number, with
    ``fields`` (API field names) on top; an experiment gets a new flag unless ``fields`` names
    the key of a live one of the project."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    rows = catalog.project_rows(kind, project.id)
    r = len(rows)
    object_id = catalog.next_ids[kind]
    catalog.next_ids[kind] += 1
    if kind == "annotation":
        row = _annotation(project, r, object_id, False)
    elif kind == "cohort":
        row = _cohort(project, r, object_id, False)
    elif kind == "feature_flag":
        row = _flag(project, r, object_id, False, r)
    elif kind == "action":
        row = _action(project, r, object_id, False)
    else:
        key = fields.get("feature_flag_key")
        flags = catalog.project_rows("feature_flag", project.id)
        flag = next((f for f in flags if f["key"] == key and not f["deleted"]), None)
        if key is not None and flag is None:
            raise ValueError(f"no live feature flag with key {key!r} in project {project.id}")
        if flag is None:
            flag = add_row(catalog, "feature_flag", project, {})
        row = _experiment(project, r, object_id, False, r, flag)
        if key is None:
            _link_flag(flag, row, len(experiment_variant_keys(row, r)))
        row["_flag"] = flag["id"]
    unknown = sorted(name for name in fields if name not in row or name.startswith("_"))
    if unknown or "id" in fields:
        raise ValueError(f"fields a {kind} does not have (or may not set): {unknown or ['id']}")
    row.update(copy.deepcopy(fields))
    rows.append(row)
    return row

"""Helpers shared by the snapshot tests: projects, definitions, materialize, DuckDB reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from posthog_assets.config import GroupsConfig, InsightsConfig, PostHogProject
from posthog_assets.resources import PostHogResource
from posthog_assets.snapshots.definitions import build_posthog_snapshot_definitions
from posthog_assets.snapshots.results import TIDY_TABLES

INSIGHTS_NODE = "posthog__insights"


def snapshot_project(
    env: Mapping[str, str],
    *,
    name: str = "default",
    insights: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
    **resource_fields: Any,
) -> PostHogProject:
    """A project pointed where the env points (the stand-in, DuckDB under tmp_path)."""
    fields = {
        "host": env["POSTHOG_HOST"],
        "project_id": env["POSTHOG_PROJECT_ID"],
        "personal_api_key": env["POSTHOG_PERSONAL_API_KEY"],
        "export_dir": env["POSTHOG_ASSETS_EXPORT_DIR"],
        **{k: str(v) if k == "project_id" else v for k, v in resource_fields.items()},
    }
    return PostHogProject(
        resource=PostHogResource(**fields),
        name=name,
        insights=InsightsConfig.model_validate(insights or {}),
        groups=GroupsConfig.model_validate(groups or {}),
        duckdb_path=env["POSTHOG_ASSETS_DUCKDB"],
    )


def snapshot_defs(*projects: PostHogProject) -> dg.Definitions:
    return build_posthog_snapshot_definitions(projects)


def asset_name(asset: Any) -> str:
    """A snapshot asset's source name (``insights`` also writes the tidy tables: several keys)."""
    return str(asset.node_def.name).rsplit("__", 1)[-1]


def defs_assets(defs: dg.Definitions, *names: str) -> list[Any]:
    """The snapshot assets whose source is one of ``names`` (all when none are given)."""
    found = [a for a in defs.assets or [] if not names or asset_name(a) in names]
    assert found, f"no snapshot assets named {names}"
    return found


def defs_checks(defs: dg.Definitions, asset_names: Sequence[str]) -> list[Any]:
    return [
        c
        for c in defs.asset_checks or []
        if any(k.asset_key.path[-1] in asset_names for k in c.check_keys)
    ]


def resources_for(
    posthog: PostHogResource, duckdb_path: str | Path, **extra: Any
) -> dict[str, Any]:
    return {"posthog": posthog, "duckdb": DuckDBResource(database=str(duckdb_path)), **extra}


def insights_run_config(node: str = INSIGHTS_NODE, **cfg: Any) -> dict[str, Any]:
    """Launchpad-shaped run config for the insights asset."""
    return {"ops": {node: {"config": cfg}}} if cfg else {}


def materialize_insights(
    defs: dg.Definitions,
    resources: Mapping[str, Any],
    *,
    raise_on_error: bool = True,
    instance: dg.DagsterInstance | None = None,
    **cfg: Any,
) -> dg.ExecuteInProcessResult:
    assets = defs_assets(defs, "insights")
    return dg.materialize(
        [*assets, *defs_checks(defs, ["insights", *TIDY_TABLES])],
        resources=dict(resources),
        run_config=insights_run_config(**cfg),
        raise_on_error=raise_on_error,
        instance=instance,
    )


def materialize_groups(
    defs: dg.Definitions,
    resources: Mapping[str, Any],
    *,
    names: Sequence[str] = (),
    raise_on_error: bool = True,
    instance: dg.DagsterInstance | None = None,
    run_config: Mapping[str, Any] | None = None,
) -> dg.ExecuteInProcessResult:
    group_names = names or [asset_name(a) for a in defs.assets or [] if asset_name(a) != "insights"]
    assets = defs_assets(defs, *group_names)
    return dg.materialize(
        [*assets, *defs_checks(defs, group_names)],
        resources=dict(resources),
        raise_on_error=raise_on_error,
        instance=instance,
        run_config=dict(run_config or {}),
    )


def materialize_named(
    defs: dg.Definitions,
    resources: Mapping[str, Any],
    instance: dg.DagsterInstance,
    *,
    names: Sequence[str] | None = None,
    partition: str | None = None,
) -> dg.ExecuteInProcessResult:
    """The assets with a key ending in one of ``names`` (every asset when None) and their checks,
    in one run that returns its failures instead of raising them."""

    def chosen(keys: Iterable[dg.AssetKey]) -> bool:
        return names is None or any(k.path[-1] in names for k in keys)

    assets = [a for a in defs.assets or [] if chosen(a.keys)]
    checks = [c for c in defs.asset_checks or [] if chosen(k.asset_key for k in c.check_keys)]
    return dg.materialize(
        [*assets, *checks],
        resources=dict(resources),
        partition_key=partition,
        instance=instance,
        raise_on_error=False,
    )


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    """Every failed step's error message, one per line."""
    return "\n".join(
        e.step_failure_data.error.message for e in result.all_events if e.is_step_failure
    )


def query(db: str | Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Read DuckDB the way checks do: read-only, closed at once.

    Table names are unqualified: the default schema is set to ``posthog`` (a file named
    posthog.duckdb makes ``posthog.insights`` an ambiguous catalog-or-schema reference).
    """
    conn = duckdb.connect(str(db), read_only=True)
    try:
        conn.execute("SET schema = 'posthog'")
        return conn.execute(sql, list(params)).fetchall()
    finally:
        conn.close()


def scalar(db: str | Path, sql: str, params: Sequence[Any] = ()) -> Any:
    return query(db, sql, params)[0][0]


def materialization_metadata(result: dg.ExecuteInProcessResult, name: str) -> dict[str, Any]:
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        if mat.asset_key.path[-1] == name:
            return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    raise AssertionError(f"no materialization of {name}")


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def errors(checks: Any) -> list[str]:
    """Names of the check evaluations that failed at ERROR severity (the seed's truncated SQL
    insights make ``insights_not_truncated`` warn on every snapshot: that is no data error)."""
    return [
        c.check_name for c in checks if not c.passed and c.severity != dg.AssetCheckSeverity.WARN
    ]

"""One factory for every snapshot asset: a fetch op and a write op, from a declared source.

Why two ops: fetching from PostHog can take minutes and must not hold the single-writer ``duckdb``
pool, while the write needs that pool so two runs never write the same file at once. The fetch
op (pool ``posthog_api``) stages rows to disk; the write op (pool ``duckdb``) replaces the
snapshot's rows in one transaction. Only a small :class:`StagedSnapshot` passes between them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

from posthog_assets.api.errors import PostHogError
from posthog_assets.api.private_files import disk_error_message, is_local_disk_error, open_private
from posthog_assets.common import DUCKDB_RESOURCE_KEY, utc_now_iso
from posthog_assets.pools import DUCKDB_POOL, POSTHOG_API_POOL, free_slots_of_ended_runs
from posthog_assets.resources import PostHogResource
from posthog_assets.snapshots.source import SnapshotSource, StageRequest
from posthog_assets.snapshots.staging import (
    STAGED_MARKER,
    STAGING_DIRNAME,
    StagedPart,
    StagedRows,
    StagedSnapshot,
    remove_staging,
    remove_stale_staging,
    staging_dir,
)
from posthog_assets.snapshots.writer import SnapshotTable, replace_snapshot, writer_connection
from posthog_assets.tables import SCHEMA
from posthog_assets.translator import column_schema

#: The setting named when the DuckDB file or its staging folder cannot be written.
DUCKDB_PATH_SETTING = "duckdb_path"

#: Step retries for transient PostHog trouble that outlived the client's own request retries.
FETCH_RETRY_POLICY = dg.RetryPolicy(
    max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


def fatal_failure(exc: PostHogError) -> dg.Failure:
    """A failure a step retry cannot heal; says when PostHog accepts requests again, if known."""
    retry_at = getattr(exc, "retry_at", None)
    metadata = {"retry_at": dg.MetadataValue.float(float(retry_at))} if retry_at else {}
    return dg.Failure(description=str(exc), allow_retries=False, metadata=metadata)


def disk_failure(path: str | os.PathLike[str], exc: OSError) -> dg.Failure:
    """A full, read-only or refused local disk: a step retry would fail the same way."""
    return dg.Failure(
        description=disk_error_message(DUCKDB_PATH_SETTING, path, exc), allow_retries=False
    )


@contextmanager
def duckdb_disk_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Local disk errors inside become :func:`disk_failure` naming ``path``; others pass."""
    try:
        yield
    except OSError as exc:
        if not is_local_disk_error(exc):
            raise
        raise disk_failure(path, exc) from None


def _staging_path(database: str | os.PathLike[str]) -> Path:
    """The staging folder as messages name it (``staging_root`` would refuse a symlink)."""
    return Path(database).resolve().parent / STAGING_DIRNAME


def with_table_metadata(spec: dg.AssetSpec, table: SnapshotTable) -> dg.AssetSpec:
    """The spec with its DuckDB table's name and column schema, known before any run."""
    return spec.merge_attributes(
        metadata={
            "dagster/column_schema": column_schema(table.columns),
            "dagster/table_name": f"{SCHEMA}.{table.name}",
        }
    )


def build_snapshot_asset(
    *,
    source: SnapshotSource,
    spec: dg.AssetSpec,
    resource_key: str,
    companion_specs: Mapping[str, dg.AssetSpec] | None = None,
) -> dg.AssetsDefinition:
    """The graph-backed asset of ``source``: fetch (stages rows to disk), then write.

    With companion tables, the one graph materializes them all (one asset each, given by
    ``companion_specs`` keyed by table name): they come from the same fetch and are written in
    the same transaction, so they cannot be materialized apart.
    """
    base = "__".join(spec.key.path)
    table = source.table
    companions = {c.name: c for c in source.companions}
    companion_specs = dict(companion_specs or {})
    if set(companion_specs) != set(companions):
        raise ValueError(
            f"{base}: specs for {sorted(companions)} needed, got {sorted(companion_specs)}"
        )
    specs = {spec.key.path[-1]: with_table_metadata(spec, table)}
    out_tables = {spec.key.path[-1]: table}
    for name, companion_spec in companion_specs.items():
        specs[companion_spec.key.path[-1]] = with_table_metadata(companion_spec, companions[name])
        out_tables[companion_spec.key.path[-1]] = companions[name]

    def fetch(context: dg.OpExecutionContext, config: Any) -> StagedSnapshot:
        duck = getattr(context.resources, DUCKDB_RESOURCE_KEY)
        with duckdb_disk_errors(_staging_path(duck.database)):
            stale = remove_stale_staging(duck.database, context.instance)
            if stale:
                context.log.info("Removed %d staging folder(s) of finished runs", len(stale))
            folder = staging_dir(duck.database, context.run_id, base)
        # before this run's write step asks for the single duckdb slot a dead run may hold
        free_slots_of_ended_runs(context.instance, context.log)
        started = time.monotonic()
        resource: PostHogResource = getattr(context.resources, resource_key)
        try:
            client = resource.get_client(log=context.log)
            before = client.request_count
            snapshot_at = utc_now_iso()
            with ExitStack() as stack:
                staging = stack.enter_context(StagedRows(folder / table.name, table.staged_columns))
                companion_staging = {
                    name: stack.enter_context(StagedRows(folder / name, c.staged_columns))
                    for name, c in companions.items()
                }
                request = StageRequest(
                    client, staging, resource, config, context.log, snapshot_at, companion_staging
                )
                stats = dict(source.stage(request))
        except PostHogError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if exc.retryable:
                raise
            # Auth, scope, not-found, validation and "not before <time>" rate limits will not
            # heal within a step retry: fail now.
            raise fatal_failure(exc) from None
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if is_local_disk_error(exc):
                raise disk_failure(folder, exc) from None
            raise
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with duckdb_disk_errors(folder):
            os.close(open_private(folder / STAGED_MARKER, os.O_WRONLY | os.O_CREAT))
        return StagedSnapshot(
            files=list(staging.files),
            rows=staging.rows,
            companions={
                name: StagedPart(files=list(rows.files), rows=rows.rows)
                for name, rows in companion_staging.items()
            },
            scope={"project_id": resource.stored_project_id, **source.scope(snapshot_at)},
            snapshot_at=snapshot_at,
            stats={
                "requests": client.request_count - before,
                **stats,
                "fetch_seconds": round(time.monotonic() - started, 3),
            },
        )

    # Dagster reads an op's parameters from real annotations (with postponed ones it cannot).
    annotations: dict[str, Any] = {"context": dg.OpExecutionContext, "return": StagedSnapshot}
    if source.config_cls is None:

        def fetch_fn(context):  # type: ignore[no-untyped-def]
            return fetch(context, None)

    else:
        annotations["config"] = source.config_cls

        def fetch_fn(context, config):  # type: ignore[no-untyped-def]
            return fetch(context, config)

    fetch_fn.__annotations__ = annotations
    fetch_op = dg.op(
        name=f"{base}__fetch",
        description=f"Fetch {spec.key.to_user_string()} from PostHog and stage it on disk.",
        pool=POSTHOG_API_POOL,
        required_resource_keys={resource_key, DUCKDB_RESOURCE_KEY},
        retry_policy=FETCH_RETRY_POLICY,
        tags={"posthog/step": "fetch"},
    )(fetch_fn)

    def write(context: dg.OpExecutionContext, staged: StagedSnapshot) -> Iterator[dg.Output[None]]:
        started = time.monotonic()
        duck = getattr(context.resources, DUCKDB_RESOURCE_KEY)
        with duckdb_disk_errors(duck.database), writer_connection(duck) as conn:
            inserted = replace_snapshot(
                conn, table, staged, views=source.views, companions=source.companions
            )
            described = dict(source.describe(conn, staged))
        with duckdb_disk_errors(_staging_path(duck.database)):
            remove_staging(staged.all_files)
        write_seconds = round(time.monotonic() - started, 3)
        figures = {**staged.scope, **staged.stats, **described}
        if companions:
            figures["rows_by_table"] = dict(inserted)
        for out_name, out_table in out_tables.items():
            common = {
                "dagster/row_count": dg.MetadataValue.int(inserted[out_table.name]),
                "dagster/table_name": dg.MetadataValue.text(f"{SCHEMA}.{out_table.name}"),
                "dagster/column_schema": dg.MetadataValue.table_schema(
                    column_schema(out_table.columns)
                ),
                "snapshot_at": dg.MetadataValue.text(staged.snapshot_at),
                **{k: _metadata_value(v) for k, v in staged.scope.items()},
            }
            if out_table is not table:
                yield dg.Output(None, out_name, metadata=common)
                continue
            yield dg.Output(
                None,
                out_name,
                metadata={
                    **common,
                    **{k: _metadata_value(v) for k, v in figures.items()},
                    "write_seconds": dg.MetadataValue.float(write_seconds),
                    "seconds": dg.MetadataValue.float(
                        round(float(staged.stats.get("fetch_seconds", 0.0)) + write_seconds, 3)
                    ),
                },
            )
        context.log.info(
            "Wrote %s rows to %s (scope %s) in %.2fs",
            inserted, SCHEMA, staged.scope, write_seconds,
        )  # fmt: skip

    write.__annotations__ = {
        "context": dg.OpExecutionContext,
        "staged": StagedSnapshot,
        "return": Iterator[dg.Output[None]],
    }
    written = [f"{SCHEMA}.{t.name}" for t in out_tables.values()]
    write_op = dg.op(
        name=f"{base}__write",
        description=f"Replace the snapshot rows of {', '.join(written)} in one DuckDB transaction.",
        pool=DUCKDB_POOL,
        required_resource_keys={DUCKDB_RESOURCE_KEY},
        out={name: dg.Out(dg.Nothing) for name in out_tables},
        tags={"posthog/step": "write"},
    )(write)

    # Run config sits on the asset itself (ops: {<base>: {config: ...}}), not on the inner op.
    config_mapping = (
        dg.ConfigMapping(
            config_fn=lambda cfg: {fetch_op.name: {"config": cfg}},
            config_schema=source.config_cls.to_config_schema(),
        )
        if source.config_cls is not None
        else None
    )

    @dg.graph_multi_asset(
        name=base,
        outs={name: dg.AssetOut.from_spec(s, dagster_type=dg.Nothing) for name, s in specs.items()},
        config=config_mapping,
        group_name=spec.group_name,  # graph_multi_asset drops the out spec's group otherwise
        can_subset=False,
    )
    def _graph():  # type: ignore[no-untyped-def]
        outputs = write_op(fetch_op())
        return dict(zip(out_tables, outputs, strict=True)) if len(out_tables) > 1 else outputs

    return _graph


def _metadata_value(value: Any) -> Any:
    """Plain Python values as typed metadata (ints stay ints, dicts become JSON)."""
    if isinstance(value, bool):
        return dg.MetadataValue.bool(value)
    if isinstance(value, int):
        return dg.MetadataValue.int(value)
    if isinstance(value, float):
        return dg.MetadataValue.float(value)
    if isinstance(value, dict | list):
        return dg.MetadataValue.json(value)
    if value is None:
        return dg.MetadataValue.null()
    return dg.MetadataValue.text(str(value))

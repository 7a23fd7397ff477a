"""One factory for every snapshot asset: a fetch op and a write op, from a declared source.

Why two ops: fetching from PostHog can take minutes and must not hold the single-writer ``duckdb``
pool, while the write needs that pool so two runs never write the same file at once. The fetch
op (pool ``posthog_api``) stages rows to disk; the write op (pool ``duckdb``) replaces the
snapshot's rows in one transaction. Only a small :class:`StagedSnapshot` passes between them.
"""

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
from posthog_assets.snapshots.writer import replace_snapshot, writer_connection
from posthog_assets.tables import SCHEMA

#: The setting named when the DuckDB file or its staging folder cannot be written.
DUCKDB_PATH_SETTING = "duckdb_path"

#: Step retries for transient PostHog trouble that outlived the client's own request retries.
FETCH_RETRY_POLICY = dg.RetryPolicy(
    max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


def fatal_failure(exc: PostHogError) -> dg.Failure:
    """A failure a step retry cannot heal; says when PostHog accepts requests again, if known."""
    retry_at = exc.retry_at
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


def build_snapshot_asset(
    *, source: SnapshotSource, specs: Mapping[str, dg.AssetSpec], resource_key: str
) -> dg.AssetsDefinition:
    """The graph-backed asset of ``source``: fetch (stages rows to disk), then write.

    ``specs`` holds one spec per table, by table name: the source's table and its companions,
    which come from the same fetch and are written in the same transaction, so they cannot be
    materialized apart. A spec may depend on another of the same asset (a tidy table on
    ``insights``).
    """
    table = source.table
    tables = {t.name: t for t in (table, *source.companions)}
    if set(specs) != set(tables):
        raise ValueError(f"{table.name}: specs for {sorted(tables)} needed, got {sorted(specs)}")
    base = "__".join(specs[table.name].key.path)
    config_cls = source.config_cls

    def fetch(context: dg.OpExecutionContext) -> StagedSnapshot:
        config = config_cls(**context.op_config) if config_cls is not None else None
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
                staging = {
                    name: stack.enter_context(StagedRows(folder / name, t.staged_columns))
                    for name, t in tables.items()
                }
                companions = {n: rows for n, rows in staging.items() if n != table.name}
                partition_key = context.partition_key if context.has_partition_key else None
                request = StageRequest(
                    client, staging[table.name], resource, config, context.log, snapshot_at,
                    companions, partition_key,
                )  # fmt: skip
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
        main = staging[table.name]
        return StagedSnapshot(
            files=list(main.files),
            rows=main.rows,
            companions={
                name: StagedPart(files=list(rows.files), rows=rows.rows)
                for name, rows in companions.items()
            },
            scope={
                "project_id": resource.stored_project_id,
                **({"snapshot_date": snapshot_at[:10]} if table.daily else {}),
                **({table.partition.name: partition_key} if table.partition else {}),
            },
            snapshot_at=snapshot_at,
            stats={
                "requests": client.request_count - before,
                **stats,
                "fetch_seconds": round(time.monotonic() - started, 3),
            },
        )

    fetch_op = dg.op(
        name=f"{base}__fetch",
        description=f"Fetch {table.qualified_name} from PostHog and stage it on disk.",
        config_schema=config_cls.to_config_schema() if config_cls is not None else None,
        out=dg.Out(StagedSnapshot),
        pool=POSTHOG_API_POOL,
        required_resource_keys={resource_key, DUCKDB_RESOURCE_KEY},
        retry_policy=FETCH_RETRY_POLICY,
        tags={"posthog/step": "fetch"},
    )(fetch)

    def write(context: dg.OpExecutionContext, staged: StagedSnapshot) -> Iterator[dg.Output[None]]:
        started = time.monotonic()
        duck = getattr(context.resources, DUCKDB_RESOURCE_KEY)
        with duckdb_disk_errors(duck.database), writer_connection(duck) as conn:
            inserted = replace_snapshot(conn, table, staged, companions=source.companions)
            described = dict(source.describe(conn, staged))
        with duckdb_disk_errors(_staging_path(duck.database)):
            remove_staging(staged.all_files)
        write_seconds = round(time.monotonic() - started, 3)
        figures = {**staged.scope, **staged.stats, **described}
        if source.companions:
            figures["rows_by_table"] = dict(inserted)
        for name, out_table in tables.items():
            common = {
                "dagster/row_count": dg.MetadataValue.int(inserted[name]),
                "snapshot_at": dg.MetadataValue.text(staged.snapshot_at),
                **{k: _metadata_value(v) for k, v in staged.scope.items()},
            }
            if out_table is not table:
                yield dg.Output(None, name, metadata=common)
                continue
            yield dg.Output(
                None,
                name,
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

    write_op = dg.op(
        name=f"{base}__write",
        description="Replace the snapshot rows of "
        + ", ".join(t.qualified_name for t in tables.values())
        + " in one DuckDB transaction.",
        ins={"staged": dg.In(StagedSnapshot)},
        out={name: dg.Out(dg.Nothing) for name in tables},
        pool=DUCKDB_POOL,
        required_resource_keys={DUCKDB_RESOURCE_KEY},
        tags={"posthog/step": "write"},
    )(write)

    # Run config sits on the asset itself (ops: {<base>: {config: ...}}), not on the inner op.
    config_mapping = (
        dg.ConfigMapping(
            config_fn=lambda cfg: {fetch_op.name: {"config": cfg}},
            config_schema=config_cls.to_config_schema(),
        )
        if config_cls is not None
        else None
    )

    @dg.graph(name=base, out={name: dg.GraphOut() for name in tables}, config=config_mapping)
    def graph():  # type: ignore[no-untyped-def]
        outputs = write_op(fetch_op())
        return dict(zip(tables, outputs, strict=True)) if len(tables) > 1 else {table.name: outputs}

    # Built from the graph and the specs, not with graph_multi_asset: only this keeps the deps a
    # spec has on another spec of the same asset (the tidy tables' edge from insights).
    return dg.AssetsDefinition(
        node_def=graph,
        keys_by_output_name={name: spec.key for name, spec in specs.items()},
        specs=list(specs.values()),
        can_subset=False,
    )


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

"""Export assets: one asset per configured export, all of a project's exports in one step.

Why one ``multi_asset`` step with threads inside (rather than one step per export): an export is
almost all waiting (PostHog renders, we poll), so twenty exports in twenty threads wait together and
a run takes about as long as its slowest export, without twenty process spawns (seconds each) or a
multiprocess executor. ``can_subset=True`` keeps every export individually selectable; the
``posthog_api`` pool bounds how many such steps hit PostHog at once across runs.
"""

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed

import dagster as dg

from posthog_assets.common import dedup_root_from_tags
from posthog_assets.config import PostHogProject
from posthog_assets.exports.previews import file_preview_metadata
from posthog_assets.exports.records import ExportFailure, ExportMaterialization
from posthog_assets.exports.runner import ExportRequest, ExportRunner
from posthog_assets.pools import POSTHOG_API_POOL, free_slots_of_ended_runs
from posthog_assets.resources import PostHogResource
from posthog_assets.translator import (
    DagsterPostHogTranslator,
    PostHogExportProps,
    PostHogMetadataSet,
)

DEFAULT_MAX_CONCURRENT_EXPORTS = 32

DEFAULT_EXPORT_RETRY_POLICY = dg.RetryPolicy(
    max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)

#: What runs the exports of a step: ``(context, posthog) -> materializations``.
ExportExecute = Callable[
    [dg.AssetExecutionContext, PostHogResource], Iterable[dg.MaterializeResult]
]


def build_posthog_export_assets(
    *,
    project: PostHogProject,
    translator: DagsterPostHogTranslator | None = None,
    execute: ExportExecute | None = None,
    retry_policy: dg.RetryPolicy | None = DEFAULT_EXPORT_RETRY_POLICY,
    pool: str = POSTHOG_API_POOL,
) -> list[dg.AssetsDefinition]:
    """One ``multi_asset`` holding every export of ``project`` (empty list when there are none).

    Args:
        translator: Override keys, groups, tags, descriptions (``replace_attributes``).
        execute: Runs the selected exports (default :func:`posthog_exports`): wrap it to add
            work before or after, or to post-process what it yields.
        retry_policy: In-run step retries for retryable failures (timeouts, 5xx, 429).
        pool: Dagster concurrency pool bounding PostHog steps across runs.
    """
    translator = translator or DagsterPostHogTranslator()
    specs = [
        translator.get_asset_spec(PostHogExportProps(project=project, export=export))
        for export in project.exports
    ]
    if not specs:
        return []
    resource_key = project.resource_key
    run = execute or posthog_exports

    @dg.multi_asset(
        name="_".join([*project.key_prefix, "exports"]),
        specs=specs,
        can_subset=True,
        pool=pool,
        retry_policy=retry_policy,
        required_resource_keys={resource_key},
        description=f"PostHog exports of project '{project.name}', rendered and downloaded "
        "concurrently.",
    )
    def _posthog_exports(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        yield from run(context, getattr(context.resources, resource_key))

    return [_posthog_exports]


def posthog_exports(
    context: dg.AssetExecutionContext,
    posthog: PostHogResource,
    *,
    max_concurrent_exports: int = DEFAULT_MAX_CONCURRENT_EXPORTS,
) -> Iterator[dg.MaterializeResult]:
    """Export every selected asset of the step, ``max_concurrent_exports`` at a time; what to
    export is read back from each spec's :class:`PostHogMetadataSet`. One failure does not stop
    the others; the step then fails listing every failed export."""
    free_slots_of_ended_runs(context.instance, context.log)  # e.g. the exports log's duckdb
    run = context.run
    root = dedup_root_from_tags(run.tags, run.root_run_id or run.run_id)
    keys = sorted(context.selected_asset_keys, key=lambda k: k.to_user_string())
    latest = context.instance.get_latest_materialization_events(keys)
    tasks: dict[dg.AssetKey, tuple[ExportRequest, frozenset[int]]] = {}
    for key in keys:
        event = latest.get(key)
        previous = ExportMaterialization.from_event(event)
        if event is not None and event.run_id == run.run_id and previous:
            context.log.info(
                "%s: already exported by an earlier attempt of this step (export %s)",
                key.to_user_string(),
                previous.export_id,
            )
            metadata = event.asset_materialization.metadata  # type: ignore[union-attr]
            yield dg.MaterializeResult(asset_key=key, metadata=dict(metadata))
            continue
        request = _export_request(context.assets_def.specs_by_key[key], root)
        tasks[key] = (request, frozenset({previous.export_id} if previous else ()))
    if tasks:
        # A first attempt of a brand-new run cannot have exports of its own yet: skip the list.
        scan_list = context.retry_number > 0 or root != run.run_id
        yield from _run_exports(context, posthog, tasks, scan_list, max_concurrent_exports)


def _export_request(spec: dg.AssetSpec, root: str) -> ExportRequest:
    """What to ask PostHog for ``spec``; the same for every attempt of runs with this ``root``."""
    ids = PostHogMetadataSet.extract(spec.metadata)
    return ExportRequest(
        asset_name=str(ids.export_name),
        export_format=str(ids.export_format),
        dedup_key=f"{spec.key.to_user_string()}|{root}",
        insight=ids.insight_id,
        dashboard=ids.dashboard_id,
        export_context=json.loads(ids.export_context) if ids.export_context else None,
    )


def _run_exports(
    context: dg.AssetExecutionContext,
    posthog: PostHogResource,
    tasks: Mapping[dg.AssetKey, tuple[ExportRequest, frozenset[int]]],
    scan_list: bool,
    max_workers: int,
) -> Iterator[dg.MaterializeResult]:
    """Each export in a thread, its materialization as soon as it is done; then one failure
    naming every export that failed."""
    client = posthog.get_client(log=context.log)
    runner = ExportRunner(client, posthog.export_path, poll=posthog.poll_policy(), log=context.log)
    failures: list[ExportFailure] = []
    workers = max(1, min(max_workers, len(tasks)))
    context.log.info("Running %d PostHog export(s) with %d thread(s)", len(tasks), workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="posthog-export") as tp:
        futures = {
            tp.submit(_export_one, runner, request, exclude, scan_list, posthog.project_id): key
            for key, (request, exclude) in tasks.items()
        }
        for future in as_completed(futures):
            key = futures[future]
            try:
                metadata = future.result()
            except Exception as exc:  # collected: every export gets its chance
                name, (request, _) = key.to_user_string(), tasks[key]
                failures.append(ExportFailure.of(name, request.asset_name, exc))
                context.log.error("%s failed (%s): %s", name, failures[-1].kind, exc)
                continue
            yield dg.MaterializeResult(asset_key=key, metadata=metadata)
    if failures:
        failures.sort(key=lambda f: f.asset_key)
        raise dg.Failure(
            description=f"{len(failures)} of {len(tasks)} PostHog export(s) failed:\n"
            + "\n".join(f.line for f in failures),
            metadata=ExportFailure.to_metadata(failures),
            allow_retries=any(f.retryable for f in failures),
        )


def _export_one(
    runner: ExportRunner,
    request: ExportRequest,
    exclude: frozenset[int],
    scan_list: bool,
    project_id: str,
) -> dict[str, dg.MetadataValue]:
    """Run one export; the metadata of its materialization, with the file's preview."""
    outcome = runner.run(request, exclude_ids=exclude, scan_list=scan_list)
    url: str | None = None
    if request.dashboard is not None:
        url = runner.client.ui_url("dashboard", request.dashboard)
    elif request.insight is not None:
        url = runner.client.ui_url("insights", request.insight)
    record = ExportMaterialization(
        export_id=outcome.export_id,
        export_format=request.export_format,
        path=str(outcome.path),
        filename=outcome.server_filename or outcome.path.name,
        bytes=outcome.bytes,
        sha256=outcome.sha256,
        created_at=outcome.created_at or "",
        expires_after=outcome.expires_after or "",
        downloaded_at=outcome.downloaded_at,
        project_id=str(project_id),
        poll_count=outcome.poll_count,
        wait_s=float(outcome.wait_s),
        resumed=outcome.resumed,
        recreated=outcome.recreated,
        insight_id=request.insight,
        dashboard_id=request.dashboard,
        posthog_url=url,
    )
    return {**record.to_metadata(), **file_preview_metadata(outcome.path, request.export_format)}

"""Export assets: one asset per configured export, all of a project's exports in one step.

Why one ``multi_asset`` step with threads inside (rather than one step per export): an export is
almost all waiting (PostHog renders, we poll), so twenty exports in twenty threads wait together and
a run takes about as long as its slowest export, without twenty process spawns (seconds each) or a
multiprocess executor. ``can_subset=True`` keeps every export individually selectable; the
``posthog_api`` pool bounds how many such steps hit PostHog at once across runs.
"""

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import dagster as dg

from posthog_assets.api.client import PostHogClient
from posthog_assets.common import (
    FAILURES_METADATA_KEY,
    dedup_root_from_tags,
    materialization_values,
)
from posthog_assets.config import ExportConfig, ProjectConfig
from posthog_assets.exports.previews import file_preview_metadata
from posthog_assets.exports.runner import (
    ExportOutcome,
    ExportRequest,
    ExportRunner,
    failure_kind,
)
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


def exports_op_name(project: ProjectConfig) -> str:
    return "_".join([*project.key_prefix, "exports"])


def export_specs(
    project: ProjectConfig, translator: DagsterPostHogTranslator | None = None
) -> list[dg.AssetSpec]:
    """The translator's spec for every configured export of ``project`` (no HTTP)."""
    translator = translator or DagsterPostHogTranslator()
    return [
        translator.get_asset_spec(PostHogExportProps(project=project, export=export))
        for export in project.exports
    ]


# ---------------------------------------------------------------------- the export step


@dataclass(frozen=True)
class ExportTask:
    """One export of this step: its asset, what to ask PostHog, and what must not be reused."""

    spec: dg.AssetSpec
    request: ExportRequest
    exclude_ids: frozenset[int]
    scan_list: bool


def build_posthog_export_assets(
    *,
    project: ProjectConfig,
    translator: DagsterPostHogTranslator | None = None,
    max_concurrent_exports: int = DEFAULT_MAX_CONCURRENT_EXPORTS,
    retry_policy: dg.RetryPolicy | None = DEFAULT_EXPORT_RETRY_POLICY,
    pool: str = POSTHOG_API_POOL,
) -> list[dg.AssetsDefinition]:
    """One ``multi_asset`` holding every export of ``project`` (empty list when there are none).

    Args:
        project: The configured project; its exports become assets via ``translator``.
        translator: Override keys, groups, tags, descriptions (``replace_attributes``).
        max_concurrent_exports: Threads waiting on PostHog at once inside the step.
        retry_policy: In-run step retries for retryable failures (timeouts, 5xx, 429).
        pool: Dagster concurrency pool bounding PostHog steps across runs.
    """
    specs = export_specs(project, translator)
    if not specs:
        return []
    configs: dict[str, ExportConfig] = {e.name: e for e in project.exports}
    resource_key = project.resource_key

    @dg.multi_asset(
        name=exports_op_name(project),
        specs=specs,
        can_subset=True,
        pool=pool,
        retry_policy=retry_policy,
        required_resource_keys={resource_key},
        description=f"PostHog exports of project '{project.name}', rendered and downloaded "
        "concurrently.",
    )
    def _posthog_exports(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        free_slots_of_ended_runs(context.instance, context.log)  # e.g. the exports log's duckdb
        resource: PostHogResource = getattr(context.resources, resource_key)
        client = resource.get_client(log=context.log)
        runner = ExportRunner(
            client,
            resource.export_path,
            poll=resource.poll_policy(),
            log=context.log,
        )
        selected = [s for s in specs if s.key in context.selected_asset_keys]
        latest = context.instance.get_latest_materialization_events([s.key for s in selected])
        root = _dedup_root(context)
        # A first attempt of a brand-new run cannot have exports of its own yet: skip the list.
        scan_list = context.retry_number > 0 or root != context.run.run_id

        tasks: list[ExportTask] = []
        for spec in selected:
            event = latest.get(spec.key)
            previous = materialization_values(event)
            if event is not None and event.run_id == context.run.run_id and previous:
                # An earlier attempt of this very step already finished this export: report it
                # again instead of asking PostHog for another one.
                context.log.info(
                    "%s: already exported by an earlier attempt of this step (export %s)",
                    spec.key.to_user_string(),
                    previous.get("export_id"),
                )
                yield dg.MaterializeResult(
                    asset_key=spec.key,
                    metadata=dict(event.asset_materialization.metadata),  # type: ignore[union-attr]
                )
                continue
            ids = PostHogMetadataSet.extract(spec.metadata)
            config = configs[str(ids.export_name)]
            request = ExportRequest(
                asset_name=str(ids.export_name),
                export_format=str(ids.export_format or config.export_format),
                dedup_key=f"{spec.key.to_user_string()}|{root}",
                insight=ids.insight_id,
                dashboard=ids.dashboard_id,
                export_context=config.export_context,
            )
            prev_id = previous.get("export_id")
            exclude = frozenset({int(prev_id)}) if isinstance(prev_id, int) else frozenset()
            tasks.append(ExportTask(spec, request, exclude, scan_list))
        if not tasks:
            return

        failures: list[dict[str, Any]] = []
        workers = max(1, min(max_concurrent_exports, len(tasks)))
        context.log.info("Running %d PostHog export(s) with %d thread(s)", len(tasks), workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="posthog-export") as tp:
            futures: dict[Future[dict[str, Any]], ExportTask] = {
                tp.submit(_export_one, runner, client, resource.project_id, task): task
                for task in tasks
            }
            for future in as_completed(futures):
                task = futures[future]
                try:
                    metadata = future.result()
                except Exception as exc:  # collected: every export gets its chance
                    kind, retryable = failure_kind(exc)
                    failures.append(
                        {
                            "asset_key": task.spec.key.to_user_string(),
                            "export_name": task.request.asset_name,
                            "export_id": getattr(exc, "export_id", None),
                            "kind": kind,
                            "retryable": retryable,
                            # When PostHog's rate limit will let a retry through (epoch seconds).
                            "retry_at": getattr(exc, "retry_at", None),
                            "message": str(exc),
                        }
                    )
                    context.log.error(
                        "%s failed (%s): %s", task.spec.key.to_user_string(), kind, exc
                    )
                    continue
                yield dg.MaterializeResult(asset_key=task.spec.key, metadata=metadata)

        if failures:
            failures.sort(key=lambda f: f["asset_key"])
            any_retryable = any(f["retryable"] for f in failures)
            lines = [
                f"- {f['export_name']} (export {f['export_id'] or 'not created'}, {f['kind']}, "
                f"{'retryable' if f['retryable'] else 'not retryable'}): {f['message']}"
                for f in failures
            ]
            raise dg.Failure(
                description=f"{len(failures)} of {len(tasks)} PostHog export(s) failed:\n"
                + "\n".join(lines),
                metadata={FAILURES_METADATA_KEY: dg.MetadataValue.json(failures)},
                allow_retries=any_retryable,
            )

    return [_posthog_exports]


def _dedup_root(context: dg.AssetExecutionContext) -> str:
    return dedup_root_from_tags(context.run.tags, context.run.root_run_id or context.run.run_id)


def _export_one(
    runner: ExportRunner, client: PostHogClient, project_id: str, task: ExportTask
) -> dict[str, Any]:
    outcome = runner.run(task.request, exclude_ids=task.exclude_ids, scan_list=task.scan_list)
    return outcome_metadata(outcome, client=client, project_id=project_id)


def outcome_metadata(
    outcome: ExportOutcome, *, client: PostHogClient, project_id: str
) -> dict[str, Any]:
    """What a materialization records: ids, file facts, UI link, waiting, and a preview."""
    metadata: dict[str, Any] = {
        "export_id": dg.MetadataValue.int(outcome.export_id),
        "export_format": dg.MetadataValue.text(outcome.export_format),
        "path": dg.MetadataValue.path(str(outcome.path)),
        "filename": dg.MetadataValue.text(outcome.server_filename or outcome.path.name),
        "bytes": dg.MetadataValue.int(outcome.bytes),
        "sha256": dg.MetadataValue.text(outcome.sha256),
        "created_at": dg.MetadataValue.text(outcome.created_at or ""),
        "expires_after": dg.MetadataValue.text(outcome.expires_after or ""),
        "downloaded_at": dg.MetadataValue.text(outcome.downloaded_at),
        "project_id": dg.MetadataValue.text(str(project_id)),
        "poll_count": dg.MetadataValue.int(outcome.poll_count),
        "wait_s": dg.MetadataValue.float(float(outcome.wait_s)),
        "resumed": dg.MetadataValue.bool(outcome.resumed),
        "recreated": dg.MetadataValue.bool(outcome.recreated),
    }
    if outcome.insight is not None:
        metadata["insight_id"] = dg.MetadataValue.int(outcome.insight)
        metadata["posthog_url"] = dg.MetadataValue.url(client.ui_url("insights", outcome.insight))
    if outcome.dashboard is not None:
        metadata["dashboard_id"] = dg.MetadataValue.int(outcome.dashboard)
        metadata["posthog_url"] = dg.MetadataValue.url(
            client.ui_url("dashboard", outcome.dashboard)
        )
    metadata.update(file_preview_metadata(outcome.path, outcome.export_format))
    return metadata

"""Exported assets: create/list/retrieve/content with PostHog's validation and lifecycle
(``products/exports/backend/api/exports.py``,
``products/exports/backend/models/exported_asset.py``).

An export's progress is computed from the clock: ``ready_at`` decides when ``has_content`` (or the
failure text) appears, and an export still pending past the stuck threshold shows PostHog's
synthetic "Export failed without throwing…" text, without the stored record changing.

The newest PostHog holds ``POST /exports/`` open while the export workflow renders
(``execute_workflow``): the row exists (pending) from the start, the answer comes when it is done,
and a client that gives up early leaves the export to finish anyway. Video formats are started
and answered at once (``start_workflow``).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from . import errors, render
from .auth import Ctx
from .hashing import mix
from .pagination import limit_offset_page
from .seed import Insight, Seed, iso_z
from .state import ExportRecord, State

STUCK_TEXT = (
    "Export failed without throwing an exception. Please try to rerun this export and contact "
    "support if it fails to complete multiple times."
)
NEEDS_TARGET = "Either dashboard, insight or export_context is required for an export."
VIDEO_ONLY_RECORDINGS = "Video export supports session recordings only."
#: Monthly limit of full video exports on the free plan (the create serializer's quota).
VIDEO_MONTHLY_LIMIT = 10
_EXPIRY_DAYS = {render.CSV: 7, render.XLSX: 7, render.WEBM: 30, render.MP4: 30, render.GIF: 30}


def expires_after(export_format: str, now: datetime) -> datetime:
    """Midnight (UTC) of now + the format's lifetime: 7 d tabular, 30 d video, else 180 d."""
    moment = now + timedelta(days=_EXPIRY_DAYS.get(export_format, 180))
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def required_scopes(body: Any) -> list[str]:
    """``export:write`` plus the read scopes of what the export reads.

    PostHog's ``required_scopes_for_export_target``: a key that may not read an insight may not
    export it either.
    """
    scopes = ["export:write"]
    if not isinstance(body, dict):
        return scopes
    if body.get("insight") is not None:
        scopes.append("insight:read")
    if body.get("dashboard") is not None:
        scopes.append("dashboard:read")
    context = body.get("export_context")
    if isinstance(context, dict):
        if context.get("session_recording_id"):
            scopes.append("session_recording:read")
        if context.get("source"):
            scopes.append("query:read")
    return scopes


def progress(rec: ExportRecord, state: State, now: float) -> tuple[bool, str | None]:
    """``(has_content, exception)`` as the serializer would report them right now."""
    if rec.ready_at is not None and now >= rec.ready_at:
        return (rec.failure is None), rec.failure
    video = rec.export_format in render.VIDEO_FORMATS
    threshold = state.config.stuck_threshold_video_s if video else state.config.stuck_threshold_s
    if now - rec.created > threshold:
        return False, STUCK_TEXT
    return False, None


def is_expired(rec: ExportRecord, now: float) -> bool:
    return rec.expires_after.timestamp() <= now


def serialize(rec: ExportRecord, state: State, now: float) -> dict[str, Any]:
    has_content, exception = progress(rec, state, now)
    return {
        "id": rec.id,
        "dashboard": rec.dashboard,
        "insight": rec.insight,
        "export_format": rec.export_format,
        "created_at": iso_z(rec.created_at),
        "has_content": has_content,
        "export_context": rec.export_context,
        "filename": rec.filename,
        "expires_after": iso_z(rec.expires_after),
        "exception": exception,
        "user_access_level": "editor",  # only the creator can see an export: always its owner
    }


def _own(ctx: Ctx, rec: ExportRecord) -> bool:
    return (
        rec.project_id == ctx.project.id
        and rec.user_id == ctx.key.user_id
        and not is_expired(rec, ctx.now)
    )


def _get_own(ctx: Ctx) -> ExportRecord:
    raw = ctx.request.path_params["export_id"]
    rec = ctx.state.exports.get(int(raw)) if raw.isdigit() else None
    if rec is None or not _own(ctx, rec):
        raise errors.not_found()
    return rec


# ---- validation -----------------------------------------------------------------------------


def _pk(body: dict[str, Any], field: str, exists: Any) -> int | None:
    """DRF ``PrimaryKeyRelatedField``: type and existence errors on ``field``."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        kind = type(value).__name__
        raise errors.validation_error(
            f"Incorrect type. Expected pk value, received {kind}.", field, "incorrect_type"
        )
    if not exists(int(value)):
        raise errors.validation_error(
            f'Invalid pk "{value}" - object does not exist.', field, "does_not_exist"
        )
    return int(value)


def _validate(ctx: Ctx) -> tuple[str, int | None, int | None, Any]:
    """Field errors in serializer field order, then ``validate()``'s object-level checks."""
    body = {} if ctx.body is None else ctx.body
    if not isinstance(body, dict):
        raise errors.validation_error(
            f"Invalid data. Expected a dictionary, but got {type(body).__name__}.", None, "invalid"
        )
    seed = ctx.state.seed
    dashboard = _pk(body, "dashboard", lambda v: seed.dashboard_by_id(v) is not None)
    insight = _pk(body, "insight", lambda v: seed.insight_by_id(v) is not None)
    if "export_format" not in body:
        raise errors.validation_error("This field is required.", "export_format", "required")
    export_format = body["export_format"]
    if export_format is None:
        raise errors.validation_error("This field may not be null.", "export_format", "null")
    if export_format not in render.EXTENSIONS:
        raise errors.validation_error(
            f'"{export_format}" is not a valid choice.', "export_format", "invalid_choice"
        )
    context = body.get("export_context")
    if not dashboard and not insight and not context:
        raise errors.validation_error(NEEDS_TARGET)
    if insight is not None and seed.insight_by_id(insight).project.id != ctx.project.id:
        raise errors.validation_error("This insight does not belong to your team.", "insight")
    if dashboard is not None and seed.dashboard_by_id(dashboard).project.id != ctx.project.id:
        raise errors.validation_error("This dashboard does not belong to your team.", "dashboard")
    if (
        isinstance(context, dict)
        and context.get("path") is not None
        and (str(context.get("method", "GET")).upper() != "GET" or context.get("body"))
    ):
        raise errors.validation_error(
            "Only GET requests with no body can be exported.", "export_context"
        )
    return export_format, dashboard, insight, context


def _video_quota_exceeded(state: State, project_id: int, now: datetime) -> bool:
    month = (now.year, now.month)
    used = sum(
        1
        for rec in state.exports.values()
        if rec.project_id == project_id
        and rec.export_format in render.VIDEO_FORMATS
        and isinstance(rec.export_context, dict)
        and rec.export_context.get("mode") == "video"
        and (rec.created_at.year, rec.created_at.month) == month
    )
    return used >= VIDEO_MONTHLY_LIMIT


def _delay(state: State, export_format: str, dashboard: int | None, insight: int | None) -> float:
    """Render time: per target, else per format, else the default (video has its own)."""
    cfg = state.config
    for target in (f"insight:{insight}", f"dashboard:{dashboard}"):
        if target in cfg.export_delay_by_target:
            return cfg.export_delay_by_target[target]
    if export_format in cfg.export_delay_by_format:
        return cfg.export_delay_by_format[export_format]
    return cfg.video_delay_s if export_format in render.VIDEO_FORMATS else cfg.export_delay_s


def _failure(state: State, rec: ExportRecord) -> str | None:
    """Why this export will end failed, decided at creation (PDF/JSON, nothing to read…)."""
    count, text = state.fail_next
    if count > 0:
        state.fail_next = (count - 1, text)
        return text or "Injected export failure."
    if rec.export_format in (render.PDF, render.JSON):
        # image_exporter.py renders PNG only and raises NotImplementedError for the rest.
        return f"Export to format {rec.export_format} is not supported for insights"
    if rec.export_format in render.TABULAR_FORMATS:
        plan = tabular_plan(state.seed, rec)
        return plan if isinstance(plan, str) else None
    return None


def tabular_plan(seed: Seed, rec: ExportRecord) -> render.CsvPlan | str:
    return render.csv_plan(
        seed, rec.project_id, rec.insight, rec.dashboard, rec.export_context, rec.csv_rows
    )


# ---- handlers -------------------------------------------------------------------------------


async def create_export(ctx: Ctx) -> Response:
    export_format, dashboard, insight_id, context = _validate(ctx)
    state = ctx.state
    now = ctx.now
    created_at = datetime.fromtimestamp(now, UTC)
    is_video = export_format in render.VIDEO_FORMATS
    recording = context.get("session_recording_id") if isinstance(context, dict) else None
    if (
        is_video
        and recording
        and context.get("mode") == "video"
        and _video_quota_exceeded(state, ctx.project.id, created_at)
    ):
        raise errors.validation_error(
            f"You have reached the limit of {VIDEO_MONTHLY_LIMIT} full video exports this month.",
            "export_limit_exceeded",
        )
    seed = state.seed
    dashboard_obj = seed.dashboard_by_id(dashboard) if dashboard is not None else None
    insight = seed.insight_by_id(insight_id) if insight_id is not None else None
    delay = _delay(state, export_format, dashboard, insight_id)
    rec = ExportRecord(
        id=state.next_export_id,
        project_id=ctx.project.id,
        user_id=ctx.key.user_id,
        export_format=export_format,
        dashboard=dashboard,
        insight=insight_id,
        export_context=context,
        created=now,
        created_at=created_at,
        expires_after=expires_after(export_format, created_at),
        ready_at=now + delay,
        csv_rows=state.config.csv_rows,
        filename=render.filename_for(
            export_format,
            created_at,
            context,
            dashboard_obj.name if dashboard_obj else None,
            insight,
        ),
    )
    state.next_export_id += 1
    state.exports[rec.id] = rec
    state.stats.exports_created += 1
    if is_video and not recording:
        # PostHog raises this after the row exists; the row stays (and never renders).
        rec.ready_at = None
        raise errors.validation_error(VIDEO_ONLY_RECORDINGS)
    rec.failure = _failure(state, rec)
    held = not is_video and state.config.export_post_held
    if held and delay > 0:
        # The row is already listed (pending); answer once the render time has passed. If the
        # client leaves meanwhile, nothing is lost: readiness is decided by ``ready_at``.
        while rec.ready_at is not None and (remaining := rec.ready_at - state.now()) > 0:
            await asyncio.sleep(remaining)
    if (held or delay == 0) and rec.failure is None and export_format != render.CSV:
        await ensure_content(seed, rec)  # rendered before the POST is answered
    return JSONResponse(serialize(rec, state, state.now()), status_code=201)


async def list_exports(ctx: Ctx) -> Response:
    q = ctx.query
    wanted_format = q.get("export_format")
    if wanted_format not in render.EXTENSIONS:
        wanted_format = None  # PostHog ignores an unsupported value
    context_path = q.get("context_path")
    recording = q.get("session_recording_id")

    def keep(rec: ExportRecord) -> bool:
        if not _own(ctx, rec):
            return False
        if wanted_format and rec.export_format != wanted_format:
            return False
        context = rec.export_context if isinstance(rec.export_context, dict) else {}
        if context_path and context_path not in str(context.get("path") or ""):
            return False
        return not (recording and context.get("session_recording_id") != recording)

    records = sorted(
        (rec for rec in ctx.state.exports.values() if keep(rec)),
        key=lambda rec: (rec.created, rec.id),
        reverse=True,
    )
    now = ctx.now
    page = limit_offset_page(
        ctx.request,
        len(records),
        lambda offset, limit: [
            serialize(r, ctx.state, now) for r in records[offset : offset + limit]
        ],
    )
    return JSONResponse(page)


async def retrieve_export(ctx: Ctx) -> Response:
    return JSONResponse(serialize(_get_own(ctx), ctx.state, ctx.now))


def _no_content(state: State, rec: ExportRecord, now: float) -> errors.ApiError:
    """404 (the common version), or 425 before the render ends / 400 after it failed (the
    version whose content view checks the asset's state first)."""
    if state.config.content_not_ready_status != 425:
        return errors.not_found()
    finished = rec.ready_at is not None and now >= rec.ready_at
    if finished and rec.failure is not None:
        return errors.ApiError(
            400,
            "validation_error",
            "export_failed",
            f"Export failed: {rec.failure}",
        )
    return errors.ApiError(
        425,
        "invalid_request",
        "export_not_ready",
        "Export is not ready yet. Try again in a few seconds.",
    )


async def export_content(ctx: Ctx) -> Response:
    rec = _get_own(ctx)
    state = ctx.state
    has_content, _ = progress(rec, state, ctx.now)
    if not has_content:
        raise _no_content(state, rec, ctx.now)
    if rec.content_lost:
        raise errors.not_found()
    download = ctx.query.get("download", "").lower() == "true"
    direct = ctx.query.get("direct", "").lower() == "true" and rec.export_format == render.PNG
    if state.config.content_redirect and not direct:
        return RedirectResponse(presigned_url(state, rec, download), status_code=302)
    response = await content_response(state.seed, rec, download)
    response.headers["Cache-Control"] = "max-age=86400"
    return response


# ---- content --------------------------------------------------------------------------------


def presigned_url(state: State, rec: ExportRecord, download: bool) -> str:
    """An opaque, expiring object-storage URL on the storage listener (a different origin)."""
    now = state.now()
    if len(state.storage_tokens) > 10_000:  # keep the token table from growing without bound
        state.storage_tokens = {t: v for t, v in state.storage_tokens.items() if v[1] > now}
    token = secrets.token_urlsafe(24)
    state.storage_tokens[token] = (rec.id, now + state.config.presign_ttl_s)
    url = f"{state.storage_url}/exports/{token}"
    if download:
        disposition = f'attachment; filename="{rec.filename}"'
        url += f"?response-content-disposition={quote(disposition)}"
    return url


def _render_bytes(seed: Seed, rec: ExportRecord) -> bytes:
    """Bytes of every non-CSV format; deterministic in the record and the seed."""
    key = mix(seed.seed, rec.id, rec.insight or 0, rec.dashboard or 0)
    fmt = rec.export_format
    if fmt == render.PNG:
        insight = render.source_insight(seed, rec.insight, rec.export_context)
        if insight is not None:
            values = insight.values()
        elif rec.dashboard is not None:
            board = seed.dashboard_by_id(rec.dashboard)
            indexes = board.insight_indexes() if board else []
            values = [Insight(board.project, i).total() for i in indexes] if board else []
        else:
            values = [100 + mix(key, k) % 900 for k in range(8)]
        return render.png_image(values, key)
    if fmt == render.XLSX:
        plan = tabular_plan(seed, rec)
        assert not isinstance(plan, str), plan
        return render.xlsx_workbook(plan)
    if fmt == render.GIF:
        return render.gif_image(f"posthog stand-in export {rec.id}")
    return render.video_bytes(fmt, key)


async def ensure_content(seed: Seed, rec: ExportRecord) -> bytes:
    """Render once (in a thread: XLSX can take seconds) and keep the bytes on the record."""
    async with rec.render_lock:
        if rec.content is None:
            rec.content = await asyncio.to_thread(_render_bytes, seed, rec)
    return rec.content


async def content_response(seed: Seed, rec: ExportRecord, download: bool) -> Response:
    """The bytes with their MIME type and length; CSV is generated while it streams."""
    headers = {"Content-Type": rec.export_format}  # exactly the MIME, no charset added
    if download:
        headers["Content-Disposition"] = f'attachment; filename="{rec.filename}"'
    if rec.export_format == render.CSV:
        plan = tabular_plan(seed, rec)
        assert not isinstance(plan, str), plan
        headers["Content-Length"] = str(plan.size)
        stream: AsyncIterator[bytes] = render.stream_bytes(plan.chunks())
        return StreamingResponse(stream, headers=headers)
    data = await ensure_content(seed, rec)
    return Response(data, headers=headers)

"""Asset checks on downloaded export files: present, intact (sha256) and really the format.

The checks read what the latest materialization recorded (path, bytes, sha256, format) from the
instance and compare the file on disk with it, so they also catch files that were truncated,
replaced or deleted after the run. They never call PostHog.
"""

import contextlib
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from posthog_assets.common import file_sha256
from posthog_assets.config import PostHogProject
from posthog_assets.exports.previews import png_size
from posthog_assets.exports.records import ExportMaterialization

CHECK_FILE_PRESENT = "file_present"
CHECK_SHA256 = "sha256_matches"
CHECK_FORMAT = "format_valid"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def validate_format(path: Path, export_format: str) -> tuple[bool, str]:
    """Whether the bytes are what the MIME type says; (ok, reason)."""
    try:
        if export_format == "image/png":
            if png_size(path) is None:
                return False, "no PNG signature/IHDR header"
            with path.open("rb") as fh:
                fh.seek(-len(PNG_IEND), os.SEEK_END)  # png_size read 24 bytes: 12 are there
                tail = fh.read()
            if tail != PNG_IEND:
                return False, "PNG has no IEND chunk at the end (truncated?)"
            return True, "PNG signature, IHDR and IEND present"
        if export_format == "text/csv":
            frame = pd.read_csv(path, nrows=1000)
            if len(frame.columns) == 0:
                return False, "CSV has no columns"
            return True, f"CSV parses ({len(frame.columns)} columns)"
        if export_format.endswith("spreadsheetml.sheet"):
            if not zipfile.is_zipfile(path):
                return False, "not a zip container (truncated XLSX?)"
            import openpyxl

            with contextlib.closing(openpyxl.load_workbook(path, read_only=True)) as wb:
                sheets = len(wb.sheetnames)
            return sheets > 0, f"XLSX opens ({sheets} sheet(s))"
    except Exception as exc:
        return False, f"could not read as {export_format}: {type(exc).__name__}: {exc}"
    return True, f"no validator for {export_format}"


def verify_export(
    recorded: ExportMaterialization | None,
) -> Iterator[tuple[str, bool, str, dict[str, Any]]]:
    """(check name, passed, description, metadata) for each check, from what was recorded."""
    if recorded is None or not recorded.path:
        for name in (CHECK_FILE_PRESENT, CHECK_SHA256, CHECK_FORMAT):
            yield name, False, "No materialization with a file path is recorded yet.", {}
        return
    path, export_format = Path(recorded.path), recorded.export_format or ""
    facts: dict[str, Any] = {"path": dg.MetadataValue.path(str(path))}
    if not path.is_file():
        yield CHECK_FILE_PRESENT, False, f"{path} does not exist.", facts
        yield CHECK_SHA256, False, "File missing; nothing to hash.", facts
        yield CHECK_FORMAT, False, "File missing; nothing to validate.", facts
        return
    size = path.stat().st_size
    size_facts = {**facts, "bytes_on_disk": size, "bytes_recorded": recorded.bytes}
    if size <= 0:
        yield CHECK_FILE_PRESENT, False, f"{path} is empty.", size_facts
    elif recorded.bytes is not None and size != recorded.bytes:
        problem = f"{path} has {size} bytes, the export recorded {recorded.bytes}."
        yield CHECK_FILE_PRESENT, False, problem, size_facts
    else:
        yield CHECK_FILE_PRESENT, True, f"{path} exists ({size} bytes).", size_facts
    actual = file_sha256(path)
    sha_facts = {**facts, "sha256_on_disk": actual, "sha256_recorded": str(recorded.sha256)}
    same = actual == recorded.sha256
    verb = "matches" if same else "differs from"
    yield CHECK_SHA256, same, f"sha256 {verb} the recorded download.", sha_facts
    ok, reason = validate_format(path, export_format)
    yield CHECK_FORMAT, ok, reason, {**facts, "export_format": export_format}


def build_posthog_export_checks(
    *, project: PostHogProject, export_assets: Sequence[dg.AssetsDefinition]
) -> list[dg.AssetChecksDefinition]:
    """Three checks per export asset (file present, sha256, format) in one subsettable op."""
    keys = [k for a in export_assets for k in a.keys]
    if not keys:
        return []
    specs = [
        dg.AssetCheckSpec(name, asset=key, description=description)
        for key in keys
        for name, description in (
            (CHECK_FILE_PRESENT, "The exported file exists, is not empty, has recorded size."),
            (CHECK_SHA256, "The file's sha256 equals the one recorded at download."),
            (CHECK_FORMAT, "The bytes are the export format (PNG/CSV/XLSX)."),
        )
    ]

    @dg.multi_asset_check(
        name="_".join([*project.key_prefix, "export_checks"]),
        specs=specs,
        can_subset=True,
        description=f"File checks for PostHog exports of project '{project.name}'.",
    )
    def _export_checks(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        selected = context.selected_asset_check_keys
        asset_keys = sorted({ck.asset_key for ck in selected}, key=lambda k: k.to_user_string())
        latest = context.instance.get_latest_materialization_events(asset_keys)
        for key in asset_keys:
            recorded = ExportMaterialization.from_event(latest.get(key))
            for name, passed, description, facts in verify_export(recorded):
                if dg.AssetCheckKey(key, name) in selected:
                    yield dg.AssetCheckResult(
                        asset_key=key,
                        check_name=name,
                        passed=passed,
                        description=description,
                        metadata=facts,
                        severity=dg.AssetCheckSeverity.ERROR,
                    )

    return [_export_checks]

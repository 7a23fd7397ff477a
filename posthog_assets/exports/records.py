"""What the export step hands to its readers: a materialization's metadata and a failed step's
list of failed exports, each written and read back through one typed record, so the key names
(what people see in the UI) are spelled in one place only.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Self

import dagster as dg

from posthog_assets.api.errors import PostHogError
from posthog_assets.common import FAILURES_METADATA_KEY
from posthog_assets.exports.runner import ExportDiskError, failure_kind


def _entry(kind: Callable[[Any], dg.MetadataValue], default: Any = None) -> Any:
    """A field recorded as metadata ``kind`` under its own name; left out while None."""
    return field(default=default, metadata={"kind": kind})


def _typed(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``values`` of ``cls``'s fields that have the field's type; anything else is dropped."""
    return {
        f.name: values[f.name]
        for f in fields(cls)
        if f.name in values and isinstance(values[f.name], f.type)  # type: ignore[arg-type]
    }


@dataclass(frozen=True)
class ExportMaterialization:
    """The metadata of one export's materialization: ids, file facts, waiting, UI link. A field
    is None when a materialization did not record it (one reported by hand, say)."""

    export_id: int = _entry(dg.MetadataValue.int, MISSING)
    export_format: str | None = _entry(dg.MetadataValue.text)
    path: str | None = _entry(dg.MetadataValue.path)
    filename: str | None = _entry(dg.MetadataValue.text)
    bytes: int | None = _entry(dg.MetadataValue.int)
    sha256: str | None = _entry(dg.MetadataValue.text)
    created_at: str | None = _entry(dg.MetadataValue.text)
    expires_after: str | None = _entry(dg.MetadataValue.text)
    downloaded_at: str | None = _entry(dg.MetadataValue.text)
    project_id: str | None = _entry(dg.MetadataValue.text)
    poll_count: int | None = _entry(dg.MetadataValue.int)
    wait_s: float | None = _entry(dg.MetadataValue.float)
    resumed: bool | None = _entry(dg.MetadataValue.bool)
    recreated: bool | None = _entry(dg.MetadataValue.bool)
    insight_id: int | None = _entry(dg.MetadataValue.int)
    dashboard_id: int | None = _entry(dg.MetadataValue.int)
    posthog_url: str | None = _entry(dg.MetadataValue.url)

    def to_metadata(self) -> dict[str, dg.MetadataValue]:
        return {
            f.name: f.metadata["kind"](value)
            for f in fields(self)
            if (value := getattr(self, f.name)) is not None
        }

    @classmethod
    def from_metadata(cls, values: Mapping[str, Any]) -> Self | None:
        """From raw metadata values; None when they hold no export id (not an export)."""
        known = _typed(cls, values)
        return cls(**known) if "export_id" in known else None

    @classmethod
    def from_event(cls, event: dg.EventLogEntry | None) -> Self | None:
        if event is None or event.asset_materialization is None:
            return None
        metadata = event.asset_materialization.metadata
        return cls.from_metadata({k: v.value for k, v in metadata.items()})


@dataclass(frozen=True)
class ExportFailure:
    """One export that failed in a step, as the step's ``dg.Failure`` lists it for the retry
    sensor. ``retry_at`` (epoch seconds) is when PostHog's rate limit lets a retry through."""

    asset_key: str
    export_name: str = ""
    export_id: int | None = None
    kind: str = ""
    retryable: bool = True
    retry_at: float | None = None
    message: str = ""

    @classmethod
    def of(cls, asset_key: str, export_name: str, exc: Exception) -> Self:
        kind, retryable = failure_kind(exc)
        export_id = exc.export_id if isinstance(exc, PostHogError | ExportDiskError) else None
        retry_at = exc.retry_at if isinstance(exc, PostHogError) else None
        return cls(asset_key, export_name, export_id, kind, retryable, retry_at, str(exc))

    @property
    def line(self) -> str:
        """The failure as one line of the step's failure description."""
        state = "retryable" if self.retryable else "not retryable"
        created = self.export_id or "not created"
        return f"- {self.export_name} (export {created}, {self.kind}, {state}): {self.message}"

    @staticmethod
    def to_metadata(failures: Sequence["ExportFailure"]) -> dict[str, dg.MetadataValue]:
        return {FAILURES_METADATA_KEY: dg.MetadataValue.json([asdict(f) for f in failures])}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, dg.MetadataValue]) -> list[Self]:
        """The failures a step's failure metadata lists; unreadable entries are skipped."""
        entry = metadata.get(FAILURES_METADATA_KEY)
        items = (entry.value if entry is not None else None) or []
        typed = [_typed(cls, item) for item in items if isinstance(item, Mapping)]
        return [cls(**values) for values in typed if "asset_key" in values]

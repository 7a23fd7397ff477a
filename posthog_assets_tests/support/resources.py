"""The one way tests build a ``PostHogResource``: pointed at the stand-in, with fast retries and
polls (fractions of a second), any field overridable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posthog_assets.resources import PostHogResource
from posthog_assets_tests.support.session import TEST_RETRY
from posthog_standin.server import StandinProcess


def make_resource(
    standin: StandinProcess, export_dir: str | Path, **overrides: Any
) -> PostHogResource:
    fields: dict[str, Any] = {
        "host": standin.url,
        "project_id": str(standin.project_id),
        "personal_api_key": standin.key,
        "export_dir": str(export_dir),
        "max_attempts": TEST_RETRY.max_attempts,
        "backoff_initial_s": TEST_RETRY.backoff_initial_s,
        "backoff_max_s": TEST_RETRY.backoff_max_s,
        "retry_budget_s": TEST_RETRY.total_budget_s,
        "poll_interval_s": 0.05,
        "poll_max_interval_s": 0.3,
        "poll_timeout_s": 20.0,
        "read_timeout_s": 10.0,
        **overrides,
    }
    return PostHogResource(**fields)


def with_fields(resource: PostHogResource, **overrides: Any) -> PostHogResource:
    """A new resource with some fields changed (``model_copy`` would keep Dagster's stored
    config of the original)."""
    fields = {name: getattr(resource, name) for name in type(resource).model_fields}
    return type(resource)(**{**fields, **overrides})

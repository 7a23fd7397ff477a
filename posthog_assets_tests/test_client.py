"""PostHogClient against the stand-in over real HTTP: paging, retries, errors, downloads."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from posthog_assets.api.client import PostHogClient, RetrySettings
from posthog_assets.api.errors import (
    PostHogAuthError,
    PostHogConnectionError,
    PostHogExportFailed,
    PostHogNotFoundError,
    PostHogPermissionError,
    PostHogRateLimitError,
    PostHogServerError,
    PostHogValidationError,
)
from posthog_assets.exports.runner import tabular_context
from posthog_assets_tests.support.session import TEST_GROUPS_PER_TYPE, TEST_INSIGHTS, TEST_RETRY
from posthog_standin.server import StandinControl, StandinProcess

pytestmark = pytest.mark.integration


def _api_requests(control: StandinControl, method: str, fragment: str) -> list[dict]:
    return [
        r
        for r in control.requests_log()
        if r["method"] == method and fragment in r["path"] and "/_standin/" not in r["path"]
    ]


# ---------------------------------------------------------------- paging


def test_offset_pages_cover_every_insight_once(client: PostHogClient) -> None:
    ids: list[int] = []
    pages = 0
    for page in client.iter_insight_pages(basic=True, page_size=100):
        pages += 1
        assert page.count == TEST_INSIGHTS
        ids.extend(i["id"] for i in page.results)
    assert pages == -(-TEST_INSIGHTS // 100)
    assert len(ids) == len(set(ids)) == TEST_INSIGHTS


def test_offset_pages_are_lazy(client: PostHogClient, control: StandinControl) -> None:
    pages = client.iter_insight_pages(basic=True, page_size=100, prefetch=1)
    next(pages)
    assert len(_api_requests(control, "GET", "/insights")) == 1


def test_cursor_pages_cover_every_group_once(client: PostHogClient) -> None:
    keys: list[str] = []
    created: list[str] = []
    for page in client.iter_group_pages(1):
        assert "count" not in page
        keys.extend(g["group_key"] for g in page["results"])
        created.extend(g["created_at"] for g in page["results"])
    assert len(keys) == len(set(keys)) == TEST_GROUPS_PER_TYPE
    assert created == sorted(created, reverse=True)  # newest first


def test_group_routes(client: PostHogClient) -> None:
    types = client.list_group_types()
    assert [t["group_type_index"] for t in types] == [0, 1, 2]
    first = next(client.iter_group_pages(0))["results"][0]
    found = client.lookup_group(0, first["group_key"])
    assert found is not None and found["group_key"] == first["group_key"]
    assert client.lookup_group(0, first["group_key"] + "-gone") is None
    definitions = client.group_property_definitions()
    assert set(definitions) >= {"0", "1", "2"}
    prop = definitions["0"][0]["name"]
    values = client.group_property_values(0, prop)
    assert 0 < len(values) <= 20 and all({"name", "count"} <= set(v) for v in values)


def test_projects_listing(client: PostHogClient, standin: StandinProcess) -> None:
    ids = [p["id"] for p in client.list_projects()]
    assert standin.project_id in ids


# ---------------------------------------------------------------- retries


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_retryable_status_is_retried_then_succeeds(
    client: PostHogClient, control: StandinControl, status: int
) -> None:
    control.add_fault(
        match=r"/insights/?$",
        method="GET",
        kind="status",
        status=status,
        retry_after=1 if status in (429, 503) else None,
        times=2,
    )
    t0 = time.monotonic()
    page = next(client.iter_insight_pages(basic=True, page_size=5))
    assert len(page.results) == 5
    assert [r["status"] for r in _api_requests(control, "GET", "/insights")] == [
        status,
        status,
        200,
    ]
    if status in (429, 503):  # Retry-After: 1 was honoured both times
        assert time.monotonic() - t0 >= 2.0


def test_dropped_connection_is_retried(client: PostHogClient, control: StandinControl) -> None:
    control.add_fault(match=r"/groups_types", kind="drop", times=2)
    assert len(client.list_group_types()) == 3
    assert len(_api_requests(control, "GET", "/groups_types")) == 3


def test_retries_stop_after_the_attempt_budget(
    client: PostHogClient, control: StandinControl
) -> None:
    control.add_fault(match=r"/groups_types", kind="status", status=503, times=None)
    with pytest.raises(PostHogServerError, match="503"):
        client.list_group_types()
    assert len(_api_requests(control, "GET", "/groups_types")) == TEST_RETRY.max_attempts


def test_retries_stop_after_the_time_budget(
    standin: StandinProcess, control: StandinControl
) -> None:
    c = PostHogClient(
        standin.url,
        standin.project_id,
        standin.key,
        retry=RetrySettings(
            max_attempts=50,
            backoff_initial_s=0.2,
            backoff_max_s=0.2,
            jitter_s=0,
            total_budget_s=1.0,
        ),
    )
    control.add_fault(match=r"/groups_types", kind="status", status=500, times=None)
    t0 = time.monotonic()
    with pytest.raises(PostHogServerError):
        c.list_group_types()
    assert time.monotonic() - t0 < 2.0
    assert 2 <= len(_api_requests(control, "GET", "/groups_types")) <= 7


def test_retry_after_pauses_every_thread(client: PostHogClient, control: StandinControl) -> None:
    """After a 429 with Retry-After, no thread sends anything until the wait is over."""
    control.add_fault(match=r"/groups_types", kind="status", status=429, retry_after=1, times=1)
    threads = [threading.Thread(target=client.list_group_types) for _ in range(4)]
    threads[0].start()
    time.sleep(0.3)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    log = _api_requests(control, "GET", "/groups_types")
    first_429 = next(r for r in log if r["status"] == 429)
    later = [r for r in log if r is not first_429]
    assert len(later) == 4
    assert all(r["ts"] - first_429["ts"] >= 0.95 for r in later)


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_never_retried(
    client: PostHogClient, control: StandinControl, status: int
) -> None:
    control.add_fault(match=r"/groups_types", kind="status", status=status, times=None)
    with pytest.raises(
        (PostHogValidationError, PostHogAuthError, PostHogPermissionError, PostHogNotFoundError)
    ):
        client.list_group_types()
    assert len(_api_requests(control, "GET", "/groups_types")) == 1


def test_post_is_not_retried_after_the_request_was_sent(
    client: PostHogClient, control: StandinControl
) -> None:
    """A 503 on POST /exports/ may have created the export: the caller decides, not the client."""
    control.add_fault(match=r"/exports/?$", method="POST", kind="status", status=503, times=1)
    with pytest.raises(PostHogServerError):
        client.create_export("image/png", insight=1)
    assert len(_api_requests(control, "POST", "/exports")) == 1


def test_post_is_retried_after_429(client: PostHogClient, control: StandinControl) -> None:
    control.add_fault(
        match=r"/exports/?$", method="POST", kind="status", status=429, retry_after=1, times=1
    )
    export = client.create_export("image/png", insight=1)
    assert export["id"] and export["export_format"] == "image/png"
    assert [r["status"] for r in _api_requests(control, "POST", "/exports")] == [429, 201]


def test_read_timeout_is_a_connection_error(
    standin: StandinProcess, control: StandinControl
) -> None:
    c = PostHogClient(
        standin.url,
        standin.project_id,
        standin.key,
        read_timeout_s=0.3,
        retry=RetrySettings(max_attempts=2, backoff_initial_s=0.05, jitter_s=0),
    )
    control.add_fault(match=r"/groups_types", kind="slow", delay_s=2.0, times=None)
    with pytest.raises(PostHogConnectionError, match="read timeout"):
        c.list_group_types()


# ---------------------------------------------------------------- errors


def test_missing_scope_is_named(standin: StandinProcess, control: StandinControl) -> None:
    control.add_key("phx_insights_only", scopes=["insight:read"])
    c = PostHogClient(standin.url, standin.project_id, "phx_insights_only", retry=TEST_RETRY)
    with pytest.raises(PostHogPermissionError) as err:
        c.create_export("image/png", insight=1)
    assert err.value.missing_scope == "export:write"
    assert "The key lacks scope export:write" in str(err.value)
    assert len(_api_requests(control, "POST", "/exports")) == 1


def test_bad_key_fails_fast_and_is_never_shown(
    standin: StandinProcess, control: StandinControl, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "phx_not_a_real_key_but_secret_42"
    c = PostHogClient(standin.url, standin.project_id, secret, retry=TEST_RETRY)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PostHogAuthError) as err:
        c.list_group_types()
    assert "Personal API key" in str(err.value) and "Settings > Personal API keys" in str(err.value)
    for text in (str(err.value), repr(err.value), repr(c), repr(c.session.auth), caplog.text):
        assert secret not in text
    assert len(_api_requests(control, "GET", "/groups_types")) == 1


def test_unknown_project_is_not_found(standin: StandinProcess, control: StandinControl) -> None:
    c = PostHogClient(standin.url, 999_999, standin.key, retry=TEST_RETRY)
    with pytest.raises((PostHogNotFoundError, PostHogPermissionError)):
        c.list_group_types()


def test_validation_error_names_the_field(client: PostHogClient) -> None:
    with pytest.raises(PostHogValidationError) as err:
        client.get_json("groups/")  # group_type_index is required
    assert err.value.attr == "group_type_index"
    assert "field 'group_type_index'" in str(err.value)


def test_deprecated_prefix_warns_once_per_run(
    standin: StandinProcess,
    control: StandinControl,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two clients (two steps of one run, sharing the run's marker) warn once between them."""
    caplog.set_level(logging.WARNING)
    marker = tmp_path / "run-1-deprecation"
    for _ in range(2):
        c = PostHogClient(
            standin.url, standin.project_id, standin.key, api_prefix="environments",
            deprecation_marker=marker,
        )  # fmt: skip
        c.get_json("insights/", {"basic": "true", "limit": 1})
        c.get_json("insights/", {"basic": "true", "limit": 1})
    assert caplog.text.count("Sunset") == 1
    assert "set api_prefix='projects'" in caplog.text


def test_projects_prefix_is_the_default_and_not_deprecated(
    client: PostHogClient, standin: StandinProcess, control: StandinControl,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING)
    client.get_json("insights/", {"basic": "true", "limit": 1})
    assert _api_requests(control, "GET", f"/api/projects/{standin.project_id}/insights")
    assert "Sunset" not in caplog.text


# ---------------------------------------------------------------- downloads


def _csv_export(client: PostHogClient) -> dict:
    source = tabular_context(client.get_insight(1, basic=True), client.project_id)
    export = client.create_export("text/csv", insight=1, export_context=source)
    assert export["has_content"] is True, export
    return export


def test_download_matches_server_bytes(client: PostHogClient, tmp_path: Path) -> None:
    export = _csv_export(client)
    result = client.download_export_content(export["id"], tmp_path / "a.csv")
    raw = requests.get(
        client.url(f"exports/{export['id']}/content/"),
        headers={"Authorization": f"Bearer {client.session.auth._key}"},  # noqa: SLF001
        timeout=10,
    ).content
    assert (tmp_path / "a.csv").read_bytes() == raw
    assert result.bytes == len(raw) and result.sha256 == hashlib.sha256(raw).hexdigest()
    assert list(tmp_path.iterdir()) == [tmp_path / "a.csv"]


def test_redirect_to_storage_drops_the_key(
    client: PostHogClient, control: StandinControl, tmp_path: Path
) -> None:
    control.configure(content_redirect=True)
    export = client.create_export("image/png", insight=1)
    result = client.download_export_content(export["id"], tmp_path / "a.png")
    assert result.redirected
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = control.requests_log()
    content = [r for r in log if r["server"] == "api" and r["path"].endswith("/content/")]
    storage = [r for r in log if r["server"] == "storage"]
    assert [(r["status"], r["authorization"]) for r in content] == [(302, True)]
    assert [(r["status"], r["authorization"]) for r in storage] == [(200, False)]


def test_truncated_download_is_retried_and_never_left_half_written(
    client: PostHogClient, control: StandinControl, tmp_path: Path
) -> None:
    control.configure(content_redirect=False)  # PostHog streams the bytes itself, and breaks
    export = _csv_export(client)
    control.add_fault(match=r"/content", kind="drop_mid_body", times=1)
    result = client.download_export_content(export["id"], tmp_path / "a.csv")
    assert result.bytes == (tmp_path / "a.csv").stat().st_size
    assert [r["status"] for r in _api_requests(control, "GET", "/content")][-1] == 200
    control.add_fault(match=r"/content", kind="drop_mid_body", times=None)
    with pytest.raises(Exception, match="broke off|ended at|connection"):
        client.download_export_content(export["id"], tmp_path / "b.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]  # no .part, no b.csv


def test_content_before_ready_is_not_found(
    client: PostHogClient, control: StandinControl, tmp_path: Path
) -> None:
    control.configure(export_post_held=False, export_delay_s=30)
    export = client.create_export("image/png", insight=1)
    assert export["has_content"] is False
    with pytest.raises(PostHogNotFoundError):
        client.download_export_content(export["id"], tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []


def test_content_answers_425_and_400_of_another_posthog_version(
    client: PostHogClient, control: StandinControl, tmp_path: Path
) -> None:
    """425 export_not_ready is retried like a passing fault; 400 export_failed is final."""
    control.configure(content_not_ready_status=425, export_delay_s=30, export_post_held=False)
    pending = client.create_export("image/png", insight=1)
    with pytest.raises(PostHogServerError, match="425"):
        client.download_export_content(pending["id"], tmp_path / "a.png")
    statuses = [r["status"] for r in _api_requests(control, "GET", "/content")]
    assert statuses == [425] * TEST_RETRY.max_attempts
    control.configure(export_delay_s=0, export_post_held=True)
    failed = client.create_export("text/csv", insight=1)  # no source: PostHog fails it
    assert failed["exception"] == "'path'"
    with pytest.raises(PostHogExportFailed, match="failed"):
        client.download_export_content(failed["id"], tmp_path / "b.csv")
    assert list(tmp_path.iterdir()) == []


def test_200mb_download_streams_with_flat_memory(
    client: PostHogClient, control: StandinControl, tmp_path: Path
) -> None:
    control.configure(csv_rows=2_000_000)
    export = _csv_export(client)
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = client.download_export_content(export["id"], tmp_path / "big.csv")
    finally:
        done.set()
        sampler.join()
    assert result.bytes >= 100_000_000, result.bytes
    assert (tmp_path / "big.csv").stat().st_size == result.bytes
    assert (peak - baseline) < 50 * 2**20, f"RSS grew by {(peak - baseline) / 2**20:.0f} MB"


def test_rate_limit_error_carries_retry_after(
    standin: StandinProcess, control: StandinControl
) -> None:
    c = PostHogClient(
        standin.url, standin.project_id, standin.key, retry=RetrySettings(max_attempts=1)
    )
    control.add_fault(match=r"/groups_types", kind="status", status=429, retry_after=7, times=1)
    with pytest.raises(PostHogRateLimitError) as err:
        c.list_group_types()
    assert err.value.retry_after == 7
    assert "Expected available in" in str(err.value)
    assert "accepts requests again at" in str(err.value)
    assert err.value.retry_at == pytest.approx(time.time() + 7, abs=3)

"""The create -> poll -> download core, against the stand-in over real HTTP (no Dagster)."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from posthog_assets.api.client import PostHogClient
from posthog_assets.api.errors import (
    PostHogDownloadError,
    PostHogExportFailed,
    PostHogNotFoundError,
    PostHogPollTimeout,
)
from posthog_assets.api.polling import PollPolicy
from posthog_assets.exports.runner import (
    ExportRequest,
    ExportRunner,
    exception_is_retryable,
    safe_filename,
)
from posthog_assets_tests.support.exports import (
    CSV,
    PNG,
    XLSX,
    export_posts,
    part_files,
    server_content,
)

pytestmark = pytest.mark.integration

PDF_MIME = "application/pdf"
FAST_POLL = PollPolicy(interval_s=0.05, max_interval_s=0.2, timeout_s=10)


class Crash(BaseException):
    """Stands for the step's process dying mid-poll (not an Exception: nothing catches it)."""


def _runner(client: PostHogClient, tmp_path: Path, **kw) -> ExportRunner:
    return ExportRunner(client, tmp_path / "exports", poll=kw.pop("poll", FAST_POLL), **kw)


def _request(fmt: str = PNG, *, name: str = "weekly", key: str = "run-1", **kw) -> ExportRequest:
    kw.setdefault("insight", 1)
    return ExportRequest(asset_name=name, export_format=fmt, dedup_key=key, **kw)


@pytest.mark.parametrize("fmt", [PNG, CSV, XLSX])
def test_download_equals_server_content_with_sha256(client, control, standin, tmp_path, fmt):
    out = _runner(client, tmp_path).run(_request(fmt, insight=2))

    data = out.path.read_bytes()
    assert data == server_content(standin, out.export_id)
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    assert out.bytes == len(data) > 0
    assert out.path.parent == tmp_path / "exports" / "weekly"
    assert out.path.suffix == "." + {PNG: "png", CSV: "csv", XLSX: "xlsx"}[fmt]
    assert out.expires_after and out.created_at
    assert len(export_posts(control)) == 1
    assert part_files(tmp_path) == []


def test_pending_export_becomes_ready_after_several_polls(client, control, tmp_path, caplog):
    control.configure(export_post_held=False, export_delay_s=0.5)
    caplog.set_level(logging.INFO, logger="posthog_assets")

    out = _runner(client, tmp_path).run(_request())

    assert out.poll_count >= 3
    assert out.states[0] == "pending" and out.states[-1] == "ready"
    assert out.wait_s >= 0.5
    poll_lines = [r.getMessage() for r in caplog.records if " poll " in r.getMessage()]
    assert len(poll_lines) == out.poll_count
    assert all("after" in line and "s:" in line for line in poll_lines)


def test_pdf_of_insight_fails_with_posthogs_message_and_no_leftovers(client, control, tmp_path):
    """The configuration refuses PDF; should one reach PostHog, its failure is final."""
    with pytest.raises(PostHogExportFailed) as err:
        _runner(client, tmp_path).run(_request(PDF_MIME))

    assert "not supported for insights" in str(err.value)
    assert err.value.retryable is False
    assert err.value.export_id is not None  # type: ignore[attr-defined]
    assert [p for p in (tmp_path / "exports").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    ("text", "retryable"),
    [
        ("Export failed without throwing an exception. Please try to rerun this export.", True),
        ("Query timed out", True),
        ("Export to format application/pdf is not supported for insights", False),
        (
            "This export could not verify its original authorization. Create a new export and "
            "try again.",
            False,
        ),
        ("Some unknown failure", False),
    ],
)
def test_exception_text_is_surfaced_and_classified(client, control, tmp_path, text, retryable):
    control.configure(export_fail_next={"count": 1, "exception": text})

    with pytest.raises(PostHogExportFailed) as err:
        _runner(client, tmp_path).run(_request())

    assert text in str(err.value)
    assert err.value.retryable is retryable
    assert exception_is_retryable(text) is retryable


def test_poll_timeout_names_export_id_elapsed_and_last_state(client, control, tmp_path):
    control.configure(export_post_held=False, export_delay_s=60)
    poll = PollPolicy(interval_s=0.05, max_interval_s=0.1, timeout_s=0.4)

    with pytest.raises(PostHogPollTimeout) as err:
        _runner(client, tmp_path, poll=poll).run(_request())

    export_id = err.value.export_id  # type: ignore[attr-defined]
    message = str(err.value)
    assert f"export {export_id}" in message
    assert "still pending after 0." in message
    assert "has_content=False" in message and "resumes" in message
    assert err.value.retryable


@pytest.mark.parametrize("forget_marker", [False, True], ids=["recorded-id", "exports-list"])
def test_crashed_step_resumes_its_pending_export_with_exactly_one_post(
    client, control, tmp_path, forget_marker
):
    control.configure(export_post_held=False, export_delay_s=0.6)
    polls = []

    def crash_on_second_poll(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 2:
            raise Crash

    with pytest.raises(Crash):
        _runner(client, tmp_path, sleep=crash_on_second_poll).run(_request(key="run-7"))
    if forget_marker:  # e.g. the retry runs on another machine: only the exports list is left
        for marker in (tmp_path / "exports").rglob("*.json"):
            marker.unlink()

    out = _runner(client, tmp_path).run(_request(key="run-7"))  # a fresh process, same run

    assert out.resumed and out.post_count == 0
    assert len(export_posts(control)) == 1
    assert out.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_other_runs_and_recorded_exports_are_not_reused(client, control, tmp_path):
    runner = _runner(client, tmp_path)
    first = runner.run(_request(key="run-1"))

    other_run = runner.run(_request(key="run-2"))
    same_run_again = runner.run(_request(key="run-1"), exclude_ids={first.export_id})

    assert len({first.export_id, other_run.export_id, same_run_again.export_id}) == 3
    assert len(export_posts(control)) == 3


def test_lost_content_is_recreated_once(client, control, tmp_path):
    # The content route answers 404 once although has_content is true (expired/lost object).
    control.add_fault(
        match=r"/exports/\d+/content", method="GET", kind="status", status=404, times=1
    )

    out = _runner(client, tmp_path).run(_request())

    assert out.recreated and out.post_count == 2
    assert len(export_posts(control)) == 2
    assert out.path.read_bytes()[:4] == b"\x89PNG"


def test_lost_content_of_a_resumed_export_is_recreated_once(client, control, tmp_path):
    control.configure(export_post_held=False, export_delay_s=0.3)
    with pytest.raises(Crash):
        _runner(client, tmp_path, sleep=lambda s: (_ for _ in ()).throw(Crash)).run(_request())
    pending_id = next(client.iter_exports())["id"]
    control.lose_export_content(pending_id)  # ready later, but its stored object is gone

    out = _runner(client, tmp_path).run(_request())

    assert out.resumed and out.recreated and out.export_id != pending_id
    assert len(export_posts(control)) == 2
    assert out.path.read_bytes()[:4] == b"\x89PNG"


def test_expired_pending_export_is_replaced_by_a_fresh_one(client, control, tmp_path):
    control.configure(export_post_held=False, export_delay_s=60)
    poll = PollPolicy(interval_s=0.05, max_interval_s=0.1, timeout_s=0.2)
    with pytest.raises(PostHogPollTimeout) as err:
        _runner(client, tmp_path, poll=poll).run(_request(key="run-9"))
    expired_id = err.value.export_id  # type: ignore[attr-defined]
    control.expire_export(expired_id)
    control.configure(export_delay_s=0)

    out = _runner(client, tmp_path).run(_request(key="run-9"))

    assert not out.resumed and out.export_id != expired_id
    assert len(export_posts(control)) == 2


def test_content_lost_twice_fails_after_one_recreation(client, control, tmp_path):
    control.add_fault(match=r"/exports/\d+/content", method="GET", kind="status", status=404)

    with pytest.raises(PostHogNotFoundError):
        _runner(client, tmp_path).run(_request())

    assert len(export_posts(control)) == 2
    assert part_files(tmp_path) == []


def test_broken_download_leaves_no_temp_files(client, control, tmp_path):
    control.configure(csv_rows=50_000, content_redirect=False)  # PostHog streams, and breaks
    control.add_fault(match=r"/exports/\d+/content", method="GET", kind="drop_mid_body")

    with pytest.raises(PostHogDownloadError):
        _runner(client, tmp_path).run(_request(CSV, insight=2))

    assert part_files(tmp_path) == []
    assert not [p for p in (tmp_path / "exports").rglob("*.csv")]


def test_hostile_server_filename_stays_inside_the_export_folder(
    client, control, tmp_path, monkeypatch
):
    hostile = "../../../etc/pass\x00wd/..\\..\\evil\r\n.csv"
    real_get, real_create = client.get_export, client.create_export

    def with_hostile_name(export: dict) -> dict:
        return {**export, "filename": hostile}

    monkeypatch.setattr(client, "get_export", lambda i: with_hostile_name(real_get(i)))
    monkeypatch.setattr(
        client, "create_export", lambda *a, **k: with_hostile_name(real_create(*a, **k))
    )

    out = _runner(client, tmp_path).run(_request(CSV, insight=2))

    folder = (tmp_path / "exports" / "weekly").resolve()
    assert out.path.resolve().parent == folder
    assert out.path.name == "evil.csv"
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("export-weekly-2026-03-02-101507.png", "export-weekly-2026-03-02-101507.png"),
        ("../../etc/passwd", "passwd.png"),
        ("..\\..\\windows\\win.ini", "win.ini.png"),
        ("..", "fallback-7.png"),
        ("", "fallback-7.png"),
        (None, "fallback-7.png"),
        (".hidden.png", "hidden.png"),
        ("a\x00b\x1fc.png", "abc.png"),
        ("dash board (1).PNG", "dash-board-1.png"),
        ("x" * 400 + ".png", "x" * 150 + ".png"),
    ],
)
def test_safe_filename(name, expected):
    assert safe_filename(name, "png", "fallback-7") == expected


def test_export_runner_imports_no_dagster():
    code = (
        "import sys, posthog_assets.exports.runner; "
        "print(sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- tabular exports PostHog renders

#: Seeded insights of each saved-query kind (the stand-in's seed: index 7 has only legacy
#: filters, index 9 a DataTableNode over HogQL, index 39 neither).
TRENDS_INSIGHT, LEGACY_INSIGHT, HOGQL_INSIGHT, EMPTY_INSIGHT = 2, 8, 10, 40


def _posted_context(control) -> dict:
    [post] = export_posts(control)
    return post["body"]["export_context"]


@pytest.mark.parametrize("fmt", [CSV, XLSX])
def test_a_table_of_a_trends_insight_sends_its_query_source(client, control, tmp_path, fmt):
    out = _runner(client, tmp_path).run(_request(fmt, insight=TRENDS_INSIGHT))

    saved = client.get_insight(TRENDS_INSIGHT, basic=True)["query"]
    context = _posted_context(control)
    assert context["source"] == saved["source"] and "path" not in context
    assert context["filename"].startswith("weekly-dg")  # our dedup tag, nothing else of ours
    assert out.bytes > 0 and out.path.suffix == f".{'csv' if fmt == CSV else 'xlsx'}"


def test_a_table_of_a_legacy_insight_sends_the_query_posthog_derives_from_its_filters(
    client, control, tmp_path
):
    out = _runner(client, tmp_path).run(_request(CSV, insight=LEGACY_INSIGHT))

    derived = client.get_insight(LEGACY_INSIGHT, basic=True)["query"]  # query_from_filters
    context = _posted_context(control)
    assert context["source"] == derived["source"] and "path" not in context
    assert out.path.read_text().splitlines()[0].startswith("series")


def test_on_an_older_posthog_a_table_of_a_legacy_insight_sends_the_path_of_its_own_route(
    client, control, tmp_path
):
    control.configure(insight_query_from_filters=False)  # query: null, the filters kept
    out = _runner(client, tmp_path).run(_request(CSV, insight=LEGACY_INSIGHT))

    context = _posted_context(control)
    assert context["path"] == f"/api/projects/{client.project_id}/insights/{LEGACY_INSIGHT}/"
    assert "source" not in context
    assert out.path.read_text().splitlines()[0].startswith("series")


def test_a_table_of_a_hogql_insight_sends_the_node_as_it_is(client, control, tmp_path):
    _runner(client, tmp_path).run(_request(CSV, insight=HOGQL_INSIGHT))

    saved = client.get_insight(HOGQL_INSIGHT, basic=True)["query"]
    assert saved["kind"] == "DataTableNode"
    assert _posted_context(control)["source"] == saved


def test_a_table_of_an_insight_with_nothing_to_render_fails_naming_it_before_any_post(
    client, control, tmp_path
):
    with pytest.raises(PostHogExportFailed, match=f"insight {EMPTY_INSIGHT} ") as err:
        _runner(client, tmp_path).run(_request(CSV, insight=EMPTY_INSIGHT))
    assert err.value.retryable is False
    assert "export_context.source" in str(err.value)
    assert export_posts(control) == []


def test_the_users_export_context_keys_win(client, control, tmp_path):
    mine = {"kind": "HogQLQuery", "query": "select event, count() from events group by event"}
    _runner(client, tmp_path).run(
        _request(CSV, insight=TRENDS_INSIGHT, export_context={"source": mine, "columns": ["a"]})
    )
    context = _posted_context(control)
    assert context["source"] == mine and context["columns"] == ["a"]
    assert len([r for r in control.requests_log() if "/insights/" in r["path"]]) == 0


def test_without_a_source_posthog_never_renders_a_table_of_an_insight(client, control):
    """What the package must avoid: PostHog's tabular exporter fails with KeyError('path')."""
    export = client.create_export(CSV, insight=TRENDS_INSIGHT)
    assert export["has_content"] is False and export["exception"] == "'path'"


# ---------------------------------------------------------------- held POSTs


def test_a_post_held_past_its_timeout_is_followed_in_the_list_never_posted_twice(
    standin, control, tmp_path
):
    """PostHog answers POST /exports/ only when rendering ends; the row is listed as pending
    from the start. A POST read timeout shorter than the render resumes that row."""
    control.configure(export_delay_by_target={f"insight:{TRENDS_INSIGHT}": 2.5})
    client = PostHogClient(
        standin.url, standin.project_id, standin.key, post_timeout_s=0.5, read_timeout_s=10
    )
    out = _runner(client, tmp_path).run(_request(PNG, insight=TRENDS_INSIGHT))

    posts = export_posts(control)
    assert len(posts) == 1 and out.post_count == 1
    assert out.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.wait_s >= 2.0 and out.states[-1] == "ready"
    assert out.export_id == client.get_export(out.export_id)["id"]
    assert control.stats()["exports_created"] == 1

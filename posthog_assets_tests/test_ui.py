"""The Dagster UI for real: headless Chromium (Debian's package, driven by Playwright) against the
shared ``dg dev`` + daemon and the session's PostHog stand-in.

Each test does in the browser what a person does (open the graph, click Materialize, open the
launchpad, edit the YAML, read the metadata) and uses GraphQL only to wait for runs and to check
what the UI cannot show reliably. Screenshots of every step land in ``test-artifacts/``.
Names (asset keys, schedules, sensors) come from ``posthog_project.definitions``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from playwright.sync_api import Browser, Page, expect, sync_playwright

from posthog_assets.config import REFRESH_MODES
from posthog_assets.snapshots.results import TIDY_TABLES
from posthog_assets.tables import EXPORTS_GROUP, GROUPS_GROUP, INSIGHTS_GROUP
from posthog_standin.server import StandinControl

pytestmark = [pytest.mark.system, pytest.mark.xdist_group("dagster_dev")]

# Rewrite asserts in the fixture module too (it is also registered as a plugin below).
pytest.register_assert_rewrite("posthog_assets_tests.support.dagster_dev")
from posthog_assets_tests.support.dagster_dev import (  # noqa: E402
    ARTIFACTS,
    ROOT,
    DagsterDevUI,
    asset_keys_in_group,
    chromium_path,
    export_asset_key,
    insights_asset_key,
    load_defs,
    metadata_dict,
    schedule_names,
    sensor_names,
    skip_or_fail,
)

#: Flags verified with Debian 12's Chromium 156 in a container without a display or D-Bus.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
UI_TIMEOUT_MS = 30_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    exe = chromium_path()
    if exe is None:
        skip_or_fail("Chromium is not installed (Debian package 'chromium')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser, dagster_ui: DagsterDevUI) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    pg = context.new_page()
    try:
        yield pg
    finally:
        context.close()


def shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"ui-{name}.png"
    page.screenshot(path=str(path))
    return path


def asset_url(ui: DagsterDevUI, key: dg.AssetKey) -> str:
    return f"{ui.url}/assets/{'/'.join(key.path)}"


def wait_enabled_materialize(page: Page) -> Any:
    """The asset page's Materialize button, once the page has loaded enough to enable it."""
    button = page.locator("button:enabled").filter(has_text="Materialize").first
    button.wait_for()
    return button


def test_asset_graph_shows_the_posthog_groups(page: Page, dagster_ui: DagsterDevUI) -> None:
    groups = [EXPORTS_GROUP, INSIGHTS_GROUP, GROUPS_GROUP]
    empty = [g for g in groups if not asset_keys_in_group(g)]
    assert not empty, f"the default config has assets in every group; none in {empty}"
    assert insights_asset_key() in asset_keys_in_group(INSIGHTS_GROUP)
    page.goto(f"{dagster_ui.url}/asset-groups")
    for group in groups:
        expect(page.get_by_text(group, exact=True).first).to_be_visible()
    shot(page, "01-asset-graph")
    # The catalog lists every export the component's selections chose (the lineage graph of a
    # group this size is drawn zoomed out, without labels).
    page.goto(f"{dagster_ui.url}/assets/posthog/exports")
    for key in asset_keys_in_group(EXPORTS_GROUP):
        if key.path[-2:-1] == ["exports"]:
            expect(page.get_by_text(key.path[-1], exact=True).first).to_be_visible()
    expect(page.get_by_text("Loading...")).to_have_count(0)  # statuses filled in
    shot(page, "02-asset-group-exports")


def test_materialize_an_export_and_see_its_file_and_png_preview(
    page: Page, dagster_ui: DagsterDevUI, control: StandinControl
) -> None:
    key = export_asset_key("png")
    before = {r["runId"] for r in dagster_ui.runs()}
    page.goto(asset_url(dagster_ui, key))
    button = wait_enabled_materialize(page)
    shot(page, "03-export-asset")
    button.click()
    expect(page.get_by_text(re.compile("Launched run")).first).to_be_visible()
    shot(page, "04-export-launched")

    def new_run() -> str | None:
        for r in dagster_ui.runs(limit=10):
            selected = [tuple(a["path"]) for a in r.get("assetSelection") or []]
            if r["runId"] not in before and tuple(key.path) in selected:
                return str(r["runId"])
        return None

    run_id = dagster_ui.wait_for("the export run to appear", new_run, timeout_s=30)
    run = dagster_ui.wait_for_run(run_id)
    assert run["status"] == "SUCCESS", dagster_ui.run_failure_text(run_id)

    # The metadata as GraphQL has it: a file on disk that is a PNG, and the embedded preview.
    mat = dagster_ui.latest_materialization(key)
    assert mat is not None and mat["runId"] == run_id
    meta = metadata_dict(mat)
    path = Path(meta["path"])
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
    assert path.is_relative_to(dagster_ui.export_dir)
    assert "data:image/png;base64," in meta["preview"]

    # ... and as the asset page shows it.
    page.goto(asset_url(dagster_ui, key))
    wait_enabled_materialize(page)
    expect(page.get_by_text(str(path)).first).to_be_visible()
    shot(page, "05-export-metadata")
    page.get_by_text("Show Markdown").first.click()
    image = page.get_by_role("dialog").locator("img[src^='data:image/png']").first
    expect(image).to_be_visible()
    width = image.evaluate("img => img.complete ? img.naturalWidth : 0")
    assert width > 0, "the PNG preview did not render"
    if "image_width" in meta:
        assert width == meta["image_width"]
    shot(page, "06-export-png-preview")


def _find_refresh(config: Any) -> list[str]:
    """Every ``refresh`` value under ``ops:`` in a run config."""
    found: list[str] = []
    if isinstance(config, dict):
        for k, v in config.items():
            if k == "refresh" and isinstance(v, str):
                found.append(v)
            else:
                found.extend(_find_refresh(v))
    elif isinstance(config, list):
        for v in config:
            found.extend(_find_refresh(v))
    return found


def test_launchpad_runs_the_insights_snapshot_with_another_refresh_mode(
    page: Page, dagster_ui: DagsterDevUI, control: StandinControl
) -> None:
    key = insights_asset_key()
    default_mode = _shipped_insights_config()["refresh"]
    # A cache-only mode: a few list requests for the session stand-in's insights (a blocking
    # mode would spend one request per 5 insights of PostHog's 240 a minute for this key).
    mode = "force_cache" if default_mode != "force_cache" else "async"
    assert mode in REFRESH_MODES
    assert load_defs().resolve_assets_def(key).partitions_def is None  # no partition to pick

    page.goto(asset_url(dagster_ui, key))
    wait_enabled_materialize(page)
    page.locator("button").filter(has=page.locator("[aria-label=arrow_drop_down]")).first.click()
    page.get_by_text("Open launchpad").first.click()
    # The tidy tables come from the same step: Dagster says they will be materialized too.
    notice = page.get_by_role("dialog").filter(has_text="Additional assets will be materialized")
    expect(notice).to_be_visible()
    for table in TIDY_TABLES:
        expect(notice.get_by_text(table)).to_have_count(1)
    shot(page, "07a-launchpad-additional-assets")
    notice.get_by_role("button").filter(has_not_text="Cancel").last.click()
    dialog = page.get_by_role("dialog")
    # Nothing of the snapshot is pre-filled: an empty field keeps the project's setting
    # (defs.yaml's refresh mode), so a run launched as is takes that one.
    line = dialog.locator(".CodeMirror-line").filter(has_text=re.compile(r"^ops: \{\}$"))
    expect(line).to_have_count(1)
    assert not dialog.locator(".CodeMirror-line").filter(has_text="refresh:").count()
    shot(page, "07-launchpad")
    # Edit the YAML as a person does: replace the line with the op's config, another mode.
    op = load_defs().resolve_assets_def(key).node_def.name
    line.click()
    page.keyboard.press("End")
    page.keyboard.press("Shift+Home")
    page.keyboard.insert_text(f"ops: {{{op}: {{config: {{refresh: {mode}}}}}}}")
    expect(dialog.locator(".CodeMirror-line").filter(has_text=f"refresh: {mode}")).to_have_count(1)
    shot(page, "08-launchpad-edited")
    dialog.locator("button:enabled").filter(has_text="Materialize").last.click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    run_id = page.url.rstrip("/").split("/runs/")[1].split("?")[0]
    shot(page, "09-launchpad-run")

    run = dagster_ui.wait_for_run(run_id)
    assert run["status"] == "SUCCESS", dagster_ui.run_failure_text(run_id)
    assert _find_refresh(yaml.safe_load(run["runConfigYaml"])) == [mode]
    # The mode reached PostHog: the stand-in logged insight reads with it.
    modes = {
        e["query"].get("refresh")
        for e in control.requests_log()
        if "/insights" in e["path"] and e["query"].get("refresh")
    }
    assert mode in modes, f"the stand-in saw refresh modes {modes}"
    page.goto(f"{dagster_ui.url}/runs/{run_id}")
    expect(page.get_by_text("Success").first).to_be_visible()
    shot(page, "10-launchpad-run-success")


def test_schedules_and_sensors_are_listed(page: Page, dagster_ui: DagsterDevUI) -> None:
    schedules, sensors = schedule_names(), sensor_names()
    assert schedules and sensors, "the definitions have schedules and sensors"
    page.goto(f"{dagster_ui.url}/automation")
    for name in [*schedules, *sensors]:
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    # Each row's status (cron, sensor type) loads after the names.
    expect(page.get_by_text("Standard sensor").first).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Scheduled")).first).to_be_visible()
    shot(page, "11-automation")
    # The detail page of one of each opens from the list.
    for kind, name in (("schedules", schedules[0]), ("sensors", sensors[0])):
        page.get_by_text(name, exact=True).first.click()
        page.wait_for_url(re.compile(f"/{kind}/{name}"))
        expect(page.get_by_text("Preview tick result").first).to_be_visible()
        shot(page, f"12-{kind}-{name}")
        page.goto(f"{dagster_ui.url}/automation")


def _shipped_insights_config() -> dict[str, Any]:
    """The insights snapshot of the shipped ``defs.yaml``, as the UI's launchpad pre-fills it."""
    text = (ROOT / "posthog_project" / "defs" / "posthog" / "defs.yaml").read_text()
    return yaml.safe_load(text)["attributes"]["insights"]

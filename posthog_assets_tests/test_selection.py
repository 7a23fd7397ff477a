"""Export selections against PostHog as it is: licence-gated tags, dashboard names that repeat,
and a state refresh that checks what it read against PostHog's ``count``."""

from __future__ import annotations

from typing import Any

import pytest

from posthog_assets.api.client import PostHogClient
from posthog_assets.component.selection import ExportSelection, SelectionError, select_exports
from posthog_assets.component.state import StateIncomplete, fetch_project_state
from posthog_assets_tests.support.session import TEST_INSIGHTS, TEST_RETRY
from posthog_standin.seed import Insight, Seed
from posthog_standin.server import StandinProcess

pytestmark = pytest.mark.integration

CSV = "text/csv"


def _seeded_ids(predicate: Any) -> list[int]:
    seed = Seed(seed=0, project_id=1, insights=TEST_INSIGHTS, dashboards=3, group_types=0, groups=0)
    return [
        Insight(seed.main, i).id for i in range(TEST_INSIGHTS) if predicate(Insight(seed.main, i))
    ]


def test_a_tag_selection_uses_posthogs_filter_because_listed_tags_need_a_licence(
    client: PostHogClient, control: Any
) -> None:
    """Without paid tagging every ``tags`` field is empty, yet ``?tags=`` filters on the server:
    the state asks PostHog which insights carry each selected tag."""
    state = fetch_project_state(client, insight_tags={"growth"})
    assert state.insights and all(i.tags == [] for i in state.insights)  # unlicensed
    tagged = _seeded_ids(lambda i: "growth" in i.tags)
    assert state.insight_tags == {"growth": tagged}
    exports = select_exports([ExportSelection(insights={"tag": "growth"}, format=CSV)], state)
    assert sorted(e.insight for e in exports) == tagged

    # A tag no insight carries: a warning and no asset for that entry, not a failed load (a tag
    # removed in PostHog must not take the code location down); the other entries still build.
    warnings: list[str] = []
    weekly = ExportSelection(insights={"tag": "weekly"}, format=CSV)
    exports = select_exports([weekly, ExportSelection(insight=3, format=CSV)], state, warnings)
    assert [e.name for e in exports] == ["insight_3_csv"]
    [message] = warnings
    assert message.startswith(
        "exports[0] (insights: {'tag': 'weekly'}) matches no insight of the state of "
        f"{state.fetched_at}, so it builds no asset. Possible reasons: "
    )
    assert "the state was read before a selection named the tag 'weekly'" in message
    assert "Run `dg utils refresh-defs-state`" in message

    known = fetch_project_state(client, insight_tags={"weekly"})
    warnings.clear()
    assert select_exports([weekly], known, warnings) == []
    [message] = warnings
    assert "no insight carries the tag 'weekly'" in message
    assert select_exports([weekly], known) == []  # warnings are optional to collect


def test_a_single_object_the_state_lacks_still_fails_naming_the_entry(
    client: PostHogClient, control: Any
) -> None:
    """An entry naming one object (a short id, a dashboard name) that is not there is a mistake
    in the file, not an empty selection."""
    state = fetch_project_state(client)
    for entry, shown, kind in (
        (ExportSelection(insight="Zz99Zz99", format=CSV), "insight: Zz99Zz99", "insight"),
        (ExportSelection(dashboard="No such board"), "dashboard: No such board", "dashboard"),
    ):
        warnings: list[str] = []
        with pytest.raises(SelectionError) as err:
            select_exports([entry], state, warnings)
        assert str(err.value).startswith(f"exports[0] ({shown}) matches no {kind} of the state")
        assert "so it builds no asset" not in str(err.value) and warnings == []
    every = ExportSelection(dashboards={"search": "no such board"})
    warnings = []
    assert select_exports([every], state, warnings) == []
    assert "matches no dashboard" in warnings[0] and "so it builds no asset" in warnings[0]


def test_a_numeric_id_needs_no_state_and_names_the_asset_from_the_id(
    client: PostHogClient, control: Any
) -> None:
    """``insight: 42`` / ``dashboard: 7`` resolve without the state (the YAML route has none),
    and name their asset from the id, with or without a state (a short id, read from the
    state, once named a numeric insight's asset)."""
    entries = [
        ExportSelection(insight=2, format=CSV),
        ExportSelection(insight=2),
        ExportSelection(dashboard=1),
        ExportSelection(insight=3, format=CSV, name="signups_csv"),
    ]
    without = select_exports(entries, None)
    assert [(e.name, e.insight, e.dashboard, e.format) for e in without] == [
        ("insight_2_csv", 2, None, CSV),
        ("insight_2_png", 2, None, "image/png"),
        ("dashboard_1_png", None, 1, "image/png"),
        ("signups_csv", 3, None, CSV),
    ]
    assert select_exports(entries, fetch_project_state(client)) == without
    # An entry that needs the state, without one, says so.
    with pytest.raises(SelectionError, match=r"exports\[0\] \(dashboards: all\) needs the stored"):
        select_exports([ExportSelection(dashboards="all")], None)
    # By short id (state needed), the asset keeps the short id's name.
    state = fetch_project_state(client)
    second = next(i for i in state.insights if i.id == 2)
    [by_short_id] = select_exports([ExportSelection(insight=second.short_id, format=CSV)], state)
    assert (by_short_id.name, by_short_id.insight) == (f"insight_{second.short_id}_csv", 2)


def test_with_a_licence_listed_tags_are_kept_too(client: PostHogClient, control: Any) -> None:
    control.configure(tagging_licensed=True)
    state = fetch_project_state(client)
    assert {i.id for i in state.insights if i.tags} == set(_seeded_ids(lambda i: i.tags))
    exports = select_exports([ExportSelection(insights={"tag": "growth"}, format=CSV)], state)
    assert len(exports) == len(_seeded_ids(lambda i: "growth" in i.tags))


def test_a_dashboard_name_two_dashboards_share_is_an_error_naming_both(tmp_path: Any) -> None:
    with StandinProcess(key="phx_names", insights=60, dashboards=6) as standin:
        client = PostHogClient(standin.url, standin.project_id, standin.key, retry=TEST_RETRY)
        try:
            state = fetch_project_state(client)
        finally:
            client.close()
    growth = sorted(d.id for d in state.dashboards if d.name == "Growth")
    assert growth == [1, 6]
    for entry in (
        ExportSelection(dashboard="Growth"),
        ExportSelection(insights={"dashboard": "Growth"}, format=CSV),
    ):
        with pytest.raises(
            SelectionError, match=r"2 dashboards are named 'Growth' \(ids 1 and 6\)"
        ):
            select_exports([entry], state)
    [by_id] = select_exports([ExportSelection(dashboard=6)], state)
    assert by_id.dashboard == 6


def test_two_exports_of_one_name_are_reported_as_a_name_clash(
    client: PostHogClient, control: Any
) -> None:
    state = fetch_project_state(client)
    entries = [
        ExportSelection(insight=1, name="signups", format=CSV),
        ExportSelection(insight=2, name="signups", format=CSV),
    ]
    with pytest.raises(SelectionError) as err:
        select_exports(entries, state)
    assert str(err.value) == (
        "exports[1] (insight: 2) names its asset 'signups', as exports[0] does for insight 1: "
        "give one of them another name"
    )


def test_a_state_refresh_that_reads_fewer_insights_than_posthog_has_fails(
    client: PostHogClient, control: Any
) -> None:
    """A page that came back short (here: empty, with PostHog's count) is not a smaller project."""
    control.add_fault(
        match=r"/insights/?$",
        kind="status",
        status=200,
        body={"count": TEST_INSIGHTS, "next": None, "previous": None, "results": []},
        times=1,
    )
    with pytest.raises(
        StateIncomplete, match=f"read 0 distinct insights but PostHog reports {TEST_INSIGHTS}"
    ):
        fetch_project_state(client)

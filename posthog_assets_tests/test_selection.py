"""Export selections against PostHog as it is: licence-gated tags, dashboard names that repeat,
and a state refresh that checks what it read against PostHog's ``count``."""

from __future__ import annotations

from typing import Any

import pytest

from posthog_assets.api.client import PostHogClient
from posthog_assets.component.selection import ExportSelection, SelectionError, select_exports
from posthog_assets.component.state import StateIncomplete, fetch_project_state
from posthog_assets.standin.seed import Insight, Seed
from posthog_assets.standin.server import StandinProcess
from posthog_assets_tests.support.session import TEST_INSIGHTS, TEST_RETRY

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

    with pytest.raises(SelectionError) as err:
        select_exports([ExportSelection(insights={"tag": "weekly"}, format=CSV)], state)
    message = str(err.value)
    assert message.startswith("exports[0] (insights: {'tag': 'weekly'}) matches no insight")
    assert "the state was read before a selection named the tag 'weekly'" in message
    assert "Run `dg utils refresh-defs-state`" in message

    known = fetch_project_state(client, insight_tags={"weekly"})
    with pytest.raises(SelectionError, match="no insight carries the tag 'weekly'"):
        select_exports([ExportSelection(insights={"tag": "weekly"}, format=CSV)], known)


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

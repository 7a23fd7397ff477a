"""``PostHogProjectComponent`` in a user's ``dg`` project: scaffold, refresh the state, check,
load without PostHog, export what the selections chose; a second project; bad ``defs.yaml``."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import requests

from posthog_assets.config import CSV, PNG, XLSX
from posthog_assets_tests.support.dagster_dev import free_port
from posthog_assets_tests.support.projects import UserProject
from posthog_standin.server import StandinControl, StandinProcess

pytestmark = pytest.mark.integration


def _insight(standin: StandinProcess, insight_id: int) -> dict[str, Any]:
    """An insight as PostHog serves it, read independently of the package."""
    url = f"{standin.url}/api/projects/{standin.project_id}/insights/{insight_id}/"
    resp = requests.get(url, headers={"Authorization": f"Bearer {standin.key}"}, timeout=30)
    resp.raise_for_status()
    return resp.json()


def _served(standin: StandinProcess, export_id: int) -> bytes:
    """What PostHog serves for an export, fetched independently of the package's client."""
    url = f"{standin.url}/api/projects/{standin.project_id}/exports/{export_id}/content/"
    resp = requests.get(url, headers={"Authorization": f"Bearer {standin.key}"}, timeout=30)
    resp.raise_for_status()
    return resp.content


def _export_keys(defs: dg.Definitions) -> set[str]:
    return {
        s.key.to_user_string()
        for s in defs.resolve_all_asset_specs()
        if s.key.path[-2:-1] == ["exports"]
    }


def _names(defs: dg.Definitions) -> dict[str, set[str]]:
    """What a user would lose by a rename: keys, resources, jobs, sensors, schedules."""
    repo = defs.get_repository_def()
    return {
        "assets": {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()},
        "resources": set(repo.get_top_level_resources()),
        "jobs": {j.name for j in repo.get_all_jobs() if not j.name.startswith("__")},
        "sensors": {s.name for s in repo.sensor_defs},
        "schedules": {s.name for s in repo.schedule_defs},
    }


@pytest.mark.system
def test_scaffold_refresh_check_load_offline_and_export_the_selection(
    standin: StandinProcess,
    control: StandinControl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = UserProject.create(tmp_path / "acme", standin)
    project.dg(
        "scaffold", "defs", "posthog_assets.PostHogProjectComponent", "posthog",
        "--json-params", f'{{"host": "{standin.url}", "project_id": "{standin.project_id}"}}',
    )  # fmt: skip
    scaffolded = project.read_attributes("posthog")
    assert scaffolded["project"] == {
        "name": "default",  # the first PostHog project: unprefixed keys
        "host": standin.url,
        "project_id": str(standin.project_id),
        "personal_api_key": "{{ env.POSTHOG_PERSONAL_API_KEY }}",
    }
    # What loads as written against any project: every dashboard, and the insights snapshot;
    # the other selections, groups, paths and translation as commented examples.
    assert scaffolded["exports"] == [{"dashboards": "all"}]
    assert scaffolded["insights"] == {"refresh": "async", "schedule": "0 6 * * *"}
    text = project.defs_yaml("posthog").read_text()
    for example in ("# - insight: 42", "# - insights: {tag: weekly}", "# - dashboard: Growth",
                    "# groups:", "# duckdb_path:", "# translation:"):  # fmt: skip
        assert example in text, example

    # A second PostHog component is named after its folder: it never takes the first one's keys.
    project.dg("scaffold", "defs", "posthog_assets.PostHogProjectComponent", "staging_eu")
    assert project.read_attributes("staging_eu")["project"]["name"] == "staging_eu"
    shutil.rmtree(project.defs_yaml("staging_eu").parent)

    # The user picks what to export: by short id, by dashboard name and tag, every dashboard.
    signups = _insight(standin, 2)
    data = tmp_path / "data"
    attributes = {
        **scaffolded,
        "project": {**scaffolded["project"], "host": "{{ env.POSTHOG_HOST }}"},
        "exports": [
            {"insight": signups["short_id"], "format": CSV, "name": "signups_csv"},
            {"insights": {"dashboard": "Growth", "tag": "growth"}, "format": XLSX},
            {"dashboards": "all", "format": PNG},
        ],
        "duckdb_path": str(data / "posthog.duckdb"),
    }
    attributes["project"]["export_dir"] = str(data / "exports")
    project.write_component("posthog", attributes)
    project.dg("utils", "refresh-defs-state")
    [state] = project.state_files()
    assert '"short_id": "' + signups["short_id"] in state.read_text()
    project.dg("check", "defs")

    growth_on_growth = [1, 16]  # seed: tag "growth" on every 5th, "Growth" has every 3rd of 30
    expected = {
        "posthog/exports/signups_csv",
        *(f"posthog/exports/insight_{_insight(standin, i)['short_id']}_xlsx"
          for i in growth_on_growth),
        "posthog/exports/dashboard_1_png",
        "posthog/exports/dashboard_2_png",
        "posthog/exports/dashboard_3_png",
    }  # fmt: skip

    # PostHog unreachable (every API request dropped): the definitions load from the state alone.
    control.clear_requests_log()
    control.add_fault(match=r"^/api/", kind="drop")
    monkeypatch.setenv("POSTHOG_HOST", standin.url)
    monkeypatch.setenv("POSTHOG_PERSONAL_API_KEY", standin.key)
    offline = project.load()
    assert _export_keys(offline) == expected
    assert [r for r in control.requests_log() if "/api/" in r["path"]] == []
    assert not data.exists(), "loading wrote files"

    # PostHog reachable again: materialize the selected exports, check the files.
    control.clear_faults()
    defs = project.load()
    exports = [a for a in defs.resolve_all_asset_specs() if a.key.to_user_string() in expected]
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, asset_selection=[s.key for s in exports])
    assert result.success
    for spec in exports:
        [event] = [
            e for e in result.get_asset_materialization_events()
            if e.materialization.asset_key == spec.key
        ]  # fmt: skip
        md = {k: v.value for k, v in event.materialization.metadata.items()}
        content = Path(md["path"]).read_bytes()
        assert content == _served(standin, md["export_id"])
        assert md["sha256"] == hashlib.sha256(content).hexdigest()
        assert Path(md["path"]).is_relative_to(data / "exports" / spec.key.path[-1])
    csv_md = {
        k: v.value
        for e in result.get_asset_materialization_events()
        if e.materialization.asset_key.path[-1] == "signups_csv"
        for k, v in e.materialization.metadata.items()
    }
    assert csv_md["dagster/row_count"] > 0
    assert csv_md["preview"].schema.columns[0].name == "series"

    # A mistake in the file: dg check names the field, and the stored state is untouched.
    before = state.read_bytes()
    attributes["insights"] = {**attributes["insights"], "page_size": "many"}
    project.write_component("posthog", attributes)
    failed = project.dg("check", "defs", check=False)
    assert failed.returncode != 0
    assert "page_size" in failed.stdout + failed.stderr
    assert state.read_bytes() == before


def _base(standin: StandinProcess, data: Path, **project: Any) -> dict[str, Any]:
    return {
        "project": {
            "host": standin.url,
            "project_id": standin.project_id,
            "personal_api_key": "{{ env.POSTHOG_PERSONAL_API_KEY }}",
            "export_dir": str(data / "exports"),
            **project,
        },
        "duckdb_path": str(data / "posthog.duckdb"),
    }


@pytest.fixture
def dev_project(
    standin: StandinProcess,
    control: StandinControl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> UserProject:
    """A user project loaded as ``dg dev`` loads it: a missing state is fetched once."""
    monkeypatch.setenv("DAGSTER_IS_DEV_CLI", "1")
    monkeypatch.setenv("POSTHOG_PERSONAL_API_KEY", standin.key)
    return UserProject.create(tmp_path / "acme", standin)


def test_a_second_project_leaves_the_first_ones_names_alone(
    dev_project: UserProject,
    standin: StandinProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    dev_project.write_component(
        "posthog",
        {
            **_base(standin, data),
            "exports": [{"insight": 2, "format": CSV}, {"dashboard": "Growth"}],
            "groups": {"tracked": [{"group_type_index": 0, "group_key": "organization-1"}]},
            "translation": {"tags": {"team": "data"}},
        },
    )
    first = _names(dev_project.load())
    assert "posthog" in first["resources"] and "posthog/insights" in first["assets"]
    assert {"posthog_insights_snapshot_daily", "posthog_groups_snapshot_daily"} <= first[
        "schedules"
    ]

    monkeypatch.setenv("POSTHOG_STAGING_KEY", standin.key)
    dev_project.write_component(
        "posthog_staging",
        {
            **_base(
                standin,
                data,
                name="staging",
                project_id=standin.project_id + 1,
                personal_api_key="{{ env.POSTHOG_STAGING_KEY }}",
            ),
            "exports": [{"dashboards": "all"}],
        },
    )
    defs = dev_project.load()
    both = _names(defs)

    for kind, names in first.items():
        assert names <= both[kind], f"{kind} renamed: {sorted(names - both[kind])}"
        added = both[kind] - names
        assert added and all("staging" in n for n in added), (kind, sorted(added))
    assert both["resources"] - first["resources"] == {"posthog_staging"}
    # Each project's key, read when a run starts: each its own rate-limit budget.
    keys = {k: repr(defs.resources[k].personal_api_key) for k in ("posthog", "posthog_staging")}
    assert "POSTHOG_PERSONAL_API_KEY" in keys["posthog"]
    assert "POSTHOG_STAGING_KEY" in keys["posthog_staging"]
    assert standin.key not in str(keys)
    # The first component's translation reached every asset it built, and only those.
    for spec in defs.resolve_all_asset_specs():
        tagged = spec.tags.get("team") == "data"
        assert tagged == (spec.key.path[1] != "staging"), spec.key.to_user_string()


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        pytest.param(
            {"exports": [{"dashboards": "all", "colour": "red"}]},
            ("exports", "colour"),
            id="unknown_field",
        ),
        pytest.param({"insights": {"page_size": "many"}}, ("page_size",), id="wrong_type"),
        pytest.param(
            {"exports": [{"dashboard": "No such board"}]},
            ("exports[0] (dashboard: No such board) matches no dashboard",),
            id="unknown_dashboard",
        ),
        pytest.param(
            {"exports": [{"insight": "Zz99Zz99", "format": CSV}]},
            ("exports[0] (insight: Zz99Zz99) matches no insight",),
            id="unknown_short_id",
        ),
        pytest.param(
            {"export_dir": "/tmp/exports"},
            ("export_dir",),
            id="export_dir_at_the_top_level",
        ),
        pytest.param(
            {"exports": [{"dashboard": "Growth", "format": CSV}]},
            ("exports[0]", "a dashboard only as image/png"),
            id="dashboard_as_csv",
        ),
        pytest.param(
            {"exports": [{"insight": 1, "dashboard": 1}]},
            ("exports", "give exactly one of insight, insights, dashboard, dashboards"),
            id="two_selectors",
        ),
        pytest.param(
            {"project": {"personal_api_key": "{{ env.POSTHOG_KEY_NOT_SET }}"}},
            ("project.personal_api_key: environment variable POSTHOG_KEY_NOT_SET is not set",),
            id="missing_key_env_var",
        ),
        pytest.param(
            {"project": {"host": "http://posthog.internal:8000"}},
            ("project.host", "allow_insecure_http"),
            id="remote_plain_http",
        ),
        pytest.param(
            {"project": {"hots": "https://us.posthog.com"}},
            ("project, field 'hots': not a known field (a typo?) (the fields are: name, host,",),
            id="unknown_project_field",
        ),
        pytest.param(
            {"insights": {"refresh": "sometimes"}},
            ("insights, field 'refresh': Input should be 'async',",),
            id="unknown_refresh_mode",
        ),
        pytest.param(
            {"exports": [{"insight": 1, "format": "application/pdf"}]},
            ("exports[0], field 'format': PostHog accepts application/pdf but never renders it",),
            id="pdf",
        ),
        pytest.param(
            {"project": {"personal_api_key": "phx_written_in_the_file", "api_prefix": "bogus"}},
            ("project.personal_api_key must name the environment variable that holds the key",),
            id="literal_key",
        ),
        pytest.param(
            {"project": {"personal_api_key": "{{ env.POSTHOG_PERSONAL_API_KEY | trim }}"}},
            ("project.personal_api_key must name the environment variable",),
            id="key_template_with_a_filter",
        ),
        pytest.param({"insights": {"schedule": "every day"}}, ("schedule", "cron"), id="bad_cron"),
    ],
)
def test_bad_defs_yaml_names_the_field_and_creates_nothing(
    dev_project: UserProject,
    standin: StandinProcess,
    tmp_path: Path,
    change: dict[str, Any],
    fragments: tuple[str, ...],
) -> None:
    data = tmp_path / "data"
    attributes = _base(standin, data)
    for key, value in change.items():
        attributes[key] = {**attributes[key], **value} if key == "project" else value
    dev_project.write_component("posthog", attributes)

    with pytest.raises(Exception) as caught:
        dev_project.load()

    text = _messages(caught.value)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    assert standin.key not in text and "phx_written_in_the_file" not in text
    assert not data.exists(), "a failed load created files"


def test_a_filter_that_matches_nothing_warns_and_builds_no_asset(
    dev_project: UserProject,
    standin: StandinProcess,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tag removed in PostHog (or never there) must not take the code location down: the
    entry builds nothing and the load says so at WARNING, naming the file and the entry; the
    other entries build as usual."""
    path = dev_project.write_component(
        "posthog",
        {
            **_base(standin, tmp_path / "data"),
            "exports": [
                {"insights": {"tag": "no-such-tag"}, "format": CSV},
                {"dashboards": {"search": "no such board"}},
                {"dashboard": 1},
            ],
        },
    )
    with caplog.at_level(logging.WARNING, logger="posthog_assets"):
        defs = dev_project.load()
    assert _export_keys(defs) == {"posthog/exports/dashboard_1_png"}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for entry, kind in (
        ("exports[0] (insights: {'tag': 'no-such-tag'})", "insight"),
        ("exports[1] (dashboards: {'search': 'no such board'})", "dashboard"),
    ):
        [message] = [m for m in warned if entry in m]
        assert message.startswith(f"{path.parent}: {entry} matches no {kind} of the state")
        assert "so it builds no asset" in message and "dg utils refresh-defs-state" in message


def test_two_components_of_one_project_name_fail_naming_both_files(
    dev_project: UserProject, standin: StandinProcess, tmp_path: Path
) -> None:
    """They would share a resource key, asset keys and a stored state."""
    for folder in ("posthog", "posthog_again"):
        dev_project.write_component(
            folder, {**_base(standin, tmp_path / "data"), "exports": [{"insight": 1}]}
        )
    with pytest.raises(Exception) as caught:
        dev_project.load()
    text = _messages(caught.value)
    first, second = (dev_project.defs_yaml(f).parent for f in ("posthog", "posthog_again"))
    assert "both configure the PostHog project named 'default'" in text
    assert str(first) in text and str(second) in text
    assert "give one of them another project.name" in text


def test_an_env_template_with_a_default_stays_a_reference_to_the_variable(
    dev_project: UserProject, standin: StandinProcess, tmp_path: Path
) -> None:
    """``{{ env('X', '') }}`` once became a literal value (stored in run storage): now every
    form that names a variable is that variable, read when a run starts."""
    dev_project.write_component(
        "posthog",
        _base(
            standin,
            tmp_path / "data",
            personal_api_key="{{ env('POSTHOG_PERSONAL_API_KEY', '') }}",
            host="{{ env.POSTHOG_HOST }}",
        ),
    )
    defs = dev_project.load()
    resource = defs.resources["posthog"]
    assert isinstance(resource.personal_api_key, dg.EnvVar)
    assert resource.personal_api_key.env_var_name == "POSTHOG_PERSONAL_API_KEY"
    assert isinstance(resource.host, dg.EnvVar) and resource.host.env_var_name == "POSTHOG_HOST"


def test_the_state_of_another_project_fails_the_load_naming_both(
    dev_project: UserProject,
    standin: StandinProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the project id or host changes, or its variable is unset, the stored selections
    belong to another project: the load says so at once, not a launch minutes later."""
    attributes = {
        **_base(standin, tmp_path / "data", project_id="{{ env.MY_PROJECT_ID }}"),
        "exports": [{"dashboards": "all"}],
    }
    monkeypatch.setenv("MY_PROJECT_ID", str(standin.project_id))
    dev_project.write_component("posthog", attributes)
    dev_project.dg("utils", "refresh-defs-state", MY_PROJECT_ID=str(standin.project_id))
    assert _export_keys(dev_project.load())

    monkeypatch.setenv("MY_PROJECT_ID", str(standin.project_id + 1))
    with pytest.raises(Exception) as caught:
        dev_project.load()
    assert (
        f"the stored PostHog state was read from {standin.url}, project {standin.project_id}, "
        f"but this component is configured for {standin.url}, project {standin.project_id + 1}:"
        " run `dg utils refresh-defs-state`"
    ) in _messages(caught.value)

    monkeypatch.delenv("MY_PROJECT_ID")
    with pytest.raises(Exception) as caught:
        dev_project.load()
    assert (
        "but the environment variable MY_PROJECT_ID (project.project_id) is not set, so nothing "
        "says it is this project's"
    ) in _messages(caught.value)


@pytest.mark.parametrize("content", ["", '{"version": 2, "insights": []}', '{"version": 2, "ho'])
def test_a_torn_or_foreign_state_file_names_itself_and_the_command_that_rewrites_it(
    dev_project: UserProject, standin: StandinProcess, tmp_path: Path, content: str
) -> None:
    dev_project.write_component(
        "posthog", {**_base(standin, tmp_path / "data"), "exports": [{"dashboards": "all"}]}
    )
    dev_project.dg("utils", "refresh-defs-state")
    [state] = dev_project.state_files()
    state.write_text(content)
    with pytest.raises(Exception) as caught:
        dev_project.load()
    text = _messages(caught.value)
    assert f"the stored PostHog state {state} cannot be read (" in text
    assert "run `dg utils refresh-defs-state` to write it again" in text


def test_a_failed_refresh_ends_with_its_reason_and_the_host_not_a_traceback(
    dev_project: UserProject, standin: StandinProcess, tmp_path: Path
) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}"
    dev_project.write_component(
        "posthog",
        {**_base(standin, tmp_path / "data", host=unreachable), "exports": [{"dashboards": "all"}]},
    )
    done = dev_project.dg("utils", "refresh-defs-state", check=False)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in out
    assert (
        "Error: the PostHog state of project 'default' was not refreshed (the stored one, if any, "
        f"is kept): GET {unreachable}/api/projects/{standin.project_id}/insights/: connection "
        "failed (NewConnectionError:"
    ) in out
    assert len(out.splitlines()) < 30


def test_an_unset_host_variable_is_named_as_the_yaml_names_it(
    dev_project: UserProject, standin: StandinProcess, tmp_path: Path
) -> None:
    """``{{ env.MY_POSTHOG_HOST }}`` unset was reported as POSTHOG_HOST, a variable the file
    never mentions."""
    dev_project.write_component(
        "posthog",
        {
            **_base(standin, tmp_path / "data", host="{{ env.MY_POSTHOG_HOST }}"),
            "exports": [{"dashboards": "all"}],
        },
    )
    done = dev_project.dg("utils", "refresh-defs-state", check=False)
    assert done.returncode != 0
    assert (
        "cannot read the project's insights and dashboards: the environment variable "
        "MY_POSTHOG_HOST (project.host) not set"
    ) in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"host": "eu.posthog.com"}, "host must be an absolute URL"),
        ({"project_id": "abc"}, "project_id must be an integer"),
        ({"name": "Staging"}, "must be lower_snake_case"),
    ],
)
def test_scaffold_checks_its_params_before_writing_anything(
    dev_project: UserProject, params: dict[str, str], fragment: str
) -> None:
    import json

    done = dev_project.dg(
        "scaffold", "defs", "posthog_assets.PostHogProjectComponent", "posthog",
        "--json-params", json.dumps(params), check=False,
    )  # fmt: skip
    assert done.returncode != 0 and fragment in done.stdout + done.stderr
    assert not dev_project.defs_yaml("posthog").exists()


def test_missing_state_outside_development_says_what_to_run(
    standin: StandinProcess,
    control: StandinControl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DAGSTER_IS_DEV_CLI", raising=False)
    monkeypatch.setenv("POSTHOG_PERSONAL_API_KEY", standin.key)
    project = UserProject.create(tmp_path / "acme", standin)
    project.write_component(
        "posthog", {**_base(standin, tmp_path / "data"), "exports": [{"dashboards": "all"}]}
    )
    control.clear_requests_log()

    with pytest.raises(Exception) as caught:
        project.load()

    text = _messages(caught.value)
    assert "stored PostHog state of this component is missing" in text
    assert "dg utils refresh-defs-state" in text
    assert project.state_files() == []
    assert [r for r in control.requests_log() if "/api/" in r["path"]] == []


def _messages(exc: BaseException) -> str:
    """The exception and its causes, as a user reads them in a traceback."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


@pytest.mark.unit
def test_a_translator_subclass_reaches_every_asset_check_and_job(tmp_path: Path) -> None:
    """Keys moved under ``analytics/``: checks, jobs, sensors and the exports log follow."""
    from posthog_assets import (
        DagsterPostHogTranslator,
        ExportConfig,
        GroupsConfig,
        PostHogResource,
        build_posthog_assets_definitions,
    )

    class Analytics(DagsterPostHogTranslator):
        def get_asset_spec(self, props: Any) -> dg.AssetSpec:
            spec = super().get_asset_spec(props)
            return spec.replace_attributes(
                key=spec.key.with_prefix("analytics"), group_name="analytics"
            ).merge_attributes(owners=["team:data"])

    defs = build_posthog_assets_definitions(
        PostHogResource(
            host="https://us.posthog.com",
            project_id="1",
            personal_api_key=dg.EnvVar("POSTHOG_PERSONAL_API_KEY"),
            export_dir=str(tmp_path / "exports"),
        ),
        exports=[ExportConfig(name="signups_csv", insight=2, format=CSV)],
        groups=GroupsConfig(tracked=[{"group_type_index": 0, "group_key": "organization-1"}]),
        duckdb_path=tmp_path / "p.duckdb",
        translator=Analytics(),
    )
    repo = defs.get_repository_def()  # validates: every check and job finds its asset
    graph = repo.asset_graph
    keys = graph.get_all_asset_keys()
    assert len(keys) == 13  # exports, exports log, insights + 5 tidy tables, 5 group tables
    for key in keys:
        node = graph.get(key)
        assert key.path[0] == "analytics", key
        assert node.group_name == "analytics" and "team:data" in node.owners, key
    checks = graph.asset_check_keys
    assert checks and all(c.asset_key.path[0] == "analytics" for c in checks)
    for job in repo.get_all_jobs():
        assert all(k.path[0] == "analytics" for k in job.asset_layer.selected_asset_keys)
    assert not (tmp_path / "exports").exists()

"""Bad configuration fails at definitions load, naming the file, the entry and the field."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from posthog_assets.config import ConfigError, load_settings
from posthog_assets.resources import build_posthog_resource

pytestmark = pytest.mark.unit

GOOD = """
exports:
  - {name: weekly_png, insight: 1, export_format: image/png}
  - {name: board_png, dashboard: 2, export_format: image/png}
insights: {refresh: force_async}
groups: {tracked: [{group_type_index: 0, group_key: acme}]}
"""


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None):
    path = tmp_path / "posthog_assets.yaml"
    path.write_text(text)
    return load_settings(path, env=env or {})


def test_good_config_resolves_default_project_from_env(tmp_path: Path) -> None:
    env = {"POSTHOG_HOST": "https://eu.posthog.com", "POSTHOG_PROJECT_ID": "12"}
    settings = _load(tmp_path, GOOD, env)
    (project,) = settings.projects
    assert project.is_default and project.resource_key == "posthog"
    # checked at load, read again when a run starts: the env of the process that runs decides
    assert project.host is None and project.project_id is None
    resource = build_posthog_resource(project, tmp_path)
    assert resource.host == dg.EnvVar("POSTHOG_HOST") and resource.api_prefix == "projects"
    assert [e.name for e in project.exports] == ["weekly_png", "board_png"]
    assert project.insights.refresh == "force_async"
    assert project.groups.tracked[0].group_key == "acme"


def test_projects_list_gives_one_prefix_and_resource_per_project(tmp_path: Path) -> None:
    text = """
projects:
  - name: production
    host: https://us.posthog.com
    project_id: 12
    exports: [{name: a, insight: 1, export_format: text/csv}]
  - name: staging
    host: http://127.0.0.1:8000
    project_id: "13"
    api_key_env: STAGING_KEY
insights: {refresh: force_blocking}
"""
    settings = _load(tmp_path, text)
    prod, staging = settings.projects
    assert (prod.resource_key, prod.key_prefix) == ("posthog_production", ("posthog", "production"))
    assert (staging.project_id, staging.api_key_env) == (13, "STAGING_KEY")
    assert staging.insights.refresh == "force_blocking"  # inherited from the top level


BAD_INPUTS = [
    (
        "exports: [{name: x, insight: 1, export_format: image/jpeg}]",
        ["exports[0] (name 'x')", "export_format"],
    ),
    (
        "exports: [{name: x, insight: 1, dashboard: 2, export_format: text/csv}]",
        ["exports[0] (name 'x')", "exactly one of 'insight' or 'dashboard'"],
    ),
    (
        "exports: [{name: x, export_format: text/csv}]",
        ["exports[0] (name 'x')", "exactly one of 'insight' or 'dashboard'"],
    ),
    ("insights: {refresh: sometimes}", ["insights", "field 'refresh'"]),
    (
        "exports: [{name: x, insight: 1, export_format: application/pdf}]",
        ["exports[0] (name 'x')", "field 'export_format'", "never renders it", "image/png"],
    ),
    (
        "exports: [{name: x, dashboard: 1, export_format: text/csv}]",
        ["exports[0] (name 'x')", "dashboard only as image/png", "export its insights"],
    ),
    (
        "exports: [{name: x, insight: 1, export_format: text/csv, colour: red}]",
        ["exports[0] (name 'x')", "field 'colour'", "not a known field"],
    ),
    (
        "exports: [{name: x, insight: one, export_format: text/csv}]",
        ["exports[0] (name 'x')", "field 'insight'"],
    ),
    ("exports: [{name: Bad Name, insight: 1, export_format: text/csv}]", ["field 'name'"]),
    ("insights: {query_poll_timeout_s: -5}", ["field 'query_poll_timeout_s'"]),
    (
        "projects: [{name: p, host: 'http://posthog.example.com', project_id: 1}]",
        ["projects[0] (name 'p')", "field 'host'", "https"],
    ),
    (
        "projects: [{name: p, host: 'https://us.posthog.com', project_id: abc}]",
        ["projects[0] (name 'p')", "field 'project_id'", "integer or '@current'"],
    ),
    ("projects: [{name: p, host: 'us.posthog.com', project_id: 1}]", ["field 'host'"]),
    (
        "exports: [{name: a, insight: 1, export_format: text/csv},"
        " {name: a, insight: 2, export_format: text/csv}]",
        ["duplicate name(s) in exports: a"],
    ),
    ("exports: [unclosed", ["not valid YAML"]),
]


@pytest.mark.parametrize(("text", "expected"), BAD_INPUTS)
def test_bad_input_names_file_entry_and_field(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    message = str(err.value)
    assert str(tmp_path / "posthog_assets.yaml") in message
    for fragment in expected:
        assert fragment in message


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"POSTHOG_HOST": "http://eu.posthog.com"}, "POSTHOG_HOST must use https"),
        ({"POSTHOG_HOST": "ftp://x"}, "POSTHOG_HOST must be an absolute URL"),
        ({"POSTHOG_PROJECT_ID": "prod"}, "POSTHOG_PROJECT_ID must be an integer or '@current'"),
    ],
)
def test_bad_environment_fails_at_load(tmp_path: Path, env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match="environment") as err:
        _load(tmp_path, "", env)
    assert fragment in str(err.value)


def test_loopback_http_and_current_project_are_accepted(tmp_path: Path) -> None:
    env = {"POSTHOG_HOST": "http://127.0.0.1:8010", "POSTHOG_PROJECT_ID": "@current"}
    _load(tmp_path, "", env)  # no error
    text = "projects: [{name: p, host: 'http://127.0.0.1:8010', project_id: '@current'}]"
    (project,) = _load(tmp_path, text).projects
    assert project.host == "http://127.0.0.1:8010" and project.project_id == "@current"


def test_plain_http_to_a_private_host_needs_an_explicit_attribute(tmp_path: Path) -> None:
    text = "projects: [{name: p, host: 'http://posthog.internal:8000', project_id: 2}]"
    with pytest.raises(ConfigError, match="allow_insecure_http"):
        _load(tmp_path, text)
    text = text.replace("project_id: 2", "project_id: 2, allow_insecure_http: true")
    (project,) = _load(tmp_path, text).projects
    assert project.host == "http://posthog.internal:8000"


def test_a_second_project_keeps_the_first_ones_names(tmp_path: Path) -> None:
    """Moving to ``projects:`` with the first project named ``default`` renames nothing."""
    (single,) = _load(tmp_path, GOOD).projects
    text = """
projects:
  - name: default
    exports: [{name: weekly_png, insight: 1, export_format: image/png}]
  - name: staging
    host: https://eu.posthog.com
    project_id: 13
"""
    first, second = _load(tmp_path, text).projects
    assert (first.resource_key, first.key_prefix) == (single.resource_key, single.key_prefix)
    assert (second.resource_key, second.key_prefix) == ("posthog_staging", ("posthog", "staging"))


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_the_plain_yaml_example_loads(tmp_path: Path) -> None:
    """``docs/posthog_assets.example.yaml``, the YAML route's example, stays valid."""
    example = Path(__file__).resolve().parents[1] / "docs" / "posthog_assets.example.yaml"
    settings = load_settings(example, env={})
    [project] = settings.projects
    assert [e.name for e in project.exports] == [
        "insight_1_png",
        "insight_2_csv",
        "insight_3_xlsx",
        "dashboard_1_png",
    ]
    assert project.insights.refresh == "async"

"""The YAML route (``POSTHOG_ASSETS_CONFIG``, :func:`load_definitions_from_yaml`): a file in
``defs.yaml``'s format, one document per project, read through the component's own model. Every
setting of a project is reachable from it, and a bad file fails at definitions load, naming the
file, the document, the entry and the field, without echoing a value."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from posthog_assets.component import yaml_file
from posthog_assets.component.yaml_file import ConfigFileError, load_definitions_from_yaml
from posthog_assets.config import PostHogProject
from posthog_assets_tests.support.config_file import config_text, project_document

pytestmark = pytest.mark.unit

CSV = "text/csv"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
GOOD = project_document(
    exports=[
        {"insight": 1, "format": "image/png", "name": "weekly_png"},
        {"dashboard": 2},
    ],
    insights={"refresh": "force_async"},
    groups={"tracked": [{"group_type_index": 0, "group_key": "acme"}]},
)
ENV_VARS = (
    "POSTHOG_HOST",
    "POSTHOG_PROJECT_ID",
    "POSTHOG_PERSONAL_API_KEY",
    "POSTHOG_ASSETS_CONFIG",
)


@pytest.fixture(autouse=True)
def no_posthog_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading reads no connection setting from the environment: none is set here."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[PostHogProject]:
    """The projects the file's documents resolve to, as the definitions are built from them."""
    seen: list[PostHogProject] = []
    real = yaml_file.build_project_definitions

    def spy(project: PostHogProject, **kw: Any) -> dg.Definitions:
        seen.append(project)
        return real(project, **kw)

    monkeypatch.setattr(yaml_file, "build_project_definitions", spy)
    return seen


def _write(tmp_path: Path, *documents: Mapping[str, Any] | str) -> Path:
    path = tmp_path / "posthog.yaml"
    texts = [d if isinstance(d, str) else config_text(d) for d in documents]
    path.write_text("---\n".join(texts))
    return path


def _load(tmp_path: Path, *documents: Mapping[str, Any] | str) -> dg.Definitions:
    return load_definitions_from_yaml(_write(tmp_path, *documents))


def _keys(defs: dg.Definitions) -> set[str]:
    return {s.key.to_user_string() for s in defs.resolve_all_asset_specs()}


def test_good_file_resolves_the_default_project_from_env(
    tmp_path: Path, built: list[PostHogProject], monkeypatch: pytest.MonkeyPatch
) -> None:
    defs = _load(tmp_path, GOOD)
    [project] = built
    assert project.is_default and project.resource_key == "posthog"
    resource = defs.resources["posthog"]
    assert resource is project.resource
    # Not in the file: read from the environment when a run starts (the env of the process that
    # runs decides), so nothing needs them at load.
    assert resource.host == dg.EnvVar("POSTHOG_HOST")
    assert resource.project_id == dg.EnvVar("POSTHOG_PROJECT_ID")
    assert resource.personal_api_key == dg.EnvVar("POSTHOG_PERSONAL_API_KEY")
    assert resource.api_prefix == "projects"
    assert [e.name for e in project.exports] == ["weekly_png", "dashboard_2_png"]
    assert {"posthog/exports/weekly_png", "posthog/exports/dashboard_2_png"} <= _keys(defs)
    assert project.insights.refresh == "force_async"
    assert project.groups.tracked[0].group_key == "acme"

    # Set or not, the environment stays a reference: loading again with it set changes nothing.
    monkeypatch.setenv("POSTHOG_HOST", "https://eu.posthog.com")
    _load(tmp_path, GOOD)
    assert built[1].resource.host == dg.EnvVar("POSTHOG_HOST")


def test_one_document_per_project_gives_one_prefix_and_resource_each(
    tmp_path: Path, built: list[PostHogProject]
) -> None:
    production = project_document(
        project={"name": "production", "host": "https://us.posthog.com", "project_id": 12},
        exports=[{"insight": 1, "format": CSV, "name": "a"}],
        insights={"refresh": "force_blocking"},
    )
    staging = project_document(
        project={
            "name": "staging",
            "host": "http://127.0.0.1:8000",
            "project_id": "13",
            "api_key_env": "STAGING_KEY",
        },
        insights={"refresh": "lazy_async"},
    )
    defs = _load(tmp_path, production, staging)
    prod, stage = built
    assert (prod.resource_key, prod.key_prefix) == ("posthog_production", ("posthog", "production"))
    assert (stage.resource_key, stage.key_prefix) == ("posthog_staging", ("posthog", "staging"))
    assert prod.resource.host == "https://us.posthog.com" and prod.project_id == "12"
    assert stage.project_id == "13"
    assert stage.resource.personal_api_key == dg.EnvVar("STAGING_KEY")
    # Each document is a whole project: its own sections, nothing inherited from another.
    assert (prod.insights.refresh, stage.insights.refresh) == ("force_blocking", "lazy_async")
    assert set(defs.resources) == {"posthog_production", "posthog_staging", "duckdb"}
    assert "posthog/production/exports/a" in _keys(defs)
    assert "posthog/staging/insights" in _keys(defs)


def test_every_setting_of_the_old_plain_yaml_is_reachable(
    tmp_path: Path, built: list[PostHogProject], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names, export context and description, every insights and groups option, the paths (from
    the environment, as the plain YAML read them), the connection and the variables."""
    monkeypatch.setenv("POSTHOG_ASSETS_DUCKDB", str(tmp_path / "from_env.duckdb"))
    monkeypatch.setenv("POSTHOG_ASSETS_EXPORT_DIR", str(tmp_path / "exports_from_env"))
    document = project_document(
        project={
            "name": "prod",
            "host": "{{ env.PROD_POSTHOG_HOST }}",
            "project_id": "{{ env.PROD_POSTHOG_PROJECT_ID }}",
            "api_key_env": "PROD_KEY",
            "api_prefix": "environments",
            "allow_insecure_http": True,
            "max_attempts": 3,
            "poll_timeout_s": 30,
        },
        exports=[
            {
                "insight": 3,
                "format": CSV,
                "name": "signups_csv",
                "export_context": {"path": "/api/projects/1/insights/trend/?events=x"},
                "description": "Signups, weekly",
            },
            {"insight": 4, "format": XLSX},
            {"dashboard": 5, "name": "board"},
        ],
        insights={
            "enabled": True,
            "refresh": "blocking",
            "short_id": "Ab12Cd34",
            "created_by": [2, 3],
            "basic": True,
            "page_size": 7,
            "query_poll_timeout_s": 45,
            "schedule": "5 4 * * *",
        },
        groups={
            "enabled": True,
            "property_values": False,
            "tracked": [{"group_type_index": 1, "group_key": "company-7"}],
            "schedule": "1 2 * * *",
        },
    )
    defs = _load(tmp_path, document)
    [project] = built
    resource = project.resource
    assert project.name == "prod"
    assert resource.host == dg.EnvVar("PROD_POSTHOG_HOST")
    assert resource.project_id == dg.EnvVar("PROD_POSTHOG_PROJECT_ID")
    assert resource.personal_api_key == dg.EnvVar("PROD_KEY")
    assert (resource.api_prefix, resource.allow_insecure_http) == ("environments", True)
    assert (resource.max_attempts, resource.poll_timeout_s) == (3, 30)
    assert resource.export_dir == str(tmp_path / "exports_from_env")
    assert project.duckdb_path == str(tmp_path / "from_env.duckdb")
    assert defs.resources["duckdb"].database == str(tmp_path / "from_env.duckdb")

    signups, sheet, board = project.exports
    assert (signups.name, signups.insight, signups.format) == ("signups_csv", 3, CSV)
    assert signups.export_context == {"path": "/api/projects/1/insights/trend/?events=x"}
    assert signups.description == "Signups, weekly"
    assert (sheet.name, sheet.format) == ("insight_4_xlsx", XLSX)
    assert (board.name, board.dashboard, board.format) == ("board", 5, "image/png")

    insights = project.insights
    assert (insights.refresh, insights.short_id, insights.created_by) == (
        "blocking",
        "Ab12Cd34",
        [2, 3],
    )
    assert (insights.basic, insights.page_size, insights.query_poll_timeout_s) == (True, 7, 45)
    assert insights.schedule == "5 4 * * *"
    groups = project.groups
    assert groups.property_values is False and groups.schedule == "1 2 * * *"
    assert [(t.group_type_index, t.group_key) for t in groups.tracked] == [(1, "company-7")]
    schedules = {s.name: s.cron_schedule for s in defs.schedules or []}
    assert schedules == {
        "posthog_prod_insights_snapshot_daily": "5 4 * * *",
        "posthog_prod_groups_snapshot_daily": "1 2 * * *",
    }
    assert "posthog/prod/group_property_values" not in _keys(defs)  # property_values: false


def test_sections_can_be_turned_off_and_translation_applies(
    tmp_path: Path, built: list[PostHogProject]
) -> None:
    document = project_document(
        exports=[{"insight": 1, "format": CSV}],
        insights={"enabled": False},
        groups={"enabled": False},
        translation={"group_name": "analytics"},
    )
    defs = _load(tmp_path, document)
    assert _keys(defs) == {"posthog/exports/insight_1_csv", "posthog/exports_log"}
    assert {s.group_name for s in defs.resolve_all_asset_specs()} == {"analytics"}
    assert not defs.schedules


def test_numeric_ids_need_no_state_and_name_the_asset(
    tmp_path: Path, built: list[PostHogProject]
) -> None:
    document = project_document(
        exports=[{"insight": 42, "format": CSV}, {"insight": 42}, {"dashboard": 7}]
    )
    defs = _load(tmp_path, document)
    assert [(e.name, e.insight, e.dashboard) for e in built[0].exports] == [
        ("insight_42_csv", 42, None),
        ("insight_42_png", 42, None),
        ("dashboard_7_png", None, 7),
    ]
    assert {"posthog/exports/insight_42_csv", "posthog/exports/dashboard_7_png"} <= _keys(defs)


@pytest.mark.parametrize(
    ("entry", "shown"),
    [
        ({"insights": {"tag": "weekly"}, "format": CSV}, "insights: {'tag': 'weekly'}"),
        ({"dashboards": "all"}, "dashboards: all"),
        ({"insight": "Ab12Cd34", "format": CSV}, "insight: Ab12Cd34"),
        ({"dashboard": "Growth"}, "dashboard: Growth"),
    ],
    ids=["by_tag", "every_dashboard", "by_short_id", "by_dashboard_name"],
)
def test_a_selection_that_needs_the_stored_state_is_refused_without_dg(
    tmp_path: Path, entry: dict[str, Any], shown: str
) -> None:
    with pytest.raises(ConfigFileError) as err:
        _load(tmp_path, project_document(exports=[{"insight": 1}, entry]))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'posthog.yaml'}: exports[1] ({shown}) selects by")
    assert "`dg utils refresh-defs-state`" in message
    assert "without dg, name exports by numeric id (insight: 42, dashboard: 7)" in message


def _exports(*entries: dict[str, Any]) -> dict[str, Any]:
    return project_document(exports=list(entries))


#: (id, document, fragments of the message): each mistake once.
BAD_INPUTS: list[tuple[str, dict[str, Any] | str, list[str]]] = [
    ("bad_mime", _exports({"name": "x", "insight": 1, "format": "image/jpeg"}),
     ["exports[0] (name 'x'), field 'format'", "Input should be 'image/png'"]),
    ("insight_and_dashboard", _exports({"name": "x", "insight": 1, "dashboard": 2}),
     ["exports[0] (name 'x')", "give exactly one of insight, insights, dashboard, dashboards"]),
    ("neither", _exports({"name": "x", "format": CSV}),
     ["exports[0] (name 'x')", "give exactly one of insight, insights, dashboard, dashboards"]),
    ("unknown_refresh", project_document(insights={"refresh": "sometimes"}),
     ["insights, field 'refresh'", "'force_async'"]),
    ("pdf", _exports({"name": "x", "insight": 1, "format": "application/pdf"}),
     ["exports[0] (name 'x'), field 'format'", "never renders it", "image/png"]),
    ("dashboard_as_csv", _exports({"name": "x", "dashboard": 1, "format": CSV}),
     ["exports[0] (dashboard: 1)", "dashboard only as image/png"]),
    ("unknown_field", _exports({"name": "x", "insight": 1, "format": CSV, "colour": "red"}),
     ["exports[0] (name 'x'), field 'colour'", "not a known field"]),
    ("wrong_type", _exports({"name": "x", "insight": 1, "export_context": "all"}),
     ["exports[0] (name 'x'), field 'export_context'", "valid dictionary"]),
    ("bad_name", _exports({"name": "Bad Name", "insight": 1}),
     ["exports[0] (name 'Bad Name'), field 'name'"]),
    ("negative_timeout", project_document(insights={"query_poll_timeout_s": -5}),
     ["insights, field 'query_poll_timeout_s'", "greater than 0"]),
    ("page_size", project_document(insights={"page_size": 5000}),
     ["insights, field 'page_size'", "1 to 1000"]),
    ("bad_cron", project_document(groups={"schedule": "every day"}),
     ["groups, field 'schedule'", "cron expression of five fields"]),
    ("group_type_index", project_document(groups={"tracked": [{"group_type_index": 9,
                                                                "group_key": "a"}]}),
     ["groups.tracked[0], field 'group_type_index'", "0 to 4"]),
    ("remote_http", project_document(project={"name": "p", "host": "http://posthog.example.com",
                                              "project_id": 1}),
     ["project.host must use https", "allow_insecure_http"]),
    ("project_id", project_document(project={"name": "p", "host": "https://us.posthog.com",
                                             "project_id": "abc"}),
     ["project.project_id must be an integer or '@current'"]),
    ("host_without_scheme", project_document(project={"host": "us.posthog.com"}),
     ["project.host must be an absolute URL"]),
    ("unknown_project_field", project_document(project={"hots": "https://us.posthog.com"}),
     ["project, field 'hots': not a known field (a typo?)", "(the fields are: name, host,"]),
    ("project_name", project_document(project={"name": "Prod"}),
     ["project.name must be lower_snake_case"]),
    ("duplicate_name", _exports({"name": "a", "insight": 1}, {"name": "a", "insight": 2}),
     ["exports[1] (insight: 2) names its asset 'a', as exports[0] does for insight 1"]),
    ("not_yaml", "type: posthog_assets.PostHogProjectComponent\nattributes: {exports: [unclosed\n",
     ["not valid YAML"]),
    ("not_a_component", "type: some.OtherComponent\nattributes: {}\n",
     ["each document is a defs.yaml: 'type: posthog_assets.PostHogProjectComponent'"]),
    ("old_plain_yaml", "exports:\n  - {name: x, insight: 1, export_format: text/csv}\n",
     ["each document is a defs.yaml"]),
    ("unknown_document_key",
     "type: posthog_assets.PostHogProjectComponent\nattributes: {}\nrequirements: {}\n",
     ["'requirements' is not a defs.yaml key (type, attributes)"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("document", "expected"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_names_file_entry_and_field(
    tmp_path: Path, document: dict[str, Any] | str, expected: list[str]
) -> None:
    """One type for a caller to catch (``ConfigFileError``), whatever the mistake; its message
    starts with the file and names the entry and the field."""
    with pytest.raises(ConfigFileError) as err:
        _load(tmp_path, document)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'posthog.yaml'}: "), message
    for fragment in expected:
        assert fragment in message, message


@pytest.mark.parametrize("object_id", [0, -1])
def test_an_id_that_is_not_positive_names_the_entry_and_field(
    tmp_path: Path, object_id: int
) -> None:
    with pytest.raises(ConfigFileError) as err:
        _load(tmp_path, _exports({"name": "x", "insight": object_id}))
    assert str(err.value).startswith(
        f"{tmp_path / 'posthog.yaml'}: exports[0] (name 'x'), field 'insight': "
    )
    assert "input_value" not in str(err.value)


def test_an_error_names_the_document_of_a_multi_project_file(tmp_path: Path) -> None:
    good = project_document()
    bad = project_document(
        project={"name": "staging"}, exports=[{"name": "x", "insight": 1, "format": "image/jpg"}]
    )
    with pytest.raises(ConfigFileError) as err:
        _load(tmp_path, good, bad)
    assert str(err.value).startswith(
        f"{tmp_path / 'posthog.yaml'}, document 2: exports[0] (name 'x'), field 'format': "
    )


def test_two_documents_of_one_project_name_fail_naming_both(tmp_path: Path) -> None:
    first = project_document(exports=[{"insight": 1}])
    second = project_document(exports=[{"insight": 2}])
    with pytest.raises(ConfigFileError) as err:
        _load(tmp_path, first, second)
    path = tmp_path / "posthog.yaml"
    assert str(err.value).startswith(
        f"{path}, document 2 and {path}, document 1 both configure the project named 'default'"
    )


SECRET = "phx_NeverShownInAnyMessage0123"


@pytest.mark.parametrize(
    "document",
    [
        project_document(project={"personal_api_key": SECRET}),
        project_document(project={"pesonal_api_key": SECRET}),
        _exports({"name": "x", "insight": 1, "format": CSV, "key": SECRET}),
        project_document(insights={"refresh": SECRET}),
        project_document(project={"rate_limit_url": f"redis://:{SECRET}@redis:6379/0"}),
        project_document(personal_api_key=SECRET),
    ],
    ids=[
        "literal_key",
        "misspelt_key_field",
        "unknown_export_field",
        "wrong_refresh",
        "redis_password",
        "key_at_the_top_level",
    ],
)
def test_no_error_echoes_a_value_that_may_be_a_secret(tmp_path: Path, document: Any) -> None:
    with pytest.raises(ConfigFileError) as err:
        _load(tmp_path, document)
    assert str(tmp_path / "posthog.yaml") in str(err.value)
    assert SECRET not in str(err.value)


def test_loopback_http_and_current_project_are_accepted(
    tmp_path: Path, built: list[PostHogProject]
) -> None:
    _load(tmp_path, project_document(project={"host": "http://127.0.0.1:8010",
                                              "project_id": "@current"}))  # fmt: skip
    [project] = built
    assert project.resource.host == "http://127.0.0.1:8010" and project.project_id == "@current"


def test_plain_http_to_a_private_host_needs_an_explicit_attribute(
    tmp_path: Path, built: list[PostHogProject]
) -> None:
    private = {"host": "http://posthog.internal:8000", "project_id": 2}
    with pytest.raises(ConfigFileError, match="allow_insecure_http"):
        _load(tmp_path, project_document(project=private))
    _load(tmp_path, project_document(project={**private, "allow_insecure_http": True}))
    assert built[0].resource.host == "http://posthog.internal:8000"


def test_a_second_project_keeps_the_first_ones_names(
    tmp_path: Path, built: list[PostHogProject]
) -> None:
    """Adding a second document (the first one left unnamed, i.e. ``default``) renames nothing."""
    single = _keys(_load(tmp_path, GOOD))
    staging = project_document(
        project={"name": "staging", "host": "https://eu.posthog.com", "project_id": 13}
    )
    both = _keys(_load(tmp_path, GOOD, staging))
    first, _, second = built
    assert single <= both and all(k.startswith("posthog/staging/") for k in both - single)
    assert (first.resource_key, first.key_prefix) == ("posthog", ("posthog",))
    assert (second.resource_key, second.key_prefix) == ("posthog_staging", ("posthog", "staging"))


def test_missing_or_empty_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="nope.yaml: configuration file not found"):
        load_definitions_from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ConfigFileError, match="no configuration file: give a path or set"):
        load_definitions_from_yaml()
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigFileError, match="empty.yaml: no project"):
        load_definitions_from_yaml(tmp_path / "empty.yaml")


def test_the_variable_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, GOOD)
    monkeypatch.setenv("POSTHOG_ASSETS_CONFIG", str(path))
    assert "posthog/exports/weekly_png" in _keys(load_definitions_from_yaml())


def test_the_plain_yaml_example_loads(built: list[PostHogProject]) -> None:
    """``docs/posthog_assets.example.yaml``, the YAML route's example, stays valid."""
    example = Path(__file__).resolve().parents[1] / "docs" / "posthog_assets.example.yaml"
    load_definitions_from_yaml(example)
    default, staging = built
    assert [e.name for e in default.exports] == [
        "insight_1_png",
        "trends_csv",
        "insight_3_xlsx",
        "dashboard_1_png",
    ]
    assert default.insights.refresh == "async"
    assert staging.name == "staging" and [e.name for e in staging.exports] == ["insight_2_csv"]
    assert staging.resource.project_id == dg.EnvVar("POSTHOG_STAGING_PROJECT_ID")

"""PostHogResource: checked at launch before any request; the key is a masked secret."""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dagster as dg
import pytest

from posthog_assets.resources import PostHogResource
from posthog_assets_tests.support.resources import make_resource, with_fields
from posthog_standin.server import StandinControl, StandinProcess

pytestmark = pytest.mark.integration


def _probe_asset() -> dg.AssetsDefinition:
    @dg.asset
    def probe(posthog: PostHogResource) -> None:
        posthog.get_client().list_group_types()

    return probe


BAD_SETTINGS = [
    ("host", "http://posthog.example.com", "host must use https"),
    ("host", "posthog.example.com", "host must be an absolute URL"),
    ("project_id", "production", "project_id must be an integer or '@current'"),
    ("api_prefix", "v2", "api_prefix must be"),
    ("poll_timeout_s", -1, "poll_timeout_s must be greater than 0"),
]


@pytest.mark.parametrize(("field", "value", "fragment"), BAD_SETTINGS)
def test_bad_resource_config_written_in_the_definitions_fails_where_it_is_written(
    standin: StandinProcess, field: str, value: Any, fragment: str
) -> None:
    """A literal setting is checked when the resource is built (the definitions load)."""
    with pytest.raises(ValueError, match=re.escape(fragment)):
        make_resource(standin, "exports", **{field: value})


ENV_LAUNCH, RUN_CONFIG_LAUNCH = "environment", "run_config"
LAUNCH_CASES = [
    pytest.param(ENV_LAUNCH, "host", "http://posthog.example.com", "host must use https"),
    pytest.param(ENV_LAUNCH, "host", "posthog.example.com", "host must be an absolute URL"),
    pytest.param(ENV_LAUNCH, "project_id", "production", "project_id must be an integer"),
    pytest.param(ENV_LAUNCH, "personal_api_key", "  ", "personal_api_key is empty"),
    pytest.param(
        ENV_LAUNCH,
        "api_prefix",
        "v2",
        "api_prefix must be",
    ),
    pytest.param(RUN_CONFIG_LAUNCH, "project_id", "production", "project_id must be an integer"),
    pytest.param(RUN_CONFIG_LAUNCH, "api_prefix", "v2", "api_prefix must be"),
    pytest.param(RUN_CONFIG_LAUNCH, "poll_timeout_s", -1, "poll_timeout_s must be greater than 0"),
    pytest.param(RUN_CONFIG_LAUNCH, "personal_api_key", "  ", "personal_api_key is empty"),
]


@pytest.mark.parametrize(("given_by", "field", "value", "fragment"), LAUNCH_CASES)
def test_bad_resource_config_given_at_launch_fails_before_any_request(
    standin: StandinProcess,
    control: StandinControl,
    monkeypatch: pytest.MonkeyPatch,
    given_by: str,
    field: str,
    value: Any,
    fragment: str,
) -> None:
    """A value read when the run starts (an env var, the launchpad's run config) is checked then,
    before the first request."""
    run_config: dict[str, Any] = {}
    if given_by == ENV_LAUNCH:
        monkeypatch.setenv("POSTHOG_TEST_SETTING", value)
        resource = make_resource(standin, "exports", **{field: dg.EnvVar("POSTHOG_TEST_SETTING")})
    else:
        resource = make_resource(standin, "exports")
        required = {"host": standin.url, "project_id": "1", "personal_api_key": "********"}
        run_config = {"resources": {"posthog": {"config": {**required, field: value}}}}
    with pytest.raises(Exception) as err:
        dg.materialize([_probe_asset()], resources={"posthog": resource}, run_config=run_config)
    assert fragment in str(err.value) or fragment in str(err.value.__cause__)
    assert [r for r in control.requests_log() if "/api/" in r["path"]] == []


def test_a_bad_value_from_the_environment_names_the_variable(
    standin: StandinProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the plain YAML route once said "POSTHOG_HOST must use https": the person fixes the
    variable, not the definitions."""
    monkeypatch.setenv("POSTHOG_TEST_HOST", "http://posthog.example.com")
    resource = make_resource(standin, "exports", host=dg.EnvVar("POSTHOG_TEST_HOST"))
    with pytest.raises(Exception) as err:
        dg.materialize([_probe_asset()], resources={"posthog": resource})
    assert "POSTHOG_TEST_HOST" in str(err.value) + str(err.value.__cause__)


def test_missing_key_env_var_names_the_variable(
    standin: StandinProcess, control: StandinControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POSTHOG_TEST_MISSING_KEY", raising=False)
    resource = make_resource(
        standin, "exports", personal_api_key=dg.EnvVar("POSTHOG_TEST_MISSING_KEY")
    )
    with pytest.raises(Exception, match="POSTHOG_TEST_MISSING_KEY"):
        dg.materialize([_probe_asset()], resources={"posthog": resource})
    assert [r for r in control.requests_log() if "/api/" in r["path"]] == []


def test_key_field_is_marked_secret() -> None:
    field = PostHogResource.to_config_schema().as_field().config_type.fields["personal_api_key"]
    assert field.is_secret


def test_resource_hands_out_one_client_per_run(posthog_resource: PostHogResource) -> None:
    seen = []

    @dg.asset
    def probe(posthog: PostHogResource) -> None:
        seen.append(posthog.get_client())
        seen.append(posthog.get_client())
        assert len(posthog.get_client().list_group_types()) == 3

    assert dg.materialize([probe], resources={"posthog": posthog_resource}).success
    assert seen[0] is seen[1]


def test_ui_mask_sent_back_by_the_launchpad_means_the_definitions_key(
    posthog_resource: PostHogResource, monkeypatch: pytest.MonkeyPatch, standin: StandinProcess
) -> None:
    """The launchpad shows the key as '********' and submits that: the run uses the key the
    definitions give (here an env var); the variable's name is not run config at all."""
    monkeypatch.setenv("POSTHOG_TEST_KEY_ENV", standin.key)
    defined = with_fields(posthog_resource, personal_api_key=dg.EnvVar("POSTHOG_TEST_KEY_ENV"))
    masked = {"resources": {"posthog": {"config": {"host": standin.url, "project_id": "1",
                                                   "personal_api_key": "********"}}}}  # fmt: skip
    result = dg.materialize([_probe_asset()], resources={"posthog": defined}, run_config=masked)
    assert result.success

    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "hunter2")
    steer = {"resources": {"posthog": {"config": {
        "host": standin.url, "project_id": "1", "api_key_env": "DAGSTER_PG_PASSWORD",
    }}}}  # fmt: skip
    with pytest.raises(dg.DagsterInvalidConfigError, match="api_key_env"):
        dg.materialize([_probe_asset()], resources={"posthog": defined}, run_config=steer)


class _Capture(ThreadingHTTPServer):
    """A server that records every request it gets (where a stolen key would arrive)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                capture.seen.append(dict(self.headers))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_a_launch_cannot_send_the_key_to_another_host(
    posthog_resource: PostHogResource,
    standin: StandinProcess,
    control: StandinControl,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run config comes from whoever can launch (the launchpad, a GraphQL call): a run whose
    config names another host is refused before any request, whatever stands for the key."""
    monkeypatch.setenv("POSTHOG_TEST_HOST", standin.url)
    monkeypatch.setenv("POSTHOG_TEST_KEY_ENV", standin.key)
    defined = with_fields(
        posthog_resource,
        host=dg.EnvVar("POSTHOG_TEST_HOST"),
        personal_api_key=dg.EnvVar("POSTHOG_TEST_KEY_ENV"),
    )
    capture = _Capture()
    try:
        for key in ("********", {"env": "POSTHOG_TEST_KEY_ENV"}):
            config = {"resources": {"posthog": {"config": {
                "host": capture.url, "project_id": "1", "personal_api_key": key,
            }}}}  # fmt: skip
            with pytest.raises(Exception) as err:
                dg.materialize([_probe_asset()], resources={"posthog": defined}, run_config=config)
            text = str(err.value) + str(err.value.__cause__)
            assert (
                f"host: this run's config would send the PostHog key to '{capture.url}', but "
                f"the environment variable POSTHOG_TEST_HOST pins '{standin.url}'. A launch may "
                "not change where the key goes"
            ) in text
        assert capture.seen == []
        same = {"resources": {"posthog": {"config": {"host": standin.url + "/",
                "project_id": "1", "personal_api_key": "********"}}}}  # fmt: skip
        result = dg.materialize([_probe_asset()], resources={"posthog": defined}, run_config=same)
        assert result.success
    finally:
        capture.shutdown()

    monkeypatch.delenv("POSTHOG_TEST_HOST")  # unset where the run executes: no stand-in for it
    config = {"resources": {"posthog": {"config": {"host": standin.url, "project_id": "1",
                                                   "personal_api_key": "********"}}}}  # fmt: skip
    with pytest.raises(Exception) as err:
        dg.materialize([_probe_asset()], resources={"posthog": defined}, run_config=config)
    assert "POSTHOG_TEST_HOST is not set where this run executes" in (
        str(err.value) + str(err.value.__cause__)
    )


def test_a_literal_key_is_hidden_from_repr_and_warned_about_once(
    posthog_resource: PostHogResource,
) -> None:
    assert posthog_resource.personal_api_key not in repr(posthog_resource)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [_probe_asset()], resources={"posthog": posthog_resource}, instance=instance
        )
        warned = [
            e.user_message
            for e in instance.all_logs(result.run_id)
            if "written literally" in e.user_message
        ]
    assert result.success and len(warned) <= 1  # once per process: an earlier test may have
    if warned:
        assert "dg.EnvVar('POSTHOG_PERSONAL_API_KEY')" in warned[0]
        assert posthog_resource.personal_api_key not in warned[0]


def test_projects_prefix_by_default_and_the_deprecated_one_warns_once_per_run(
    posthog_resource: PostHogResource, control: StandinControl, standin: StandinProcess
) -> None:
    """Two steps of one run on ``/api/environments/`` warn once between them; the default
    prefix (``/api/projects/``) is not deprecated and does not warn."""

    @dg.asset
    def first(context, posthog: PostHogResource) -> None:  # type: ignore[no-untyped-def]
        posthog.get_client(log=context.log).get_json("insights/", {"basic": "true", "limit": 1})

    @dg.asset(deps=[first])
    def second(context, posthog: PostHogResource) -> None:  # type: ignore[no-untyped-def]
        posthog.get_client(log=context.log).get_json("insights/", {"basic": "true", "limit": 1})

    def warnings(prefix: str) -> list[str]:
        resource = with_fields(posthog_resource, api_prefix=prefix)
        with dg.instance_for_test() as instance:
            result = dg.materialize(
                [first, second], resources={"posthog": resource}, instance=instance
            )
            return [
                e.user_message
                for e in instance.all_logs(result.run_id)
                if "deprecated" in e.user_message
            ]

    assert posthog_resource.api_prefix == "projects"
    assert warnings("projects") == []
    [warning] = warnings("environments")
    assert "Sunset" in warning and "api_prefix='projects'" in warning
    paths = {r["path"].split("/")[2] for r in control.requests_log() if "/api/" in r["path"]}
    assert paths == {"projects", "environments"}


def test_plain_http_to_a_private_host_needs_the_attribute_and_warns_once_per_run(
    posthog_resource: PostHogResource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A self-hosted PostHog on a private network over http: refused unless allowed; allowed,
    a run says once that the key crosses the network in clear."""

    @dg.asset
    def first(posthog: PostHogResource) -> None:
        assert posthog.host == "http://10.255.0.1:8000"

    @dg.asset(deps=[first])
    def second(posthog: PostHogResource) -> None:
        pass

    private = "http://10.255.0.1:8000"
    with pytest.raises(ValueError, match="allow_insecure_http"):  # where it is written
        with_fields(posthog_resource, host=private)
    monkeypatch.setenv("POSTHOG_TEST_HOST", private)
    from_env = with_fields(posthog_resource, host=dg.EnvVar("POSTHOG_TEST_HOST"))
    with pytest.raises(Exception) as err:  # read when the run starts
        dg.materialize([first, second], resources={"posthog": from_env})
    assert "allow_insecure_http" in str(err.value) + str(err.value.__cause__)

    allowed = with_fields(posthog_resource, host=private, allow_insecure_http=True)
    with dg.instance_for_test() as instance:
        result = dg.materialize([first, second], resources={"posthog": allowed}, instance=instance)
        assert result.success
        warned = [
            e.user_message
            for e in instance.all_logs(result.run_id)
            if "plain http" in e.user_message
        ]
    assert len(warned) == 1 and "10.255.0.1" in warned[0]
    assert posthog_resource.personal_api_key not in warned[0]

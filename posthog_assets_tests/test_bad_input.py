"""Bad input, end to end: the real code location loaded (and launched) with one mistake each.

Why: a mistake in the configuration file (``POSTHOG_ASSETS_CONFIG``, ``defs.yaml``'s format) or
the environment must stop the pipeline before it talks to PostHog, with ONE error that names the
field, where a person looks first: the output of ``dg check defs`` / ``dagster dev`` (definitions
load) or the run's failure (launch). The unit tests (test_config.py, test_resources.py) check
``load_definitions_from_yaml`` and the resource on their own; here each case is a fresh child
process importing ``posthog_project.definitions``, exactly as a code server does, and the
stand-in's request log must stay empty.

Host, project id and key are left out of the file: they come from ``POSTHOG_HOST``,
``POSTHOG_PROJECT_ID`` and ``POSTHOG_PERSONAL_API_KEY``, read when a run starts, so a wrong or
missing variable is caught at launch.

Speed: each child is forked from a warm interpreter that has Dagster and the package's modules
imported (``reliability_support.warm_python``), but not ``posthog_project.definitions``, which
each child imports afresh with its own environment; a dozen cases cost one start-up, not twelve.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest

from posthog_assets_tests.support.config_file import config_text, project_document
from posthog_assets_tests.support.reliability import api_requests, warm_python
from posthog_assets_tests.support.session import standin_env
from posthog_standin.server import StandinProcess

pytestmark = pytest.mark.system

CHILD = """
import sys
import dagster as dg
import posthog_project.definitions as d

if sys.argv[1]:
    with dg.DagsterInstance.ephemeral() as instance:
        d.defs.resolve_job_def(sys.argv[1]).execute_in_process(instance=instance)
"""

GOOD_EXPORT = {"insight": 1, "format": "image/png", "name": "weekly_png"}
CONFIG_ERROR = "posthog_assets.component.yaml_file.ConfigFileError: "
#: Dagster's wrapping of an error raised while the resource is set up for a run.
RESOURCE_ERROR = (
    "DagsterResourceFunctionError: Error executing resource_fn on ResourceDefinition posthog"
)
LOAD, CONFIG, RESOURCE = "load", "config", "resource"


def _file(**attributes: Any) -> str:
    """A configuration file of one project: the good export unless told otherwise."""
    return config_text(project_document(**{"exports": [GOOD_EXPORT], **attributes}))


def _export(**entry: Any) -> str:
    return _file(exports=[{"name": "x", **entry}])


@dataclass(frozen=True)
class BadInput:
    """One mistake, where it is caught, and the words the error must contain."""

    id: str
    fragments: tuple[str, ...]
    text: str = field(default_factory=_file)
    env: dict[str, str | None] = field(default_factory=dict)  # None: unset the variable
    launch: str | None = None  # a job to launch after loading (launch-time errors)
    #: Where it is caught: load (the file), or at launch by the run config (a variable the
    #: config reads is unset) or by the resource (a value read from the environment is wrong).
    caught: str = LOAD


CASES = [
    BadInput("malformed_yaml", ("malformed_yaml.yaml: not valid YAML", "flow mapping", "line 9"),
             text=_file().replace("name: weekly_png", "name: weekly_png\n  - {insight: 1")),
    BadInput("unknown_key", ("exports[0] (name 'x'), field 'colour'", "not a known field"),
             text=_export(insight=1, format="text/csv", colour="red")),
    BadInput("wrong_type", ("exports[0] (name 'x'), field 'export_context'", "valid dictionary"),
             text=_export(insight=1, format="text/csv", export_context="everything")),
    BadInput("short_id_without_state",
             ("exports[0] (insight: Ab12Cd34) selects by name, tag or filter",
              "without dg, name exports by numeric id"),
             text=_export(insight="Ab12Cd34", format="text/csv")),
    BadInput("bad_mime", ("exports[0] (name 'x'), field 'format'", "'image/png'"),
             text=_export(insight=1, format="image/jpeg")),
    BadInput("insight_and_dashboard",
             ("exports[0] (name 'x')", "give exactly one of insight, insights, dashboard"),
             text=_export(insight=1, dashboard=2, format="text/csv")),
    BadInput("neither_insight_nor_dashboard", ("exports[0] (name 'x')", "give exactly one of"),
             text=_export(format="text/csv")),
    BadInput("negative_timeout", ("insights, field 'query_poll_timeout_s'", "greater than 0"),
             text=_file(insights={"query_poll_timeout_s": -5})),
    BadInput("unknown_refresh_mode", ("insights, field 'refresh'", "'force_async'"),
             text=_file(insights={"refresh": "sometimes"})),
    BadInput("bad_host_url", ("project.host must be an absolute URL", "us.posthog.com"),
             text=_file(project={"name": "prod", "host": "us.posthog.com", "project_id": 1})),
    BadInput("http_to_remote_host", ("host must use https", "posthog.example.com"),
             env={"POSTHOG_HOST": "http://posthog.example.com"},
             launch="posthog_groups_snapshot", caught=RESOURCE),
    BadInput("project_id_not_integer",
             ("project_id must be an integer or '@current'", "'production'"),
             env={"POSTHOG_PROJECT_ID": "production"},
             launch="posthog_groups_snapshot", caught=RESOURCE),
    BadInput("yaml_project_id_not_integer",
             ("project.project_id must be an integer or '@current'", "'p1'"),
             text=_file(project={"name": "prod", "host": "https://eu.posthog.com",
                                 "project_id": "p1"})),
    BadInput("missing_key_env_var",
             ("resources:posthog:config:personal_api_key", '"POSTHOG_PERSONAL_API_KEY"',
              "which is not set"),
             env={"POSTHOG_PERSONAL_API_KEY": None}, launch="posthog_groups_snapshot",
             caught=CONFIG),
    BadInput("missing_host_env_var",
             ("resources:posthog:config:host", '"POSTHOG_HOST"', "which is not set"),
             env={"POSTHOG_HOST": None}, launch="posthog_groups_snapshot", caught=CONFIG),
]  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(standin: StandinProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run every case (and one good config) in forked children; keep the stand-in's log."""
    root = tmp_path_factory.mktemp("bad_input")
    base = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(root),
        **standin_env(standin, root),
        "POSTHOG_PERSONAL_API_KEY": standin.key,
        "POSTHOG_ASSETS_RATE_LIMIT_DIR": str(root / "gates"),
    }
    batch = []
    for case in [*CASES, BadInput("good_config", ())]:
        config = root / f"{case.id}.yaml"
        config.write_text(case.text)
        env = {**base, "POSTHOG_ASSETS_CONFIG": str(config)}
        for name, value in case.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        batch.append({"id": case.id, "env": env, "launch": case.launch})
    control = standin.control
    control.reset()
    warm = warm_python()
    results: dict[str, Any] = {}
    for job in batch:
        code, out, err = warm.run(
            CHILD, argv=[job["launch"] or ""], env=job["env"], cwd=root, name=job["id"]
        )
        results[job["id"]] = {"code": code, "output": out + err}
    results["__requests__"] = api_requests(control.requests_log())
    return results


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_error_before_any_request(
    case: BadInput, outcomes: dict[str, Any]
) -> None:
    outcome = outcomes[case.id]
    output: str = outcome["output"]
    assert outcome["code"] == 1, output
    for fragment in case.fragments:
        assert fragment in output, (fragment, output[-2000:])
    if case.caught == RESOURCE:
        # Dagster wraps what the resource raised (one chain): that one error, nothing else.
        assert RESOURCE_ERROR in output, output[-2000:]
        problems = {ln for ln in output.splitlines() if ln.startswith("ValueError: ")}
        assert len(problems) == 1, problems
        assert "During handling of the above exception" not in output
    else:  # one error: no chained exception
        assert "During handling of the above exception" not in output
        assert "The above exception was the direct cause" not in output
    if case.caught == LOAD:  # ... and a single problem listed
        assert output.count(CONFIG_ERROR) == 1, output
        message = output[output.index(CONFIG_ERROR) :].splitlines()[0]
        assert message.count(", field '") <= 1, message
    else:
        assert "Error 2:" not in output, output[-2000:]
        assert ("Error 1:" in output) == (case.caught == CONFIG), output[-2000:]
    assert outcomes["__requests__"] == [], "a request reached PostHog despite the bad input"


def test_the_same_harness_loads_and_launches_a_good_config(outcomes: dict[str, Any]) -> None:
    """The control case: without the mistake the same child process loads cleanly."""
    good = outcomes["good_config"]
    assert good["code"] == 0 and "Traceback" not in good["output"], good["output"][-2000:]

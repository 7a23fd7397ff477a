"""Bad input, end to end: the real code location loaded (and launched) with one mistake each.

Why: a mistake in ``posthog_assets.yaml`` or the environment must stop the pipeline before it
talks to PostHog, with ONE error that names the field, where a person looks first: the output of
``dg check defs`` / ``dagster dev`` (definitions load) or the run's failure (launch). The unit
tests (test_config.py, test_resources.py) check ``load_settings`` and the resource on their own;
here each case is a fresh child process importing ``posthog_assets.definitions``, exactly as a
code server does, and the stand-in's request log must stay empty.

Speed: each child is forked from a warm interpreter that has Dagster and the package's modules
imported (``reliability_support.warm_python``), but not ``posthog_assets.definitions``, which
each child imports afresh with its own environment; a dozen cases cost one start-up, not twelve.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from posthog_assets.standin.server import StandinProcess
from posthog_assets_tests.support.reliability import api_requests, warm_python
from posthog_assets_tests.support.session import standin_env

pytestmark = pytest.mark.system

CHILD = """
import sys
import dagster as dg
import posthog_assets.definitions as d

if sys.argv[1]:
    with dg.DagsterInstance.ephemeral() as instance:
        d.defs.resolve_job_def(sys.argv[1]).execute_in_process(instance=instance)
"""

GOOD_YAML = "exports:\n  - {name: weekly_png, insight: 1, export_format: image/png}\n"
CONFIG_ERROR = "posthog_assets.config.ConfigError: "


@dataclass(frozen=True)
class BadInput:
    """One mistake, where it is caught, and the words the error must contain."""

    id: str
    fragments: tuple[str, ...]
    yaml: str = GOOD_YAML
    env: dict[str, str | None] = field(default_factory=dict)  # None: unset the variable
    launch: str | None = None  # a job to launch after loading (launch-time errors)


CASES = [
    BadInput("malformed_yaml", ("malformed_yaml.yaml: not valid YAML", "flow mapping", "line 2"),
             yaml="exports:\n  - {name: x, insight: 1\n"),
    BadInput("unknown_key", ("exports[0] (name 'x'), field 'colour'", "Extra inputs"),
             yaml="exports:\n  - {name: x, insight: 1, export_format: text/csv, colour: red}\n"),
    BadInput("wrong_type", ("exports[0] (name 'x'), field 'insight'", "valid integer"),
             yaml="exports:\n  - {name: x, insight: one, export_format: text/csv}\n"),
    BadInput("bad_mime", ("exports[0] (name 'x'), field 'export_format'", "'image/png'"),
             yaml="exports:\n  - {name: x, insight: 1, export_format: image/jpeg}\n"),
    BadInput("insight_and_dashboard", ("exports[0] (name 'x')", "exactly one of 'insight'"),
             yaml="exports:\n  - {name: x, insight: 1, dashboard: 2, export_format: text/csv}\n"),
    BadInput("neither_insight_nor_dashboard", ("exports[0] (name 'x')", "exactly one of"),
             yaml="exports:\n  - {name: x, export_format: text/csv}\n"),
    BadInput("negative_timeout", ("insights, field 'query_poll_timeout_s'", "greater than 0"),
             yaml="insights:\n  query_poll_timeout_s: -5\n"),
    BadInput("unknown_refresh_mode", ("insights, field 'refresh'", "'force_async'"),
             yaml="insights:\n  refresh: sometimes\n"),
    BadInput("bad_host_url", ("projects[0] (name 'prod'), field 'host'", "absolute URL"),
             yaml="projects:\n  - {name: prod, host: us.posthog.com, project_id: 1}\n"),
    BadInput("http_to_remote_host", ("POSTHOG_HOST must use https", "posthog.example.com"),
             env={"POSTHOG_HOST": "http://posthog.example.com"}),
    BadInput("project_id_not_integer", ("POSTHOG_PROJECT_ID must be an integer or '@current'",),
             env={"POSTHOG_PROJECT_ID": "production"}),
    BadInput("yaml_project_id_not_integer",
             ("projects[0] (name 'prod'), field 'project_id'", "integer or '@current'"),
             yaml="projects:\n  - {name: prod, host: 'https://eu.posthog.com', project_id: p1}\n"),
    BadInput("missing_key_env_var",
             ("resources:posthog:config:personal_api_key", '"POSTHOG_PERSONAL_API_KEY"',
              "which is not set"),
             env={"POSTHOG_PERSONAL_API_KEY": None}, launch="posthog_groups_snapshot"),
    BadInput("missing_host_env_var",
             ("resources:posthog:config:host", '"POSTHOG_HOST"', "which is not set"),
             env={"POSTHOG_HOST": None}, launch="posthog_groups_snapshot"),
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
        config.write_text(case.yaml)
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
    # One error: no chained exception, and a single problem listed.
    assert "During handling of the above exception" not in output
    assert "The above exception was the direct cause" not in output
    if case.launch is None:
        assert output.count(CONFIG_ERROR) == 1, output
        message = output[output.index(CONFIG_ERROR) :]
        assert len(re.findall(r"^  - ", message, flags=re.MULTILINE)) <= 1, message
    else:
        assert "Error 1:" in output and "Error 2:" not in output, output[-2000:]
    assert outcomes["__requests__"] == [], "a request reached PostHog despite the bad input"


def test_the_same_harness_loads_and_launches_a_good_config(outcomes: dict[str, Any]) -> None:
    """The control case: without the mistake the same child process loads cleanly."""
    good = outcomes["good_config"]
    assert good["code"] == 0 and "Traceback" not in good["output"], good["output"][-2000:]

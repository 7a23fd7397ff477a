"""The PostHog stand-in, tested as a real subprocess over real HTTP.

Most tests use the session's stand-in (conftest ``standin``) and start with ``reset()``; they read
the seeded sizes from ``/_standin/seed`` so they hold for any start-up arguments. The stand-in's
defaults are PostHog Cloud's harsh behaviour; tests reach the kinder variants only through the
explicit config options, and only where a test is about something else.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from datetime import datetime
from typing import Any

import psutil
import pytest
import requests

from posthog_assets_tests.support import openapi as openapi_contract
from posthog_assets_tests.support.standin import Api, export_source, poll_until
from posthog_standin.__main__ import parse_args
from posthog_standin.control import host_name
from posthog_standin.server import (
    CONTROL_TOKEN_HEADER,
    StandinControl,
    StandinError,
    StandinProcess,
)

pytestmark = pytest.mark.integration

XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
STUCK = (
    "Export failed without throwing an exception. Please try to rerun this export and contact "
    "support if it fails to complete multiple times."
)


@pytest.fixture
def api(standin: StandinProcess) -> Api:
    """The session's stand-in, reset to its seed for this test."""
    standin.control.reset()
    return Api(standin)


@pytest.fixture
def main(api: Api) -> dict[str, Any]:
    """Sizes and first ids of the main project's seed (Staging's under ``"staging"``)."""
    info = api.control.seed_info()["projects"]
    return {**info[0], "staging": info[1]}


def _ts(text: str) -> float:
    """An API timestamp (ISO-8601 with ``Z``) as epoch seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _error(response: requests.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"type", "code", "detail", "attr"}, body
    return body


# ---- process, import rule, CLI --------------------------------------------------------------


def test_standin_imports_no_dagster() -> None:
    """The stand-in is a separate house: importing it must not pull in Dagster."""
    code = (
        "import sys, posthog_standin.app, posthog_standin.server, "
        "posthog_standin.__main__; "
        "bad = [m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_prints_ready_line_and_exits_cleanly_on_sigint() -> None:
    cmd = [sys.executable, "-m", "posthog_standin", "--port", "0", "--key", "phx_cli"]
    proc = subprocess.Popen(
        [*cmd, "--control-token", "fixed-token"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert set(ready) == {"url", "storage_url", "key", "project_id", "control_token"}
        assert ready["key"] == "phx_cli" and ready["project_id"] == 1
        assert ready["control_token"] == "fixed-token"
        assert ready["url"] != ready["storage_url"]
        human = proc.stdout.readline()
        assert human.startswith(f"PostHog stand-in serving {ready['url']} (project 1, key phx_cli)")
        health = requests.get(
            f"{ready['url']}/_standin/health",
            headers={CONTROL_TOKEN_HEADER: "fixed-token"},
            timeout=5,
        ).json()
        assert health == {"ok": True, "storage_url": ready["storage_url"]}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- control plane access: token, JSON only, loopback Host ----------------------------------

INTRUDER = "phx_intruder_full_scope"
#: What a web page's ``fetch(url, {method: "POST", body})`` or form sends without a preflight.
CROSS_SITE = {"Origin": "https://evil.example", "Content-Type": "text/plain;charset=UTF-8"}


def _control_url(standin: StandinProcess, path: str) -> str:
    return f"{standin.url}/_standin/{path}"


def _intruder_body() -> str:
    return json.dumps({"key": INTRUDER, "scopes": ["*"], "projects": None})


def _assert_intruder_key_absent(api: Api) -> None:
    """The control plane did not act: the key it was asked to add authenticates nothing."""
    assert api.as_key(INTRUDER).get("insights/").status_code == 401


def _assert_refused(response: requests.Response, status: int, needs: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and needs in body["error"], body


@pytest.mark.unit
def test_host_name_strips_the_port_and_rejects_malformed_headers() -> None:
    assert host_name("127.0.0.1:8000") == "127.0.0.1"
    assert host_name("LocalHost") == "localhost"
    assert host_name("[::1]:8000") == host_name("[::1]") == "::1"
    for bad in ("", "::1", "[::1]x", "localhost:", "localhost:80:80", "a:b"):
        assert host_name(bad) not in {"127.0.0.1", "localhost", "::1"}, bad
    with pytest.raises(SystemExit):
        parse_args(["--control-token", ""])


def test_control_plane_without_the_token_is_refused_and_changes_nothing(
    api: Api, standin: StandinProcess
) -> None:
    """A random token per start, needed on every control request: without it (or with a wrong
    one) nothing is added, and neither the seed (which shows the stand-in's key) nor the log
    can be read."""
    assert len(standin.control_token) >= 32
    json_only = {"Content-Type": "application/json"}
    for headers in (json_only, {**json_only, CONTROL_TOKEN_HEADER: "not-the-token"}):
        added = requests.post(
            _control_url(standin, "keys"), data=_intruder_body(), headers=headers, timeout=5
        )
        _assert_refused(added, 403, CONTROL_TOKEN_HEADER)
        for path in ("seed", "requests", "health"):
            read = requests.get(_control_url(standin, path), headers=headers, timeout=5)
            _assert_refused(read, 403, CONTROL_TOKEN_HEADER)
            assert standin.key not in read.text
    with pytest.raises(StandinError, match="403"):
        StandinControl(standin.url, token="not-the-token").add_key(INTRUDER, scopes=["*"])
    _assert_intruder_key_absent(api)


def test_cross_site_text_plain_posts_are_refused(api: Api, standin: StandinProcess) -> None:
    """What a browser sends cross-site without a preflight (text/plain, a form) never acts:
    without the token it is 403, and even with it anything but JSON is 415."""
    token = {CONTROL_TOKEN_HEADER: standin.control_token}
    form = {**CROSS_SITE, "Content-Type": "application/x-www-form-urlencoded"}
    for headers, status, needs in [
        (CROSS_SITE, 403, CONTROL_TOKEN_HEADER),
        ({**CROSS_SITE, **token}, 415, "application/json"),
        ({**form, **token}, 415, "application/json"),
        ({"Origin": "https://evil.example", **token}, 415, "application/json"),  # no type at all
    ]:
        added = requests.post(
            _control_url(standin, "keys"), data=_intruder_body(), headers=headers, timeout=5
        )
        _assert_refused(added, status, needs)
        configured = requests.post(
            _control_url(standin, "config"),
            data='{"rate_limits": false}',
            headers=headers,
            timeout=5,
        )
        _assert_refused(configured, status, needs)
        cleared = requests.delete(_control_url(standin, "faults"), headers=headers, timeout=5)
        _assert_refused(cleared, status, needs)
    _assert_intruder_key_absent(api)
    assert api.control.config()["rate_limits"] is True


def test_control_plane_answers_only_loopback_host_headers(
    api: Api, standin: StandinProcess
) -> None:
    """A DNS-rebound name (even with the token) is refused; PostHog's own routes still answer
    any Host, as PostHog does (its ALLOWED_HOSTS is ``*`` unless configured)."""
    port = urllib.parse.urlsplit(standin.url).port
    headers = {CONTROL_TOKEN_HEADER: standin.control_token, "Content-Type": "application/json"}
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}"):
        seed = requests.get(
            _control_url(standin, "seed"), headers={**headers, "Host": host}, timeout=5
        )
        _assert_refused(seed, 403, "127.0.0.1")
        added = requests.post(
            _control_url(standin, "keys"),
            data=_intruder_body(),
            headers={**headers, "Host": host},
            timeout=5,
        )
        _assert_refused(added, 403, "127.0.0.1")
    _assert_intruder_key_absent(api)
    for host in ("127.0.0.1", f"localhost:{port}", f"[::1]:{port}"):
        health = requests.get(
            _control_url(standin, "health"), headers={**headers, "Host": host}, timeout=5
        )
        assert health.status_code == 200, (host, health.text)
    foreign = api.get("insights/", params={"limit": 1}, headers={"Host": "evil.example"})
    assert foreign.status_code == 200


def test_token_json_and_loopback_host_are_let_through(api: Api, standin: StandinProcess) -> None:
    """The right token, a JSON body (charset allowed) and a loopback Host: the key is added."""
    port = urllib.parse.urlsplit(standin.url).port
    added = requests.post(
        _control_url(standin, "keys"),
        data=_intruder_body(),
        headers={
            CONTROL_TOKEN_HEADER: standin.control_token,
            "Content-Type": "application/json; charset=utf-8",
            "Host": f"localhost:{port}",
        },
        timeout=5,
    )
    assert added.status_code == 201, added.text
    assert api.as_key(INTRUDER).get("insights/").status_code == 200
    assert api.control.seed_info()["key"] == standin.key


# ---- routing, auth, scopes, projects ---------------------------------------------------------


def test_both_prefixes_serve_the_same_and_environments_carries_sunset(api: Api) -> None:
    """Identical behaviour, optional trailing slash; the alias is deprecated: Deprecation,
    Sunset and a Link to the same path and query under /api/projects/."""
    params = {"limit": 3, "order": "id", "basic": "true"}
    projects = api.get("insights/", params=params)
    environments = api.get("insights", prefix="environments", params=params)
    assert projects.status_code == environments.status_code == 200
    ids = [r["id"] for r in projects.json()["results"]]
    assert ids == [r["id"] for r in environments.json()["results"]] == [1, 2, 3]
    for header in ("Sunset", "Deprecation", "Link"):
        assert header not in projects.headers
    assert environments.headers["Sunset"] == "Fri, 31 Jul 2026 00:00:00 GMT"
    assert environments.headers["Deprecation"] == "true"
    assert environments.headers["Link"] == (
        f"</api/projects/{api.project_id}/insights?limit=3&order=id&basic=true>; "
        'rel="successor-version"'
    )
    slash = api.get(
        "groups/find/", prefix="environments", params={"group_type_index": 0, "group_key": "x"}
    )
    assert slash.status_code == 404  # errors carry the headers too
    assert slash.headers["Link"] == (
        f"</api/projects/{api.project_id}/groups/find/?group_type_index=0&group_key=x>; "
        'rel="successor-version"'
    )
    # groups_types exists on the projects route only (as in the Nov-2025 OpenAPI).
    assert api.get("groups_types/").status_code == 200
    assert api.get("groups_types/", prefix="environments").status_code == 404
    api.control.configure(environments_sunset=False)
    plain = api.get("insights/", prefix="environments", params={"basic": "true"}).headers
    assert not {"Sunset", "Deprecation", "Link"} & set(plain)


def test_authentication_errors(api: Api) -> None:
    """Where the key is looked for, and the 401 bodies and header."""
    url = api.url("insights/")
    missing = requests.get(url, timeout=10)
    assert missing.status_code == 401
    assert _error(missing) == {
        "type": "authentication_error",
        "code": "not_authenticated",
        "detail": "Authentication credentials were not provided.",
        "attr": None,
    }
    assert missing.headers["WWW-Authenticate"].startswith('Bearer resource_metadata="')
    bad = requests.get(url, headers={"Authorization": "Bearer phx_wrong"}, timeout=10)
    assert bad.status_code == 401
    assert _error(bad)["code"] == "authentication_failed"
    assert _error(bad)["detail"] == (
        "Personal API key found in request Authorization header is invalid."
    )
    in_query = requests.get(url, params={"personal_api_key": api.key}, timeout=10)
    assert in_query.status_code == 200
    bad_query = requests.get(url, params={"personal_api_key": "phx_nope"}, timeout=10)
    assert _error(bad_query)["detail"] == (
        "Personal API key found in request query string is invalid."
    )
    in_body = requests.post(
        api.url("exports/"),
        json={"personal_api_key": api.key, "export_format": "image/png", "insight": 1},
        timeout=10,
    )
    assert in_body.status_code == 201
    log = api.control.requests_log()
    assert api.key not in json.dumps(log)  # key values are never logged
    assert [e["authorization"] for e in log] == [False, True, False, False, False]
    assert log[-1]["body"]["personal_api_key"] == "<redacted>"


def test_scope_errors_and_write_implies_read(api: Api) -> None:
    """Missing scope texts; ``:write`` satisfies ``:read``; exports also need target scopes."""
    api.control.add_key("phx_insights_only", ["insight:read"])
    limited = api.as_key("phx_insights_only")
    denied = limited.get("exports/")
    assert denied.status_code == 403
    assert _error(denied) == {
        "type": "authentication_error",
        "code": "permission_denied",
        "detail": "API key missing required scope 'export:read'",
        "attr": None,
    }
    assert limited.get("insights/").status_code == 200
    api.control.add_key("phx_export_writer", ["export:write"])
    writer = api.as_key("phx_export_writer")
    assert writer.get("exports/").status_code == 200  # write implies read
    create = writer.post("exports/", json={"export_format": "image/png", "insight": 1})
    assert _error(create)["detail"] == "API key missing required scope 'insight:read'"
    api.control.add_key("phx_everything", [])
    assert api.as_key("phx_everything").get("groups_types/").status_code == 200


def test_project_resolution(api: Api) -> None:
    """Integers, @current, other strings 404, restricted keys 403."""
    main_id, staging_id = api.project_id, api.project_id + 1
    assert api.get("", project="@current").json()["id"] == main_id
    for raw in ("abc", "999999"):
        response = api.get("insights/", project=raw)
        assert response.status_code == 404
        assert _error(response)["detail"] == "Project not found."
    assert api.get("", project=staging_id).json()["name"] == "Staging"
    listing = api.session.get(f"{api.base}/api/projects/", timeout=10).json()
    assert [p["id"] for p in listing["results"]] == [main_id, staging_id]
    assert listing["count"] == 2

    api.control.add_key("phx_main_only", ["*"], projects=[main_id], current_project=main_id)
    main_only = api.as_key("phx_main_only")
    denied = main_only.get("insights/", project=staging_id)
    assert denied.status_code == 403
    assert _error(denied)["detail"] == (
        f"API key does not have access to the requested project: ID {staging_id}."
    )
    assert main_only.session.get(f"{api.base}/api/projects/", timeout=10).json()["count"] == 1
    api.control.add_key(
        "phx_outsider", ["*"], user_projects=[staging_id], current_project=staging_id
    )
    outsider = api.as_key("phx_outsider")
    assert _error(outsider.get("insights/", project=main_id))["detail"] == (
        "You don't have access to the project."
    )
    assert outsider.get("", project="@current").json()["id"] == staging_id


def test_limit_offset_pages_and_absolute_next_urls(api: Api, main: dict[str, Any]) -> None:
    """Default 100, absolute next/previous keeping other params, sorted like DRF."""
    total = main["insights"]
    limit = max(7, -(-total // 4))  # four or five pages whatever the seed size
    listing = f"{api.base}/api/projects/{api.project_id}/insights/"
    seen: list[int] = []
    previous_links: list[str | None] = []
    url: str | None = f"{listing}?basic=true&limit={limit}&order=id"
    while url:
        body = api.session.get(url, timeout=10).json()
        assert body["count"] == total
        seen += [r["id"] for r in body["results"]]
        previous_links.append(body["previous"])
        url = body["next"]
        if url:
            assert url.startswith(f"{listing}?basic=true&limit={limit}&offset=")
            assert url.endswith("&order=id")
    assert seen == list(range(1, total + 1)) and len(previous_links) == -(-total // limit)
    assert previous_links[0] is None
    assert previous_links[1] == f"{listing}?basic=true&limit={limit}&order=id"
    assert previous_links[2] == f"{listing}?basic=true&limit={limit}&offset={limit}&order=id"
    default = api.get("insights/", params={"basic": "true", "limit": "zero", "offset": "-3"})
    assert len(default.json()["results"]) == min(100, total)  # bad limit -> 100, bad offset -> 0
    assert default.json()["previous"] is None


# ---- groups -----------------------------------------------------------------------------------


def _walk(session: requests.Session, url: str) -> tuple[list[dict[str, Any]], int]:
    rows: list[dict[str, Any]] = []
    pages = 0
    next_url: str | None = url
    while next_url:
        body = session.get(next_url, timeout=10).json()
        assert "count" not in body
        rows += body["results"]
        next_url = body["next"]
        pages += 1
    return rows, pages


def test_groups_cursor_pagination_without_repeats_or_misses(api: Api, main: dict[str, Any]) -> None:
    """100 per page, newest first, base64 cursor, no repeats or misses (the
    session's seed has about a thousand groups per type)."""
    n = main["groups"]
    assert n > 300, "needs several pages of groups"
    rows, pages = _walk(api.session, api.url("groups/?group_type_index=1"))
    keys = [r["group_key"] for r in rows]
    assert pages == -(-n // 100) and len(keys) == n == len(set(keys))
    assert keys == [f"company-{j}" for j in range(n)]
    created = [r["created_at"] for r in rows]
    assert created == sorted(created, reverse=True) and len(set(created)) == n

    first = api.get("groups/", params={"group_type_index": 1}).json()
    assert first["previous"] is None
    cursor = first["next"].split("cursor=")[1].split("&")[0]
    decoded = base64.b64decode(requests.utils.unquote(cursor)).decode()
    assert decoded.startswith("p=") and "2025" in decoded
    second = api.session.get(first["next"], timeout=10).json()
    back = api.session.get(second["previous"], timeout=10).json()
    assert [r["group_key"] for r in back["results"]] == [r["group_key"] for r in first["results"]]

    # A group removed mid-walk (on a page not yet fetched) is skipped; nothing repeats.
    victim = f"company-{n - 1}"
    api.control.remove_group(1, victim)
    rest, _ = _walk(api.session, second["next"])
    walked = [r["group_key"] for r in first["results"] + second["results"] + rest]
    assert len(walked) == n - 1 == len(set(walked)) and victim not in walked


def test_groups_filters_find_and_errors(api: Api, main: dict[str, Any]) -> None:
    """Required group_type_index text, invalid cursor, search, group_key, find."""
    missing = api.get("groups/")
    assert missing.status_code == 400
    assert _error(missing) == {
        "type": "validation_error",
        "code": "invalid_input",
        "detail": "You must pass ?group_type_index= in this URL. To get a list of valid group "
        "types, call /api/:project_id/groups_types/.",
        "attr": "group_type_index",
    }
    invalid = api.get("groups/", params={"group_type_index": 0, "cursor": "%%%not-base64"})
    assert invalid.status_code == 404 and _error(invalid)["detail"] == "Invalid cursor"

    by_key = api.get("groups/", params={"group_type_index": 0, "search": "ORGANIZATION-42"}).json()
    assert [r["group_key"] for r in by_key["results"]] == ["organization-42"]
    paid = api.get("groups/", params={"group_type_index": 0, "search": "enterprise"}).json()
    assert paid["results"] and all(
        r["group_properties"]["plan"] == "enterprise" for r in paid["results"]
    )
    substring = api.get("groups/", params={"group_type_index": 0, "group_key": "ion-24"}).json()
    keys = (f"organization-{j}" for j in range(main["groups"]))
    expected = [k for k in keys if "ion-24" in k][:100]
    assert [r["group_key"] for r in substring["results"]] == expected and len(expected) >= 11
    found = api.get("groups/find/", params={"group_type_index": 2, "group_key": "project-7"})
    assert found.json()["group_key"] == "project-7" and len(found.json()["notebook"]) == 8
    assert (
        api.get("groups/find/", params={"group_type_index": 2, "group_key": "x"}).status_code == 404
    )
    no_key = api.get("groups/find/", params={"group_type_index": 2})
    assert no_key.status_code == 400 and _error(no_key)["attr"] == "group_key"
    types = api.get("groups_types/").json()
    assert isinstance(types, list) and len(types) == main["group_types"]
    assert [t["group_type_index"] for t in types] == list(range(main["group_types"]))
    assert types[0]["group_type"] == "organization"


def test_group_property_counts_match_the_listed_groups(api: Api, main: dict[str, Any]) -> None:
    """Definitions keyed by index as a string; values top 20 by count; removals count."""
    rows, _ = _walk(api.session, api.url("groups/?group_type_index=0"))
    plans = Counter(r["group_properties"]["plan"] for r in rows)
    betas = sum(1 for r in rows if r["group_properties"].get("beta_tester"))
    values = api.get("groups/property_values/", params={"group_type_index": 0, "key": "plan"})
    ranked = sorted(plans.items(), key=lambda item: (-item[1], item[0]))
    assert values.json() == [{"name": p, "count": c} for p, c in ranked]
    definitions = api.get("groups/property_definitions/").json()
    assert set(definitions) == {str(t) for t in range(main["group_types"])}
    entries = {e["name"]: e["count"] for e in definitions["0"]}
    n = len(rows)
    assert n == main["groups"]
    assert entries == {"name": n, "plan": n, "industry": n, "employees": n, "beta_tester": betas}
    counts = [e["count"] for e in definitions["0"]]
    assert counts == sorted(counts, reverse=True)

    gone = rows[0]
    api.control.remove_group(0, gone["group_key"])
    plan = gone["group_properties"]["plan"]
    after = api.get("groups/property_values/", params={"group_type_index": 0, "key": "plan"})
    assert {v["name"]: v["count"] for v in after.json()}[plan] == plans[plan] - 1
    assert api.get("groups/property_definitions/").json()["0"][0]["count"] == n - 1
    find = api.get("groups/find/", params={"group_type_index": 0, "group_key": gone["group_key"]})
    assert find.status_code == 404
    names = api.get(
        "groups/property_values/", params={"group_type_index": 0, "key": "name", "value": "labs"}
    ).json()
    assert 0 < len(names) <= 20 and all("labs" in n["name"].lower() for n in names)


def test_groups_find_creates_a_notebook_once(api: Api) -> None:
    """With PostHog's CRM flag on, ``find`` creates a Notebook for the group (once) and answers
    its short id; the list with an exact key search has no such side effect."""
    params = {"group_type_index": 1, "group_key": "company-5"}
    first = api.get("groups/find/", params=params).json()
    assert re.fullmatch(r"[0-9A-Za-z]{8}", first["notebook"]), first["notebook"]
    assert api.get("groups/find/", params=params).json()["notebook"] == first["notebook"]
    other = api.get("groups/find/", params={"group_type_index": 1, "group_key": "company-6"})
    assert other.json()["notebook"] not in (None, first["notebook"])
    assert api.control.stats()["notebooks_created"] == 2
    found = api.get("groups/", params={"group_type_index": 1, "search": "COMPANY-7"}).json()
    assert [r["group_key"] for r in found["results"]] == ["company-7"]  # exact, any case
    assert api.control.stats()["notebooks_created"] == 2

    api.control.configure(crm_notebooks=False)
    quiet = api.get("groups/find/", params={"group_type_index": 1, "group_key": "company-8"})
    assert quiet.status_code == 200 and quiet.json()["notebook"] is None
    assert api.control.stats()["notebooks_created"] == 2
    api.control.reset()
    assert api.control.stats()["notebooks_created"] == 0


def test_group_property_values_is_a_bare_list_and_needs_both_params(api: Api) -> None:
    """A bare ``[{name, count}]`` list (the envelope only on request); a missing
    ``group_type_index`` or ``key`` is an unhandled KeyError: 500."""
    params = {"group_type_index": 0, "key": "industry"}
    bare = api.get("groups/property_values/", params=params).json()
    assert isinstance(bare, list) and bare and all(set(v) == {"name", "count"} for v in bare)
    for broken in ({"group_type_index": 0}, {"key": "plan"}, {"group_type_index": "x", "key": "a"}):
        response = api.get("groups/property_values/", params=broken)
        assert response.status_code == 500, broken
        assert _error(response) == {
            "type": "server_error",
            "code": "error",
            "detail": "A server error occurred.",
            "attr": None,
        }
    api.control.configure(property_values_envelope=True)
    wrapped = api.get("groups/property_values/", params=params).json()
    assert wrapped == {"results": bare, "refreshing": False}


# ---- exports ----------------------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, tag = struct.unpack(">I4s", data[8:16])
    assert tag == b"IHDR" and length == 13
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    return struct.unpack(">II", data[16:24])


def test_export_formats_finish_before_the_post_returns(api: Api) -> None:
    """CSV/PNG/XLSX rendered before the POST answers, with computed fields and content (served
    directly here: the redirect to storage has its own test)."""
    api.control.configure(content_redirect=False)
    csv_export = api.tabular_export("text/csv", 2, expires_after="2030-01-01T00:00:00Z")
    assert csv_export["has_content"] is True and csv_export["exception"] is None
    name = api.get("insights/2/", params={"basic": "true"}).json()["name"]
    assert csv_export["filename"].startswith(f"export-{name.lower().replace(' ', '-')}-")
    assert csv_export["filename"].endswith(".csv") and csv_export["created_at"].endswith("Z")
    assert csv_export["expires_after"].endswith("T00:00:00Z")
    assert csv_export["expires_after"] != "2030-01-01T00:00:00Z"  # client value ignored
    content = api.get(f"exports/{csv_export['id']}/content/", params={"download": "true"})
    assert content.status_code == 200
    assert content.headers["Content-Type"] == "text/csv"
    assert content.headers["Cache-Control"] == "max-age=86400"
    assert content.headers["Content-Disposition"] == (
        f'attachment; filename="{csv_export["filename"]}"'
    )
    lines = content.text.splitlines()
    insight = api.get("insights/2/", params={"refresh": "blocking"}).json()
    # PostHog's exporter: one row per series, named by its action when the query breaks down,
    # a column per breakdown property and one per date label (csv_exporter.py)
    first = insight["result"][0]
    assert lines[0] == ",".join(["series", "$current_url", *first["labels"]])
    assert len(lines) - 1 == len(insight["result"])
    assert first["label"].endswith(f" - {first['breakdown_value']}")
    cells = [first["action"]["name"], first["breakdown_value"], *map(str, first["data"])]
    assert lines[1] == ",".join(cells)
    again = api.get(f"exports/{csv_export['id']}/content/")
    assert hashlib.sha256(again.content).digest() == hashlib.sha256(content.content).digest()

    png = api.export(
        export_format="image/png", insight=2, export_context={"filename": "Weekly KPI"}
    )
    assert png["filename"].startswith("weekly-kpi-") and png["filename"].endswith(".png")
    png_bytes = api.get(f"exports/{png['id']}/content/").content
    assert _png_size(png_bytes) == (320, 200)
    assert api.get(f"exports/{png['id']}/content/").content == png_bytes

    from openpyxl import load_workbook

    xlsx = api.tabular_export(XLSX, 2)
    sheet = load_workbook(io.BytesIO(api.get(f"exports/{xlsx['id']}/content/").content)).active
    cells = list(sheet.iter_rows(values_only=True))
    assert ",".join(map(str, cells[0])) == lines[0] and len(cells) == len(lines)
    assert ",".join(str(c) for c in cells[1]) == lines[1]

    board = api.export(export_format="image/png", dashboard=1)
    assert board["has_content"] and board["filename"].startswith("export-growth-")
    empty = api.tabular_export("text/csv", 23)  # a seeded insight with no series
    assert api.get(f"exports/{empty['id']}/content/").text == (
        "error\r\nNo data available or unable to format for export.\r\n"
    )


def test_export_validation_errors(api: Api, main: dict[str, Any]) -> None:
    """DRF codes and attrs, the non-field error, team ownership."""
    cases = [
        ({"insight": 1}, "required", "export_format", "This field is required."),
        (
            {"insight": 1, "export_format": "application/x-ndjson"},
            "invalid_choice",
            "export_format",
            '"application/x-ndjson" is not a valid choice.',
        ),
        (
            {"export_format": "text/csv"},
            "invalid_input",
            None,
            "Either dashboard, insight or export_context is required for an export.",
        ),
        (
            {"export_format": "text/csv", "insight": 424242},
            "does_not_exist",
            "insight",
            'Invalid pk "424242" - object does not exist.',
        ),
        (
            {"export_format": "text/csv", "insight": main["staging"]["first_insight_id"]},
            "invalid_input",
            "insight",
            "This insight does not belong to your team.",
        ),
        (
            {"export_format": "video/mp4", "export_context": {"mode": "video"}},
            "invalid_input",
            None,
            "Video export supports session recordings only.",
        ),
    ]
    for body, code, attr, detail in cases:
        response = api.post("exports/", json=body)
        assert response.status_code == 400, body
        assert _error(response) == {
            "type": "validation_error",
            "code": code,
            "detail": detail,
            "attr": attr,
        }, body


def test_export_delayed_then_polled(api: Api) -> None:
    """With the older non-blocking POST (``export_post_held=False``) and a render time, the POST
    returns pending and polling sees it finish; video is always like that."""
    api.control.configure(export_delay_s=0.6, export_post_held=False)
    created = api.tabular_export("text/csv", 1)
    assert created["has_content"] is False and created["exception"] is None
    assert api.get(f"exports/{created['id']}/content/").status_code == 404
    done = poll_until(
        lambda: api.get(f"exports/{created['id']}/").json(), lambda e: e["has_content"]
    )
    assert done["exception"] is None
    assert api.get(f"exports/{created['id']}/content/").status_code == 200
    api.control.configure(export_delay_by_format={"video/mp4": 0.3})
    video = api.export(
        export_format="video/mp4",
        export_context={"session_recording_id": "0195abc", "duration": 5, "mode": "video"},
    )
    assert video["has_content"] is False
    poll_until(lambda: api.get(f"exports/{video['id']}/").json(), lambda e: e["has_content"])
    data = api.get(f"exports/{video['id']}/content/").content
    assert data[4:8] == b"ftyp"


def test_export_failures_pdf_and_injected(api: Api) -> None:
    """Failures set ``exception`` and leave ``has_content`` false, content 404s."""
    pdf = api.export(export_format="application/pdf", insight=1)
    assert pdf["has_content"] is False
    assert pdf["exception"] == "Export to format application/pdf is not supported for insights"
    assert api.get(f"exports/{pdf['id']}/content/").status_code == 404
    api.control.configure(export_fail_next={"count": 1, "exception": "Query timed out"})
    failed = api.tabular_export("text/csv", 1)
    assert (failed["has_content"], failed["exception"]) == (False, "Query timed out")
    assert api.tabular_export("text/csv", 1)["has_content"] is True
    dashboard_csv = api.export(export_format="text/csv", dashboard=1)
    assert dashboard_csv["has_content"] is False and "dashboard" in dashboard_csv["exception"]


def test_export_stuck_expired_others_and_list(api: Api) -> None:
    """Stuck text, own exports only / newest first / filters, expiry 404s."""
    api.control.configure(export_delay_s=10_000, stuck_threshold_s=0.5, export_post_held=False)
    stuck = api.export(export_format="image/png", insight=1)
    assert stuck["exception"] is None
    time.sleep(0.6)
    again = api.get(f"exports/{stuck['id']}/").json()
    assert (again["has_content"], again["exception"]) == (False, STUCK)
    api.control.configure(export_delay_s=0)
    csv_ids = [api.tabular_export("text/csv", i)["id"] for i in (1, 2, 3)]
    path_export = api.export(
        export_format="text/csv", export_context={"path": "/api/projects/1/insights/4/"}
    )
    listing = api.get("exports/").json()
    assert [e["id"] for e in listing["results"]] == [path_export["id"], *csv_ids[::-1], stuck["id"]]
    by_format = api.get("exports/", params={"export_format": "image/png"}).json()
    assert [e["id"] for e in by_format["results"]] == [stuck["id"]]
    by_path = api.get("exports/", params={"context_path": "insights/4"}).json()
    assert [e["id"] for e in by_path["results"]] == [path_export["id"]]
    paged = api.get("exports/", params={"limit": 2, "offset": 2}).json()
    assert paged["count"] == 5 and paged["next"].endswith("limit=2&offset=4")

    api.control.add_key("phx_colleague", ["*"], user_id=2)
    colleague = api.as_key("phx_colleague")
    assert colleague.get(f"exports/{csv_ids[0]}/").status_code == 404
    assert colleague.get("exports/").json()["count"] == 0

    api.control.expire_export(csv_ids[0])
    for tail in (f"exports/{csv_ids[0]}/", f"exports/{csv_ids[0]}/content/"):
        assert api.get(tail).status_code == 404
    assert csv_ids[0] not in [e["id"] for e in api.get("exports/").json()["results"]]


def test_content_redirect_to_storage_refusing_authorization(api: Api) -> None:
    """302 to a separate origin that needs no auth and rejects a forwarded one."""
    assert api.control.config()["content_redirect"] is True  # PostHog Cloud's object storage
    export = api.tabular_export("text/csv", 3)
    redirect = api.get(
        f"exports/{export['id']}/content/", params={"download": "true"}, allow_redirects=False
    )
    assert redirect.status_code == 302
    location = redirect.headers["Location"]
    assert location.startswith(api.standin.storage_url + "/")
    plain = requests.get(location, timeout=10)
    assert plain.status_code == 200 and plain.headers["Content-Type"] == "text/csv"
    assert plain.headers["Content-Disposition"].startswith("attachment; filename=")
    assert plain.text.startswith("series,$current_url,")
    refused = requests.get(location, headers={"Authorization": f"Bearer {api.key}"}, timeout=10)
    assert refused.status_code == 400 and "Only one auth mechanism allowed" in refused.text
    followed = api.get(f"exports/{export['id']}/content/")  # requests drops auth across origins
    assert followed.status_code == 200 and followed.content == plain.content
    storage_log = [e for e in api.control.requests_log() if e["server"] == "storage"]
    assert [(e["status"], e["authorization"]) for e in storage_log] == [
        (200, False),
        (400, True),
        (200, False),
    ]
    png = api.export(export_format="image/png", insight=3)
    direct = api.get(
        f"exports/{png['id']}/content/", params={"direct": "true"}, allow_redirects=False
    )
    assert direct.status_code == 200 and _png_size(direct.content) == (320, 200)

    api.control.lose_export_content(png["id"])
    assert api.get(f"exports/{png['id']}/").json()["has_content"] is True
    assert api.get(f"exports/{png['id']}/content/").status_code == 404


def test_tabular_export_of_an_insight_needs_a_source_or_a_path(api: Api) -> None:
    """The tabular exporter reads ``export_context.source``, else ``export_context["path"]``: an
    insight alone ends failed with the KeyError text ``'path'``. A source (with or without the
    insight) or a legacy path renders rows; dashboards have no tabular form; PDF never renders."""
    for export_format, context in (("text/csv", None), (XLSX, {"filename": "rows"})):
        body: dict[str, Any] = {"export_format": export_format, "insight": 1}
        if context is not None:
            body["export_context"] = context
        failed = api.export(**body)
        assert (failed["has_content"], failed["exception"]) == (False, "'path'"), export_format
        assert api.get(f"exports/{failed['id']}/content/").status_code == 404

    by_source = api.tabular_export("text/csv", 4)
    assert by_source["has_content"] is True and by_source["exception"] is None
    expected = api.get(f"exports/{by_source['id']}/content/").text
    computed = api.get("insights/4/", params={"refresh": "blocking"}).json()["result"]
    lines = expected.splitlines()
    assert lines[0].startswith("series,$current_url,")
    assert len(lines) - 1 == len(computed)
    pid = api.project_id
    for path in (
        f"/api/projects/{pid}/insights/4/",
        f"/api/environments/{pid}/insights/4",
        f"/api/projects/{pid}/insights/4/?refresh=true&limit=100",
    ):
        by_path = api.export(export_format="text/csv", export_context={"path": path})
        assert by_path["has_content"] is True, path
        assert api.get(f"exports/{by_path['id']}/content/").text == expected, path
    elsewhere = api.export(
        export_format="text/csv", export_context={"path": f"/api/projects/{pid}/events/"}
    )
    assert elsewhere["has_content"] is False and elsewhere["exception"]

    trends = api.export(
        export_format="text/csv",
        export_context={
            "source": {"kind": "TrendsQuery", "series": [{"kind": "EventsNode", "event": "x"}]}
        },
    )
    rows = api.get(f"exports/{trends['id']}/content/").text.splitlines()
    assert rows[0].startswith("series,") and rows[1].startswith("x,")
    select = "SELECT event, toStartOfDay(timestamp) AS day, count() FROM events WHERE event = 'y'"
    hogql = api.export(
        export_format=XLSX, export_context={"source": {"kind": "HogQLQuery", "query": select}}
    )
    from openpyxl import load_workbook

    content = api.get(f"exports/{hogql['id']}/content/").content
    cells = list(load_workbook(io.BytesIO(content)).active.iter_rows(values_only=True))
    assert cells[0] == ("event", "day", "count") and cells[1][0] == "y"

    board = api.export(export_format="text/csv", dashboard=1)
    assert board["exception"] == (
        "Exporting a dashboard to CSV or Excel is not supported. Export its insights instead."
    )
    insight = api.get("insights/4/", params={"basic": "true"}).json()
    pdf = api.export(
        export_format="application/pdf",
        insight=4,
        export_context={"source": export_source(insight)},
    )
    assert pdf["exception"] == "Export to format application/pdf is not supported for insights"

    api.control.add_key("phx_no_query", ["export:write", "insight:read"])
    denied = api.as_key("phx_no_query").post(
        "exports/",
        json={
            "export_format": "text/csv",
            "insight": 4,
            "export_context": {"source": export_source(insight)},
        },
    )
    assert denied.status_code == 403
    assert _error(denied)["detail"] == "API key missing required scope 'query:read'"


def test_export_post_is_held_until_rendered(api: Api) -> None:
    """PNG/CSV/XLSX/PDF POSTs answer when rendering ends; the row is listed (pending) from the
    start, and a client that gave up finds it finished later. Render time per target beats
    per format beats the default. Video formats answer at once."""
    api.control.configure(
        export_delay_s=0.3,
        export_delay_by_format={"image/png": 1.5},
        export_delay_by_target={"insight:2": 0.4},
    )
    with pytest.raises(requests.exceptions.ReadTimeout):
        api.post("exports/", json={"export_format": "image/png", "insight": 1}, timeout=(5, 0.5))
    listing = api.get("exports/").json()
    assert listing["count"] == 1
    pending = listing["results"][0]
    assert (pending["has_content"], pending["exception"]) == (False, None)
    assert api.get(f"exports/{pending['id']}/").json()["has_content"] is False
    done = poll_until(
        lambda: api.get(f"exports/{pending['id']}/").json(), lambda e: e["has_content"]
    )
    assert done["exception"] is None
    assert _png_size(api.get(f"exports/{done['id']}/content/").content) == (320, 200)

    seen: dict[str, Any] = {}

    def look_meanwhile() -> None:
        time.sleep(0.15)
        seen["listing"] = Api(api.standin).get("exports/").json()

    watcher = threading.Thread(target=look_meanwhile)
    watcher.start()
    started = time.monotonic()
    held = api.export(export_format="image/png", insight=2)  # the target's 0.4 s wins
    elapsed = time.monotonic() - started
    watcher.join()
    assert held["has_content"] is True and held["exception"] is None
    assert 0.4 <= elapsed < 1.4, elapsed
    during = {e["id"]: e for e in seen["listing"]["results"]}
    assert during[held["id"]]["has_content"] is False

    insight = api.get("insights/3/", params={"basic": "true"}).json()
    for export_format in ("text/csv", "application/pdf"):  # the default 0.3 s
        started = time.monotonic()
        finished = api.export(
            export_format=export_format,
            insight=3,
            export_context={"source": export_source(insight)},
        )
        assert time.monotonic() - started >= 0.3, export_format
        assert finished["has_content"] is (export_format == "text/csv")
        assert (finished["exception"] is None) is (export_format == "text/csv")

    started = time.monotonic()
    video = api.export(
        export_format="video/mp4",
        export_context={"session_recording_id": "0195abc", "duration": 5, "mode": "video"},
    )
    assert time.monotonic() - started < 1.0 and video["has_content"] is False


def test_export_content_redirect_and_not_ready_statuses(api: Api) -> None:
    """Content is a 302 to object storage by default; before content exists it is a 404, or,
    in the version that says so, 425 ``export_not_ready`` (and 400 ``export_failed`` after a
    failure)."""
    config = api.control.config()
    assert config["content_redirect"] is True and config["content_not_ready_status"] == 404
    api.control.configure(
        export_post_held=False,
        export_delay_s=30,
        export_delay_by_format={"application/pdf": 0},
        export_delay_by_target={"insight:2": 0},
    )
    pending = api.export(export_format="image/png", insight=1)
    failed = api.export(export_format="application/pdf", insight=1)
    ready = api.export(export_format="image/png", insight=2)
    assert pending["has_content"] is False and failed["exception"] and ready["has_content"]
    for export in (pending, failed):
        missing = api.get(f"exports/{export['id']}/content/")
        assert missing.status_code == 404 and _error(missing)["code"] == "not_found"
    redirect = api.get(f"exports/{ready['id']}/content/", allow_redirects=False)
    assert redirect.status_code == 302
    assert redirect.headers["Location"].startswith(api.standin.storage_url)

    api.control.configure(content_not_ready_status=425)
    early = api.get(f"exports/{pending['id']}/content/")
    assert early.status_code == 425
    assert {k: _error(early)[k] for k in ("type", "code", "attr")} == {
        "type": "invalid_request",
        "code": "export_not_ready",
        "attr": None,
    }
    broken = api.get(f"exports/{failed['id']}/content/")
    assert broken.status_code == 400
    assert {k: _error(broken)[k] for k in ("type", "code", "attr")} == {
        "type": "validation_error",
        "code": "export_failed",
        "attr": None,
    }
    assert api.get(f"exports/{ready['id']}/content/", allow_redirects=False).status_code == 302
    with pytest.raises(StandinError):
        api.control.configure(content_not_ready_status=409)


def test_export_and_basic_insight_serializer_details(api: Api) -> None:
    """Exports carry ``user_access_level``; ``basic=true`` reports the insight row's own old
    ``last_refresh`` column, not the query cache's time."""
    export = api.export(export_format="image/png", insight=1)
    assert export["user_access_level"] == "editor"
    assert api.get(f"exports/{export['id']}/").json()["user_access_level"] == "editor"
    assert api.get("exports/").json()["results"][0]["user_access_level"] == "editor"

    computed = api.get("insights/2/", params={"refresh": "blocking"}).json()
    assert api.get("insights/2/").json()["last_refresh"] == computed["last_refresh"]
    basic = api.get("insights/2/", params={"basic": "true"}).json()
    assert "result" not in basic and basic["last_refresh"]
    assert _ts(basic["last_refresh"]) < _ts(computed["last_refresh"]) - 86400
    listed = api.get("insights/", params={"basic": "true", "order": "id", "limit": 6}).json()
    by_id = {r["id"]: r for r in listed["results"]}
    assert by_id[2]["last_refresh"] == basic["last_refresh"]
    assert by_id[6]["last_refresh"] is None  # never refreshed by the old caching code


def test_big_csv_streams_with_flat_server_memory(api: Api) -> None:
    """A 5,000,000-row CSV (~500 MB): exact Content-Length, every row arrives, and the
    stand-in's RSS stays flat while it generates and sends it."""
    rows = 5_000_000
    api.control.configure(csv_rows=rows)
    export = api.tabular_export("text/csv", 1)
    server = psutil.Process(api.standin.pid)
    baseline = server.memory_info().rss
    peak = baseline
    received = 0
    newlines = 0
    with api.get(f"exports/{export['id']}/content/", stream=True) as response:
        length = int(response.headers["Content-Length"])
        for k, chunk in enumerate(response.iter_content(chunk_size=1 << 20)):
            received += len(chunk)
            newlines += chunk.count(b"\n")
            if k % 8 == 0:
                peak = max(peak, server.memory_info().rss)
    assert received == length > 400_000_000
    assert newlines == rows + 1
    assert peak - baseline < 64 * 1024 * 1024, (baseline, peak)


# ---- insights -------------------------------------------------------------------------------


def test_refresh_modes_on_a_cold_cache(api: Api) -> None:
    """Cache-only by default, unknown values are force_cache, no 400."""
    for params in ({}, {"refresh": "force_cache"}, {"refresh": "bogus"}, {"refresh": "false"},
                   {"refresh": "async_except_on_cache_miss"}):  # fmt: skip
        body = api.get("insights/5/", params=params)
        assert body.status_code == 200, params
        data = body.json()
        assert (data["result"], data["is_cached"], data["last_refresh"]) == (None, False, None)
        assert data["query_status"] is None
    computed = api.get("insights/5/", params={"refresh": "true"}).json()
    assert computed["is_cached"] is False and computed["result"][0]["label"]
    assert computed["last_refresh"] and computed["cache_target_age"] > computed["last_refresh"]
    cached = api.get("insights/5/").json()
    assert cached["is_cached"] is True and cached["result"] == computed["result"]
    assert cached["last_refresh"] == computed["last_refresh"]
    fresh_blocking = api.get("insights/5/", params={"refresh": "blocking"}).json()
    assert fresh_blocking["is_cached"] is True  # fresh cache: blocking does not recompute
    forced = api.get("insights/5/", params={"refresh": "force_blocking"}).json()
    assert forced["is_cached"] is False and forced["last_refresh"] > computed["last_refresh"]


#: The refresh table as (result present?, is_cached, background job attached?) per cache state.
REFRESH_TABLE: dict[str, dict[str, tuple[bool, bool, bool]]] = {
    "force_cache": {"cold": (False, False, False), "fresh": (True, True, False),
                    "stale": (True, True, False)},
    "blocking": {"cold": (True, False, False), "fresh": (True, True, False),
                 "stale": (True, False, False)},
    "async": {"cold": (False, False, True), "fresh": (True, True, False),
              "stale": (True, True, True)},
    "lazy_async": {"cold": (False, False, True), "fresh": (True, True, False),
                   "stale": (True, True, True)},
    "force_blocking": {"cold": (True, False, False), "fresh": (True, False, False),
                       "stale": (True, False, False)},
    "force_async": {"cold": (False, False, True), "fresh": (False, False, True),
                    "stale": (False, False, True)},
}  # fmt: skip


@pytest.mark.parametrize("mode", list(REFRESH_TABLE))
def test_refresh_mode_table(api: Api, mode: str) -> None:
    """Each mode on a cold, a fresh and a stale cache (one insight per cache state)."""
    for insight_id, state in ((2, "cold"), (3, "fresh"), (4, "stale")):
        api.control.set_insight_cache(insight_id, state)
        body = api.get(f"insights/{insight_id}/", params={"refresh": mode}).json()
        has_result, is_cached, job = REFRESH_TABLE[mode][state]
        assert (body["result"] is not None, body["is_cached"]) == (has_result, is_cached), state
        assert (body["last_refresh"] is not None) == has_result, state
        status = body["query_status"]
        assert (status is not None) == job, state
        if job:
            assert status["complete"] is False and status["query_async"] is True
            assert status["id"] == body["filters_hash"] and status["insight_id"] == insight_id


def test_async_refresh_and_query_polling(api: Api) -> None:
    """Async job, 202 → 200 on /query/:id/, then a warm cache."""
    # long enough that a loaded CI machine still sees the 202 before the job completes
    api.control.configure(async_delay_s=3.0)
    started = api.get("insights/6/", params={"refresh": "async"}).json()
    status = started["query_status"]
    assert started["result"] is None and started["last_refresh"] is None
    assert status["id"].startswith("cache_") and status["id"] == started["filters_hash"]
    assert (status["complete"], status["query_async"], status["error"]) == (False, True, False)
    poll = api.get(f"query/{status['id']}/")
    assert poll.status_code == 202 and poll.json()["query_status"]["complete"] is False
    openapi_contract.validate_component("QueryStatusResponse", poll.json())
    done = poll_until(
        lambda: api.get(f"query/{status['id']}/"), lambda r: r.status_code != 202, timeout=15
    )
    assert done.status_code == 200
    final = done.json()["query_status"]
    assert final["complete"] is True and final["results"]["results"][0]["data"]
    warm = api.get("insights/6/").json()
    assert warm["is_cached"] is True and warm["query_status"] is None
    assert warm["result"] == final["results"]["results"]

    again = api.get("insights/6/", params={"refresh": "force_async"}).json()
    assert again["result"] is None and again["last_refresh"] is None
    assert again["query_status"]["complete"] is False
    assert api.get("query/cache_unknown/").status_code == 404


def test_stale_and_lazy_cache_states(api: Api) -> None:
    """Stale results are served by force_cache, refreshed by blocking, async and lazy."""
    api.control.set_insight_cache(7, "stale")
    stale = api.get("insights/7/").json()
    assert stale["is_cached"] is True and stale["result"] and stale["query_status"] is None
    async_stale = api.get("insights/7/", params={"refresh": "async"}).json()
    assert async_stale["is_cached"] is True and async_stale["query_status"]["complete"] is False
    daily = next(  # lazy thresholds differ from the default ones for daily insights only
        i
        for i in range(5, 40)
        if api.get(f"insights/{i}/").json()["query"]["source"]["interval"] == "day"
    )
    api.control.set_insight_cache(daily, "stale_soft")  # stale, but fresh by lazy thresholds
    lazy = api.get(f"insights/{daily}/", params={"refresh": "lazy_async"}).json()
    assert lazy["is_cached"] is True and lazy["query_status"] is None
    api.control.set_insight_cache(daily, "stale")
    lazy_stale = api.get(f"insights/{daily}/", params={"refresh": "lazy_async"}).json()
    assert lazy_stale["query_status"]["complete"] is False
    api.control.set_insight_cache(9, "stale")
    blocking = api.get("insights/9/", params={"refresh": "blocking"}).json()
    assert blocking["is_cached"] is False
    api.control.set_insight_cache(None, "fresh")
    page = api.get("insights/", params={"limit": 5}).json()
    assert all(r["is_cached"] and r["result"] is not None for r in page["results"])


def test_failing_and_limited_queries(api: Api) -> None:
    """/query/:id/ is 400 for an exposed error, 500 for a hidden one (a final answer); a blocking
    calculation that crashes or hits the concurrency limit is an HTTP 200 with ``result: null``
    and an error status, while a HogQL user error stays a 400."""
    api.control.configure(
        async_delay_s=0.1,
        query_fail_insights={"10": "Unknown table events_v2"},
        query_crash_insights=[11],
        concurrency_limit_insights=[12],
    )
    job = api.get("insights/10/", params={"refresh": "async"}).json()["query_status"]
    failed = poll_until(lambda: api.get(f"query/{job['id']}/"), lambda r: r.status_code != 202)
    assert failed.status_code == 400
    assert failed.json()["query_status"]["error_message"] == "Unknown table events_v2"
    miss = api.get("insights/10/").json()  # cache-only: a bare miss, no job status
    assert miss["result"] is None and miss["query_status"] is None
    blocking = api.get("insights/10/", params={"refresh": "blocking"})
    assert blocking.status_code == 400 and _error(blocking)["detail"] == "Unknown table events_v2"

    crash = api.get("insights/11/", params={"refresh": "async"}).json()["query_status"]
    crashed = poll_until(lambda: api.get(f"query/{crash['id']}/"), lambda r: r.status_code != 202)
    assert crashed.status_code == 500 and crashed.json()["query_status"]["error_message"] is None
    assert api.get(f"query/{crash['id']}/").status_code == 500  # and it stays so

    crash_blocking = api.get("insights/11/", params={"refresh": "blocking"})
    assert crash_blocking.status_code == 200
    body = crash_blocking.json()
    assert (body["result"], body["last_refresh"], body["is_cached"]) == (None, None, False)
    status = body["query_status"]
    assert status["error"] is True and status["error_message"]
    assert status["id"] is None and status["insight_id"] == 11

    before = time.time()
    limited = api.get("insights/12/", params={"refresh": "blocking"})
    assert limited.status_code == 200
    body = limited.json()
    assert body["result"] is None
    assert body["query_status"]["error"] is True
    assert body["query_status"]["error_message"] == "concurrency_limit_exceeded"
    assert body["query_status"]["id"] is None
    assert (
        before - 1 <= _ts(body["last_refresh"]) <= time.time() + 1
    )  # "now", although nothing was computed
    tagged = api.get(
        "insights/12/", params={"refresh": "force_blocking", "client_query_id": "q-123"}
    ).json()
    assert tagged["query_status"]["id"] == "q-123"
    page = {"order": "id", "limit": 3, "offset": 10, "refresh": "blocking"}
    listing = api.get("insights/", params=page)
    assert listing.status_code == 200  # crashes and limits do not fail the page...
    by_id = {r["id"]: r for r in listing.json()["results"]}
    assert by_id[11]["query_status"]["error"] is True and by_id[11]["filters_hash"] is None
    assert by_id[12]["query_status"]["error_message"] == "concurrency_limit_exceeded"
    assert by_id[13]["result"] and by_id[13]["query_status"] is None
    failing = api.get("insights/", params={**page, "offset": 9})
    assert failing.status_code == 400  # ...but an exposed query error (insight 10) does


def test_insight_lookup_filters_and_formats(api: Api, main: dict[str, Any]) -> None:
    """Short_id, basic, filters, DELETE 405, format=csv."""
    by_id = api.get("insights/4/").json()
    assert api.get(f"insights/{by_id['short_id']}/").json()["id"] == 4
    assert len(by_id["short_id"]) == 8
    assert api.get("insights/", params={"short_id": by_id["short_id"]}).json()["count"] == 1
    staging = main["staging"]["first_insight_id"]
    assert api.get(f"insights/{staging}/").status_code == 404  # Staging's, wrong project
    assert api.get(f"insights/{staging}/", project=api.project_id + 1).status_code == 200
    basic = api.get("insights/", params={"basic": "true", "limit": 2}).json()["results"][0]
    assert "result" not in basic and basic["short_id"]

    def listed(**params: str) -> dict[str, Any]:
        return api.get("insights/", params={"basic": "true", **params}).json()

    for flag in ("saved", "favorited"):
        yes, no = listed(**{flag: "true"}), listed(**{flag: "false"})
        assert 0 < yes["count"] < main["insights"]
        assert yes["count"] + no["count"] == main["insights"]
        assert all(r[flag] for r in yes["results"]) and not any(r[flag] for r in no["results"])
    mine, theirs = listed(created_by="[2,3]"), listed(created_by="[1]")
    assert mine["count"] + theirs["count"] == main["insights"]
    assert {r["created_by"]["id"] for r in mine["results"]} == {2, 3}
    search = api.get("insights/", params={"search": "SIGNUPS", "basic": "true"}).json()
    assert search["count"] > 0 and all("signups" in r["name"].lower() for r in search["results"])
    deleted = api.session.delete(api.url("insights/4/"), timeout=10)
    assert deleted.status_code == 405 and _error(deleted)["code"] == "method_not_allowed"
    csv_text = api.get("insights/4/", params={"format": "csv", "refresh": "blocking"})
    assert csv_text.headers["Content-Type"] == "text/csv; charset=utf-8"
    header, row, *rest = csv_text.text.splitlines()
    assert rest == [] and header.split(",") == sorted(header.split(","))
    assert "result.0.data.0" in header.split(",") and "id" in header.split(",")


def test_seeded_insight_kinds(api: Api, main: dict[str, Any]) -> None:
    """Besides TrendsQuery insights the seed has legacy-filters ones (answered with the query
    PostHog derives from them, or by an older PostHog with no query), HogQL ones (DataTableNode:
    row lists, columns, types) and empty ones (no query, no filters); every path that reads
    results copes with all of them."""
    kinds = main["insight_ids_by_kind"]
    assert kinds["legacy"][:2] == [8, 18] and kinds["hogql"][:2] == [10, 20]
    assert kinds["empty"][0] == 40 and kinds["trends"][:7] == list(range(1, 8))
    assert api.control.seed_info()["insight_kinds"]["empty"] == "i % 40 == 39"
    listing = api.get("insights/", params={"order": "id", "limit": 40, "refresh": "blocking"})
    assert listing.status_code == 200
    by_id = {r["id"]: r for r in listing.json()["results"]}
    for i in range(1, 8):
        assert by_id[i]["query"]["kind"] == "InsightVizNode", i
        assert by_id[i]["query"]["source"]["kind"] == "TrendsQuery" and by_id[i]["filters"] == {}
    legacy = by_id[8]  # the newest serializers: query_from_filters, and filters {}
    assert legacy["filters"] == {} and legacy["query"]["source"]["kind"] == "TrendsQuery"
    assert legacy["query"]["source"]["breakdownFilter"]["breakdown"] == "$current_url"
    api.control.configure(insight_query_from_filters=False)  # an older PostHog
    older = api.get("insights/8/", params={"refresh": "force_cache"}).json()
    assert older["query"] is None and older["filters"]["insight"] == "TRENDS"
    assert older["filters"]["breakdown"] == "$current_url"
    events = [e["id"] for e in older["filters"]["events"]]
    assert events == [s["action"]["id"] for s in legacy["result"]] and legacy["result"][0]["data"]
    api.control.configure(insight_query_from_filters=True)
    hogql = by_id[10]
    assert hogql["query"]["kind"] == "DataTableNode"
    assert hogql["query"]["source"]["kind"] == "HogQLQuery"
    assert hogql["hogql"] == hogql["query"]["source"]["query"]
    assert hogql["columns"] == ["event", "day", "count"] and hogql["types"][0] == [
        "event",
        "String",
    ]
    assert hogql["result"] and all(isinstance(r, list) and len(r) == 3 for r in hogql["result"])
    empty = by_id[40]  # the full serializer defaults the kind of an insight with neither
    assert (empty["query"], empty["filters"], empty["result"]) == (None, {"insight": "TRENDS"}, [])
    basic = api.get("insights/40/", params={"basic": "true"}).json()
    assert (basic["query"], basic["filters"]) == (None, {})

    as_csv = api.tabular_export("text/csv", 10)  # the DataTableNode itself is the source
    lines = api.get(f"exports/{as_csv['id']}/content/").text.splitlines()
    assert lines[0] == "event,day,count"
    assert lines[1:] == [",".join(str(c) for c in row) for row in hogql["result"]]
    by_path = api.export(
        export_format="text/csv",
        export_context={"path": f"/api/projects/{api.project_id}/insights/8/"},
    )
    legacy_rows = api.get(f"exports/{by_path['id']}/content/").text.splitlines()
    assert legacy_rows[0].startswith("series,$current_url,")
    assert len(legacy_rows) - 1 == len(legacy["result"])
    assert api.export(export_format="text/csv", insight=40)["exception"] == "'path'"
    nothing = api.export(
        export_format="text/csv",
        export_context={"path": f"/api/projects/{api.project_id}/insights/40"},
    )
    assert api.get(f"exports/{nothing['id']}/content/").text.startswith("error\r\n")
    board = api.export(export_format="image/png", dashboard=1)  # has HogQL and legacy tiles
    assert board["has_content"] and _png_size(api.get(f"exports/{board['id']}/content/").content)

    api.control.configure(async_delay_s=0.1)
    job = api.get("insights/20/", params={"refresh": "force_async"}).json()["query_status"]
    done = poll_until(lambda: api.get(f"query/{job['id']}/"), lambda r: r.status_code == 200)
    assert done.json()["query_status"]["results"]["columns"] == ["event", "week", "count"]
    flat = api.get("insights/10/", params={"format": "csv"})
    assert flat.status_code == 200 and "result.0.0" in flat.text.splitlines()[0].split(",")


#: Every insight kind the seed has, by the ``kind`` name of ``INSIGHT_KIND_RULES``.
ALL_KINDS = (
    "trends",
    "legacy",
    "hogql",
    "empty",
    "trends_compare",
    "trends_formula",
    "trends_aggregate",
    "funnel_steps",
    "funnel_steps_breakdown",
    "funnel_trends",
    "funnel_time_to_convert",
    "retention",
    "lifecycle",
    "stickiness",
    "paths",
    "sql_truncated",
    "trends_series_identity",
    "retention_aggregated",
    "funnel_optional",
    "calendar_heatmap",
    "boxplot",
)
#: The kinds saved as an InsightVizNode over something other than a plain trends query, with
#: their source's ``kind`` (and a funnel's ``funnelVizType``).
SHAPED_SOURCES = {
    "trends_compare": ("TrendsQuery", None),
    "trends_formula": ("TrendsQuery", None),
    "trends_aggregate": ("TrendsQuery", None),
    "funnel_steps": ("FunnelsQuery", "steps"),
    "funnel_steps_breakdown": ("FunnelsQuery", "steps"),
    "funnel_trends": ("FunnelsQuery", "trends"),
    "funnel_time_to_convert": ("FunnelsQuery", "time_to_convert"),
    "retention": ("RetentionQuery", None),
    "lifecycle": ("LifecycleQuery", None),
    "stickiness": ("StickinessQuery", None),
    "paths": ("PathsQuery", None),
    "trends_series_identity": ("TrendsQuery", None),
    "retention_aggregated": ("RetentionQuery", None),
    "funnel_optional": ("FunnelsQuery", "steps"),
    "calendar_heatmap": ("TrendsQuery", None),
    "boxplot": ("TrendsQuery", None),
}
FUNNEL_CSV_HEADER = (
    "name,breakdown_value,action_id,count,median_conversion_time (seconds),"
    "average_conversion_time (seconds)"
)


@pytest.mark.unit
def test_every_insight_kind_is_among_the_first_40() -> None:
    """The demo seeds 40 insights: each kind must be there, and indexes 0-9 keep their kinds."""
    from posthog_standin.seed import INSIGHT_KIND_RULES, Insight, Seed

    seed = Seed(seed=7, project_id=1, insights=40, dashboards=3, group_types=2, groups=10)
    kinds = [Insight(seed.main, i).kind for i in range(40)]
    assert set(kinds) == set(ALL_KINDS) and set(INSIGHT_KIND_RULES) == set(ALL_KINDS)
    assert kinds[:10] == ["trends"] * 7 + ["legacy", "trends", "hogql"]
    assert Insight(seed.main, 39).kind == "empty"
    assert [Insight(seed.main, i + 40).kind for i in range(10, 40)] == kinds[10:40]


def _series_invariants(series: list[dict[str, Any]]) -> None:
    """Trends-like series: ``count`` is the sum of ``data``, one day and label per point."""
    for s in series:
        if "calendar_heatmap_data" in s:  # count is the total (CalendarHeatmapTrendsQueryRunner)
            assert s["data"] == [] and s["count"] == s["aggregated_value"] > 0, s
            continue
        if "aggregated_value" in s:
            assert s["data"] == [] and s["count"] == 0 and s["aggregated_value"] > 0, s
            continue
        assert s["count"] == sum(s["data"]), s
        assert len(s["data"]) == len(s["days"]) == len(s["labels"]) > 0, s


def _funnel_invariants(steps: list[dict[str, Any]], optional: bool = False) -> None:
    assert [s["order"] for s in steps] == list(range(len(steps))) and len(steps) >= 2
    counts = [s["count"] for s in steps]
    if optional:  # an optional step counts on its own: the step after it may count more
        assert counts[2] > counts[1] and max(counts) == counts[0] > 0, counts
    else:
        assert counts == sorted(counts, reverse=True) and counts[0] > 0, counts
    assert steps[0]["average_conversion_time"] is None
    assert all(s["average_conversion_time"] > 0 for s in steps[1:])
    assert all(s["action_id"] == s["name"] and s["type"] == "events" for s in steps)


def _paths_invariants(edges: list[dict[str, Any]]) -> None:
    assert edges and all(e["value"] > 0 and e["average_conversion_time"] > 0 for e in edges)
    assert all(re.fullmatch(r"\d+_/\w+", e[end]) for e in edges for end in ("source", "target"))
    reached = {e["source"] for e in edges if e["source"].startswith("1_")}
    for e in edges:  # sorted by value, so walk until nothing new is reached
        if e["source"] in reached:
            reached.add(e["target"])
    assert all(e["source"] in reached for e in edges)
    assert [e["value"] for e in edges] == sorted((e["value"] for e in edges), reverse=True)


def _check_result(kind: str, result: Any) -> None:
    """The invariants of each kind's result shape (see docs/insight-results.md)."""
    trends_kinds = ("trends", "legacy", "trends_compare", "trends_formula", "trends_aggregate",
                    "trends_series_identity", "calendar_heatmap")  # fmt: skip
    if kind in trends_kinds:
        _series_invariants(result)
    if kind == "trends_compare":
        labels = [s["compare_label"] for s in result]
        assert labels == sorted(labels) and set(labels) == {"current", "previous"}
        assert all(s["compare"] is True for s in result)
    elif kind == "trends_formula":
        assert len(result) == 1 and result[0]["label"] == "Formula (A+B)"
        assert result[0]["action"] is None
    elif kind in ("funnel_steps", "funnel_steps_breakdown"):
        groups = result if kind == "funnel_steps_breakdown" else [result]
        assert all(isinstance(steps, list) for steps in groups)
        assert len(groups) > 1 if kind == "funnel_steps_breakdown" else len(groups) == 1
        for steps in groups:
            _funnel_invariants(steps)
            if kind == "funnel_steps_breakdown":
                values = {tuple(s["breakdown_value"]) for s in steps}
                assert len(values) == 1 and all(isinstance(s["breakdown"], list) for s in steps)
    elif kind == "funnel_optional":
        _funnel_invariants(result, optional=True)
    elif kind == "trends_series_identity":
        actions = {(s["action"]["math"], s["action"]["custom_name"]) for s in result}
        assert actions == {("total", "Views"), ("dau", "Users")}
        assert {s["action"]["id"] for s in result} == {result[0]["action"]["id"]}
        values = {s["breakdown_value"] for s in result}
        assert {"$$_posthog_breakdown_null_$$", "$$_posthog_breakdown_other_$$"} < values
        assert all(len(s["days"][0]) == len("2026-01-01 13:00:00") for s in result)
    elif kind == "calendar_heatmap":
        (series,) = result
        grid = series["calendar_heatmap_data"]
        assert grid["allAggregations"] == sum(c["value"] for c in grid["data"]) == series["count"]
    elif kind == "boxplot":
        assert all(d["min"] <= d["p25"] <= d["median"] <= d["p75"] <= d["max"] for d in result)
    elif kind == "retention_aggregated":
        assert [v["label"] for v in result[0]["values"]] == ["Hour 0", "Hour 1", "Hour 2-8"]
        assert all("aggregation_value" in v for c in result for v in c["values"])
        assert result[-1]["breakdown_value"] == "$$_posthog_breakdown_other_$$"
    elif kind == "sql_truncated":
        assert len(result) == 100 and all(len(row) == 2 for row in result)
    elif kind == "funnel_trends":
        (series,) = result
        assert series["count"] == len(series["data"]) == len(series["days"])
        assert all(0 <= rate <= 100 for rate in series["data"])
    elif kind == "funnel_time_to_convert":
        assert isinstance(result, dict) and result["average_conversion_time"] > 0
        starts = [b[0] for b in result["bins"]]
        assert starts == sorted(starts) and all(b[1] >= 0 for b in result["bins"])
    elif kind == "retention":
        for k, cohort in enumerate(result):
            size = cohort["values"][0]["count"]
            assert cohort["label"].endswith(f" {k}") and cohort["date"].endswith("T00:00:00Z")
            assert all(0 <= v["count"] <= size for v in cohort["values"]), cohort
    elif kind == "lifecycle":
        _series_invariants(result)
        assert [s["status"] for s in result] == ["new", "returning", "resurrecting", "dormant"]
        assert all(v <= 0 for v in result[3]["data"]) and all(v >= 0 for v in result[0]["data"])
    elif kind == "stickiness":
        _series_invariants(result)
        for s in result:
            assert s["days"] == list(range(1, len(s["data"]) + 1))
            assert s["labels"][0] in ("1 day", "1 week") and s["labels"][1].startswith("2 ")
    elif kind == "paths":
        _paths_invariants(result)
    elif kind == "hogql":
        assert all(isinstance(row, list) and len(row) == 3 for row in result)


def _kind_ids(main: dict[str, Any]) -> dict[str, int]:
    """The first insight id of every kind."""
    by_kind = main["insight_ids_by_kind"]
    assert set(by_kind) == set(ALL_KINDS) and all(by_kind[k] for k in ALL_KINDS), by_kind
    return {kind: ids[0] for kind, ids in by_kind.items()}


def test_every_insight_kind_is_served_in_its_shape(api: Api, main: dict[str, Any]) -> None:
    """The first 40 insights hold every kind, each saved as PostHog saves it and answered with
    its runner's result shape, whose invariants hold in the served JSON."""
    ids = _kind_ids(main)
    assert all(ids[k] <= 40 for k in ALL_KINDS)
    listing = api.get("insights/", params={"order": "id", "limit": 40, "refresh": "blocking"})
    by_id = {r["id"]: r for r in listing.json()["results"]}
    for kind, insight_id in ids.items():
        if kind == "empty":
            continue
        insight = by_id[insight_id]
        if kind in SHAPED_SOURCES:
            source = insight["query"]["source"]
            source_kind, viz = SHAPED_SOURCES[kind]
            assert insight["query"]["kind"] == "InsightVizNode" and insight["filters"] == {}
            assert source["kind"] == source_kind, (kind, source)
            assert (source.get("funnelsFilter") or {}).get("funnelVizType") == viz
        assert insight["result"], kind
        _check_result(kind, insight["result"])
    sources = {k: by_id[i]["query"]["source"] for k, i in ids.items() if k in SHAPED_SOURCES}
    assert sources["trends_compare"]["compareFilter"] == {"compare": True}
    assert sources["trends_formula"]["trendsFilter"]["formula"] == "A+B"
    assert sources["trends_aggregate"]["trendsFilter"]["display"] == "BoldNumber"
    assert sources["funnel_steps_breakdown"]["breakdownFilter"]["breakdown"] == "$browser"
    assert sources["retention"]["retentionFilter"]["totalIntervals"] == len(
        by_id[ids["retention"]]["result"]
    )


def test_every_insight_kind_is_served_blocking_and_async(api: Api, main: dict[str, Any]) -> None:
    """Each kind's result is the same whether computed blocking or by an async job followed
    through ``/query/:id/``, and a later cache read serves it too."""
    api.control.configure(async_delay_s=0.1)
    for kind, insight_id in _kind_ids(main).items():
        job = api.get(f"insights/{insight_id}/", params={"refresh": "force_async"}).json()
        assert job["result"] is None and job["query_status"]["complete"] is False, kind
        status_url = f"query/{job['query_status']['id']}/"
        done = poll_until(lambda url=status_url: api.get(url), lambda r: r.status_code == 200)
        response = done.json()["query_status"]["results"]
        if kind != "empty":
            _check_result(kind, response["results"])
        blocking = api.get(f"insights/{insight_id}/", params={"refresh": "blocking"}).json()
        assert blocking["result"] == response["results"], kind
        assert (blocking["columns"], blocking["hasMore"]) == (
            response["columns"],
            response["hasMore"],
        )
        cached = api.get(f"insights/{insight_id}/", params={"refresh": "async"}).json()
        assert cached["is_cached"] and cached["result"] == blocking["result"], kind


def _expected_csv(kind: str, insight: dict[str, Any]) -> tuple[str, int]:
    """The header (a prefix where date columns follow) and data row count of the CSV PostHog's
    exporter makes of ``insight``'s source (``csv_exporter.py``)."""
    result = insight["result"]
    if kind in ("trends", "legacy"):  # one column per breakdown property, then the dates
        return "series,$current_url,", len(result)
    if kind == "hogql":
        return "event,day,count", len(result)
    if kind == "sql_truncated":  # the export runs the select again, with the export's limit
        return "distinct_id,events", 250
    if kind in ("funnel_steps", "funnel_optional"):
        return FUNNEL_CSV_HEADER, len(result)
    if kind == "funnel_steps_breakdown":
        return FUNNEL_CSV_HEADER, sum(len(steps) for steps in result)
    if kind == "funnel_time_to_convert":
        return "bin,value", len(result["bins"])
    if kind == "retention":
        return "cohort,cohort size,Day 0,Day 1", len(result)
    if kind == "retention_aggregated":
        return "cohort,cohort size,Hour 0,Hour 1,Hour 2-8", len(result)
    if kind == "paths":
        return "source,target,value,average_conversion_time", len(result)
    if kind == "boxplot":
        return "day,label,min,p25,median,p75,max,mean,series_index,series_label", len(result)
    if kind in ("trends_aggregate", "calendar_heatmap"):
        return "series,Total Sum", len(result)
    if kind == "trends_series_identity":
        return "series,custom name,$browser,", len(result)
    return f"series,{result[0]['labels'][0]},", len(result)


def test_every_insight_kind_exports_to_csv_and_xlsx(api: Api, main: dict[str, Any]) -> None:
    """A tabular export of each kind renders PostHog's exporter layout for it; XLSX holds the
    same cells."""
    from openpyxl import load_workbook

    for kind, insight_id in _kind_ids(main).items():
        if kind == "empty":
            continue  # no query source to export from (covered by test_seeded_insight_kinds)
        result = api.get(f"insights/{insight_id}/", params={"refresh": "blocking"}).json()
        header, rows = _expected_csv(kind, result)
        csv_export = api.tabular_export("text/csv", insight_id)
        content = api.get(f"exports/{csv_export['id']}/content/")
        lines = content.text.splitlines()
        assert lines[0].startswith(header) and len(lines) == rows + 1, (kind, lines[:3])
        assert int(content.headers["Content-Length"]) == len(content.content)
        xlsx = api.tabular_export(XLSX, insight_id)
        book = load_workbook(io.BytesIO(api.get(f"exports/{xlsx['id']}/content/").content))
        cells = list(book.active.iter_rows(values_only=True))
        assert ",".join(str(c) for c in cells[0]) == lines[0] and len(cells) == len(lines), kind
        assert "total" not in lines[0].split(","), kind  # PostHog writes no total column
        if kind in ("trends_compare", "lifecycle", "stickiness"):
            assert all(
                line.split(",")[-1] == str(s["data"][-1])
                for line, s in zip(lines[1:], result["result"], strict=True)
            ), kind


def test_insights_list_order(api: Api, main: dict[str, Any]) -> None:
    """Without ``order`` every insight ties (the ``order`` column is NULL), and each
    LIMIT/OFFSET query returns ties in its own order: pages overlap and skip rows while
    ``count`` is right. ``order=<field>`` sorts (NULLs as Postgres does), ``order=id`` walks
    everything once, an unknown field is a 500."""
    total = main["insights"]

    def walk(count: int = total, **params: str) -> list[int]:
        ids: list[int] = []
        body = api.get("insights/", params={"basic": "true", "limit": 100, **params}).json()
        while True:
            assert body["count"] == count
            ids += [r["id"] for r in body["results"]]
            if not body["next"]:
                return ids
            body = api.session.get(body["next"], timeout=10).json()

    unordered = walk()
    assert len(unordered) == total and len(set(unordered)) < total, len(set(unordered))
    second = {"basic": "true", "limit": 100, "offset": 100}
    page = [r["id"] for r in api.get("insights/", params=second).json()["results"]]
    assert page == unordered[100:200]  # the same query gives the same rows
    assert walk(order="id") == list(range(1, total + 1))
    search = {"search": "signups", "basic": "true", "order": "id", "limit": 1000}
    matching = api.get("insights/", params=search).json()
    expected = [r["id"] for r in matching["results"]]
    assert 20 < matching["count"] == len(expected) < total
    shuffled = walk(matching["count"], search="signups", limit="10")  # filters keep ties too
    assert len(shuffled) == len(expected) and shuffled != expected
    newest = api.get("insights/", params={"order": "-id", "limit": 2, "basic": "true"}).json()
    assert [r["id"] for r in newest["results"]] == [total, total - 1]
    for bad in ("nonsense", "-nonsense", "name,id", "-"):
        response = api.get("insights/", params={"order": bad, "basic": "true"})
        assert response.status_code == 500, bad
        assert _error(response) == {
            "type": "server_error",
            "code": "error",
            "detail": "A server error occurred.",
            "attr": None,
        }

    def everything(order: str) -> list[dict[str, Any]]:
        params = {"order": order, "limit": total, "basic": "true"}
        return api.get("insights/", params=params).json()["results"]

    refreshed = [r["last_refresh"] for r in everything("last_refresh")]
    values = [v for v in refreshed if v is not None]
    assert 0 < len(values) < total
    assert refreshed == sorted(values, key=_ts) + [None] * (total - len(values))  # NULLS LAST
    descending = [r["last_refresh"] for r in everything("-last_refresh")]
    assert descending == [None] * (total - len(values)) + sorted(values, key=_ts, reverse=True)
    by_user = everything("created_by")
    users = [r["created_by"]["id"] for r in by_user]
    assert users == sorted(users)
    ties = [r["id"] for r in by_user if r["created_by"]["id"] == 1]
    assert ties != sorted(ties)  # equal values come back in the per-query order
    saved = api.get("insights/", params={"saved": "true", "order": "id", "basic": "true"}).json()
    assert all(r["saved"] for r in saved["results"]) and 0 < saved["count"] < total
    assert [r["id"] for r in saved["results"]] == sorted(r["id"] for r in saved["results"])

    api.control.configure(stable_default_order=True)
    assert walk() == list(range(1, total + 1))
    assert [r["id"] for r in everything("created_by") if r["created_by"]["id"] == 1] == sorted(ties)


def test_cache_only_answers_and_blocking_compute_time(api: Api) -> None:
    """force_cache answers carry no job status (unless asked to); a stale insight keeps its
    old result and last_refresh until its job ends, then last_refresh is the job's end. Each
    blocking calculation takes ``compute_delay_s``, one after another, without blocking."""
    api.control.configure(async_delay_s=1.0)
    api.control.set_insight_cache(3, "stale")
    old = api.get("insights/3/").json()
    assert old["is_cached"] is True and old["query_status"] is None
    job = api.get("insights/3/", params={"refresh": "async"}).json()["query_status"]
    assert job["complete"] is False
    during = api.get("insights/3/").json()
    assert during["query_status"] is None
    assert (during["result"], during["last_refresh"]) == (old["result"], old["last_refresh"])
    assert _ts(during["last_refresh"]) < _ts(job["start_time"])
    cold_job = api.get("insights/4/", params={"refresh": "force_async"}).json()["query_status"]
    assert api.get("insights/4/").json()["query_status"] is None
    api.control.configure(force_cache_shows_running_job=True)
    shown = api.get("insights/4/").json()
    assert shown["result"] is None and shown["query_status"]["id"] == cold_job["id"]
    assert shown["query_status"]["complete"] is False

    done = poll_until(lambda: api.get(f"query/{job['id']}/"), lambda r: r.status_code == 200)
    end_time = done.json()["query_status"]["end_time"]
    warm = api.get("insights/3/").json()
    assert warm["last_refresh"] == end_time and _ts(end_time) >= _ts(job["start_time"])
    assert warm["query_status"] is None and warm["is_cached"] is True

    api.control.configure(compute_delay_s=0.1)
    params = {"order": "id", "limit": 5, "offset": 100, "refresh": "blocking"}
    timings: dict[str, float] = {}

    def slow_page() -> None:
        started = time.monotonic()
        assert Api(api.standin).get("insights/", params=params).status_code == 200
        timings["page"] = time.monotonic() - started

    thread = threading.Thread(target=slow_page)
    thread.start()
    time.sleep(0.1)
    started = time.monotonic()
    assert api.get("groups_types/").status_code == 200
    timings["other"] = time.monotonic() - started
    thread.join()
    assert timings["page"] >= 0.5 and timings["other"] < 0.3, timings
    started = time.monotonic()
    again = api.get("insights/", params=params).json()  # fresh now: nothing to compute
    assert time.monotonic() - started < 0.4
    assert all(r["is_cached"] for r in again["results"])


# ---- faults and throttling ----------------------------------------------------------------------


def test_status_faults_with_retry_after(api: Api) -> None:
    api.control.add_fault(match=r"/insights/", kind="status", status=503, retry_after=2, times=2)
    api.control.add_fault(match=r"/exports/$", method="GET", kind="status", status=429, times=1)
    for _ in range(2):
        response = api.get("insights/")
        assert response.status_code == 503 and response.headers["Retry-After"] == "2"
        assert _error(response)["type"] == "server_error"
    assert api.get("insights/").status_code == 200
    throttled = api.get("exports/")
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "1"
    assert _error(throttled) == {
        "type": "throttled_error",
        "code": "throttled",
        "detail": "Request was throttled. Expected available in 1 second.",
        "attr": None,
    }
    assert api.control.stats()["faults_fired"] == 3
    assert api.control.config()  # faults never apply to the control plane


def test_drop_faults_are_real_connection_errors(api: Api) -> None:
    api.control.add_fault(match=r"/groups_types", kind="drop", times=1)
    with pytest.raises(requests.ConnectionError):
        requests.get(
            api.url("groups_types/"), headers={"Authorization": f"Bearer {api.key}"}, timeout=10
        )
    assert api.get("groups_types/").status_code == 200

    api.control.configure(content_redirect=False)  # cut the API's own body, not a 302
    export = api.tabular_export("text/csv", 2)
    api.control.add_fault(match=r"/content", kind="drop_mid_body", times=1)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(
            api.url(f"exports/{export['id']}/content/"),
            headers={"Authorization": f"Bearer {api.key}"},
            timeout=10,
        )
    api.control.add_fault(match=r"/insights/3", kind="drop_mid_body", times=1)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(
            api.url("insights/3/"), headers={"Authorization": f"Bearer {api.key}"}, timeout=10
        )
    assert api.get(f"exports/{export['id']}/content/").text.startswith("series,$current_url,")
    kinds = [e["fault"] for e in api.control.requests_log() if e["fault"]]
    assert kinds == ["drop", "drop_mid_body", "drop_mid_body"]


def test_slow_fault_does_not_block_other_requests(api: Api) -> None:
    api.control.add_fault(match=r"/dashboards", kind="slow", delay_s=1.0)
    timings: dict[str, float] = {}

    def slow_call() -> None:
        start = time.monotonic()
        response = requests.get(
            api.url("dashboards/"), headers={"Authorization": f"Bearer {api.key}"}
        )
        assert response.status_code == 200
        timings["slow"] = time.monotonic() - start

    thread = threading.Thread(target=slow_call)
    thread.start()
    time.sleep(0.1)
    start = time.monotonic()
    assert api.get("groups_types/").status_code == 200
    timings["fast"] = time.monotonic() - start
    thread.join()
    assert timings["slow"] >= 1.0 and timings["fast"] < 0.5
    assert api.control.stats()["max_in_flight"] >= 2


def test_probability_faults_are_seeded(api: Api) -> None:
    def pattern() -> list[int]:
        api.control.add_fault(
            match=r"/groups_types", kind="status", status=500, probability=0.5, seed=7
        )
        codes = [api.get("groups_types/").status_code for _ in range(20)]
        api.control.clear_faults()
        return codes

    first = pattern()
    assert 0 < first.count(500) < 20 and set(first) == {200, 500}
    assert pattern() == first


def test_throttles_are_drf_sliding_logs_on_by_default(api: Api) -> None:
    """PostHog Cloud throttles every personal key: a sliding log per scope; every scope of the
    route records a request it allows (even one another scope refuses); Retry-After is the
    longest refusing scope's wait, so after the hourly budget it is close to an hour."""
    assert api.control.config()["rate_limits"] is True
    assert parse_args([]).rate_limits is True
    assert parse_args(["--no-rate-limits"]).rate_limits is False
    with pytest.raises(StandinError, match="unknown config field"):
        api.control.configure(rate_limit_burst=3)

    api.control.configure(rate_limit_overrides={"burst": "5/minute", "sustained": "3/hour"})
    assert [api.get("groups_types/").status_code for _ in range(3)] == [200, 200, 200]
    hourly = api.get("groups_types/")
    wait = int(hourly.headers["Retry-After"])
    assert 3550 <= wait <= 3600, wait
    assert _error(hourly) == {
        "type": "throttled_error",
        "code": "throttled",
        "detail": f"Request was throttled. Expected available in {wait} seconds.",
        "attr": None,
    }
    assert api.get("groups_types/").status_code == 429
    # Both refused requests were still logged by the per-minute scope, which is now full too.
    api.control.configure(rate_limit_overrides={"burst": "5/minute", "sustained": "100/hour"})
    minute = api.get("groups_types/")
    assert minute.status_code == 429 and 1 <= int(minute.headers["Retry-After"]) <= 60
    # A log longer than the rate allows gives DRF no wait to report: no Retry-After.
    api.control.configure(rate_limit_overrides={"burst": "3/minute"})
    no_wait = api.get("groups_types/")
    assert no_wait.status_code == 429 and "Retry-After" not in no_wait.headers
    assert _error(no_wait)["detail"] == "Request was throttled."

    # Insights have the ClickHouse scopes, separate from the default ones; /query/:id/ (the
    # current tier) its own API-queries scopes; on the legacy tier it shares the ClickHouse ones.
    api.control.configure(rate_limit_overrides={"clickhouse_sustained": "2/hour"})
    assert [api.get("insights/1/").status_code for _ in range(2)] == [200, 200]
    assert api.get("query/cache_unknown/").status_code == 404  # not throttled: its own scopes
    api.control.configure(query_throttle_tier="legacy")
    query = api.get("query/cache_unknown/")
    assert query.status_code == 429 and int(query.headers["Retry-After"]) >= 3550
    assert api.get("insights/", params={"basic": "true"}).status_code == 429
    assert api.get("exports/").status_code == 200  # back at 480/min + 4800/h for those
    api.control.add_key("phx_second", ["*"])
    assert api.as_key("phx_second").get("insights/1/").status_code == 200  # per key

    api.control.configure(rate_limit_overrides={"burst": "2/second"})
    second = api.as_key("phx_second")
    assert [second.get("groups_types/").status_code for _ in range(3)] == [200, 200, 429]
    time.sleep(1.05)
    assert second.get("groups_types/").status_code == 200  # the oldest entries left the window
    assert api.control.stats()["throttled_429"] == 7
    api.control.configure(rate_limit_overrides={"clickhouse_sustained": "2/hour"})
    assert api.get("insights/1/").status_code == 429
    api.control.reset()  # clears every log
    api.control.configure(rate_limit_overrides={"clickhouse_sustained": "2/hour"})
    assert api.get("insights/1/").status_code == 200


# ---- lazy seed --------------------------------------------------------------------------------


def test_lazy_seed_with_a_million_insights_and_groups() -> None:
    started = time.monotonic()
    with StandinProcess(insights=1_000_000, groups=1_000_000) as big:
        startup = time.monotonic() - started
        api = Api(big)
        begin = time.monotonic()
        tail = api.get(
            "insights/", params={"offset": 999_995, "basic": "true", "order": "id"}
        ).json()
        assert tail["count"] == 1_000_000 and tail["next"] is None
        assert [r["id"] for r in tail["results"]] == list(range(999_996, 1_000_001))
        short = tail["results"][-1]["short_id"]
        assert api.get(f"insights/{short}/").json()["id"] == 1_000_000
        last = api.get(
            "groups/find/", params={"group_type_index": 0, "group_key": "organization-999999"}
        )
        assert last.status_code == 200
        moment = last.json()["created_at"].replace("T", " ").replace("Z", "+00:00")
        cursor = base64.b64encode(f"p={requests.utils.quote(moment)}".encode()).decode()
        end_page = api.get("groups/", params={"group_type_index": 0, "cursor": cursor}).json()
        assert end_page["results"] == [] and end_page["next"] is None
        plans = api.get("groups/property_values/", params={"group_type_index": 0, "key": "plan"})
        assert sum(v["count"] for v in plans.json()) == 1_000_000
        shuffled = api.get("insights/", params={"offset": 500_000, "basic": "true"}).json()
        assert len(shuffled["results"]) == 100  # tied rows permuted cheaply at this size
        elapsed = time.monotonic() - begin
        code = big.stop()
    assert startup < 10 and elapsed < 3, (startup, elapsed)
    assert code == 0


# ---- OpenAPI contract -------------------------------------------------------------------------


def test_responses_and_requests_match_the_openapi_contract(api: Api) -> None:
    """Responses of the seeded paths, and the requests that produced them, against the schema
    (allowing only the schema's known inaccuracies, patched in ``openapi_contract``)."""
    api.control.configure(async_delay_s=0.1)
    job = api.get("insights/13/", params={"refresh": "async"}).json()["query_status"]
    poll_until(lambda: api.get(f"query/{job['id']}/"), lambda r: r.status_code == 200)
    source = export_source(api.get("insights/2/", params={"basic": "true"}).json())
    api.control.clear_requests_log()
    created = api.post(
        "exports/",
        json={"export_format": "text/csv", "insight": 2, "export_context": {"source": source}},
    )
    responses = [("POST", "exports/", created)]
    for tail, params in [
        ("exports/", {"limit": 5}),
        (f"exports/{created.json()['id']}/", None),
        ("groups/", {"group_type_index": 0}),
        ("groups/find/", {"group_type_index": 0, "group_key": "organization-3"}),
        ("groups/property_definitions/", None),
        ("groups/property_values/", {"group_type_index": 1, "key": "industry"}),
        ("groups_types/", None),
        ("insights/", {"limit": 3}),
        ("insights/", {"limit": 3, "refresh": "blocking"}),
        ("insights/13/", None),  # warm, served from cache
        ("insights/14/", {"refresh": "async"}),  # running job attached
        (f"query/{job['id']}/", None),
    ]:
        responses.append(("GET", tail, api.get(tail, params=params)))
    for method, tail, response in responses:
        assert response.status_code in (200, 201), (tail, response.text)
        for prefix in ("projects", "environments"):
            if prefix == "environments" and tail.startswith("groups_types"):
                continue  # only documented under /api/projects/
            path = api.path(tail, prefix=prefix)
            openapi_contract.validate_response(method, path, response.status_code, response.json())
    log = api.control.requests_log()
    assert len(log) == len(responses)
    for entry in log:
        openapi_contract.validate_request(
            entry["method"], entry["path"], entry["query"], entry.get("body")
        )
    with pytest.raises(openapi_contract.ContractError):
        openapi_contract.validate_request(
            "GET", api.path("insights/"), {"refresh": "async_except_on_cache_miss"}
        )
    with pytest.raises(openapi_contract.ContractError):
        openapi_contract.validate_request("POST", api.path("exports/"), {}, {"export_format": "x"})
    broken = api.get("exports/").json()
    broken["results"] = [{"id": "not-an-int"}]
    with pytest.raises(openapi_contract.ContractError):
        openapi_contract.validate_response("GET", api.path("exports/"), 200, broken)

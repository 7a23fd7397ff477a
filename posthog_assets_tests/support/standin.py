"""Small helpers for tests that talk real HTTP to the PostHog stand-in."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import requests

from posthog_standin.server import StandinProcess

T = TypeVar("T")


class Api:
    """A ``requests`` session bound to one stand-in, its key and its main project."""

    def __init__(self, standin: StandinProcess, key: str | None = None) -> None:
        self.standin = standin
        self.base = standin.url
        self.project_id = standin.project_id
        self.key = key or standin.key
        self.control = standin.control
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {self.key}"

    def path(self, tail: str, *, prefix: str = "projects", project: Any = None) -> str:
        project = self.project_id if project is None else project
        return f"/api/{prefix}/{project}/{tail}"

    def url(self, tail: str, **kw: Any) -> str:
        return self.base + self.path(tail, **kw)

    def get(
        self, tail: str, *, prefix: str = "projects", project: Any = None, **kw: Any
    ) -> requests.Response:
        kw.setdefault("timeout", 30)
        return self.session.get(self.url(tail, prefix=prefix, project=project), **kw)

    def post(self, tail: str, *, project: Any = None, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        return self.session.post(self.url(tail, project=project), **kw)

    def as_key(self, key: str) -> Api:
        return Api(self.standin, key)

    def export(self, **body: Any) -> dict[str, Any]:
        response = self.post("exports/", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def tabular_export(self, export_format: str, insight_id: int, **body: Any) -> dict[str, Any]:
        """A CSV/XLSX export of an insight the way PostHog can render it: with the insight's
        query source in ``export_context`` (an insight alone has nothing to read rows from)."""
        insight = self.get(f"insights/{insight_id}/", params={"basic": "true"}).json()
        context = {**body.pop("export_context", {}), "source": export_source(insight)}
        return self.export(
            export_format=export_format, insight=insight_id, export_context=context, **body
        )


def export_source(insight: dict[str, Any]) -> dict[str, Any]:
    """The query node a tabular export of ``insight`` needs: an InsightVizNode's ``source``, any
    other saved node itself (a legacy-filters insight has none: export it by ``path``)."""
    query = insight["query"]
    assert query is not None, f"insight {insight['id']} has no query; export it by path"
    return query["source"] if query["kind"] == "InsightVizNode" else query


def poll_until(fetch: Callable[[], T], done: Callable[[T], bool], timeout: float = 5.0) -> T:
    """Call ``fetch`` every 50 ms until ``done(value)``; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {value!r}")
        time.sleep(0.05)

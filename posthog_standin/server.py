"""Start/stop helpers for tests, the demo and benches: the stand-in as a real subprocess, and a
small ``urllib`` client for its control plane.

Only the standard library is used here, so importing this module costs nothing (no Starlette,
no uvicorn, no requests).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from types import TracebackType
from typing import Any

DEFAULT_KEY = "phx_standin_key"
#: The header that carries the control token (printed on the ready line) to ``/_standin/``.
CONTROL_TOKEN_HEADER = "X-Standin-Token"


class StandinError(RuntimeError):
    """The stand-in did not start, or a control-plane call failed."""


class StandinProcess:
    """``python -m posthog_standin`` in its own session, on free ports.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. After start, ``url``,
    ``storage_url``, ``key``, ``project_id``, ``control_token`` and ``pid`` describe the running
    server; :attr:`control` drives its control plane. ``events``, ``persons``, ``event_days`` and
    ``personless_share`` size the main project's events and persons (``events_db``), which
    HogQL ``POST /query/`` reads; ``annotations``, ``cohorts``, ``feature_flags``, ``actions``
    and ``experiments`` the live catalog objects of the main project (``catalog_seed``; about
    one in eight more are seeded soft-deleted).
    """

    def __init__(
        self,
        *,
        insights: int = 40,
        groups: int = 250,
        group_types: int = 3,
        dashboards: int = 3,
        key: str = DEFAULT_KEY,
        project_id: int = 1,
        rate_limits: bool = True,
        export_delay: float = 0.0,
        seed: int = 0,
        events: int = 20_000,
        persons: int = 2_000,
        event_days: int = 7,
        personless_share: float = 0.002,
        annotations: int = 30,
        cohorts: int = 20,
        feature_flags: int = 40,
        actions: int = 15,
        experiments: int = 4,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
        python: str = sys.executable,
    ) -> None:
        self.args = [
            python, "-m", "posthog_standin",
            "--host", host, "--port", "0",
            "--key", key, "--project-id", str(project_id),
            "--insights", str(insights), "--groups", str(groups),
            "--group-types", str(group_types), "--dashboards", str(dashboards),
            "--seed", str(seed), "--export-delay", str(export_delay),
            "--events", str(events), "--persons", str(persons),
            "--event-days", str(event_days), "--personless-share", str(personless_share),
            "--annotations", str(annotations), "--cohorts", str(cohorts),
            "--feature-flags", str(feature_flags), "--actions", str(actions),
            "--experiments", str(experiments),
            "--rate-limits" if rate_limits else "--no-rate-limits",
            *extra_args,
        ]  # fmt: skip
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.storage_url = ""
        self.key = key
        self.project_id = project_id
        self.control_token = ""
        self._lines: queue.Queue[str | None] = queue.Queue()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise StandinError("stand-in is not running")
        return self.proc.pid

    @property
    def control(self) -> StandinControl:
        return StandinControl(self.url, token=self.control_token)

    def _pump(self) -> None:
        """Read stdout forever (so the pipe never fills and blocks the server)."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def start(self) -> StandinProcess:
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, name="standin-stdout", daemon=True).start()
        try:
            line = self._lines.get(timeout=self.startup_timeout)
        except queue.Empty:
            self.stop()
            raise StandinError(
                f"stand-in did not report ready within {self.startup_timeout}s"
            ) from None
        if line is None:
            code = self.proc.wait()
            raise StandinError(f"stand-in exited with code {code} before it was ready")
        ready = json.loads(line)
        self.url, self.storage_url = ready["url"], ready["storage_url"]
        self.key, self.project_id = ready["key"], ready["project_id"]
        self.control_token = ready["control_token"]
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def __enter__(self) -> StandinProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class StandinControl:
    """Client for ``/_standin/``: reset, config, faults, keys, request log, stats, and the
    events/persons/query-log calls of the HogQL ``/query/`` endpoint.

    ``token`` is the stand-in's control token (``StandinProcess.control_token``, or the ready
    line's ``control_token``); without it every call is refused with 403.
    """

    def __init__(self, url: str, *, token: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}/_standin/{path}",
            data=data,
            method=method,
            headers={CONTROL_TOKEN_HEADER: self.token, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise StandinError(f"{method} /_standin/{path} -> {exc.code}: {detail}") from None

    def reset(self) -> None:
        """Back to the seed: exports, caches, jobs, faults, keys, config, log, removed groups,
        the catalog (deleted and added objects)."""
        self._call("POST", "reset")

    def configure(self, **config: Any) -> dict[str, Any]:
        """Override behaviour (see the README of the control plane); returns the new config."""
        return self._call("POST", "config", config)

    def config(self) -> dict[str, Any]:
        return self._call("GET", "config")

    def add_fault(self, **rule: Any) -> dict[str, Any]:
        """Add a fault rule (``match``, ``method``, ``kind``, ``status``, ``times``, …)."""
        return self._call("POST", "faults", rule)

    def clear_faults(self) -> None:
        self._call("DELETE", "faults")

    def faults(self) -> list[dict[str, Any]]:
        return self._call("GET", "faults")

    def requests_log(self) -> list[dict[str, Any]]:
        return self._call("GET", "requests")

    def clear_requests_log(self) -> None:
        self._call("DELETE", "requests")

    def add_key(
        self,
        key: str,
        scopes: Sequence[str],
        projects: Sequence[int] | None = None,
        *,
        current_project: int | None = None,
        user_id: int | None = None,
        user_projects: Sequence[int] | None = None,
    ) -> None:
        body: dict[str, Any] = {"key": key, "scopes": list(scopes)}
        body["projects"] = None if projects is None else list(projects)
        if current_project is not None:
            body["current_project"] = current_project
        if user_id is not None:
            body["user_id"] = user_id
        if user_projects is not None:
            body["user_projects"] = list(user_projects)
        self._call("POST", "keys", body)

    def expire_export(self, export_id: int) -> None:
        self._call("POST", f"exports/{export_id}/expire")

    def lose_export_content(self, export_id: int) -> None:
        self._call("POST", f"exports/{export_id}/lose_content")

    def remove_group(self, type_index: int, key: str, project_id: int | None = None) -> None:
        query = "" if project_id is None else f"?project_id={project_id}"
        self._call("DELETE", f"groups/{type_index}/{urllib.parse.quote(key, safe='')}{query}")

    def set_insight_cache(self, insight_id: int | None, state: str) -> None:
        """``state``: cold, fresh, stale or stale_soft; ``insight_id=None`` sets every insight."""
        path = "insights/cache" if insight_id is None else f"insights/{insight_id}/cache"
        self._call("POST", path, {"state": state})

    def stats(self) -> dict[str, Any]:
        """Counters: exports created, requests by route, faults fired, 429s, max in flight."""
        return self._call("GET", "stats")

    def seed_info(self) -> dict[str, Any]:
        """Seed number and, per project, its sizes and first insight/dashboard ids."""
        return self._call("GET", "seed")

    # ---- the catalog: annotations, cohorts, feature flags, actions, experiments -----------------
    def catalog(self) -> dict[str, Any]:
        """Per project id (a string) and kind: ``ids``, ``live_ids``, ``deleted_ids``; under
        ``experiment`` also ``experiments`` (id, deleted, status, feature flag id and key,
        variants, stats method, metric uuids), after any control-plane changes."""
        return self._call("GET", "catalog")

    def delete_object(self, kind: str, object_id: int) -> dict[str, Any]:
        """Soft-delete one object (``deleted: true``, ``updated_at`` now), as PATCHing
        ``{"deleted": true}`` does. ``kind``: annotation, cohort, feature_flag, action or
        experiment (or the plural)."""
        return self._call("POST", f"catalog/{kind}/{int(object_id)}/delete")

    def add_object(
        self, kind: str, fields: dict[str, Any] | None = None, *, project_id: int | None = None
    ) -> dict[str, Any]:
        """Add one object with the seed's defaults and ``fields`` (API field names) on top;
        returns it (with ``kind``, ``project_id`` and its new ``id``). An experiment gets a new
        multivariate flag unless ``fields`` names a live flag's ``feature_flag_key``."""
        return self._call("POST", f"catalog/{kind}" + self._project(project_id), fields or {})

    # ---- events, persons and HogQL queries ------------------------------------------------------
    @staticmethod
    def _project(project_id: int | None) -> str:
        return "" if project_id is None else f"?project_id={int(project_id)}"

    def events_info(self, project_id: int | None = None) -> dict[str, Any]:
        """The event seed (sizes, days, burst rule, seconds it took), live row counts and
        events per UTC day."""
        return self._call("GET", "events" + self._project(project_id))

    def event_counts(self, project_id: int | None = None) -> dict[str, int]:
        """Events per UTC day (``YYYY-MM-DD`` -> count), late events included."""
        days = self.events_info(project_id)["days"]
        return {row["day"]: row["events"] for row in days}

    def insert_late_events(
        self, day: str, count: int, *, event: str | None = None, project_id: int | None = None
    ) -> dict[str, Any]:
        """``count`` events with timestamps spread over the past UTC ``day`` (``YYYY-MM-DD``)
        and ``created_at`` = now, as events ingested late."""
        body: dict[str, Any] = {"day": day, "count": count}
        if event is not None:
            body["event"] = event
        return self._call("POST", "events/late" + self._project(project_id), body)

    def persons_sample(
        self, limit: int = 10, *, min_ids: int = 1, project_id: int | None = None
    ) -> list[dict[str, Any]]:
        """Live persons (``id``, ``distinct_ids``) with at least ``min_ids`` distinct ids."""
        query = f"persons?limit={int(limit)}&min_ids={int(min_ids)}"
        if project_id is not None:
            query += f"&project_id={int(project_id)}"
        return self._call("GET", query)

    def merge_persons(
        self, winner: str, loser: str, *, project_id: int | None = None
    ) -> dict[str, Any]:
        """PostHog's merge: the loser's distinct ids re-pointed to the winner (version + 1),
        the loser's row re-written deleted (version + 100)."""
        body = {"winner": winner, "loser": loser}
        return self._call("POST", "persons/merge" + self._project(project_id), body)

    def delete_person(self, person_id: str, *, project_id: int | None = None) -> dict[str, Any]:
        """The person and its distinct ids re-written deleted (version + 100)."""
        return self._call("POST", "persons/delete" + self._project(project_id), {"id": person_id})

    def update_person(
        self, person_id: str, properties: dict[str, Any], *, project_id: int | None = None
    ) -> dict[str, Any]:
        """Properties merged into the person's, version + 1."""
        body = {"id": person_id, "properties": properties}
        return self._call("POST", "persons/update" + self._project(project_id), body)

    def query_log(self) -> list[dict[str, Any]]:
        """Every HogQL query ``POST /query/`` received since the last reset: its text, mode,
        ``offset_seen``, limit, whether it was paginated or capped, status and outcome."""
        return self._call("GET", "queries")

    def clear_query_log(self) -> None:
        self._call("DELETE", "queries")

    def configure_queries(self, **settings: Any) -> dict[str, Any]:
        """The ``/query/`` settings: ``query_throttle_tier`` ("legacy" | "current"),
        ``query_max_concurrency``, ``query_slot_wait_s``, ``query_max_execution_s``,
        ``query_cost_per_row_s``, ``query_cost_per_day_s``, ``query_latency_s``,
        ``hogql_cache_stale_s`` (a config change; reset restores the defaults)."""
        return self.configure(**settings)

"""The Dagster UI on this machine: ``python -m posthog_project.ui`` (what ``make ui`` runs).

Starts the local PostHog stand-in (unless ``POSTHOG_HOST`` is set) and ``dg dev`` (webserver,
daemon and code server) on 127.0.0.1, with ``DAGSTER_HOME`` at ``.dagster_home/`` seeded with the
project's ``dagster.yaml`` and the concurrency pool limits applied. Ctrl-C or SIGTERM stops both.

Why the process handling is explicit: ``dagster dev`` copies an ignored SIGINT onto SIGTERM when a
shell starts it in the background, and its four children outlive a SIGKILL of the parent. So
``dg dev`` runs in its own process group (``start_new_session``) and is stopped with ``killpg``:
SIGTERM first (a clean exit in a few seconds), SIGKILL for whatever is left after the grace period.
The tests start the UI through this module too, so what they check is what ``make ui`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from contextlib import ExitStack, suppress
from pathlib import Path
from types import FrameType
from typing import IO, Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3000
#: ``dagster dev`` answers in 17-23 s on a busy 2-core box; leave room for a cold import cache.
DEFAULT_STARTUP_TIMEOUT_S = 180.0
#: SIGTERM gives a clean exit in 2-4 s (15 s seen on a loaded box); then SIGKILL what is left.
DEFAULT_STOP_TIMEOUT_S = 30.0

_LOCATIONS_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
  }
}
"""


class DagsterDevError(RuntimeError):
    """``dg dev`` did not come up (or its code location failed to load); the message says why."""


def _dev_command(host: str, port: int) -> list[str]:
    """``dg dev`` from this interpreter's environment, else the ``dagster dev`` module entry point.

    Why next to ``sys.executable``: ``make ui`` runs the venv's Python without activating the venv,
    so ``dg`` is not necessarily on PATH.
    """
    # --no-check-yaml: the project has no component YAML, and `dg check defs` runs in CI.
    args = ["dev", "--no-check-yaml", "-h", host, "-p", str(port)]
    dg = Path(sys.executable).parent / "dg"
    if dg.exists():
        return [str(dg), *args]
    found = shutil.which("dg")
    if found:
        return [found, *args]
    return [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-h",
        host,
        "-p",
        str(port),
        "-w",
        "workspace.yaml",
    ]


def graphql(
    url: str, query: str, variables: Mapping[str, Any] | None = None, *, timeout_s: float = 30.0
) -> dict[str, Any]:
    """POST one GraphQL request to the webserver; raise on transport or GraphQL errors."""
    body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
    req = urllib.request.Request(
        f"{url}/graphql", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        payload = json.loads(resp.read())
    if payload.get("errors"):
        raise DagsterDevError(f"GraphQL errors: {payload['errors']}")
    return payload["data"]


class DagsterDev:
    """One ``dg dev`` (webserver + daemon + code server) in its own process group.

    Args:
        root: the project folder (``pyproject.toml``, ``workspace.yaml``); ``dg dev`` runs there.
        host, port: where the webserver listens.
        env: the full environment for ``dg dev`` (``DAGSTER_HOME``, ``POSTHOG_*``); default: ours.
        log: a file that receives the output of ``dg dev`` and its children; default: inherited.
    """

    def __init__(
        self,
        *,
        root: Path,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        env: Mapping[str, str] | None = None,
        log: IO[bytes] | None = None,
    ) -> None:
        self.root = root
        self.host = host
        self.port = port
        self.env = dict(os.environ if env is None else env)
        if sys.prefix != sys.base_prefix:
            # dg compares the active venv with the project's .venv and warns when none is active.
            self.env.setdefault("VIRTUAL_ENV", sys.prefix)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            _dev_command(self.host, self.port),
            cwd=self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT if self.log is not None else None,
            start_new_session=True,  # its own process group: killpg reaches every child
        )

    def wait_ready(self, timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> None:
        """Wait until the webserver answers and the code location has loaded without error."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DagsterDevError(f"dg dev exited with code {self.proc.returncode}")
            try:
                data = graphql(self.url, _LOCATIONS_QUERY, timeout_s=10)
            except (OSError, urllib.error.URLError, DagsterDevError) as exc:
                last = str(exc)
                time.sleep(0.5)
                continue
            entries = data["workspaceOrError"].get("locationEntries") or []
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                errors = [
                    f"{e['name']}: {e['locationOrLoadError'].get('message', '').strip()}"
                    for e in entries
                    if (e["locationOrLoadError"] or {}).get("__typename") == "PythonError"
                ]
                if errors:
                    raise DagsterDevError("code location failed to load:\n" + "\n".join(errors))
                return
            last = f"locations: {[(e['name'], e['loadStatus']) for e in entries]}"
            time.sleep(0.5)
        raise DagsterDevError(f"{self.url} not ready after {timeout_s:.0f} s ({last})")

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SIGTERM the whole group, wait for every member to go, SIGKILL what is left."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _group_alive(pgid, self.proc):
            time.sleep(0.2)
        if _group_alive(pgid, self.proc):
            _signal_group(pgid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 5
            while time.monotonic() < kill_deadline and _group_alive(pgid, self.proc):
                time.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> DagsterDev:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int, leader: subprocess.Popen[bytes]) -> bool:
    """True while any process of the group is alive (the leader is reaped so it is not a zombie)."""
    leader.poll()
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we cannot signal still counts as alive
        return True
    return True


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    """Turn the first Ctrl-C/SIGTERM into KeyboardInterrupt; ignore repeats during the clean-up.

    Why: a second Ctrl-C while ``stop()`` waits for the group would abandon the children.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posthog_project.ui", description=__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST, help="webserver address (loopback)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="webserver port")
    args = parser.parse_args(argv)
    if not _is_loopback(args.host):
        parser.error(
            f"--host {args.host}: the UI has no login and launches runs with your PostHog key; "
            "serve it on loopback, and behind an authenticating proxy for anyone else"
        )

    # SIGTERM (from a service manager or a test) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGINT, _stop_on_signal)
    signal.signal(signal.SIGTERM, _stop_on_signal)

    from posthog_project.demo import (
        prepare_dagster_home,
        refresh_defs_state,
        use_standin_without_credentials,
    )

    root = Path.cwd()
    home = prepare_dagster_home(root)
    try:
        with ExitStack() as stack:
            use_standin_without_credentials(stack)
            refresh_defs_state(root)

            import dagster as dg

            from posthog_assets.pools import POOL_LIMITS, apply_pool_limits

            with dg.DagsterInstance.get() as instance:
                apply_pool_limits(instance)
            pools = ", ".join(f"{k}={v}" for k, v in POOL_LIMITS.items())
            print(f"DAGSTER_HOME={home} (pools: {pools})")

            dev = DagsterDev(root=root, host=args.host, port=args.port)
            started = time.monotonic()
            stack.enter_context(dev)
            print(
                f"Dagster UI: {dev.url}  (ready in {time.monotonic() - started:.0f} s; "
                "Ctrl-C stops the UI and the stand-in)\n"
                "Anyone who can reach this UI (a web page in your browser too) can launch runs "
                "with your PostHog key: keep it on this machine and stop it when done.",
                flush=True,
            )
            assert dev.proc is not None
            code = dev.proc.wait()
            print(f"dg dev exited with code {code}")
            return code or 1
    except KeyboardInterrupt:
        print(
            "\nStopped the Dagster UI (and the stand-in, if this command started it).", flush=True
        )
        return 0
    except DagsterDevError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

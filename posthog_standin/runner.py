"""Run the two listeners (API and object storage) in one process and one event loop.

uvicorn normally owns signal handling per server; with two servers in one loop we take it over,
so SIGTERM or SIGINT stops both and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from .app import build_api_app
from .catalog_seed import CatalogSizes, build_catalog
from .control import ControlAccess
from .events_db import EventSeedSpec, EventStore
from .seed import Seed
from .state import Config, State
from .storage import build_storage_app


@dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 0
    storage_port: int = 0
    key: str = "phx_standin_key"
    project_id: int = 1
    insights: int = 40
    dashboards: int = 3
    group_types: int = 3
    groups: int = 250
    seed: int = 0
    rate_limits: bool = True
    export_delay: float = 0.0
    log_level: str = "warning"
    #: Needed on every ``/_standin/`` request; ``None`` draws a random one per start.
    control_token: str | None = None
    #: Events and persons of the main project (Staging gets at most 2,000 and 200), spread over
    #: the ``event_days`` whole UTC days before today; ``personless_share`` of the events have
    #: distinct ids with no person (they vanish from queries that select ``person_id``).
    events: int = 20_000
    persons: int = 2_000
    event_days: int = 7
    personless_share: float = 0.002
    #: Live catalog objects of the main project (Staging gets a few); about one in eight more
    #: are seeded soft-deleted (``catalog_seed``).
    annotations: int = 30
    cohorts: int = 20
    feature_flags: int = 40
    actions: int = 15
    experiments: int = 4


#: Staging's share of the events and persons.
STAGING_EVENTS_MAX = 2_000
STAGING_PERSONS_MAX = 200


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to :func:`serve`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def build_state(options: Options) -> State:
    seed = Seed(
        seed=options.seed,
        project_id=options.project_id,
        insights=options.insights,
        dashboards=options.dashboards,
        group_types=options.group_types,
        groups=options.groups,
    )
    config = Config(export_delay_s=options.export_delay, rate_limits=options.rate_limits)
    stores = {}
    for project in seed.projects.values():
        main = project.id == seed.main.id
        spec = EventSeedSpec(
            seed=project.seed,
            events=options.events if main else min(options.events, STAGING_EVENTS_MAX),
            persons=options.persons if main else min(options.persons, STAGING_PERSONS_MAX),
            days=options.event_days,
            personless_share=options.personless_share,
            team_id=project.id,
        )
        stores[project.id] = EventStore(spec)
    sizes = CatalogSizes(
        annotations=options.annotations,
        cohorts=options.cohorts,
        feature_flags=options.feature_flags,
        actions=options.actions,
        experiments=options.experiments,
    )
    catalog = build_catalog(seed, sizes)
    return State(seed, key=options.key, base_config=config, events=stores, catalog=catalog)


async def serve(options: Options) -> None:
    """Serve until SIGTERM/SIGINT; prints the ready JSON line once both listeners accept."""
    state = build_state(options)
    access = ControlAccess(options.control_token or secrets.token_urlsafe(32), options.host)
    api_sock = _bind(options.host, options.port)
    storage_sock = _bind(options.host, options.storage_port)
    url = f"http://{options.host}:{api_sock.getsockname()[1]}"
    state.storage_url = f"http://{options.host}:{storage_sock.getsockname()[1]}"

    def server(app: object) -> _Server:
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_level=options.log_level,
            access_log=False,
            timeout_graceful_shutdown=1,  # open keep-alive connections need no more
            timeout_keep_alive=30,
        )
        return _Server(config)

    api, storage = server(build_api_app(state, access)), server(build_storage_app(state))
    loop = asyncio.get_running_loop()

    def stop() -> None:
        api.should_exit = storage.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    tasks = [
        asyncio.create_task(api.serve(sockets=[api_sock])),
        asyncio.create_task(storage.serve(sockets=[storage_sock])),
    ]
    while not (api.started and storage.started):
        if any(t.done() for t in tasks):
            stop()  # one listener failed to start: take the other down too
            break
        await asyncio.sleep(0.01)
    else:
        ready = {"url": url, "storage_url": state.storage_url, "key": options.key,
                 "project_id": options.project_id, "control_token": access.token}  # fmt: skip
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.write(
            f"PostHog stand-in serving {url} (project {options.project_id}, key {options.key})\n"
        )
        sys.stdout.flush()
    await asyncio.gather(*tasks)


def run(options: Options) -> None:
    """Run :func:`serve` on uvloop when it is installed (faster big downloads), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(options))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(options))

"""``python -m posthog_standin``: run the PostHog stand-in until SIGTERM/SIGINT.

On ready it prints one JSON line (url, storage_url, key, project_id, control_token) and a human
line to stdout.
"""

from __future__ import annotations

import argparse

from .runner import Options, run


def _token(value: str) -> str:
    """A fixed control token travels in an HTTP header, and an empty one would lock nothing."""
    if not value or not (value.isascii() and value.isprintable()) or " " in value:
        raise argparse.ArgumentTypeError("must be non-empty printable ASCII without spaces")
    return value


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m posthog_standin",
        description=(
            "Local stand-in for PostHog's exports, groups, insights, query API and catalog "
            "(annotations, cohorts, feature flags, actions, experiments)."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--storage-port", type=int, default=0, help="object-storage listener")
    parser.add_argument("--key", default="phx_standin_key", help="personal API key (all scopes)")
    parser.add_argument("--project-id", type=int, default=1)
    parser.add_argument("--insights", type=int, default=40)
    parser.add_argument("--dashboards", type=int, default=3)
    parser.add_argument("--group-types", type=int, default=3, help="at most 5, as in PostHog")
    parser.add_argument("--groups", type=int, default=250, help="groups per group type")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rate-limits",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="PostHog Cloud's per-key throttles (on by default)",
    )
    parser.add_argument(
        "--export-delay",
        type=float,
        default=0.0,
        help="seconds a PNG/CSV/XLSX/PDF export takes to render (the POST waits for it)",
    )
    parser.add_argument(
        "--events", type=int, default=20_000, help="events of the main project (HogQL /query/)"
    )
    parser.add_argument("--persons", type=int, default=2_000, help="persons of the main project")
    parser.add_argument(
        "--event-days", type=int, default=7, help="whole UTC days before today the events span"
    )
    parser.add_argument(
        "--personless-share",
        type=float,
        default=0.002,
        help="share of events whose distinct id maps to no person",
    )
    parser.add_argument("--annotations", type=int, default=30, help="live annotations")
    parser.add_argument("--cohorts", type=int, default=20, help="live cohorts")
    parser.add_argument("--feature-flags", type=int, default=40, help="live feature flags")
    parser.add_argument("--actions", type=int, default=15, help="live actions")
    parser.add_argument(
        "--experiments",
        type=int,
        default=4,
        help="live experiments (each needs a live flag of its own, deleted ones too)",
    )
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--control-token",
        type=_token,
        default=None,
        help="the token /_standin/ requests must send (default: a random one per start)",
    )
    args = parser.parse_args(argv)
    return Options(
        host=args.host,
        port=args.port,
        storage_port=args.storage_port,
        key=args.key,
        project_id=args.project_id,
        insights=args.insights,
        dashboards=args.dashboards,
        group_types=args.group_types,
        groups=args.groups,
        seed=args.seed,
        rate_limits=args.rate_limits,
        export_delay=args.export_delay,
        log_level=args.log_level,
        control_token=args.control_token,
        events=args.events,
        persons=args.persons,
        event_days=args.event_days,
        personless_share=args.personless_share,
        annotations=args.annotations,
        cohorts=args.cohorts,
        feature_flags=args.feature_flags,
        actions=args.actions,
        experiments=args.experiments,
    )


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()

"""A local stand-in for PostHog's REST API (exports, groups, insights, and HogQL queries over its
own events and persons), for tests and the demo.

Run it with ``python -m posthog_standin``; drive it from Python with
:class:`posthog_standin.server.StandinProcess` and ``StandinControl``. It imports nothing
from the rest of ``posthog_assets`` or from Dagster, and nothing at package runtime imports it.
This ``__init__`` stays empty of imports so ``server`` (the lightweight helpers) loads without
Starlette or uvicorn.
"""

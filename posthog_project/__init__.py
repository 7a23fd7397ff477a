"""This repository's own Dagster project: the code location (``definitions``) with its demo
component (``defs/posthog/defs.yaml``), the executor it runs with (``executor``), and the
commands behind ``make demo``, ``make ui`` and ``make check-defs``.

Not part of the library a user installs (``posthog_assets``); it uses it as a user would.
"""

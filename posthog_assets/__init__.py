"""Dagster assets for PostHog: exports, insight snapshots and groups, with sensors and checks.

Import from the submodules (``posthog_assets.api.client``, ``posthog_assets.resources``, ...): this
package module stays empty so that the HTTP client and the stand-in load without Dagster.
"""

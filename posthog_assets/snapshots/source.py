"""A snapshot source: one object that says what a snapshot table holds and how it is filled.

The asset factory (:mod:`posthog_assets.snapshots.factory`) turns any source into the same
fetch/write graph and calls the source, never the other way round: ``stage`` once in the fetch
step (page through PostHog, append rows to the staging files, return figures for the metadata),
``describe`` once in the write step (figures read back from the rows just written).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import duckdb

from posthog_assets.api.client import PostHogClient
from posthog_assets.resources import PostHogResource
from posthog_assets.snapshots.staging import StagedRows, StagedSnapshot
from posthog_assets.snapshots.writer import SnapshotTable, ViewSql


@dataclass
class StageRequest:
    """What a source gets to stage one snapshot's rows."""

    client: PostHogClient
    staging: StagedRows
    resource: PostHogResource
    #: The run config (an instance of the source's ``config_cls``), or None.
    config: Any
    log: logging.Logger | Any
    snapshot_at: str
    #: Staging of the source's companion tables, by table name.
    companions: Mapping[str, StagedRows] = field(default_factory=dict)


class SnapshotSource:
    """Base of every snapshot: override ``stage`` (and ``describe``/``scope`` if needed).

    Attributes:
        name: The asset's last key part and the translator's name for it (``insights``, ...).
        table: The DuckDB table, its columns and what one snapshot replaces (its scope).
        config_cls: Per-run settings shown in the launchpad, or None.
        views: Views (re)created in the write's transaction.
        companions: Tables derived from the same fetch, written in the same transaction, each
            its own asset of the same step (e.g. the tidy tables of the insights snapshot).
    """

    name: str
    table: SnapshotTable
    config_cls: type[dg.Config] | None = None
    views: Sequence[ViewSql] = ()
    companions: Sequence[SnapshotTable] = ()

    def scope(self, snapshot_at: str) -> dict[str, Any]:
        """Scope columns besides ``project_id`` that one snapshot replaces (e.g. its date)."""
        return {}

    def stage(self, request: StageRequest) -> Mapping[str, Any]:
        """Fetch from PostHog and append rows to ``request.staging``; return metadata figures."""
        raise NotImplementedError

    def describe(
        self, conn: duckdb.DuckDBPyConnection, staged: StagedSnapshot
    ) -> Mapping[str, Any]:
        """Figures read from the rows just written, for the materialization's metadata."""
        return {}

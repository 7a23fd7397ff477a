"""A snapshot source: one object that says what a snapshot table holds and how it is filled.

The asset factory (:mod:`posthog_assets.snapshots.factory`) turns any source into the same
fetch/write graph and calls the source, never the other way round: ``stage`` once in the fetch
step (page through PostHog, append rows to the staging files, return figures for the metadata),
``describe`` once in the write step (figures read back from the rows just written).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import duckdb

from posthog_assets.api.client import PostHogClient
from posthog_assets.resources import PostHogResource
from posthog_assets.snapshots.staging import StagedRows, StagedSnapshot
from posthog_assets.tables import Table


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
    #: The run's partition (a UTC day ``YYYY-MM-DD``) for a partitioned source.
    partition_key: str | None = None


class SnapshotSource:
    """Base of every snapshot: override ``stage`` (and ``describe`` if needed).

    Attributes:
        table: The DuckDB table's declaration (columns, key, scope, views, checks).
        config_cls: Per-run settings shown in the launchpad, or None.
        companions: Tables derived from the same fetch, written in the same transaction, each
            its own asset of the same step (e.g. the tidy tables of the insights snapshot).
        partitions_def: Partitions of a partitioned table (its ``partition`` column holds the
            key), or None.
    """

    table: Table
    config_cls: type[dg.Config] | None = None
    companions: Sequence[Table] = ()
    partitions_def: dg.PartitionsDefinition | None = None

    def stage(self, request: StageRequest) -> Mapping[str, Any]:
        """Fetch from PostHog and append rows to ``request.staging``; return metadata figures."""
        raise NotImplementedError

    def describe(
        self, conn: duckdb.DuckDBPyConnection, staged: StagedSnapshot
    ) -> Mapping[str, Any]:
        """Figures read from the rows just written, for the materialization's metadata."""
        return {}


class ListSource(SnapshotSource):
    """A table filled from one PostHog list: every item ``fetch`` yields becomes the rows
    ``flatten`` makes of it. A new table of this kind is its declaration, its flattener and one
    of these; ``figure`` names the row count in the materialization's metadata."""

    def __init__(
        self,
        table: Table,
        fetch: Callable[[PostHogClient], Iterable[Any]],
        flatten: Callable[[Any], Iterable[Mapping[str, Any]]],
        figure: str = "rows",
    ) -> None:
        self.table, self.fetch, self.flatten, self.figure = table, fetch, flatten, figure

    def stage(self, request: StageRequest) -> Mapping[str, Any]:
        items = self.fetch(request.client)
        return {self.figure: request.staging.write(r for i in items for r in self.flatten(i))}

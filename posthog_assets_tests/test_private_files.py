"""Local files other users cannot turn against the user, and local disk errors that fail at once.

Each test reproduces an attack by another local user (a folder created first, a planted symlink,
a link to /dev/zero, a huge or future-dated gate file) or a disk fault (``export_dir`` is a file,
a full or read-only disk), on real files, and shows it refused now, with a message naming the
setting and the path, and without a step retry.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster_duckdb import DuckDBResource

from posthog_assets.api import download, private_files
from posthog_assets.api.client import PostHogClient
from posthog_assets.api.polling import PollPolicy
from posthog_assets.api.private_files import UnsafePath
from posthog_assets.api.ratelimit import (
    DEFAULT,
    ENV_RATE_LIMIT_DIR,
    MAX_CLOCK_SKEW_S,
    FileState,
    GateState,
    GateWaitTooLong,
    RedisState,
    RequestGate,
    SharedStateUnavailable,
    default_state_dir,
    shared_state_path,
)
from posthog_assets.common import FAILURES_METADATA_KEY
from posthog_assets.exports.assets import build_posthog_export_assets
from posthog_assets.exports.log import build_posthog_exports_log_asset
from posthog_assets.exports.runner import (
    PENDING_MARKER_DIR,
    ExportDiskError,
    ExportRequest,
    ExportRunner,
    failure_kind,
)
from posthog_assets.resources import PostHogResource
from posthog_assets.snapshots import staging
from posthog_assets.snapshots.staging import STAGING_DIRNAME, StagedRows, staging_dir
from posthog_assets.snapshots.writer import writer_connection
from posthog_assets_tests.support.exports import (
    FAST_RETRY,
    PNG,
    export_posts,
    part_files,
    resources,
)
from posthog_assets_tests.support.projects import python_project
from posthog_assets_tests.support.redis import RedisServer
from posthog_assets_tests.support.snapshots import defs_assets, resources_for

pytestmark = pytest.mark.unit

HOST, KEY = "https://us.posthog.com", "phx_private_files_key"
GATE_REFUSED = "the shared rate-limit gate cannot use {gate} (folder from "
GATE_REFUSED += f"${ENV_RATE_LIMIT_DIR}, else a per-user default): "
NOT_ROOT = "changing a folder's owner needs root; the owner check is shown only as root"
#: Polls a fraction of a second apart.
FAST_POLL = PollPolicy(interval_s=0.05, max_interval_s=0.2, timeout_s=10)


class FakeTime:
    """A clock that moves only when someone sleeps."""

    def __init__(self) -> None:
        self.now = time.time()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common default umask, under which files would be 0644 and folders 0755."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> str:
    return oct(stat.S_IMODE(os.lstat(path).st_mode))


def _gate(directory: Path) -> Path:
    return shared_state_path(HOST, KEY, directory)


# ------------------------------------------------------------------------------------------------
# The shared gate's folder and file


def test_the_default_gate_folder_is_per_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No longer ``<tmp>/posthog-assets-ratelimit-<uid>``, which any user could create first."""
    monkeypatch.delenv(ENV_RATE_LIMIT_DIR)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_state_dir() == tmp_path / "run" / "posthog-assets" / "ratelimit"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_state_dir() == tmp_path / "cache" / "posthog-assets" / "ratelimit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / ".cache" / "posthog-assets" / "ratelimit"
    assert default_state_dir() == folder
    monkeypatch.setenv(ENV_RATE_LIMIT_DIR, str(tmp_path / "chosen"))
    assert default_state_dir() == tmp_path / "chosen"

    monkeypatch.delenv(ENV_RATE_LIMIT_DIR)
    gate = RequestGate(FileState(shared_state_path(HOST, KEY)))
    assert gate.acquire() == 0
    assert [_mode(p) for p in (folder.parent, folder, _gate(folder))] == ["0o700", "0o700", "0o600"]


def test_a_world_writable_gate_folder_is_refused_naming_it(
    tmp_path: Path, private_rate_limit_dir: Path
) -> None:
    """Another user who made the folder first (or a user's 0777 one) could plant or swap gates."""
    private_rate_limit_dir.mkdir()
    private_rate_limit_dir.chmod(0o777)
    gate = shared_state_path(HOST, KEY)  # the env var's folder, as the resource uses it

    with pytest.raises(SharedStateUnavailable) as err:
        PostHogClient(HOST, 1, KEY, rate_limit_state=gate)

    assert str(err.value) == GATE_REFUSED.format(gate=gate) + (
        f"refusing {private_rate_limit_dir}: it is writable by others (mode 0777)"
    )
    assert list(private_rate_limit_dir.iterdir()) == []


def test_a_symlinked_gate_folder_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "gates"
    link.symlink_to(target)

    with pytest.raises(SharedStateUnavailable) as err:
        FileState(_gate(link))

    assert str(err.value).endswith(f"refusing {link}: it is a symlink")
    assert list(target.iterdir()) == []


def test_a_plain_file_where_the_gate_folder_belongs_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "gates"
    folder.write_text("not a folder")

    with pytest.raises(SharedStateUnavailable) as err:
        FileState(_gate(folder))

    assert str(err.value).endswith(f"refusing {folder}: it is not a directory")


@pytest.mark.skipif(os.getuid() != 0, reason=NOT_ROOT)
def test_a_gate_folder_or_file_of_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "gates"
    folder.mkdir(mode=0o700)
    os.chown(folder, 1001, 1001)
    with pytest.raises(SharedStateUnavailable) as err:
        FileState(_gate(folder))
    assert str(err.value).endswith(f"refusing {folder}: it is owned by uid 1001")

    mine = tmp_path / "mine"
    planted = _gate(mine)
    mine.mkdir(mode=0o700)
    planted.write_text(json.dumps({"not_before": {"*": time.time() + 3600}}))
    os.chown(planted, 1001, 1001)
    with pytest.raises(SharedStateUnavailable) as err:
        RequestGate(FileState(planted)).acquire()
    assert str(err.value).endswith(f"refusing {planted}: it is owned by uid 1001")


def test_a_symlinked_gate_file_is_not_followed(tmp_path: Path) -> None:
    """The attack that overwrote ``~/.bashrc``: the gate's name points at the user's file."""
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH=$HOME/bin:$PATH\n")
    before = (victim.read_bytes(), victim.stat().st_mtime_ns)
    folder = tmp_path / "gates"
    folder.mkdir(mode=0o700)
    gate = _gate(folder)
    gate.symlink_to(victim)

    with pytest.raises(SharedStateUnavailable) as err:
        RequestGate(FileState(gate)).throttled(None, 30)

    assert str(err.value) == GATE_REFUSED.format(gate=gate) + f"refusing {gate}: it is a symlink"
    assert (victim.read_bytes(), victim.stat().st_mtime_ns) == before


@pytest.mark.timeout(30)
@pytest.mark.parametrize("plant", ["symlink_to_dev_zero", "fifo"])
def test_an_endless_gate_file_is_refused_without_reading_it(tmp_path: Path, plant: str) -> None:
    """A link to /dev/zero was read to the end (memory exhausted); a FIFO would block open."""
    folder = tmp_path / "gates"
    folder.mkdir(mode=0o700)
    gate = _gate(folder)
    if plant == "fifo":
        os.mkfifo(gate)
    else:
        gate.symlink_to("/dev/zero")

    with pytest.raises(SharedStateUnavailable) as err:
        RequestGate(FileState(gate)).acquire()

    why = "is not a regular file" if plant == "fifo" else "is a symlink"
    assert str(err.value).endswith(f"refusing {gate}: it {why}")


@pytest.mark.timeout(30)
def test_a_gate_file_over_the_cap_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Valid JSON, but 3 MB: read no further than the cap, warn, and start afresh."""
    folder = tmp_path / "gates"
    folder.mkdir(mode=0o700)
    gate = _gate(folder)
    gate.write_text(json.dumps({"logs": {DEFAULT: [time.time() + 10.0] * 300_000}}))
    assert gate.stat().st_size > 3 * private_files.MAX_READ_BYTES

    with caplog.at_level(logging.WARNING):
        assert RequestGate(FileState(gate)).acquire(max_wait_s=1) == 0

    assert f"the rate-limit state {gate} holds more than 1048576 bytes" in caplog.text
    assert gate.stat().st_size < 1000  # rewritten: the next reader is not slowed down
    assert _mode(gate) == "0o600"  # narrowed: it was made under the umask


@pytest.mark.parametrize("where", ["file", pytest.param("redis", marks=pytest.mark.integration)])
def test_future_dated_log_entries_no_longer_block(
    tmp_path: Path, request: pytest.FixtureRequest, where: str
) -> None:
    """480 requests logged a year ahead filled the 480/minute window for a year."""
    t = FakeTime()
    state: GateState
    if where == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flush()
        state = RedisState(server.url, HOST, KEY)
    else:
        folder = tmp_path / "gates"
        state = FileState(_gate(folder))
    year = 365 * 86400.0
    with state.locked() as stored:
        stored["logs"] = {DEFAULT: [round(t.now + year + k / 1000, 3) for k in range(480)]}

    gate = RequestGate(state, clock=t.clock, sleep=t.sleep)
    assert gate.acquire(DEFAULT, max_wait_s=1) == 0
    with state.locked() as stored:
        assert stored["logs"][DEFAULT] == [round(t.now, 3)]

    # Skew between hosts sharing Redis stays honoured: entries just ahead still count.
    with state.locked() as stored:
        ahead = t.now + MAX_CLOCK_SKEW_S / 2
        stored["logs"] = {DEFAULT: [round(ahead + k / 1000, 3) for k in range(480)]}
    with pytest.raises(GateWaitTooLong):
        gate.acquire(DEFAULT, max_wait_s=1)


# ------------------------------------------------------------------------------------------------
# Run markers, staging, the DuckDB file


def _resource_in_run(run_id: str) -> PostHogResource:
    resource = PostHogResource(host=HOST, project_id="1", personal_api_key=KEY)
    resource._run_id = run_id
    return resource


def test_run_markers_are_private_and_never_followed(
    tmp_path: Path, private_rate_limit_dir: Path, umask_022: None
) -> None:
    resource = _resource_in_run("run-1")
    assert resource._first_in_run("insecure-http") is True
    assert resource._first_in_run("insecure-http") is False  # another step of the run: silent
    warned = private_rate_limit_dir / "warned"
    [marker] = warned.iterdir()
    assert (_mode(private_rate_limit_dir), _mode(warned), _mode(marker)) == (
        "0o700", "0o700", "0o600",
    )  # fmt: skip

    victim = tmp_path / "bashrc"
    victim.write_text("alias ls='ls -F'\n")
    other = _resource_in_run("run-2")
    planted = other._run_marker("insecure-http")
    assert planted is not None
    planted.symlink_to(victim)
    assert other._first_in_run("insecure-http") is False
    assert victim.read_text() == "alias ls='ls -F'\n"

    warned.chmod(0o777)  # then nothing is created there at all
    assert _resource_in_run("run-3")._run_marker("insecure-http") is None


def test_staging_folders_and_files_are_private(tmp_path: Path, umask_022: None) -> None:
    db = tmp_path / "data" / "posthog.duckdb"
    folder = staging_dir(db, "run-1", "posthog__groups")
    with StagedRows(folder / "groups", ["id"]) as rows:
        rows.write([{"id": 1}])

    root = tmp_path / "data" / STAGING_DIRNAME
    assert [_mode(p) for p in (db.parent, root, root / "run-1", folder)] == ["0o700"] * 4
    assert [_mode(Path(f)) for f in rows.files] == ["0o600"]


def test_symlinked_staging_folders_are_refused_and_not_followed(tmp_path: Path) -> None:
    db = tmp_path / "posthog.duckdb"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("the user's file")

    root = tmp_path / STAGING_DIRNAME
    root.symlink_to(victim)
    with pytest.raises(UnsafePath, match=re.escape(f"refusing {root}: it is a symlink")):
        staging_dir(db, "run-1", "posthog__groups")
    root.unlink()

    (tmp_path / STAGING_DIRNAME / "run-1").mkdir(parents=True)
    planted = tmp_path / STAGING_DIRNAME / "run-1" / "posthog__groups"
    planted.symlink_to(victim)  # a retried fetch removes its folder first: not through this
    with pytest.raises(UnsafePath, match=re.escape(f"refusing {planted}: it is a symlink")):
        staging_dir(db, "run-1", "posthog__groups")
    assert (victim / "keep.txt").read_text() == "the user's file"


def test_a_database_folder_that_is_a_file_fails_at_once(tmp_path: Path) -> None:
    """DuckDB's own connect would retry such an error for about 100 s."""
    (tmp_path / "afile").write_text("")
    started = time.monotonic()
    resource = DuckDBResource(database=str(tmp_path / "afile" / "x.duckdb"))
    with pytest.raises(NotADirectoryError) as err, writer_connection(resource):
        pass
    assert time.monotonic() - started < 5
    assert err.value.filename == str(tmp_path / "afile")


@pytest.mark.integration
def test_the_duckdb_file_of_a_snapshot_write_is_private(
    defs: dg.Definitions, resources: dict[str, Any], db: Path, umask_022: None
) -> None:
    result = dg.materialize(defs_assets(defs, "group_types"), resources=resources)

    assert result.success
    assert _mode(db) == "0o600"
    assert _mode(db.parent / STAGING_DIRNAME) == "0o700"
    assert not Path(f"{db}.wal").exists()


def _fetch_failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    assert [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"] == []
    [failure] = result.get_step_failure_events()
    data = failure.step_failure_data.user_failure_data
    assert data is not None
    return str(data.description)


@pytest.mark.integration
@pytest.mark.parametrize("fault", ["ENOTDIR", "ENOSPC", "EROFS"])
def test_a_local_disk_error_fails_the_fetch_at_once_naming_duckdb_path(
    defs: dg.Definitions,
    posthog_resource: PostHogResource,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    """Was retried by the fetch's RetryPolicy (10 s, then 20 s) to fail the same way."""
    db = tmp_path / "data" / "posthog.duckdb"
    db.parent.mkdir()
    if fault == "ENOTDIR":
        db = tmp_path / "afile" / "posthog.duckdb"
        db.parent.write_text("")
    elif fault == "ENOSPC":
        monkeypatch.setattr(StagedRows, "write", lambda self, rows: _fail(errno.ENOSPC))
    else:
        monkeypatch.setattr(staging, "make_dir", lambda path: _fail(errno.EROFS))
    [asset] = defs_assets(defs, "group_types")

    result = dg.materialize(
        [asset], resources=resources_for(posthog_resource, db), raise_on_error=False
    )

    root = db.parent.resolve() / STAGING_DIRNAME
    expected = {
        "ENOTDIR": f"duckdb_path: cannot write {root}: [Errno 20] Not a directory",
        "ENOSPC": f"duckdb_path: cannot write {root / result.run_id / asset.node_def.name}: "
        "[Errno 28] No space left on device",
        "EROFS": f"duckdb_path: cannot write {root}: [Errno 30] Read-only file system",
    }
    assert _fetch_failure(result) == expected[fault]
    assert not (root / result.run_id / asset.node_def.name).exists()


# ------------------------------------------------------------------------------------------------
# Exports


def _runner(client: PostHogClient, tmp_path: Path, **kw: Any) -> ExportRunner:
    return ExportRunner(client, tmp_path / "exports", poll=FAST_POLL, **kw)


def _request() -> ExportRequest:
    return ExportRequest(asset_name="weekly", export_format=PNG, dedup_key="run-1", insight=1)


def _export_assets() -> list[dg.AssetsDefinition]:
    project = python_project({"name": "weekly_png", "insight": 1, "format": PNG})
    return build_posthog_export_assets(project=project, retry_policy=FAST_RETRY)


def _export_failure(result: dg.ExecuteInProcessResult) -> tuple[str, list[dict[str, Any]]]:
    description = _fetch_failure(result)
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    return description, failure.metadata[FAILURES_METADATA_KEY].value  # type: ignore[union-attr]


@pytest.mark.integration
def test_export_files_markers_and_the_log_database_are_private(
    posthog_resource: PostHogResource, control: Any, tmp_path: Path, umask_022: None
) -> None:
    assets = _export_assets()
    log = build_posthog_exports_log_asset(
        project=python_project({"name": "weekly_png", "insight": 1, "format": PNG}),
        export_keys=[k for a in assets for k in a.keys],
    )
    result = dg.materialize([*assets, log], resources=resources(posthog_resource, tmp_path))

    assert result.success
    folder = tmp_path / "exports" / "weekly_png"
    [exported] = folder.iterdir()
    assert (_mode(folder), _mode(exported)) == ("0o700", "0o600")
    assert _mode(tmp_path / "posthog.duckdb") == "0o600"


class Crash(BaseException):
    """The step's process dying mid-poll (nothing catches it)."""


@pytest.mark.integration
def test_a_pending_marker_is_private(client: PostHogClient, control: Any, tmp_path: Path) -> None:
    control.configure(export_post_held=False, export_delay_s=0.6)

    def crash(_: float) -> None:
        raise Crash

    with pytest.raises(Crash):
        _runner(client, tmp_path, sleep=crash).run(_request())

    pending = tmp_path / "exports" / "weekly" / PENDING_MARKER_DIR
    [marker] = pending.iterdir()
    assert (_mode(pending.parent), _mode(pending), _mode(marker)) == ("0o700", "0o700", "0o600")


@pytest.mark.integration
def test_a_symlinked_export_folder_is_refused_before_any_post(
    client: PostHogClient, control: Any, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "exports").mkdir()
    folder = tmp_path / "exports" / "weekly"
    folder.symlink_to(elsewhere)

    with pytest.raises(ExportDiskError) as err:
        _runner(client, tmp_path).run(_request())

    assert str(err.value) == (
        f"export_dir: cannot write {folder}: refusing {folder}: it is a symlink"
    )
    assert failure_kind(err.value) == ("ExportDiskError", False)
    assert export_posts(control) == [] and list(elsewhere.iterdir()) == []


@pytest.mark.integration
def test_an_export_dir_that_is_a_file_fails_at_once(
    posthog_resource: PostHogResource, control: Any, tmp_path: Path
) -> None:
    """ENOTDIR was retried as an OSError for over a minute, then flagged retryable."""
    (tmp_path / "exports").write_text("")  # the resource's export_dir

    result = dg.materialize(
        _export_assets(), resources=resources(posthog_resource, tmp_path), raise_on_error=False
    )

    description, recorded = _export_failure(result)
    message = f"export_dir: cannot write {tmp_path}/exports/weekly_png: [Errno 20] Not a directory"
    assert description == (
        "1 of 1 PostHog export(s) failed:\n"
        f"- weekly_png (export not created, ExportDiskError, not retryable): {message}"
    )
    assert [(f["retryable"], f["message"]) for f in recorded] == [(False, message)]
    assert export_posts(control) == []


@pytest.mark.integration
@pytest.mark.parametrize("fault", ["ENOSPC", "EROFS"])
def test_a_full_or_read_only_disk_fails_at_once_naming_the_created_export(
    posthog_resource: PostHogResource,
    client: PostHogClient,
    control: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    """The disk fails as the pending marker is written, after PostHog created the export."""
    if fault == "ENOSPC":  # the marker's .tmp is created, its bytes do not fit
        monkeypatch.setattr(private_files, "_write_all", lambda fd, data: _fail(errno.ENOSPC))
    else:
        monkeypatch.setattr(private_files, "open_private", lambda *a, **k: _fail(errno.EROFS))

    result = dg.materialize(
        _export_assets(), resources=resources(posthog_resource, tmp_path), raise_on_error=False
    )

    description, recorded = _export_failure(result)
    export_id = next(client.iter_exports())["id"]
    why = {"ENOSPC": "[Errno 28] No space left on device", "EROFS": "[Errno 30] Read-only file "
           "system"}[fault]  # fmt: skip
    folder = tmp_path / "exports" / "weekly_png"
    message = (
        f"export_dir: cannot write {folder}: {why} "
        f"(PostHog export {export_id} was created but could not be saved)"
    )
    assert description == (
        "1 of 1 PostHog export(s) failed:\n"
        f"- weekly_png (export {export_id}, ExportDiskError, not retryable): {message}"
    )
    assert "not created" not in description
    assert [(f["export_id"], f["retryable"]) for f in recorded] == [(export_id, False)]
    assert len(export_posts(control)) == 1
    assert list((folder / PENDING_MARKER_DIR).glob("*.tmp")) == []  # the failed write cleaned up


@pytest.mark.integration
def test_the_next_run_removes_an_empty_marker_tmp(
    posthog_resource: PostHogResource, control: Any, tmp_path: Path
) -> None:
    """What a writer killed by a full disk leaves: an empty ``.posthog-pending/*.tmp``."""
    pending = tmp_path / "exports" / "weekly_png" / PENDING_MARKER_DIR
    pending.mkdir(parents=True, mode=0o700)
    (pending / "0123456789abcdef.tmp").write_bytes(b"")

    result = dg.materialize(_export_assets(), resources=resources(posthog_resource, tmp_path))

    assert result.success
    assert not pending.exists() or list(pending.iterdir()) == []


@pytest.mark.integration
def test_a_full_disk_during_the_download_is_not_retried(
    client: PostHogClient, control: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was wrapped as a retryable download error and fetched again and again."""

    def full_disk(self: Any) -> None:
        while self.chunks.get() is not None:
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(download._Writer, "run", full_disk)

    with pytest.raises(ExportDiskError) as err:
        _runner(client, tmp_path).run(_request())

    export_id = next(client.iter_exports())["id"]
    folder = tmp_path / "exports" / "weekly"
    assert str(err.value) == (
        f"export_dir: cannot write {folder}: [Errno 28] No space left on device "
        f"(PostHog export {export_id} was created but could not be saved)"
    )
    assert failure_kind(err.value) == ("ExportDiskError", False)
    contents = [r for r in control.requests_log() if "/content" in r["path"]]
    assert len(contents) == 1
    assert part_files(tmp_path) == []


def _fail(code: int) -> Any:
    """What the disk says: ``OSError(code)`` as the kernel words it."""
    raise OSError(code, os.strerror(code))

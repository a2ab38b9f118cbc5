"""The archive flow under a real Prefect server: failures leave landing intact, LTS writes obey limits."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from skyvault.archive import lts as lts_module
from skyvault.archive.lts import (
    build_manifest,
    dataset_lock,
    read_manifest,
    verify_datablock,
    write_datablock,
    write_manifest,
)
from skyvault.archive.packing import dataset_source, list_dataset, plan_datablocks
from skyvault.config.settings import Settings, StoreSettings
from skyvault.errors import (
    InsufficientSpaceError,
    InvalidIdentifierError,
    MissingFilesError,
    VerificationError,
)
from skyvault.flows.archive import archive
from skyvault.models import ArchiveResult, Datablock, Manifest
from skyvault.storage.store import ObjectStore, open_store

pytestmark = pytest.mark.usefixtures("prefect_harness")


def fill_landing(store: ObjectStore, dataset_id: str, files: dict[str, bytes]) -> dict[str, bytes]:
    for rel, data in files.items():
        store.put_bytes(f"landing/{dataset_id}/{rel}", data)
    return files


def snapshot(store: ObjectStore, prefix: str) -> dict[str, str]:
    return {o.key: hashlib.sha256(store.get_bytes(o.key)).hexdigest() for o in store.list(prefix)}


def dataset_files(n: int, size: int) -> dict[str, bytes]:
    return {f"part-{i // 3}/file-{i:03d}.bin": os.urandom(size) for i in range(n)}


def small_blocks(configure: Callable[..., Settings], tmp_path: Path, **overrides: Any) -> Settings:
    """Local store and LTS in ``tmp_path``, 64 KiB datablocks, no free-space margin."""
    return configure(
        StoreSettings(root=tmp_path / "store"),
        lts={
            "root": str(tmp_path / "lts"),
            "create_root": True,
            "datablock_bytes": 64 * 1024,
            "free_space_margin_bytes": 0,
        },
        **overrides,
    )


@pytest.fixture
def local(configure: Callable[..., Settings], tmp_path: Path) -> Settings:
    return small_blocks(configure, tmp_path)


def test_corrupted_block_fails_the_run_keeps_landing_and_a_rerun_succeeds(
    local: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(local.store)
    fill_landing(store, "ds-corrupt", dataset_files(9, 20_000))
    landing = snapshot(store, "landing/ds-corrupt/")
    real_verify = lts_module.verify_datablock
    flipped: list[str] = []

    def flip_then_verify(lts: Any, dataset_id: str, block: Datablock) -> Datablock:
        if block.name == "ds-corrupt_00002.tar":
            path = lts.root / dataset_id / block.name
            data = bytearray(path.read_bytes())
            data[block.members[0].offset + 5] ^= 0x01
            path.write_bytes(bytes(data))
            flipped.append(block.name)
        return real_verify(lts, dataset_id, block)

    monkeypatch.setattr(lts_module, "verify_datablock", flip_then_verify)
    with pytest.raises(VerificationError) as err:
        archive("ds-corrupt")
    assert "ds-corrupt" in str(err.value)
    assert flipped == ["ds-corrupt_00002.tar"]
    assert "ds-corrupt_00002.tar" in str(err.value)
    assert snapshot(store, "landing/ds-corrupt/") == landing
    lts_dir = local.lts.root / "ds-corrupt"
    assert not lts_dir.exists() or list(lts_dir.iterdir()) == []

    monkeypatch.setattr(lts_module, "verify_datablock", real_verify)
    lts_dir.mkdir(parents=True, exist_ok=True)
    (lts_dir / "ds-corrupt_00042.tar").write_bytes(b"left by a crashed run")
    result = archive("ds-corrupt")
    assert result.created
    assert result.file_count == 9
    assert result.landing_deleted == 9
    assert list(store.list("landing/ds-corrupt/")) == []
    assert sorted(p.name for p in lts_dir.iterdir()) == sorted(
        [*(b.name for b in result.datablocks), "manifest.json"]
    )

    again = archive("ds-corrupt")
    assert not again.created
    assert again.datablocks == result.datablocks


def test_full_lts_fails_naming_dataset_and_space_and_keeps_landing(
    configure: Callable[..., Settings], tmp_path: Path, small_fs: Path
) -> None:
    settings = configure(
        StoreSettings(root=tmp_path / "store"),
        lts={
            "root": str(small_fs),
            "create_root": True,
            "datablock_bytes": 1 << 20,
            "free_space_margin_bytes": 4096,
        },
    )
    store = open_store(settings.store)
    fill_landing(store, "ds-full", dataset_files(6, 500_000))
    landing = snapshot(store, "landing/ds-full/")

    with pytest.raises(InsufficientSpaceError) as err:
        archive("ds-full")

    message = str(err.value)
    assert "ds-full" in message
    assert "bytes needed" in message
    assert "bytes free" in message
    assert snapshot(store, "landing/ds-full/") == landing
    assert sorted(p.relative_to(small_fs).as_posix() for p in small_fs.rglob("*")) == [
        ".locks",
        ".locks/archive-ds-full.lock",
    ]


def test_missing_dataset_and_unsafe_ids(local: Settings) -> None:
    with pytest.raises(MissingFilesError, match="ds-none"):
        archive("ds-none")
    for bad in ("../etc", "a/b", ".."):
        with pytest.raises(InvalidIdentifierError):
            archive(bad)
    assert not local.lts.root.exists() or list(local.lts.root.rglob("*.tar")) == []


@pytest.fixture
def lts_write_limit_one() -> Iterator[None]:
    with get_client(sync_client=True) as client:
        try:
            before: int | None = client.read_concurrency_limit_by_tag("lts-write").concurrency_limit
        except ObjectNotFound:
            before = None
        client.create_concurrency_limit(tag="lts-write", concurrency_limit=1)
    try:
        yield
    finally:
        with get_client(sync_client=True) as client:
            if before is None:
                client.delete_concurrency_limit_by_tag("lts-write")
            else:
                client.create_concurrency_limit(tag="lts-write", concurrency_limit=before)


@pytest.mark.usefixtures("lts_write_limit_one")
def test_lts_write_limit_keeps_two_archive_runs_from_writing_at_once(local: Settings) -> None:
    store = open_store(local.store)
    for dataset_id in ("ds-left", "ds-right"):
        fill_landing(store, dataset_id, dataset_files(3, 40_000))
    results: dict[str, ArchiveResult] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(dataset_id: str) -> None:
        start.wait()
        try:
            results[dataset_id] = archive(dataset_id)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(d,)) for d in ("ds-left", "ds-right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    intervals = []
    for result in results.values():
        for block in result.datablocks:
            assert block.write_started is not None
            assert block.write_finished is not None
            intervals.append((block.write_started, block.write_finished, result.dataset_id))
    intervals.sort()
    assert len(intervals) == 6
    assert {d for _, _, d in intervals} == {"ds-left", "ds-right"}
    for (_, finished, _), (started, _, _) in itertools.pairwise(intervals):
        assert started >= finished


# --- SIGKILL at any point: the next run converges ----------------------------------------------------

#: ``python -c RUNNER <slow> <skyvault args...>``: the ``skyvault`` command, with datablock writes
#: (``write``), landing deletions (``delete``) or uploads (``upload``) slowed down so a test can
#: kill it, or overtake it, in the middle.
RUNNER = """
import sys, threading, time
from skyvault.archive import lts
from skyvault.storage.store import LocalStore

if sys.argv[1] == "write":
    write = lts._TarWriter.write

    def slow_write(self, data):
        time.sleep(0.05)
        write(self, data)

    lts._TarWriter.write = slow_write
elif sys.argv[1] == "delete":
    delete, one_at_a_time = LocalStore.delete, threading.Lock()

    def slow_delete(self, key):
        with one_at_a_time:
            time.sleep(0.3)
            delete(self, key)

    LocalStore.delete = slow_delete
elif sys.argv[1] == "upload":
    put_file, one_at_a_time = LocalStore.put_file, threading.Lock()

    def slow_put_file(self, key, path, content_type=None):
        with one_at_a_time:
            time.sleep(2.0)
            put_file(self, key, path, content_type)

    LocalStore.put_file = slow_put_file

from skyvault.cli import main

raise SystemExit(main(sys.argv[2:]))
"""


def skyvault_env(tmp_path: Path, api_url: str | None) -> dict[str, str]:
    """This environment without Prefect settings: the harness server's URL, or none (ephemeral)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if api_url is None:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    else:
        env["PREFECT_API_URL"] = api_url
    return env


def start_skyvault(env: dict[str, str], slow: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, slow, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the ephemeral server dies with it
    )


def wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Wait until ``ready()`` while ``proc`` still runs."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the run ended (exit {proc.returncode}) before it got there:\n{out}")
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.01)


def kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the process group of ``proc`` (it and the ephemeral server it may have started)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    if proc.stdout:
        proc.stdout.close()


def kill_when(proc: subprocess.Popen[str], ready: Callable[[], bool]) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``."""
    try:
        wait_for(proc, ready)
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL


def skyvault_result(out: str) -> dict[str, Any]:
    """The JSON result the ``skyvault`` command prints (among Prefect's log lines)."""
    result, _ = json.JSONDecoder().raw_decode(out[out.index('{\n  "dataset_id"') :])
    assert isinstance(result, dict)
    return result


def run_skyvault(env: dict[str, str], *args: str) -> dict[str, Any]:
    """Run the command to its end (at most 300 s; then it and its temporary server are killed)."""
    proc = start_skyvault(env, "none", *args)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        kill(proc)
        pytest.fail(f"skyvault {' '.join(args)} did not end within 300 s")
    assert proc.returncode == 0, out
    return skyvault_result(out)


def reference_archive(settings: Settings, dataset_id: str, root: Path) -> Manifest:
    """What an uninterrupted archive of the landing data writes, made by the library into ``root``."""
    lts = settings.lts.model_copy(update={"root": root})
    source = dataset_source(dataset_id)
    plan = plan_datablocks(dataset_id, list_dataset(source, settings.store), lts.datablock_bytes)
    blocks = [
        verify_datablock(lts, dataset_id, write_datablock(b, source, settings.store, lts)) for b in plan
    ]
    manifest = build_manifest(source, lts, blocks)
    write_manifest(lts, manifest)
    return manifest


def without_times(manifest: Manifest) -> dict[str, Any]:
    data = manifest.model_dump(mode="json", exclude={"created"})
    for block in data["datablocks"]:
        block.pop("write_started")
        block.pop("write_finished")
    return data


def assert_same_archive(settings: Settings, dataset_id: str, reference: Path) -> None:
    """LTS holds exactly the reference run's datablocks (byte for byte) and manifest, nothing else."""
    folder, want = settings.lts.root / dataset_id, reference / dataset_id
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in want.iterdir())
    for block in want.glob("*.tar"):
        assert (folder / block.name).read_bytes() == block.read_bytes(), block.name
    got = read_manifest(settings.lts, dataset_id)
    expected = read_manifest(settings.lts.model_copy(update={"root": reference}), dataset_id)
    assert got is not None
    assert expected is not None
    assert without_times(got) == without_times(expected)
    assert list(settings.lts.root.rglob("*.part")) == []


def archived_content(settings: Settings, dataset_id: str) -> dict[str, bytes]:
    content = {}
    for block in sorted((settings.lts.root / dataset_id).glob("*.tar")):
        with tarfile.open(block) as tar:
            for member in tar.getmembers():
                f = tar.extractfile(member)
                assert f is not None
                content[member.name] = f.read()
    return content


@pytest.fixture
def killable(configure: Callable[..., Settings], tmp_path: Path) -> Settings:
    """Local store and LTS; a run that had to wait for the dataset lock would fail after 5 s."""
    return small_blocks(configure, tmp_path, locks={"wait_seconds": 5})


def test_an_archive_killed_while_writing_a_datablock_is_finished_by_the_next_run(
    configure: Callable[..., Settings], tmp_path: Path
) -> None:
    # One lts-write slot: the killed run dies holding it, and the next run needs it back.
    killable = small_blocks(
        configure, tmp_path, locks={"wait_seconds": 5}, concurrency={"tag_limits": {"lts-write": 1}}
    )
    store = open_store(killable.store)
    files = fill_landing(store, "ds-kill", dataset_files(9, 20_000))
    landing = snapshot(store, "landing/ds-kill/")
    reference_archive(killable, "ds-kill", tmp_path / "reference")
    folder = killable.lts.root / "ds-kill"

    def writing() -> bool:
        return any(p.stat().st_size > 0 for p in folder.glob("*.part")) if folder.is_dir() else False

    # The embedded default: each command starts a temporary server on one PREFECT_HOME, and no
    # server service gives back a dead run's tag slots; the next command does.
    env = skyvault_env(tmp_path, None)
    kill_when(start_skyvault(env, "write", "archive", "ds-kill"), writing)

    assert list(folder.glob("*.part")) != []
    assert read_manifest(killable.lts, "ds-kill") is None
    assert snapshot(store, "landing/ds-kill/") == landing
    with dataset_lock(killable.lts, "archive", "ds-kill", timeout_seconds=0):
        pass  # the dead run's lock is free at once

    started = time.monotonic()
    result = run_skyvault(env, "archive", "ds-kill")

    # the dead run's slot came back after its 60 s lease, not never
    assert time.monotonic() - started < 200
    assert result["created"]
    assert (result["file_count"], result["landing_deleted"]) == (9, 9)
    assert list(store.list("landing/ds-kill/")) == []
    assert_same_archive(killable, "ds-kill", tmp_path / "reference")
    assert archived_content(killable, "ds-kill") == files


def test_an_archive_killed_while_deleting_landing_data_is_finished_by_the_next_run(
    killable: Settings, tmp_path: Path
) -> None:
    store = open_store(killable.store)
    files = fill_landing(store, "ds-del", dataset_files(9, 20_000))
    reference_archive(killable, "ds-del", tmp_path / "reference")

    def deleting() -> bool:
        left = len(list(store.list("landing/ds-del/")))
        return read_manifest(killable.lts, "ds-del") is not None and 1 <= len(files) - left <= len(files) - 2

    # The embedded default: no PREFECT_API_URL, each run starts its own ephemeral server.
    env = skyvault_env(tmp_path, None)
    kill_when(start_skyvault(env, "delete", "archive", "ds-del"), deleting)

    left = len(list(store.list("landing/ds-del/")))
    assert 1 <= len(files) - left <= len(files) - 2
    assert_same_archive(killable, "ds-del", tmp_path / "reference")

    result = run_skyvault(env, "archive", "ds-del")

    assert not result["created"]
    assert result["landing_deleted"] == left
    assert result["file_count"] == len(files)
    assert list(store.list("landing/ds-del/")) == []
    assert_same_archive(killable, "ds-del", tmp_path / "reference")
    assert archived_content(killable, "ds-del") == files

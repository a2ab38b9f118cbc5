"""The archive flow under a real Prefect server: failures leave landing intact, LTS writes obey limits."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from skyvault.archive import lts as lts_module
from skyvault.config.settings import Settings, StoreSettings
from skyvault.errors import (
    InsufficientSpaceError,
    InvalidIdentifierError,
    MissingFilesError,
    VerificationError,
)
from skyvault.flows.archive import archive
from skyvault.models import ArchiveResult, Datablock
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


@pytest.fixture
def local(configure: Callable[..., Settings], tmp_path: Path) -> Settings:
    return configure(
        StoreSettings(root=tmp_path / "store"),
        lts={
            "root": str(tmp_path / "lts"),
            "create_root": True,
            "datablock_bytes": 64 * 1024,
            "free_space_margin_bytes": 0,
        },
    )


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
    assert list(small_fs.rglob("*")) == []


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

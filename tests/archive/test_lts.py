"""LTS: datablocks streamed, checksummed, verified uncached; space checks; manifests; retrieval."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import tarfile
from pathlib import Path

import pytest

from skyvault.archive.lts import (
    build_manifest,
    dataset_lock,
    download_script,
    ensure_free_space,
    lock_path,
    publish_retrieval,
    read_manifest,
    remove_partial,
    retrieved_copy_ok,
    upload_datablock,
    verify_datablock,
    write_datablock,
    write_manifest,
)
from skyvault.archive.packing import dataset_source, list_dataset, plan_datablocks
from skyvault.config.settings import LtsSettings, StoreSettings
from skyvault.errors import (
    DatasetError,
    InsufficientSpaceError,
    LockTimeoutError,
    MissingFilesError,
    VerificationError,
)
from skyvault.models import Datablock, DatasetSource
from skyvault.storage.store import open_store

CONTENT = {
    "a/b/c/deep.bin": os.urandom(70_000),
    "a/ünïcødé näme.txt": "grüße\n".encode() * 100,
    "empty.dat": b"",
    "x" * 120 + "/long-name.bin": os.urandom(1_000),
    "big.bin": os.urandom(300_000),
}


def make_dataset(root: Path, content: dict[str, bytes] = CONTENT) -> Path:
    for rel, data in content.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def lts(tmp_path: Path) -> LtsSettings:
    return LtsSettings(
        root=tmp_path / "lts", create_root=True, datablock_bytes=128 * 1024, free_space_margin_bytes=0
    )


def archive_local(
    root: Path, lts: LtsSettings, dataset_id: str = "ds1"
) -> tuple[DatasetSource, list[Datablock]]:
    source = dataset_source(dataset_id, source_dir=root)
    store = StoreSettings(root=root.parent / "store")
    plan = plan_datablocks(dataset_id, list_dataset(source, store), lts.datablock_bytes)
    return source, [verify_datablock(lts, dataset_id, write_datablock(b, source, store, lts)) for b in plan]


def test_written_blocks_are_standard_tars_with_exact_checksums(tmp_path: Path, lts: LtsSettings) -> None:
    make_dataset(tmp_path / "src")
    _, blocks = archive_local(tmp_path / "src", lts)

    folder = lts.root / "ds1"
    assert sorted(p.name for p in folder.iterdir()) == sorted(b.name for b in blocks)
    assert len(blocks) >= 2
    extracted = tmp_path / "out"
    extracted.mkdir()
    for block in blocks:
        path = folder / block.name
        assert path.stat().st_size == block.size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == block.sha256
        with tarfile.open(path) as tar:
            infos = tar.getmembers()
            assert [i.name for i in infos] == [m.path for m in block.members]
            assert [i.offset_data for i in infos] == [m.offset for m in block.members]
        subprocess.run(["tar", "-xf", str(path), "-C", str(extracted)], check=True)
    got = {p.relative_to(extracted).as_posix(): p.read_bytes() for p in extracted.rglob("*") if p.is_file()}
    assert got == CONTENT
    members = {m.path: m for b in blocks for m in b.members}
    assert {p: m.sha256 for p, m in members.items()} == {
        p: hashlib.sha256(d).hexdigest() for p, d in CONTENT.items()
    }


def test_planned_sizes_match_the_written_tars(tmp_path: Path, lts: LtsSettings) -> None:
    make_dataset(tmp_path / "src")
    source = dataset_source("ds1", source_dir=tmp_path / "src")
    plan = plan_datablocks("ds1", list_dataset(source, StoreSettings()), lts.datablock_bytes)
    big = [b for b in plan if any(f.path == "big.bin" for f in b.files)]
    assert [len(b.files) for b in big] == [1]
    for block in plan:
        written = write_datablock(block, source, StoreSettings(), lts)
        assert written.size == block.size == (lts.root / "ds1" / block.name).stat().st_size


def test_a_flipped_byte_fails_verification_naming_block_and_member(tmp_path: Path, lts: LtsSettings) -> None:
    make_dataset(tmp_path / "src")
    source = dataset_source("ds1", source_dir=tmp_path / "src")
    plan = plan_datablocks("ds1", list_dataset(source, StoreSettings()), lts.datablock_bytes)
    block = write_datablock(plan[0], source, StoreSettings(), lts)
    target = next(m for m in block.members if m.size)
    path = lts.root / "ds1" / block.name
    with open(path, "r+b") as f:
        f.seek(target.offset + target.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))

    with pytest.raises(VerificationError) as err:
        verify_datablock(lts, "ds1", block)
    assert "ds1" in str(err.value)
    assert block.name in str(err.value)
    assert target.path in str(err.value)


def test_truncated_or_missing_blocks_fail_verification(tmp_path: Path, lts: LtsSettings) -> None:
    make_dataset(tmp_path / "src")
    _, blocks = archive_local(tmp_path / "src", lts)
    path = lts.root / "ds1" / blocks[0].name
    os.truncate(path, blocks[0].size - 512)
    with pytest.raises(VerificationError, match="size"):
        verify_datablock(lts, "ds1", blocks[0])
    path.unlink()
    with pytest.raises(VerificationError, match="missing"):
        verify_datablock(lts, "ds1", blocks[0])


def test_a_source_that_shrinks_while_archiving_leaves_no_part_file(tmp_path: Path, lts: LtsSettings) -> None:
    make_dataset(tmp_path / "src")
    source = dataset_source("ds1", source_dir=tmp_path / "src")
    plan = plan_datablocks("ds1", list_dataset(source, StoreSettings()), lts.datablock_bytes)
    (tmp_path / "src" / "big.bin").write_bytes(b"short")
    block = next(b for b in plan if b.files[0].path == "big.bin")
    with pytest.raises(MissingFilesError, match=r"big\.bin"):
        write_datablock(block, source, StoreSettings(), lts)
    assert list((lts.root / "ds1").iterdir()) == []


def test_blocks_stream_from_the_object_store(tmp_path: Path, lts: LtsSettings) -> None:
    store = StoreSettings(root=tmp_path / "store")
    objects = open_store(store)
    for rel, data in CONTENT.items():
        objects.put_bytes(f"landing/ds1/{rel}", data)
    source = dataset_source("ds1")
    plan = plan_datablocks("ds1", list_dataset(source, store), lts.datablock_bytes)
    blocks = [verify_datablock(lts, "ds1", write_datablock(b, source, store, lts)) for b in plan]
    members = {m.path: m.sha256 for b in blocks for m in b.members}
    assert members == {p: hashlib.sha256(d).hexdigest() for p, d in CONTENT.items()}


def test_free_space_check_waits_then_fails_naming_dataset_and_bytes(small_fs: Path) -> None:
    lts = LtsSettings(
        root=small_fs / "lts", create_root=True, free_space_margin_bytes=100_000, free_space_wait_seconds=30
    )
    sleeps: list[float] = []
    now = [0.0]

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    with pytest.raises(InsufficientSpaceError) as err:
        ensure_free_space(lts, "ds-full", 3_000_000, sleep=sleep, clock=lambda: now[0])
    message = str(err.value)
    assert "ds-full" in message
    assert "3100000 bytes needed" in message
    assert sum(sleeps) == pytest.approx(30)


def test_free_space_check_passes_when_space_frees_up_during_the_wait(small_fs: Path) -> None:
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * 1_500_000)
    lts = LtsSettings(
        root=small_fs / "lts", create_root=True, free_space_margin_bytes=0, free_space_wait_seconds=60
    )
    assert (
        ensure_free_space(lts, "ds", 1_000_000, sleep=lambda s: filler.unlink(), clock=lambda: 0.0)
        >= 1_000_000
    )


def test_running_out_of_space_mid_write_names_dataset_and_leaves_nothing(
    tmp_path: Path, small_fs: Path
) -> None:
    make_dataset(tmp_path / "src", {"a.bin": os.urandom(1_500_000), "b.bin": os.urandom(1_500_000)})
    lts = LtsSettings(root=small_fs / "lts", create_root=True, datablock_bytes=10 << 20)
    source = dataset_source("ds-big", source_dir=tmp_path / "src")
    (block,) = plan_datablocks("ds-big", list_dataset(source, StoreSettings()), lts.datablock_bytes)
    with pytest.raises(InsufficientSpaceError) as err:
        write_datablock(block, source, StoreSettings(), lts)
    assert "ds-big" in str(err.value)
    assert block.name in str(err.value)
    assert list((lts.root / "ds-big").iterdir()) == []


def test_manifest_round_trip_and_cleanup_rules(tmp_path: Path, lts: LtsSettings) -> None:
    make_dataset(tmp_path / "src")
    source, blocks = archive_local(tmp_path / "src", lts)
    folder = lts.root / "ds1"
    assert read_manifest(lts, "ds1") is None
    (folder / "ds1_00099.tar.part").write_bytes(b"partial")

    assert sorted(remove_partial(lts, "ds1")) == sorted([*(b.name for b in blocks), "ds1_00099.tar.part"])
    assert not folder.exists()

    source, blocks = archive_local(tmp_path / "src", lts)
    manifest = build_manifest(source, lts, blocks)
    write_manifest(lts, manifest)
    assert read_manifest(lts, "ds1") == manifest
    assert manifest.file_count == len(CONTENT)
    assert manifest.total_bytes == sum(len(d) for d in CONTENT.values())
    (folder / "ds1_00099.tar.part").write_bytes(b"partial")
    assert remove_partial(lts, "ds1") == ["ds1_00099.tar.part"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*(b.name for b in blocks), "manifest.json"])


def test_download_script_fetches_and_checks_every_block(tmp_path: Path, lts: LtsSettings) -> None:
    make_dataset(tmp_path / "src")
    source, blocks = archive_local(tmp_path / "src", lts)
    manifest = build_manifest(source, lts, blocks)
    store = StoreSettings(root=tmp_path / "store")
    for block in blocks:
        assert not retrieved_copy_ok(lts, store, "ds1", block)
        upload_datablock(lts, store, "ds1", block)
        assert retrieved_copy_ok(lts, store, "ds1", block)

    result = publish_retrieval(lts, store, manifest, {b.name for b in blocks})
    objects = open_store(store)
    script = objects.get_bytes(result.script_key).decode()
    assert script == download_script("ds1", list(result.datablocks), result.expires_at)

    ok = subprocess.run(["bash", "-c", script, "download.sh", str(tmp_path / "dl")], capture_output=True)
    assert ok.returncode == 0, ok.stderr
    for block in blocks:
        assert (tmp_path / "dl" / block.name).read_bytes() == (lts.root / "ds1" / block.name).read_bytes()

    key = result.datablocks[0].key
    data = bytearray(objects.get_bytes(key))
    data[700] ^= 1
    objects.put_bytes(key, bytes(data))
    assert not retrieved_copy_ok(lts, store, "ds1", blocks[0])
    bad = subprocess.run(["bash", "-c", script, "download.sh", str(tmp_path / "dl2")], capture_output=True)
    assert bad.returncode != 0
    assert b"FAILED" in bad.stdout


def test_members_follow_links_only_inside_and_keep_them_as_links(tmp_path: Path, lts: LtsSettings) -> None:
    root = make_dataset(tmp_path / "src", {"data/x.bin": b"x" * 10})
    os.symlink("data/x.bin", root / "alias")
    _, blocks = archive_local(root, lts)
    members = {m.path: m for b in blocks for m in b.members}
    assert members["alias"].link == "data/x.bin"
    with tarfile.open(lts.root / "ds1" / blocks[0].name) as tar:
        assert tar.getmember("alias").issym()
        assert tar.getmember("alias").linkname == "data/x.bin"


def test_a_missing_lts_mount_fails_instead_of_filling_its_parent(tmp_path: Path) -> None:
    lts = LtsSettings(root=tmp_path / "mnt" / "lts")
    with pytest.raises(DatasetError, match=r"does not exist \(not mounted\?\).*'ds-1'"):
        ensure_free_space(lts, "ds-1", 10)
    assert not (tmp_path / "mnt").exists()
    ensure_free_space(lts.model_copy(update={"create_root": True}), "ds-1", 10)
    assert (tmp_path / "mnt" / "lts").is_dir()


def test_dataset_locks_are_per_kind_and_dataset_and_name_their_holder(
    tmp_path: Path, lts: LtsSettings
) -> None:
    with dataset_lock(lts, "archive", "ds1", timeout_seconds=0):
        assert lock_path(lts, "archive", "ds1") == lts.root / ".locks" / "archive-ds1.lock"
        me = f"{socket.gethostname()}:{os.getpid()}"
        with (
            pytest.raises(LockTimeoutError, match=rf"archive of dataset 'ds1'.*held by {me} after 0.2 s"),
            dataset_lock(lts, "archive", "ds1", timeout_seconds=0.2),
        ):
            pass
        with (
            dataset_lock(lts, "retrieve", "ds1", timeout_seconds=0),
            dataset_lock(lts, "archive", "ds2", timeout_seconds=0),
        ):
            pass
    with dataset_lock(lts, "archive", "ds1", timeout_seconds=0):
        pass

    missing = LtsSettings(root=tmp_path / "mnt" / "lts")
    with pytest.raises(
        DatasetError, match=r"does not exist \(not mounted\?\); cannot retrieve dataset 'ds1'"
    ):
        dataset_lock(missing, "retrieve", "ds1", timeout_seconds=0)
    assert not (tmp_path / "mnt").exists()

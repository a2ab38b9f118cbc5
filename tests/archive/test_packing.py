"""Datasets as files and files as datablocks: sources, safe member paths, deterministic plans."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import boto3
import pytest

from skyvault.archive.packing import (
    changed_files,
    check_member_path,
    dataset_source,
    delete_files,
    list_dataset,
    member_bytes,
    plan_datablocks,
)
from skyvault.config.settings import StoreSettings
from skyvault.errors import DatasetError, InvalidIdentifierError, MissingFilesError, UnsafePathError
from skyvault.models import DatasetFile


def _file(path: str, size: int) -> DatasetFile:
    return DatasetFile(path=path, source=f"landing/ds/{path}", size=size, mtime=1_700_000_000)


def _s3(settings: StoreSettings):
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def test_default_source_is_the_landing_prefix() -> None:
    source = dataset_source("run-42")
    assert (source.kind, source.location) == ("store", "landing/run-42/")
    assert dataset_source("run-42", source_prefix="incoming/x").location == "incoming/x/"


@pytest.mark.parametrize("bad", ["..", "../etc", "a/b", "/abs", "", "a..b"])
def test_unsafe_dataset_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidIdentifierError, match="dataset id"):
        dataset_source(bad)


def test_unsafe_prefix_and_two_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError, match="ds1"):
        dataset_source("ds1", source_prefix="landing/../secrets/")
    with pytest.raises(DatasetError, match="not both"):
        dataset_source("ds1", source_prefix="landing/ds1/", source_dir=tmp_path)


@pytest.mark.parametrize("bad", ["/etc/passwd", "a/../../b", "..", "a//b", "./a", "", "a\x00b"])
def test_unsafe_member_paths_are_refused(bad: str) -> None:
    with pytest.raises(UnsafePathError, match="ds1"):
        check_member_path(bad, "ds1")


def test_local_folder_lists_nested_files_and_inner_links(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "ünïcødé.txt").write_bytes(b"x" * 10)
    (root / "empty").write_bytes(b"")
    os.symlink("a/b/ünïcødé.txt", root / "link")
    os.symlink("b", root / "a" / "dirlink")

    files = list_dataset(dataset_source("ds", source_dir=root), StoreSettings(root=tmp_path / "store"))

    assert [(f.path, f.size, f.link) for f in files] == [
        ("a/b/ünïcødé.txt", 10, None),
        ("a/dirlink", 0, "b"),
        ("empty", 0, None),
        ("link", 0, "a/b/ünïcødé.txt"),
    ]


@pytest.mark.parametrize("target", ["../outside.txt", "/etc/hostname", "a/../../outside.txt"])
def test_links_leaving_the_dataset_are_refused(tmp_path: Path, target: str) -> None:
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside.txt").write_text("secret")
    os.symlink(target, root / "escape")
    with pytest.raises(UnsafePathError, match="escape"):
        list_dataset(dataset_source("ds", source_dir=root), StoreSettings(root=tmp_path / "store"))


def test_missing_folder_is_a_missing_files_error(tmp_path: Path) -> None:
    with pytest.raises(MissingFilesError, match="ds"):
        list_dataset(dataset_source("ds", source_dir=tmp_path / "nope"), StoreSettings(root=tmp_path))


def test_s3_listing_skips_folder_markers_and_refuses_dotdot_keys(s3_store_settings: StoreSettings) -> None:
    s3 = _s3(s3_store_settings)
    bucket = s3_store_settings.bucket
    s3.put_object(Bucket=bucket, Key="landing/ds/sub/", Body=b"")
    s3.put_object(Bucket=bucket, Key="landing/ds/sub/data.bin", Body=b"1234")
    source = dataset_source("ds")
    assert [(f.path, f.source, f.size) for f in list_dataset(source, s3_store_settings)] == [
        ("sub/data.bin", "landing/ds/sub/data.bin", 4)
    ]
    s3.put_object(Bucket=bucket, Key="landing/ds/x/../../evil", Body=b"!")
    with pytest.raises(UnsafePathError, match=r"x/\.\./\.\./evil"):
        list_dataset(source, s3_store_settings)


def test_plan_is_deterministic_and_bounded_by_the_target() -> None:
    files = [_file(f"d{i % 7}/f{i:04d}.dat", (i * 7919) % 5000) for i in range(300)]
    files.append(_file("huge.bin", 100_000))
    shuffled = files[:]
    random.Random(3).shuffle(shuffled)

    plan = plan_datablocks("ds", files, 20_480)

    assert plan == plan_datablocks("ds", shuffled, 20_480)
    assert [b.name for b in plan] == [f"ds_{i:05d}.tar" for i in range(1, len(plan) + 1)]
    planned = [f.path for b in plan for f in b.files]
    assert planned == sorted(f.path for f in files)
    for block in plan:
        if any(f.path == "huge.bin" for f in block.files):
            assert [f.path for f in block.files] == ["huge.bin"]
            assert block.size > 20_480
        else:
            assert block.size <= 20_480
        assert block.size % 10240 == 0
        assert block.size >= sum(member_bytes(f) for f in block.files) + 1024


def test_plan_refuses_empty_datasets_and_duplicates() -> None:
    with pytest.raises(MissingFilesError, match="ds"):
        plan_datablocks("ds", [], 1 << 20)
    with pytest.raises(UnsafePathError, match="twice"):
        plan_datablocks("ds", [_file("a", 1), _file("a", 2)], 1 << 20)


def test_delete_local_files_keeps_the_folder_itself(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"1")
    (root / "g").write_bytes(b"2")
    source = dataset_source("ds", source_dir=root)
    files = list_dataset(source, StoreSettings(root=tmp_path))

    assert delete_files(source, files, StoreSettings(root=tmp_path)) == 2
    assert root.is_dir()
    assert list(root.iterdir()) == []


def test_changed_files_compares_content_not_only_size(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    (root / "same").write_bytes(b"abc")
    (root / "edited").write_bytes(b"xyz")
    source = dataset_source("ds", source_dir=root)
    files = list_dataset(source, StoreSettings(root=tmp_path))
    expected = {
        "same": (3, hashlib.sha256(b"abc").hexdigest()),
        "edited": (3, hashlib.sha256(b"xy!").hexdigest()),
    }
    assert changed_files(source, files, StoreSettings(root=tmp_path), expected) == ["edited"]
    assert changed_files(source, files, StoreSettings(root=tmp_path), {}) == ["edited", "same"]

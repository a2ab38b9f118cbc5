from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import rasterio

from skyvault.config.settings import StoreSettings
from skyvault.errors import BucketNotFoundError, ObjectNotFoundError, StorageError
from skyvault.storage.store import LocalStore, ObjectStore, S3Store, open_store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return open_store(StoreSettings(root=tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_store_settings"))


def test_put_get_roundtrip(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(b"\x00\x01payload" * 100)
    store.put_file("cogs/c/p.tif", src)
    store.put_bytes("catalog/catalog.json", b"{}")
    dest = tmp_path / "out.bin"
    store.get_file("cogs/c/p.tif", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert store.get_bytes("catalog/catalog.json") == b"{}"
    with store.open_read("cogs/c/p.tif") as f:
        assert f.read() == src.read_bytes()
    info = store.head("cogs/c/p.tif")
    assert info is not None
    assert info.size == src.stat().st_size
    assert store.exists("cogs/c/p.tif")
    assert not store.exists("cogs/c")
    store.delete("cogs/c/p.tif")
    assert not store.exists("cogs/c/p.tif")


def test_missing_key_is_named(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError, match=r"nope/x\.tif"):
        store.get_bytes("nope/x.tif")
    with pytest.raises(ObjectNotFoundError, match=r"nope/x\.tif"):
        store.get_file("nope/x.tif", tmp_path / "x")
    assert store.head("nope/x.tif") is None


@pytest.mark.parametrize("key", ["", "/abs/key", "a/../b", "a//b", "./a", "a/.", "a\\b"])
def test_unsafe_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(StorageError, match="unsafe object key"):
        store.put_bytes(key, b"x")


def test_list_by_prefix_sorted_and_filtered(store: ObjectStore) -> None:
    for key in ["landing/a/2.tif", "landing/a/1.tif", "landing/ab/3.tif", "cogs/a/1.tif"]:
        store.put_bytes(key, b"x")
    assert [o.key for o in store.list("landing/a/")] == ["landing/a/1.tif", "landing/a/2.tif"]
    assert [o.key for o in store.list("landing/a")] == [
        "landing/a/1.tif",
        "landing/a/2.tif",
        "landing/ab/3.tif",
    ]
    assert list(store.list("nothing/")) == []


def test_s3_list_paginates_beyond_1000(s3_store_settings: StoreSettings) -> None:
    store = open_store(s3_store_settings)
    assert isinstance(store, S3Store)
    for i in range(1105):
        store._client.put_object(Bucket=store.bucket, Key=f"landing/many/{i:05d}.tif", Body=b"")
    keys = [o.key for o in store.list("landing/many/")]
    assert len(keys) == 1105
    assert keys[0] == "landing/many/00000.tif"
    assert keys[-1] == "landing/many/01104.tif"


def test_gdal_reads_in_place(store: ObjectStore, rgb_4326: Path) -> None:
    store.put_file("landing/c/rgb.tif", rgb_4326)
    with rasterio.Env(**store.gdal_env()), rasterio.open(store.gdal_path("landing/c/rgb.tif")) as ds:
        assert ds.count == 3
        assert ds.crs.to_epsg() == 4326
        with rasterio.open(rgb_4326) as ref:
            assert (ds.read() == ref.read()).all()


def test_s3_presigned_url_downloads(s3_store_settings: StoreSettings) -> None:
    store = open_store(s3_store_settings)
    store.put_bytes("retrieval/d/d_00000.tar", b"block")
    url = store.presigned_url("retrieval/d/d_00000.tar", 3600)
    assert "Signature" in url or "X-Amz-Signature" in url
    assert httpx.get(url).content == b"block"


def test_s3_missing_bucket_is_named(moto_endpoint: str) -> None:
    store = S3Store(
        StoreSettings(
            kind="s3",
            bucket="no-such-bucket-here",
            endpoint_url=moto_endpoint,
            access_key_id="test",
            secret_access_key="test",
        )
    )
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-here"):
        store.put_bytes("a/b", b"x")
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-here"):
        store.check_bucket()


def test_local_failed_write_keeps_old_object(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("cogs/c/p.tif", b"old")
    with pytest.raises(StorageError, match=r"cogs/c/p\.tif"):
        store.put_file("cogs/c/p.tif", tmp_path / "does-not-exist.tif")
    assert store.get_bytes("cogs/c/p.tif") == b"old"
    leftovers = [p.name for p in (tmp_path / "store" / "cogs" / "c").iterdir()]
    assert leftovers == ["p.tif"]


def test_local_listing_hides_partial_writes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("a/x", b"1")
    (tmp_path / "store" / "a" / ".x.abc.part").write_bytes(b"half")
    assert [o.key for o in store.list("a/")] == ["a/x"]

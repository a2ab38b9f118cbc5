from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform as transform_coords
from rio_cogeo.cogeo import cog_validate

from skyvault.cog.convert import (
    COG_MEDIA_TYPE,
    SOURCE_SHA256_TAG,
    cog_key,
    preprocess_product,
)
from skyvault.config.collections import CogProfile, CollectionConfig
from skyvault.config.settings import StoreSettings
from skyvault.errors import InvalidIdentifierError, RasterError
from skyvault.models import CogInfo, Product
from tests.conftest import write_raster

SMALL_TILES = CogProfile(blocksize=64)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def land(store: StoreSettings, collection: str, src: Path) -> Product:
    key = f"landing/{collection}/{src.name}"
    dest = store.root / key
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return Product(collection=collection, id=src.stem, source_key=key)


def cog_path(store: StoreSettings, info: CogInfo) -> Path:
    return store.root / info.key


@pytest.fixture
def store(tmp_path: Path) -> StoreSettings:
    return StoreSettings(root=tmp_path / "store")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    return tmp_path / "scratch"


def run(product: Product, collection: CollectionConfig, store: StoreSettings, scratch: Path, **kw) -> CogInfo:
    info = preprocess_product(product, collection, store, scratch, **kw)
    assert list(scratch.iterdir()) == [], "the scratch folder is cleaned"
    return info


def assert_valid_cog(path: Path) -> None:
    valid, errors, warns = cog_validate(path, strict=True, quiet=True)
    assert valid, (errors, warns)


def test_cog_key() -> None:
    assert cog_key("s2", "S2A_20240501") == "cogs/s2/S2A_20240501.tif"
    with pytest.raises(InvalidIdentifierError):
        cog_key("s2", "../escape")


def test_rgb_cog_is_valid_tiled_and_pixel_identical(
    rgb_4326: Path, store: StoreSettings, scratch: Path
) -> None:
    product = land(store, "rgb", rgb_4326)
    info = run(product, CollectionConfig(id="rgb", cog=SMALL_TILES), store, scratch)

    out = cog_path(store, info)
    assert info.key == "cogs/rgb/rgb_4326.tif"
    assert info.created
    assert info.sha256 == sha256(out)
    assert info.size == out.stat().st_size
    assert info.source_sha256 == sha256(rgb_4326)
    assert_valid_cog(out)
    with rasterio.open(rgb_4326) as src, rasterio.open(out) as cog:
        assert cog.crs == src.crs
        assert cog.transform == src.transform
        assert cog.profile["compress"].lower() == "deflate"
        assert cog.block_shapes[0] == (64, 64)
        assert cog.overviews(1) == [2, 4]
        assert np.array_equal(cog.read(), src.read())
        assert cog.tags()[SOURCE_SHA256_TAG] == info.source_sha256


def test_float_with_nodata_is_pixel_identical(float_utm: Path, store: StoreSettings, scratch: Path) -> None:
    product = land(store, "dem", float_utm)
    info = run(product, CollectionConfig(id="dem"), store, scratch)

    out = cog_path(store, info)
    assert_valid_cog(out)
    with rasterio.open(float_utm) as src, rasterio.open(out) as cog:
        assert cog.dtypes == ("float32",)
        assert cog.nodata == -9999.0
        assert cog.crs.to_epsg() == 32632
        assert np.array_equal(cog.read(), src.read())


def test_source_tags_and_tiff_datetime_are_kept(tmp_path: Path, store: StoreSettings, scratch: Path) -> None:
    tags = {"TIFFTAG_DATETIME": "2024:05:01 10:20:30", "MISSION": "demo-sat"}
    src = write_raster(
        tmp_path / "tagged.tif",
        np.ones((1, 64, 64), "uint8"),
        transform=from_origin(10, 46, 0.01, 0.01),
        tags=tags,
    )
    product = land(store, "t", src)
    for collection in (CollectionConfig(id="t"), CollectionConfig(id="t", target_crs="EPSG:3857")):
        info = run(product, collection, store, scratch, replace=True)
        with rasterio.open(cog_path(store, info)) as cog:
            assert tags.items() <= cog.tags().items()


def test_bigtiff_cog_records_the_source_checksum(rgb_4326: Path, store: StoreSettings, scratch: Path) -> None:
    product = land(store, "rgb", rgb_4326)
    info = run(product, CollectionConfig(id="rgb", cog=CogProfile(bigtiff="YES")), store, scratch)

    out = cog_path(store, info)
    assert out.read_bytes()[2:4] == b"\x2b\x00"  # BigTIFF magic 43
    assert_valid_cog(out)
    with rasterio.open(out) as cog:
        assert cog.tags()[SOURCE_SHA256_TAG] == sha256(rgb_4326)


def test_reprojection_to_web_mercator_keeps_values_in_place(
    rgb_4326: Path, store: StoreSettings, scratch: Path
) -> None:
    product = land(store, "rgb", rgb_4326)
    info = run(product, CollectionConfig(id="rgb", target_crs="EPSG:3857", cog=SMALL_TILES), store, scratch)

    out = cog_path(store, info)
    assert_valid_cog(out)
    with rasterio.open(rgb_4326) as src, rasterio.open(out) as cog:
        assert cog.crs.to_epsg() == 3857
        points = [(10.2, 45.8), (10.5, 45.5), (10.9, 45.1)]
        xs, ys = transform_coords("EPSG:4326", "EPSG:3857", *zip(*points, strict=True))
        for expected, got in zip(src.sample(points), cog.sample(list(zip(xs, ys, strict=True))), strict=True):
            assert np.abs(expected.astype(int) - got[:3].astype(int)).max() <= 2
            assert got[3] == 255  # GDAL adds an alpha band when warping data without nodata


def test_reprojection_of_utm_to_lonlat_fills_nodata_outside(
    float_utm: Path, store: StoreSettings, scratch: Path
) -> None:
    product = land(store, "dem", float_utm)
    info = run(product, CollectionConfig(id="dem", target_crs="EPSG:4326"), store, scratch)

    with rasterio.open(float_utm) as src, rasterio.open(cog_path(store, info)) as cog:
        assert cog.crs.to_epsg() == 4326
        assert cog.count == 1
        assert cog.nodata == -9999.0
        data = cog.read(1)
        assert data[0, 0] == -9999.0  # corner outside the rotated UTM footprint
        assert data[data != -9999.0].min() >= src.read(1)[:, 75:].min()
        row, col = 150, 250  # a valid pixel of the source, found again at its lon/lat
        x, y = src.xy(row, col)
        (lon,), (lat,) = transform_coords(src.crs, "EPSG:4326", [x], [y])
        (value,) = next(cog.sample([(lon, lat)]))
        assert abs(value - src.read(1)[row, col]) <= 1.5


def test_band_selection_reorders_bands(rgb_4326: Path, store: StoreSettings, scratch: Path) -> None:
    product = land(store, "rgb", rgb_4326)
    info = run(product, CollectionConfig(id="rgb", bands=[3, 1]), store, scratch)

    with rasterio.open(rgb_4326) as src, rasterio.open(cog_path(store, info)) as cog:
        assert cog.count == 2
        assert np.array_equal(cog.read(1), src.read(3))
        assert np.array_equal(cog.read(2), src.read(1))


def test_nodata_is_set_and_source_nodata_remapped(
    float_utm: Path, store: StoreSettings, scratch: Path
) -> None:
    product = land(store, "dem", float_utm)
    info = run(product, CollectionConfig(id="dem", nodata=-1.0), store, scratch)

    with rasterio.open(float_utm) as src, rasterio.open(cog_path(store, info)) as cog:
        assert cog.nodata == -1.0
        data, original = cog.read(1), src.read(1)
        assert (data[:, :75] == -1.0).all()
        assert np.array_equal(data[:, 75:], original[:, 75:])


def test_categorical_overviews_keep_the_class_set(
    tmp_path: Path, store: StoreSettings, scratch: Path
) -> None:
    classes = np.array([3, 7, 12], "uint8")
    rng = np.random.default_rng(1)
    data = classes[rng.integers(0, 3, size=(512, 512))]
    src = write_raster(tmp_path / "landcover.tif", data, transform=from_origin(10, 46, 0.001, 0.001))
    profile = CogProfile(
        blocksize=64, categorical=True, overview_resampling="nearest", warp_resampling="nearest"
    )
    product = land(store, "lc", src)
    info = run(
        product, CollectionConfig(id="lc", cog=profile, target_crs="EPSG:3857", nodata=0), store, scratch
    )

    out = cog_path(store, info)
    assert_valid_cog(out)
    with rasterio.open(out) as cog:
        levels = len(cog.overviews(1))
    assert levels >= 2
    for level in range(levels):
        with rasterio.open(out, overview_level=level) as ov:
            assert set(np.unique(ov.read(1))) <= {0, 3, 7, 12}


def test_second_run_skips_and_leaves_the_cog_untouched(
    rgb_4326: Path, store: StoreSettings, scratch: Path
) -> None:
    collection = CollectionConfig(id="rgb")
    product = land(store, "rgb", rgb_4326)
    first = run(product, collection, store, scratch)
    before = os.stat(cog_path(store, first))

    second = run(product, collection, store, scratch)

    after = os.stat(cog_path(store, second))
    assert not second.created
    assert second == first.model_copy(update={"created": False})
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )


def test_replace_rebuilds(rgb_4326: Path, store: StoreSettings, scratch: Path) -> None:
    collection = CollectionConfig(id="rgb")
    product = land(store, "rgb", rgb_4326)
    first = run(product, collection, store, scratch)
    before = os.stat(cog_path(store, first))

    again = run(product, collection, store, scratch, replace=True)

    assert again.created
    assert again.source_sha256 == first.source_sha256
    assert os.stat(cog_path(store, again)).st_ino != before.st_ino


def test_changed_source_rebuilds(rgb_4326: Path, store: StoreSettings, scratch: Path) -> None:
    collection = CollectionConfig(id="rgb")
    product = land(store, "rgb", rgb_4326)
    first = run(product, collection, store, scratch)
    with rasterio.open(rgb_4326) as src:
        changed = write_raster(
            rgb_4326.parent / "changed" / rgb_4326.name, 255 - src.read(), transform=src.transform
        )
    shutil.copyfile(changed, store.root / product.source_key)

    second = run(product, collection, store, scratch)

    assert second.created
    assert second.source_sha256 == sha256(changed) != first.source_sha256
    with rasterio.open(changed) as src, rasterio.open(cog_path(store, second)) as cog:
        assert np.array_equal(cog.read(), src.read())


def test_changed_collection_settings_rebuild(rgb_4326: Path, store: StoreSettings, scratch: Path) -> None:
    product = land(store, "rgb", rgb_4326)
    first = run(product, CollectionConfig(id="rgb"), store, scratch)

    second = run(product, CollectionConfig(id="rgb", target_crs="EPSG:3857"), store, scratch)

    assert second.created
    assert second.source_sha256 == first.source_sha256
    with rasterio.open(cog_path(store, second)) as cog:
        assert cog.crs.to_epsg() == 3857
    assert not run(product, CollectionConfig(id="rgb", target_crs="EPSG:3857"), store, scratch).created


def _truncated(tmp_path: Path) -> Path:
    src = write_raster(
        tmp_path / "full.tif", np.full((3, 256, 256), 9, "uint8"), transform=from_origin(10, 46, 0.01, 0.01)
    )
    data = src.read_bytes()
    path = tmp_path / "truncated.tif"
    path.write_bytes(data[: len(data) // 2])
    return path


def _header_only(tmp_path: Path) -> Path:
    path = tmp_path / "header_only.tif"
    path.write_bytes(_truncated(tmp_path).read_bytes()[:300])
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    return path


def _not_a_raster(tmp_path: Path) -> Path:
    path = tmp_path / "notes.tif"
    path.write_bytes(b"this is not a TIFF\n" * 100)
    return path


def _no_crs(tmp_path: Path) -> Path:
    data = np.ones((1, 32, 32), "uint8")
    return write_raster(tmp_path / "no_crs.tif", data, crs=None, transform=from_origin(10, 46, 0.1, 0.1))


def _no_transform(tmp_path: Path) -> Path:
    return write_raster(tmp_path / "no_transform.tif", np.ones((1, 32, 32), "uint8"), crs="EPSG:4326")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_truncated, "could not be converted"),
        (_header_only, "not a readable raster"),
        (_empty, "empty"),
        (_not_a_raster, "not a readable raster"),
        (_no_crs, "no CRS"),
        (_no_transform, "no geotransform"),
    ],
)
def test_bad_input_fails_naming_the_product_and_leaves_the_source(
    make, reason: str, tmp_path: Path, store: StoreSettings, scratch: Path
) -> None:
    (tmp_path / "made").mkdir()
    scratch.mkdir()
    product = land(store, "bad", make(tmp_path / "made"))
    source = store.root / product.source_key
    original = source.read_bytes()

    with pytest.raises(RasterError, match=reason) as caught:
        preprocess_product(product, CollectionConfig(id="bad"), store, scratch)

    message = str(caught.value)
    assert f"bad/{product.id}" in message
    assert product.source_key in message
    assert source.read_bytes() == original
    assert sorted(p.name for p in source.parent.iterdir()) == [source.name]
    assert not (store.root / "cogs").exists()
    assert list(scratch.iterdir()) == []


def test_missing_band_and_unrepresentable_nodata_fail(
    rgb_4326: Path, store: StoreSettings, scratch: Path
) -> None:
    product = land(store, "rgb", rgb_4326)
    with pytest.raises(RasterError, match=r"rgb/rgb_4326.*bands \[4\]"):
        preprocess_product(product, CollectionConfig(id="rgb", bands=[1, 4]), store, scratch)
    with pytest.raises(RasterError, match=r"rgb/rgb_4326.*cannot hold nodata"):
        preprocess_product(product, CollectionConfig(id="rgb", nodata=-9999), store, scratch)
    with pytest.raises(RasterError, match=r"rgb/rgb_4326.*not found"):
        preprocess_product(
            product.model_copy(update={"source_key": "landing/rgb/gone.tif"}),
            CollectionConfig(id="rgb"),
            store,
            scratch,
        )


def s3_client(settings: StoreSettings) -> tuple[Any, str]:
    assert settings.bucket
    client = boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    return client, settings.bucket


def test_s3_source_is_read_in_place_and_cog_uploaded(
    rgb_4326: Path, s3_store_settings: StoreSettings, tmp_path: Path
) -> None:
    s3, bucket = s3_client(s3_store_settings)
    source_key = "landing/rgb/rgb_4326.tif"
    s3.upload_file(str(rgb_4326), bucket, source_key)
    product = Product(collection="rgb", id="rgb_4326", source_key=source_key)
    collection = CollectionConfig(id="rgb", cog=SMALL_TILES)
    scratch = tmp_path / "scratch"

    first = run(product, collection, s3_store_settings, scratch)

    head = s3.head_object(Bucket=bucket, Key=first.key)
    assert head["ContentType"] == COG_MEDIA_TYPE
    assert head["ContentLength"] == first.size
    local = tmp_path / "cog.tif"
    s3.download_file(bucket, first.key, str(local))
    assert sha256(local) == first.sha256
    assert first.source_sha256 == sha256(rgb_4326)
    assert_valid_cog(local)
    with rasterio.open(rgb_4326) as src, rasterio.open(local) as cog:
        assert np.array_equal(cog.read(), src.read())

    second = run(product, collection, s3_store_settings, scratch)
    assert not second.created
    assert s3.head_object(Bucket=bucket, Key=first.key)["LastModified"] == head["LastModified"]

    with rasterio.open(rgb_4326) as src:
        changed = write_raster(tmp_path / "changed.tif", 255 - src.read(), transform=src.transform)
    s3.upload_file(str(changed), bucket, source_key)
    third = run(product, collection, s3_store_settings, scratch)
    assert third.created
    assert third.source_sha256 == sha256(changed)
    s3.download_file(bucket, first.key, str(local))
    with rasterio.open(changed) as src, rasterio.open(local) as cog:
        assert np.array_equal(cog.read(), src.read())
    assert s3.get_object(Bucket=bucket, Key=source_key)["Body"].read() == changed.read_bytes()


def test_bad_s3_source_fails_naming_the_product(s3_store_settings: StoreSettings, tmp_path: Path) -> None:
    s3, bucket = s3_client(s3_store_settings)
    source_key = "landing/bad/broken.tif"
    s3.upload_file(str(_truncated(tmp_path)), bucket, source_key)
    product = Product(collection="bad", id="broken", source_key=source_key)

    with pytest.raises(RasterError, match=r"bad/broken.*landing/bad/broken\.tif"):
        preprocess_product(product, CollectionConfig(id="bad"), s3_store_settings, tmp_path / "scratch")

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.transform import from_origin
from rasterio.warp import transform as transform_coords
from rio_cogeo.cogeo import cog_validate

from skyvault.cog.convert import (
    COG_MEDIA_TYPE,
    SOURCE_SHA256_TAG,
    cog_key,
    cog_problems,
    preprocess_product,
)
from skyvault.config.collections import CogProfile, CollectionConfig
from skyvault.config.settings import LimitSettings, StoreSettings
from skyvault.errors import (
    InvalidIdentifierError,
    LinkOutsideStoreError,
    RasterError,
    RasterLimitError,
    ScratchSpaceError,
)
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


def _layouts(folder: Path) -> list[Path]:
    """Files that break the COG rules in different ways, and two that keep them."""
    data = (np.arange(1100 * 1200, dtype=np.uint32) % 251).astype(np.uint8).reshape(1, 1100, 1200)
    striped = write_raster(folder / "striped.tif", data)
    tiled = folder / "tiled.tif"
    rasterio.shutil.copy(striped, tiled, driver="GTiff", tiled=True, blockxsize=256, blockysize=256)
    overviews_after_data = folder / "overviews_after_data.tif"
    shutil.copyfile(tiled, overviews_after_data)
    with rasterio.open(overviews_after_data, "r+") as ds:
        ds.build_overviews([2, 4, 8])
    cog = folder / "cog.tif"
    rasterio.shutil.copy(striped, cog, driver="COG", BLOCKSIZE="256")
    no_overviews = folder / "cog_without_overviews.tif"
    rasterio.shutil.copy(striped, no_overviews, driver="COG", OVERVIEWS="NONE")
    edited = folder / "edited.tif"
    shutil.copyfile(cog, edited)
    with rasterio.open(edited, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as ds:
        ds.write(np.flip(data), window=((0, 1100), (0, 1200)))
    small = write_raster(folder / "small.tif", data[:, :200, :300])
    return [striped, tiled, overviews_after_data, cog, no_overviews, edited, small]


def test_cog_rules_are_checked_as_rio_cogeo_checks_them(tmp_path: Path) -> None:
    for path in _layouts(tmp_path):
        _, errors, warnings = cog_validate(path, strict=True, quiet=True)
        assert cog_problems(path) == (errors, warnings), path.name
    assert cog_problems(tmp_path / "cog.tif") == ([], [])
    assert cog_problems(tmp_path / "edited.tif") != ([], [])


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


# --- guards: links, limits, scratch space --------------------------------------------------------


def huge_header(path: Path, size: int = 100_000) -> Path:
    """A tiny sparse GeoTIFF whose header claims ``size`` x ``size`` pixels (no tile is written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:4326",
        "transform": from_origin(0.0, 50.0, 1e-5, 1e-5),
        "tiled": True,
        "blockxsize": 1024,
        "blockysize": 1024,
        "compress": "deflate",
        "sparse_ok": True,
    }
    with rasterio.open(path, "w", **profile):
        pass
    return path


def test_huge_header_fails_before_any_pixel_is_read(
    tmp_path: Path, store: StoreSettings, scratch: Path
) -> None:
    product = land(store, "big", huge_header(tmp_path / "HUGE_1.tif"))
    assert (store.root / product.source_key).stat().st_size < 1024 * 1024

    with pytest.raises(RasterLimitError, match=r"big/HUGE_1.*100000 x 100000") as caught:
        preprocess_product(product, CollectionConfig(id="big"), store, scratch)

    message = str(caught.value)
    assert product.source_key in message
    assert f"limits.max_pixels = {LimitSettings().max_pixels}" in message
    assert "SKYVAULT_LIMITS__MAX_PIXELS" in message
    assert not (store.root / "cogs").exists()
    assert list(scratch.iterdir()) == []


def test_pixel_and_band_limits_are_configurable(tmp_path: Path, store: StoreSettings, scratch: Path) -> None:
    src = write_raster(
        tmp_path / "five.tif", np.ones((5, 64, 64), "uint8"), transform=from_origin(10, 70, 0.01, 0.01)
    )
    product = land(store, "b", src)
    collection = CollectionConfig(id="b")
    with pytest.raises(RasterLimitError, match=r"b/five.*5 bands.*limits\.max_bands = 4"):
        preprocess_product(product, collection, store, scratch, limits=LimitSettings(max_bands=4))
    with pytest.raises(RasterLimitError, match=r"b/five.*64 x 64.*limits\.max_pixels = 4000"):
        preprocess_product(product, collection, store, scratch, limits=LimitSettings(max_pixels=4000))
    reprojected = CollectionConfig(id="b", target_crs="EPSG:3413")  # polar stereographic: more pixels
    with pytest.raises(RasterLimitError, match=r"b/five.*reprojected to EPSG:3413.*limits\.max_pixels"):
        preprocess_product(product, reprojected, store, scratch, limits=LimitSettings(max_pixels=64 * 64))

    info = run(product, collection, store, scratch, limits=LimitSettings(max_bands=5, max_pixels=64 * 64))
    with rasterio.open(cog_path(store, info)) as cog:
        assert cog.count == 5


def test_source_linked_out_of_the_store_is_never_converted(
    rgb_4326: Path, store: StoreSettings, scratch: Path
) -> None:
    link = store.root / "landing" / "rgb" / "LINKED_1.tif"
    link.parent.mkdir(parents=True)
    link.symlink_to(rgb_4326)
    product = Product(collection="rgb", id="LINKED_1", source_key="landing/rgb/LINKED_1.tif")

    with pytest.raises(LinkOutsideStoreError, match=r"'landing/rgb/LINKED_1\.tif'.*outside the store root"):
        preprocess_product(product, CollectionConfig(id="rgb"), store, scratch)

    assert not (store.root / "cogs").exists()

    inside = land(store, "rgb", rgb_4326)
    (store.root / "landing" / "rgb" / "ALIAS_1.tif").symlink_to(store.root / inside.source_key)
    alias = Product(collection="rgb", id="ALIAS_1", source_key="landing/rgb/ALIAS_1.tif")
    info = run(alias, CollectionConfig(id="rgb"), store, scratch)
    assert info.source_sha256 == sha256(rgb_4326)


def test_files_gdal_would_read_outside_the_store_are_refused(
    rgb_4326: Path, tmp_path: Path, store: StoreSettings, scratch: Path
) -> None:
    vrt = tmp_path / "made" / "v.vrt"
    vrt.parent.mkdir()
    rasterio.shutil.copy(rgb_4326, vrt, driver="VRT")  # its source is a file outside the store
    product = land(store, "rgb", vrt)
    with pytest.raises(RasterError, match=r"rgb/v.*refers to files outside the store"):
        preprocess_product(product, CollectionConfig(id="rgb"), store, scratch)

    scene = land(store, "rgb", rgb_4326)
    outside_overviews = tmp_path / "made" / "overviews.tif"
    outside_overviews.write_bytes(rgb_4326.read_bytes())
    (store.root / (scene.source_key + ".ovr")).symlink_to(outside_overviews)
    with pytest.raises(RasterError, match=r"rgb/rgb_4326.*refers to files outside the store"):
        preprocess_product(scene, CollectionConfig(id="rgb"), store, scratch)
    assert not (store.root / "cogs").exists()


def _noise(path: Path, compress: str) -> Path:
    """A 1024 x 1024 3-band scene of 64 random rows repeated: DEFLATE cannot shrink it, ZSTD can."""
    rows = np.random.default_rng(0).integers(0, 256, (3, 64, 1024), dtype="uint8")
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": 1024,
        "height": 1024,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:4326",
        "transform": from_origin(10, 46, 0.001, 0.001),
        "tiled": True,
        "blockxsize": 1024,
        "blockysize": 1024,
        "compress": compress,
    }
    if compress == "zstd":
        profile["zstd_level"] = 19
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.tile(rows, (1, 16, 1)))
    return path


@pytest.mark.parametrize("compress", ["none", "zstd"], ids=["checked-up-front", "found-while-writing"])
def test_full_scratch_disk_is_reported_with_path_and_bytes(
    compress: str, tmp_path: Path, store: StoreSettings, small_fs: Path
) -> None:
    source = _noise(tmp_path / f"noise_{compress}.tif", compress)
    product = land(store, "n", source)
    scratch = small_fs / "scratch"

    with pytest.raises(ScratchSpaceError) as caught:
        preprocess_product(product, CollectionConfig(id="n"), store, scratch)

    message = str(caught.value)
    assert "n/noise_" in message
    assert f"no space left on the scratch disk at {scratch}" in message
    needed = int(re.search(r"needs about (\d+) bytes", message).group(1))  # type: ignore[union-attr]
    assert needed > shutil.disk_usage(small_fs).free
    assert "could not be converted" not in message
    assert list(scratch.iterdir()) == []
    assert not (store.root / "cogs").exists()


KILLED_CONVERSION = """
import sys, time
from pathlib import Path
from skyvault.cog import convert
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import StoreSettings
from skyvault.models import Product

def stop_here(*args, **kwargs):
    print("converted", flush=True)
    time.sleep(600)

convert._set_source_sha256 = stop_here  # stop once the COG is in the scratch folder
product = Product(collection="rgb", id="rgb_4326", source_key="landing/rgb/rgb_4326.tif")
store = StoreSettings(root=Path(sys.argv[1]))
convert.preprocess_product(product, CollectionConfig(id="rgb"), store, Path(sys.argv[2]))
"""


def test_scratch_folder_of_a_killed_conversion_is_removed_by_the_next_one(
    rgb_4326: Path, float_utm: Path, store: StoreSettings, scratch: Path
) -> None:
    product = land(store, "rgb", rgb_4326)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CONVERSION, str(store.root), str(scratch)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "converted"
        (left,) = scratch.iterdir()
        assert (left / "rgb_4326.tif").exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert left.exists(), "a killed conversion cannot clean up after itself"

    other = land(store, "dem", float_utm)
    run(other, CollectionConfig(id="dem"), store, scratch)  # asserts the scratch folder is empty after
    assert not left.exists()
    info = run(product, CollectionConfig(id="rgb"), store, scratch)
    assert info.source_sha256 == sha256(rgb_4326)

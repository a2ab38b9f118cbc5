from __future__ import annotations

import copy
import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from pyproj import Transformer
from rasterio.transform import from_origin
from shapely.geometry import MultiPolygon, Point, shape

from skyvault.checksum import sha256_file
from skyvault.cog.convert import cog_key
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import StoreSettings
from skyvault.errors import CatalogError, CogValidationError, MissingDatetimeError, RasterError
from skyvault.models import CogInfo, Product
from skyvault.stac.item import (
    COG_MEDIA_TYPE,
    build_item,
    item_times,
    parse_tiff_datetime,
    sample_shape,
    validate_item,
)
from skyvault.storage.store import open_store
from tests.conftest import write_raster

COLLECTION = CollectionConfig(id="scenes", title="Test scenes", description="Scenes for tests")
WHEN = dt.datetime(2024, 5, 17, 9, 30, tzinfo=dt.UTC)


def put_cog(src: Path, store: StoreSettings, collection: str, product_id: str, scratch: Path) -> CogInfo:
    """Convert ``src`` to a COG with GDAL's COG driver and put it at its contract key."""
    key = cog_key(collection, product_id)
    local = scratch / "made" / f"{collection}-{product_id}.tif"
    local.parent.mkdir(parents=True, exist_ok=True)
    rasterio.shutil.copy(src, local, driver="COG", BLOCKSIZE=256)
    sha, size = sha256_file(local)
    open_store(store).put_file(key, local)
    return CogInfo(
        collection=collection,
        product_id=product_id,
        key=key,
        sha256=sha,
        size=size,
        source_sha256=sha256_file(src)[0],
        created=True,
    )


def product(product_id: str = "scene-1", **kw: object) -> Product:
    fields: dict[str, object] = {"datetime": WHEN, **kw}
    return Product(
        collection=COLLECTION.id, id=product_id, source_key=f"landing/scenes/{product_id}.tif", **fields
    )


@pytest.fixture
def store(tmp_path: Path) -> StoreSettings:
    return StoreSettings(root=tmp_path / "store")


@pytest.fixture
def utm_cog(float_utm: Path, store: StoreSettings, tmp_path: Path) -> CogInfo:
    return put_cog(float_utm, store, COLLECTION.id, "scene-1", tmp_path)


def test_utm_footprint_lands_where_the_valid_pixels_are(utm_cog: CogInfo, store: StoreSettings) -> None:
    item = build_item(product(), utm_cog, COLLECTION, store)

    to_lonlat = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True)
    # valid data: columns 75..299 of a 300x200 grid at 30 m from (500000, 5000000)
    x0, x1, y0, y1 = 500000 + 75 * 30, 500000 + 300 * 30, 5000000 - 200 * 30, 5000000
    corners = [to_lonlat.transform(x, y) for x, y in [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]]
    geom = shape(item["geometry"])
    assert item["geometry"]["type"] == "Polygon"
    assert geom.is_valid
    assert geom.exterior.is_ccw
    tolerance = 1e-4  # degrees, about 10 m
    for lon, lat in corners:
        assert geom.exterior.distance(Point(lon, lat)) < tolerance
        assert min(Point(c).distance(Point(lon, lat)) for c in geom.exterior.coords) < tolerance

    lons = [c[0] for c in corners]
    lats = [c[1] for c in corners]
    assert item["bbox"] == pytest.approx([min(lons), min(lats), max(lons), max(lats)], abs=tolerance)

    inside_valid = to_lonlat.transform(500000 + 200 * 30, 5000000 - 100 * 30)
    inside_nodata = to_lonlat.transform(500000 + 30 * 30, 5000000 - 100 * 30)
    assert geom.contains(Point(inside_valid))
    assert not geom.contains(Point(inside_nodata))
    assert not geom.intersects(Point(to_lonlat.transform(500000 + 70 * 30, 5000000 - 100 * 30)))


def test_projection_raster_and_file_fields(utm_cog: CogInfo, store: StoreSettings, float_utm: Path) -> None:
    item = build_item(product(), utm_cog, COLLECTION, store)
    props = item["properties"]

    assert item["id"] == "scene-1"
    assert item["collection"] == "scenes"
    assert props["proj:code"] == "EPSG:32632"
    assert props["proj:shape"] == [200, 300]
    assert props["proj:transform"] == [30.0, 0.0, 500000.0, 0.0, -30.0, 5000000.0]
    assert props["proj:bbox"] == [500000.0, 4994000.0, 509000.0, 5000000.0]
    assert props["skyvault:cog_key"] == cog_key("scenes", "scene-1") == utm_cog.key
    assert props["skyvault:source_sha256"] == hashlib.sha256(float_utm.read_bytes()).hexdigest()

    asset = item["assets"]["data"]
    assert asset["href"] == open_store(store).url(utm_cog.key)
    assert asset["type"] == COG_MEDIA_TYPE
    assert asset["roles"] == ["data"]
    assert asset["title"]
    stored = Path(store.root) / utm_cog.key
    assert asset["file:size"] == stored.stat().st_size
    assert asset["file:checksum"] == "1220" + hashlib.sha256(stored.read_bytes()).hexdigest()

    with rasterio.open(float_utm) as src:
        values = src.read(1, masked=True).compressed().astype("float64")
    (band,) = asset["raster:bands"]
    assert band["nodata"] == -9999.0
    assert band["data_type"] == "float32"
    assert band["spatial_resolution"] == 30.0
    stats = band["statistics"]
    assert stats["minimum"] == pytest.approx(values.min())
    assert stats["maximum"] == pytest.approx(values.max())
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["stddev"] == pytest.approx(values.std())
    assert stats["valid_percent"] == pytest.approx(75.0)

    extensions = item["stac_extensions"]
    assert any("/projection/" in e for e in extensions)
    assert any("/raster/" in e for e in extensions)
    assert any("/file/" in e for e in extensions)
    validate_item(item)


def test_crs_without_epsg_code_is_written_as_wkt2(tmp_path: Path, store: StoreSettings) -> None:
    crs = "+proj=laea +lat_0=52 +lon_0=10 +x_0=4321000 +y_0=3210000 +ellps=GRS80 +units=m +no_defs"
    src = write_raster(
        tmp_path / "laea.tif",
        np.ones((1, 50, 60), dtype="uint8"),
        crs=crs,
        transform=from_origin(4321000, 3210000, 100, 100),
    )
    item = build_item(product(), put_cog(src, store, "scenes", "scene-1", tmp_path), COLLECTION, store)
    assert "proj:code" not in item["properties"]
    assert "PROJCRS" in item["properties"]["proj:wkt2"]
    lon, lat = shape(item["geometry"]).centroid.coords[0]
    assert 10.0 < lon < 10.2
    assert 51.9 < lat < 52.0


def test_large_raster_is_described_from_a_sample(tmp_path: Path, store: StoreSettings) -> None:
    assert sample_shape(3000, 4000) == (768, 1024)
    assert sample_shape(200, 300) == (200, 300)

    data = np.full((2048, 3072), 7, dtype="uint8")
    data[:, :768] = 0
    src = write_raster(
        tmp_path / "big.tif", data, crs="EPSG:4326", transform=from_origin(0.0, 2.048, 0.001, 0.001), nodata=0
    )
    item = build_item(product(), put_cog(src, store, "scenes", "scene-1", tmp_path), COLLECTION, store)
    assert item["bbox"] == pytest.approx([0.768, 0.0, 3.072, 2.048], abs=0.004)
    stats = item["assets"]["data"]["raster:bands"][0]["statistics"]
    assert stats["minimum"] == stats["maximum"] == 7
    assert stats["valid_percent"] == pytest.approx(75.0, abs=0.5)
    assert item["properties"]["proj:shape"] == [2048, 3072]


def _utm60_scene(tmp_path: Path, gap: bool) -> Path:
    # UTM 60N (central meridian 177E): eastings 780..900 km near the equator span about 179.5E..179.4W;
    # with ``gap``, the columns around 180 are nodata so the footprint has a part on each side
    data = np.ones((1, 40, 120), dtype="uint8")
    if gap:
        data[:, :, 48:60] = 0
    return write_raster(
        tmp_path / "dateline.tif",
        data,
        crs="EPSG:32660",
        transform=from_origin(780000, 120000, 1000, 1000),
        nodata=0,
    )


@pytest.mark.parametrize("source", ["utm", "utm-two-parts", "lonlat-beyond-180"])
def test_footprint_crossing_the_antimeridian_is_split(
    tmp_path: Path, store: StoreSettings, source: str
) -> None:
    if source == "lonlat-beyond-180":
        src = write_raster(
            tmp_path / "dateline.tif",
            np.ones((1, 40, 100), dtype="uint8"),
            crs="EPSG:4326",
            transform=from_origin(179.5, 1.1, 0.01, 0.01),
        )
    else:
        src = _utm60_scene(tmp_path, gap=source == "utm-two-parts")
    item = build_item(product(), put_cog(src, store, "scenes", "scene-1", tmp_path), COLLECTION, store)
    geom = shape(item["geometry"])
    assert isinstance(geom, MultiPolygon)
    assert len(geom.geoms) == 2
    for part in geom.geoms:
        minx, _, maxx, _ = part.bounds
        assert minx >= -180.0
        assert maxx <= 180.0
        assert maxx - minx < 2.0
    west, south, east, north = item["bbox"]
    assert west > east
    assert 179.0 < west < 180.0
    assert -180.0 < east < -179.0
    assert 0.6 < south < north < 1.2
    validate_item(item)


def test_all_nodata_raster_has_no_footprint(tmp_path: Path, store: StoreSettings) -> None:
    src = write_raster(
        tmp_path / "empty.tif",
        np.zeros((1, 20, 20), dtype="uint8"),
        transform=from_origin(10, 46, 0.01, 0.01),
        nodata=0,
    )
    cog = put_cog(src, store, "scenes", "scene-1", tmp_path)
    with pytest.raises(RasterError, match="scene-1"):
        build_item(product(), cog, COLLECTION, store)


def test_missing_or_changed_cog_is_refused(utm_cog: CogInfo, store: StoreSettings) -> None:
    with pytest.raises(CogValidationError, match="scene-1"):
        build_item(product(), utm_cog.model_copy(update={"size": utm_cog.size + 1}), COLLECTION, store)
    open_store(store).delete(utm_cog.key)
    with pytest.raises(RasterError, match=r"scene-1.*not found"):
        build_item(product(), utm_cog, COLLECTION, store)


# --- datetime rules -------------------------------------------------------------------------------


def test_product_datetime_wins_and_is_utc() -> None:
    naive = dt.datetime(2024, 1, 2, 3, 4, 5)
    assert item_times(product(datetime=naive), "2020:01:01 00:00:00") == (
        naive.replace(tzinfo=dt.UTC),
        None,
        None,
    )
    plus2 = dt.datetime(2024, 1, 2, 5, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert item_times(product(datetime=plus2), None)[0] == naive.replace(tzinfo=dt.UTC)


def test_range_only_gives_null_datetime_with_start_and_end(utm_cog: CogInfo, store: StoreSettings) -> None:
    start, end = WHEN, WHEN + dt.timedelta(minutes=5)
    item = build_item(
        product(datetime=None, start_datetime=start, end_datetime=end), utm_cog, COLLECTION, store
    )
    props = item["properties"]
    assert props["datetime"] is None
    assert props["start_datetime"] == "2024-05-17T09:30:00Z"
    assert props["end_datetime"] == "2024-05-17T09:35:00Z"
    validate_item(item)


def test_tiff_datetime_is_used_when_the_product_has_none(tmp_path: Path, store: StoreSettings) -> None:
    src = write_raster(
        tmp_path / "tagged.tif",
        np.ones((1, 16, 16), dtype="uint8"),
        transform=from_origin(10, 46, 0.01, 0.01),
        tags={"TIFFTAG_DATETIME": "2021:06:01 10:20:30"},
    )
    cog = put_cog(src, store, "scenes", "scene-1", tmp_path)
    item = build_item(product(datetime=None), cog, COLLECTION, store)
    assert item["properties"]["datetime"] == "2021-06-01T10:20:30Z"
    assert parse_tiff_datetime("2021:13:01 10:20:30") is None


def test_no_datetime_anywhere_names_the_product(utm_cog: CogInfo, store: StoreSettings) -> None:
    with pytest.raises(MissingDatetimeError, match="scene-1"):
        build_item(product(datetime=None), utm_cog, COLLECTION, store)
    with pytest.raises(MissingDatetimeError, match=r"scene-1.*malformed"):
        item_times(product(datetime=None), "yesterday")


# --- properties, sidecars and validation ---------------------------------------------------------


def test_product_properties_are_kept_and_bad_ones_skipped(utm_cog: CogInfo, store: StoreSettings) -> None:
    props = {
        "sar:polarizations": ["VV", "VH"],
        "browse:responsibleOrgName": "ESA",
        "platform": "sentinel-1a",
        "acquired": dt.datetime(2024, 5, 17, 9, 30, tzinfo=dt.UTC),
        "bad key": 1,
        "proj:code": "EPSG:4326",
        "datetime": "1999-01-01T00:00:00Z",
        "title": 42,
    }
    p = product(properties=props, sidecar_key="landing/scenes/scene-1.xml")
    item = build_item(p, utm_cog, COLLECTION, store)
    out = item["properties"]
    assert out["sar:polarizations"] == ["VV", "VH"]
    assert out["browse:responsibleOrgName"] == "ESA"
    assert out["platform"] == "sentinel-1a"
    assert out["acquired"] == "2024-05-17T09:30:00Z"
    assert "bad key" not in out
    assert out["proj:code"] == "EPSG:32632"
    assert out["datetime"] == "2024-05-17T09:30:00Z"
    assert "title" not in out
    assert out["skyvault:sidecar_key"] == "landing/scenes/scene-1.xml"
    sidecar = item["assets"]["metadata"]
    assert sidecar["roles"] == ["metadata"]
    assert sidecar["type"] == "application/xml"
    assert sidecar["href"] == open_store(store).url("landing/scenes/scene-1.xml")
    validate_item(item)


def test_validator_rejects_broken_items(utm_cog: CogInfo, store: StoreSettings) -> None:
    item = build_item(product(), utm_cog, COLLECTION, store)
    validate_item(item)

    no_datetime = copy.deepcopy(item)
    del no_datetime["properties"]["datetime"]
    with pytest.raises(CatalogError, match="scene-1"):
        validate_item(no_datetime)

    bad_bbox = copy.deepcopy(item)
    bad_bbox["bbox"] = [1.0, 2.0, 3.0]
    with pytest.raises(CatalogError, match="scene-1"):
        validate_item(bad_bbox)

    orphan_collection = copy.deepcopy(item)
    orphan_collection["links"] = []
    with pytest.raises(CatalogError, match="scene-1"):
        validate_item(orphan_collection)

    no_asset_href = copy.deepcopy(item)
    del no_asset_href["assets"]["data"]["href"]
    with pytest.raises(CatalogError, match="scene-1"):
        validate_item(no_asset_href)

from __future__ import annotations

import copy
import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine
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


# --- whole-Earth, off-disk, south-up and non-Earth rasters ---------------------------------------

GEOS_HALF_WIDTH = 5_570_000.0  # a little beyond the disk on every side: the corners are in space


def _geos(sweep: str) -> str:
    return f"+proj=geos +h=35785831 +lon_0=0 +sweep={sweep} +ellps=WGS84 +units=m +no_defs"


def _visible_extent(crs: str) -> tuple[float, float, float, float]:
    """Lon/lat extent of the Earth seen in ``crs``, from a dense grid of points through PROJ."""
    xs = np.linspace(-GEOS_HALF_WIDTH, GEOS_HALF_WIDTH, 3001)
    x, y = np.meshgrid(xs, xs)
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    on = np.isfinite(lon) & np.isfinite(lat)
    return float(lon[on].min()), float(lat[on].min()), float(lon[on].max()), float(lat[on].max())


def _assert_valid_with_bbox(item: dict[str, object]) -> None:
    geom = shape(item["geometry"])
    assert geom.is_valid
    bbox = item["bbox"]
    assert isinstance(bbox, list)
    if bbox[0] <= bbox[2]:
        assert np.allclose(geom.bounds, bbox, atol=1e-6)
    validate_item(item)


@pytest.mark.parametrize("sweep", ["x", "y"])
@pytest.mark.parametrize("with_nodata", [True, False])
def test_geostationary_full_disk_gets_the_visible_disk(
    tmp_path: Path, store: StoreSettings, sweep: str, with_nodata: bool
) -> None:
    crs = _geos(sweep)
    n = 400
    size = 2 * GEOS_HALF_WIDTH / n
    transform = from_origin(-GEOS_HALF_WIDTH, GEOS_HALF_WIDTH, size, size)
    centres = (np.arange(n) + 0.5) * size - GEOS_HALF_WIDTH
    x, y = np.meshgrid(centres, -centres)
    lon, _ = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    data = np.full((n, n), 200, dtype="uint8")
    if with_nodata:  # space is nodata, as in a real full-disk product
        data[~np.isfinite(lon)] = 0
    src = write_raster(
        tmp_path / "disk.tif", data, crs=crs, transform=transform, nodata=0 if with_nodata else None
    )
    item = build_item(product(), put_cog(src, store, "scenes", "scene-1", tmp_path), COLLECTION, store)

    _assert_valid_with_bbox(item)
    west, south, east, north = _visible_extent(crs)
    assert west < -81.0  # the limb seen from 35786 km
    assert east > 81.0
    assert np.allclose(item["bbox"], [west, south, east, north], atol=0.75)
    geom = shape(item["geometry"])
    assert geom.covers(Point(0.0, 0.0))
    assert geom.covers(Point(75.0, 0.0))
    assert geom.covers(Point(0.0, -75.0))
    assert not geom.intersects(Point(85.0, 0.0))
    assert not geom.intersects(Point(-120.0, 10.0))


def test_global_raster_with_holes_keeps_them(tmp_path: Path, store: StoreSettings) -> None:
    data = np.full((90, 180), 9, dtype="uint8")  # 2 degree pixels over -180..180, -90..90
    data[40:50, 174:178] = 0  # lon 168..176, lat -10..10, next to the antimeridian
    data[20:30, 80:90] = 0  # lon -20..0, lat 30..50
    data[60:70, 0:3] = 0  # a notch on the western edge: lon -180..-174, lat -50..-30
    src = write_raster(tmp_path / "world.tif", data, transform=from_origin(-180, 90, 2, 2), nodata=0)
    item = build_item(product(), put_cog(src, store, "scenes", "scene-1", tmp_path), COLLECTION, store)

    _assert_valid_with_bbox(item)
    assert item["bbox"] == [-180.0, -90.0, 180.0, 90.0]
    geom = shape(item["geometry"])
    for lon, lat in [(172.0, 5.0), (-10.0, 40.0), (-177.0, -40.0)]:
        assert not geom.intersects(Point(lon, lat)), (lon, lat)
    for lon, lat in [(179.0, 5.0), (165.0, 5.0), (0.0, 0.0), (-179.0, 20.0), (-170.0, -40.0)]:
        assert geom.covers(Point(lon, lat)), (lon, lat)
    assert geom.area == pytest.approx(360 * 180 - (8 * 20 + 20 * 20 + 6 * 20), rel=1e-6)


def test_global_raster_in_0_to_360_longitudes(tmp_path: Path, store: StoreSettings) -> None:
    data = np.full((90, 180), 9, dtype="uint8")  # 2 degree pixels over 0..360
    data[40:50, 85:95] = 0  # lon 170..190: a hole across the antimeridian, lat -10..10
    data[20:30, 40:50] = 0  # lon 80..100, lat 30..50
    src = write_raster(tmp_path / "world360.tif", data, transform=from_origin(0, 90, 2, 2), nodata=0)
    item = build_item(product(), put_cog(src, store, "scenes", "scene-1", tmp_path), COLLECTION, store)

    _assert_valid_with_bbox(item)
    assert item["bbox"] == [-180.0, -90.0, 180.0, 90.0]
    geom = shape(item["geometry"])
    for lon, lat in [(175.0, 5.0), (-175.0, 5.0), (90.0, 40.0)]:
        assert not geom.intersects(Point(lon, lat)), (lon, lat)
    for lon, lat in [(165.0, 5.0), (-165.0, 5.0), (179.5, 20.0), (0.0, 0.0), (-90.0, -60.0)]:
        assert geom.covers(Point(lon, lat)), (lon, lat)
    assert geom.area == pytest.approx(360 * 180 - 2 * 20 * 20, rel=1e-6)


def test_south_up_raster_is_read_the_right_way_round(tmp_path: Path, store: StoreSettings) -> None:
    data = np.full((20, 30), 5, dtype="uint8")
    data[:5, :] = 0  # the first 5 rows: the southern quarter of a south-up grid
    south_up = Affine(0.1, 0.0, 10.0, 0.0, 0.1, 40.0)  # row 0 at lat 40, rows run north
    src = write_raster(tmp_path / "south_up.tif", data, transform=south_up, nodata=0)
    item = build_item(product(), put_cog(src, store, "scenes", "scene-1", tmp_path), COLLECTION, store)

    _assert_valid_with_bbox(item)
    assert item["bbox"] == pytest.approx([10.0, 40.5, 13.0, 42.0])
    geom = shape(item["geometry"])
    assert geom.covers(Point(11.0, 41.5))
    assert not geom.intersects(Point(11.0, 40.2))
    assert item["properties"]["proj:bbox"] == pytest.approx([10.0, 40.0, 13.0, 42.0])


def test_polar_raster_footprint_covers_the_pole(tmp_path: Path, store: StoreSettings) -> None:
    data = np.full((100, 100), 3, dtype="uint8")
    data[48:52, 48:52] = 0  # nodata around the pole itself
    src = write_raster(
        tmp_path / "arctic.tif",
        data,
        crs="EPSG:3413",
        transform=from_origin(-3_000_000, 3_000_000, 60_000, 60_000),
        nodata=0,
    )
    item = build_item(product(), put_cog(src, store, "scenes", "scene-1", tmp_path), COLLECTION, store)

    _assert_valid_with_bbox(item)
    to_lonlat = Transformer.from_crs("EPSG:3413", "EPSG:4326", always_xy=True)
    _, corner_lat = to_lonlat.transform(3_000_000, 3_000_000)
    west, south, east, north = item["bbox"]
    assert west == pytest.approx(-180.0, abs=0.1)
    assert east == pytest.approx(180.0, abs=0.1)
    assert south == pytest.approx(corner_lat, abs=0.2)
    assert north == pytest.approx(90.0)
    geom = shape(item["geometry"])
    assert not geom.intersects(Point(0.0, 89.9))  # the hole over the pole
    for lon in (-170.0, -45.0, 0.0, 100.0, 179.0):
        assert geom.covers(Point(lon, 75.0)), lon
    assert not geom.intersects(Point(0.0, 45.0))


@pytest.mark.parametrize(
    "crs",
    ["IAU_2015:49900", "+proj=eqc +a=3396190 +b=3396190 +units=m +no_defs"],
    ids=["iau-mars", "proj-mars-sphere"],
)
def test_raster_in_a_non_earth_crs_fails_naming_the_product(
    tmp_path: Path, store: StoreSettings, crs: str
) -> None:
    src = write_raster(
        tmp_path / "mars.tif",
        np.full((1, 16, 16), 7, dtype="uint8"),
        crs=crs,
        transform=from_origin(100_000, 200_000, 1000, 1000),
    )
    cog = put_cog(src, store, "scenes", "olympus-1", tmp_path)
    with pytest.raises(RasterError, match="olympus-1") as caught:
        build_item(product("olympus-1"), cog, COLLECTION, store)
    assert "not on the Earth" in str(caught.value)
    assert "3396190" in str(caught.value)

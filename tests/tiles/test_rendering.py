from __future__ import annotations

import datetime as dt
import shutil
import warnings
from pathlib import Path
from typing import Any

import morecantile
import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.transform import from_origin
from rio_tiler.colormap import cmap

from skyvault.cog.convert import preprocess_product
from skyvault.config.collections import CogProfile, CollectionConfig, RenderConfig
from skyvault.config.settings import StoreSettings
from skyvault.models import Product, SeedRequest
from skyvault.stac.item import build_item
from skyvault.storage.store import open_store
from skyvault.tiles.seeding import plan_seed, render_chunk, tile_key, time_key
from tests.conftest import write_raster

#: The tile grid, taken from morecantile itself (not from the code under test).
GRID = morecantile.tms.get("WebMercatorQuad")
TO_MERCATOR = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
ZOOM = 11
TILE = 256
#: 256 x 256 px over 10.0..10.4E, 45.5..45.9N
AREA = from_origin(10.0, 45.9, 0.4 / 256, 0.4 / 256)
#: Land-cover classes in 64 px blocks; index 0 is nodata (its palette colour is opaque red).
CLASSES = np.array([[0, 1, 2, 3], [4, 5, 6, 1], [2, 3, 0, 5], [6, 4, 3, 2]], dtype="uint8")
PALETTE = {0: (255, 0, 0, 255), 1: (0, 100, 0, 255), 2: (250, 230, 60, 255), 3: (30, 90, 200, 255)}
PALETTE |= {4: (200, 0, 200, 255), 5: (120, 120, 120, 255), 6: (10, 200, 200, 255)}


# --- helpers ----------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> StoreSettings:
    return StoreSettings(root=tmp_path / "store")


def publish(
    store: StoreSettings, collection: CollectionConfig, src: Path, tmp_path: Path, *others: Path
) -> dict[str, Any]:
    """Preprocess and register a source (and files it refers to) as the pipeline does; the item."""
    key = f"landing/{collection.id}/{src.name}"
    dest = store.root / key
    dest.parent.mkdir(parents=True, exist_ok=True)
    for f in (src, *others):
        shutil.copyfile(f, dest.parent / f.name)
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    product = Product(collection=collection.id, id=src.stem, source_key=key, datetime=when)
    info = preprocess_product(product, collection, store, tmp_path / "scratch")
    return build_item(product, info, collection, store)


def seed(store: StoreSettings, collection: CollectionConfig, items: list[dict[str, Any]]) -> None:
    for chunk in plan_seed(items, SeedRequest(collection=collection.id), collection):
        render_chunk(chunk, collection, store)


def tile_and_pixel(lon: float, lat: float, zoom: int = ZOOM) -> tuple[tuple[int, int, int], int, int]:
    """The tile holding a ground point, and the point's row and column in it."""
    t = GRID.tile(lon, lat, zoom)
    b = GRID.xy_bounds(t)
    x, y = TO_MERCATOR.transform(lon, lat)
    col = int((x - b.left) / (b.right - b.left) * TILE)
    row = int((b.top - y) / (b.top - b.bottom) * TILE)
    return (zoom, t.x, t.y), row, col


def pixel_at(
    store: StoreSettings, collection: CollectionConfig, item: dict[str, Any], lon: float, lat: float
) -> np.ndarray | None:
    """The tile pixel (all bands) over a ground point, None when that tile was not written."""
    tile, row, col = tile_and_pixel(lon, lat)
    key = tile_key(collection.id, time_key(item), tile, collection.render.format)
    objects = open_store(store)
    if not objects.exists(key):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(objects.get_bytes(key)) as mem, mem.open() as ds:
            values: np.ndarray = ds.read()[:, row, col]
    return values


def block_centres(src: Path) -> list[tuple[float, float, int]]:
    """Lon, lat and source value at the centre of every 64 px block."""
    with rasterio.open(src) as ds:
        data = ds.read(1)
        out = []
        for r in range(32, ds.height, 64):
            for c in range(32, ds.width, 64):
                lon, lat = ds.xy(r, c)
                out.append((lon, lat, int(data[r, c])))
    return out


def statistics(item: dict[str, Any]) -> list[tuple[float, float]]:
    bands = item["assets"]["data"]["raster:bands"]
    return [(b["statistics"]["minimum"], b["statistics"]["maximum"]) for b in bands]


# --- paletted products ------------------------------------------------------------------------------


def paletted(tmp_path: Path, nodata: int | None) -> Path:
    data = np.kron(CLASSES, np.ones((64, 64), dtype="uint8"))
    path = write_raster(tmp_path / "src" / "landcover.tif", data, transform=AREA, nodata=nodata)
    with rasterio.open(path, "r+") as dst:
        dst.write_colormap(1, PALETTE)
    return path


@pytest.mark.parametrize("target_crs", [None, "EPSG:32632"])
def test_paletted_tiles_show_the_palette_and_keep_nodata_transparent(
    target_crs: str | None, store: StoreSettings, tmp_path: Path
) -> None:
    src = paletted(tmp_path, nodata=0)
    collection = CollectionConfig(id="landcover", min_zoom=ZOOM, max_zoom=ZOOM, target_crs=target_crs)
    item = publish(store, collection, src, tmp_path)
    seed(store, collection, [item])

    shown = transparent = 0
    for lon, lat, value in block_centres(src):
        pixel = pixel_at(store, collection, item, lon, lat)
        assert pixel is not None
        assert pixel.shape == (4,), "an RGBA tile"
        if value == 0:
            assert pixel[3] == 0, f"nodata at {lon:.3f}, {lat:.3f} is not transparent"
            transparent += 1
        else:
            assert tuple(int(v) for v in pixel) == PALETTE[value], f"class {value} at {lon:.3f}, {lat:.3f}"
            shown += 1
    assert shown == 14
    assert transparent == 2


def test_paletted_tiles_outside_a_reprojected_footprint_are_transparent(
    store: StoreSettings, tmp_path: Path
) -> None:
    # no nodata: the reprojected COG gets an alpha band; the palette still colours the classes
    src = paletted(tmp_path, nodata=None)
    collection = CollectionConfig(id="landcover", min_zoom=ZOOM, max_zoom=ZOOM, target_crs="EPSG:32632")
    item = publish(store, collection, src, tmp_path)
    with rasterio.open(store.root / item["properties"]["skyvault:cog_key"]) as cog:
        assert cog.colorinterp == (ColorInterp.palette, ColorInterp.alpha)
    seed(store, collection, [item])

    for lon, lat, value in block_centres(src):
        pixel = pixel_at(store, collection, item, lon, lat)
        assert pixel is not None
        assert tuple(int(v) for v in pixel) == PALETTE[value]
    # 1.5 source pixels west of the source, inside the tile of its north-west corner
    tile, _, _ = tile_and_pixel(10.0005, 45.8995)
    outside = pixel_at(store, collection, item, 10.0 - 0.0025, 45.8995)
    assert tile_and_pixel(10.0 - 0.0025, 45.8995)[0] == tile
    assert outside is not None
    assert outside[3] == 0


def test_transparent_palette_entries_stay_transparent(store: StoreSettings, tmp_path: Path) -> None:
    # a VRT's colour table can say "transparent"; a GeoTIFF's cannot, so the COG must mask it
    classes = paletted(tmp_path, nodata=None)
    entries = "".join(
        f'<Entry c1="{r}" c2="{g}" c3="{b}" c4="{0 if i == 0 else a}"/>'
        for i, (r, g, b, a) in PALETTE.items()
    )
    vrt = tmp_path / "src" / "landcover-vrt.vrt"
    vrt.write_text(
        '<VRTDataset rasterXSize="256" rasterYSize="256"><SRS>EPSG:4326</SRS>'
        f"<GeoTransform>{', '.join(str(v) for v in AREA.to_gdal())}</GeoTransform>"
        f'<VRTRasterBand dataType="Byte" band="1"><ColorInterp>Palette</ColorInterp><ColorTable>{entries}'
        f'</ColorTable><SimpleSource><SourceFilename relativeToVRT="1">{classes.name}</SourceFilename>'
        "<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>"
    )
    collection = CollectionConfig(id="landcover", min_zoom=ZOOM, max_zoom=ZOOM)
    item = publish(store, collection, vrt, tmp_path, classes)
    seed(store, collection, [item])

    seen = set()
    for lon, lat, value in block_centres(classes):
        pixel = pixel_at(store, collection, item, lon, lat)
        if value == 0:
            assert pixel is None or pixel[3] == 0, f"transparent class at {lon:.3f}, {lat:.3f} is shown"
        else:
            assert pixel is not None
            assert tuple(int(v) for v in pixel) == PALETTE[value]
        seen.add(value)
    assert seen == set(range(7))


def test_configured_colormap_replaces_the_palette(store: StoreSettings, tmp_path: Path) -> None:
    src = paletted(tmp_path, nodata=0)
    render = RenderConfig(colormap="viridis")
    collection = CollectionConfig(id="landcover", min_zoom=ZOOM, max_zoom=ZOOM, render=render)
    item = publish(store, collection, src, tmp_path)
    seed(store, collection, [item])

    colours = cmap.get("viridis")
    for lon, lat, value in block_centres(src):
        pixel = pixel_at(store, collection, item, lon, lat)
        assert pixel is not None
        if value == 0:
            assert pixel[3] == 0
        else:
            assert tuple(int(v) for v in pixel[:3]) == tuple(colours[value][:3])


# --- data that is not 8-bit ----------------------------------------------------------------------------


def ramp(tmp_path: Path, dtype: str, lo: float, hi: float, nodata: float) -> Path:
    """Values rising from ``lo`` (west) to ``hi`` (east); the northern 32 rows are nodata."""
    values = np.linspace(lo, hi, 256)
    data = np.repeat(values[np.newaxis, :], 256, axis=0).astype(dtype)
    data[:32] = nodata
    return write_raster(tmp_path / "src" / f"ramp-{dtype}.tif", data, transform=AREA, nodata=nodata)


def column_points(src: Path) -> list[tuple[float, float, float]]:
    """Lon, lat and value at a few columns of a valid row."""
    with rasterio.open(src) as ds:
        data = ds.read(1)
        out = []
        for c in (1, 64, 128, 192, 254):
            lon, lat = ds.xy(160, c)
            out.append((lon, lat, float(data[160, c])))
    return out


@pytest.mark.parametrize(
    ("dtype", "lo", "hi", "nodata"), [("uint16", 1200, 4800, 0), ("float32", -35.5, 410.25, -9999.0)]
)
@pytest.mark.parametrize("with_statistics", [True, False])
def test_data_beyond_8_bit_is_stretched_from_its_statistics(
    dtype: str,
    lo: float,
    hi: float,
    nodata: float,
    with_statistics: bool,
    store: StoreSettings,
    tmp_path: Path,
) -> None:
    src = ramp(tmp_path, dtype, lo, hi, nodata)
    collection = CollectionConfig(id="values", min_zoom=ZOOM, max_zoom=ZOOM, cog=CogProfile(blocksize=64))
    item = publish(store, collection, src, tmp_path)
    if with_statistics:
        ((low, high),) = statistics(item)
    else:  # an item without raster statistics: the range of the COG's smallest overview
        del item["assets"]["data"]["raster:bands"]
        cog = store.root / item["properties"]["skyvault:cog_key"]
        with rasterio.open(cog) as ds:
            smallest = len(ds.overviews(1)) - 1
        assert smallest >= 1
        with rasterio.open(cog, overview_level=smallest) as ds:
            sample = ds.read(1, masked=True)
        low, high = float(sample.min()), float(sample.max())
    assert lo <= low < high <= hi
    seed(store, collection, [item])

    greys = []
    for lon, lat, value in column_points(src):
        pixel = pixel_at(store, collection, item, lon, lat)
        assert pixel is not None
        assert pixel.shape == (2,), "a grey + alpha tile"
        expected = np.clip((value - low) / (high - low) * 255, 0, 255)
        assert abs(int(pixel[0]) - expected) <= 3, f"value {value} shown as {pixel[0]}, not {expected:.0f}"
        assert pixel[1] == 255
        greys.append(int(pixel[0]))
    assert greys[0] < 10
    assert greys[-1] > 245
    assert 100 < greys[2] < 155, "mid-range values are mid-grey, not saturated"
    with rasterio.open(src) as ds:
        lon, lat = ds.xy(10, 128)
    nodata_pixel = pixel_at(store, collection, item, lon, lat)
    assert nodata_pixel is not None
    assert nodata_pixel[1] == 0


def test_configured_rescale_and_colormap_are_used_as_given(store: StoreSettings, tmp_path: Path) -> None:
    src = ramp(tmp_path, "uint16", 1200, 4800, 0)
    render = RenderConfig(rescale=[(0.0, 10000.0)], colormap="viridis")
    collection = CollectionConfig(id="values", min_zoom=ZOOM, max_zoom=ZOOM, render=render)
    item = publish(store, collection, src, tmp_path)
    assert statistics(item)[0] != (0.0, 10000.0)
    seed(store, collection, [item])

    colours = cmap.get("viridis")
    for lon, lat, value in column_points(src):
        pixel = pixel_at(store, collection, item, lon, lat)
        assert pixel is not None
        index = int(np.clip(value / 10000.0 * 255, 0, 255))
        # neighbouring colormap entries differ little; allow a step of rounding
        assert np.abs(pixel[:3].astype(int) - np.asarray(colours[index][:3])).max() <= 3
        assert pixel[3] == 255


def test_configured_rescale_alone_is_a_grey_stretch(store: StoreSettings, tmp_path: Path) -> None:
    src = ramp(tmp_path, "uint16", 1200, 4800, 0)
    render = RenderConfig(rescale=[(1000.0, 9000.0)])
    collection = CollectionConfig(id="values", min_zoom=ZOOM, max_zoom=ZOOM, render=render)
    item = publish(store, collection, src, tmp_path)
    seed(store, collection, [item])

    for lon, lat, value in column_points(src):
        pixel = pixel_at(store, collection, item, lon, lat)
        assert pixel is not None
        expected = (value - 1000.0) / 8000.0 * 255
        assert abs(int(pixel[0]) - expected) <= 3


# --- 8-bit products -----------------------------------------------------------------------------------


def eight_bit(tmp_path: Path, bands: int, alpha: bool) -> Path:
    """``bands`` bands rising west to east (band b from 20 + 30 b), the last one alpha if asked."""
    cols = np.arange(256) // 2
    data = np.stack([np.tile(20 + 30 * b + cols, (256, 1)) for b in range(bands)]).astype("uint8")
    if alpha:
        data[-1] = 255
        data[-1, :, :64] = 0
    path = write_raster(tmp_path / "src" / f"b{bands}.tif", data, transform=AREA)
    with rasterio.open(path, "r+") as dst:
        interp = [ColorInterp.gray] if bands < 3 else [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
        interp += [ColorInterp.undefined] * (bands - len(interp))
        dst.colorinterp = [*interp[:-1], ColorInterp.alpha if alpha else interp[-1]]
    return path


@pytest.mark.parametrize(
    ("bands", "alpha", "shown"),
    [
        (1, False, 1),  # grey
        (2, True, 1),  # grey + alpha
        (2, False, 1),  # the first band
        (3, False, 3),  # RGB
        (4, True, 3),  # RGB + alpha
        (4, False, 3),  # the first three bands, e.g. red, green, blue of RGB + near infrared
    ],
)
def test_8_bit_data_is_shown_as_it_is(
    bands: int, alpha: bool, shown: int, store: StoreSettings, tmp_path: Path
) -> None:
    src = eight_bit(tmp_path, bands, alpha)
    collection = CollectionConfig(id="scenes", min_zoom=ZOOM, max_zoom=ZOOM)
    item = publish(store, collection, src, tmp_path)
    seed(store, collection, [item])

    with rasterio.open(src) as ds:
        data = ds.read()
        checked = 0
        for r in range(20, 256, 47):
            for c in range(3, 256, 29):
                lon, lat = ds.xy(r, c)
                pixel = pixel_at(store, collection, item, lon, lat)
                if alpha and data[-1, r, c] == 0:  # outside the footprint: no tile, or transparent
                    assert pixel is None or pixel[-1] == 0
                    continue
                assert pixel is not None
                assert pixel.shape == (shown + 1,)
                assert pixel[-1] == 255
                # one source column either way: its value differs by at most one
                assert np.abs(pixel[:shown].astype(int) - data[:shown, r, c].astype(int)).max() <= 1
                checked += 1
    assert checked > 30

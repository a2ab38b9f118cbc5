from __future__ import annotations

import datetime as dt
import json
import posixpath
import warnings
from pathlib import Path
from typing import Any

import morecantile
import numpy as np
import pytest
import rasterio
import rasterio.shutil
from pyproj import Transformer
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from rio_tiler.colormap import cmap
from rio_tiler.errors import EmptyMosaicError
from rio_tiler.io import Reader
from rio_tiler.models import ImageData
from rio_tiler.mosaic import mosaic_reader
from rio_tiler.reader import Options

from skyvault.config.collections import CollectionConfig, RenderConfig
from skyvault.config.settings import StoreSettings
from skyvault.errors import InvalidSeedRequestError, MissingDatetimeError, TilingError
from skyvault.models import SeedChunk, SeedRequest, SeedResult
from skyvault.storage.store import open_store
from skyvault.tiles.seeding import (
    TMS,
    block_side,
    combine_results,
    plan_seed,
    render_chunk,
    tile_key,
    tilejson_key,
    time_key,
    write_tilejsons,
)
from tests.conftest import write_raster

WHEN = "2026-01-01T00:00:00Z"
LAYER = "20260101T000000Z"
#: 128 x 128 px over 10.0..10.4E 45.5..45.8N
SMALL = from_origin(10.0, 45.8, 0.4 / 128, 0.3 / 128)


# --- helpers ----------------------------------------------------------------------------------------


def put_cog(store: StoreSettings, tmp_path: Path, key: str, src: Path) -> str:
    """Convert ``src`` to a COG and put it at ``key`` in the store."""
    dst = tmp_path / "cogs" / Path(key).name
    dst.parent.mkdir(parents=True, exist_ok=True)
    rasterio.shutil.copy(src, dst, driver="COG")
    open_store(store).put_file(key, dst)
    return key


def box_geometry(w: float, s: float, e: float, n: float) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def make_item(
    item_id: str,
    cog_key: str,
    bbox: tuple[float, float, float, float],
    *,
    when: str = WHEN,
    geometry: dict[str, Any] | None = None,
    collection: str = "rgb",
) -> dict[str, Any]:
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": item_id,
        "collection": collection,
        "bbox": list(bbox),
        "geometry": geometry or box_geometry(*bbox),
        "properties": {"datetime": when, "skyvault:cog_key": cog_key},
        "assets": {},
        "links": [],
    }


def run(
    items: list[dict[str, Any]],
    request: SeedRequest,
    collection: CollectionConfig,
    store: StoreSettings,
    *,
    force: bool = False,
    chunk_size: int = 256,
) -> tuple[list[SeedChunk], SeedResult]:
    chunks = plan_seed(items, request, collection, chunk_size=chunk_size)
    results = [render_chunk(c, collection, store, force=force) for c in chunks]
    return chunks, combine_results(collection.id, results)


def decode(data: bytes) -> np.ndarray:
    """A PNG/WebP tile as a (bands, rows, cols) array."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(data) as mem, mem.open() as ds:
            array: np.ndarray = ds.read()
            return array


def written_tiles(store: StoreSettings, collection: str, layer: str = LAYER) -> set[tuple[int, int, int]]:
    prefix = f"tiles/{collection}/WebMercatorQuad/{layer}/"
    out = set()
    for obj in open_store(store).list(prefix):
        rest = obj.key[len(prefix) :]
        if rest.count("/") == 2:
            z, x, y = rest.rsplit(".", 1)[0].split("/")
            out.add((int(z), int(x), int(y)))
    return out


def pixel_lonlat(tile: tuple[int, int, int], row: int, col: int, size: int = 256) -> tuple[float, float]:
    z, x, y = tile
    b = TMS.xy_bounds(morecantile.Tile(x, y, z))
    mx = b.left + (col + 0.5) * (b.right - b.left) / size
    my = b.top - (row + 0.5) * (b.top - b.bottom) / size
    lon, lat = TMS.lnglat(mx, my)
    return lon, lat


def tile_containing(lon: float, lat: float, zoom: int) -> tuple[int, int, int]:
    t = TMS.tile(lon, lat, zoom)
    return (t.z, t.x, t.y)


@pytest.fixture
def store(tmp_path: Path) -> StoreSettings:
    return StoreSettings(root=tmp_path / "store")


@pytest.fixture
def rgb(store: StoreSettings, tmp_path: Path, rgb_4326: Path) -> dict[str, Any]:
    """The rgb_4326 scene as a COG in the store and its item (10..11E, 45..46N)."""
    key = put_cog(store, tmp_path, "cogs/rgb/scene.tif", rgb_4326)
    return make_item("scene", key, (10.0, 45.0, 11.0, 46.0))


def constant_scene(tmp_path: Path, name: str, value: tuple[int, int, int], west: float, north: float) -> Path:
    data = np.empty((3, 64, 64), dtype="uint8")
    data[:] = np.asarray(value, dtype="uint8")[:, None, None]
    return write_raster(
        tmp_path / "src" / f"{name}.tif", data, transform=from_origin(west, north, 0.5 / 64, 0.5 / 64)
    )


# --- time keys --------------------------------------------------------------------------------------


def test_time_key_for_instants_ranges_and_offsets() -> None:
    assert time_key(make_item("a", "k", (0, 0, 1, 1), when="2026-01-01T00:00:00Z")) == "20260101T000000Z"
    assert time_key(make_item("a", "k", (0, 0, 1, 1), when="2026-01-01T02:30:00+02:00")) == "20260101T003000Z"
    ranged = make_item("a", "k", (0, 0, 1, 1))
    ranged["properties"].update(
        datetime=None, start_datetime="2026-01-01T00:00:00Z", end_datetime="2026-01-01T01:00:00Z"
    )
    assert time_key(ranged) == "20260101T000000Z--20260101T010000Z"
    for key in (time_key(ranged), LAYER):
        assert "/" not in key
        assert ":" not in key


def test_time_key_without_a_time_names_the_item() -> None:
    item = make_item("no-time", "k", (0, 0, 1, 1))
    item["properties"]["datetime"] = None
    with pytest.raises(MissingDatetimeError, match="no-time"):
        time_key(item)


# --- rendering --------------------------------------------------------------------------------------


def test_tile_pixels_match_the_source(store: StoreSettings, rgb: dict[str, Any], rgb_4326: Path) -> None:
    collection = CollectionConfig(id="rgb", min_zoom=8, max_zoom=9)
    _, result = run([rgb], SeedRequest(collection="rgb"), collection, store)
    tiles = written_tiles(store, "rgb")
    assert result.written == len(tiles) > 0
    objects = open_store(store)
    rng = np.random.default_rng(0)
    compared = 0
    with rasterio.open(rgb_4326) as src:
        for tile in sorted(tiles):
            img = decode(objects.get_bytes(tile_key("rgb", LAYER, tile)))
            assert img.shape == (4, 256, 256)
            rows, cols = rng.integers(0, 256, 40), rng.integers(0, 256, 40)
            for row, col in zip(rows, cols, strict=True):
                lon, lat = pixel_lonlat(tile, int(row), int(col))
                inside = 10.0 < lon < 11.0 and 45.0 < lat < 46.0
                assert img[3, row, col] == (255 if inside else 0)
                if inside:
                    expected = next(src.sample([(lon, lat)]))
                    assert np.abs(img[:3, row, col].astype(int) - expected.astype(int)).max() <= 1
                    compared += 1
    assert compared > 50


def test_tiles_outside_the_data_are_not_written(store: StoreSettings, rgb: dict[str, Any]) -> None:
    # The footprint claims more than the COG holds: tiles over the claimed-only area stay empty.
    rgb["bbox"] = [8.0, 43.0, 13.0, 48.0]
    rgb["geometry"] = box_geometry(8.0, 43.0, 13.0, 48.0)
    collection = CollectionConfig(id="rgb", min_zoom=8, max_zoom=8)
    chunks, result = run([rgb], SeedRequest(collection="rgb"), collection, store)
    planned = {t for c in chunks for t in c.tiles}
    written = written_tiles(store, "rgb")
    assert result.empty > 0
    assert result.written == len(written)
    assert written < planned
    for z, x, y in written:
        b = TMS.bounds(morecantile.Tile(x, y, z))
        assert b.left < 11.0
        assert b.right > 10.0
        assert b.bottom < 46.0
        assert b.top > 45.0
    for z, x, y in planned - written:
        b = TMS.bounds(morecantile.Tile(x, y, z))
        assert b.left >= 11.0 or b.right <= 10.0 or b.bottom >= 46.0 or b.top <= 45.0


def test_planning_follows_the_footprint_not_the_bbox() -> None:
    # An L-shaped footprint: its bbox covers the empty north-east quarter, the plan does not.
    geometry = {
        "type": "Polygon",
        "coordinates": [[[0, 0], [20, 0], [20, 10], [10, 10], [10, 20], [0, 20], [0, 0]]],
    }
    item = make_item("l", "cogs/rgb/l.tif", (0.0, 0.0, 20.0, 20.0), geometry=geometry)
    collection = CollectionConfig(id="rgb", min_zoom=6, max_zoom=6)
    tiles = {t for c in plan_seed([item], SeedRequest(collection="rgb"), collection) for t in c.tiles}
    assert tile_containing(5, 5, 6) in tiles
    assert tile_containing(15, 5, 6) in tiles
    assert tile_containing(5, 15, 6) in tiles
    assert tile_containing(15, 15, 6) not in tiles


def test_tiles_only_touching_the_footprint_are_not_planned() -> None:
    b = TMS.bounds(morecantile.Tile(17, 11, 5))
    item = make_item("t", "cogs/rgb/t.tif", (b.left, b.bottom, b.right, b.top))
    collection = CollectionConfig(id="rgb", min_zoom=5, max_zoom=6)
    tiles = {t for c in plan_seed([item], SeedRequest(collection="rgb"), collection) for t in c.tiles}
    assert tiles == {(5, 17, 11), (6, 34, 22), (6, 35, 22), (6, 34, 23), (6, 35, 23)}


def test_nodata_renders_transparent_and_all_nodata_tiles_are_not_written(
    store: StoreSettings, tmp_path: Path
) -> None:
    data = np.full((3, 128, 128), 120, dtype="uint8")
    data[:, :, :64] = 0  # west half (10.0..10.5E) is nodata
    src = write_raster(
        tmp_path / "src" / "half.tif", data, transform=from_origin(10.0, 46.0, 1 / 128, 1 / 128), nodata=0
    )
    key = put_cog(store, tmp_path, "cogs/rgb/half.tif", src)
    item = make_item("half", key, (10.0, 45.0, 11.0, 46.0))
    collection = CollectionConfig(id="rgb", min_zoom=9, max_zoom=11)
    _, result = run([item], SeedRequest(collection="rgb"), collection, store)

    tile = tile_containing(10.5, 45.5, 9)
    img = decode(open_store(store).get_bytes(tile_key("rgb", LAYER, tile)))
    lons = np.array([pixel_lonlat(tile, 128, col)[0] for col in range(256)])
    lats = np.array([pixel_lonlat(tile, row, 128)[1] for row in range(256)])
    rows = (lats > 45.01) & (lats < 45.99)
    assert (img[3][np.ix_(rows, (lons > 10.01) & (lons < 10.49))] == 0).all()
    valid = np.ix_(rows, (lons > 10.51) & (lons < 10.99))
    assert (img[3][valid] == 255).all()
    assert all((band[valid] == 120).all() for band in img[:3])

    # z11 tiles wholly inside the nodata half are planned (footprint) but not written.
    inside_nodata = tile_containing(10.25, 45.5, 11)
    assert result.empty > 0
    assert inside_nodata not in written_tiles(store, "rgb")
    assert tile_containing(10.75, 45.5, 11) in written_tiles(store, "rgb")


def test_second_run_skips_and_force_rewrites(store: StoreSettings, rgb: dict[str, Any]) -> None:
    collection = CollectionConfig(id="rgb", min_zoom=5, max_zoom=8)
    request = SeedRequest(collection="rgb")
    _, first = run([rgb], request, collection, store)
    assert first.written > 0
    assert first.skipped == 0

    objects = open_store(store)
    damaged = tile_key("rgb", LAYER, sorted(written_tiles(store, "rgb"))[-1])
    objects.put_bytes(damaged, b"not a tile")

    _, second = run([rgb], request, collection, store)
    assert (second.written, second.skipped) == (0, first.written)
    assert objects.get_bytes(damaged) == b"not a tile"

    _, forced = run([rgb], request, collection, store, force=True)
    assert (forced.written, forced.skipped) == (first.written, 0)
    assert decode(objects.get_bytes(damaged)).shape == (4, 256, 256)


def test_items_of_one_time_are_mosaicked(store: StoreSettings, tmp_path: Path) -> None:
    west = put_cog(
        store, tmp_path, "cogs/rgb/west.tif", constant_scene(tmp_path, "west", (200, 0, 0), 10.0, 46.0)
    )
    east = put_cog(
        store, tmp_path, "cogs/rgb/east.tif", constant_scene(tmp_path, "east", (0, 0, 200), 10.5, 46.0)
    )
    items = [
        make_item("west", west, (10.0, 45.5, 10.5, 46.0)),
        make_item("east", east, (10.5, 45.5, 11.0, 46.0)),
    ]
    collection = CollectionConfig(id="rgb", min_zoom=6, max_zoom=9)
    chunks, _ = run(items, SeedRequest(collection="rgb"), collection, store)
    assert {c.time_key for c in chunks} == {LAYER}

    tile = tile_containing(10.5, 45.75, 6)
    img = decode(open_store(store).get_bytes(tile_key("rgb", LAYER, tile)))
    colours = {tuple(px) for px in img.reshape(4, -1).T.tolist() if px[3] == 255}
    assert colours == {(200, 0, 0, 255), (0, 0, 200, 255)}


def test_reseeding_one_item_keeps_its_neighbour_of_the_same_time(
    store: StoreSettings, tmp_path: Path
) -> None:
    west = put_cog(
        store, tmp_path, "cogs/rgb/west.tif", constant_scene(tmp_path, "west", (200, 0, 0), 10.0, 46.0)
    )
    east = put_cog(
        store, tmp_path, "cogs/rgb/east.tif", constant_scene(tmp_path, "east", (0, 0, 200), 10.5, 46.0)
    )
    items = [
        make_item("west", west, (10.0, 45.5, 10.5, 46.0)),
        make_item("east", east, (10.5, 45.5, 11.0, 46.0)),
    ]
    collection = CollectionConfig(id="rgb", min_zoom=6, max_zoom=6)
    request = SeedRequest(collection="rgb", item_ids=("west",), force=True)
    run(items, request, collection, store, force=True)
    img = decode(open_store(store).get_bytes(tile_key("rgb", LAYER, tile_containing(10.5, 45.75, 6))))
    colours = {tuple(px) for px in img.reshape(4, -1).T.tolist() if px[3] == 255}
    assert (0, 0, 200, 255) in colours
    assert (200, 0, 0, 255) in colours


def test_time_interval_and_item_ids_select_layers(
    store: StoreSettings, tmp_path: Path, rgb_4326: Path
) -> None:
    key = put_cog(store, tmp_path, "cogs/rgb/scene.tif", rgb_4326)
    items = [
        make_item(f"d{day}", key, (10.0, 45.0, 11.0, 46.0), when=f"2026-01-0{day}T00:00:00Z")
        for day in (1, 2, 3)
    ]
    collection = CollectionConfig(id="rgb", min_zoom=3, max_zoom=3)

    def layers(request: SeedRequest) -> set[str]:
        return {c.time_key for c in plan_seed(items, request, collection)}

    assert layers(SeedRequest(collection="rgb")) == {
        "20260101T000000Z",
        "20260102T000000Z",
        "20260103T000000Z",
    }
    assert layers(
        SeedRequest(
            collection="rgb",
            start=dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
            end=dt.datetime(2026, 1, 2, 12, tzinfo=dt.UTC),
        )
    ) == {"20260102T000000Z"}
    assert layers(SeedRequest(collection="rgb", item_ids=("d3",))) == {"20260103T000000Z"}


def test_antimeridian_extent_is_split(store: StoreSettings, tmp_path: Path) -> None:
    east_cog = put_cog(
        store, tmp_path, "cogs/rgb/e.tif", constant_scene(tmp_path, "e", (10, 20, 30), 179.5, 0.5)
    )
    west_cog = put_cog(
        store, tmp_path, "cogs/rgb/w.tif", constant_scene(tmp_path, "w", (30, 20, 10), -180.0, 0.5)
    )
    split = {
        "type": "MultiPolygon",
        "coordinates": [
            box_geometry(179.5, 0.0, 180.0, 0.5)["coordinates"],
            box_geometry(-180.0, 0.0, -179.5, 0.5)["coordinates"],
        ],
    }
    items = [
        make_item("e", east_cog, (179.5, 0.0, -179.5, 0.5), geometry=split),
        make_item("w", west_cog, (179.5, 0.0, -179.5, 0.5), geometry=split),
    ]
    collection = CollectionConfig(id="rgb", min_zoom=3, max_zoom=6)
    _, result = run(items, SeedRequest(collection="rgb"), collection, store)
    written = written_tiles(store, "rgb")
    assert result.written == len(written)
    for z in range(3, 7):
        xs = {x for zz, x, _ in written if zz == z}
        last = 2**z - 1
        assert 0 in xs
        assert last in xs
        assert xs <= {0, last}


def test_unsplit_antimeridian_polygon_and_request_bbox() -> None:
    # A polygon drawn from 170E to 170W without a cut, and a request bbox crossing the antimeridian.
    geometry = {"type": "Polygon", "coordinates": [[[170, -5], [-170, -5], [-170, 5], [170, 5], [170, -5]]]}
    item = make_item("x", "cogs/rgb/x.tif", (170.0, -5.0, -170.0, 5.0), geometry=geometry)
    collection = CollectionConfig(id="rgb", min_zoom=4, max_zoom=4)
    for bbox in (None, (175.0, -5.0, -175.0, 5.0)):
        tiles = {
            t
            for c in plan_seed([item], SeedRequest(collection="rgb", bbox=bbox), collection)
            for t in c.tiles
        }
        xs = {x for _, x, _ in tiles}
        assert 0 in xs
        assert 15 in xs
        assert xs <= {0, 15}
    (chunk,) = plan_seed([item], SeedRequest(collection="rgb"), collection)
    assert chunk.bounds[0] == -180.0
    assert chunk.bounds[2] == 180.0


def test_zoom_range_of_request_and_collection(store: StoreSettings, rgb: dict[str, Any]) -> None:
    collection = CollectionConfig(id="rgb", min_zoom=2, max_zoom=4)
    run([rgb], SeedRequest(collection="rgb"), collection, store)
    assert {z for z, _, _ in written_tiles(store, "rgb")} == {2, 3, 4}
    run([rgb], SeedRequest(collection="rgb", min_zoom=7, max_zoom=8), collection, store)
    assert {z for z, _, _ in written_tiles(store, "rgb")} == {2, 3, 4, 7, 8}
    with pytest.raises(InvalidSeedRequestError, match="rgb"):
        plan_seed([rgb], SeedRequest(collection="rgb", min_zoom=5, max_zoom=4), collection)


def test_chunks_bound_the_tiles_per_task(rgb: dict[str, Any]) -> None:
    collection = CollectionConfig(id="rgb", min_zoom=0, max_zoom=10)
    chunks = plan_seed([rgb], SeedRequest(collection="rgb"), collection, chunk_size=7)
    all_tiles = [t for c in chunks for t in c.tiles]
    assert len(all_tiles) == len(set(all_tiles))
    assert all(len(c.tiles) <= 7 for c in chunks)
    assert len(chunks) > 1
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.total == len(chunks) for c in chunks)


@pytest.mark.parametrize("workers", [2, 4])
def test_a_layer_is_shared_evenly_between_parallel_renderers(rgb: dict[str, Any], workers: int) -> None:
    collection = CollectionConfig(id="rgb", min_zoom=0, max_zoom=12)
    request = SeedRequest(collection="rgb")
    one = plan_seed([rgb], request, collection, chunk_size=1024)
    shared = plan_seed([rgb], request, collection, chunk_size=1024, min_chunks=workers)
    assert len(one) == 1
    assert len(shared) == workers
    assert sorted(t for c in shared for t in c.tiles) == sorted(one[0].tiles)
    side = block_side(collection)
    sizes = [len(c.tiles) for c in shared]
    assert max(sizes) - min(sizes) <= 2 * side**2
    # a block (tiles read together) is never split between chunks
    owner = {(z, x // side, y // side): c.index for c in shared for z, x, y in c.tiles}
    assert all(owner[(z, x // side, y // side)] == c.index for c in shared for z, x, y in c.tiles)


def test_tilejson_describes_the_layer_and_widens_on_reseed(
    store: StoreSettings, tmp_path: Path, rgb_4326: Path
) -> None:
    key = put_cog(store, tmp_path, "cogs/rgb/scene.tif", rgb_4326)
    collection = CollectionConfig(id="rgb", title="RGB", min_zoom=3, max_zoom=6)
    first = make_item("a", key, (10.0, 45.0, 11.0, 46.0))
    chunks, _ = run([first], SeedRequest(collection="rgb"), collection, store)
    (doc_key,) = write_tilejsons(chunks, collection, store)
    assert doc_key == tilejson_key("rgb", LAYER)
    objects = open_store(store)
    doc = json.loads(objects.get_bytes(doc_key))
    assert doc["tilejson"] == "3.0.0"
    assert (doc["minzoom"], doc["maxzoom"]) == (3, 6)
    assert doc["bounds"] == [10.0, 45.0, 11.0, 46.0]
    lon, lat, zoom = doc["center"]
    assert 10.0 <= lon <= 11.0
    assert 45.0 <= lat <= 46.0
    assert 3 <= zoom <= 6
    for z, x, y in written_tiles(store, "rgb"):
        url = doc["tiles"][0].format(z=z, x=x, y=y)
        assert objects.exists(posixpath.join(posixpath.dirname(doc_key), url))

    # Same-time second product further east, seeded at other zooms: bounds and zooms widen.
    second = make_item("b", key, (12.0, 44.0, 13.0, 45.0))
    chunks, _ = run(
        [first, second],
        SeedRequest(collection="rgb", item_ids=("b",), min_zoom=7, max_zoom=7),
        collection,
        store,
    )
    write_tilejsons(chunks, collection, store)
    doc = json.loads(objects.get_bytes(doc_key))
    assert doc["bounds"] == [10.0, 44.0, 13.0, 46.0]
    assert (doc["minzoom"], doc["maxzoom"]) == (3, 7)


def test_colormap_and_rescale_of_a_float_scene(store: StoreSettings, tmp_path: Path, float_utm: Path) -> None:
    key = put_cog(store, tmp_path, "cogs/dem/f.tif", float_utm)
    with rasterio.open(float_utm) as src:
        w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    item = make_item("f", key, (w, s, e, n), collection="dem")
    lo, hi = 0.0, 400.0
    collection = CollectionConfig(
        id="dem", min_zoom=12, max_zoom=12, render=RenderConfig(rescale=[(lo, hi)], colormap="viridis")
    )
    _, result = run([item], SeedRequest(collection="dem"), collection, store)
    assert result.written > 0
    colours = cmap.get("viridis")
    objects = open_store(store)
    checked = 0
    with rasterio.open(float_utm) as src:
        to_utm = Transformer.from_crs("EPSG:4326", src.crs, always_xy=True)
        for tile in sorted(written_tiles(store, "dem")):
            img = decode(objects.get_bytes(tile_key("dem", LAYER, tile)))
            for row in range(8, 256, 31):
                for col in range(8, 256, 31):
                    lon, lat = pixel_lonlat(tile, row, col)
                    ux, uy = to_utm.transform(lon, lat)
                    if not (
                        src.bounds.left < ux < src.bounds.right and src.bounds.bottom < uy < src.bounds.top
                    ):
                        assert img[3, row, col] == 0
                        continue
                    value = float(next(src.sample([(ux, uy)]))[0])
                    if value == src.nodata:
                        assert img[3, row, col] == 0
                        continue
                    index = int(np.clip(round((value - lo) / (hi - lo) * 255), 0, 255))
                    expected = np.asarray(colours[index][:3])
                    assert img[3, row, col] == 255
                    # neighbouring colormap entries differ little; allow one step of rounding
                    assert np.abs(img[:3, row, col].astype(int) - expected).max() <= 3
                    checked += 1
    assert checked > 20


def reference_tile(
    store: StoreSettings, keys: list[str], collection: CollectionConfig, tile: tuple[int, int, int]
) -> np.ndarray | None:
    """A tile as rio-tiler renders it on its own: ``Reader.tile`` of each COG, first-valid mosaic."""
    objects = open_store(store)
    render = collection.render
    options: Options = {} if collection.nodata is None else {"nodata": collection.nodata}

    def read(key: str, x: int, y: int, z: int) -> ImageData:
        with Reader(objects.gdal_path(key), options=options) as reader:
            img: ImageData = reader.tile(x, y, z, tilesize=render.tile_size, indexes=render.bands)
            return img

    z, x, y = tile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img, _ = mosaic_reader(keys, read, x, y, z, threads=1)
        except EmptyMosaicError:
            return None
        if np.ma.getmaskarray(img.array).all():
            return None
        if render.rescale:
            img.rescale(in_range=render.rescale)
        colours = cmap.get(render.colormap) if render.colormap else None
        return decode(img.render(img_format=render.format.upper(), colormap=colours, add_mask=True))


def scene_in(tmp_path: Path, name: str, crs: str, bands: int = 3, alpha: bool = False) -> Path:
    """A textured uint8 scene over 10.0..10.4E 45.5..45.8N in ``crs`` (optionally with an alpha band)."""
    rng = np.random.default_rng(3)
    data = rng.integers(1, 255, (bands + alpha, 96, 128), dtype="uint8")
    if alpha:
        data[-1] = 255
        data[-1, :, :40] = 0
    w, s, e, n = transform_bounds("EPSG:4326", crs, 10.0, 45.5, 10.4, 45.8)
    path = write_raster(
        tmp_path / "src" / f"{name}.tif",
        data,
        crs=crs,
        transform=from_origin(w, n, (e - w) / 128, (n - s) / 96),
    )
    if alpha:
        with rasterio.open(path, "r+") as dst:
            dst.colorinterp = [*dst.colorinterp[:-1], ColorInterp.alpha]
    return path


#: Sources in a projected CRS are warped through GDAL's approximate transformer (within 1/8 source
#: pixel), whose interpolation depends on the extent of each read: rendering a block of tiles at once
#: moves some edges between two source pixels by a tile pixel or so. In those cases all but a few
#: pixels must be rio-tiler's or a neighbour's; in the others every pixel must be rio-tiler's.
NEARLY = {"float-colormap", "alpha-band", "mosaic"}


def within_one_pixel(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Per pixel: whether ``got`` equals ``expected`` there or at one of its 8 neighbours."""
    padded = np.pad(expected, ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows, cols = got.shape[1:]
    found = np.zeros((rows, cols), dtype=bool)
    for dr in (0, 1, 2):
        for dc in (0, 1, 2):
            found |= (padded[:, dr : dr + rows, dc : dc + cols] == got).all(axis=0)
    return found


@pytest.mark.parametrize(
    "case", ["rgb", "nodata", "float-colormap", "webmercator", "alpha-band", "mosaic", "grey", "webp"]
)
def test_tiles_are_what_rio_tiler_renders_tile_by_tile(
    case: str, store: StoreSettings, tmp_path: Path, rgb_4326: Path, float_utm: Path
) -> None:
    bbox = (10.0, 45.5, 10.4, 45.8)
    render: dict[str, Any] = {}
    zooms = (6, 11)
    nodata: float | None = None
    if case in ("rgb", "webp"):
        sources, bbox = [rgb_4326], (10.0, 45.0, 11.0, 46.0)
        render = {"format": "webp"} if case == "webp" else {}
    elif case == "nodata":
        data = np.full((3, 128, 128), 120, dtype="uint8")
        data[:, 40:90, :64] = 0
        sources = [write_raster(tmp_path / "src" / "n.tif", data, transform=SMALL)]
        nodata = 0
    elif case == "float-colormap":
        sources = [float_utm]
        with rasterio.open(float_utm) as src:
            bbox = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        render, zooms = {"bands": [1], "rescale": [(0.0, 400.0)], "colormap": "viridis"}, (9, 13)
    elif case == "webmercator":
        sources = [scene_in(tmp_path, "m", "EPSG:3857")]
    elif case == "alpha-band":
        sources = [scene_in(tmp_path, "a", "EPSG:32632", alpha=True)]
    elif case == "grey":
        sources = [scene_in(tmp_path, "g", "EPSG:4326", bands=1)]
    else:  # mosaic: the second COG fills what the first (with a nodata hole) leaves empty
        data = np.full((3, 128, 128), 200, dtype="uint8")
        data[:, 30:80, 30:80] = 0
        sources = [
            write_raster(tmp_path / "src" / "hole.tif", data, transform=SMALL, nodata=0),
            scene_in(tmp_path, "under", "EPSG:32632"),
        ]
    keys = [put_cog(store, tmp_path, f"cogs/rgb/{i}-{p.name}", p) for i, p in enumerate(sources)]
    items = [make_item(f"i{i}", key, bbox) for i, key in enumerate(keys)]
    collection = CollectionConfig(
        id="rgb", min_zoom=zooms[0], max_zoom=zooms[1], nodata=nodata, render=RenderConfig(**render)
    )
    chunks, result = run(items, SeedRequest(collection="rgb"), collection, store)
    fmt = collection.render.format
    objects = open_store(store)
    compared = 0
    for tile in sorted({t for c in chunks for t in c.tiles}):
        expected = reference_tile(store, keys, collection, tile)
        key = tile_key("rgb", LAYER, tile, fmt)
        if expected is None:
            assert not objects.exists(key), f"tile {tile} should be empty"
            continue
        got = decode(objects.get_bytes(key))
        assert got.shape == expected.shape
        differ = (got != expected).any(axis=0)
        if case in NEARLY:
            explained = within_one_pixel(got, expected).mean()
            assert explained > 0.99, f"tile {tile}: {1 - explained:.1%} of pixels unlike rio-tiler's"
        else:
            assert not differ.any(), f"tile {tile}: {differ.sum()} pixels differ from rio-tiler's"
        compared += 1
    assert compared == result.written > 3


def test_webp_tiles(store: StoreSettings, rgb: dict[str, Any]) -> None:
    collection = CollectionConfig(id="rgb", min_zoom=4, max_zoom=5, render=RenderConfig(format="webp"))
    _, result = run([rgb], SeedRequest(collection="rgb"), collection, store)
    keys = [o.key for o in open_store(store).list("tiles/rgb/")]
    assert len(keys) == result.written > 0
    assert all(k.endswith(".webp") for k in keys)


# --- errors -----------------------------------------------------------------------------------------


def test_missing_cog_names_collection_tile_and_cog(store: StoreSettings) -> None:
    item = make_item("ghost", "cogs/rgb/ghost.tif", (10.0, 45.0, 11.0, 46.0))
    collection = CollectionConfig(id="rgb", min_zoom=2, max_zoom=2)
    (chunk,) = plan_seed([item], SeedRequest(collection="rgb"), collection)
    z, x, y = chunk.tiles[0]
    with pytest.raises(TilingError, match=rf"'rgb'.*{z}/{x}/{y}.*cogs/rgb/ghost\.tif"):
        render_chunk(chunk, collection, store)


def test_item_without_cog_key_is_named() -> None:
    item = make_item("bare", "k", (10.0, 45.0, 11.0, 46.0))
    del item["properties"]["skyvault:cog_key"]
    with pytest.raises(TilingError, match="bare"):
        plan_seed([item], SeedRequest(collection="rgb"), CollectionConfig(id="rgb"))


# --- S3 ---------------------------------------------------------------------------------------------


def test_seeding_on_s3(s3_store_settings: StoreSettings, tmp_path: Path, rgb_4326: Path) -> None:
    key = put_cog(s3_store_settings, tmp_path, "cogs/rgb/scene.tif", rgb_4326)
    item = make_item("scene", key, (10.0, 45.0, 11.0, 46.0))
    collection = CollectionConfig(id="rgb", min_zoom=6, max_zoom=8)
    chunks, first = run([item], SeedRequest(collection="rgb"), collection, s3_store_settings, chunk_size=4)
    written = written_tiles(s3_store_settings, "rgb")
    assert first.written == len(written) > 0
    assert {z for z, _, _ in written} == {6, 7, 8}
    objects = open_store(s3_store_settings)
    img = decode(objects.get_bytes(tile_key("rgb", LAYER, tile_containing(10.5, 45.5, 8))))
    assert (img[3] == 255).any()
    _, second = run([item], SeedRequest(collection="rgb"), collection, s3_store_settings)
    assert (second.written, second.skipped) == (0, first.written)
    write_tilejsons(chunks, collection, s3_store_settings)
    assert json.loads(objects.get_bytes(tilejson_key("rgb", LAYER)))["bounds"] == [10.0, 45.0, 11.0, 46.0]


def test_a_replaced_item_that_shrank_leaves_no_stale_tiles(store: StoreSettings, tmp_path: Path) -> None:
    collection = CollectionConfig(id="rgb", min_zoom=11, max_zoom=11)
    wide = put_cog(
        store, tmp_path, "cogs/rgb/p.tif", constant_scene(tmp_path, "wide", (200, 0, 0), 10.0, 46.0)
    )
    old = make_item("p", wide, (10.0, 45.5, 10.5, 46.0))
    run([old], SeedRequest(collection="rgb"), collection, store)
    old_tiles = written_tiles(store, "rgb")

    # the replacement covers only 10.0..10.1E: tiles east of it must go
    narrow_src = write_raster(
        tmp_path / "src" / "narrow.tif",
        np.full((3, 64, 64), 90, dtype="uint8"),
        transform=from_origin(10.0, 46.0, 0.1 / 64, 0.5 / 64),
    )
    narrow = put_cog(store, tmp_path, "cogs/rgb/p.tif", narrow_src)
    new = make_item("p", narrow, (10.0, 45.5, 10.1, 46.0))
    request = SeedRequest(collection="rgb", bbox=(10.0, 45.5, 10.5, 46.0), force=True)
    for chunk in plan_seed([new], request, collection, previous=[old]):
        render_chunk(chunk, collection, store, force=True)
    new_tiles = written_tiles(store, "rgb")
    assert new_tiles
    assert new_tiles < old_tiles
    assert all(TMS.bounds(morecantile.Tile(x, y, z)).left < 10.1 for z, x, y in new_tiles)


def test_a_replaced_item_that_moved_in_time_clears_its_old_layer(
    store: StoreSettings, tmp_path: Path
) -> None:
    collection = CollectionConfig(id="rgb", min_zoom=8, max_zoom=8)
    key = put_cog(store, tmp_path, "cogs/rgb/p.tif", constant_scene(tmp_path, "p", (200, 0, 0), 10.0, 46.0))
    old = make_item("p", key, (10.0, 45.5, 10.5, 46.0))
    run([old], SeedRequest(collection="rgb"), collection, store)
    assert written_tiles(store, "rgb")
    new = make_item("p", key, (10.0, 45.5, 10.5, 46.0), when="2026-01-01T01:00:00Z")
    request = SeedRequest(collection="rgb", force=True)
    for chunk in plan_seed([new], request, collection, previous=[old]):
        render_chunk(chunk, collection, store, force=True)
    assert written_tiles(store, "rgb") == set()
    assert written_tiles(store, "rgb", "20260101T010000Z")


def test_reseed_extent_covers_both_versions() -> None:
    from skyvault.models import ItemRef
    from skyvault.tiles.seeding import reseed_extent

    new = ItemRef(
        collection="rgb",
        item_id="p",
        href="x",
        datetime=dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
        bbox=(10.0, 45.0, 10.2, 45.2),
        created=False,
    )
    old = make_item("p", "cogs/rgb/p.tif", (9.0, 44.0, 10.1, 45.1), when="2026-01-01T00:00:00Z")
    start, end, bbox = reseed_extent(new, old)
    assert (start, end) == (dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
    assert bbox == (9.0, 44.0, 10.2, 45.2)
    assert reseed_extent(new, None) == (new.datetime, new.datetime, new.bbox)

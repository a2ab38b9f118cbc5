"""The tile cache: plan, render and publish WebMercatorQuad tiles of a collection's COGs.

Items (STAC item dicts) that share a time key form one *layer*; a layer's tiles are a mosaic of
all its items (first valid pixel wins), so two products of one time never blank each other out.
Keys: ``tiles/<collection>/WebMercatorQuad/<time-key>/<z>/<x>/<y>.<png|webp>`` plus a TileJSON
per layer at ``tiles/<collection>/WebMercatorQuad/<time-key>/tilejson.json``; a seeder holds the
store lock ``locks/tiles/<collection>/<time-key>`` of each layer it renders.

Rendering goes block by block: a block of tiles of one zoom, up to ``BLOCK_PIXELS`` px square, is
warped in one read (rio-tiler's grid, ``WarpedVRT`` options and masks), mosaicked and cut into
tiles; 8-bit PNG tiles are encoded by :mod:`skyvault.tiles.png`, others by rio-tiler. What the
collection's ``render`` leaves unset gets a default (see :class:`_Style`): a COG's colour table,
8-bit data as it is, other data stretched from the layer's statistics.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import morecantile
import numpy as np
import rasterio
import shapely
from rasterio.dtypes import dtype_ranges
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rio_tiler.colormap import apply_cmap, cmap
from rio_tiler.errors import NoOverviewWarning, RioTilerError
from rio_tiler.io import Reader
from rio_tiler.models import ImageData
from rio_tiler.reader import Options
from rio_tiler.utils import get_vrt_transform, has_alpha_band, non_alpha_indexes, normalize_bounds
from shapely.geometry import Polygon, box, shape
from shapely.geometry.base import BaseGeometry

from skyvault.catalog.backend import union_bbox
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import StoreSettings
from skyvault.errors import (
    ConfigError,
    InvalidSeedRequestError,
    TilingError,
)
from skyvault.items import bbox_parts, interval_overlaps, item_interval
from skyvault.models import BBox, ItemRef, SeedChunk, SeedRequest, SeedResult
from skyvault.stac.item import band_statistics
from skyvault.storage.store import ObjectStore, open_store
from skyvault.tiles.png import encodable, encode_png

TMS_ID = "WebMercatorQuad"
TMS = morecantile.tms.get(TMS_ID)
COG_KEY_PROPERTY = "skyvault:cog_key"

_LAT_LIMIT = 85.0511287798066
_EAST_SHIFT = np.array([360.0, 0.0])
_WORLD = box(-180.0, -_LAT_LIMIT, 180.0, _LAT_LIMIT)
_CONTENT_TYPES = {"png": "image/png", "webp": "image/webp"}
_RESAMPLING = {"cubicspline": "cubic_spline"}
#: Pixels per side of one read: a block of tiles of one zoom is warped at once, then cut up.
BLOCK_PIXELS = 1024
#: The fewest tiles worth a task of their own when a layer is split for parallel renderers.
MIN_CHUNK_TILES = 64

Tile = tuple[int, int, int]
#: A value range per band, ``(minimum, maximum)``.
Ranges = Sequence[tuple[float, float]]


# --- keys -----------------------------------------------------------------------------------------


def layer_prefix(collection_id: str, layer: str) -> str:
    """``tiles/<collection>/WebMercatorQuad/<time-key>``."""
    return f"tiles/{collection_id}/{TMS_ID}/{layer}"


def tile_key(collection_id: str, layer: str, tile: Tile, fmt: str = "png") -> str:
    """The object key of tile ``(z, x, y)`` of a layer."""
    z, x, y = tile
    return f"{layer_prefix(collection_id, layer)}/{z}/{x}/{y}.{fmt}"


def tilejson_key(collection_id: str, layer: str) -> str:
    """The object key of a layer's TileJSON document."""
    return f"{layer_prefix(collection_id, layer)}/tilejson.json"


def seed_lock_key(collection_id: str, layer: str) -> str:
    """The store lock held while a layer is seeded: ``locks/tiles/<collection>/<time-key>``."""
    return f"locks/tiles/{collection_id}/{layer}"


# --- time -----------------------------------------------------------------------------------------


def _item_id(item: dict[str, Any]) -> str:
    return str(item.get("id", "<no id>"))


def _stamp(value: dt.datetime) -> str:
    frac = f".{value.microsecond:06d}" if value.microsecond else ""
    return value.strftime("%Y%m%dT%H%M%S") + frac + "Z"


def time_key(item: dict[str, Any]) -> str:
    """A filesystem-safe, deterministic key of the item's time, in UTC.

    ``20260101T000000Z`` for an instant, ``20260101T000000Z--20260101T010000Z`` for a range.
    Items with the same key form one layer of the tile cache.
    """
    start, end = item_interval(item)
    return _stamp(start) if start == end else f"{_stamp(start)}--{_stamp(end)}"


# --- geometry -------------------------------------------------------------------------------------


def _polygons(geom: BaseGeometry) -> list[Polygon]:
    if isinstance(geom, Polygon):
        return [geom] if not geom.is_empty else []
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _polygons(g)]
    return []


def _unwrap(poly: Polygon) -> list[Polygon]:
    """Split a polygon drawn across the antimeridian without being cut (e.g. 170..-170)."""
    shifted = shapely.transform(poly, lambda c: np.where(c[:, :1] < 0, c + _EAST_SHIFT, c))
    east = shifted.intersection(box(-180.0, -90.0, 180.0, 90.0))
    west = shapely.affinity.translate(shifted.intersection(box(180.0, -90.0, 540.0, 90.0)), xoff=-360.0)
    return _polygons(east) + _polygons(west)


def footprint_parts(item: dict[str, Any]) -> list[Polygon]:
    """The item's lon/lat footprint as polygons, split at the antimeridian, clipped to the TMS.

    Uses the GeoJSON geometry when present, else the bbox. A geometry part wider than 180° on an
    item whose bbox crosses the antimeridian is taken as drawn across it and split at ±180.

    Raises:
        TilingError: the item has neither a usable geometry nor a bbox.

    """
    bbox: Sequence[float] | None = item.get("bbox")
    crosses = bbox is not None and len(bbox) in (4, 6) and float(bbox[0]) > float(bbox[len(bbox) // 2])
    try:
        if item.get("geometry"):
            parts = _polygons(shapely.make_valid(shape(item["geometry"])))
        elif bbox:
            parts = [box(*p) for p in bbox_parts(bbox)]
        else:
            raise TilingError(f"item {_item_id(item)!r} has no geometry and no bbox")
    except (ValueError, TypeError, AttributeError, shapely.errors.ShapelyError) as e:
        raise TilingError(f"item {_item_id(item)!r} has an unreadable geometry: {e}") from e
    out: list[Polygon] = []
    for part in parts:
        minx, _, maxx, _ = part.bounds
        pieces = _unwrap(part) if crosses and maxx - minx > 180.0 else [part]
        for piece in pieces:
            out.extend(_polygons(piece.intersection(_WORLD)))
    return out


def _tile_boxes(tiles: Sequence[Tile]) -> np.ndarray:
    """Lon/lat boxes of the tiles; a tile's west/east depend on its column only, south/north on its row."""
    cols: dict[tuple[int, int], tuple[float, float]] = {}
    rows: dict[tuple[int, int], tuple[float, float]] = {}
    for z, x, y in tiles:
        if (z, x) not in cols or (z, y) not in rows:
            b = TMS.bounds(morecantile.Tile(x, y, z))
            cols[(z, x)], rows[(z, y)] = (b.left, b.right), (b.bottom, b.top)
    bounds = [(*cols[(z, x)], *rows[(z, y)]) for z, x, y in tiles]
    west, east, south, north = np.asarray(bounds, dtype="float64").T
    return np.asarray(shapely.box(west, south, east, north))


def _overlaps(geom: BaseGeometry, boxes: np.ndarray) -> np.ndarray:
    """Which boxes share area with ``geom`` (touching along an edge does not count)."""
    shapely.prepare(geom)
    hit: np.ndarray = shapely.intersects(geom, boxes)
    if hit.any():
        hit[hit] &= ~shapely.touches(geom, boxes[hit])
    return hit


def tiles_for_geometry(geom: BaseGeometry, zoom: int) -> list[Tile]:
    """The WebMercatorQuad tiles of ``zoom`` that share area with a lon/lat geometry.

    The geometry must not cross the antimeridian (split it first, see :func:`footprint_parts`).
    """
    geom = geom.intersection(_WORLD)
    if geom.is_empty:
        return []
    minx, miny, maxx, maxy = geom.bounds
    last = TMS.matrix(zoom).matrixWidth - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", morecantile.errors.PointOutsideTMSBounds)
        ul = TMS.tile(minx, maxy, zoom)
        lr = TMS.tile(maxx, miny, zoom)
    x0, x1 = max(0, min(ul.x, last)), max(0, min(lr.x, last))
    y0, y1 = max(0, min(ul.y, last)), max(0, min(lr.y, last))
    cols = [TMS.bounds(morecantile.Tile(x, y0, zoom)) for x in range(x0, x1 + 1)]
    rows = [TMS.bounds(morecantile.Tile(x0, y, zoom)) for y in range(y0, y1 + 1)]
    grid_x, grid_y = np.meshgrid(np.arange(len(cols)), np.arange(len(rows)), indexing="ij")
    gx, gy = grid_x.ravel(), grid_y.ravel()
    left = np.array([c.left for c in cols])[gx]
    right = np.array([c.right for c in cols])[gx]
    bottom = np.array([r.bottom for r in rows])[gy]
    top = np.array([r.top for r in rows])[gy]
    hit = _overlaps(geom, np.asarray(shapely.box(left, bottom, right, top)))
    return [(zoom, x0 + int(i), y0 + int(j)) for i, j in zip(gx[hit], gy[hit], strict=True)]


# --- planning -------------------------------------------------------------------------------------


def _cog_key(item: dict[str, Any], collection_id: str) -> str:
    key = item.get("properties", {}).get(COG_KEY_PROPERTY)
    if not key or not isinstance(key, str):
        raise TilingError(
            f"item {_item_id(item)!r} of collection {collection_id!r} has no {COG_KEY_PROPERTY!r} property"
        )
    return key


def zoom_range(request: SeedRequest, collection: CollectionConfig) -> tuple[int, int]:
    """The request's zoom range, defaulting to the collection's.

    Raises:
        InvalidSeedRequestError: the range is empty or outside 0..24.

    """
    lo = collection.min_zoom if request.min_zoom is None else request.min_zoom
    hi = collection.max_zoom if request.max_zoom is None else request.max_zoom
    if not 0 <= lo <= hi <= 24:
        raise InvalidSeedRequestError(f"seed request for {collection.id!r}: bad zoom range {lo}..{hi}")
    return lo, hi


def _selected(item: dict[str, Any], request: SeedRequest) -> bool:
    if request.item_ids is not None and item.get("id") not in request.item_ids:
        return False
    return interval_overlaps(item_interval(item), request.start, request.end)


def _raster_bands(item: dict[str, Any]) -> list[Any]:
    """The ``raster:bands`` of the item's COG asset (``data``, else the first asset that has them)."""
    assets = item.get("assets")
    if not isinstance(assets, dict):
        return []
    for name in ("data", *sorted(assets)):
        asset = assets.get(name)
        bands = asset.get("raster:bands") if isinstance(asset, dict) else None
        if isinstance(bands, list):
            return bands
    return []


def band_ranges(items: Iterable[dict[str, Any]]) -> tuple[tuple[float, float] | None, ...]:
    """Per COG band, the lowest minimum and highest maximum of the items' band statistics.

    Read from ``raster:bands`` (as register writes them); None for a band no item has finite
    statistics for.
    """
    ranges: list[tuple[float, float] | None] = []
    for item in items:
        for i, band in enumerate(_raster_bands(item)):
            while len(ranges) <= i:
                ranges.append(None)
            stats = band.get("statistics") if isinstance(band, dict) else None
            if not isinstance(stats, dict):
                continue
            try:
                lo, hi = float(stats["minimum"]), float(stats["maximum"])
            except (KeyError, TypeError, ValueError):
                continue
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                continue
            known = ranges[i]
            ranges[i] = (lo, hi) if known is None else (min(known[0], lo), max(known[1], hi))
    return tuple(ranges)


def _union_bounds(parts: Iterable[BaseGeometry]) -> BBox | None:
    bounds = [p.bounds for p in parts if not p.is_empty]
    if not bounds:
        return None
    b = np.asarray(bounds)
    return (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))


def block_side(collection: CollectionConfig) -> int:
    """Tiles per side of a block: the up to ``n x n`` tiles of one zoom rendered from one read."""
    return max(1, BLOCK_PIXELS // collection.render.tile_size)


def _group_tiles(tiles: Iterable[Tile], chunk_size: int, min_chunks: int, side: int) -> list[list[Tile]]:
    """Split tiles into chunks of whole blocks: at most ``chunk_size``, about ``min_chunks`` or more."""
    blocks: dict[tuple[int, int, int], list[Tile]] = defaultdict(list)
    for z, x, y in sorted(tiles):
        blocks[(z, x // side, y // side)].append((z, x, y))
    total = sum(len(b) for b in blocks.values())
    count = max(math.ceil(total / chunk_size), min(min_chunks, math.ceil(total / MIN_CHUNK_TILES)))
    groups: list[list[Tile]] = []
    current: list[Tile] = []
    done = 0
    for key in sorted(blocks):
        block = blocks[key]
        for piece in (block[i : i + chunk_size] for i in range(0, len(block), chunk_size)):
            if current and len(current) + len(piece) > chunk_size:
                groups.append(current)
                done, current = done + len(current), []
            current.extend(piece)
            if done + len(current) >= (len(groups) + 1) * total / count:
                groups.append(current)
                done, current = done + len(current), []
    if current:
        groups.append(current)
    return groups


def plan_seed(
    items: list[dict[str, Any]],
    request: SeedRequest,
    collection: CollectionConfig,
    chunk_size: int = 256,
    *,
    previous: Sequence[dict[str, Any]] = (),
    min_chunks: int = 1,
) -> list[SeedChunk]:
    """Plan the tiles to render for a seed request, grouped by layer and chunked.

    Items matching the request (time overlap, ``item_ids``) choose the tiles: those sharing area
    with their footprint, within the request bbox, for every zoom of the range. Every item of
    ``items`` with the same time key joins the mosaic of the tiles it touches, so pass all items
    of the interval (a catalog search) even when ``item_ids`` narrows what is re-rendered.
    ``previous`` are the former versions of replaced items: their footprints add tiles to their
    layer (so a forced re-seed re-renders or deletes what only the old extent covered) but they
    take no part in any mosaic.

    A chunk holds at most ``chunk_size`` tiles, in whole blocks (the tiles one read renders, see
    :func:`block_side`); a layer is split into about ``min_chunks`` chunks of equal size when it
    has enough tiles, so that that many renderers share it evenly. Every chunk of a layer carries
    the layer's band ranges (see :func:`band_ranges`), so all of its tiles share one stretch.

    Raises:
        InvalidSeedRequestError: the request names another collection, a bad zoom range or
            chunk size, or an item of another collection.
        TilingError: an item has no COG key or no footprint.
        MissingDatetimeError: an item has no usable time.

    """
    if request.collection != collection.id:
        raise InvalidSeedRequestError(
            f"seed request for collection {request.collection!r} planned with collection {collection.id!r}"
        )
    if chunk_size < 1 or min_chunks < 1:
        raise InvalidSeedRequestError(
            f"seed request for {collection.id!r}: chunk_size and min_chunks must be >= 1"
        )
    lo, hi = zoom_range(request, collection)
    area = [box(*p) for p in bbox_parts(request.bbox)] if request.bbox is not None else [_WORLD]

    layers: dict[str, list[tuple[dict[str, Any], list[Polygon]]]] = defaultdict(list)
    for item in items:
        if item.get("collection", collection.id) != collection.id:
            raise InvalidSeedRequestError(
                f"item {_item_id(item)!r} belongs to {item.get('collection')!r}, not {collection.id!r}"
            )
        _cog_key(item, collection.id)
        layers[time_key(item)].append((item, footprint_parts(item)))
    former: dict[str, list[Polygon]] = defaultdict(list)
    for item in previous:
        former[time_key(item)].extend(footprint_parts(item))

    chunks: list[SeedChunk] = []
    for layer in sorted(set(layers) | set(former)):
        members = sorted(layers[layer], key=lambda m: (_item_id(m[0]), _cog_key(m[0], collection.id)))
        ranges = band_ranges(item for item, _ in members)
        regions: list[BaseGeometry] = [p.intersection(a) for p in former[layer] for a in area]
        for item, parts in members:
            if _selected(item, request):
                regions.extend(p.intersection(a) for p in parts for a in area)
        regions = [r for r in regions if not r.is_empty and r.area > 0]
        tiles: set[Tile] = set()
        for region in regions:
            for zoom in range(lo, hi + 1):
                tiles.update(tiles_for_geometry(region, zoom))
        bounds = _union_bounds(regions)
        if not tiles or bounds is None:
            continue
        groups = _group_tiles(tiles, chunk_size, min_chunks, block_side(collection))
        for index, group in enumerate(groups):
            boxes = _tile_boxes(group)
            keys: list[str] = []
            for item, parts in members:
                key = _cog_key(item, collection.id)
                if key not in keys and any(_overlaps(part, boxes).any() for part in parts):
                    keys.append(key)
            chunks.append(
                SeedChunk(
                    collection=collection.id,
                    time_key=layer,
                    cog_keys=tuple(keys),
                    tiles=tuple(group),
                    bounds=bounds,
                    min_zoom=lo,
                    max_zoom=hi,
                    index=index,
                    total=len(groups),
                    band_ranges=ranges,
                )
            )
    return chunks


# --- rendering ------------------------------------------------------------------------------------


class _Readers:
    """rio-tiler readers of a chunk's COGs, each opened once, on first use, closed together."""

    def __init__(self, store: ObjectStore, collection: CollectionConfig) -> None:
        self._store = store
        self._collection = collection
        self._open: dict[str, Reader] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Readers:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def get(self, key: str) -> Reader:
        reader = self._open.get(key)
        if reader is None:
            options: Options = {}
            if self._collection.nodata is not None:
                options["nodata"] = self._collection.nodata
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoOverviewWarning)
                reader = self._stack.enter_context(Reader(self._store.gdal_path(key), options=options))
            self._open[key] = reader
        return reader


def _colormap(collection: CollectionConfig) -> Any:
    name = collection.render.colormap
    if not name:
        return None
    try:
        return cmap.get(name)
    except RioTilerError as e:
        raise ConfigError(f"collection {collection.id!r}: unknown colormap {name!r}") from e


def _resampling(collection: CollectionConfig, paletted: bool) -> str:
    """How a COG is warped for tiles: nearest for categorical or paletted data."""
    name = "nearest" if collection.cog.categorical or paletted else collection.cog.warp_resampling
    return _RESAMPLING.get(name, name)


def _default_bands(dataset: Any) -> tuple[int, ...] | None:
    """The bands shown when the collection names none (alpha bands only mask).

    None (all of them) for one or three bands, the first of two, the first three of more.
    """
    bands = non_alpha_indexes(dataset)
    if len(bands) == 2:
        return (bands[0],)
    if len(bands) > 3:
        return tuple(bands[:3])
    return None


def _shown_bands(reader: Reader, collection: CollectionConfig) -> Sequence[int] | None:
    """The collection's bands, else the default ones of the COG (None: every non-alpha band)."""
    if collection.render.bands:
        return collection.render.bands
    return _default_bands(_dataset(reader))


def _paletted(dataset: Any, band: int) -> bool:
    """Whether ``band`` of the dataset holds indices into a colour table."""
    return bool(0 < band <= dataset.count and dataset.colorinterp[band - 1] == ColorInterp.palette)


def _dataset(reader: Reader) -> Any:
    """The reader's open dataset."""
    if reader.dataset is None:
        raise ValueError(f"{reader.input} is not open")
    return reader.dataset


def _overview_ranges(ds: Any, nodata: float | None) -> dict[int, tuple[float, float]]:
    """Per band, the minimum and maximum of the COG's smallest overview (bands without data left out)."""
    factor = max(ds.overviews(1), default=1)
    shape = (ds.count, math.ceil(ds.height / factor), math.ceil(ds.width / factor))
    sample = ds.read(out_shape=shape, masked=True)
    if nodata is not None:
        sample = np.ma.masked_where(
            np.isnan(sample.data) if math.isnan(nodata) else sample.data == nodata, sample
        )
    out: dict[int, tuple[float, float]] = {}
    for band in range(ds.count):
        stats = band_statistics(sample[band])
        if stats.minimum is not None and stats.maximum is not None:
            out[band + 1] = (float(stats.minimum), float(stats.maximum))
    return out


class _Style:
    """How a chunk's pixel values become colours.

    A collection that sets ``render.rescale`` or ``render.colormap`` is rendered exactly so.
    Otherwise: one band with a colour table through that table (of the chunk's first COG); 8-bit
    data as it is; other data stretched per band from the layer's ``chunk.band_ranges``, or for a
    band without them from the smallest overviews of the chunk's COGs (read once per chunk).
    """

    def __init__(
        self, readers: _Readers, chunk: SeedChunk, collection: CollectionConfig, colormap: Any
    ) -> None:
        self._readers = readers
        self._chunk = chunk
        self._collection = collection
        render = collection.render
        self._configured = bool(render.rescale or render.colormap)
        self._colormap = colormap
        self._defaults: dict[tuple[str, int], tuple[Ranges | None, Any]] = {}
        self._measured: dict[int, tuple[float, float]] | None = None

    def look(self, data: np.ndarray) -> tuple[Ranges | None, Any]:
        """The value ranges to rescale ``data`` from (None: as it is) and the colormap to apply.

        Raises:
            TilingError: a COG's colour table or statistics cannot be read (names collection and COG).

        """
        if self._configured:
            return self._collection.render.rescale, self._colormap
        key = (data.dtype.str, int(data.shape[0]))
        if key not in self._defaults:
            self._defaults[key] = self._default(data.dtype, key[1])
        return self._defaults[key]

    def _failed(self, key: str, e: Exception) -> TilingError:
        return TilingError(
            f"collection {self._collection.id!r}: cannot read the colours or statistics of COG {key!r}: {e}"
        )

    def _default(self, dtype: np.dtype, count: int) -> tuple[Ranges | None, Any]:
        key = self._chunk.cog_keys[0]
        try:
            reader = self._readers.get(key)
            ds = _dataset(reader)
            shown = list(_shown_bands(reader, self._collection) or non_alpha_indexes(ds))
            if count == 1 and _paletted(ds, shown[0]):
                return None, ds.colormap(shown[0])
        except (RasterioError, RioTilerError, ValueError, OSError) as e:
            raise self._failed(key, e) from e
        if dtype == np.uint8:
            return None, None
        return [self._range(band) for band in shown[:count]], None

    def _range(self, band: int) -> tuple[float, float]:
        known = self._chunk.band_ranges
        found = known[band - 1] if band <= len(known) else None
        if found is None:
            found = self._measure().get(band)
        lo, hi = found or (0.0, 1.0)
        if hi <= lo:  # a constant band shows mid-grey
            lo, hi = lo - 0.5, lo + 0.5
        return lo, hi

    def _measure(self) -> dict[int, tuple[float, float]]:
        if self._measured is None:
            self._measured = {}
            for key in self._chunk.cog_keys:
                try:
                    reader = self._readers.get(key)
                    ranges = _overview_ranges(_dataset(reader), _nodata(reader, self._collection))
                except (RasterioError, RioTilerError, ValueError, OSError) as e:
                    raise self._failed(key, e) from e
                for band, (lo, hi) in ranges.items():
                    old = self._measured.get(band)
                    self._measured[band] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        return self._measured


def _existing(store: ObjectStore, chunk: SeedChunk, fmt: str) -> set[str]:
    """Keys of the chunk's tiles already in the store (one listing per tile column)."""
    found: set[str] = set()
    for z, x in sorted({(z, x) for z, x, _ in chunk.tiles}):
        prefix = f"{layer_prefix(chunk.collection, chunk.time_key)}/{z}/{x}/"
        found.update(o.key for o in store.list(prefix) if o.key.endswith("." + fmt))
    return found


def _blocks(tiles: Iterable[Tile], side: int) -> list[list[Tile]]:
    """The tiles grouped by block (``side x side`` tiles of one zoom), in order."""
    blocks: dict[tuple[int, int, int], list[Tile]] = defaultdict(list)
    for z, x, y in tiles:
        blocks[(z, x // side, y // side)].append((z, x, y))
    return [blocks[key] for key in sorted(blocks)]


def _covers(reader: Reader, xy_bounds: BBox) -> bool:
    """Whether a WebMercator area overlaps the dataset (rio-tiler's ``tile_exists`` for an area)."""
    bounds = xy_bounds
    if reader.crs != TMS.rasterio_crs:
        bounds = tuple(transform_bounds(TMS.rasterio_crs, reader.crs, *bounds, densify_pts=21))
    if not all(np.isfinite(bounds)):
        return True
    w, s, e, n = normalize_bounds(bounds)
    dw, ds, de, dn = normalize_bounds(reader.bounds)
    return bool(w < de and e > dw and n > ds and s < dn)


class _Block:
    """A rectangle of tiles of one zoom, read as one image (``rows x cols`` tiles)."""

    def __init__(self, tiles: Sequence[Tile], size: int) -> None:
        self.tiles = tiles
        self.size = size
        self.z = tiles[0][0]
        self.x0, self.y0 = min(x for _, x, _ in tiles), min(y for _, _, y in tiles)
        x1, y1 = max(x for _, x, _ in tiles), max(y for _, _, y in tiles)
        self.cols, self.rows = x1 - self.x0 + 1, y1 - self.y0 + 1
        ul = TMS.xy_bounds(morecantile.Tile(self.x0, self.y0, self.z))
        lr = TMS.xy_bounds(morecantile.Tile(x1, y1, self.z))
        self.bounds: BBox = (ul.left, lr.bottom, lr.right, ul.top)
        self.height, self.width = self.rows * size, self.cols * size

    def window(self, tile: Tile) -> tuple[slice, slice]:
        """Rows and columns of ``tile`` in the block's image."""
        _, x, y = tile
        r, c = (y - self.y0) * self.size, (x - self.x0) * self.size
        return slice(r, r + self.size), slice(c, c + self.size)

    def describe(self) -> str:
        z, x, y = self.tiles[0]
        more = f" (and {len(self.tiles) - 1} more of its block)" if len(self.tiles) > 1 else ""
        return f"{z}/{x}/{y}{more}"


def _nodata(reader: Reader, collection: CollectionConfig) -> float | None:
    """The collection's nodata value, else the dataset's."""
    if collection.nodata is not None:
        return collection.nodata
    return None if reader.dataset is None else reader.dataset.nodata


#: Pixel values ``(bands, rows, cols)`` and what is masked: ``(rows, cols)`` when the mask is the
#: same for every band, else ``(bands, rows, cols)``.
_Pixels = tuple[np.ndarray, np.ndarray]


def _per_band(masked: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The mask with one layer per band (a new array)."""
    return np.array(np.broadcast_to(masked, shape))


def _warp(
    reader: Reader, block: _Block, indexes: Sequence[int] | None, resampling: str, nodata: float | None
) -> _Pixels | None:
    """The block warped from a dataset without an alpha band, as rio-tiler's ``part`` reads it.

    Same grid (``get_vrt_transform``), same ``WarpedVRT`` and same masks as rio-tiler, without
    the masked-array bookkeeping that costs as much as the warp itself. None when the dataset
    needs rio-tiler's other paths (already in WebMercator, or an alpha band of its own).
    """
    src = reader.dataset
    if src is None or src.crs is None or src.crs == TMS.rasterio_crs or has_alpha_band(src):
        return None
    transform, vrt_width, vrt_height = get_vrt_transform(
        src, block.bounds, block.height, block.width, dst_crs=TMS.rasterio_crs
    )
    kind = Resampling[resampling]
    with WarpedVRT(
        src,
        crs=TMS.rasterio_crs,
        transform=transform,
        width=vrt_width,
        height=vrt_height,
        dtype=src.dtypes[0],
        resampling=kind,
        add_alpha=nodata is None,
        **({} if nodata is None else {"nodata": nodata, "src_nodata": nodata}),
    ) as vrt:
        bands = tuple(indexes) if indexes else tuple(range(1, src.count + 1))
        shape = (block.height, block.width)
        if nodata is None:
            values = vrt.read(
                indexes=(*bands, vrt.count), out_shape=(len(bands) + 1, *shape), resampling=kind
            )
            data, alpha = values[:-1], values[-1]
            opaque = dtype_ranges[str(alpha.dtype)][1]
            if opaque != 255 and alpha.max() == 255:  # GDAL's alpha of a masked source: 0..255
                opaque = 255
            return data, alpha != opaque
        data = vrt.read(indexes=bands, out_shape=(len(bands), *shape), resampling=kind)
        return data, (np.isnan(data) if math.isnan(nodata) else data == nodata)


def _read_block(
    readers: _Readers, chunk: SeedChunk, collection: CollectionConfig, block: _Block
) -> _Pixels | None:
    """The block's first-valid mosaic of the chunk's COGs, or None when none of them covers it.

    Per band and pixel the first COG (in ``chunk.cog_keys`` order) with a valid value wins, as
    with rio-tiler's ``FirstMethod``; reading stops once every pixel is filled.
    """
    data: np.ndarray | None = None
    masked: np.ndarray | None = None
    for key in chunk.cog_keys:
        try:
            reader = readers.get(key)
            if not _covers(reader, block.bounds):
                continue
            bands = _shown_bands(reader, collection)
            ds = _dataset(reader)
            resampling = _resampling(
                collection, _paletted(ds, bands[0] if bands else non_alpha_indexes(ds)[0])
            )
            pixels = _warp(reader, block, bands, resampling, _nodata(reader, collection))
            if pixels is None:
                img = reader.part(
                    block.bounds,
                    dst_crs=TMS.rasterio_crs,
                    bounds_crs=TMS.rasterio_crs,
                    height=block.height,
                    width=block.width,
                    max_size=None,
                    indexes=bands,
                    resampling_method=resampling,
                    reproject_method=resampling,
                )
                pixels = img.array.data, np.ma.getmaskarray(img.array)
        except (RasterioError, RioTilerError, ValueError, IndexError, OSError) as e:
            raise TilingError(
                f"collection {collection.id!r}: cannot render tile {block.describe()} from COG {key!r}: {e}"
            ) from e
        values, mask = pixels
        if data is None or masked is None:
            data, masked = values, mask
        else:
            if values.shape != data.shape:
                raise TilingError(
                    f"collection {collection.id!r}: COG {key!r} has {values.shape[0]} bands to mosaic "
                    f"with {data.shape[0]} for tile {block.describe()}"
                )
            if masked.ndim != mask.ndim:
                masked, mask = _per_band(masked, data.shape), np.broadcast_to(mask, data.shape)
            if values.dtype != data.dtype:
                data = data.astype(np.result_type(data, values))
            np.copyto(data, values, where=masked & ~mask)
            masked &= mask
        if not masked.any():
            break
    return None if data is None or masked is None else (data, masked)


class _Encoder:
    """Encodes the tiles of one block image the way rio-tiler's ``ImageData.render`` would.

    8-bit PNG tiles (grey or RGB, optionally through a colormap) take the fast encoder of
    :mod:`skyvault.tiles.png`; anything else (WebP, 16-bit, other band counts) goes through
    rio-tiler and GDAL.
    """

    def __init__(
        self, data: np.ndarray, masked: np.ndarray, collection: CollectionConfig, colormap: Any
    ) -> None:
        self.data = data
        self.masked = masked
        self.colormap = colormap
        self.fmt = collection.render.format
        self.valid = ~masked if masked.ndim == 2 else np.asarray(~masked.all(axis=0))
        self.pixels: np.ndarray | None = None
        if self.fmt == "png" and data.dtype == np.uint8 and (colormap is None or data.shape[0] == 1):
            alpha = np.where(self.valid, np.uint8(255), np.uint8(0))
            if colormap is not None:
                data, colour_alpha = apply_cmap(data, colormap)
                alpha = np.where(self.valid, colour_alpha, 0).astype(data.dtype)
            if encodable(data.shape[0] + 1, data.dtype):
                self.pixels = np.empty((*alpha.shape, data.shape[0] + 1), dtype=np.uint8)
                for band in range(data.shape[0]):
                    self.pixels[:, :, band] = data[band]
                self.pixels[:, :, -1] = alpha

    def encode(self, window: tuple[slice, slice]) -> bytes | None:
        """The encoded tile at ``window``, or None when it has no valid pixel."""
        rows, cols = window
        if not self.valid[rows, cols].any():
            return None
        if self.pixels is not None:
            return encode_png(self.pixels[rows, cols])
        data = self.data[:, rows, cols]
        tile = ImageData(np.ma.MaskedArray(data, mask=_per_band(self.masked[..., rows, cols], data.shape)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return bytes(tile.render(img_format=self.fmt.upper(), colormap=self.colormap, add_mask=True))


def _render_block(
    readers: _Readers, chunk: SeedChunk, collection: CollectionConfig, block: _Block, style: _Style
) -> list[tuple[Tile, bytes | None]]:
    """Each tile of the block, encoded, or None where no source pixel falls in it."""
    pixels = _read_block(readers, chunk, collection, block) if chunk.cog_keys else None
    if pixels is None:
        return [(tile, None) for tile in block.tiles]
    data, masked = pixels
    rescale, colormap = style.look(data)
    try:
        if rescale:
            img = ImageData(np.ma.MaskedArray(data, mask=_per_band(masked, data.shape)))
            img.rescale(in_range=rescale)
            data, masked = img.array.data, np.ma.getmaskarray(img.array)
        encoder = _Encoder(data, masked, collection, colormap)
        return [(tile, encoder.encode(block.window(tile))) for tile in block.tiles]
    except (RasterioError, RioTilerError, ValueError) as e:
        raise TilingError(
            f"collection {collection.id!r}: cannot encode tile {block.describe()} of COGs "
            f"{', '.join(chunk.cog_keys)}: {e}"
        ) from e


def render_chunk(
    chunk: SeedChunk,
    collection: CollectionConfig,
    store: StoreSettings,
    *,
    force: bool = False,
) -> SeedResult:
    """Render and write a chunk's tiles; skip existing tiles unless ``force``.

    Each tile is the first-valid mosaic of the chunk's COGs, transparent where no source has
    data. Tiles without any valid pixel are not written (with ``force``, a stale one is deleted).
    The tiles of one block (see :func:`block_side`) are read as one image and cut up. Colours
    follow the collection's ``render`` settings, with defaults for what it leaves unset (see
    :class:`~skyvault.config.collections.RenderConfig`).

    Raises:
        TilingError: a COG cannot be opened or a tile cannot be rendered (names collection, tile
            and COG).
        ConfigError: the collection's colormap is unknown.
        StorageError: a tile cannot be written.

    """
    if chunk.collection != collection.id:
        raise InvalidSeedRequestError(
            f"chunk of collection {chunk.collection!r} rendered with collection {collection.id!r}"
        )
    fmt = collection.render.format
    colormap = _colormap(collection)
    objects = open_store(store)
    existing = _existing(objects, chunk, fmt)
    keys = {tile: tile_key(collection.id, chunk.time_key, tile, fmt) for tile in chunk.tiles}
    todo = [tile for tile in chunk.tiles if force or keys[tile] not in existing]
    written = empty = 0
    with rasterio.Env(**objects.gdal_env()), _Readers(objects, collection) as readers:
        style = _Style(readers, chunk, collection, colormap)
        for tiles in _blocks(todo, block_side(collection)):
            block = _Block(tiles, collection.render.tile_size)
            for tile, data in _render_block(readers, chunk, collection, block, style):
                key = keys[tile]
                if data is None:
                    empty += 1
                    if key in existing:
                        objects.delete(key)
                    continue
                objects.put_bytes(key, data, _CONTENT_TYPES[fmt])
                written += 1
    return SeedResult(
        collection=collection.id,
        written=written,
        skipped=len(chunk.tiles) - len(todo),
        empty=empty,
        layers=(chunk.time_key,),
    )


def reseed_extent(
    item: ItemRef, previous: dict[str, Any] | None
) -> tuple[dt.datetime | None, dt.datetime | None, BBox]:
    """Time interval and lon/lat bbox to re-seed after ``item`` was written over ``previous``.

    Covers both versions, so the tiles of the old extent and of the old time's layer are
    re-rendered too.
    """
    start = item.start_datetime or item.datetime
    end = item.end_datetime or item.datetime
    bboxes: list[Sequence[float]] = [item.bbox]
    if previous is not None:
        old_start, old_end = item_interval(previous)
        start = min(start, old_start) if start else old_start
        end = max(end, old_end) if end else old_end
        if previous.get("bbox"):
            bboxes.append(previous["bbox"])
    w, s, e, n = union_bbox(bboxes) or item.bbox
    return start, end, (w, s, e, n)


def combine_results(collection_id: str, results: Iterable[SeedResult]) -> SeedResult:
    """Sum the tile counts of several chunks' results."""
    results = list(results)
    return SeedResult(
        collection=collection_id,
        written=sum(r.written for r in results),
        skipped=sum(r.skipped for r in results),
        empty=sum(r.empty for r in results),
        layers=tuple(sorted({layer for r in results for layer in r.layers})),
    )


# --- TileJSON -------------------------------------------------------------------------------------


def _merge_bounds(a: BBox, b: Sequence[float]) -> BBox:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def tilejson_document(
    collection: CollectionConfig,
    layer: str,
    bounds: BBox,
    min_zoom: int,
    max_zoom: int,
    existing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A TileJSON 3.0.0 document for a layer, merged with ``existing`` (bounds and zooms widened).

    The tile URL template is relative to the document (``{z}/{x}/{y}.png``); the centre's zoom is
    the one at which the bounds span about one tile, within the zoom range.
    """
    if existing:
        with contextlib.suppress(KeyError, TypeError, ValueError, IndexError):
            old = existing["bounds"]
            bounds = _merge_bounds(bounds, [float(v) for v in old[:4]])
        with contextlib.suppress(KeyError, TypeError, ValueError):
            min_zoom = min(min_zoom, int(existing["minzoom"]))
        with contextlib.suppress(KeyError, TypeError, ValueError):
            max_zoom = max(max_zoom, int(existing["maxzoom"]))
    west, south, east, north = bounds
    span = max(east - west, 1e-9)
    center_zoom = max(min_zoom, min(max_zoom, math.floor(math.log2(360.0 / span))))
    name = f"{collection.title or collection.id} {layer}"
    return {
        "tilejson": "3.0.0",
        "name": name,
        "description": collection.description or name,
        "scheme": "xyz",
        "tiles": [f"{{z}}/{{x}}/{{y}}.{collection.render.format}"],
        "minzoom": min_zoom,
        "maxzoom": max_zoom,
        "bounds": [west, south, east, north],
        "center": [(west + east) / 2, (south + north) / 2, center_zoom],
    }


def write_tilejson(
    collection: CollectionConfig,
    store: StoreSettings,
    layer: str,
    bounds: BBox,
    min_zoom: int,
    max_zoom: int,
) -> str:
    """Write (or widen) a layer's TileJSON; returns its key.

    An existing document's bounds and zoom range are merged in, so seeding another part of a
    layer keeps the document right. The merge is one ``store.update``, so seeders of the same
    layer in several processes or hosts never lose each other's bounds or zooms. An unreadable
    existing document is replaced.
    """
    key = tilejson_key(collection.id, layer)

    def merge(data: bytes | None) -> bytes:
        existing: dict[str, Any] | None = None
        if data is not None:
            with contextlib.suppress(ValueError):  # not JSON, or not UTF-8: replaced
                loaded = json.loads(data)
                existing = loaded if isinstance(loaded, dict) else None
        doc = tilejson_document(collection, layer, bounds, min_zoom, max_zoom, existing)
        return json.dumps(doc, indent=2).encode()

    open_store(store).update(key, merge, "application/json")
    return key


def write_tilejsons(
    chunks: Sequence[SeedChunk], collection: CollectionConfig, store: StoreSettings
) -> list[str]:
    """Write the TileJSON of every layer the chunks belong to; returns their keys."""
    layers: dict[str, SeedChunk] = {}
    for chunk in chunks:
        layers.setdefault(chunk.time_key, chunk)
    return [
        write_tilejson(collection, store, layer, c.bounds, c.min_zoom, c.max_zoom)
        for layer, c in sorted(layers.items())
    ]

"""STAC items for COGs: footprint, projection, raster statistics, file checksum, offline validation.

Everything is read from overviews (at most :data:`MAX_SAMPLE_PX` pixels on the long side), never at
full resolution, so describing a large COG costs a few small reads.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyproj
import pystac
import rasterio
import rasterio.features
import shapely
import shapely.affinity
from affine import Affine
from pyproj import Transformer
from pyproj.enums import TransformDirection
from pyproj.exceptions import CRSError as ProjCRSError
from pyproj.exceptions import ProjError
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, NoDataStrings, RasterBand, RasterExtension, Statistics
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from shapely.errors import GEOSException
from shapely.geometry import MultiPolygon, Point, Polygon, box, mapping
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import StoreSettings
from skyvault.errors import CatalogError, CogValidationError, MissingDatetimeError, RasterError
from skyvault.items import utc
from skyvault.models import CogInfo, Product
from skyvault.storage.store import open_store

log = logging.getLogger(__name__)

COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
COG_KEY_PROPERTY = "skyvault:cog_key"
SOURCE_SHA256_PROPERTY = "skyvault:source_sha256"
SIDECAR_KEY_PROPERTY = "skyvault:sidecar_key"
MAX_SAMPLE_PX = 1024
SHA256_MULTIHASH_PREFIX = "1220"
COORD_DECIMALS = 7
#: WGS 84 semi-major axis; a CRS whose ellipsoid differs by more than EARTH_TOLERANCE is not on the Earth.
EARTH_SEMI_MAJOR_M = 6378137.0
EARTH_TOLERANCE = 0.01
#: Bisection steps that place a footprint's edge on the limb of the Earth's disk.
LIMB_STEPS = 30
#: Largest longitude step between footprint vertices before an edge is subdivided (near a pole).
MAX_LON_STEP = 30.0
REFINE_ROUNDS = 16

_TIFF_DATETIME = re.compile(r"^\s*(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})\s*$")
_PROPERTY_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")
_OWN_PREFIXES = ("proj:", "raster:", "file:", "skyvault:")
_CORE_KEYS = frozenset({"datetime", "start_datetime", "end_datetime"})
_DATA_TYPES = {d.value: d for d in DataType}
_COMPLEX_TYPES = {
    "complex64": DataType.CFLOAT32,
    "complex128": DataType.CFLOAT64,
    "complex_int16": DataType.CINT16,
}
_SIDECAR_TYPES = {".xml": "application/xml", ".json": "application/json"}


# --- datetime ------------------------------------------------------------------------------------


def parse_tiff_datetime(value: str) -> dt.datetime | None:
    """Parse a ``TIFFTAG_DATETIME`` value (``YYYY:MM:DD HH:MM:SS``, UTC); None if malformed."""
    m = _TIFF_DATETIME.match(value)
    if not m:
        return None
    try:
        year, month, day, hour, minute, second = (int(g) for g in m.groups())
        return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
    except ValueError:
        return None


def item_times(
    product: Product, tiff_datetime: str | None
) -> tuple[dt.datetime | None, dt.datetime | None, dt.datetime | None]:
    """The item's ``(datetime, start_datetime, end_datetime)``, all in UTC.

    The product's own datetime wins; else its start/end range (``datetime`` None, unless only one
    end is known or both are equal); else the COG's ``TIFFTAG_DATETIME``.

    Raises:
        MissingDatetimeError: none of these is available or the TIFF tag is malformed.

    """
    start = utc(product.start_datetime) if product.start_datetime else None
    end = utc(product.end_datetime) if product.end_datetime else None
    if start and end and start > end:
        raise MissingDatetimeError(
            f"product {product.id!r} of collection {product.collection!r}: "
            f"start_datetime {start.isoformat()} is after end_datetime {end.isoformat()}"
        )
    if product.datetime is not None:
        return utc(product.datetime), start if end else None, end if start else None
    if start and end:
        return (start if start == end else None), start, end
    if start or end:
        return start or end, None, None
    if tiff_datetime:
        parsed = parse_tiff_datetime(tiff_datetime)
        if parsed is None:
            raise MissingDatetimeError(
                f"product {product.id!r} of collection {product.collection!r}: no datetime in its "
                f"record and a malformed TIFFTAG_DATETIME {tiff_datetime!r} in its COG"
            )
        return parsed, None, None
    raise MissingDatetimeError(
        f"product {product.id!r} of collection {product.collection!r}: no datetime, start/end or "
        "TIFFTAG_DATETIME found"
    )


# --- footprint -----------------------------------------------------------------------------------


def sample_shape(height: int, width: int, max_px: int = MAX_SAMPLE_PX) -> tuple[int, int]:
    """A decimated ``(height, width)`` with at most ``max_px`` on the long side."""
    scale = max(height, width) / max_px
    if scale <= 1:
        return height, width
    return max(1, round(height / scale)), max(1, round(width / scale))


def _unwrap_ring(coords: np.ndarray) -> np.ndarray:
    """Shift longitudes so consecutive vertices never jump by more than 180 degrees."""
    lon = coords[:, 0].copy()
    jumps = np.diff(lon)
    offsets = np.concatenate([[0.0], np.cumsum(-360.0 * np.round(jumps / 360.0))])
    out = coords.copy()
    out[:, 0] = lon + offsets
    return out


def lonlat_transformer(crs: CRS, name: str) -> Transformer:
    """A transformer from ``crs`` to lon/lat (EPSG:4326, x = longitude).

    Raises:
        RasterError: the CRS is not on the Earth (its ellipsoid is another body's) or PROJ cannot
            transform it to lon/lat; the message names ``name``.

    """
    try:
        source = pyproj.CRS.from_user_input(crs)
    except ProjCRSError as e:
        raise RasterError(f"{name}: PROJ cannot read its CRS: {e}") from e
    ellipsoid = source.ellipsoid
    if ellipsoid is not None:
        axis = float(ellipsoid.semi_major_metre)
        if not math.isfinite(axis) or abs(axis - EARTH_SEMI_MAJOR_M) > EARTH_TOLERANCE * EARTH_SEMI_MAJOR_M:
            raise RasterError(
                f"{name}: its CRS is not on the Earth (ellipsoid {ellipsoid.name!r}, semi-major axis "
                f"{axis:.0f} m), so it has no lon/lat footprint; only Earth rasters can be catalogued"
            )
    try:
        return Transformer.from_crs(source, "EPSG:4326", always_xy=True)
    except ProjError as e:
        why = "is not on the Earth" if "celestial body" in str(e) else "cannot be transformed to lon/lat"
        raise RasterError(f"{name}: its CRS {why}: {e}") from e


def _north_up(valid: np.ndarray, transform: Affine) -> tuple[np.ndarray, Affine]:
    """The mask and transform flipped so rows run north to south and columns west to east.

    Only for transforms without rotation; a rotated one is returned unchanged.
    """
    if transform.b != 0 or transform.d != 0:
        return valid, transform
    height, width = valid.shape
    if transform.e > 0:  # south-up: row 0 is the southern edge
        valid = valid[::-1, :]
        transform = transform @ Affine.translation(0, height) @ Affine.scale(1, -1)
    if transform.a < 0:  # east-left
        valid = valid[:, ::-1]
        transform = transform @ Affine.translation(width, 0) @ Affine.scale(-1, 1)
    return np.ascontiguousarray(valid), transform


def _grid_on_earth(
    cols: np.ndarray, rows: np.ndarray, transform: Affine, transformer: Transformer
) -> np.ndarray:
    """Which grid positions (fractional column, row) project to a point on the Earth."""
    t = transform
    xy = np.column_stack([(t.a * cols + t.b * rows + t.c).ravel(), (t.d * cols + t.e * rows + t.f).ravel()])
    return _lonlat(transformer, xy)[1].reshape(cols.shape)


def _on_earth(shape: tuple[int, int], transform: Affine, transformer: Transformer) -> np.ndarray:
    """Pixels that reach onto the Earth: their centre or a corner projects to a finite lon/lat."""
    height, width = shape
    rows, cols = np.mgrid[0 : height + 1, 0 : width + 1].astype("float64")
    corner = _grid_on_earth(cols, rows, transform, transformer)
    centre = _grid_on_earth(cols[:-1, :-1] + 0.5, rows[:-1, :-1] + 0.5, transform, transformer)
    return np.asarray(centre | corner[:-1, :-1] | corner[1:, :-1] | corner[:-1, 1:] | corner[1:, 1:])


def _source_polygons(valid: np.ndarray, transform: Affine) -> BaseGeometry:
    """The valid pixels as (multi)polygons in the raster's CRS, densified to 1/64 of their extent."""
    shapes = rasterio.features.shapes(valid.astype("uint8"), mask=valid, transform=transform, connectivity=8)
    geom = shapely.union_all([shapely.geometry.shape(g) for g, _ in shapes]).simplify(0)
    minx, miny, maxx, maxy = geom.bounds
    return shapely.segmentize(geom, max(maxx - minx, maxy - miny) / 64.0)


def _lonlat(transformer: Transformer, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``xy`` (n, 2) in lon/lat, and which points lie on the Earth (finite, |lat| <= 90)."""
    lon, lat = transformer.transform(xy[:, 0], xy[:, 1], errcheck=False)
    out = np.column_stack([np.asarray(lon, dtype="float64"), np.asarray(lat, dtype="float64")])
    return out, np.isfinite(out).all(axis=1) & (np.abs(out[:, 1]) <= 90.0)


class _Limb:
    """Moves footprint vertices that lie off the Earth onto its limb.

    Every vertex of the outline of ``valid`` touches a valid pixel that reaches onto the Earth; a
    vertex off the Earth is replaced by the last point on the Earth on the way from that pixel's
    centre (or a corner of it on the Earth) to the vertex, found by bisection in the raster's CRS.
    """

    def __init__(self, valid: np.ndarray, transform: Affine, transformer: Transformer) -> None:
        self.valid = valid
        self.transform = transform
        self.inverse = ~transform
        self.transformer = transformer

    def _anchors(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each point, a point on the Earth of a valid pixel touching it, and whether there is one.

        The point is the pixel's centre or, when that is off the Earth, one of its corners.
        """
        inv = self.inverse
        col = inv.a * xy[:, 0] + inv.b * xy[:, 1] + inv.c
        row = inv.d * xy[:, 0] + inv.e * xy[:, 1] + inv.f
        height, width = self.valid.shape
        candidates: list[np.ndarray] = []
        usable: list[np.ndarray] = []
        for dc, dr in ((-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)):
            c = np.floor(col + dc)
            r = np.floor(row + dr)
            inside = (c >= 0) & (c < width) & (r >= 0) & (r < height)
            valid = np.zeros(len(xy), dtype=bool)
            valid[inside] = self.valid[r[inside].astype("int64"), c[inside].astype("int64")]
            for oc, orow in ((0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
                t = self.transform
                pc, pr = c + oc, r + orow
                candidates.append(np.column_stack([t.a * pc + t.b * pr + t.c, t.d * pc + t.e * pr + t.f]))
                usable.append(valid)
        points = np.stack(candidates, axis=1)  # (n, 20, 2)
        on = np.stack(usable, axis=1) & _lonlat(self.transformer, points.reshape(-1, 2))[1].reshape(
            points.shape[:2]
        )
        found = on.any(axis=1)
        first = np.argmax(on, axis=1)
        return points[np.arange(len(xy)), first], found

    def __call__(self, ring: np.ndarray) -> np.ndarray:
        """``ring`` (open, in the raster's CRS) with its vertices off the Earth moved to the limb.

        Vertices that no valid pixel touches are dropped.
        """
        _, ok = _lonlat(self.transformer, ring)
        if ok.all():
            return ring
        off = np.flatnonzero(~ok)
        inside, found = self._anchors(ring[off])
        outside = ring[off[found]]
        inside = inside[found]
        lo = np.zeros(len(inside))
        hi = np.ones(len(inside))
        step = outside - inside
        for _ in range(LIMB_STEPS):
            mid = (lo + hi) / 2.0
            _, on = _lonlat(self.transformer, inside + step * mid[:, None])
            lo = np.where(on, mid, lo)
            hi = np.where(on, hi, mid)
        out = ring.copy()
        out[off[found]] = inside + step * lo[:, None]
        return np.asarray(out[ok | np.isin(np.arange(len(ring)), off[found])])


def _lon_step(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The shortest longitude difference between ``a`` and ``b`` (degrees, 0..180)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(np.abs((b - a + 180.0) % 360.0 - 180.0))


def _refine(ring: np.ndarray, transformer: Transformer) -> np.ndarray:
    """The open ring ``ring`` (raster CRS), subdivided until no edge sweeps a wide longitude range.

    Midpoints are added where an edge sweeps more than :data:`MAX_LON_STEP` degrees of longitude
    (edges passing near a pole), so that its longitudes can be unwrapped. An edge is measured from
    each end to its midpoint: an edge whose ends have the same longitude may still go once around
    a pole.
    """
    for _ in range(REFINE_ROUNDS):
        following = np.roll(np.arange(len(ring)), -1)
        mids = (ring + ring[following]) / 2.0
        ends, ok = _lonlat(transformer, ring)
        middle, mid_ok = _lonlat(transformer, mids)
        sweep = np.maximum(_lon_step(ends[:, 0], middle[:, 0]), _lon_step(middle[:, 0], ends[following, 0]))
        wide = ok & ok[following] & mid_ok & (sweep > MAX_LON_STEP / 2.0)
        if not wide.any():
            break
        ring = np.insert(ring, np.flatnonzero(wide) + 1, mids[wide], axis=0)
    return ring


def _enclosed_pole(coords: Any, transformer: Transformer, lonlat: np.ndarray) -> float:
    """Latitude of the pole a ring winds around: the one inside it in the raster's CRS.

    When neither pole can be placed in the raster's CRS, the hemisphere where most of the ring lies.
    """
    area = Polygon(np.asarray(coords, dtype="float64")[:, :2])
    for pole in (90.0, -90.0):
        x, y = transformer.transform(0.0, pole, direction=TransformDirection.INVERSE, errcheck=False)
        if math.isfinite(x) and math.isfinite(y) and area.covers(Point(x, y)):
            return pole
    return 90.0 if float(lonlat[:, 1].mean()) >= 0 else -90.0


def _project_ring(coords: Any, transformer: Transformer, limb: _Limb | None) -> np.ndarray | None:
    """A ring in lon/lat, unwrapped; None when it has no area.

    With ``limb``, vertices off the Earth are moved to its limb first; any left off are dropped.
    A ring that winds around a pole is closed along that pole.
    """
    ring = np.asarray(coords, dtype="float64")[:-1, :2]  # open: the last vertex repeats the first
    if limb is not None:
        ring = limb(ring)
    if len(ring) < 3:
        return None
    out, ok = _lonlat(transformer, _refine(ring, transformer))
    out = out[ok]
    if len(out) < 3:
        return None
    out = _unwrap_ring(np.vstack([out, out[:1]]))
    winding = round((out[-1, 0] - out[0, 0]) / 360.0)
    out = out[:-1]
    if winding:
        pole = _enclosed_pole(coords, transformer, out)
        out = np.vstack([out, [[out[0, 0] + 360.0 * winding, pole], [out[0, 0], pole]]])
    if len(np.unique(out, axis=0)) < 3 or Polygon(out).area <= 0:
        return None
    return out


def _beside(hole: np.ndarray, shell: np.ndarray) -> np.ndarray:
    """``hole`` shifted by the multiple of 360 degrees that puts it inside ``shell`` in longitude."""
    lo, hi = float(shell[:, 0].min()), float(shell[:, 0].max())
    hole_lo, hole_hi = float(hole[:, 0].min()), float(hole[:, 0].max())
    centre, hole_centre = (lo + hi) / 2.0, (hole_lo + hole_hi) / 2.0
    nearest = round((centre - hole_centre) / 360.0)

    def fit(k: int) -> tuple[float, float]:
        offset = 360.0 * k
        overlap = min(hi, hole_hi + offset) - max(lo, hole_lo + offset)
        return overlap, -abs(centre - hole_centre - offset)

    best = max((nearest - 1, nearest, nearest + 1), key=fit)
    out = hole.copy()
    out[:, 0] += 360.0 * best
    return out


def _to_lonlat(geom: BaseGeometry, transformer: Transformer, limb: _Limb | None = None) -> list[Polygon]:
    """Project polygons to lon/lat, every shell continuous and next to the first one in longitude.

    Holes move with their shell. A shell left without area drops its polygon, a hole left
    without area is dropped. Longitudes may leave [-180, 180] (a footprint drawn across the
    antimeridian); the whole set is shifted by a multiple of 360 so that its western end lies in
    [-180, 180). The polygons returned are valid.
    """
    reference: float | None = None
    rings: list[tuple[np.ndarray, list[np.ndarray]]] = []
    for poly in _polygons(geom):
        shell = _project_ring(poly.exterior.coords, transformer, limb)
        if shell is None:
            continue
        if reference is None:
            reference = float(shell[0, 0])
        shell[:, 0] += 360.0 * round((reference - shell[0, 0]) / 360.0)
        projected = [_project_ring(interior.coords, transformer, limb) for interior in poly.interiors]
        rings.append((shell, [_beside(hole, shell) for hole in projected if hole is not None]))
    if not rings:
        return []
    west = min(float(shell[:, 0].min()) for shell, _ in rings)
    shift = np.array([360.0 * math.floor((west + 180.0) / 360.0), 0.0])
    out: list[Polygon] = []
    for shell, holes in rings:
        area: BaseGeometry = _valid(Polygon(shell - shift))
        if holes:  # a difference, not interiors: a hole may touch its shell (along a pole, at the limb)
            area = area.difference(shapely.union_all([_valid(Polygon(h - shift)) for h in holes]))
        out.extend(_polygons(area))
    return [p for p in out if p.area > 0]


def _valid(geom: BaseGeometry) -> BaseGeometry:
    return geom if geom.is_valid else shapely.make_valid(geom)


def _split_antimeridian(polys: list[Polygon]) -> BaseGeometry:
    """Cut unwrapped lon/lat polygons at ±180 and bring the pieces back into [-180, 180]."""
    pieces: list[BaseGeometry] = []
    for poly in polys:
        poly = shapely.make_valid(poly) if not poly.is_valid else poly
        for k in (-1, 0, 1, 2):
            window = box(-180.0 + 360.0 * k, -90.0, 180.0 + 360.0 * k, 90.0)
            part = poly.intersection(window)
            if not part.is_empty:
                pieces.append(shapely.affinity.translate(part, xoff=-360.0 * k))
    merged = shapely.union_all([p for p in pieces if p.area > 0])
    return merged


def _polygons(geom: BaseGeometry) -> list[Polygon]:
    """The non-empty polygons in ``geom`` (lines and points left by cutting are dropped)."""
    if isinstance(geom, Polygon):
        return [geom] if not geom.is_empty else []
    out: list[Polygon] = []
    for part in getattr(geom, "geoms", []):
        out.extend(_polygons(part))
    return out


def _round_coords(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], (int, float)):
            return [round(float(v), COORD_DECIMALS) for v in value]
        return [_round_coords(v) for v in value]
    return value


def footprint(
    mask: np.ndarray, transform: Affine, crs: CRS, name: str
) -> tuple[dict[str, Any], list[float], bool]:
    """Lon/lat GeoJSON geometry and bbox of the valid pixels of ``mask`` (non-zero = valid).

    The mask is polygonized, unioned, densified in the source CRS, projected to EPSG:4326,
    simplified by about half a mask pixel and oriented counter-clockwise. Any orientation of the
    grid (south-up, east-left) is read correctly. Where the raster reaches off the Earth (a
    geostationary full disk, a whole-Earth projection), only the pixels that reach onto the Earth
    count and the footprint ends at its limb. A footprint crossing the antimeridian becomes a
    MultiPolygon split at ±180 and its bbox has ``west > east``; one winding around a pole is
    closed along it. The geometry is always valid (OGC rules) and the bbox its bounds.

    Returns:
        ``(geometry, bbox, crosses_antimeridian)``.

    Raises:
        RasterError: the mask holds no valid pixel (on the Earth), the CRS is not on the Earth or
            cannot be projected, or the geometry cannot be computed; the message names ``name``.

    """
    valid = np.asarray(mask) > 0
    if not valid.any():
        raise RasterError(f"{name}: no valid (non-nodata) pixel, cannot compute a footprint")
    transformer = lonlat_transformer(crs, name)
    try:
        return _footprint(valid, transform, transformer, name)
    except (GEOSException, ProjError, ValueError, TypeError, ArithmeticError) as e:
        raise RasterError(f"{name}: cannot compute its lon/lat footprint: {e}") from e


def _footprint(
    valid: np.ndarray, transform: Affine, transformer: Transformer, name: str
) -> tuple[dict[str, Any], list[float], bool]:
    valid, transform = _north_up(valid, transform)
    outline = _source_polygons(valid, transform)
    limb: _Limb | None = None
    if not _lonlat(transformer, shapely.get_coordinates(outline))[1].all():
        # part of the raster lies off the Earth: keep the pixels that reach onto it, and move
        # their outline's vertices that are off it onto the limb
        valid = valid & _on_earth(valid.shape, transform, transformer)
        if not valid.any():
            raise RasterError(f"{name}: no valid pixel lies on the Earth, cannot compute a footprint")
        outline = _source_polygons(valid, transform)
        limb = _Limb(valid, transform, transformer)
    polys = _to_lonlat(outline, transformer, limb)
    if not polys:
        raise RasterError(f"{name}: the valid-data footprint is empty after projection to EPSG:4326")

    unwrapped = shapely.union_all(polys)
    minx, miny, maxx, maxy = unwrapped.bounds
    pixel_deg = max((maxx - minx) / valid.shape[1], (maxy - miny) / valid.shape[0])
    unwrapped = unwrapped.simplify(pixel_deg * 0.5, preserve_topology=True)
    minx, miny, maxx, maxy = unwrapped.bounds
    crosses = minx < -180.0 or maxx > 180.0
    lonlat = _split_antimeridian(_polygons(unwrapped)) if crosses else unwrapped
    lonlat = shapely.set_precision(lonlat, 10.0**-COORD_DECIMALS)
    if not lonlat.is_valid:
        lonlat = shapely.make_valid(lonlat)
    parts = [orient(p, sign=1.0) for p in _polygons(lonlat) if p.area > 0]
    if not parts:
        raise RasterError(f"{name}: the valid-data footprint is empty after projection to EPSG:4326")
    shaped: BaseGeometry = parts[0] if len(parts) == 1 else MultiPolygon(parts)
    geometry = json.loads(json.dumps(mapping(shaped)))
    geometry["coordinates"] = _round_coords(geometry["coordinates"])

    if crosses and maxx - minx < 360.0:
        west = ((minx + 180.0) % 360.0) - 180.0
        east = ((maxx + 180.0) % 360.0) - 180.0
        bbox = [west, miny, east, maxy]
    else:
        b = shaped.bounds
        bbox = [b[0], b[1], b[2], b[3]]
    return geometry, [round(v, COORD_DECIMALS) for v in bbox], crosses


# --- raster description --------------------------------------------------------------------------


def _data_type(dtype: str) -> DataType:
    return _DATA_TYPES.get(dtype) or _COMPLEX_TYPES.get(dtype) or DataType.OTHER


def _nodata(value: float | None) -> float | NoDataStrings | None:
    if value is None:
        return None
    if math.isnan(value):
        return NoDataStrings.NAN
    if math.isinf(value):
        return NoDataStrings.INF if value > 0 else NoDataStrings.NINF
    return value


def band_statistics(data: np.ma.MaskedArray) -> Statistics:
    """min/max/mean/stddev/valid_percent of the unmasked, finite pixels of one band sample."""
    values = np.ma.getdata(data)
    valid = ~np.ma.getmaskarray(data)
    if np.issubdtype(values.dtype, np.floating):
        valid &= np.isfinite(values)
    total = values.size
    picked = values[valid].astype("float64")
    if picked.size == 0:
        return Statistics.create(valid_percent=0.0)
    return Statistics.create(
        minimum=float(picked.min()),
        maximum=float(picked.max()),
        mean=float(picked.mean()),
        stddev=float(picked.std()),
        valid_percent=round(100.0 * picked.size / total, 4),
    )


class _Description:
    """What build_item needs to know about a COG, read from its overviews."""

    def __init__(self, ds: Any, name: str) -> None:
        if ds.crs is None:
            raise RasterError(f"{name}: no CRS, cannot place it on the map")
        if ds.transform == Affine.identity():
            raise RasterError(f"{name}: no geotransform, cannot place it on the map")
        self.crs: CRS = ds.crs
        self.transform: Affine = ds.transform
        self.shape = (int(ds.height), int(ds.width))
        left, bottom, right, top = (float(v) for v in ds.bounds)
        # [min x, min y, max x, max y] whatever the grid's orientation (south-up, east-left)
        self.bounds = [min(left, right), min(bottom, top), max(left, right), max(bottom, top)]
        self.tiff_datetime: str | None = ds.tags().get("TIFFTAG_DATETIME")
        h, w = sample_shape(ds.height, ds.width)
        self.sample_transform = ds.transform @ Affine.scale(ds.width / w, ds.height / h)
        self.mask = ds.dataset_mask(out_shape=(h, w))
        sample = ds.read(out_shape=(ds.count, h, w), masked=True)
        self.bands: list[RasterBand] = []
        for i in range(ds.count):
            scale = ds.scales[i] if ds.scales else 1.0
            offset = ds.offsets[i] if ds.offsets else 0.0
            unit = ds.units[i] if ds.units else None
            self.bands.append(
                RasterBand.create(
                    nodata=_nodata(ds.nodatavals[i]),
                    data_type=_data_type(ds.dtypes[i]),
                    spatial_resolution=abs(float(ds.transform.a)),
                    statistics=band_statistics(sample[i]),
                    scale=scale if scale not in (None, 1.0) else None,
                    offset=offset if offset not in (None, 0.0) else None,
                    unit=unit or None,
                )
            )


@contextmanager
def _open_cog(store: StoreSettings, key: str, name: str) -> Iterator[Any]:
    backend = open_store(store)
    try:
        with rasterio.Env(**backend.gdal_env()), rasterio.open(backend.gdal_path(key)) as ds:
            yield ds
    except (RasterioError, ValueError) as e:
        raise RasterError(f"{name}: cannot read COG {key!r}: {e}") from e


# --- properties ----------------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return pystac.utils.datetime_to_str(utc(value))
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value


def product_properties(product: Product) -> dict[str, Any]:
    """The product's sidecar properties that can go into an item as they are.

    Keys must look like STAC field names (``name`` or ``prefix:name``). Keys skyvault computes
    itself (datetimes, ``proj:``, ``raster:``, ``file:``, ``skyvault:``) and values that are not
    JSON or that break STAC common metadata (e.g. a numeric ``title``) are skipped with a warning.
    """
    out: dict[str, Any] = {}
    for key, raw in product.properties.items():
        if not isinstance(key, str) or not _PROPERTY_KEY.match(key):
            log.warning("product %s: skipping property with bad key %r", product.id, key)
            continue
        if key in _CORE_KEYS or key.startswith(_OWN_PREFIXES):
            log.warning("product %s: skipping property %r, computed from the COG", product.id, key)
            continue
        value = _json_value(raw)
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            log.warning("product %s: skipping property %r, value is not JSON", product.id, key)
            continue
        problem = common_metadata_problem(key, value)
        if problem:
            log.warning("product %s: skipping property %r: %s", product.id, key, problem)
            continue
        out[key] = value
    return out


# --- the item ------------------------------------------------------------------------------------


def build_item(
    product: Product, cog: CogInfo, collection: CollectionConfig, store: StoreSettings
) -> dict[str, Any]:
    """Describe ``cog`` as a STAC item of ``collection`` (as a dict).

    The asset href is the store's absolute URL of the COG. The item carries one link, rel
    ``collection`` to ``../collection.json``; catalog backends set the structural links.

    Every error names the product and its collection; errors of GDAL, PROJ, GEOS and pystac are
    translated (the original is the ``__cause__``).

    Raises:
        RasterError: the COG is missing, unreadable, unplaced, not on the Earth, has no valid pixel
            (on the Earth), or its footprint cannot be computed.
        CogValidationError: the COG's size differs from ``cog.size``.
        MissingDatetimeError: no datetime for the product.
        CatalogError: the STAC item cannot be assembled from what was read.

    """
    name = f"product {product.id!r} of collection {collection.id!r}"
    backend = open_store(store)
    info = backend.head(cog.key)
    if info is None:
        raise RasterError(f"{name}: COG {cog.key!r} not found in the object store")
    if info.size != cog.size:
        raise CogValidationError(
            f"{name}: COG {cog.key!r} is {info.size} bytes in the store, {cog.size} when it was made"
        )
    with _open_cog(store, cog.key, name) as ds:
        desc = _Description(ds, name)

    when, start, end = item_times(product, desc.tiff_datetime)
    geometry, bbox, _ = footprint(desc.mask, desc.sample_transform, desc.crs, name)

    try:
        properties = product_properties(product)
        properties[COG_KEY_PROPERTY] = cog.key
        properties[SOURCE_SHA256_PROPERTY] = cog.source_sha256
        if product.sidecar_key:
            properties[SIDECAR_KEY_PROPERTY] = product.sidecar_key

        item = pystac.Item(
            id=product.id,
            geometry=geometry,
            bbox=bbox,
            datetime=when,
            start_datetime=start,
            end_datetime=end,
            properties=properties,
            collection=collection.id,
        )
        epsg = desc.crs.to_epsg()
        ProjectionExtension.ext(item, add_if_missing=True).apply(
            code=f"EPSG:{epsg}" if epsg else None,
            wkt2=None if epsg else desc.crs.to_wkt(version="WKT2_2019"),
            shape=list(desc.shape),
            transform=[float(v) for v in list(desc.transform)[:6]],
            bbox=desc.bounds,
        )
        for key in ("proj:code", "proj:wkt2"):
            if item.properties.get(key) is None:
                item.properties.pop(key, None)

        asset = pystac.Asset(
            href=backend.url(cog.key),
            media_type=COG_MEDIA_TYPE,
            roles=["data"],
            title=f"{collection.title or collection.id}: {product.id} (COG)",
        )
        item.add_asset("data", asset)
        FileExtension.ext(asset, add_if_missing=True).apply(
            size=cog.size, checksum=SHA256_MULTIHASH_PREFIX + cog.sha256
        )
        RasterExtension.ext(asset, add_if_missing=True).apply(bands=desc.bands)

        if product.sidecar_key:
            suffix = (
                "." + product.sidecar_key.rsplit(".", 1)[-1].lower() if "." in product.sidecar_key else ""
            )
            item.add_asset(
                "metadata",
                pystac.Asset(
                    href=backend.url(product.sidecar_key),
                    media_type=_SIDECAR_TYPES.get(suffix),
                    roles=["metadata"],
                    title=f"{product.id}: sidecar report",
                ),
            )

        out: dict[str, Any] = item.to_dict(include_self_link=False, transform_hrefs=False)
        out["links"] = [{"rel": "collection", "href": "../collection.json", "type": "application/json"}]
        return out
    except (pystac.STACError, ValueError, TypeError) as e:
        raise CatalogError(f"{name}: cannot build its STAC item: {e}") from e


# --- offline validation --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _registry() -> Any:
    from pystac.validation.local_validator import get_local_schema_cache
    from referencing import Registry, Resource
    from referencing.exceptions import NoSuchResource

    def offline(uri: str) -> Resource[Any]:
        raise NoSuchResource(ref=uri)  # type: ignore[call-arg]

    resources = [(uri, Resource.from_contents(body)) for uri, body in get_local_schema_cache().items()]
    return Registry(retrieve=offline).with_resources(resources)  # type: ignore[call-arg]


_ITEM_SCHEMA = f"https://schemas.stacspec.org/v{pystac.get_stac_version()}/item-spec/json-schema/item.json"
_COMMON_SCHEMA = (
    f"https://schemas.stacspec.org/v{pystac.get_stac_version()}/item-spec/json-schema/common.json"
)


@functools.lru_cache(maxsize=4)
def _validator(schema_uri: str) -> Any:
    from jsonschema import Draft7Validator  # type: ignore[import-untyped]

    return Draft7Validator({"$ref": schema_uri}, registry=_registry())


def common_metadata_problem(key: str, value: Any) -> str | None:
    """Why ``{key: value}`` breaks the STAC common metadata schema, or None if it does not."""
    import jsonschema

    errors = list(_validator(_COMMON_SCHEMA).iter_errors({key: value}))
    if not errors:
        return None
    best = jsonschema.exceptions.best_match(errors)
    return best.message if best is not None else "invalid"


def validate_item(item: dict[str, Any]) -> None:
    """Validate ``item`` against the core STAC item schema, offline (pystac's bundled schemas).

    Extension schemas are not checked (they are not available offline).

    Raises:
        CatalogError: the item breaks the schema; the message names the item and the first problem.

    """
    import jsonschema
    from referencing.exceptions import Unresolvable

    try:
        errors = list(_validator(_ITEM_SCHEMA).iter_errors(item))
    except Unresolvable as e:  # a schema reference that is not bundled
        raise CatalogError(f"item {item.get('id')!r}: cannot validate offline: {e}") from e
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        where = "/".join(str(p) for p in best.absolute_path) if best is not None else ""
        message = best.message if best is not None else "invalid"
        raise CatalogError(
            f"item {item.get('id')!r} of collection {item.get('collection')!r} is not a valid STAC "
            f"{pystac.get_stac_version()} item: {message}" + (f" (at {where})" if where else "")
        )

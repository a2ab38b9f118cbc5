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
import pystac
import rasterio
import rasterio.features
import shapely
import shapely.affinity
from affine import Affine
from pyproj import Transformer
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, NoDataStrings, RasterBand, RasterExtension, Statistics
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from shapely.geometry import MultiPolygon, Polygon, box, mapping
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


def _to_lonlat(geom: BaseGeometry, crs: CRS) -> list[Polygon]:
    """Project polygons to lon/lat, every ring continuous and next to the first one in longitude.

    Longitudes may leave [-180, 180] (a footprint drawn across the antimeridian); the whole set is
    shifted by a multiple of 360 so that its western end lies in [-180, 180).
    """
    transformer = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    reference: float | None = None

    def ring(coords: Any) -> np.ndarray:
        nonlocal reference
        arr = np.asarray(coords, dtype="float64")[:, :2]
        lon, lat = transformer.transform(arr[:, 0], arr[:, 1])
        out = _unwrap_ring(np.column_stack([lon, lat]))
        if reference is None:
            reference = float(out[0, 0])
        out[:, 0] += 360.0 * round((reference - out[0, 0]) / 360.0)
        return out

    polys = list(geom.geoms) if isinstance(geom, MultiPolygon) else [geom]
    rings = [(ring(p.exterior.coords), [ring(h.coords) for h in p.interiors]) for p in polys]
    west = min(float(shell[:, 0].min()) for shell, _ in rings)
    shift = np.array([360.0 * math.floor((west + 180.0) / 360.0), 0.0])
    return [Polygon(shell - shift, [h - shift for h in holes]) for shell, holes in rings]


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
    simplified by about half a mask pixel and oriented counter-clockwise. A footprint crossing the
    antimeridian becomes a MultiPolygon split at ±180 and its bbox has ``west > east``.

    Returns:
        ``(geometry, bbox, crosses_antimeridian)``.

    Raises:
        RasterError: the mask holds no valid pixel.

    """
    valid = mask > 0
    if not valid.any():
        raise RasterError(f"{name}: no valid (non-nodata) pixel, cannot compute a footprint")
    shapes = rasterio.features.shapes(valid.astype("uint8"), mask=valid, transform=transform, connectivity=8)
    geom = shapely.union_all([shapely.geometry.shape(g) for g, _ in shapes])
    geom = geom.simplify(0)
    width = geom.bounds[2] - geom.bounds[0]
    height = geom.bounds[3] - geom.bounds[1]
    geom = shapely.segmentize(geom, max(width, height) / 64.0)

    polys = _to_lonlat(geom, crs)
    unwrapped = shapely.union_all(polys)
    minx, miny, maxx, maxy = unwrapped.bounds
    crosses = minx < -180.0 or maxx > 180.0
    lonlat = _split_antimeridian(polys) if crosses else unwrapped

    pixel_deg = max((maxx - minx) / mask.shape[1], (maxy - miny) / mask.shape[0])
    lonlat = lonlat.simplify(pixel_deg * 0.5, preserve_topology=True)
    parts = [orient(p, sign=1.0) for p in _polygons(lonlat)]
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
        self.bounds = list(ds.bounds)
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
    except RasterioError as e:
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

    Raises:
        RasterError: the COG is missing, unreadable, unplaced or has no valid pixel.
        CogValidationError: the COG's size differs from ``cog.size``.
        MissingDatetimeError: no datetime for the product.

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
        bbox=[float(v) for v in desc.bounds],
    )
    for name in ("proj:code", "proj:wkt2"):
        if item.properties.get(name) is None:
            item.properties.pop(name, None)

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
        suffix = "." + product.sidecar_key.rsplit(".", 1)[-1].lower() if "." in product.sidecar_key else ""
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

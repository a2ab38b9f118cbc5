"""Preprocess: turn a product's source raster into a validated Cloud-Optimized GeoTIFF.

The source is read in place through GDAL (a local path or ``/vsis3/``), never downloaded first and
never modified. A small VRT in a scratch folder selects bands, sets nodata and carries the source's
metadata plus the source checksum; GDAL's COG driver converts it (reprojecting when the collection
asks for it) with the collection's profile. The result is validated strictly, checksummed and
uploaded atomically to ``cogs/<collection>/<product-id>.tif``.

Work beyond GDAL's conversion overlaps it or is small: the source is hashed in a thread while
GDAL converts it; the COG is hashed in a thread while it is validated and stored; validation
checks the rules of rio-cogeo's strict ``cog_validate`` from the TIFF header and IFDs, decoding
no pixel.

Before any pixel is read, the source must stay inside the store (no file GDAL opens for it, such
as a VRT's sources or an overview sidecar, may lie outside) and within the configured limits
(pixels per band, bands), and the scratch disk must have room for the estimated output; a full
disk found later is still reported as such, naming the scratch folder and the bytes needed.

The source checksum is stored in the COG as the GDAL metadata item ``SKYVAULT_SOURCE_SHA256``, next
to a fingerprint of the collection settings (``SKYVAULT_COG_PROFILE``), so a re-run finds a COG made
from the same bytes with the same settings and skips the work unless ``replace`` is requested.
The source is hashed while GDAL converts it: the COG is written with a same-length placeholder in
that item, which is overwritten in place once the hash is known. Overwriting a fixed-length value
inside the TIFF's ``GDAL_METADATA`` tag changes no offset or size, so the COG layout is untouched,
and the item is read back through GDAL before the file is accepted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import secrets
import struct
import threading
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import rasterio
import rasterio.shutil
from rasterio._err import CPLE_BaseError, CPLE_HttpResponseError
from rasterio.crs import CRS
from rasterio.dtypes import in_dtype_range
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.warp import calculate_default_transform
from rasterio.windows import Window

from skyvault.checksum import sha256_file, sha256_stream
from skyvault.cog.scratch import check_space, free_bytes, is_out_of_space, scratch_folder, space_error
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import LimitSettings, StoreSettings
from skyvault.errors import (
    CogValidationError,
    ConfigError,
    ObjectNotFoundError,
    RasterError,
    RasterLimitError,
    StorageError,
    TransientStorageError,
)
from skyvault.ids import check_id
from skyvault.models import CogInfo, CogRecord, ObjectInfo, Product
from skyvault.storage.store import ObjectStore, open_store

logger = logging.getLogger(__name__)

#: GDAL metadata item holding the sha256 of the source a COG was made from.
SOURCE_SHA256_TAG = "SKYVAULT_SOURCE_SHA256"
#: GDAL metadata item holding a fingerprint of the collection settings a COG was made with.
PROFILE_TAG = "SKYVAULT_COG_PROFILE"
#: Content type of the uploaded COGs (the STAC media type of a COG).
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"

_GDAL_METADATA_TIFF_TAG = 42112
_GDAL_ERRORS = (RasterioError, CPLE_BaseError)


def cog_key(collection_id: str, product_id: str) -> str:
    """Object key of a product's COG: ``cogs/<collection>/<product-id>.tif``."""
    return f"cogs/{check_id(collection_id, 'collection id')}/{check_id(product_id, 'product id')}.tif"


def cog_record_key(collection_id: str, product_id: str) -> str:
    """Object key of a COG's record: ``cogs/<collection>/<product-id>.json``."""
    return cog_key(collection_id, product_id)[: -len(".tif")] + ".json"


def write_cog_record(product: Product, cog: CogInfo, objects: ObjectStore) -> None:
    """Store what ``cog`` was made from next to it, unless the same record is there already."""
    record = CogRecord(product=product, cog=cog.model_copy(update={"created": False}))
    data = record.model_dump_json(indent=2).encode()
    key = cog_record_key(cog.collection, cog.product_id)
    try:
        if objects.head(key) is not None and objects.get_bytes(key) == data:
            return
    except ObjectNotFoundError:
        pass
    objects.put_bytes(key, data, content_type="application/json")


def read_cog_record(collection_id: str, product_id: str, store: StoreSettings) -> CogRecord | None:
    """The record of a product's COG, or None when there is none (or it is unreadable).

    Raises:
        StorageError: the store cannot be read.

    """
    key = cog_record_key(collection_id, product_id)
    try:
        data = open_store(store).get_bytes(key)
    except ObjectNotFoundError:
        return None
    try:
        return CogRecord.model_validate_json(data)
    except ValueError:
        logger.warning("COG record %s is unreadable; the product must be ingested again", key)
        return None


def list_cogs(collection_id: str, store: StoreSettings) -> list[str]:
    """Ids of the products of a collection that have a COG, sorted."""
    prefix = f"cogs/{check_id(collection_id, 'collection id')}/"
    return sorted(
        info.key[len(prefix) : -len(".tif")]
        for info in open_store(store).list(prefix)
        if info.key.endswith(".tif") and "/" not in info.key[len(prefix) :]
    )


def preprocess_product(
    product: Product,
    collection: CollectionConfig,
    store: StoreSettings,
    scratch_dir: Path,
    *,
    replace: bool = False,
    limits: LimitSettings | None = None,
) -> CogInfo:
    """Make (or find) the validated COG of one product and return what was stored.

    Args:
        product: the product; its ``source_key`` is read in place and never changed.
        collection: the product's collection (COG profile, target CRS, nodata, bands).
        store: the object store holding the source and receiving the COG.
        scratch_dir: parent of the unique working folder, which is always removed afterwards
            (folders left by killed conversions are removed by the next one).
        replace: rebuild even when the COG exists and was made from the same source bytes with the
            same collection settings.
        limits: pixels and bands a source may have, and when leftover scratch folders are stale
            (defaults: :class:`LimitSettings`).

    Returns:
        The COG's key, sha256 and size, the source's sha256, and ``created=False`` when an existing
        COG made from the same source with the same settings was kept untouched.

    Raises:
        RasterError: the source is missing, empty, unreadable, corrupt, lacks a CRS or a
            geotransform, or does not have the configured bands or a nodata value its type can hold.
        RasterLimitError: the source (or its reprojection) has more pixels per band or more bands
            than ``limits`` allow, or GDAL would read a file outside the store for it.
        ScratchSpaceError: the scratch disk has no room for the conversion (names folder and bytes).
        CogValidationError: the produced file is not a valid COG.
        ConfigError: the product is not of this collection, or the collection's target CRS is invalid.
        StorageError: reading the source or writing the COG failed (TransientStorageError if retryable;
            LinkOutsideStoreError if the source is a link out of a local store).

    """
    label = f"{product.collection}/{product.id}"
    limits = limits or LimitSettings()
    if product.collection != collection.id:
        raise ConfigError(f"product {label} is not in collection {collection.id!r}")
    key = cog_key(collection.id, product.id)
    source_key = product.source_key
    objects = open_store(store)

    source = objects.head(source_key)
    if source is None:
        raise RasterError(f"product {label}: source {source_key!r} not found")
    if source.size == 0:
        raise RasterError(f"product {label}: source {source_key!r} is empty (0 bytes)")

    env = _gdal_env(objects, source_key, key)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="cog-hash") as pool:
        known: str | None = None
        existing: tuple[str, int] | None = None
        if not replace:
            existing, known = _same_source_cog(objects, key, source_key, collection, env, pool)
        if existing is not None and known is not None:
            (sha256, size), source_sha256, created = existing, known, False
        else:
            with scratch_folder(scratch_dir, product.id, label, limits.stale_scratch_seconds) as work:
                cog_path, source_sha256, cog_hash = _make_cog(
                    product, collection, objects, source, env, work, pool, known, limits
                )
                objects.put_file(key, cog_path, content_type=COG_MEDIA_TYPE)
                sha256, size = cog_hash.result()
            created = True
    info = CogInfo(
        collection=collection.id,
        product_id=product.id,
        key=key,
        sha256=sha256,
        size=size,
        source_sha256=source_sha256,
        created=created,
    )
    write_cog_record(product, info, objects)
    return info


def _same_source_cog(
    objects: ObjectStore,
    key: str,
    source_key: str,
    collection: CollectionConfig,
    env: dict[str, Any],
    pool: ThreadPoolExecutor,
) -> tuple[tuple[str, int] | None, str | None]:
    """Look for an existing COG made from the current source bytes with the current settings.

    Returns:
        The existing COG's ``(sha256, size)`` if it was made from the same source with the same
        collection settings (else None), and the source's sha256 when it was computed (else None).

    """
    recorded, profile = _recorded_tags(objects, key, env)
    if recorded is None or profile != profile_fingerprint(collection):
        return None, None
    cancel = threading.Event()
    source_hash = pool.submit(_sha256_object, objects, source_key, cancel)
    cog_hash = pool.submit(_sha256_object, objects, key, cancel)
    try:
        source_sha256 = source_hash.result()[0]
    except BaseException:
        cancel.set()
        raise
    if source_sha256 == recorded:
        return cog_hash.result(), source_sha256
    cancel.set()
    with contextlib.suppress(_HashCancelledError, StorageError):
        cog_hash.result()
    return None, source_sha256


def _make_cog(
    product: Product,
    collection: CollectionConfig,
    objects: ObjectStore,
    source: ObjectInfo,
    env: dict[str, Any],
    work: Path,
    pool: ThreadPoolExecutor,
    source_sha256: str | None,
    limits: LimitSettings,
) -> tuple[Path, str, Future[tuple[str, int]]]:
    """Convert, stamp and validate the COG in ``work``; hash the source meanwhile if not known yet.

    Returns:
        The validated COG's path, the source's sha256 and the COG's ``(sha256, size)`` being
        computed (it is hashed while it is validated and stored).

    """
    label = f"{product.collection}/{product.id}"
    cancel = threading.Event()
    source_hash = None if source_sha256 else pool.submit(_sha256_object, objects, source.key, cancel)
    placeholder = "pending-" + secrets.token_hex(28)
    try:
        cog_path = _convert(product, collection, objects, source, env, work, placeholder, limits)
    except BaseException:
        cancel.set()
        raise
    if source_hash is not None:
        source_sha256 = source_hash.result()[0]
    assert source_sha256 is not None
    _check_unchanged(objects, source, label)
    _set_source_sha256(cog_path, placeholder, source_sha256, label)
    cog_hash = pool.submit(sha256_file, cog_path)
    _validate(cog_path, source_sha256, label, cog_key(collection.id, product.id))
    return cog_path, source_sha256, cog_hash


# --- GDAL environment and scratch ---------------------------------------------------------------


def _gdal_env(objects: ObjectStore, source_key: str, key: str) -> dict[str, Any]:
    env = dict(objects.gdal_env())
    remote = [p for p in (objects.gdal_path(source_key), objects.gdal_path(key)) if p.startswith("/vsi")]
    if remote:
        # Objects may change between runs of one process; never serve them from GDAL's cache.
        env["CPL_VSIL_CURL_NON_CACHED"] = ":".join(remote)
    return env


@contextlib.contextmanager
def _gdal(env: dict[str, Any]) -> Iterator[None]:
    with rasterio.Env(**env), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


# --- checksums ----------------------------------------------------------------------------------


class _HashCancelledError(Exception):
    """Hashing was abandoned because the conversion failed."""


def _sha256_object(objects: ObjectStore, key: str, cancel: threading.Event) -> tuple[str, int]:
    """Hex sha256 and size of an object, streamed; stops early once ``cancel`` is set."""
    with objects.open_read(key) as stream:
        return sha256_stream(cast(IO[bytes], _Cancellable(stream, key, cancel)))


class _Cancellable:
    """A binary stream that raises :class:`_HashCancelledError` once ``cancel`` is set."""

    def __init__(self, stream: IO[bytes], key: str, cancel: threading.Event) -> None:
        self._stream, self._key, self._cancel = stream, key, cancel
        if hasattr(stream, "readinto"):
            self.readinto = self._readinto

    def _check(self) -> None:
        if self._cancel.is_set():
            raise _HashCancelledError(self._key)

    def read(self, size: int = -1) -> bytes:
        self._check()
        return self._stream.read(size)

    def _readinto(self, buffer: memoryview) -> int:
        self._check()
        n: int = self._stream.readinto(buffer)  # type: ignore[attr-defined]
        return n


def _recorded_tags(objects: ObjectStore, key: str, env: dict[str, Any]) -> tuple[str | None, str | None]:
    """Source checksum and profile fingerprint recorded in an existing COG (None when absent)."""
    if objects.head(key) is None:
        return None, None
    try:
        with _gdal(env), rasterio.open(objects.gdal_path(key)) as ds:
            tags = ds.tags()
    except _GDAL_ERRORS:
        return None, None
    source = tags.get(SOURCE_SHA256_TAG)
    return (source if source and len(source) == 64 else None), tags.get(PROFILE_TAG)


def profile_fingerprint(collection: CollectionConfig) -> str:
    """Short digest of the collection settings that shape a COG (profile, CRS, nodata, bands)."""
    shape = {
        "cog": collection.cog.model_dump(mode="json"),
        "target_crs": collection.target_crs,
        "nodata": repr(collection.nodata),
        "bands": collection.bands,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def _check_unchanged(objects: ObjectStore, before: ObjectInfo, label: str) -> None:
    after = objects.head(before.key)
    if after is None or (after.size, after.last_modified) != (before.size, before.last_modified):
        raise RasterError(f"product {label}: source {before.key!r} changed while it was being converted")


# --- conversion ---------------------------------------------------------------------------------


def _convert(
    product: Product,
    collection: CollectionConfig,
    objects: ObjectStore,
    source: ObjectInfo,
    env: dict[str, Any],
    work: Path,
    placeholder: str,
    limits: LimitSettings,
) -> Path:
    """Write the COG into ``work`` (with a placeholder source checksum) and return its path.

    The source is checked (files inside the store, limits, scratch space) before GDAL reads pixels.
    """
    label = f"{product.collection}/{product.id}"
    where = f"product {label}: source {product.source_key!r}"
    what = f"converting {product.source_key!r}"
    vrt_path = work / "source.vrt"
    cog_path = work / f"{product.id}.tif"
    options = collection.cog.creation_options()
    needed = upper = source.size
    with _gdal(env):
        try:
            with rasterio.open(objects.gdal_path(source.key)) as src:
                _check_confined(objects, src, where)
                _check_georeferencing(src, where)
                _check_limits(src.width, src.height, src.count, limits, where)
                target = _target_crs(collection, src.crs)
                width, height = _output_size(src, target, limits, where)
                needed, upper = _scratch_estimate(
                    src, collection, width, height, source.size, options, target
                )
                check_space(work, needed, label, what)
                rasterio.shutil.copy(src, vrt_path, driver="VRT")
        except CPLE_HttpResponseError as e:
            raise TransientStorageError(f"{where} could not be read: {e}") from e
        except _GDAL_ERRORS as e:
            if is_out_of_space(e):
                raise space_error(work, needed, label, what) from e
            raise RasterError(f"{where} is not a readable raster: {e}") from e
        try:
            _edit_vrt(vrt_path, collection, where, placeholder)
        except OSError as e:
            if is_out_of_space(e):
                raise space_error(work, needed, label, what) from e
            raise StorageError(f"{where}: cannot write {vrt_path}: {e}") from e
        if target is not None:
            options["TARGET_SRS"] = target
            options["WARP_RESAMPLING"] = collection.cog.warp_resampling.upper()
        try:
            rasterio.shutil.copy(vrt_path, cog_path, driver="COG", **options)
        except CPLE_HttpResponseError as e:
            raise TransientStorageError(f"{where} could not be read: {e}") from e
        except _GDAL_ERRORS as e:
            if is_out_of_space(e):
                # The estimate was too low (the output compressed worse than the source): report
                # the uncompressed size, which is what the conversion may need at most.
                raise space_error(work, max(needed, upper), label, what) from e
            raise RasterError(f"{where} could not be converted to COG: {e}") from e
        _check_written(cog_path, work, upper, label, what, where)
    return cog_path


def _check_written(cog_path: Path, work: Path, upper: int, label: str, what: str, where: str) -> None:
    """Read the COG's last tile back: GDAL may report a refused write only in its log.

    Raises:
        ScratchSpaceError: the file is incomplete and the scratch disk has less than ``upper`` free.
        RasterError: the file is incomplete for another reason.

    """
    try:
        with rasterio.open(cog_path) as ds:
            (row, col), (height, width) = ds.block_shapes[0], (ds.height, ds.width)
            last = Window(
                (width - 1) // col * col, (height - 1) // row * row, min(col, width), min(row, height)
            )
            ds.read(window=last.intersection(Window(0, 0, width, height)))
    except _GDAL_ERRORS as e:
        if free_bytes(work) < upper:
            raise space_error(work, upper, label, what) from e
        raise RasterError(
            f"{where} could not be converted to COG: the written file is incomplete: {e}"
        ) from e


def _check_confined(objects: ObjectStore, src: Any, where: str) -> None:
    """Refuse a source for which GDAL opened files outside the store (VRT sources, sidecars)."""
    outside = [f for f in src.files if not objects.holds_gdal_path(f)]
    if outside:
        raise RasterError(
            f"{where} refers to files outside the store ({', '.join(sorted(outside))}); "
            "only objects of the store are read"
        )


def _check_limits(width: int, height: int, count: int, limits: LimitSettings, where: str) -> None:
    pixels = width * height
    if pixels > limits.max_pixels:
        raise RasterLimitError(
            f"{where} is {width} x {height} = {pixels} pixels per band, more than the limit "
            f"limits.max_pixels = {limits.max_pixels}; raise it (SKYVAULT_LIMITS__MAX_PIXELS) if "
            "such rasters are expected"
        )
    if count > limits.max_bands:
        raise RasterLimitError(
            f"{where} has {count} bands, more than the limit limits.max_bands = {limits.max_bands}; "
            "raise it (SKYVAULT_LIMITS__MAX_BANDS) if such rasters are expected"
        )


def _output_size(src: Any, target: str | None, limits: LimitSettings, where: str) -> tuple[int, int]:
    """Width and height of the COG: the source's, or its reprojection's (checked against limits)."""
    if target is None:
        return int(src.width), int(src.height)
    try:
        _, width, height = calculate_default_transform(src.crs, target, src.width, src.height, *src.bounds)
    except _GDAL_ERRORS:
        return int(src.width), int(src.height)  # the conversion itself reports what is wrong
    _check_limits(int(width), int(height), 1, limits, f"{where} reprojected to {target}")
    return int(width), int(height)


def _scratch_estimate(
    src: Any,
    collection: CollectionConfig,
    width: int,
    height: int,
    source_size: int,
    options: dict[str, str],
    target: str | None,
) -> tuple[int, int]:
    """Bytes the conversion writes to scratch: an estimate and an upper bound.

    The upper bound is the uncompressed output plus a third for overviews, twice when reprojecting
    (GDAL writes a warped copy first). A compressed output is estimated from the source's size.
    """
    bands = len(collection.bands) if collection.bands else int(src.count)
    if target is not None and src.nodata is None and collection.nodata is None:
        bands += 1  # GDAL adds an alpha band when warping data without nodata
    itemsize = max(np.dtype(d).itemsize for d in src.dtypes)
    raw = width * height * bands * itemsize
    copies = 2 if target is not None else 1
    upper = (raw + raw // 3) * copies
    if options.get("COMPRESS", "NONE").upper() == "NONE":
        return upper, upper
    return min(upper, 2 * source_size * copies), upper


def _check_georeferencing(src: Any, where: str) -> None:
    if src.crs is None:
        raise RasterError(f"{where} has no CRS")
    if src.transform.is_identity:
        raise RasterError(f"{where} has no geotransform")


def _target_crs(collection: CollectionConfig, source_crs: CRS) -> str | None:
    """The CRS to reproject to, or None when the collection keeps the source's CRS."""
    if not collection.target_crs:
        return None
    try:
        target = CRS.from_user_input(collection.target_crs)
    except RasterioError as e:
        raise ConfigError(
            f"collection {collection.id!r}: invalid target_crs {collection.target_crs!r}"
        ) from e
    return None if target == source_crs else collection.target_crs


def _edit_vrt(vrt_path: Path, collection: CollectionConfig, where: str, placeholder: str) -> None:
    """Select bands, set nodata and add the source checksum placeholder in the VRT GDAL wrote."""
    tree = ET.parse(vrt_path)
    root = tree.getroot()
    bands = {int(b.get("band", "0")): b for b in root.findall("VRTRasterBand")}

    if collection.bands:
        missing = [b for b in collection.bands if b not in bands]
        if missing:
            raise RasterError(f"{where} has {len(bands)} band(s); configured bands {missing} do not exist")
        for element in bands.values():
            root.remove(element)
        mask = root.find("MaskBand")
        at = list(root).index(mask) if mask is not None else len(root)
        for n, b in enumerate(collection.bands, start=1):
            element = _copy_element(bands[b])
            element.set("band", str(n))
            root.insert(at + n - 1, element)

    if collection.nodata is not None:
        for element in root.findall("VRTRasterBand"):
            _set_nodata(element, collection.nodata, where)

    metadata = next((m for m in root.findall("Metadata") if not m.get("domain")), None)
    if metadata is None:
        metadata = ET.Element("Metadata")
        root.insert(0, metadata)
    for item in metadata.findall("MDI"):
        if item.get("key") in (SOURCE_SHA256_TAG, PROFILE_TAG):
            metadata.remove(item)
    ET.SubElement(metadata, "MDI", key=SOURCE_SHA256_TAG).text = placeholder
    ET.SubElement(metadata, "MDI", key=PROFILE_TAG).text = profile_fingerprint(collection)
    tree.write(vrt_path, encoding="utf-8")


def _copy_element(element: ET.Element) -> ET.Element:
    return ET.fromstring(ET.tostring(element))


def _set_nodata(band: ET.Element, nodata: float, where: str) -> None:
    dtype = band.get("dataType", "")
    numpy_dtype = _GDAL_TYPES.get(dtype)
    if numpy_dtype is None or (math.isnan(nodata) and not numpy_dtype.startswith("float")):
        raise RasterError(f"{where}: data type {dtype} cannot hold nodata {nodata!r}")
    if not math.isnan(nodata) and not in_dtype_range(nodata, numpy_dtype):
        raise RasterError(f"{where}: data type {dtype} cannot hold nodata {nodata!r}")
    text = "nan" if math.isnan(nodata) else repr(int(nodata) if nodata.is_integer() else nodata)
    current = band.find("NoDataValue")
    if current is not None and current.text is not None and not _same_value(current.text, nodata):
        # Pixels at the source's nodata value are skipped and keep the band's new nodata value.
        for source in band.findall("SimpleSource"):
            source.tag = "ComplexSource"
            ET.SubElement(source, "NODATA").text = current.text
    if current is None:
        current = ET.SubElement(band, "NoDataValue")
    current.text = text


def _same_value(text: str, value: float) -> bool:
    try:
        other = float(text)
    except ValueError:
        return False
    return (math.isnan(other) and math.isnan(value)) or other == value


_GDAL_TYPES = {
    "Byte": "uint8",
    "Int8": "int8",
    "UInt16": "uint16",
    "Int16": "int16",
    "UInt32": "uint32",
    "Int32": "int32",
    "UInt64": "uint64",
    "Int64": "int64",
    "Float32": "float32",
    "Float64": "float64",
}


# --- the source checksum inside the COG ----------------------------------------------------------


def _set_source_sha256(cog_path: Path, placeholder: str, source_sha256: str, label: str) -> None:
    """Overwrite the placeholder in the COG's ``GDAL_METADATA`` TIFF tag with the source checksum."""
    needle = f">{placeholder}<".encode()
    with cog_path.open("r+b") as f:
        found = _tiff_tag_value(f, _GDAL_METADATA_TIFF_TAG)
        if found is None:
            raise CogValidationError(f"product {label}: the COG has no GDAL metadata tag")
        offset, value = found
        at = value.find(needle)
        if at < 0 or value.find(needle, at + 1) >= 0:
            raise CogValidationError(f"product {label}: the COG's source checksum item is missing")
        f.seek(offset + at + 1)
        f.write(source_sha256.encode("ascii"))


def _tiff_tag_value(f: Any, tag: int) -> tuple[int, bytes] | None:
    """File offset and bytes of a tag's value in the first IFD of a (Big)TIFF, or None."""
    header = f.read(16)
    order = {b"II": "<", b"MM": ">"}.get(header[:2])
    if order is None or len(header) < 16:
        return None
    (magic,) = struct.unpack(order + "H", header[2:4])
    if magic == 42:
        (ifd,) = struct.unpack(order + "I", header[4:8])
        count_fmt, entry_fmt, inline = "H", "HHII", 4
    elif magic == 43:
        (ifd,) = struct.unpack(order + "Q", header[8:16])
        count_fmt, entry_fmt, inline = "Q", "HHQQ", 8
    else:
        return None
    count_size = struct.calcsize(count_fmt)
    entry_size = struct.calcsize(order + entry_fmt)
    f.seek(ifd)
    (entries,) = struct.unpack(order + count_fmt, f.read(count_size))
    table = f.read(entries * entry_size)
    for i in range(entries):
        start = i * entry_size
        entry_tag, _type, count, value = struct.unpack(order + entry_fmt, table[start : start + entry_size])
        if entry_tag != tag:
            continue
        offset = ifd + count_size + start + entry_size - inline if count <= inline else value
        f.seek(offset)
        return offset, f.read(count)
    return None


def _validate(cog_path: Path, source_sha256: str, label: str, key: str) -> None:
    """Validate the COG strictly and check the source checksum item it records."""
    try:
        errors, warns = cog_problems(cog_path)
        with rasterio.open(cog_path) as ds:
            recorded = ds.tags().get(SOURCE_SHA256_TAG)
    except _GDAL_ERRORS as e:
        raise CogValidationError(f"product {label}: COG for {key!r} cannot be read back: {e}") from e
    if errors or warns:
        problems = "; ".join([*errors, *warns])
        raise CogValidationError(f"product {label}: COG for {key!r} is not a valid COG: {problems}")
    if recorded != source_sha256:
        raise CogValidationError(f"product {label}: COG for {key!r} does not record its source checksum")


def cog_problems(path: Path | str) -> tuple[list[str], list[str]]:
    """Errors and warnings of a file against the Cloud-Optimized GeoTIFF rules (strict: reject both).

    The rules and messages of rio-cogeo's ``cog_validate``, checked from the TIFF header and IFDs
    through GDAL's ``TIFF`` metadata domain; no pixel is read.

    Raises:
        RasterioError: the file cannot be opened.

    """
    with rasterio.open(path) as ds:
        errors, warns = _cog_layout_problems(ds)
        levels = len(ds.overviews(1)) if ds.driver == "GTiff" else 0
    for level in range(levels):
        with rasterio.open(path, OVERVIEW_LEVEL=level) as overview:
            large = overview.width > 512 or overview.height > 512
            if large and overview.block_shapes and overview.block_shapes[0][1] == overview.width:
                errors.append(f"Overview of index {level} is not tiled")
    return errors, warns


def _cog_layout_problems(ds: Any) -> tuple[list[str], list[str]]:
    """Errors and warnings of an open file's layout, overview tiling aside.

    Tiled, internal overviews in decreasing size, IFDs first and in order, the smallest overview's
    data first and the full resolution's last, and no edit that broke this layout since (GDAL's
    ``KNOWN_INCOMPATIBLE_EDITION``).
    """
    errors: list[str] = []
    warns: list[str] = []
    if ds.driver != "GTiff":
        return ["The file is not a GeoTIFF"], warns
    if any(Path(f).suffix.lower() == ".ovr" for f in ds.files):
        errors.append("Overviews found in external .ovr file. They should be internal")
    overviews = ds.overviews(1)
    rows, cols = ds.block_shapes[0]
    if ds.width > 512 or ds.height > 512:
        if cols == ds.width:
            errors.append("The file is greater than 512xH or 512xW, but is not tiled")
        if not overviews:
            warns.append(
                "The file is greater than 512xH or 512xW, it is recommended to include internal overviews"
            )
    ifd_offsets = [int(ds.get_tag_item("IFD_OFFSET", "TIFF", bidx=1))]
    if ifd_offsets[0] > 300:
        errors.append(f"The offset of the main IFD should be < 300. It is {ifd_offsets[0]} instead")
    ghost = ds.get_tag_item("GDAL_STRUCTURAL_METADATA", "TIFF")
    if ghost is not None and "KNOWN_INCOMPATIBLE_EDITION=YES" in ghost:
        errors.append(
            "This file used to have optimizations in its layout, but those have been, at least "
            "partly, invalidated by later changes"
        )
    if overviews and overviews != sorted(overviews):
        errors.append("Overviews should be sorted")
    for level, factor in enumerate(overviews):
        if not factor > 1:
            errors.append(f"Invalid Decimation {factor} for overview level {level}")
        ifd_offsets.append(int(ds.get_tag_item("IFD_OFFSET", "TIFF", bidx=1, ovr=level)))
        if ifd_offsets[-1] < ifd_offsets[-2]:
            before = "the one of the main image" if level == 0 else f"the one of index {level - 1}"
            errors.append(
                f"The offset of the IFD for overview of index {level} is {ifd_offsets[-1]}, whereas it "
                f"should be greater than {before}, which is at byte {ifd_offsets[-2]}"
            )
    sizes: list[tuple[int, int, int | None]] = [(ds.width, ds.height, None)]
    sizes += [(ds.width // factor, ds.height // factor, i) for i, factor in enumerate(overviews)]
    data_offsets: list[int] = []
    for width, height, ovr in sizes:
        offset = _first_block_offset(ds, width, height, rows, cols, ovr)
        if offset is not None:
            data_offsets.append(offset)
    if data_offsets and data_offsets[-1] < ifd_offsets[-1]:
        which = "smallest overview" if overviews else "image"
        errors.append(f"The offset of the first block of the {which} should be after its IFD")
    for i in range(len(data_offsets) - 2, 0, -1):
        if data_offsets[i] < data_offsets[i + 1]:
            errors.append(
                f"The offset of the first block of overview of index {i - 1} should be after the one "
                f"of the overview of index {i}"
            )
    if len(data_offsets) >= 2 and data_offsets[0] < data_offsets[1]:
        errors.append(
            "The offset of the first block of the main resolution image should be after the one of "
            f"the overview of index {len(overviews) - 1}"
        )
    return errors, warns


def _first_block_offset(
    ds: Any, width: int, height: int, rows: int, cols: int, level: int | None
) -> int | None:
    """File offset of the first stored block of the image or an overview (None: no block stored)."""
    for y in range((height + rows - 1) // rows):
        for x in range((width + cols - 1) // cols):
            value = ds.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=1, ovr=level)
            if value is not None and int(value) > 0:
                return int(value)
    return None

"""Preprocess: turn a product's source raster into a validated Cloud-Optimized GeoTIFF.

The source is read in place through GDAL (a local path or ``/vsis3/``), never downloaded first and
never modified. A small VRT in a scratch folder selects bands, sets nodata and carries the source's
metadata plus the source checksum; GDAL's COG driver converts it (reprojecting when the collection
asks for it) with the collection's profile. The result is validated strictly, checksummed and
uploaded atomically to ``cogs/<collection>/<product-id>.tif``.

A browse whose report places it (``rectifiedBrowse``, ``footprint``, ``regularGrid``; see
:mod:`skyvault.cog.georef`) gets that placement in the VRT, whatever georeferencing the file has, and
is warped to the collection's ``target_crs`` or, when none is set, EPSG:4326. A raster placed by
GCPs (from its report, or its own GCPs without a geotransform) is warped into a tiled scratch GeoTIFF
with GDAL's GCP polynomial or a thin-plate spline (the collection's ``cog.gcp_transformer``), GDAL
working through it in chunks of bounded memory, and that copy is converted.

Work beyond GDAL's conversion overlaps it or is small: the source is hashed in a thread while
GDAL converts it; the COG is hashed in a thread while it is validated and stored; validation
checks the rules of rio-cogeo's strict ``cog_validate`` from the TIFF header and IFDs, decoding
no pixel.

Before any pixel is read, the source must stay inside the store (no file GDAL opens for it, such
as a VRT's sources or an overview sidecar, may lie outside) and within the configured limits
(pixels per band, bands), and the scratch disk must have room for the estimated output; a full
disk found later is still reported as such, naming the scratch folder and the bytes needed.

The source checksum is stored in the COG as the GDAL metadata item ``SKYVAULT_SOURCE_SHA256``, next
to a fingerprint of the collection settings and of the report's placement (``SKYVAULT_COG_PROFILE``),
so a re-run finds a COG made from the same bytes with the same settings and placement and skips the
work unless ``replace`` is requested; a corrected report rebuilds it.
The source is hashed while GDAL converts it: the COG is written with a same-length placeholder in
that item, which is overwritten in place once the hash is known. Overwriting a fixed-length value
inside the TIFF's ``GDAL_METADATA`` tag changes no offset or size, so the COG layout is untouched,
and the item is read back through GDAL before the file is accepted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import secrets
import struct
import threading
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio._err import CPLE_BaseError, CPLE_HttpResponseError
from rasterio.crs import CRS
from rasterio.dtypes import in_dtype_range
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.transform import array_bounds
from rasterio.warp import calculate_default_transform, reproject
from rasterio.windows import Window

from skyvault.checksum import sha256_stream
from skyvault.cog.georef import (
    GcpMethod,
    Placement,
    PlacementError,
    file_gcps_placement,
    gcp_method,
    placed_by_report,
    report_placement,
    transformer_options,
)
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
    TransientError,
    TransientStorageError,
    naming_product,
)
from skyvault.ids import check_id
from skyvault.models import CogInfo, CogRecord, ObjectInfo, PreprocessBatch, Product
from skyvault.storage.store import ObjectStore, open_store

logger = logging.getLogger(__name__)

#: GDAL metadata item holding the sha256 of the source a COG was made from.
SOURCE_SHA256_TAG = "SKYVAULT_SOURCE_SHA256"
#: GDAL metadata item holding a fingerprint of the collection settings a COG was made with.
PROFILE_TAG = "SKYVAULT_COG_PROFILE"
#: Content type of the uploaded COGs (the STAC media type of a COG).
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"

_GDAL_METADATA_TIFF_TAG = 42112
#: The CRS a raster placed by its report or by GCPs is warped to when its collection sets no target_crs.
DEFAULT_PLACED_CRS = "EPSG:4326"
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
            geotransform (or GCPs) and has no report placing it, cannot be placed by its report or
            GCPs, or does not have the configured bands or a nodata value its type can hold.
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
    fingerprint = profile_fingerprint(collection, product)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="cog-hash") as pool:
        known: str | None = None
        existing: tuple[str, int] | None = None
        if not replace:
            existing, known = _same_source_cog(objects, key, source_key, fingerprint, env, pool)
        if existing is not None and known is not None:
            (sha256, size), source_sha256, created = existing, known, False
        else:
            with scratch_folder(scratch_dir, product.id, label, limits.stale_scratch_seconds) as work:
                cog_path, source_sha256, cog_hash = _make_cog(
                    product, collection, objects, source, env, work, pool, known, limits, fingerprint
                )
                objects.move_file(key, cog_path, content_type=COG_MEDIA_TYPE)
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


def preprocess_products(
    products: Sequence[Product],
    collection: CollectionConfig,
    store: StoreSettings,
    scratch_dir: Path,
    *,
    replace: Collection[str] = (),
    limits: LimitSettings | None = None,
) -> PreprocessBatch:
    """:func:`preprocess_product` for several products of one collection, one after another.

    Products whose id is in ``replace`` get their COG rebuilt. A product that fails fails alone:
    its message (naming it) goes to ``failed`` and the next product is converted.

    Raises:
        TransientError: a retry may help; COGs already made are found up to date by the retry.

    """
    cogs: list[CogInfo] = []
    failed: dict[str, str] = {}
    for product in products:
        try:
            cogs.append(
                preprocess_product(
                    product, collection, store, scratch_dir, replace=product.id in replace, limits=limits
                )
            )
        except TransientError:
            raise
        except Exception as e:  # whatever one product raises fails that product only
            logger.warning("preprocess of %s/%s failed", product.collection, product.id, exc_info=True)
            failed[product.id] = naming_product(product.collection, product.id, e)
    return PreprocessBatch(cogs=cogs, failed=failed)


def _same_source_cog(
    objects: ObjectStore,
    key: str,
    source_key: str,
    fingerprint: str,
    env: dict[str, Any],
    pool: ThreadPoolExecutor,
) -> tuple[tuple[str, int] | None, str | None]:
    """Look for an existing COG made from the current source bytes with the current settings.

    Returns:
        The existing COG's ``(sha256, size)`` if it was made from the same source with the same
        collection settings (else None), and the source's sha256 when it was computed (else None).

    """
    recorded, profile = _recorded_tags(objects, key, env)
    if recorded is None or profile != fingerprint:
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
    fingerprint: str,
) -> tuple[Path, str, Future[tuple[str, int]]]:
    """Convert, stamp and validate the COG in ``work``; hash the source meanwhile if not known yet.

    Returns:
        The validated COG's path, the source's sha256 and the COG's ``(sha256, size)`` being
        computed (it is hashed while it is validated and stored).

    """
    label = f"{product.collection}/{product.id}"
    cancel = threading.Event()
    source_hash = None if source_sha256 else pool.submit(_sha256_in_idle_time, objects, source.key, cancel)
    placeholder = "pending-" + secrets.token_hex(28)
    try:
        cog_path = _convert(product, collection, objects, source, env, work, placeholder, limits, fingerprint)
    except BaseException:
        cancel.set()
        raise
    if source_hash is not None:
        source_sha256 = source_hash.result()[0]
    assert source_sha256 is not None
    _check_unchanged(objects, source, label)
    _set_source_sha256(cog_path, placeholder, source_sha256, label)
    # opened here, so the hash reads the COG even once it has been moved into the store
    cog_hash = pool.submit(_sha256_opened, cog_path.open("rb", buffering=0))
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


def _sha256_opened(stream: IO[bytes]) -> tuple[str, int]:
    """Hex sha256 and size of an open file, which is closed afterwards."""
    with stream:
        return sha256_stream(stream)


def _sha256_in_idle_time(objects: ObjectStore, key: str, cancel: threading.Event) -> tuple[str, int]:
    """:func:`_sha256_object` at the lowest CPU priority, beside GDAL's conversion.

    GDAL's threads already keep every core nearly busy; at the lowest priority the hash takes the
    time they leave idle instead of taking cores from them. The thread stays at that priority
    (a thread may not raise its own again), which is harmless: it belongs to one call's pool.
    """
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: no setpriority here
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    return _sha256_object(objects, key, cancel)


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


def profile_fingerprint(collection: CollectionConfig, product: Product | None = None) -> str:
    """Short digest of what shapes a COG.

    The collection settings (profile, CRS, nodata, bands) and, for a browse its report places, that
    placement (geo-reference and reference system), so a corrected report rebuilds the COG.
    """
    cog = collection.cog.model_dump(mode="json")
    if cog.get("gcp_transformer") == "auto":
        del cog["gcp_transformer"]  # the default leaves the digests of earlier COGs as they were
    shape: dict[str, Any] = {
        "cog": cog,
        "target_crs": collection.target_crs,
        "nodata": repr(collection.nodata),
        "bands": collection.bands,
    }
    if product is not None and product.georeference is not None and placed_by_report(product.georeference):
        shape["placement"] = {
            "georeference": product.georeference.model_dump(mode="json"),
            "reference_system": product.crs_hint,
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
    fingerprint: str,
) -> Path:
    """Write the COG into ``work`` (with a placeholder source checksum) and return its path.

    The source is checked (files inside the store, limits, placement, scratch space) before GDAL
    reads pixels. A source placed by GCPs is first warped into ``work`` (see :class:`_GcpWarp`).
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
                _check_limits(src.width, src.height, src.count, limits, where)
                placement, placing = _placement(product, src, label, where)
                target = _target_crs(collection, placement.crs, DEFAULT_PLACED_CRS if placing else None)
                warp = _GcpWarp.plan(placement, target, collection, src, label, placing) if placing else None
                width, height = _output_size(placement, src.width, src.height, target, warp, limits, where)
                needed, upper = _scratch_estimate(
                    src,
                    collection,
                    width,
                    height,
                    source.size,
                    options,
                    target if warp is None else warp.crs.to_string(),
                    scratch_copy=warp is not None,
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
            if placing:
                _place_vrt(vrt_path, placement, label, placing)
            _edit_vrt(vrt_path, collection, where, placeholder, fingerprint)
        except OSError as e:
            if is_out_of_space(e):
                raise space_error(work, needed, label, what) from e
            raise StorageError(f"{where}: cannot write {vrt_path}: {e}") from e
        if target is not None or warp is not None:
            if warp is None:
                options["TARGET_SRS"] = cast(str, target)
            options["WARP_RESAMPLING"] = collection.cog.warp_resampling.upper()
        _categorical_options(vrt_path, options)
        cog_source = vrt_path
        if warp is not None:
            cog_source = warp.run(vrt_path, work, options.pop("WARP_RESAMPLING"), needed, upper, what)
        try:
            rasterio.shutil.copy(cog_source, cog_path, driver="COG", **options)
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


def _output_size(
    placement: Placement,
    width: int,
    height: int,
    target: str | None,
    warp: _GcpWarp | None,
    limits: LimitSettings,
    where: str,
) -> tuple[int, int]:
    """Width and height of the COG: the source's, its reprojection's or its GCP warp's.

    A reprojection or warp is checked against the limits.
    """
    if warp is not None:
        width, height = warp.width, warp.height
        _check_limits(width, height, 1, limits, f"{where} warped by its GCPs to {warp.crs}")
        return width, height
    if target is None or placement.transform is None:
        return width, height
    try:
        bounds = array_bounds(height, width, placement.transform)
        _, out_width, out_height = calculate_default_transform(
            placement.crs, target, width, height, bounds[0], bounds[1], bounds[2], bounds[3]
        )
    except _GDAL_ERRORS:
        return width, height  # the conversion itself reports what is wrong
    _check_limits(int(out_width), int(out_height), 1, limits, f"{where} reprojected to {target}")
    return int(out_width), int(out_height)


def _scratch_estimate(
    src: Any,
    collection: CollectionConfig,
    width: int,
    height: int,
    source_size: int,
    options: dict[str, str],
    target: str | None,
    *,
    scratch_copy: bool = False,
) -> tuple[int, int]:
    """Bytes the conversion writes to scratch: an estimate and an upper bound.

    The upper bound is the uncompressed output plus a third for overviews, twice when reprojecting
    (GDAL writes a warped copy first). A compressed output is estimated from the source's size.
    ``scratch_copy``: the source is warped by its GCPs into an uncompressed copy first, which stays
    on scratch while the COG is written (``target`` is then the CRS it is warped to).
    """
    bands = len(collection.bands) if collection.bands else int(src.count)
    if target is not None and src.nodata is None and collection.nodata is None:
        bands += 1  # GDAL adds an alpha band when warping data without nodata
    itemsize = max(np.dtype(d).itemsize for d in src.dtypes)
    raw = width * height * bands * itemsize
    if scratch_copy:
        cog = raw + raw // 3
        if options.get("COMPRESS", "NONE").upper() == "NONE":
            return raw + cog, raw + cog
        return raw + min(cog, 2 * source_size), raw + cog
    copies = 2 if target is not None else 1
    upper = (raw + raw // 3) * copies
    if options.get("COMPRESS", "NONE").upper() == "NONE":
        return upper, upper
    return min(upper, 2 * source_size * copies), upper


def _placement(product: Product, src: Any, label: str, where: str) -> tuple[Placement, str | None]:
    """Where the source lies, and what placing it means when it is not its own geotransform.

    A browse report's ``rectifiedBrowse``, ``footprint`` or ``regularGrid`` wins over whatever the
    file holds; otherwise the file's geotransform and CRS, else its GCPs and their CRS.

    Returns:
        The placement, and a phrase saying how it was made (for messages) when it came from the
        report or from GCPs; None when it is the file's own geotransform.

    Raises:
        RasterError: the report's geo-reference cannot place the image, or the file has no CRS or
            neither a geotransform nor GCPs.

    """
    georeference = product.georeference
    if georeference is not None and placed_by_report(georeference):
        placing = (
            f"placing browse {product.source_key!r} from report georeference {georeference.kind} "
            f"(reference system {product.crs_hint or 'EPSG:4326 (none given)'})"
        )
        try:
            return report_placement(georeference, product.crs_hint, int(src.width), int(src.height)), placing
        except PlacementError as e:
            raise RasterError(f"product {label}: {placing}: {e}") from e
    if not src.transform.is_identity:
        if src.crs is None:
            raise RasterError(f"{where} has no CRS")
        return Placement(crs=src.crs, transform=src.transform), None
    gcps, gcp_crs = src.gcps
    if gcps:
        placing = f"placing {product.source_key!r} by its {len(gcps)} GCPs"
        if gcp_crs is None:
            raise RasterError(f"product {label}: {placing}: the GCPs have no CRS")
        return file_gcps_placement(gcps, gcp_crs), placing
    if src.crs is None:
        raise RasterError(f"{where} has no CRS, no geotransform and no GCPs, and no browse report places it")
    raise RasterError(f"{where} has no geotransform and no GCPs")


def _place_vrt(vrt_path: Path, placement: Placement, label: str, placing: str) -> None:
    """Give the VRT the placement (replacing the file's own georeferencing)."""
    try:
        with rasterio.open(vrt_path, "r+") as vrt:
            if placement.uses_gcps:
                vrt.gcps = (list(placement.gcps), placement.crs)
            else:
                vrt.crs = placement.crs
                vrt.transform = placement.transform
    except _GDAL_ERRORS as e:
        raise RasterError(f"product {label}: {placing}: GDAL refused the placement: {e}") from e
    tree = ET.parse(vrt_path)
    root = tree.getroot()
    dropped = ("GeoTransform", "SRS") if placement.uses_gcps else ("GCPList",)
    for element in [e for e in root if e.tag in dropped]:
        root.remove(element)
    tree.write(vrt_path, encoding="utf-8")


_RESAMPLING = {r.name.replace("_", ""): r for r in Resampling}


@dataclasses.dataclass(frozen=True)
class _GcpWarp:
    """How a source placed by GCPs is warped: CRS and grid of the result, GCP transformer."""

    crs: CRS
    transform: Affine
    width: int
    height: int
    method: GcpMethod
    label: str
    placing: str

    @classmethod
    def plan(
        cls,
        placement: Placement,
        target: str | None,
        collection: CollectionConfig,
        src: Any,
        label: str,
        placing: str,
    ) -> _GcpWarp | None:
        """The warp of a GCP placement (None for a placement by geotransform).

        Raises:
            RasterError: the GCPs cannot be fitted, or GDAL cannot tell where they put the image.

        """
        if not placement.uses_gcps:
            return None
        crs = CRS.from_user_input(target) if target is not None else placement.crs
        try:
            method = gcp_method(placement.gcps, collection.cog.gcp_transformer)
        except PlacementError as e:
            raise RasterError(f"product {label}: {placing}: {e}") from e
        try:
            transform, width, height = calculate_default_transform(
                placement.crs,
                crs,
                int(src.width),
                int(src.height),
                gcps=list(placement.gcps),
                **transformer_options(method),
            )
        except _GDAL_ERRORS as e:
            raise RasterError(
                f"product {label}: {placing}: GDAL cannot tell where the GCPs ({method}) put the image "
                f"in {crs}: {e}"
            ) from e
        return cls(crs, transform, int(width), int(height), method, label, placing)

    def run(self, vrt_path: Path, work: Path, resampling: str, needed: int, upper: int, what: str) -> Path:
        """Warp the VRT into a tiled, uncompressed GeoTIFF in ``work`` and return its path.

        GDAL warps in chunks within its warp memory limit. The copy keeps the VRT's metadata (the
        checksum placeholder included), band descriptions, colours and nodata; data without nodata
        gets an alpha band, as GDAL's COG driver adds when it reprojects.

        Raises:
            ScratchSpaceError: the scratch disk filled up.
            RasterError: GDAL failed to warp the source.

        """
        path = work / "warped.tif"
        try:
            with rasterio.open(vrt_path) as src:
                self._warp(src, path, _RESAMPLING[resampling.lower()])
        except CPLE_HttpResponseError as e:
            raise TransientStorageError(
                f"product {self.label}: {self.placing}: source could not be read: {e}"
            ) from e
        except _GDAL_ERRORS as e:
            if is_out_of_space(e):
                raise space_error(work, max(needed, upper), self.label, what) from e
            raise RasterError(
                f"product {self.label}: {self.placing}: warping with the GCPs ({self.method}) to "
                f"{self.crs} failed: {e}"
            ) from e
        return path

    def _warp(self, src: Any, path: Path, resampling: Resampling) -> None:
        interp = list(src.colorinterp)
        alpha = next((i for i, c in enumerate(interp, 1) if c == ColorInterp.alpha), 0)
        add_alpha = src.nodata is None and not alpha
        count = int(src.count) + (1 if add_alpha else 0)
        profile: dict[str, Any] = {
            "driver": "GTiff",
            "width": self.width,
            "height": self.height,
            "count": count,
            "dtype": np.result_type(*src.dtypes).name,
            "crs": self.crs,
            "transform": self.transform,
            "nodata": src.nodata,
            "tiled": True,
            "blockxsize": 512,
            "blockysize": 512,
            "BIGTIFF": "IF_SAFER",
        }
        bands = [b for b in range(1, int(src.count) + 1) if b != alpha]
        with rasterio.open(path, "w", **profile) as dst:
            dst.update_tags(**src.tags())
            for b in range(1, int(src.count) + 1):
                dst.update_tags(b, **src.tags(b))
                if src.descriptions[b - 1]:
                    dst.set_band_description(b, src.descriptions[b - 1])
                if src.units[b - 1]:
                    dst.set_band_unit(b, src.units[b - 1])
            dst.scales, dst.offsets = (
                src.scales + (1.0,) * (count - src.count),
                src.offsets + (0.0,) * (count - src.count),
            )
            dst.colorinterp = [*interp, ColorInterp.alpha] if add_alpha else interp
            with contextlib.suppress(ValueError):
                dst.write_colormap(1, src.colormap(1))
            reproject(
                rasterio.band(src, bands),
                rasterio.band(dst, bands),
                resampling=resampling,
                src_nodata=src.nodata,
                dst_nodata=src.nodata,
                src_alpha=alpha,
                dst_alpha=count if add_alpha else alpha,
                **transformer_options(self.method),
            )


def _target_crs(collection: CollectionConfig, source_crs: CRS, default: str | None = None) -> str | None:
    """The CRS to reproject to, or None when the result keeps the source's CRS.

    The collection's ``target_crs``, else ``default`` (the CRS placed rasters are warped to).
    """
    wanted = collection.target_crs or default
    if not wanted:
        return None
    try:
        target = CRS.from_user_input(wanted)
    except RasterioError as e:  # only a configured target_crs can be invalid
        raise ConfigError(
            f"collection {collection.id!r}: invalid target_crs {collection.target_crs!r}"
        ) from e
    return None if target == source_crs else wanted


def _edit_vrt(
    vrt_path: Path, collection: CollectionConfig, where: str, placeholder: str, fingerprint: str
) -> None:
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
    ET.SubElement(metadata, "MDI", key=PROFILE_TAG).text = fingerprint
    tree.write(vrt_path, encoding="utf-8")


def _categorical_options(vrt_path: Path, options: dict[str, str]) -> None:
    """Convert paletted data as categorical, whatever the profile says.

    A band with a colour table holds class indices: averaging or interpolating them makes classes
    the source never had. Its overviews (and its reprojection) are resampled with nearest, unless
    the profile already asks for nearest or mode, and overviews the source brings are rebuilt. GDAL
    keeps the colour table in the COG, but a GeoTIFF colour table has no alpha: a band without
    nodata whose table has a fully transparent entry gets the first such entry as nodata.

    Raises:
        StorageError: the VRT cannot be rewritten.

    """
    tree = ET.parse(vrt_path)
    bands = [b for b in tree.getroot().findall("VRTRasterBand") if b.find("ColorTable") is not None]
    if not bands:
        return
    options["OVERVIEWS"] = "IGNORE_EXISTING"
    for name in ("OVERVIEW_RESAMPLING", "WARP_RESAMPLING"):
        if name in options and options[name] not in ("NEAREST", "MODE"):
            options[name] = "NEAREST"
    transparent = {
        band: next((i for i, e in enumerate(band.iter("Entry")) if e.get("c4") == "0"), None)
        for band in bands
        if band.find("NoDataValue") is None
    }
    if not any(index is not None for index in transparent.values()):
        return
    for band, index in transparent.items():
        if index is not None:
            ET.SubElement(band, "NoDataValue").text = str(index)
    try:
        tree.write(vrt_path, encoding="utf-8")
    except OSError as e:
        raise StorageError(f"cannot write {vrt_path}: {e}") from e


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

"""Preprocess: turn a product's source raster into a validated Cloud-Optimized GeoTIFF.

The source is read in place through GDAL (a local path or ``/vsis3/``), never downloaded first and
never modified. A small VRT in a scratch folder selects bands, sets nodata and carries the source's
metadata plus the source checksum; GDAL's COG driver converts it (reprojecting when the collection
asks for it) with the collection's profile. The result is validated strictly, checksummed and
uploaded atomically to ``cogs/<collection>/<product-id>.tif``.

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
import math
import secrets
import shutil
import struct
import tempfile
import threading
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import rasterio
import rasterio.shutil
from rasterio._err import CPLE_BaseError, CPLE_HttpResponseError
from rasterio.crs import CRS
from rasterio.dtypes import in_dtype_range
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rio_cogeo.cogeo import cog_validate

from skyvault.checksum import CHUNK, sha256_file
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import StoreSettings
from skyvault.errors import (
    CogValidationError,
    ConfigError,
    RasterError,
    StorageError,
    TransientStorageError,
)
from skyvault.ids import check_id
from skyvault.models import CogInfo, ObjectInfo, Product
from skyvault.storage.store import ObjectStore, open_store

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


def preprocess_product(
    product: Product,
    collection: CollectionConfig,
    store: StoreSettings,
    scratch_dir: Path,
    *,
    replace: bool = False,
) -> CogInfo:
    """Make (or find) the validated COG of one product and return what was stored.

    Args:
        product: the product; its ``source_key`` is read in place and never changed.
        collection: the product's collection (COG profile, target CRS, nodata, bands).
        store: the object store holding the source and receiving the COG.
        scratch_dir: parent of the unique working folder, which is always removed afterwards.
        replace: rebuild even when the COG exists and was made from the same source bytes with the
            same collection settings.

    Returns:
        The COG's key, sha256 and size, the source's sha256, and ``created=False`` when an existing
        COG made from the same source with the same settings was kept untouched.

    Raises:
        RasterError: the source is missing, empty, unreadable, corrupt, lacks a CRS or a
            geotransform, or does not have the configured bands or a nodata value its type can hold.
        CogValidationError: the produced file is not a valid COG.
        ConfigError: the product is not of this collection, or the collection's target CRS is invalid.
        StorageError: reading the source or writing the COG failed (TransientStorageError if retryable).

    """
    label = f"{product.collection}/{product.id}"
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
            with _scratch(scratch_dir, product) as work:
                cog_path, source_sha256 = _make_cog(
                    product, collection, objects, source, env, work, pool, known
                )
                cog_hash = pool.submit(sha256_file, cog_path)
                objects.put_file(key, cog_path, content_type=COG_MEDIA_TYPE)
                sha256, size = cog_hash.result()
            created = True
    return CogInfo(
        collection=collection.id,
        product_id=product.id,
        key=key,
        sha256=sha256,
        size=size,
        source_sha256=source_sha256,
        created=created,
    )


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
) -> tuple[Path, str]:
    """Convert, stamp and validate the COG in ``work``; hash the source meanwhile if not known yet.

    Returns:
        The validated COG's path and the source's sha256.

    """
    label = f"{product.collection}/{product.id}"
    cancel = threading.Event()
    source_hash = None if source_sha256 else pool.submit(_sha256_object, objects, source.key, cancel)
    placeholder = "pending-" + secrets.token_hex(28)
    try:
        cog_path = _convert(product, collection, env, objects.gdal_path(source.key), work, placeholder)
    except BaseException:
        cancel.set()
        raise
    if source_hash is not None:
        source_sha256 = source_hash.result()[0]
    assert source_sha256 is not None
    _check_unchanged(objects, source, label)
    _set_source_sha256(cog_path, placeholder, source_sha256, label)
    _validate(cog_path, source_sha256, label, cog_key(collection.id, product.id))
    return cog_path, source_sha256


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


@contextlib.contextmanager
def _scratch(scratch_dir: Path, product: Product) -> Iterator[Path]:
    try:
        scratch_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"cog-{product.id}-", dir=scratch_dir))
    except OSError as e:
        raise StorageError(f"cannot create a scratch folder in {scratch_dir}: {e}") from e
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- checksums ----------------------------------------------------------------------------------


class _HashCancelledError(Exception):
    """Hashing was abandoned because the conversion failed."""


def _sha256_object(objects: ObjectStore, key: str, cancel: threading.Event) -> tuple[str, int]:
    """Hex sha256 and size of an object, streamed; stops early once ``cancel`` is set."""
    h = hashlib.sha256()
    size = 0
    with objects.open_read(key) as stream:
        while block := stream.read(CHUNK):
            if cancel.is_set():
                raise _HashCancelledError(key)
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


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
    env: dict[str, Any],
    source_path: str,
    work: Path,
    placeholder: str,
) -> Path:
    """Write the COG into ``work`` (with a placeholder source checksum) and return its path."""
    label = f"{product.collection}/{product.id}"
    where = f"product {label}: source {product.source_key!r}"
    vrt_path = work / "source.vrt"
    cog_path = work / f"{product.id}.tif"
    options = collection.cog.creation_options()
    with _gdal(env):
        try:
            with rasterio.open(source_path) as src:
                _check_georeferencing(src, where)
                target = _target_crs(collection, src.crs)
                rasterio.shutil.copy(src, vrt_path, driver="VRT")
        except CPLE_HttpResponseError as e:
            raise TransientStorageError(f"{where} could not be read: {e}") from e
        except _GDAL_ERRORS as e:
            raise RasterError(f"{where} is not a readable raster: {e}") from e
        _edit_vrt(vrt_path, collection, where, placeholder)
        if target is not None:
            options["TARGET_SRS"] = target
            options["WARP_RESAMPLING"] = collection.cog.warp_resampling.upper()
        try:
            rasterio.shutil.copy(vrt_path, cog_path, driver="COG", **options)
        except CPLE_HttpResponseError as e:
            raise TransientStorageError(f"{where} could not be read: {e}") from e
        except _GDAL_ERRORS as e:
            raise RasterError(f"{where} could not be converted to COG: {e}") from e
    return cog_path


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
    try:
        valid, errors, warns = cog_validate(cog_path, strict=True, quiet=True)
        with rasterio.open(cog_path) as ds:
            recorded = ds.tags().get(SOURCE_SHA256_TAG)
    except _GDAL_ERRORS as e:
        raise CogValidationError(f"product {label}: COG for {key!r} cannot be read back: {e}") from e
    if not valid:
        problems = "; ".join([*errors, *warns]) or "unknown reason"
        raise CogValidationError(f"product {label}: COG for {key!r} is not a valid COG: {problems}")
    if recorded != source_sha256:
        raise CogValidationError(f"product {label}: COG for {key!r} does not record its source checksum")

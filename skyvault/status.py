"""Per-product status records on the object store: what is done is recorded next to the outputs.

``status/<collection>/<product-id>.json`` holds a :class:`~skyvault.models.ProductStatus`, written
with the store's atomic put. ``process-product`` writes ``running`` first and ``done`` last, after
every output exists, so a process killed at any point leaves ``running`` (or the record of an
earlier run), never ``done``. Run history is not consulted: it is capped in queries, pruned by
retention and leaves a killed run RUNNING for ever.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from pydantic import ValidationError

from skyvault.config.settings import StoreSettings
from skyvault.errors import ObjectNotFoundError
from skyvault.ids import check_id
from skyvault.models import ProductStatus
from skyvault.storage.store import ObjectStore, open_store

STATUS_PREFIX = "status"
#: Status records read at the same time (object-store GETs are I/O bound).
READ_WORKERS = 16
_JSON = "application/json"


def status_key(collection_id: str, product_id: str) -> str:
    """Object key of a product's status record: ``status/<collection>/<product-id>.json``."""
    collection_id = check_id(collection_id, "collection id")
    return f"{STATUS_PREFIX}/{collection_id}/{check_id(product_id, 'product id')}.json"


def write_status(status: ProductStatus, store: StoreSettings) -> None:
    """Write (replace) a product's status record atomically.

    Raises:
        StorageError: the record could not be written.

    """
    key = status_key(status.collection, status.product_id)
    open_store(store).put_bytes(key, status.model_dump_json(indent=2).encode(), content_type=_JSON)


def read_status(collection_id: str, product_id: str, store: StoreSettings) -> ProductStatus | None:
    """A product's status record, or None when there is none or it cannot be parsed.

    Raises:
        StorageError: the store could not be read.

    """
    return _read(open_store(store), collection_id, product_id)


def read_statuses(
    pairs: Iterable[tuple[str, str]], store: StoreSettings
) -> dict[tuple[str, str], ProductStatus]:
    """Status records of many ``(collection, product)`` pairs: one listing per collection prefix.

    Only records the listing shows are read (concurrently), so products never processed cost
    nothing. Records that are missing, unparsable or about another product are left out: such a
    product counts as not done and is processed again.

    Raises:
        StorageError: a listing or a read failed.

    """
    objects = open_store(store)
    wanted: dict[str, set[str]] = defaultdict(set)
    for collection_id, product_id in pairs:
        wanted[collection_id].add(product_id)
    listed = _listed(objects, wanted)
    if not listed:
        return {}
    with ThreadPoolExecutor(max_workers=min(READ_WORKERS, len(listed)), thread_name_prefix="status") as pool:
        records = list(pool.map(lambda pair: _read(objects, *pair), listed))
    return {pair: record for pair, record in zip(listed, records, strict=True) if record is not None}


def needs_processing(
    status: ProductStatus | None,
    in_catalog: bool,
    *,
    replace: bool,
    seed_tiles: bool,
    digest: str | None = None,
) -> bool:
    """Whether ingest must (re)process a product.

    A product is skipped only when its record says ``done``, the catalog holds its item, when
    tiles are wanted the done run rendered them, and the product (``digest``, see
    :meth:`Product.digest`) is the one that run processed; ``replace`` processes it regardless.
    """
    if replace or status is None or not in_catalog or status.state != "done":
        return True
    if changed_since_done(status, digest):
        return True
    return seed_tiles and status.step != "seed"


def changed_since_done(status: ProductStatus | None, digest: str | None) -> bool:
    """Whether a product recorded done was described differently then (a corrected report or sidecar)."""
    return (
        status is not None
        and status.state == "done"
        and status.product_digest is not None
        and digest is not None
        and status.product_digest != digest
    )


def now() -> dt.datetime:
    """The current time in UTC, for ``updated_at``."""
    return dt.datetime.now(dt.UTC)


def _listed(objects: ObjectStore, wanted: Mapping[str, set[str]]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for collection_id in sorted(wanted):
        prefix = f"{STATUS_PREFIX}/{check_id(collection_id, 'collection id')}/"
        for info in objects.list(prefix):
            name = info.key[len(prefix) :]
            if "/" in name or not name.endswith(".json"):
                continue
            product_id = name[: -len(".json")]
            if product_id in wanted[collection_id]:
                found.append((collection_id, product_id))
    return found


def _read(objects: ObjectStore, collection_id: str, product_id: str) -> ProductStatus | None:
    key = status_key(collection_id, product_id)
    try:
        data = objects.get_bytes(key)
    except ObjectNotFoundError:
        return None
    try:
        record = ProductStatus.model_validate_json(data)
    except ValidationError:
        return None
    if (record.collection, record.product_id) != (collection_id, product_id):
        return None
    return record

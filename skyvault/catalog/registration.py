"""Registration: items built from COGs, written to the backend the settings name."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from skyvault.catalog.backend import CatalogBackend
from skyvault.catalog.static import StaticCatalog
from skyvault.cog.convert import cog_record_key, read_cog_record
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import CatalogSettings, StoreSettings
from skyvault.errors import (
    CatalogError,
    ConfigError,
    InvalidIdentifierError,
    ItemsRejectedError,
    ProductError,
    TransientError,
    naming_product,
)
from skyvault.models import CogInfo, ItemRef, Product, RegisterBatch, RegisterSummary
from skyvault.stac.item import build_item, validate_item


def open_catalog(catalog: CatalogSettings, store: StoreSettings) -> CatalogBackend:
    """The catalog backend the settings name.

    Raises:
        ConfigError: the backend is not known.

    """
    if catalog.backend == "static":
        return StaticCatalog(catalog, store)
    if catalog.backend == "stac-api":
        from skyvault.catalog.stac_api import StacApiCatalog

        return StacApiCatalog(catalog, store)
    if catalog.backend == "pgstac":
        from skyvault.catalog.pgstac import PgstacCatalog

        return PgstacCatalog(catalog, store)
    raise ConfigError(f"unknown catalog backend {catalog.backend!r}")


# --- registration ---------------------------------------------------------------------------------


def register_product(
    product: Product,
    cog: CogInfo,
    collection: CollectionConfig,
    catalog: CatalogSettings,
    store: StoreSettings,
) -> ItemRef:
    """Describe a product's COG as a STAC item, validate it offline and upsert it.

    Raises:
        MissingDatetimeError: no datetime for the product.
        RasterError: the COG cannot be read or has no valid pixel.
        CatalogError: the item is invalid or the catalog write failed.

    """
    item = build_item(product, cog, collection, store)
    validate_item(item)
    return open_catalog(catalog, store).upsert_items(collection, [item])[0]


def register_products(
    converted: Sequence[tuple[Product, CogInfo]],
    collection: CollectionConfig,
    catalog: CatalogSettings,
    store: StoreSettings,
) -> RegisterBatch:
    """:func:`register_product` for several products of one collection, in one catalog write.

    A product whose item cannot be built or is refused by the catalog fails alone, its message
    (naming it) in ``failed``; the others are registered.

    Raises:
        CatalogError: the write failed as a whole (TransientCatalogError when a retry may help).

    """
    items: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for product, cog in converted:
        try:
            item = build_item(product, cog, collection, store)
            validate_item(item)
            items.append(item)
        except TransientError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever one product raises fails that product only
            failed[product.id] = naming_product(product.collection, product.id, e)
    refs: list[ItemRef] = []
    if items:
        try:
            refs = open_catalog(catalog, store).upsert_items(collection, items)
        except ItemsRejectedError as e:
            failed.update({i: naming_product(collection.id, i, Exception(m)) for i, m in e.errors.items()})
            refs = list(e.written)
    return RegisterBatch(items=refs, failed=failed)


def register_cogs(
    collection: CollectionConfig,
    product_ids: Sequence[str],
    catalog: CatalogSettings,
    store: StoreSettings,
) -> RegisterSummary:
    """Build the items of the given products' COGs in parallel and upsert them in batches.

    Items are built from each COG and its record (:func:`skyvault.cog.convert.read_cog_record`),
    ``catalog.build_workers`` at a time, validated offline, and written ``catalog.batch_size``
    per catalog call. A product without a COG record, whose COG cannot be described, or whose
    item the catalog refuses fails alone, named in ``failed``; the others are registered.

    Raises:
        CatalogError: a whole batch could not be written (TransientCatalogError when a retry may
            help); the batches before it stay written, and a re-run writes them again unchanged.
        StorageError: the store cannot be read.

    """
    failed: dict[str, str] = {}
    registered = created = 0
    backend = open_catalog(catalog, store)

    def build(product_id: str) -> dict[str, Any] | None:
        try:
            record = read_cog_record(collection.id, product_id, store)
            if record is None:
                failed[product_id] = (
                    f"product {product_id!r} of collection {collection.id!r} has no COG record "
                    f"({cog_record_key(collection.id, product_id)}); ingest it to make one"
                )
                return None
            item = build_item(record.product, record.cog, collection, store)
            validate_item(item)
            return item
        except (ProductError, CatalogError, InvalidIdentifierError) as e:
            failed[product_id] = str(e)
            return None

    with ThreadPoolExecutor(max_workers=catalog.build_workers, thread_name_prefix="build-item") as pool:
        for start in range(0, len(product_ids), catalog.batch_size):
            chunk = product_ids[start : start + catalog.batch_size]
            items = [item for item in pool.map(build, chunk) if item is not None]
            if not items:
                continue
            try:
                refs = backend.upsert_items(collection, items)
            except ItemsRejectedError as e:
                failed.update(e.errors)
                refs = e.written
            registered += len(refs)
            created += sum(1 for ref in refs if ref.created)
    return RegisterSummary(
        collection=collection.id,
        found=len(product_ids),
        registered=registered,
        created=created,
        failed=dict(sorted(failed.items())),
    )


def has_item(collection_id: str, item_id: str, catalog: CatalogSettings, store: StoreSettings) -> bool:
    """Whether the catalog holds the item."""
    return bool(open_catalog(catalog, store).existing_ids(collection_id, [item_id]))


def read_item(
    collection_id: str, item_id: str, catalog: CatalogSettings, store: StoreSettings
) -> dict[str, Any] | None:
    """The stored item, or None (read before a replace so its old extent can be re-seeded)."""
    return open_catalog(catalog, store).get_item(collection_id, item_id)


def find_existing_items(
    pairs: Iterable[tuple[str, str]], catalog: CatalogSettings, store: StoreSettings
) -> set[tuple[str, str]]:
    """Which ``(collection_id, item_id)`` pairs the catalog holds (one query per collection)."""
    backend = open_catalog(catalog, store)
    by_collection: dict[str, list[str]] = {}
    for collection_id, item_id in pairs:
        by_collection.setdefault(collection_id, []).append(item_id)
    return {
        (collection_id, item_id)
        for collection_id, item_ids in by_collection.items()
        for item_id in backend.existing_ids(collection_id, item_ids)
    }


def search_items(
    collection_id: str,
    catalog: CatalogSettings,
    store: StoreSettings,
    *,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    bbox: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """The collection's items overlapping the interval and bbox (see :meth:`CatalogBackend.search`)."""
    return open_catalog(catalog, store).search(collection_id, start=start, end=end, bbox=bbox)

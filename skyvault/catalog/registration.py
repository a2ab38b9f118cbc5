"""Registration: items built from COGs, written to the backend the settings name."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from skyvault.catalog.backend import CatalogBackend
from skyvault.catalog.static import StaticCatalog
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import CatalogSettings, StoreSettings
from skyvault.errors import (
    ConfigError,
)
from skyvault.models import CogInfo, ItemRef, Product
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

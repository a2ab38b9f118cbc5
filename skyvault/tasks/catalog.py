"""Task adapters for :mod:`skyvault.catalog`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from prefect import task

from skyvault.catalog import registration
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import CatalogSettings, StoreSettings
from skyvault.models import CogInfo, ItemRef, Product, RegisterBatch, RegisterSummary
from skyvault.tasks.policy import TASK_POLICY


@task(name="register-product", tags=["catalog-write"], **TASK_POLICY)
def register_product(
    product: Product,
    cog: CogInfo,
    collection: CollectionConfig,
    catalog: CatalogSettings,
    store: StoreSettings,
) -> ItemRef:
    """Task: :func:`skyvault.catalog.registration.register_product`."""
    return registration.register_product(product, cog, collection, catalog, store)


@task(name="register-products", tags=["catalog-write"], **TASK_POLICY)
def register_products(
    converted: Sequence[tuple[Product, CogInfo]],
    collection: CollectionConfig,
    catalog: CatalogSettings,
    store: StoreSettings,
) -> RegisterBatch:
    """Task: :func:`skyvault.catalog.registration.register_products`."""
    return registration.register_products(converted, collection, catalog, store)


@task(name="register-cogs", tags=["catalog-write"], **TASK_POLICY)
def register_cogs(
    collection: CollectionConfig,
    product_ids: list[str],
    catalog: CatalogSettings,
    store: StoreSettings,
) -> RegisterSummary:
    """Task: :func:`skyvault.catalog.registration.register_cogs`.

    The register flow adds the tag ``catalog-write-<collection>`` (limit 1 on pgstac), so two
    bulk loads of one collection never run at once.
    """
    return registration.register_cogs(collection, product_ids, catalog, store)


@task(name="find-existing-items", **TASK_POLICY)
def find_existing_items(
    pairs: list[tuple[str, str]], catalog: CatalogSettings, store: StoreSettings
) -> set[tuple[str, str]]:
    """Task: :func:`skyvault.catalog.registration.find_existing_items`."""
    return registration.find_existing_items(pairs, catalog, store)


@task(name="read-item", **TASK_POLICY)
def read_item(
    collection_id: str, item_id: str, catalog: CatalogSettings, store: StoreSettings
) -> dict[str, Any] | None:
    """Task: :func:`skyvault.catalog.registration.read_item`."""
    return registration.read_item(collection_id, item_id, catalog, store)


@task(name="search-items", **TASK_POLICY)
def search_items(
    collection_id: str,
    catalog: CatalogSettings,
    store: StoreSettings,
    *,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    bbox: tuple[float, float, float, float] | None = None,
) -> list[dict[str, Any]]:
    """Task: :func:`skyvault.catalog.registration.search_items`."""
    return registration.search_items(collection_id, catalog, store, start=start, end=end, bbox=bbox)

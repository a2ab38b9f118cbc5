"""Task adapters for :mod:`skyvault.cog`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prefect import task

from skyvault.cog import convert
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import LimitSettings, StoreSettings
from skyvault.models import CogInfo, PreprocessBatch, Product
from skyvault.tasks.policy import TASK_POLICY


@task(name="preprocess-product", tags=["object-store-read", "object-store-write"], **TASK_POLICY)
def preprocess_product(
    product: Product,
    collection: CollectionConfig,
    store: StoreSettings,
    scratch_dir: Path,
    *,
    replace: bool = False,
    limits: LimitSettings | None = None,
) -> CogInfo:
    """Task: :func:`skyvault.cog.convert.preprocess_product`."""
    return convert.preprocess_product(product, collection, store, scratch_dir, replace=replace, limits=limits)


@task(name="preprocess-products", tags=["object-store-read", "object-store-write"], **TASK_POLICY)
def preprocess_products(
    products: Sequence[Product],
    collection: CollectionConfig,
    store: StoreSettings,
    scratch_dir: Path,
    *,
    replace: Sequence[str] = (),
    limits: LimitSettings | None = None,
) -> PreprocessBatch:
    """Task: :func:`skyvault.cog.convert.preprocess_products`."""
    return convert.preprocess_products(
        products, collection, store, scratch_dir, replace=replace, limits=limits
    )


@task(name="list-cogs", **TASK_POLICY)
def list_cogs(collection_id: str, store: StoreSettings) -> list[str]:
    """Task: :func:`skyvault.cog.convert.list_cogs`."""
    return convert.list_cogs(collection_id, store)

"""How an ingest groups products into runs: small products in batches, the others alone.

A ``process-product`` run costs the Prefect server a dozen and more round-trips; for a product
that converts in a fraction of a second that is most of its time. So when an ingest has more than
twice as many small products (sources listed at ``concurrency.batch_source_bytes`` or less) as it
runs at a time, they go ``batch_size`` to a ``process-products`` run, one collection per batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

from skyvault.models import Product


def batch_size(small: int, window: int, most: int) -> int:
    """How many small products one ``process-products`` run takes.

    Enough to keep ``window`` runs busy, at most ``most``; 1 (no batches, a run per product) up to
    twice as many small products as ``window``, where batches would save only a few runs.
    """
    return max(1, min(most, math.ceil(small / window))) if small > 2 * window else 1


def is_small(product: Product, most_bytes: int) -> bool:
    """Whether a product may run in a batch: its source is listed at ``most_bytes`` or less."""
    return product.source_size is not None and product.source_size <= most_bytes


def plan_runs(products: Iterable[Product], batch: int, small_bytes: int) -> Iterator[list[Product]]:
    """Products grouped into runs: small ones of one collection ``batch`` at a time, others alone."""
    pending: list[Product] = []
    for product in products:
        if batch < 2 or not is_small(product, small_bytes):
            yield [product]
            continue
        if pending and pending[0].collection != product.collection:
            yield pending
            pending = []
        pending.append(product)
        if len(pending) == batch:
            yield pending
            pending = []
    if pending:
        yield pending

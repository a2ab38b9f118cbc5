"""Task adapters for :mod:`skyvault.tiles`."""

from __future__ import annotations

from prefect import task

from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import StoreSettings
from skyvault.models import SeedChunk, SeedResult
from skyvault.tasks.policy import TASK_POLICY
from skyvault.tiles import seeding


@task(
    name="render-chunk",
    task_run_name="seed/{chunk.collection}/{chunk.time_key}/{chunk.index}",
    **TASK_POLICY,
)
def render_chunk(
    chunk: SeedChunk, collection: CollectionConfig, store: StoreSettings, force: bool = False
) -> SeedResult:
    """Task: :func:`skyvault.tiles.seeding.render_chunk`.

    No concurrency tag: a seed bounds its own parallel chunks (``concurrency.seed_workers``) and
    holds its layers' locks for the whole run, so a chunk never waits for a slot.
    """
    return seeding.render_chunk(chunk, collection, store, force=force)


@task(name="write-tilejsons", **TASK_POLICY)
def write_tilejsons(chunks: list[SeedChunk], collection: CollectionConfig, store: StoreSettings) -> list[str]:
    """Task: :func:`skyvault.tiles.seeding.write_tilejsons`.

    No concurrency tag: one small write per layer, made while the seed holds the layer's lock.
    """
    return seeding.write_tilejsons(chunks, collection, store)

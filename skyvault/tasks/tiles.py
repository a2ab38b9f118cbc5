"""Task adapters for :mod:`skyvault.tiles`."""

from __future__ import annotations

from typing import Any

from prefect import task

from skyvault.config.collections import CollectionConfig
from skyvault.config.provision import tileset_tag
from skyvault.config.settings import StoreSettings
from skyvault.models import SeedChunk, SeedResult
from skyvault.tasks.policy import TASK_POLICY
from skyvault.tiles import seeding


@task(
    name="render-chunk",
    tags=["object-store-read", "object-store-write"],
    task_run_name="seed/{chunk.collection}/{chunk.time_key}/{chunk.index}",
    **TASK_POLICY,
)
def render_chunk(
    chunk: SeedChunk, collection: CollectionConfig, store: StoreSettings, force: bool = False
) -> SeedResult:
    """Task: :func:`skyvault.tiles.seeding.render_chunk`.

    Submit it through :func:`tileset_seeder` so the run carries the ``tileset:<collection>`` tag.
    """
    return seeding.render_chunk(chunk, collection, store, force=force)


def tileset_seeder(collection: CollectionConfig) -> Any:
    """:func:`render_chunk` tagged ``tileset:<collection>`` (the one-seeder-per-tileset lock)."""
    return render_chunk.with_options(tags={*render_chunk.tags, tileset_tag(collection.id)})


@task(name="write-tilejsons", tags=["object-store-write"], **TASK_POLICY)
def write_tilejsons(chunks: list[SeedChunk], collection: CollectionConfig, store: StoreSettings) -> list[str]:
    """Task: :func:`skyvault.tiles.seeding.write_tilejsons`."""
    return seeding.write_tilejsons(chunks, collection, store)

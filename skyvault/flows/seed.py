"""The seed flow: pre-render a collection's tile cache for a time interval and zoom range."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from skyvault.config.settings import Settings, get_settings
from skyvault.models import BBox, SeedChunk, SeedRequest, SeedResult
from skyvault.storage.store import open_store
from skyvault.tasks.catalog import search_items
from skyvault.tasks.tiles import render_chunk, write_tilejsons
from skyvault.tiles.seeding import combine_results, plan_seed, seed_lock_key

#: Chunks planned per worker, so that workers finishing early pick up the remaining work.
CHUNKS_PER_WORKER = 4


@contextlib.contextmanager
def _layer_locks(settings: Settings, collection: str, layers: Iterable[str]) -> Iterator[None]:
    """Hold the store lock of every layer (in sorted order, so two seeds never deadlock)."""
    store, locks = open_store(settings.store), settings.locks
    with contextlib.ExitStack() as stack:
        for layer in sorted(layers):
            stack.enter_context(
                store.lock(
                    seed_lock_key(collection, layer),
                    lease_seconds=locks.lease_seconds,
                    timeout_seconds=locks.wait_seconds,
                )
            )
        yield


def _layer_chunks(chunks: Sequence[SeedChunk]) -> list[SeedChunk]:
    """One chunk per layer, without its tiles: what the TileJSON documents need."""
    layers: dict[str, SeedChunk] = {}
    for chunk in chunks:
        layers.setdefault(chunk.time_key, chunk.model_copy(update={"tiles": ()}))
    return list(layers.values())


def run_seed(
    request: SeedRequest, settings: Settings, previous_items: Sequence[dict[str, Any]] = ()
) -> tuple[SeedResult, list[dict[str, Any]], list[SeedChunk]]:
    """Seed the tiles a request covers, from inside a running flow (``seed`` or ``process-product``).

    The layers' locks are held from the first tile to the TileJSON, so two seeds of one layer take
    turns (the second skips what the first wrote, unless ``force``) while seeds of other layers run
    alongside. Chunks render ``concurrency.seed_workers`` at a time, each a task.

    Returns the combined result, the items found and the chunks rendered.
    """
    collection = request.collection
    config = settings.collection(collection)
    workers = settings.concurrency.seed_workers
    items = search_items(
        collection, settings.catalog, settings.store, start=request.start, end=request.end, bbox=request.bbox
    )
    # Not narrowed by item_ids: every item of a layer is needed to render its mosaic; plan_seed
    # narrows the tiles to the requested items.
    chunks = plan_seed(
        items, request, config, previous=previous_items, min_chunks=CHUNKS_PER_WORKER * workers
    )
    if not chunks:
        return combine_results(collection, []), items, chunks
    with _layer_locks(settings, collection, {c.time_key for c in chunks}):
        # quote(): the task engine need not walk every tile of every chunk looking for futures
        runner: ThreadPoolTaskRunner[SeedResult] = ThreadPoolTaskRunner(max_workers=workers)
        with runner:
            futures = [
                runner.submit(
                    render_chunk,
                    {
                        "chunk": quote(chunk),
                        "collection": config,
                        "store": settings.store,
                        "force": request.force,
                    },
                )
                for chunk in chunks
            ]
            total = combine_results(collection, [f.result() for f in futures])
        write_tilejsons(_layer_chunks(chunks), config, settings.store)
    return total, items, chunks


def _seed_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"seed/{p['collection']}/{p.get('start') or '..'}--{p.get('end') or '..'}"


@flow(name="seed", flow_run_name=_seed_run_name)
def seed(
    collection: str,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    min_zoom: int | None = None,
    max_zoom: int | None = None,
    bbox: BBox | None = None,
    item_ids: list[str] | None = None,
    force: bool = False,
    previous_items: list[dict[str, Any]] | None = None,
) -> SeedResult:
    """Render the tiles of every item of ``collection`` in the interval, many tiles per task.

    Existing tiles are skipped unless ``force``; tiles with no data are not written. Chunks render
    in parallel (``concurrency.seed_workers``); one seeder per layer runs at a time (a store lock).
    ``previous_items`` are the former versions of replaced items, whose old extent is re-rendered
    (or cleared) too.
    """
    settings = get_settings()
    request = SeedRequest(
        collection=collection,
        start=start,
        end=end,
        min_zoom=min_zoom,
        max_zoom=max_zoom,
        bbox=bbox,
        item_ids=tuple(item_ids) if item_ids else None,
        force=force,
    )
    total, items, chunks = run_seed(request, settings, previous_items or ())
    create_markdown_artifact(
        key=f"seed-{collection}".lower().replace("_", "-").replace(".", "-"),
        markdown=(
            f"### Seeded `{collection}`\n\n| items | chunks | written | skipped | empty | layers |\n"
            f"|---|---|---|---|---|---|\n| {len(items)} | {len(chunks)} | {total.written} | "
            f"{total.skipped} | {total.empty} | {', '.join(total.layers)} |\n"
        ),
        description=f"Tiles seeded for {collection}",
    )
    return total

"""The seed flow: pre-render a collection's tile cache for a time interval and zoom range."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from skyvault.config.settings import Settings, get_settings
from skyvault.models import BBox, SeedChunk, SeedRequest, SeedResult
from skyvault.tasks.catalog import search_items
from skyvault.tasks.tiles import tileset_seeder, write_tilejsons
from skyvault.tiles.seeding import combine_results, plan_seed


def run_seed(
    request: SeedRequest, settings: Settings, previous_items: Sequence[dict[str, Any]] = ()
) -> tuple[SeedResult, list[dict[str, Any]], list[SeedChunk]]:
    """Seed the tiles a request covers, from inside a running flow (``seed`` or ``process-product``).

    Returns the combined result, the items found and the chunks rendered.
    """
    collection = request.collection
    config = settings.collection(collection)
    force = request.force
    items = search_items(
        collection, settings.catalog, settings.store, start=request.start, end=request.end, bbox=request.bbox
    )
    # Not narrowed by item_ids: every item of a layer is needed to render its mosaic; plan_seed
    # narrows the tiles to the requested items.
    chunks = plan_seed(items, request, config, previous=previous_items)
    seeder = tileset_seeder(config)
    futures = [seeder.submit(chunk, config, settings.store, force=force) for chunk in chunks]
    total = combine_results(collection, [f.result() for f in futures])
    if chunks:
        write_tilejsons(chunks, config, settings.store)
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

    Existing tiles are skipped unless ``force``; tiles with no data are not written. One seeder
    per tileset runs at a time (tag ``tileset:<collection>``). ``previous_items`` are the former
    versions of replaced items, whose old extent is re-rendered (or cleared) too.
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

"""The seed flow under a real Prefect server: parallel chunks, one seeder per layer, skip and force."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
import rasterio.shutil
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId
from rasterio.transform import from_origin

from skyvault.catalog.registration import open_catalog
from skyvault.config.settings import Settings, StoreSettings
from skyvault.flows.seed import seed
from skyvault.models import SeedResult
from skyvault.storage.store import open_store
from tests.conftest import write_raster

pytestmark = pytest.mark.usefixtures("prefect_harness")

COLLECTION = "tiles"
TIMES = ("2026-03-01T00:00:00Z", "2026-03-02T00:00:00Z")
BBOX = (10.0, 45.5, 10.5, 46.0)


def _item(item_id: str, when: str, cog_key: str) -> dict[str, Any]:
    w, s, e, n = BBOX
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": item_id,
        "collection": COLLECTION,
        "bbox": list(BBOX),
        "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
        "properties": {"datetime": when, "skyvault:cog_key": cog_key},
        "assets": {},
        "links": [],
    }


@pytest.fixture
def catalogued(configure: Callable[..., Settings], tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a collection of two items (two layers) over one COG, registered in the catalog."""

    def _make(**concurrency: int) -> Settings:
        settings = configure(
            StoreSettings(root=tmp_path / "store"),
            collections={COLLECTION: {"min_zoom": 9, "max_zoom": 13}},
            concurrency=concurrency,
        )
        rng = np.random.default_rng(7)
        src = write_raster(
            tmp_path / "src" / "scene.tif",
            rng.integers(1, 255, (3, 512, 512), dtype="uint8"),
            transform=from_origin(BBOX[0], BBOX[3], 0.5 / 512, 0.5 / 512),
        )
        cog = tmp_path / "scene.cog.tif"
        rasterio.shutil.copy(src, cog, driver="COG")
        key = f"cogs/{COLLECTION}/scene.tif"
        open_store(settings.store).put_file(key, cog)
        items = [_item(f"scene-{i}", when, key) for i, when in enumerate(TIMES)]
        open_catalog(settings.catalog, settings.store).upsert_items(settings.collection(COLLECTION), items)
        return settings

    return _make


def _chunk_spans(flow_run_id: UUID) -> list[tuple[dt.datetime, dt.datetime]]:
    """Start and end of every render-chunk task run of a flow run."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
        )
    spans = [(r.start_time, r.end_time) for r in runs if r.name.startswith(f"seed/{COLLECTION}/")]
    assert spans
    assert all(start is not None and end is not None for start, end in spans)
    return sorted((start, end) for start, end in spans if start is not None and end is not None)


def _most_at_once(spans: Sequence[tuple[dt.datetime, dt.datetime]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def _seed(**kwargs: Any) -> tuple[SeedResult, UUID]:
    state = seed(COLLECTION, return_state=True, **kwargs)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    result: SeedResult = state.result()
    return result, flow_run_id


def _tiles(settings: Settings) -> list[str]:
    return [o.key for o in open_store(settings.store).list(f"tiles/{COLLECTION}/") if o.key.endswith(".png")]


@pytest.mark.parametrize("workers", [1, 2])
def test_chunks_of_one_seed_render_side_by_side_up_to_the_worker_limit(
    catalogued: Callable[..., Settings], workers: int
) -> None:
    settings = catalogued(seed_workers=workers)
    result, flow_run_id = _seed()
    spans = _chunk_spans(flow_run_id)
    assert len(spans) >= 4
    assert _most_at_once(spans) == workers
    assert result.written == len(_tiles(settings)) > 0
    assert result.layers == ("20260301T000000Z", "20260302T000000Z")


def test_two_seeds_of_one_layer_take_turns(catalogued: Callable[..., Settings]) -> None:
    settings = catalogued(seed_workers=2)
    runs: list[tuple[SeedResult, UUID]] = []

    def run() -> None:
        runs.append(_seed(force=True))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(runs) == 2

    (first, first_id), (second, second_id) = runs
    a, b = _chunk_spans(first_id), _chunk_spans(second_id)
    a_start, a_end = a[0][0], max(end for _, end in a)
    b_start, b_end = b[0][0], max(end for _, end in b)
    assert a_end <= b_start or b_end <= a_start, "two seeds of one layer rendered at the same time"

    # both rendered every tile; the cache holds one copy of each and a TileJSON per layer
    assert first.written == second.written == len(_tiles(settings)) > 0
    docs = [
        o for o in open_store(settings.store).list(f"tiles/{COLLECTION}/") if o.key.endswith("tilejson.json")
    ]
    assert len(docs) == 2

    # without force, a third run skips everything and writes nothing
    again, _ = _seed()
    assert again.written == 0
    assert again.skipped == first.written

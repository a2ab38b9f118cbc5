"""The seed flow under a real Prefect server: one seeder per tileset, skip and force."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterTags

from skyvault.config.provision import provision_tag_limits, tileset_tag
from skyvault.config.settings import Settings, StoreSettings
from skyvault.flows.ingest import ingest
from skyvault.flows.seed import seed
from skyvault.models import SeedResult
from skyvault.samples import write_samples
from skyvault.storage.store import open_store

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _chunk_runs(tag: str) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=[tag])))


def test_two_seeders_of_one_tileset_never_render_at_once(
    configure: Callable[..., Settings], tmp_path: Path
) -> None:
    s = configure(StoreSettings(root=tmp_path / "store"))
    provision_tag_limits(s)
    store = open_store(s.store)
    write_samples(store)
    state = ingest(collection="demo-scenes", seed_tiles=False, return_state=True)
    assert state.is_completed()
    assert not any(store.list("tiles/"))

    tag = tileset_tag("demo-scenes")
    before = {r.id for r in _chunk_runs(tag)}
    results: list[SeedResult] = []

    def run() -> None:
        results.append(seed("demo-scenes", force=True))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(results) == 2

    runs = [r for r in _chunk_runs(tag) if r.id not in before]
    assert len(runs) >= 4  # two layers, at least one chunk each, per seeder
    spans = sorted((r.start_time, r.end_time) for r in runs)
    assert all(s is not None and e is not None for s, e in spans)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, "two chunks of one tileset rendered at the same time"

    # both seeders rendered every tile; the cache holds one copy of each with a TileJSON per layer
    assert results[0].written == results[1].written > 0
    tiles = [o.key for o in store.list("tiles/demo-scenes/") if o.key.endswith(".png")]
    assert len(tiles) == results[0].written
    assert len([o for o in store.list("tiles/demo-scenes/") if o.key.endswith("tilejson.json")]) == 2

    # without force, a third run skips everything and writes nothing
    again = seed("demo-scenes")
    assert again.written == 0
    assert again.skipped == results[0].written

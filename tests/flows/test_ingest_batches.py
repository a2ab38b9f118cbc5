"""A backlog of small products runs in ``process-products`` batches: same outcomes, fewer runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from prefect.client.schemas.objects import StateType

from skyvault.catalog.registration import open_catalog
from skyvault.config.provision import provision_tag_limits
from skyvault.config.settings import Settings, StoreSettings
from skyvault.status import read_status
from skyvault.storage.store import open_store
from tests.conftest import write_raster
from tests.flows.test_ingest import (
    _ingest_env,
    _kill_ingest_when,
    _rerun_ingest,
    _scene,
    by_id,
    graph,
    ingest_state,
    snapshot,
    summary_of,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")

COLLECTIONS = {"small-scenes": {"render": {"bands": [1, 2, 3]}, "min_zoom": 6, "max_zoom": 8}}
#: 2 runs at a time, up to 3 products a run, products of up to 64 KiB batched
CONCURRENCY = {"products": 2, "batch_products": 3, "batch_source_bytes": 64 * 1024}


def _small(tmp_path: Path, i: int, size: int = 64) -> Path:
    return _scene(tmp_path / f"s{i}.tif", 5.0 + 0.5 * i, f"2026:05:{1 + i:02d} 10:00:00", size=size)


@pytest.fixture(params=["local", "s3"])
def settings(request: pytest.FixtureRequest, configure: Callable[..., Settings], tmp_path: Path) -> Settings:
    store = (
        request.getfixturevalue("s3_store_settings")
        if request.param == "s3"
        else StoreSettings(root=tmp_path / "store")
    )
    s = configure(store, collections=COLLECTIONS, concurrency=CONCURRENCY)
    provision_tag_limits(s)
    return s


def test_small_products_run_in_batches_and_fail_alone(settings: Settings, tmp_path: Path) -> None:
    store = open_store(settings.store)
    good = [f"S_{i}" for i in range(6)]
    for i, pid in enumerate(good):
        store.put_file(f"landing/small-scenes/{pid}.tif", _small(tmp_path, i))
    store.put_bytes("landing/small-scenes/BROKEN_1.tif", b"II*\x00 not a raster at all")
    undated = write_raster(
        tmp_path / "undated.tif",
        np.full((3, 32, 32), 90, dtype="uint8"),
        transform=rasterio.transform.from_origin(12.0, 47.0, 0.01, 0.01),
    )
    store.put_file("landing/small-scenes/UNDATED_1.tif", undated)  # no time anywhere: register fails
    store.put_file("landing/small-scenes/LARGE_1.tif", _small(tmp_path, 9, size=512))  # over 64 KiB
    landing_before = snapshot(store, "landing/")

    state = ingest_state()
    outcomes = by_id(summary_of(state))
    assert state.name == "Partial"
    assert sorted(outcomes) == sorted([*good, "BROKEN_1", "UNDATED_1", "LARGE_1"])
    for pid in [*good, "LARGE_1"]:
        assert (outcomes[pid].state, outcomes[pid].message) == ("done", "converted"), outcomes[pid]
        assert outcomes[pid].tiles > 0
    assert (outcomes["BROKEN_1"].state, outcomes["BROKEN_1"].step) == ("failed", "preprocess")
    assert "small-scenes/BROKEN_1" in outcomes["BROKEN_1"].message
    assert (outcomes["UNDATED_1"].state, outcomes["UNDATED_1"].step) == ("failed", "register")
    assert "UNDATED_1" in outcomes["UNDATED_1"].message
    assert snapshot(store, "landing/") == landing_before

    # 8 small products, 3 a run: 3 batch runs; the large one has its own run
    _, children = graph(state)
    kinds = Counter(name.rsplit("/", 2)[0] for name in children)
    assert kinds == {"process-products": 3, "process-product": 1}
    assert "process-product/small-scenes/LARGE_1" in children
    # a batch with a failed product is Partial (completed); the others fail nothing
    assert all(run_state == StateType.COMPLETED for run_state, _ in children.values())

    # each product's status record names its own step, and the batch run that did it
    runs = {r.flow_run_id for pid in good if (r := read_status("small-scenes", pid, settings.store))}
    assert len(runs) == 3  # BROKEN_1 S_0 S_1 | S_2 S_3 S_4 | S_5 UNDATED_1
    for pid in good:
        record = read_status("small-scenes", pid, settings.store)
        assert record is not None
        assert (record.state, record.step, record.tiles) == ("done", "seed", outcomes[pid].tiles)
        assert record.cog_key == f"cogs/small-scenes/{pid}.tif" == outcomes[pid].cog_key
    failed = read_status("small-scenes", "UNDATED_1", settings.store)
    assert failed is not None
    assert (failed.state, failed.step) == ("failed", "register")

    catalog = open_catalog(settings.catalog, settings.store)
    ids = [i["id"] for i in catalog.search("small-scenes")]
    assert sorted(ids) == sorted([*good, "LARGE_1"])

    # a re-run skips what is done and fails the same two again, without duplicates
    again = by_id(summary_of(ingest_state()))
    assert {pid: o.state for pid, o in again.items() if o.state != "failed"} == {
        pid: "skipped" for pid in [*good, "LARGE_1"]
    }
    assert (again["UNDATED_1"].state, again["UNDATED_1"].step) == ("failed", "register")
    assert sorted(i["id"] for i in catalog.search("small-scenes")) == sorted(ids)


def test_a_replace_rebuilds_every_product_of_a_batch(
    configure: Callable[..., Settings], tmp_path: Path
) -> None:
    s = configure(StoreSettings(root=tmp_path / "store"), collections=COLLECTIONS, concurrency=CONCURRENCY)
    provision_tag_limits(s)
    store = open_store(s.store)
    for i in range(5):
        store.put_file(f"landing/small-scenes/S_{i}.tif", _small(tmp_path, i))
    first = by_id(summary_of(ingest_state(seed_tiles=False)))
    assert {o.state for o in first.values()} == {"done"}
    cogs = {o.key: o.last_modified for o in store.list("cogs/")}

    state = ingest_state(seed_tiles=False, replace=True)
    again = by_id(summary_of(state))
    assert {o.message for o in again.values()} == {"converted"}  # rebuilt, not found up to date
    assert all(o.last_modified >= cogs[o.key] for o in store.list("cogs/"))
    _, children = graph(state)
    assert {name.rsplit("/", 2)[0] for name in children} == {"process-products"}
    assert len(open_catalog(s.catalog, s.store).search("small-scenes")) == 5


def test_a_batch_killed_midway_converges_on_the_next_run(
    configure: Callable[..., Settings], tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    s = configure(StoreSettings(root=tmp_path / "store"), collections=COLLECTIONS, concurrency=CONCURRENCY)
    provision_tag_limits(s)
    store = open_store(s.store)
    products = [f"S_{i}" for i in range(6)]
    for i, pid in enumerate(products):
        store.put_file(f"landing/small-scenes/{pid}.tif", _small(tmp_path, i, size=128))
    env = _ingest_env(s, tmp_path, api_url=PREFECT_API_URL.value())

    def records() -> dict[str, Any]:
        return {pid: r for pid in products if (r := read_status("small-scenes", pid, s.store)) is not None}

    def some_done() -> bool:  # a batch is past its first product: the rest is still to come
        found = records()
        return any(r.state == "done" for r in found.values()) and len(found) == len(products)

    _kill_ingest_when(env, tmp_path / "killed.log", some_done, within=300)
    killed = records()
    assert not all(r.state == "done" for r in killed.values()), killed

    _rerun_ingest(env, tmp_path / "rerun.log")
    assert {pid: r.state for pid, r in records().items()} == dict.fromkeys(products, "done")
    ids = [i["id"] for i in open_catalog(s.catalog, s.store).search("small-scenes")]
    assert sorted(ids) == products  # each once
    assert sorted(o.key for o in store.list("cogs/") if o.key.endswith(".tif")) == [
        f"cogs/small-scenes/{pid}.tif" for pid in products
    ]
    half_written = [p for p in s.store.root.rglob(".*") if p.name.endswith((".part", ".new"))]
    assert half_written == []

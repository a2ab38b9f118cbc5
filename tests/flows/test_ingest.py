"""End-to-end: ingest → preprocess → register → seed on a local folder and on S3 (moto server)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import morecantile
import numpy as np
import pytest
import rasterio
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.client.schemas.objects import StateType
from pyproj import Transformer
from rasterio.io import MemoryFile
from rio_cogeo.cogeo import cog_validate
from shapely.geometry import shape

from skyvault.catalog.registration import open_catalog
from skyvault.config.provision import provision_tag_limits
from skyvault.config.settings import Settings, StoreSettings
from skyvault.flows.ingest import ingest
from skyvault.models import IngestSummary, ProductOutcome
from skyvault.samples import SIZE, UTM_ORIGIN, UTM_PIXEL, write_samples
from skyvault.stac.item import validate_item
from skyvault.storage.store import ObjectStore, open_store
from skyvault.tasks.status import latest_states, run_name
from skyvault.tiles.seeding import time_key
from tests.conftest import write_raster

pytestmark = pytest.mark.usefixtures("prefect_harness")

GOOD = ["DEM_N47E010", "DEM_UTM32_0001", "LS_4326_20260602", "S2_UTM_20260601"]


def run_ingest(**params: Any) -> IngestSummary:
    state = ingest(return_state=True, **params)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, IngestSummary), f"ingest ended {state.type}: {state.message}"
    return summary


def flow_runs_named(name: str) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))


def by_id(summary: IngestSummary) -> dict[str, ProductOutcome]:
    return {o.product_id: o for o in summary.outcomes}


def snapshot(store: ObjectStore, prefix: str) -> dict[str, tuple[int, str]]:
    return {o.key: (o.size, hashlib.sha256(store.get_bytes(o.key)).hexdigest()) for o in store.list(prefix)}


def stamps(store: ObjectStore, prefix: str) -> dict[str, Any]:
    return {o.key: o.last_modified for o in store.list(prefix)}


@pytest.fixture(params=["local", "s3"])
def settings(request: pytest.FixtureRequest, configure: Callable[..., Settings], tmp_path: Path) -> Settings:
    store = (
        request.getfixturevalue("s3_store_settings")
        if request.param == "s3"
        else StoreSettings(root=tmp_path / "store")
    )
    s = configure(store)
    provision_tag_limits(s)
    return s


def _read_png(data: bytes) -> np.ndarray:
    with MemoryFile(data) as mem, mem.open() as ds:
        pixels: np.ndarray = ds.read()
    return pixels


def test_full_pipeline_and_rerun(settings: Settings) -> None:
    store = open_store(settings.store)
    write_samples(store, broken=True)
    landing_before = snapshot(store, "landing/")

    summary = run_ingest()

    outcomes = by_id(summary)
    assert sorted(outcomes) == sorted([*GOOD, "BROKEN_20260603"])
    for pid in GOOD:
        assert outcomes[pid].state == "done", outcomes[pid]
    broken = outcomes["BROKEN_20260603"]
    assert broken.state == "failed"
    assert "BROKEN_20260603" in broken.message
    assert broken.step == "preprocess"
    assert snapshot(store, "landing/") == landing_before

    # every step of every product has a run under a predictable name, with its final state
    states = latest_states(
        run_name(step, coll, pid)
        for step in ("process-product", "preprocess", "register", "seed")
        for coll, pid in [("demo-scenes", "S2_UTM_20260601"), ("demo-dem", "DEM_N47E010")]
    )
    assert len(states) == 8
    assert set(states.values()) == {StateType.COMPLETED}
    assert latest_states([run_name("process-product", "demo-scenes", "BROKEN_20260603")]) == {
        "process-product/demo-scenes/BROKEN_20260603": StateType.FAILED
    }

    # COGs are valid and where the layout says
    for coll, pid in [("demo-dem", "DEM_N47E010"), ("demo-scenes", "S2_UTM_20260601")]:
        key = f"cogs/{coll}/{pid}.tif"
        assert store.exists(key)
        with rasterio.Env(**store.gdal_env()):
            valid, errors, _ = cog_validate(store.gdal_path(key), strict=True)
        assert valid, errors

    # catalog items validate, geometry right
    catalog = open_catalog(settings.catalog, settings.store)
    scenes = {i["id"]: i for i in catalog.search("demo-scenes")}
    dems = {i["id"]: i for i in catalog.search("demo-dem")}
    assert sorted(scenes) == ["LS_4326_20260602", "S2_UTM_20260601"]
    assert sorted(dems) == ["DEM_N47E010", "DEM_UTM32_0001"]
    for item in [*scenes.values(), *dems.values()]:
        validate_item(item)

    utm = shape(scenes["S2_UTM_20260601"]["geometry"])
    to_ll = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True)
    x0, y0 = UTM_ORIGIN
    x1, y1 = x0 + SIZE * UTM_PIXEL, y0 - SIZE * UTM_PIXEL
    corners = [to_ll.transform(x, y) for x, y in [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]]
    for lon, lat in corners:
        assert min(np.hypot(lon - px, lat - py) for px, py in utm.exterior.coords) < 2e-3
    assert scenes["S2_UTM_20260601"]["properties"]["start_datetime"].startswith("2026-06-01T10:20:30")

    ll = shape(scenes["LS_4326_20260602"]["geometry"])
    # left 96 columns and bottom 64 rows are nodata: outside the footprint
    assert ll.bounds[0] == pytest.approx(11.0 + 96 * 0.6 / SIZE, abs=0.01)
    assert ll.bounds[1] == pytest.approx(47.5 - (SIZE - 64) * 0.6 / SIZE, abs=0.01)
    assert scenes["LS_4326_20260602"]["properties"]["datetime"].startswith("2026-06-02T09:15:00")
    assert dems["DEM_N47E010"]["properties"]["datetime"].startswith("2026-05-01T00:00:00")

    # tiles: pixels match the source at sampled points
    item = scenes["LS_4326_20260602"]
    tms = morecantile.tms.get("WebMercatorQuad")
    z = 11
    with (
        rasterio.Env(**store.gdal_env()),
        rasterio.open(store.gdal_path("landing/demo-scenes/LS_4326_20260602.tif")) as src,
    ):
        source = src.read()
        for lon, lat in [(11.3, 47.2), (11.45, 47.05), (11.2, 47.4)]:
            tile = tms.tile(lon, lat, z)
            key = f"tiles/demo-scenes/WebMercatorQuad/{time_key(item)}/{z}/{tile.x}/{tile.y}.png"
            png = _read_png(store.get_bytes(key))
            b = tms.xy_bounds(tile)
            mx, my = tms.xy(lon, lat)
            col = int((mx - b.left) / (b.right - b.left) * png.shape[2])
            row = int((b.top - my) / (b.top - b.bottom) * png.shape[1])
            r, c = src.index(lon, lat)
            window = source[:, max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].reshape(3, -1)
            for band in range(3):
                v = int(png[band, row, col])
                assert int(window[band].min()) - 1 <= v <= int(window[band].max()) + 1, (lon, lat, band)
            assert png[3, row, col] == 255  # opaque where there is data
    # a point in the nodata border is transparent
    tile = tms.tile(11.02, 47.3, z)
    key = f"tiles/demo-scenes/WebMercatorQuad/{time_key(item)}/{z}/{tile.x}/{tile.y}.png"
    if store.exists(key):
        png = _read_png(store.get_bytes(key))
        b = tms.xy_bounds(tile)
        mx, my = tms.xy(11.02, 47.3)
        col = int((mx - b.left) / (b.right - b.left) * png.shape[2])
        row = int((b.top - my) / (b.top - b.bottom) * png.shape[1])
        assert png[3, row, col] == 0
    # a tile far from any data is not written
    far = tms.tile(20.0, 40.0, z)
    assert not any(o.key.endswith(f"/{z}/{far.x}/{far.y}.png") for o in store.list("tiles/"))

    # second run: nothing converted, nothing rewritten, no duplicate items
    outputs = {p: stamps(store, p) for p in ("cogs/", "catalog/", "tiles/")}
    preprocess_runs = len(flow_runs_named(run_name("preprocess", "demo-scenes", "S2_UTM_20260601")))
    summary2 = run_ingest()
    outcomes2 = by_id(summary2)
    for pid in GOOD:
        assert outcomes2[pid].state == "skipped", outcomes2[pid]
    assert outcomes2["BROKEN_20260603"].state == "failed"
    for p in ("cogs/", "catalog/", "tiles/"):
        assert stamps(store, p) == outputs[p], p
    assert len(flow_runs_named(run_name("preprocess", "demo-scenes", "S2_UTM_20260601"))) == preprocess_runs
    collection = json.loads(store.get_bytes(f"{settings.catalog.prefix}/demo-scenes/collection.json"))
    item_links = [link["href"] for link in collection["links"] if link["rel"] == "item"]
    assert len(item_links) == len(set(item_links)) == 2

    # the fix: replace the corrupt source, re-run, it goes through once
    src = Path(settings.scratch_dir) / "fixed.tif"
    write_raster(
        src,
        np.full((3, 64, 64), 120, dtype="uint8"),
        crs="EPSG:4326",
        transform=rasterio.transform.from_origin(12.0, 47.0, 0.001, 0.001),
        tags={"TIFFTAG_DATETIME": "2026:06:03 08:00:00"},
    )
    store.put_file("landing/demo-scenes/BROKEN_20260603.tif", src)
    summary3 = run_ingest()
    assert by_id(summary3)["BROKEN_20260603"].state == "done"
    assert summary3.failed == 0
    assert len(catalog.search("demo-scenes")) == 3


def test_replace_rebuilds(configure: Callable[..., Settings], tmp_path: Path) -> None:
    s = configure(StoreSettings(root=tmp_path / "store"))
    store = open_store(s.store)
    write_samples(store)
    run_ingest(collection="demo-dem")
    before = stamps(store, "cogs/demo-dem/")
    layer = "tiles/demo-dem/WebMercatorQuad/20260501T000000Z/10/"
    old_tiles = {o.key for o in store.list(layer)}

    # the new version of DEM_N47E010 covers only its western 0.1 degree
    narrow = write_raster(
        tmp_path / "narrow.tif",
        np.full((1, 64, 64), 500.0, dtype="float32"),
        transform=rasterio.transform.from_origin(10.0, 47.5, 0.1 / 64, 0.5 / 64),
        nodata=-9999.0,
    )
    store.put_file("landing/demo-dem/DEM_N47E010.tif", narrow)
    summary = run_ingest(collection="demo-dem", replace=True)
    assert {o.state for o in summary.outcomes} == {"done"}
    after = stamps(store, "cogs/demo-dem/")
    assert all(after[k] > before[k] for k in before)
    items = {i["id"]: i for i in open_catalog(s.catalog, s.store).search("demo-dem")}
    assert len(items) == 2
    assert items["DEM_N47E010"]["bbox"][2] == pytest.approx(10.1, abs=1e-3)

    # the tiles of the old extent that the new one does not cover are gone
    tms = morecantile.tms.get("WebMercatorQuad")
    new_tiles = {o.key for o in store.list(layer)}
    assert new_tiles
    assert new_tiles < old_tiles
    for key in new_tiles:
        x, y = (int(v) for v in key[len(layer) :].removesuffix(".png").split("/"))
        assert tms.bounds(morecantile.Tile(x, y, 10)).left < 10.1


def _product(pid: str) -> Any:
    from skyvault.models import Discovery, Product

    return Discovery(
        products=[Product(collection="c", id=pid, source_key=f"landing/c/{pid}.tif")], failures=[]
    )


def test_select_products_skips_only_registered_products_whose_last_run_did_not_fail() -> None:
    from skyvault.flows.ingest import select_products

    registered = {("c", "p")}
    name = run_name("process-product", "c", "p")
    todo, skipped = select_products(_product("p"), registered, {name: StateType.COMPLETED}, replace=False)
    assert (todo, [o.state for o in skipped]) == ([], ["skipped"])
    todo, skipped = select_products(_product("p"), registered, {name: StateType.FAILED}, replace=False)
    assert [p.id for p in todo] == ["p"]
    todo, skipped = select_products(_product("p"), registered, {name: StateType.COMPLETED}, replace=True)
    assert [p.id for p in todo] == ["p"]
    todo, skipped = select_products(_product("p"), set(), {}, replace=False)
    assert [p.id for p in todo] == ["p"]

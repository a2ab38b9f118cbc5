"""End-to-end ingest on a local folder and on S3 (moto server); status records; convergence after SIGKILL."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import morecantile
import numpy as np
import pytest
import rasterio
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    FlowRunFilterParentTaskRunId,
)
from prefect.client.schemas.objects import State, StateType
from pyproj import Transformer
from rasterio.io import MemoryFile
from rio_cogeo.cogeo import cog_validate
from shapely.geometry import shape

from skyvault.catalog.registration import open_catalog
from skyvault.config.provision import provision_tag_limits
from skyvault.config.settings import Settings, StoreSettings
from skyvault.errors import IngestFailedError
from skyvault.flows.ingest import ingest
from skyvault.models import IngestSummary, ProductOutcome, ProductStatus
from skyvault.samples import SIZE, UTM_ORIGIN, UTM_PIXEL, write_samples
from skyvault.stac.item import validate_item
from skyvault.status import read_status
from skyvault.storage.store import ObjectStore, open_store
from skyvault.tiles.seeding import time_key
from tests.conftest import write_raster

pytestmark = pytest.mark.usefixtures("prefect_harness")

GOOD = ["DEM_N47E010", "DEM_UTM32_0001", "LS_4326_20260602", "S2_UTM_20260601"]


def ingest_state(**params: Any) -> State[IngestSummary]:
    return cast("State[IngestSummary]", ingest(return_state=True, **params))


def summary_of(state: State[IngestSummary]) -> IngestSummary:
    summary = state.result(raise_on_failure=False)
    if state.is_failed():  # nothing succeeded: the run fails with the summary in its error
        assert isinstance(summary, IngestFailedError), summary
        summary = summary.summary
    assert isinstance(summary, IngestSummary), f"ingest ended {state.type}: {state.message}"
    return summary


def run_ingest(**params: Any) -> IngestSummary:
    return summary_of(ingest_state(**params))


def flow_runs_named(name: str) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))


def graph(state: State[Any]) -> tuple[list[str], dict[str, tuple[StateType | None, StateType | None]]]:
    """An ingest run's graph: its task run names, and per child flow run the run's state and the
    state of the node that stands for it in the parent's graph."""
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
            limit=200,
        )
        nodes = {t.id: t for t in tasks}
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(any_=list(nodes))),
            limit=200,
        )
    return [t.name for t in tasks], {
        run.name: (run.state_type, nodes[run.parent_task_run_id].state_type)
        for run in children
        if run.parent_task_run_id is not None
    }


def status_of(settings: Settings, collection: str, product: str) -> ProductStatus:
    found = read_status(collection, product, settings.store)
    assert found is not None, f"no status record for {collection}/{product}"
    return found


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

    state = ingest_state()
    summary = summary_of(state)

    outcomes = by_id(summary)
    assert sorted(outcomes) == sorted([*GOOD, "BROKEN_20260603"])
    for pid in GOOD:
        assert outcomes[pid].state == "done", outcomes[pid]
    broken = outcomes["BROKEN_20260603"]
    assert broken.state == "failed"
    assert "BROKEN_20260603" in broken.message
    assert broken.step == "preprocess"
    assert snapshot(store, "landing/") == landing_before

    # the ingest run is Partial; in its graph each product is its process-product run, red if failed
    assert state.is_completed()
    assert state.name == "Partial"
    task_names, children = graph(state)
    coll_of = {"DEM_N47E010": "demo-dem", "DEM_UTM32_0001": "demo-dem"}
    expected = {
        f"process-product/{coll_of.get(pid, 'demo-scenes')}/{pid}": (StateType.COMPLETED, StateType.COMPLETED)
        for pid in GOOD
    }
    expected["process-product/demo-scenes/BROKEN_20260603"] = (StateType.FAILED, StateType.FAILED)
    assert children == expected
    assert not any(name.startswith("run/") for name in task_names)
    # one flow run per product: its steps are tasks, not runs of their own
    for step in ("preprocess", "register", "seed"):
        assert flow_runs_named(f"{step}/demo-scenes/S2_UTM_20260601") == []

    # what is done is recorded on the store, written last
    for pid in GOOD:
        done = status_of(settings, coll_of.get(pid, "demo-scenes"), pid)
        assert (done.state, done.step, done.cog_key) == ("done", "seed", outcomes[pid].cog_key)
        assert done.tiles == outcomes[pid].tiles
    failed = status_of(settings, "demo-scenes", "BROKEN_20260603")
    assert (failed.state, failed.step) == ("failed", "preprocess")
    assert "BROKEN_20260603" in failed.message

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
    state2 = ingest_state()
    outcomes2 = by_id(summary_of(state2))
    for pid in GOOD:
        assert outcomes2[pid].state == "skipped", outcomes2[pid]
    assert outcomes2["BROKEN_20260603"].state == "failed"
    for p in ("cogs/", "catalog/", "tiles/"):
        assert stamps(store, p) == outputs[p], p
    assert list(graph(state2)[1]) == ["process-product/demo-scenes/BROKEN_20260603"]
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
    cogs = [k for k in before if k.endswith(".tif")]
    assert len(cogs) == 2
    assert all(after[k] > before[k] for k in cogs)  # both COGs rebuilt
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


def test_an_ingest_where_every_product_fails_raises_with_every_outcome(
    configure: Callable[..., Settings], tmp_path: Path
) -> None:
    s = configure(StoreSettings(root=tmp_path / "store"))
    store = open_store(s.store)
    store.put_bytes("landing/demo-dem/BAD_1.tif", b"not a tiff at all")
    store.put_bytes("landing/demo-dem/BAD_2.tif", b"II*\x00\x08\x00\x00\x00 cut short")

    with pytest.raises(IngestFailedError, match="2 failed") as raised:
        ingest(collection="demo-dem", seed_tiles=False)

    summary = raised.value.summary
    assert isinstance(summary, IngestSummary)
    assert {o.product_id: o.state for o in summary.outcomes} == {"BAD_1": "failed", "BAD_2": "failed"}
    assert all(o.product_id in (o.message or "") for o in summary.outcomes)
    assert [o.key for o in store.list("landing/demo-dem/")] == [
        "landing/demo-dem/BAD_1.tif",
        "landing/demo-dem/BAD_2.tif",
    ]


def _product(pid: str) -> Any:
    from skyvault.models import Discovery, Product

    return Discovery(
        products=[Product(collection="c", id=pid, source_key=f"landing/c/{pid}.tif")], failures=[]
    )


def test_select_products_skips_only_products_recorded_done_and_registered() -> None:
    from skyvault.flows.ingest import select_products

    def recorded(state: Any) -> dict[tuple[str, str], ProductStatus]:
        return {
            ("c", "p"): ProductStatus(
                collection="c", product_id="p", state=state, step="seed", updated_at=dt.datetime.now(dt.UTC)
            )
        }

    def todo_of(
        statuses: dict[tuple[str, str], ProductStatus], registered: set[Any], replace: bool
    ) -> list[str]:
        todo, skipped, _ = select_products(
            _product("p"), registered, statuses, replace=replace, seed_tiles=True
        )
        assert len(todo) + len(skipped) == 1
        assert all(o.state == "skipped" for o in skipped)
        return [p.id for p in todo]

    assert todo_of(recorded("done"), {("c", "p")}, replace=False) == []
    assert todo_of(recorded("running"), {("c", "p")}, replace=False) == ["p"]
    assert todo_of(recorded("failed"), {("c", "p")}, replace=False) == ["p"]
    assert todo_of(recorded("done"), set(), replace=False) == ["p"]
    assert todo_of(recorded("done"), {("c", "p")}, replace=True) == ["p"]
    assert todo_of({}, {("c", "p")}, replace=False) == ["p"]


# --- status does not depend on run history --------------------------------------------------------


def _scene(path: Path, west: float, when: str, bands: int = 3, size: int = 64) -> Path:
    yy, xx = np.mgrid[0:size, 0:size]
    data = np.stack([(xx * 3 + yy + 40 * b) % 250 + 1 for b in range(bands)]).astype("uint8")
    return write_raster(
        path,
        data,
        transform=rasterio.transform.from_origin(west, 47.0, 0.3 / size, 0.3 / size),
        tags={"TIFFTAG_DATETIME": when},
    )


def _add_runs_named(name: str, count: int) -> None:
    """``count`` flow runs called ``name``, newer than every run so far."""
    from prefect import flow
    from prefect.states import Scheduled

    @flow(name="history-filler")
    def filler() -> None:
        return None

    def add(n: int) -> None:
        with get_client(sync_client=True) as client:
            for _ in range(n):
                now = dt.datetime.now(dt.UTC)
                client.create_flow_run(filler, name=name, state=Scheduled(scheduled_time=now))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(add, [count // 4 + (i < count % 4) for i in range(4)]))


def _delete_all_runs() -> None:
    with get_client(sync_client=True) as client, ThreadPoolExecutor(4) as pool:
        while runs := client.read_flow_runs(limit=200):
            list(pool.map(lambda run: client.delete_flow_run(run.id), runs))


def test_status_holds_with_capped_or_deleted_run_history(
    configure: Callable[..., Settings], tmp_path: Path
) -> None:
    collections: dict[str, Any] = {
        "ok-scenes": {"render": {"bands": [1, 2, 3]}, "min_zoom": 6, "max_zoom": 8},
        "odd-render": {
            "render": {"bands": [1], "colormap": "no-such-colormap"},
            "min_zoom": 6,
            "max_zoom": 8,
        },
    }
    s = configure(StoreSettings(root=tmp_path / "store"), collections=collections)
    store = open_store(s.store)
    store.put_file("landing/ok-scenes/A_1.tif", _scene(tmp_path / "a.tif", 10.0, "2026:03:01 00:00:00"))
    store.put_file("landing/odd-render/B_1.tif", _scene(tmp_path / "b.tif", 11.0, "2026:03:02 00:00:00", 1))
    undated = write_raster(
        tmp_path / "c.tif",
        np.full((3, 32, 32), 90, dtype="uint8"),
        transform=rasterio.transform.from_origin(12.0, 47.0, 0.01, 0.01),
    )
    store.put_file("landing/ok-scenes/C_1.tif", undated)  # no time anywhere: registration fails

    first = by_id(run_ingest())
    assert first["A_1"].state == "done"
    assert (first["C_1"].state, first["C_1"].step) == ("failed", "register")
    assert "C_1" in first["C_1"].message
    assert (first["B_1"].state, first["B_1"].step) == ("failed", "seed")
    assert "B_1" in first["B_1"].message
    assert "no-such-colormap" in first["B_1"].message
    # registered before seeding failed: the catalog alone would call it done
    assert [i["id"] for i in open_catalog(s.catalog, s.store).search("odd-render")] == ["B_1"]
    assert (status_of(s, "odd-render", "B_1").state, status_of(s, "odd-render", "B_1").step) == (
        "failed",
        "seed",
    )
    done_a = status_of(s, "ok-scenes", "A_1")

    # more than a server page of newer runs under other products' names
    _add_runs_named("process-product/ok-scenes/A_1", 210)
    second = by_id(run_ingest())
    assert second["A_1"].state == "skipped"
    assert (second["B_1"].state, second["B_1"].step) == ("failed", "seed")
    assert (second["C_1"].state, second["C_1"].step) == ("failed", "register")

    # no run history at all, and the cause fixed
    _delete_all_runs()
    collections["odd-render"]["render"]["colormap"] = "viridis"
    s = configure(StoreSettings(root=tmp_path / "store"), collections=collections)
    third = by_id(run_ingest())
    assert third["A_1"].state == "skipped"
    assert third["B_1"].state == "done"
    assert third["B_1"].tiles > 0
    assert status_of(s, "odd-render", "B_1").state == "done"
    assert status_of(s, "ok-scenes", "A_1") == done_a  # a skipped product's record is left alone


# --- a killed ingest converges on the next run ------------------------------------------------------

CRASH_COLLECTIONS = {"crash-scenes": {"render": {"bands": [1, 2, 3]}, "min_zoom": 8, "max_zoom": 12}}
OUTPUTS = ("cogs/", "catalog/", "tiles/")
INGEST_SCRIPT = """
import sys
from skyvault.flows.ingest import ingest
state = ingest(return_state=True)
summary = state.result(raise_on_failure=False)
sys.exit(0 if state.is_completed() and getattr(summary, "failed", 1) == 0 else 1)
"""
REPO = Path(__file__).resolve().parents[2]


def _crash_landing(store: ObjectStore, tmp_path: Path) -> None:
    for i, (west, when) in enumerate([(9.0, "2026:04:01 10:00:00"), (10.0, "2026:04:02 10:00:00")]):
        path = _scene(tmp_path / f"crash-{i}.tif", west, when, size=1024)
        store.put_file(f"landing/crash-scenes/CRASH_{i}.tif", path)


def _ingest_env(s: Settings, tmp_path: Path, api_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SKYVAULT_"))}
    env.update(
        SKYVAULT_CONFIG_FILE=str(s.config_file),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _kill_ingest_when(env: dict[str, str], log: Path, ready: Callable[[], bool], within: float) -> None:
    """Start an ingest process, SIGKILL it (and its process group) as soon as ``ready()``."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", INGEST_SCRIPT],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + within
        while not ready():
            assert proc.poll() is None, f"ingest ended before the kill point:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"kill point not reached:\n{log.read_text()[-3000:]}"
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _rerun_ingest(env: dict[str, str], log: Path) -> None:
    with log.open("wb") as out:
        done = subprocess.run(
            [sys.executable, "-c", INGEST_SCRIPT],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
            start_new_session=True,
        )
    assert done.returncode == 0, log.read_text()[-3000:]


def _reference_then_wipe(s: Settings, tmp_path: Path) -> dict[str, dict[str, tuple[int, str]]]:
    """Outputs of an uninterrupted ingest in this very store; then every output is removed."""
    store = open_store(s.store)
    _crash_landing(store, tmp_path)
    summary = run_ingest()
    assert summary.done == 2, summary
    expected = {p: snapshot(store, p) for p in OUTPUTS}
    assert all(expected.values())
    for name in ("cogs", "catalog", "tiles", "status"):
        shutil.rmtree(s.store.root / name)
    shutil.rmtree(s.scratch_dir, ignore_errors=True)
    return expected


def _records(s: Settings) -> list[ProductStatus]:
    found = [read_status("crash-scenes", f"CRASH_{i}", s.store) for i in range(2)]
    return [r for r in found if r is not None]


def _assert_converged(s: Settings, expected: dict[str, dict[str, tuple[int, str]]]) -> None:
    store = open_store(s.store)
    for prefix in OUTPUTS:
        assert snapshot(store, prefix) == expected[prefix], prefix
    records = _records(s)
    assert [r.state for r in records] == ["done", "done"]
    half_written = [p for p in s.store.root.rglob(".*") if p.name.endswith((".part", ".new"))]
    assert half_written == []


def test_ingest_killed_during_conversion_converges_on_the_default_server(
    configure: Callable[..., Settings], tmp_path: Path
) -> None:
    s = configure(StoreSettings(root=tmp_path / "store"), collections=CRASH_COLLECTIONS)
    expected = _reference_then_wipe(s, tmp_path)
    env = _ingest_env(s, tmp_path, api_url=None)  # a temporary server of its own, as on a fresh machine

    def converting() -> bool:  # GDAL is writing a COG in a scratch folder
        return s.scratch_dir.is_dir() and any(s.scratch_dir.rglob("*.tif"))

    _kill_ingest_when(env, tmp_path / "killed.log", converting, within=300)
    assert not any(r.state == "done" for r in _records(s))

    _rerun_ingest(env, tmp_path / "rerun.log")
    _assert_converged(s, expected)


def test_ingest_killed_while_tiles_are_written_converges(
    configure: Callable[..., Settings], tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    s = configure(StoreSettings(root=tmp_path / "store"), collections=CRASH_COLLECTIONS)
    expected = _reference_then_wipe(s, tmp_path)
    env = _ingest_env(s, tmp_path, api_url=PREFECT_API_URL.value())
    tiles = s.store.root / "tiles"

    def writing_tiles() -> bool:
        return tiles.is_dir() and any(p.is_file() for p in tiles.rglob("*"))

    _kill_ingest_when(env, tmp_path / "killed.log", writing_tiles, within=300)
    killed = _records(s)
    assert any((r.state, r.step) == ("running", "seed") for r in killed), killed
    assert not all(r.state == "done" for r in killed)

    _rerun_ingest(env, tmp_path / "rerun.log")
    _assert_converged(s, expected)

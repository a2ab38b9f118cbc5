"""The map page in a real headless Chromium over a real gateway process and an ingested store.

The sample products are ingested (COGs, static catalog, tiles) into a temporary store; the gateway
runs as ``python -m skyvault.gateway.app``; Chromium is driven over the DevTools protocol. Pixel
positions are computed here from the map's centre and zoom with pyproj and morecantile, not read
from the page.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import morecantile
import numpy as np
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prefect.client.orchestration import get_client
from pyproj import Transformer
from rasterio.io import MemoryFile
from shapely.geometry import Point, shape
from websockets.sync.client import ClientConnection, connect

from skyvault.catalog.registration import open_catalog
from skyvault.config.provision import provision_tag_limits
from skyvault.config.settings import Settings, get_settings
from skyvault.errors import IngestFailedError
from skyvault.flows.ingest import ingest
from skyvault.gateway.map import STATIC_DIR, map_router
from skyvault.gateway.prefect_runs import PrefectRuns
from skyvault.models import IngestSummary
from skyvault.samples import COLLECTIONS, write_samples
from skyvault.status import read_status
from skyvault.storage.store import open_store
from skyvault.tiles.seeding import tile_key, time_key
from tests.gateway.conftest import PASSWORD, USER, gateway_process

pytestmark = pytest.mark.usefixtures("prefect_harness")

WIDTH, HEIGHT = 1280, 900
SCENES = "demo-scenes"
UTM_SCENE, LL_SCENE = "S2_UTM_20260601", "LS_4326_20260602"
#: How long the page may take to show a layer on a slow machine.
PAGE_WAIT = 180.0
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "map"
TMS = morecantile.tms.get("WebMercatorQuad")
TO_MERCATOR = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
TO_LONLAT = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
HALF_WORLD = math.pi * 6378137.0


# --- the ingested store and the gateway -----------------------------------------------------------


@dataclass
class Site:
    """An ingested store and the settings that read it."""

    folder: Path
    config: dict[str, Any]
    settings: Settings
    items: dict[str, dict[str, Any]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def site(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Site:
    """The demo's sample products ingested into a temporary local store with a static catalog."""
    folder = tmp_path_factory.mktemp("map")
    config: dict[str, Any] = {
        "scratch_dir": str(folder / "scratch"),
        "store": {"kind": "local", "root": str(folder / "store")},
        "lts": {"root": str(folder / "lts"), "create_root": True},
        "catalog": {"backend": "static"},
        "collections": COLLECTIONS,
    }
    path = folder / "ingest.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("SKYVAULT_"):
                mp.delenv(name)
        mp.setenv("SKYVAULT_CONFIG_FILE", str(path))
        get_settings.cache_clear()
        settings = get_settings()
        provision_tag_limits(settings)
        write_samples(open_store(settings.store))
        state = ingest(return_state=True)
        summary = state.result(raise_on_failure=False)
        if isinstance(summary, IngestFailedError):
            summary = summary.summary
        get_settings.cache_clear()
    assert isinstance(summary, IngestSummary), state.message
    assert all(o.state == "done" for o in summary.outcomes), summary.outcomes
    catalog = open_catalog(settings.catalog, settings.store)
    items = {i["id"]: i for i in catalog.search(SCENES)}
    assert {UTM_SCENE, LL_SCENE} <= set(items)
    return Site(folder=folder, config=config, settings=settings, items=items)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(site: Site, name: str, public_map: bool) -> Iterator[str]:
    """A gateway process over the site's store; yields its URL."""
    config = {**site.config, "gateway": {"username": USER, "public_map": public_map}}
    path = site.folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    (site.folder / "password").write_text(PASSWORD + "\n")
    secrets = {"PASSWORD": site.folder / "password"}
    with gateway_process(
        path, site.folder / f"{name}-prefect-home", secrets, site.folder / f"{name}.log"
    ) as (
        url,
        _,
    ):
        yield url


@pytest.fixture(scope="module")
def public(site: Site) -> Iterator[str]:
    with serve(site, "public", public_map=True) as url:
        yield url


# --- a headless Chromium over the DevTools protocol -----------------------------------------------


class Browser:
    """One Chromium page driven over the DevTools protocol."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary, "chromium is missing: make setup-system installs it"
        profile = folder / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "chromium.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--mute-audio",
                "--force-color-profile=srgb",
                "--force-device-scale-factor=1",
                f"--window-size={WIDTH},{HEIGHT}",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 90
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.process.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.2)
        port = int(port_file.read_text().splitlines()[0])
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(p for p in pages if p["type"] == "page")
        self.ws: ClientConnection = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self._ids = itertools.count(1)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events in between are dropped)."""
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("id") == ident:
                assert "error" not in message, f"{method}: {message['error']}"
                result: dict[str, Any] = message.get("result", {})
                return result

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = PAGE_WAIT) -> Any:
        """Poll ``expression`` until it is truthy; fail with the page's message when it says error."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            state = self.evaluate("document.body ? document.body.dataset.ready : null")
            if state == "error":
                text = self.evaluate("document.body.innerText")
                raise AssertionError(f"the page reports an error while waiting for {what}: {text}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.25)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", "the page to load")

    def wait_for_tiles(self, layer: str) -> None:
        """Wait for ``layer`` ("<collection>/<time>") to be shown, its tiles faded in."""
        self.wait_for(
            f"document.body.dataset.layer === {json.dumps(layer)} && document.body.dataset.ready === 'tiles'",
            f"layer {layer}",
        )
        self.wait_for(
            "[...document.querySelectorAll('img.leaflet-tile')]"
            ".every(t => t.complete && getComputedStyle(t).opacity === '1')",
            "the tiles to fade in",
        )

    def screenshot(self, path: Path) -> np.ndarray:
        """The page as an RGB array (height, width, 3); the PNG is kept at ``path``."""
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        with MemoryFile(data) as mem, mem.open() as ds:
            pixels: np.ndarray = ds.read()
        return np.moveaxis(pixels[:3], 0, -1).astype("int16")

    def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self._log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "chromium")
    try:
        yield b
    finally:
        b.close()


# --- independent geometry: screen pixels <-> ground <-> tile pixels ------------------------------


def world_pixel(lon: float, lat: float, zoom: int) -> tuple[float, float]:
    """Web Mercator pixel coordinates of a point at ``zoom`` (256 px tiles), from pyproj."""
    x, y = TO_MERCATOR.transform(lon, lat)
    scale = 256 * 2**zoom / (2 * HALF_WORLD)
    return (x + HALF_WORLD) * scale, (HALF_WORLD - y) * scale


def ground_of(sx: float, sy: float, center: tuple[float, float], zoom: int) -> tuple[float, float]:
    """Lon/lat under the screen point ``(sx, sy)`` of a map of WIDTH x HEIGHT centred on ``center``."""
    cx, cy = world_pixel(*center, zoom)
    scale = 256 * 2**zoom / (2 * HALF_WORLD)
    gx, gy = cx + sx - WIDTH / 2, cy + sy - HEIGHT / 2
    lon, lat = TO_LONLAT.transform(gx / scale - HALF_WORLD, HALF_WORLD - gy / scale)
    return float(lon), float(lat)


def screen_of(lon: float, lat: float, center: tuple[float, float], zoom: int) -> tuple[float, float]:
    cx, cy = world_pixel(*center, zoom)
    px, py = world_pixel(lon, lat, zoom)
    return WIDTH / 2 + px - cx, HEIGHT / 2 + py - cy


class Tiles:
    """Reads a layer's stored tiles and finds the tile pixel under a ground point (morecantile)."""

    def __init__(self, site: Site, layer: str, zoom: int) -> None:
        self.store = open_store(site.settings.store)
        self.layer, self.zoom = layer, zoom
        self.cache: dict[tuple[int, int], np.ndarray] = {}

    def pixel(self, lon: float, lat: float) -> np.ndarray:
        """RGBA of the stored tile at a ground point (alpha 0 where no tile was rendered)."""
        tile = TMS.tile(lon, lat, self.zoom)
        if (tile.x, tile.y) not in self.cache:
            key = tile_key(SCENES, self.layer, (self.zoom, tile.x, tile.y))
            if self.store.exists(key):
                with MemoryFile(self.store.get_bytes(key)) as mem, mem.open() as ds:
                    data = ds.read()
                if data.shape[0] == 3:
                    data = np.concatenate([data, np.full_like(data[:1], 255)])
                self.cache[(tile.x, tile.y)] = np.moveaxis(data, 0, -1).astype("int16")
            else:
                self.cache[(tile.x, tile.y)] = np.zeros((256, 256, 4), dtype="int16")
        bounds = TMS.xy_bounds(tile)
        x, y = TO_MERCATOR.transform(lon, lat)
        col = int((x - bounds.left) / (bounds.right - bounds.left) * 256)
        row = int((bounds.top - y) / (bounds.top - bounds.bottom) * 256)
        found: np.ndarray = self.cache[(tile.x, tile.y)][min(row, 255), min(col, 255)]
        return found


RADIUS = 4  # compared windows are 9 x 9 screen pixels


def expected_window(tiles: Tiles, sx: int, sy: int, center: tuple[float, float]) -> np.ndarray | None:
    """The tile pixels the screen should show around ``(sx, sy)``; None where a tile pixel is not opaque."""
    out = np.zeros((2 * RADIUS + 1, 2 * RADIUS + 1, 4), dtype="int16")
    for j, i in itertools.product(range(-RADIUS, RADIUS + 1), repeat=2):
        lon, lat = ground_of(sx + i + 0.5, sy + j + 0.5, center, tiles.zoom)
        out[j + RADIUS, i + RADIUS] = tiles.pixel(lon, lat)
    return out[..., :3] if (out[..., 3] == 255).all() else None


def window_difference(shot: np.ndarray, expected: np.ndarray, sx: int, sy: int) -> float:
    """Mean absolute difference at the best alignment within one screen pixel (Leaflet rounds)."""
    best = math.inf
    for dy, dx in itertools.product((-1, 0, 1), repeat=2):
        y0, x0 = sy + dy - RADIUS, sx + dx - RADIUS
        seen = shot[y0 : y0 + 2 * RADIUS + 1, x0 : x0 + 2 * RADIUS + 1]
        best = min(best, float(np.abs(seen - expected).mean()))
    return best


def sample_points(
    item: dict[str, Any], center: tuple[float, float], zoom: int, browser: Browser
) -> list[tuple[int, int]]:
    """Screen points well inside the item's footprint, in the map and clear of the side panel."""
    panel = browser.evaluate(
        "(() => { const r = document.getElementById('panel').getBoundingClientRect();"
        " return [r.left, r.top, r.right, r.bottom]; })()"
    )
    footprint = shape(item["geometry"])
    inner = footprint.buffer(-0.03)
    points = []
    fractions = [0.25 + 0.05 * k for k in range(11)]
    for fx, fy in itertools.product(fractions, repeat=2):
        sx, sy = int(WIDTH * fx), int(HEIGHT * fy)
        lon, lat = ground_of(sx + 0.5, sy + 0.5, center, zoom)
        clear = not (panel[0] - 20 <= sx <= panel[2] + 20 and panel[1] - 20 <= sy <= panel[3] + 20)
        if clear and inner.contains(Point(lon, lat)):
            points.append((sx, sy))
    return points


def check_pixels(
    shot: np.ndarray, tiles: Tiles, item: dict[str, Any], center: tuple[float, float], browser: Browser
) -> int:
    """Assert the screenshot shows the layer's tile pixels where they belong; returns points checked."""
    checked = 0
    for sx, sy in sample_points(item, center, tiles.zoom, browser):
        expected = expected_window(tiles, sx, sy, center)
        if expected is None:  # nodata of the product: nothing drawn there
            continue
        here = window_difference(shot, expected, sx, sy)
        elsewhere = window_difference(shot, expected, sx + 15, sy + 11)
        assert here <= 2.0, f"screen ({sx}, {sy}) differs from the tile pixels there by {here:.1f} on average"
        assert elsewhere > 4.0 * max(here, 0.5), f"the pattern at ({sx}, {sy}) is too flat to locate"
        checked += 1
        if checked == 12:
            break
    return checked


def view_of(browser: Browser) -> tuple[tuple[float, float], int]:
    lat, lon, zoom = (float(v) for v in browser.evaluate("document.body.dataset.view").split(","))
    return (lon, lat), int(zoom)


# --- tests ----------------------------------------------------------------------------------------


def test_the_map_shows_tiles_where_they_belong_switches_layers_and_shows_items(
    site: Site, public: str, browser: Browser, tmp_path: Path
) -> None:
    utm, ll = site.items[UTM_SCENE], site.items[LL_SCENE]
    utm_layer, ll_layer = time_key(utm), time_key(ll)
    centroid = shape(utm["geometry"]).centroid
    center, zoom = (centroid.x, centroid.y), 11

    # the page lists the collections and the time layers of the one shown
    address = f"{public}/map?collection={SCENES}&time={utm_layer}&lat={center[1]}&lon={center[0]}&zoom={zoom}"
    browser.open(address)
    browser.wait_for_tiles(f"{SCENES}/{utm_layer}")
    options = browser.evaluate("[...document.querySelectorAll('#collection option')].map(o => o.value)")
    assert sorted(options) == sorted(COLLECTIONS)
    times = browser.evaluate("[...document.querySelectorAll('#time option')].map(o => o.value)")
    assert times == [utm_layer, ll_layer]
    assert browser.evaluate("document.getElementById('time').value") == utm_layer

    # 1. the screen shows the tile's pixels at the same ground points
    shot = browser.screenshot(tmp_path / "map-utm.png")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "map-utm.png", ARTIFACTS / "map-utm.png")
    print(f"screenshot: {ARTIFACTS / 'map-utm.png'}")
    assert check_pixels(shot, Tiles(site, utm_layer, zoom), utm, center, browser) >= 4
    # outside the footprint the map shows no tile content: its plain background
    sx, sy = (int(v) for v in screen_of(centroid.x - 0.3, centroid.y, center, zoom))
    assert 10 < sx < WIDTH - 10, "the test point west of the scene is off screen"
    background = shot[sy - 3 : sy + 4, sx - 3 : sx + 4].reshape(-1, 3)
    assert (background == background[0]).all()

    # 2. the time selector switches to the other layer: its tiles, where they belong
    browser.evaluate(
        f"(() => {{ const s = document.getElementById('time'); s.value = {json.dumps(ll_layer)};"
        " s.dispatchEvent(new Event('change')); })()"
    )
    browser.wait_for_tiles(f"{SCENES}/{ll_layer}")
    sources = browser.evaluate("[...document.querySelectorAll('img.leaflet-tile')].map(t => t.src)")
    assert sources
    assert all(f"/{ll_layer}/" in s for s in sources), sources
    assert browser.evaluate("new URLSearchParams(location.search).get('time')") == ll_layer
    ll_center, ll_zoom = view_of(browser)
    assert shape(ll["geometry"]).contains(Point(*ll_center))  # the view moved to the layer
    shot = browser.screenshot(tmp_path / "map-ll.png")
    shutil.copy(tmp_path / "map-ll.png", ARTIFACTS / "map-ll.png")
    assert check_pixels(shot, Tiles(site, ll_layer, ll_zoom), ll, ll_center, browser) >= 4

    # 3. on a fresh page, a click on the footprint shows the item, with links to its COG, STAC JSON and run
    browser.open(address)
    browser.wait_for_tiles(f"{SCENES}/{utm_layer}")
    inside = shape(utm["geometry"]).buffer(-0.05).representative_point()
    browser.click(*screen_of(inside.x, inside.y, center, zoom))
    browser.wait_for("!!document.querySelector('.skyvault-popup')", "the item's popup")
    text = browser.evaluate("document.querySelector('.skyvault-popup').innerText")
    assert UTM_SCENE in text
    assert utm["properties"]["start_datetime"][:19] in text
    links = browser.evaluate(
        "Object.fromEntries([...document.querySelectorAll('.skyvault-popup a')]"
        ".map(a => [a.dataset.rel, a.href]))"
    )
    store = open_store(site.settings.store)
    cog = httpx.get(links["cog"], timeout=60)
    assert cog.status_code == 200
    assert cog.content == store.get_bytes(utm["properties"]["skyvault:cog_key"])
    assert httpx.get(links["stac"], timeout=30).json() == utm
    record = read_status(SCENES, UTM_SCENE, site.settings.store)
    assert record is not None
    assert record.flow_run_id
    assert links["run"].endswith(f"/runs/flow-run/{record.flow_run_id}")
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(record.flow_run_id))
    assert run.name == f"process-product/{SCENES}/{UTM_SCENE}"


def test_a_time_in_the_address_shows_that_layer_at_the_place_asked(
    site: Site, public: str, browser: Browser, tmp_path: Path
) -> None:
    utm, ll = site.items[UTM_SCENE], site.items[LL_SCENE]
    ll_layer = time_key(ll)
    inside = shape(ll["geometry"]).buffer(-0.1).centroid
    center, zoom = (inside.x, inside.y), 9
    browser.open(
        f"{public}/map?collection={SCENES}&time={ll_layer}&lat={center[1]}&lon={center[0]}&zoom={zoom}"
    )
    browser.wait_for_tiles(f"{SCENES}/{ll_layer}")
    shown_center, shown_zoom = view_of(browser)
    assert shown_zoom == zoom
    assert shown_center == pytest.approx(center, abs=1e-6)
    assert browser.evaluate("document.getElementById('time').value") == ll_layer
    shot = browser.screenshot(tmp_path / "map-address.png")
    assert check_pixels(shot, Tiles(site, ll_layer, zoom), ll, center, browser) >= 4
    # the other layer's scene, also in view, is not drawn: only this layer's footprint is
    ids = browser.evaluate("[...document.querySelectorAll('path.leaflet-interactive')].length")
    assert ids == 1
    west = shape(utm["geometry"]).centroid
    sx, sy = (int(v) for v in screen_of(west.x, west.y, center, zoom))
    assert 10 < sx < WIDTH - 10
    background = shot[sy - 3 : sy + 4, sx - 3 : sx + 4].reshape(-1, 3)
    assert (background == background[0]).all()


def test_the_map_api_serves_stored_tiles_without_credentials_and_the_api_still_needs_them(
    site: Site, public: str
) -> None:
    layer = time_key(site.items[UTM_SCENE])
    collections = {c["id"]: c for c in httpx.get(f"{public}/map/api/collections", timeout=30).json()}
    assert set(collections) == set(COLLECTIONS)
    shown = {entry["time"]: entry for entry in collections[SCENES]["layers"]}
    assert set(shown) == {time_key(i) for i in site.items.values()}
    entry = shown[layer]
    assert (entry["minzoom"], entry["maxzoom"]) == (
        COLLECTIONS[SCENES]["min_zoom"],
        COLLECTIONS[SCENES]["max_zoom"],
    )
    west, south, east, north = entry["bounds"]
    lon0, lat0, lon1, lat1 = site.items[UTM_SCENE]["bbox"]
    assert west <= lon0
    assert south <= lat0
    assert east >= lon1
    assert north >= lat1
    centroid = shape(site.items[UTM_SCENE]["geometry"]).centroid
    tile = TMS.tile(centroid.x, centroid.y, 11)
    url = entry["tiles"].format(z=11, x=tile.x, y=tile.y)
    answer = httpx.get(f"{public}{url}", timeout=30)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "image/png"
    assert answer.content == open_store(site.settings.store).get_bytes(
        tile_key(SCENES, layer, (11, tile.x, tile.y))
    )
    # a tile nothing was rendered for, an unknown collection, a time that is no time key
    assert httpx.get(f"{public}/map/api/tiles/{SCENES}/{layer}/11/0/0.png", timeout=30).status_code == 404
    assert httpx.get(f"{public}/map/api/tiles/nope/{layer}/11/0/0.png", timeout=30).status_code == 404
    bad = httpx.get(f"{public}/map/api/items/{SCENES}", params={"time": "yesterday"}, timeout=30)
    assert bad.status_code == 422
    assert bad.json()["field"] == "time"
    # the API beside the map still refuses callers without credentials
    assert httpx.get(f"{public}/products", params={"collection": SCENES}, timeout=30).status_code == 401


def test_a_private_map_asks_the_browser_for_the_gateway_credentials(site: Site) -> None:
    layer = time_key(site.items[UTM_SCENE])
    with serve(site, "private", public_map=False) as url:
        for path in (
            "/map",
            "/map/static/map.js",
            "/map/api/collections",
            f"/map/api/items/{SCENES}?time={layer}",
        ):
            refused = httpx.get(f"{url}{path}", timeout=30)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"] == 'Basic realm="skyvault", charset="UTF-8"'
            wrong = httpx.get(f"{url}{path}", auth=(USER, "wrong"), timeout=30)
            assert wrong.status_code == 401, path
            assert httpx.get(f"{url}{path}", auth=(USER, PASSWORD), timeout=30).status_code == 200, path
        page = httpx.get(f"{url}/map", auth=(USER, PASSWORD), timeout=30)
        assert "leaflet.js" in page.text


def test_without_the_map_library_the_page_says_how_to_install_it(
    local_settings: Settings, tmp_path: Path
) -> None:
    static = tmp_path / "static"
    static.mkdir()
    for name in ("map.html", "map.js", "map.css"):
        shutil.copy(STATIC_DIR / name, static / name)
    app = FastAPI()
    app.include_router(
        map_router(local_settings, open_store(local_settings.store), PrefectRuns(), None, static)
    )
    answer = TestClient(app).get("/map")
    assert answer.status_code == 503
    assert answer.headers["content-type"].startswith("text/html")
    assert "Leaflet" in answer.text
    assert "vendor/leaflet/leaflet.js" in answer.text
    assert "make setup-python" in answer.text
    # with the library in place the same folder serves the page
    shutil.copytree(STATIC_DIR / "vendor", static / "vendor")
    page = TestClient(app).get("/map")
    assert page.status_code == 200
    assert "/map/static/vendor/leaflet/leaflet.js" in page.text
    served = TestClient(app).get("/map/static/vendor/leaflet/leaflet.js")
    assert served.content == (STATIC_DIR / "vendor/leaflet/leaflet.js").read_bytes()

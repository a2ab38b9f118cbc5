"""``/map``: a web map of the tile cache and the catalog, served by the gateway.

The page (``static/map.html``, ``map.js``, ``map.css``) uses Leaflet from
``static/vendor/leaflet/``, put there by ``scripts/fetch-web-assets.sh`` from the npm registry;
nothing is loaded from elsewhere at run time. The JSON it reads:

- ``/map/api/collections``: each configured collection and its time layers (the time keys of its
  items, with the bounds and zooms of the layer's TileJSON);
- ``/map/api/tiles/{collection}/{time}/{z}/{x}/{y}.{png|webp}``: a tile from the store;
- ``/map/api/items/{collection}?time=``: the layer's item footprints as GeoJSON, with links to the
  item's COG and STAC JSON (both served here, so they work for any store and catalog) and to its
  run in the Prefect UI (from the product's status record);
- ``/map/api/cog/{collection}/{id}``, ``/map/api/stac/{collection}/{id}``: those links.

With ``gateway.public_map`` (the default) the map needs no credentials; otherwise every ``/map``
route takes the API's HTTP Basic or bearer credentials, and a refusal asks the browser for them.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel

from skyvault.catalog.registration import open_catalog
from skyvault.config.settings import Settings
from skyvault.errors import (
    AuthenticationError,
    InvalidIdentifierError,
    NotFoundError,
    ObjectNotFoundError,
    RequestError,
    SkyvaultError,
)
from skyvault.gateway.runs import Runs
from skyvault.ids import check_id
from skyvault.status import read_statuses
from skyvault.storage.store import ObjectStore
from skyvault.tiles.seeding import COG_KEY_PROPERTY, TMS_ID, tile_key, tilejson_key, time_key

#: The page and its assets.
STATIC_DIR = Path(__file__).parent / "static"
#: The files of the map library the page cannot work without, relative to :data:`STATIC_DIR`.
REQUIRED_ASSETS = ("vendor/leaflet/leaflet.js", "vendor/leaflet/leaflet.css")
#: TileJSON documents read at the same time (object-store GETs are I/O bound).
READ_WORKERS = 16
#: Largest zoom a tile request may name.
MAX_ZOOM = 30
_STAMP = re.compile(r"^(\d{8}T\d{6})(?:\.(\d{6}))?Z$")
_TILE_TYPES = {"png": "image/png", "webp": "image/webp"}
_CHUNK = 1024 * 1024


class MapLayer(BaseModel):
    """One time layer of a collection: its time key, items and (when seeded) its TileJSON."""

    time: str
    start: dt.datetime
    end: dt.datetime
    items: int
    tiles: str | None = None
    format: str | None = None
    bounds: list[float] | None = None
    center: list[float] | None = None
    minzoom: int | None = None
    maxzoom: int | None = None


class MapCollection(BaseModel):
    """A collection as the map lists it, its layers oldest first."""

    id: str
    title: str
    description: str
    layers: list[MapLayer]


def parse_time_key(key: str) -> tuple[dt.datetime, dt.datetime]:
    """The UTC interval of a layer's time key (``20260101T000000Z`` or ``<start>--<end>``).

    Raises:
        RequestError: ``key`` is not a time key (field ``time``).

    """
    parts = key.split("--")
    if len(parts) > 2:
        raise RequestError(f"time: {key!r} is not a layer time key like 20260101T000000Z", "time")
    stamps: list[dt.datetime] = []
    for part in parts:
        found = _STAMP.match(part)
        if found is None:
            raise RequestError(f"time: {key!r} is not a layer time key like 20260101T000000Z", "time")
        try:
            value = dt.datetime.strptime(found.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)
        except ValueError as e:
            raise RequestError(f"time: {key!r} is not a valid time: {e}", "time") from e
        stamps.append(value.replace(microsecond=int(found.group(2) or 0)))
    return stamps[0], stamps[-1]


def _check_item_id(item_id: str) -> str:
    try:
        return check_id(item_id, "item id")
    except InvalidIdentifierError as e:
        raise RequestError(f"id: {e}", "id") from e


def _read_tilejson(store: ObjectStore, collection_id: str, layer: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(store.get_bytes(tilejson_key(collection_id, layer)))
    except ObjectNotFoundError:
        return None
    except ValueError:  # not JSON: the layer is listed without tiles
        return None
    return doc if isinstance(doc, dict) else None


def _layer(collection_id: str, layer: str, items: int, doc: dict[str, Any] | None, api: str) -> MapLayer:
    start, end = parse_time_key(layer)
    base = MapLayer(time=layer, start=start, end=end, items=items)
    if doc is None:
        return base
    try:
        fmt = str(doc["tiles"][0]).rsplit(".", 1)[-1]
        update: dict[str, Any] = {
            "format": fmt if fmt in _TILE_TYPES else "png",
            "bounds": [float(v) for v in doc["bounds"][:4]],
            "center": [float(v) for v in doc["center"][:3]],
            "minzoom": int(doc["minzoom"]),
            "maxzoom": int(doc["maxzoom"]),
        }
    except (KeyError, IndexError, TypeError, ValueError):
        return base
    update["tiles"] = f"{api}/tiles/{collection_id}/{layer}/{{z}}/{{x}}/{{y}}.{update['format']}"
    return base.model_copy(update=update)


def map_collections(settings: Settings, store: ObjectStore, api: str) -> list[MapCollection]:
    """Every configured collection with its time layers (one catalog search per collection).

    A layer is a time key of the collection's items; its tile fields come from its TileJSON and
    stay empty while it is not seeded. ``api`` is the path the tile URLs start with.
    """
    catalog = open_catalog(settings.catalog, settings.store)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for collection_id in settings.collections:
        for item in catalog.search(collection_id):
            try:
                counts[(collection_id, time_key(item))] += 1
            except SkyvaultError:  # an item without a readable time is on no layer
                continue
    pairs = sorted(counts)
    with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
        docs = list(pool.map(lambda p: _read_tilejson(store, *p), pairs))
    layers: dict[str, list[MapLayer]] = defaultdict(list)
    for (collection_id, layer), doc in zip(pairs, docs, strict=True):
        layers[collection_id].append(_layer(collection_id, layer, counts[(collection_id, layer)], doc, api))
    return [
        MapCollection(
            id=c.id,
            title=c.title or c.id,
            description=c.description or "",
            layers=sorted(layers[c.id], key=lambda layer: (layer.start, layer.end)),
        )
        for c in settings.collections.values()
    ]


def _datetime_text(item: dict[str, Any]) -> str:
    props = item.get("properties", {})
    start, end = props.get("start_datetime"), props.get("end_datetime")
    if props.get("datetime"):
        return str(props["datetime"])
    return f"{start}/{end}" if start and end else ""


def map_items(collection_id: str, layer: str, settings: Settings, runs: Runs, api: str) -> dict[str, Any]:
    """The items of one layer as a GeoJSON FeatureCollection for the map.

    Each feature's properties: ``id``, ``collection``, ``datetime``, ``links`` (``cog`` and
    ``stac`` on the gateway, ``run`` in the Prefect UI when the status record names the run) and
    the item's own ``properties``.

    Raises:
        UnknownCollectionError: the collection is not configured.
        RequestError: ``layer`` is not a time key.

    """
    settings.collection(collection_id)
    start, end = parse_time_key(layer)
    catalog = open_catalog(settings.catalog, settings.store)
    items = []
    for item in catalog.search(collection_id, start=start, end=end):
        try:
            if time_key(item) == layer:
                items.append(item)
        except SkyvaultError:
            continue
    items.sort(key=lambda i: str(i.get("id")))
    records = read_statuses([(collection_id, str(i["id"])) for i in items], settings.store)
    features = []
    for item in items:
        item_id = str(item["id"])
        record = records.get((collection_id, item_id))
        run = runs.ui_url(record.flow_run_id) if record is not None and record.flow_run_id else None
        features.append(
            {
                "type": "Feature",
                "id": item_id,
                "geometry": item.get("geometry"),
                "bbox": item.get("bbox"),
                "properties": {
                    "id": item_id,
                    "collection": collection_id,
                    "datetime": _datetime_text(item),
                    "links": {
                        "cog": f"{api}/cog/{collection_id}/{item_id}",
                        "stac": f"{api}/stac/{collection_id}/{item_id}",
                        "run": run,
                    },
                    "properties": item.get("properties", {}),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def read_tile(
    collection_id: str,
    layer: str,
    tile: tuple[int, int, int],
    fmt: str,
    settings: Settings,
    store: ObjectStore,
) -> bytes:
    """A tile of a layer as stored.

    Raises:
        UnknownCollectionError: the collection is not configured.
        RequestError: ``layer`` is not a time key, or the tile is outside the zoom's grid.
        NotFoundError: the tile was not rendered (nothing of the layer there, or not seeded).

    """
    settings.collection(collection_id)
    parse_time_key(layer)
    z, x, y = tile
    if not (0 <= z <= MAX_ZOOM and 0 <= x < 2**z and 0 <= y < 2**z):
        raise RequestError(f"tile: {z}/{x}/{y} is not a {TMS_ID} tile", "tile")
    key = tile_key(collection_id, layer, tile, fmt)
    try:
        return store.get_bytes(key)
    except ObjectNotFoundError as e:
        raise NotFoundError(f"no tile {key}") from e


def _item(collection_id: str, item_id: str, settings: Settings) -> dict[str, Any]:
    settings.collection(collection_id)
    _check_item_id(item_id)
    item = open_catalog(settings.catalog, settings.store).get_item(collection_id, item_id)
    if item is None:
        raise NotFoundError(f"item {collection_id}/{item_id} is not in the catalog")
    return item


def cog_key_of(collection_id: str, item_id: str, settings: Settings) -> str:
    """The object key of an item's COG (only keys under ``cogs/<collection>/`` are served).

    Raises:
        UnknownCollectionError: the collection is not configured.
        RequestError: the item id is unsafe.
        NotFoundError: the item is not in the catalog or names no COG of its collection.

    """
    item = _item(collection_id, item_id, settings)
    key = item.get("properties", {}).get(COG_KEY_PROPERTY)
    if not isinstance(key, str) or not key.startswith(f"cogs/{collection_id}/") or ".." in key:
        raise NotFoundError(f"item {collection_id}/{item_id} names no COG of its collection")
    return key


def missing_assets(static_dir: Path) -> list[str]:
    """The map library files absent from ``static_dir``."""
    return [name for name in REQUIRED_ASSETS if not (static_dir / name).is_file()]


def _missing_page(missing: Sequence[str]) -> str:
    names = "".join(f"<li><code>static/{name}</code></li>" for name in missing)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>skyvault map</title></head>"
        "<body data-ready='error'><h1>The map cannot be shown</h1>"
        "<p id='message'>The map library (Leaflet) is not installed on this gateway. Missing:</p>"
        f"<ul>{names}</ul><p>Install it with <code>make setup-python</code> (or "
        "<code>bash scripts/fetch-web-assets.sh</code>), which downloads it from the npm registry "
        "and checks its integrity, then reload this page.</p></body></html>"
    )


def _static_file(static_dir: Path, path: str) -> Path:
    root = static_dir.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise NotFoundError(f"no map asset {path!r}")
    return target


def _chunks(store: ObjectStore, key: str) -> Iterator[bytes]:
    with store.open_read(key) as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def map_router(
    settings: Settings,
    store: ObjectStore,
    runs: Runs,
    caller: Callable[[Request], str] | None,
    static_dir: Path = STATIC_DIR,
) -> APIRouter:
    """The ``/map`` routes; ``caller`` checks credentials (None: the map is public).

    A refused request gets 401 with a ``WWW-Authenticate: Basic`` challenge alone, so a browser
    asks for the user name and password and sends them with every tile and JSON request after.
    """
    dependencies = []
    if caller is not None:
        check = caller

        def browser_caller(request: Request) -> str:
            try:
                return check(request)
            except AuthenticationError as e:
                raise HTTPException(
                    401,
                    detail=str(e),
                    headers={"WWW-Authenticate": 'Basic realm="skyvault", charset="UTF-8"'},
                ) from e

        dependencies.append(Depends(browser_caller))
    router = APIRouter(dependencies=dependencies)
    cache = "private, max-age=60" if caller is not None else "public, max-age=60"

    def prefix(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/") + "/map"

    @router.get("/map", response_class=HTMLResponse)
    def page(request: Request) -> HTMLResponse:
        missing = missing_assets(static_dir)
        if missing:
            return HTMLResponse(_missing_page(missing), status_code=503)
        html = (static_dir / "map.html").read_text(encoding="utf-8")
        html = html.replace("{{static}}", f"{prefix(request)}/static").replace(
            "{{api}}", f"{prefix(request)}/api"
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    @router.get("/map/", include_in_schema=False)
    def page_slash(request: Request) -> RedirectResponse:
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"{prefix(request)}{query}", status_code=308)

    @router.get("/map/static/{path:path}")
    def asset(path: str) -> FileResponse:
        return FileResponse(_static_file(static_dir, path), headers={"Cache-Control": cache})

    @router.get("/map/api/collections")
    def collections(request: Request) -> list[dict[str, Any]]:
        found = map_collections(settings, store, f"{prefix(request)}/api")
        return [c.model_dump(mode="json") for c in found]

    @router.get("/map/api/items/{collection}")
    def items(
        request: Request, collection: str, time: Annotated[str, Query(min_length=1, max_length=100)]
    ) -> dict[str, Any]:
        return map_items(collection, time, settings, runs, f"{prefix(request)}/api")

    @router.get("/map/api/tiles/{collection}/{time}/{z}/{x}/{y}.{fmt}")
    def tile(collection: str, time: str, z: int, x: int, y: int, fmt: Literal["png", "webp"]) -> Response:
        data = read_tile(collection, time, (z, x, y), fmt, settings, store)
        return Response(data, media_type=_TILE_TYPES[fmt], headers={"Cache-Control": cache})

    @router.get("/map/api/stac/{collection}/{item_id}")
    def stac(collection: str, item_id: str) -> Response:
        item = _item(collection, item_id, settings)
        return Response(json.dumps(item, indent=2), media_type="application/geo+json")

    @router.get("/map/api/cog/{collection}/{item_id}")
    def cog(collection: str, item_id: str) -> StreamingResponse:
        key = cog_key_of(collection, item_id, settings)
        info = store.head(key)
        if info is None:
            raise NotFoundError(f"the COG {key} of item {collection}/{item_id} is not on the store")
        headers = {
            "Content-Length": str(info.size),
            "Content-Disposition": f'attachment; filename="{item_id}.tif"',
        }
        return StreamingResponse(_chunks(store, key), media_type="image/tiff", headers=headers)

    return router

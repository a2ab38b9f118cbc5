from __future__ import annotations

import base64
import datetime as dt
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pystac_client
import pytest

from skyvault.catalog.registration import open_catalog
from skyvault.catalog.stac_api import StacApiCatalog
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import CatalogSettings, StoreSettings
from skyvault.errors import CatalogError, ItemsRejectedError, TransientCatalogError
from skyvault.items import parse_time
from tests.catalog.items import stac_item, stamp
from tests.conftest import StacApi

MAY_1 = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
MAY_10 = dt.datetime(2024, 5, 10, 12, 30, tzinfo=dt.UTC)
JUNE_15 = dt.datetime(2024, 6, 15, tzinfo=dt.UTC)
JAN_2023 = dt.datetime(2023, 1, 1, tzinfo=dt.UTC)


def unique(name: str) -> str:
    return f"{name}-{os.urandom(4).hex()}"


def collection(name: str) -> CollectionConfig:
    return CollectionConfig(
        id=unique(name), title="API scenes", description="Scenes in a STAC API", license="CC-BY-4.0"
    )


def make_item(
    item_id: str,
    collection_id: str,
    bbox: tuple[float, float, float, float] = (10.0, 45.0, 11.0, 46.0),
    when: dt.datetime | None = MAY_1,
    span: tuple[dt.datetime, dt.datetime] | None = None,
) -> dict[str, Any]:
    return stac_item(item_id, collection_id, bbox=bbox, when=when, span=span)


def settings(url: str, **kw: Any) -> CatalogSettings:
    return CatalogSettings(
        backend="stac-api", url=url, **{"backoff_seconds": 0.01, "timeout_seconds": 10, **kw}
    )


@pytest.fixture
def store(tmp_path: Path) -> StoreSettings:
    return StoreSettings(root=tmp_path / "store")


def sql(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        cursor = conn.execute(query, args)
        return cursor.fetchall() if cursor.description else []


def stored_count(dsn: str, collection_id: str, item_id: str | None = None) -> int:
    if item_id is None:
        rows = sql(dsn, "SELECT count(*) FROM pgstac.items WHERE collection = %s", collection_id)
    else:
        rows = sql(
            dsn, "SELECT count(*) FROM pgstac.items WHERE collection = %s AND id = %s", collection_id, item_id
        )
    return int(rows[0][0])


def extent_of(url: str, collection_id: str) -> tuple[list[float], list[dt.datetime | None]]:
    doc = httpx.get(f"{url}/collections/{collection_id}").json()
    bbox = [float(v) for v in doc["extent"]["spatial"]["bbox"][0]]
    start, end = doc["extent"]["temporal"]["interval"][0]
    return bbox, [parse_time(start), parse_time(end)]


def assert_extent_covers(url: str, collection_id: str, items: list[dict[str, Any]]) -> None:
    bbox, (start, end) = extent_of(url, collection_id)
    assert start is not None
    assert end is not None  # a real extent, not the placeholder of an empty collection
    for item in items:
        w, s, e, n = item["bbox"]
        assert min(w - bbox[0], s - bbox[1], bbox[2] - e, bbox[3] - n) >= 0, (bbox, item["bbox"])
        props = item["properties"]
        lo = parse_time(props.get("start_datetime") or props["datetime"])
        hi = parse_time(props.get("end_datetime") or props["datetime"])
        assert lo is not None
        assert hi is not None
        assert start <= lo
        assert hi <= end


# --- small HTTP servers on loopback ---------------------------------------------------------------


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class FlakyProxy:
    """Forwards to the STAC API, answering 503 to ``fail_next`` requests.

    With ``fail_after_bulk``, requests pass until one bulk write has gone through, then 503 again.
    With ``hide_bulk``, it answers 404 to bulk writes, as a server without bulk transactions.
    ``fail_bulk`` bulk writes are answered 503 (the other requests pass).
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fail_next = 0
        self.fail_after_bulk = False
        self.hide_bulk = False
        self.bulk_hidden = 0
        self.fail_bulk = 0
        self.unavailable = 0
        self.forwarded: list[str] = []
        self.lock = threading.Lock()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    fail = proxy.fail_next > 0
                    if fail:
                        proxy.fail_next -= 1
                        proxy.unavailable += 1
                    elif proxy.fail_bulk > 0 and self.path.endswith("/bulk_items"):
                        fail = True
                        proxy.fail_bulk -= 1
                        proxy.unavailable += 1
                    else:
                        proxy.forwarded.append(f"{self.command} {self.path}")
                        if proxy.fail_after_bulk and self.path.endswith("/bulk_items"):
                            proxy.fail_next = 10**6
                if proxy.hide_bulk and self.path.endswith("/bulk_items"):
                    with proxy.lock:
                        proxy.bulk_hidden += 1
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fail:
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "connection")
                }
                answer = httpx.request(
                    self.command, proxy.upstream + self.path, content=body, headers=headers, timeout=30
                )
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def do_PUT(self) -> None:
                self._handle()

            def do_DELETE(self) -> None:
                self._handle()

        return Handler


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- tests ----------------------------------------------------------------------------------------


def test_upserted_items_are_found_by_pystac_client_and_stored_once(
    stac_api: StacApi, store: StoreSettings
) -> None:
    coll = collection("upsert")
    catalog = open_catalog(settings(stac_api.url), store)
    assert isinstance(catalog, StacApiCatalog)
    items = [
        make_item("a", coll.id, (10.0, 45.0, 11.0, 46.0), MAY_1),
        make_item("b", coll.id, (12.0, 40.0, 13.0, 41.0), MAY_10),
        make_item("far", coll.id, (-70.0, -30.0, -69.0, -29.0), JAN_2023),
        make_item("long", coll.id, (0.0, 0.0, 1.0, 1.0), span=(JAN_2023, JUNE_15)),
    ]

    refs = catalog.upsert_items(coll, items)

    assert [r.item_id for r in refs] == ["a", "b", "far", "long"]
    assert all(r.created for r in refs)
    assert refs[0].href == f"{stac_api.url}/collections/{coll.id}/items/a"
    assert refs[1].datetime == MAY_10
    assert refs[3].start_datetime == JAN_2023
    assert refs[3].end_datetime == JUNE_15
    assert httpx.get(refs[0].href).json()["id"] == "a"

    client = pystac_client.Client.open(stac_api.url)
    found = list(
        client.search(
            collections=[coll.id],
            bbox=[9.0, 39.0, 14.0, 47.0],
            datetime="2024-05-01T00:00:00Z/2024-05-31T00:00:00Z",
        ).items()
    )
    assert sorted(i.id for i in found) == ["a", "b"]
    by_id = {i.id: i for i in found}
    assert by_id["b"].datetime == MAY_10
    assert by_id["b"].geometry == {
        "type": "Polygon",
        "coordinates": [[[12.0, 40.0], [13.0, 40.0], [13.0, 41.0], [12.0, 41.0], [12.0, 40.0]]],
    }
    assert by_id["a"].assets["data"].href == f"file:///data/cogs/{coll.id}/a.tif"
    assert by_id["a"].properties["skyvault:cog_key"] == f"cogs/{coll.id}/a.tif"

    assert stored_count(stac_api.dsn, coll.id) == 4
    assert_extent_covers(stac_api.url, coll.id, items)
    doc = httpx.get(f"{stac_api.url}/collections/{coll.id}").json()
    assert doc["title"] == "API scenes"
    assert doc["license"] == "CC-BY-4.0"
    assert extent_of(stac_api.url, coll.id)[0] == [-70.0, -30.0, 13.0, 46.0]


def test_search_get_existing_and_delete_follow_the_protocol(stac_api: StacApi, store: StoreSettings) -> None:
    coll = collection("search")
    catalog = StacApiCatalog(settings(stac_api.url), store)
    catalog.upsert_items(
        coll,
        [
            make_item("east", coll.id, (170.0, 0.0, 179.0, 10.0), MAY_1),
            make_item("west", coll.id, (-179.0, 0.0, -170.0, 10.0), MAY_10),
            make_item("mid", coll.id, (0.0, 0.0, 10.0, 10.0), span=(MAY_1, JUNE_15)),
        ],
    )

    def ids(**kw: Any) -> list[str]:
        return sorted(item["id"] for item in catalog.search(coll.id, **kw))

    assert ids() == ["east", "mid", "west"]
    assert ids(bbox=[175.0, -5.0, -175.0, 20.0]) == ["east", "west"]  # across the antimeridian
    assert ids(bbox=[10.0, 10.0, 12.0, 12.0]) == ["mid"]  # edges meet
    assert ids(start=dt.datetime(2024, 6, 1)) == ["mid"]  # naive = UTC; an interval overlaps
    assert ids(start=MAY_10, end=MAY_10) == ["mid", "west"]
    assert ids(end=MAY_1) == ["east", "mid"]
    assert ids(start=JUNE_15, end=MAY_1) == []
    assert ids(ids=["west", "nope"], bbox=[-180.0, -90.0, 180.0, 90.0]) == ["west"]
    assert ids(ids=[]) == []
    assert catalog.search(unique("unknown")) == []

    item = catalog.get_item(coll.id, "mid")
    assert item is not None
    assert item["properties"]["start_datetime"] == stamp(MAY_1)
    assert item["assets"]["data"]["href"] == f"file:///data/cogs/{coll.id}/mid.tif"
    assert catalog.get_item(coll.id, "nope") is None
    assert catalog.get_item(unique("unknown"), "mid") is None
    assert catalog.existing_ids(coll.id, ["east", "nope", "mid", "../bad"]) == {"east", "mid"}
    assert catalog.existing_ids(unique("unknown"), ["east"]) == set()

    assert catalog.delete_item(coll.id, "east") is True
    assert catalog.delete_item(coll.id, "east") is False
    assert ids() == ["mid", "west"]
    assert stored_count(stac_api.dsn, coll.id) == 2


def test_reupsert_changes_nothing_and_a_moved_datetime_leaves_one_item(
    stac_api: StacApi, store: StoreSettings
) -> None:
    coll = collection("move")
    catalog = StacApiCatalog(settings(stac_api.url), store)
    catalog.ensure_collection(coll)
    # One partition per month, so a new month moves the item to another table.
    sql(stac_api.dsn, "UPDATE pgstac.collections SET partition_trunc = 'month' WHERE id = %s", coll.id)
    items = [make_item("a", coll.id, when=MAY_1), make_item("b", coll.id, when=MAY_10)]
    assert [r.created for r in catalog.upsert_items(coll, items)] == [True, True]

    again = catalog.upsert_items(coll, items)
    assert [(r.item_id, r.created) for r in again] == [("a", False), ("b", False)]
    assert stored_count(stac_api.dsn, coll.id) == 2

    moved = make_item("a", coll.id, when=JUNE_15)
    (ref,) = catalog.upsert_items(coll, [moved])
    assert ref.created is False
    assert ref.datetime == JUNE_15
    rows = sql(
        stac_api.dsn,
        "SELECT datetime, tableoid::regclass::text FROM pgstac.items WHERE collection = %s AND id = 'a'",
        coll.id,
    )
    assert len(rows) == 1
    assert rows[0][0] == JUNE_15
    partitions = sql(
        stac_api.dsn,
        "SELECT DISTINCT tableoid::regclass::text FROM pgstac.items WHERE collection = %s",
        coll.id,
    )
    assert len(partitions) == 2  # May keeps b; a lives in June's partition
    assert [i["id"] for i in catalog.search(coll.id, start=MAY_1, end=dt.datetime(2024, 5, 31))] == ["b"]
    assert_extent_covers(stac_api.url, coll.id, [moved, items[1]])


def test_a_batch_with_invalid_items_writes_the_others_and_names_the_bad_ones(
    stac_api: StacApi, store: StoreSettings
) -> None:
    coll = collection("invalid")
    catalog = StacApiCatalog(settings(stac_api.url), store)
    broken = make_item("broken", coll.id)
    broken["geometry"] = {"type": "Polygon", "coordinates": "not coordinates"}  # the server refuses it
    no_time = make_item("no-time", coll.id)
    no_time["properties"]["datetime"] = "yesterday"  # prepare_batch refuses it
    good = [make_item("good-1", coll.id), make_item("good-2", coll.id, (20.0, 20.0, 21.0, 21.0))]

    with pytest.raises(ItemsRejectedError) as caught:
        catalog.upsert_items(coll, [good[0], broken, no_time, good[1]])

    error = caught.value
    assert set(error.errors) == {"broken", "no-time"}
    assert "coordinates" in error.errors["broken"]
    assert "datetime" in error.errors["no-time"]
    assert [r.item_id for r in error.written] == ["good-1", "good-2"]
    assert all(r.created for r in error.written)
    assert stored_count(stac_api.dsn, coll.id) == 2
    assert stored_count(stac_api.dsn, coll.id, "broken") == 0
    assert catalog.existing_ids(coll.id, ["good-1", "good-2", "broken"]) == {"good-1", "good-2"}
    assert_extent_covers(stac_api.url, coll.id, good)


def test_an_unreachable_api_fails_naming_the_batch_after_bounded_retries(store: StoreSettings) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    coll = collection("down")
    catalog = StacApiCatalog(settings(url, max_attempts=2), store)

    started = time.monotonic()
    with pytest.raises(TransientCatalogError) as caught:
        catalog.upsert_items(coll, [make_item("a", coll.id), make_item("b", coll.id)])

    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"batch of 2 items for collection {coll.id!r} at {url}" in message
    assert "after 2 tries" in message
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


def test_a_busy_api_is_retried_and_a_failed_batch_converges_on_rerun(
    stac_api: StacApi, store: StoreSettings
) -> None:
    coll = collection("busy")
    proxy = FlakyProxy(stac_api.url)
    items = [make_item(f"p{i}", coll.id, (float(i), 0.0, i + 1.0, 1.0), MAY_1) for i in range(3)]
    with serve(proxy.handler()) as url:
        patient = StacApiCatalog(settings(url, max_attempts=5), store)
        proxy.fail_next = 3
        refs = patient.upsert_items(coll, items[:2])
        assert [r.item_id for r in refs] == ["p0", "p1"]
        assert proxy.unavailable == 3

        # Down for longer than the tries: the batch fails, named.
        hasty = StacApiCatalog(settings(url, max_attempts=2), store)
        proxy.fail_next = 10**6
        with pytest.raises(
            TransientCatalogError, match=rf"batch of 3 items for collection '{coll.id}' at {url}"
        ):
            hasty.upsert_items(coll, items)

        # Down again right after the bulk write: items are in, the batch still fails.
        proxy.fail_next, proxy.fail_after_bulk = 0, True
        with pytest.raises(TransientCatalogError, match="HTTP 503 after 2 tries"):
            hasty.upsert_items(coll, items)
        assert stored_count(stac_api.dsn, coll.id, "p2") == 1

        # Recovered: the re-run converges.
        proxy.fail_next, proxy.fail_after_bulk = 0, False
        again = hasty.upsert_items(coll, items)

    assert [(r.item_id, r.created) for r in again] == [("p0", False), ("p1", False), ("p2", False)]
    for item in items:
        assert stored_count(stac_api.dsn, coll.id, item["id"]) == 1
    assert stored_count(stac_api.dsn, coll.id) == 3
    assert_extent_covers(stac_api.url, coll.id, items)


def test_concurrent_writers_into_a_new_collection_lose_no_item(
    stac_api: StacApi, store: StoreSettings
) -> None:
    coll = collection("concurrent")
    batches = [
        [make_item(f"w{w}-{i}", coll.id, (w * 10.0, i, w * 10.0 + 1, i + 1.0), MAY_1) for i in range(5)]
        for w in range(4)
    ]

    def write(batch: list[dict[str, Any]]) -> list[bool]:
        catalog = StacApiCatalog(settings(stac_api.url), store)
        return [r.created for r in catalog.upsert_items(coll, batch)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        created = list(pool.map(write, batches))

    assert created == [[True] * 5] * 4
    assert stored_count(stac_api.dsn, coll.id) == 20
    rows = sql(stac_api.dsn, "SELECT count(DISTINCT id) FROM pgstac.items WHERE collection = %s", coll.id)
    assert rows == [(20,)]
    everything = [item for batch in batches for item in batch]
    StacApiCatalog(settings(stac_api.url), store).upsert_items(coll, everything)
    assert_extent_covers(stac_api.url, coll.id, everything)


def test_credentials_reach_the_server_and_never_the_messages(store: StoreSettings) -> None:
    seen: list[str | None] = []

    class Recorder(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            header = self.headers.get("Authorization")
            seen.append(header)
            body = f"token not accepted: {header}".encode()
            self.send_response(403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serve(Recorder) as url:
        bearer = StacApiCatalog(settings(url, token="s3cret-token"), store)
        with pytest.raises(CatalogError) as caught:
            bearer.get_item("scenes", "a")
        basic = StacApiCatalog(settings(url, username="ingest", password="pa55word"), store)
        with pytest.raises(CatalogError) as caught_basic:
            basic.get_item("scenes", "a")

    assert seen == ["Bearer s3cret-token", "Basic " + base64.b64encode(b"ingest:pa55word").decode()]
    assert "HTTP 403" in str(caught.value)
    assert "item 'a' of collection 'scenes'" in str(caught.value)
    assert "s3cret-token" not in str(caught.value)
    assert "pa55word" not in str(caught_basic.value)


def test_a_server_without_bulk_transactions_gets_items_one_by_one(
    stac_api: StacApi, store: StoreSettings
) -> None:
    coll = collection("nobulk")
    proxy = FlakyProxy(stac_api.url)
    proxy.hide_bulk = True
    with serve(proxy.handler()) as url:
        catalog = StacApiCatalog(settings(url), store)
        catalog.ensure_collection(coll)
        sql(stac_api.dsn, "UPDATE pgstac.collections SET partition_trunc = 'month' WHERE id = %s", coll.id)
        items = [make_item("a", coll.id, when=MAY_1), make_item("b", coll.id, when=MAY_10)]
        assert [r.created for r in catalog.upsert_items(coll, items)] == [True, True]
        moved = make_item("a", coll.id, when=JUNE_15)
        refs = catalog.upsert_items(coll, [moved, items[1]])

    assert [(r.item_id, r.created) for r in refs] == [("a", False), ("b", False)]
    assert proxy.bulk_hidden == 1  # asked once, answered 404, never again
    assert any(r.startswith("PUT ") and r.endswith("/items/a") for r in proxy.forwarded)
    rows = sql(
        stac_api.dsn, "SELECT id, datetime FROM pgstac.items WHERE collection = %s ORDER BY id", coll.id
    )
    assert rows == [("a", JUNE_15), ("b", MAY_10)]
    assert_extent_covers(stac_api.url, coll.id, [moved, items[1]])

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import boto3
import pystac
import pytest

from skyvault.catalog.registration import (
    find_existing_items,
    has_item,
    open_catalog,
    register_product,
)
from skyvault.catalog.static import StaticCatalog
from skyvault.cog.convert import cog_key
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import CatalogSettings, StoreSettings
from skyvault.errors import CatalogError
from skyvault.models import Product
from skyvault.stac.item import validate_item
from skyvault.storage.store import STALE_NEW_SECONDS, open_store, sweep_dead_writes
from tests.catalog.items import stac_item
from tests.stac.test_item import put_cog
from tests.storage.test_lock import serial_moto_endpoint, serial_s3_settings  # noqa: F401 - fixtures

SCENES = CollectionConfig(
    id="scenes", title="Test scenes", description="Scenes for tests", license="CC-BY-4.0", keywords=["test"]
)
CATALOG = CatalogSettings()
T0 = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)


def make_item(
    item_id: str,
    store: StoreSettings,
    bbox: tuple[float, float, float, float] = (10.0, 45.0, 11.0, 46.0),
    when: dt.datetime | None = T0,
    span: tuple[dt.datetime, dt.datetime] | None = None,
    collection: str = "scenes",
    **props: Any,
) -> dict[str, Any]:
    """A small valid item whose data asset is the store's URL of its COG key (no raster behind it)."""
    href = open_store(store).url(cog_key(collection, item_id))
    return stac_item(item_id, collection, bbox=bbox, when=when, span=span, href=href, **props)


@pytest.fixture
def store(tmp_path: Path) -> StoreSettings:
    return StoreSettings(root=tmp_path / "store")


def read_json(store: StoreSettings, key: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(open_store(store).get_bytes(key))
    return data


def item_links(store: StoreSettings, collection: str = "scenes") -> list[dict[str, Any]]:
    doc = read_json(store, f"catalog/{collection}/collection.json")
    return [link for link in doc["links"] if link["rel"] == "item"]


def extent(store: StoreSettings, collection: str = "scenes") -> tuple[list[float], list[str | None]]:
    doc = read_json(store, f"catalog/{collection}/collection.json")
    return doc["extent"]["spatial"]["bbox"][0], doc["extent"]["temporal"]["interval"][0]


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted((root / "catalog").rglob("*"))
        if p.is_file()
    }


def test_registered_products_form_a_catalog_pystac_can_walk(
    store: StoreSettings, tmp_path: Path, float_utm: Path, rgb_4326: Path
) -> None:
    refs = []
    for pid, src in (("utm-scene", float_utm), ("rgb-scene", rgb_4326)):
        cog = put_cog(src, store, "scenes", pid, tmp_path)
        product = Product(collection="scenes", id=pid, source_key=f"landing/scenes/{pid}.tif", datetime=T0)
        refs.append(register_product(product, cog, SCENES, CATALOG, store))

    assert [r.created for r in refs] == [True, True]
    assert refs[0].href == open_store(store).url("catalog/scenes/utm-scene/utm-scene.json")
    assert refs[0].datetime == T0

    root = pystac.Catalog.from_file(str(store.root / "catalog" / "catalog.json"))
    (collection,) = list(root.get_collections())
    assert collection.id == "scenes"
    assert collection.title == "Test scenes"
    assert collection.license == "CC-BY-4.0"
    assert collection.keywords == ["test"]
    items = {item.id: item for item in root.get_items(recursive=True)}
    assert set(items) == {"utm-scene", "rgb-scene"}
    for pid, item in items.items():
        assert item.collection_id == "scenes"
        href = str(item.assets["data"].get_absolute_href())
        assert Path(href) == (store.root / cog_key("scenes", pid)).resolve()
        assert Path(href).is_file()
        raw = read_json(store, f"catalog/scenes/{pid}/{pid}.json")
        assert raw["assets"]["data"]["href"] == f"../../../cogs/scenes/{pid}.tif"
        assert all("://" not in link["href"] for link in raw["links"])
        validate_item(raw)

    ref_bbox = {r.item_id: r.bbox for r in refs}
    assert items["rgb-scene"].bbox == pytest.approx(list(ref_bbox["rgb-scene"]))
    assert items["rgb-scene"].bbox == pytest.approx([10.0, 45.0, 11.0, 46.0], abs=1e-6)
    bbox, interval = extent(store)
    assert bbox[0] == pytest.approx(9.0286, abs=1e-3)
    assert bbox[2] == pytest.approx(11.0)
    assert interval == ["2024-05-01T00:00:00Z", "2024-05-01T00:00:00Z"]


def test_upserting_the_same_item_twice_keeps_one_link_and_touches_nothing(store: StoreSettings) -> None:
    catalog = open_catalog(CATALOG, store)
    (first,) = catalog.upsert_items(SCENES, [make_item("a", store)])
    before = snapshot(store.root)

    (second,) = catalog.upsert_items(SCENES, [make_item("a", store)])
    assert first.created
    assert not second.created
    assert second.href == first.href
    assert snapshot(store.root) == before
    assert [link["href"] for link in item_links(store)] == ["./a/a.json"]

    (dup,) = catalog.upsert_items(SCENES, [make_item("a", store, cloud=1), make_item("a", store, cloud=2)])
    assert not dup.created
    assert len(item_links(store)) == 1
    assert read_json(store, "catalog/scenes/a/a.json")["properties"]["cloud"] == 2


def test_a_changed_item_replaces_the_stored_one_and_extents_follow(store: StoreSettings) -> None:
    catalog = open_catalog(CATALOG, store)
    catalog.upsert_items(SCENES, [make_item("a", store, bbox=(0.0, 0.0, 10.0, 10.0), note="old")])
    (ref,) = catalog.upsert_items(
        SCENES, [make_item("a", store, bbox=(1.0, 1.0, 2.0, 2.0), when=T0 + dt.timedelta(days=1), note="new")]
    )
    assert not ref.created
    stored = catalog.get_item("scenes", "a")
    assert stored is not None
    assert stored["properties"]["note"] == "new"
    assert len(item_links(store)) == 1
    assert extent(store) == ([1.0, 1.0, 2.0, 2.0], ["2024-05-02T00:00:00Z", "2024-05-02T00:00:00Z"])


def test_extents_grow_when_a_second_item_is_added(store: StoreSettings) -> None:
    catalog = open_catalog(CATALOG, store)
    catalog.upsert_items(SCENES, [make_item("a", store, bbox=(10.0, 45.0, 11.0, 46.0))])
    assert extent(store) == ([10.0, 45.0, 11.0, 46.0], ["2024-05-01T00:00:00Z", "2024-05-01T00:00:00Z"])

    later = (T0 + dt.timedelta(days=3), T0 + dt.timedelta(days=4))
    catalog.upsert_items(SCENES, [make_item("b", store, bbox=(-5.0, 40.0, -4.0, 41.0), span=later)])
    assert extent(store) == ([-5.0, 40.0, 11.0, 46.0], ["2024-05-01T00:00:00Z", "2024-05-05T00:00:00Z"])


def test_delete_item_removes_it_and_shrinks_extents(store: StoreSettings) -> None:
    catalog = open_catalog(CATALOG, store)
    catalog.upsert_items(
        SCENES,
        [
            make_item("a", store, bbox=(10.0, 45.0, 11.0, 46.0)),
            make_item("b", store, bbox=(20.0, 30.0, 21.0, 31.0), when=T0 + dt.timedelta(days=9)),
        ],
    )
    assert catalog.delete_item("scenes", "b")
    assert catalog.get_item("scenes", "b") is None
    assert not (store.root / "catalog/scenes/b/b.json").exists()
    assert [link["href"] for link in item_links(store)] == ["./a/a.json"]
    assert extent(store) == ([10.0, 45.0, 11.0, 46.0], ["2024-05-01T00:00:00Z", "2024-05-01T00:00:00Z"])
    assert not catalog.delete_item("scenes", "b")
    assert not catalog.delete_item("nowhere", "b")


def test_parallel_upserts_from_threads_lose_no_link_or_extent(store: StoreSettings) -> None:
    others = CollectionConfig(id="others", title="Others")
    jobs = [(SCENES, make_item(f"s{i:02d}", store, bbox=(i, 0.0, i + 1.0, 1.0))) for i in range(20)]
    jobs += [(others, make_item(f"o{i}", store, collection="others")) for i in range(5)]

    def upsert(job: tuple[CollectionConfig, dict[str, Any]]) -> bool:
        config, item = job
        return open_catalog(CATALOG, store).upsert_items(config, [item])[0].created

    with ThreadPoolExecutor(max_workers=12) as pool:
        created = list(pool.map(upsert, jobs))

    assert all(created)
    assert sorted(link["href"] for link in item_links(store)) == [
        f"./s{i:02d}/s{i:02d}.json" for i in range(20)
    ]
    assert len(item_links(store, "others")) == 5
    assert extent(store)[0] == [0.0, 0.0, 20.0, 1.0]
    children = [
        link["href"] for link in read_json(store, "catalog/catalog.json")["links"] if link["rel"] == "child"
    ]
    assert sorted(children) == ["./others/collection.json", "./scenes/collection.json"]


def upsert_one_by_one(start: Event, store: StoreSettings, worker: int, count: int) -> None:
    """A registering process: ``count`` items of its own, upserted one call each."""
    catalog = open_catalog(CATALOG, store)
    start.wait()
    for i in range(count):
        n = worker * count + i
        item = make_item(
            f"w{worker}-{i:02d}",
            store,
            bbox=(-90.0 + n, -40.0 + worker, -89.5 + n, -30.0),
            when=T0 + dt.timedelta(hours=n),
        )
        assert catalog.upsert_items(SCENES, [item])[0].created


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_parallel_upserts_from_processes_keep_every_link_and_the_extent(
    kind: str, store: StoreSettings, request: pytest.FixtureRequest
) -> None:
    if kind == "s3":
        store = request.getfixturevalue("serial_s3_settings")
    workers, count = 4, 40
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Event()
    procs = [spawn.Process(target=upsert_one_by_one, args=(start, store, w, count)) for w in range(workers)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * workers

    expected = sorted(f"./w{w}-{i:02d}/w{w}-{i:02d}.json" for w in range(workers) for i in range(count))
    assert sorted(link["href"] for link in item_links(store)) == expected
    last = workers * count - 1
    assert extent(store) == (
        [-90.0, -40.0, -89.5 + last, -30.0],
        ["2024-05-01T00:00:00Z", pystac.utils.datetime_to_str(T0 + dt.timedelta(hours=last))],
    )
    children = [
        link["href"] for link in read_json(store, "catalog/catalog.json")["links"] if link["rel"] == "child"
    ]
    assert children == ["./scenes/collection.json"]
    assert len(open_catalog(CATALOG, store).search("scenes")) == workers * count


def test_search_by_time_bbox_and_ids(store: StoreSettings) -> None:
    catalog = open_catalog(CATALOG, store)
    day = dt.timedelta(days=1)
    catalog.upsert_items(
        SCENES,
        [
            make_item("alps", store, bbox=(10.0, 45.0, 11.0, 46.0), when=T0),
            make_item("andes", store, bbox=(-71.0, -33.0, -70.0, -32.0), when=T0 + 5 * day),
            make_item("fiji", store, bbox=(179.0, -17.0, -179.0, -16.0), span=(T0 + 2 * day, T0 + 8 * day)),
        ],
    )

    def ids(**query: Any) -> list[str]:
        return sorted(item["id"] for item in catalog.search("scenes", **query))

    assert ids() == ["alps", "andes", "fiji"]
    assert ids(start=T0 + day) == ["andes", "fiji"]
    assert ids(end=T0 + day) == ["alps"]
    assert ids(start=T0 + 6 * day, end=T0 + 7 * day) == ["fiji"]
    assert ids(start=dt.datetime(2024, 5, 6), end=dt.datetime(2024, 5, 6)) == ["andes", "fiji"]
    assert ids(bbox=(0.0, 40.0, 20.0, 50.0)) == ["alps"]
    assert ids(bbox=(-179.5, -20.0, -179.2, -10.0)) == ["fiji"]
    assert ids(bbox=(170.0, -90.0, -60.0, 90.0)) == ["andes", "fiji"]
    assert ids(ids=["alps", "fiji", "missing"], start=T0 + day) == ["fiji"]
    assert catalog.search("unknown-collection") == []

    (alps,) = catalog.search("scenes", ids=["alps"])
    assert alps["assets"]["data"]["href"] == open_store(store).url(cog_key("scenes", "alps"))


def test_collection_metadata_follows_config_and_root_links_each_collection_once(store: StoreSettings) -> None:
    catalog = open_catalog(CATALOG, store)
    catalog.ensure_collection(SCENES)
    catalog.upsert_items(SCENES, [make_item("a", store)])
    renamed = SCENES.model_copy(update={"title": "Renamed scenes", "keywords": ["test", "more"]})
    catalog.upsert_items(renamed, [make_item("b", store)])
    catalog.ensure_collection(renamed)

    doc = read_json(store, "catalog/scenes/collection.json")
    assert doc["title"] == "Renamed scenes"
    assert doc["description"] == "Scenes for tests"
    assert doc["keywords"] == ["test", "more"]
    children = [link for link in read_json(store, "catalog/catalog.json")["links"] if link["rel"] == "child"]
    assert [(c["href"], c["title"]) for c in children] == [("./scenes/collection.json", "Renamed scenes")]


def test_invalid_or_foreign_items_are_refused_before_anything_is_written(store: StoreSettings) -> None:
    catalog = open_catalog(CATALOG, store)
    with pytest.raises(CatalogError, match=r"'a'.*'others'"):
        catalog.upsert_items(SCENES, [make_item("a", store, collection="others")])
    broken = make_item("b", store)
    del broken["properties"]["datetime"]
    with pytest.raises(CatalogError, match="'b'"):
        catalog.upsert_items(SCENES, [broken])
    with pytest.raises(CatalogError, match="item id"):
        catalog.upsert_items(SCENES, [{**make_item("c", store), "id": "../escape"}])
    assert not (store.root / "catalog").exists()


def test_a_corrupt_collection_document_is_reported_by_name(store: StoreSettings) -> None:
    catalog = open_catalog(CATALOG, store)
    catalog.upsert_items(SCENES, [make_item("a", store)])
    open_store(store).put_bytes("catalog/scenes/collection.json", b"{not json")
    with pytest.raises(CatalogError, match="collection 'scenes'"):
        catalog.get_item("scenes", "a")


def test_existence_lookups(store: StoreSettings) -> None:
    open_catalog(CATALOG, store).upsert_items(SCENES, [make_item("a", store, bbox=(1.0, 2.0, 3.0, 4.0))])
    assert has_item("scenes", "a", CATALOG, store)
    assert not has_item("scenes", "zzz", CATALOG, store)
    assert not has_item("other", "a", CATALOG, store)
    pairs = [("scenes", "a"), ("scenes", "b"), ("other", "a")]
    assert find_existing_items(pairs, CATALOG, store) == {("scenes", "a")}


def test_an_item_written_without_its_link_does_not_count(store: StoreSettings) -> None:
    catalog = open_catalog(CATALOG, store)
    catalog.upsert_items(SCENES, [make_item("a", store)])
    orphan = read_json(store, "catalog/scenes/a/a.json")
    open_store(store).put_bytes("catalog/scenes/b/b.json", json.dumps({**orphan, "id": "b"}).encode())
    assert catalog.get_item("scenes", "b") is None
    assert [i["id"] for i in catalog.search("scenes")] == ["a"]
    (ref,) = catalog.upsert_items(SCENES, [make_item("b", store)])
    assert ref.created
    assert len(item_links(store)) == 2


def test_catalog_on_s3(s3_store_settings: StoreSettings, tmp_path: Path, float_utm: Path) -> None:
    store = s3_store_settings
    cog = put_cog(float_utm, store, "scenes", "utm-scene", tmp_path)
    product = Product(
        collection="scenes", id="utm-scene", source_key="landing/scenes/utm-scene.tif", datetime=T0
    )
    ref = register_product(product, cog, SCENES, CATALOG, store)
    assert ref.created
    assert ref.href == f"s3://{store.bucket}/catalog/scenes/utm-scene/utm-scene.json"
    assert not register_product(product, cog, SCENES, CATALOG, store).created

    keys = sorted(o.key for o in open_store(store).list("catalog/"))
    assert keys == [
        "catalog/catalog.json",
        "catalog/scenes/collection.json",
        "catalog/scenes/utm-scene/utm-scene.json",
    ]
    raw = read_json(store, "catalog/scenes/utm-scene/utm-scene.json")
    assert raw["assets"]["data"]["href"] == "../../../cogs/scenes/utm-scene.tif"

    catalog = open_catalog(CATALOG, store)
    item = catalog.get_item("scenes", "utm-scene")
    assert item is not None
    assert item["assets"]["data"]["href"] == f"s3://{store.bucket}/cogs/scenes/utm-scene.tif"
    assert [i["id"] for i in catalog.search("scenes", bbox=(9.0, 45.0, 9.2, 45.2), start=T0)] == ["utm-scene"]
    assert catalog.search("scenes", bbox=(0.0, 0.0, 1.0, 1.0)) == []
    assert has_item("scenes", "utm-scene", CATALOG, store)
    assert catalog.delete_item("scenes", "utm-scene")
    assert not has_item("scenes", "utm-scene", CATALOG, store)


def test_store_failures_become_catalog_errors_naming_the_collection(moto_endpoint: str) -> None:
    missing = StoreSettings(
        kind="s3",
        bucket="no-such-bucket-" + os.urandom(3).hex(),
        endpoint_url=moto_endpoint,
        access_key_id="test",
        secret_access_key="test",
    )
    catalog = StaticCatalog(CATALOG, missing)
    with pytest.raises(CatalogError, match="collection 'scenes'"):
        catalog.upsert_items(SCENES, [make_item("a", missing)])
    with pytest.raises(CatalogError, match="collection 'scenes'"):
        catalog.search("scenes")
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    assert missing.bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]


def visible_documents(root: Path) -> dict[str, bytes]:
    """Every catalog document a reader can see (hidden temporary and lock files left out)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted((root / "catalog").rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def test_a_registration_killed_mid_write_converges_on_rerun(tmp_path: Path) -> None:
    count = 60
    killed = StoreSettings(root=tmp_path / "killed")
    reference = StoreSettings(root=tmp_path / "reference")
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Event()
    proc = spawn.Process(target=upsert_one_by_one, args=(start, killed, 0, count))
    proc.start()
    start.set()
    doc = tmp_path / "killed" / "catalog" / "scenes" / "collection.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.is_alive():
        if doc.exists() and len(item_links(killed)) >= 10:
            break
        time.sleep(0.005)
    proc.kill()  # SIGKILL, wherever the writer is
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert 10 <= len(item_links(killed)) < count

    for target in (killed, reference):
        catalog = open_catalog(CATALOG, target)
        for i in range(count):
            item = make_item(
                f"w0-{i:02d}",
                target,
                bbox=(-90.0 + i, -40.0, -89.5 + i, -30.0),
                when=T0 + dt.timedelta(hours=i),
            )
            catalog.upsert_items(SCENES, [item])

    got = visible_documents(tmp_path / "killed")
    want = visible_documents(tmp_path / "reference")
    assert sorted(got) == sorted(want)
    for name, data in want.items():
        if name.endswith("collection.json") or name.endswith("catalog.json"):
            assert json.loads(got[name]) == json.loads(data.replace(b"/reference/", b"/killed/")), name
    assert sorted(link["href"] for link in item_links(killed)) == sorted(
        f"./w0-{i:02d}/w0-{i:02d}.json" for i in range(count)
    )
    assert len(open_catalog(CATALOG, killed).search("scenes")) == count
    assert [p for p in (tmp_path / "killed").rglob(".*") if p.name.endswith(".part")] == []
    # a writer killed between creating its file and locking it leaves a ".new" file, which the next
    # writer in that folder removes once it is older than STALE_NEW_SECONDS (it may be a live one)
    unlocked = [p for p in (tmp_path / "killed").rglob(".*") if p.name.endswith(".new")]
    assert len(unlocked) <= 1
    for path in unlocked:
        assert time.time() - path.stat().st_mtime < STALE_NEW_SECONDS
        old = time.time() - 2 * STALE_NEW_SECONDS
        os.utime(path, (old, old))
        sweep = spawn.Process(target=sweep_dead_writes, args=(path.parent,))
        sweep.start()
        sweep.join(60)
        assert not path.exists()

from __future__ import annotations

import datetime as dt
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import LimitSettings, StoreSettings
from skyvault.discovery.landing import discover, products_from_report
from skyvault.errors import ConfigError, ObjectNotFoundError, ReportError, UnknownCollectionError
from skyvault.models import Discovery, Product
from skyvault.storage.store import ObjectStore, S3Store, open_store
from tests.discovery.test_reports import BILLION_LAUGHS, EXTERNAL_ENTITY, FOOTPRINT, RECTIFIED, browse, report

UTC = dt.UTC


def collections(*configs: CollectionConfig) -> dict[str, CollectionConfig]:
    return {c.id: c for c in configs} if configs else {"scenes": CollectionConfig(id="scenes")}


def sidecar(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    if request.param == "local":
        return StoreSettings(root=tmp_path / "store")
    settings: StoreSettings = request.getfixturevalue("s3_store_settings")
    return settings


@pytest.fixture
def local(tmp_path: Path) -> StoreSettings:
    return StoreSettings(root=tmp_path / "store")


def put(settings: StoreSettings, objects: dict[str, bytes]) -> ObjectStore:
    store = open_store(settings)
    for key, data in objects.items():
        store.put_bytes(key, data)
    return store


def snapshot(store: ObjectStore) -> dict[str, tuple[bytes, dt.datetime]]:
    return {o.key: (store.get_bytes(o.key), o.last_modified) for o in store.list("landing/")}


def by_id(discovery: Discovery) -> dict[str, Product]:
    return {p.id: p for p in discovery.products}


def test_reports_sidecars_and_plain_rasters_become_products(any_store: StoreSettings) -> None:
    store = put(
        any_store,
        {
            "landing/scenes/A.tif": b"a",
            "landing/scenes/B.tif": b"b",
            "landing/scenes/pair.xml": report(
                browse("A.tif", RECTIFIED, identifier="S2A_20260601", rsi="EPSG: 4326"),
                browse("B.tif", FOOTPRINT, start="2026-06-02T08:00:00", end="2026-06-02T08:01:00"),
            ),
            "landing/scenes/C.tif": b"c",
            "landing/scenes/C.json": sidecar(
                collection_id="scenes", date="2026-05-01", name="C_item", properties={"platform": "x"}
            ),
            "landing/scenes/sub/D.tif": b"d",
            "landing/scenes/notes.txt": b"not a raster",
            "landing/scenes/A.tif.aux.xml": b"<PAMDataset/>",
        },
    )
    before = snapshot(store)
    found = discover(any_store, collections())
    assert found.failures == []
    assert [p.id for p in found.products] == ["B", "C_item", "D", "S2A_20260601"]
    products = by_id(found)

    a = products["S2A_20260601"]
    assert (a.source_key, a.sidecar_key) == ("landing/scenes/A.tif", "landing/scenes/pair.xml")
    assert a.datetime == a.start_datetime == dt.datetime(2026, 6, 1, 10, tzinfo=UTC)
    assert a.end_datetime == dt.datetime(2026, 6, 1, 10, 0, 30, tzinfo=UTC)
    assert a.crs_hint == "EPSG:4326"
    assert a.properties["browse:georeference"] == {
        "kind": "rectifiedBrowse",
        "coordList": [45.0, 10.0, 46.0, 11.0],
    }
    assert a.properties["browse:type"] == "OPTICAL"
    assert a.properties["browse:responsible_org_name"] == "ESA"

    b = products["B"]
    assert b.start_datetime == dt.datetime(2026, 6, 2, 8, tzinfo=UTC)
    assert b.properties["browse:georeference"]["kind"] == "footprint"
    assert "browse:identifier" not in b.properties

    c = products["C_item"]
    assert (c.source_key, c.sidecar_key) == ("landing/scenes/C.tif", "landing/scenes/C.json")
    assert c.datetime == dt.datetime(2026, 5, 1, tzinfo=UTC)
    assert c.start_datetime is None
    assert c.properties == {"platform": "x"}

    d = products["D"]
    assert (d.source_key, d.sidecar_key, d.datetime, d.properties) == (
        "landing/scenes/sub/D.tif",
        None,
        None,
        {},
    )

    assert discover(any_store, collections()) == found
    assert snapshot(store) == before


def test_browse_naming_a_missing_file_is_a_failure_naming_both(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/scenes/here.tif": b"x",
            "landing/scenes/r.xml": report(browse("here.tif"), browse("gone.tif", identifier="GONE")),
        },
    )
    found = discover(local, collections())
    assert [p.id for p in found.products] == ["here"]
    (failure,) = found.failures
    assert failure.key == "landing/scenes/r.xml"
    assert "gone.tif" in failure.message
    assert "landing/scenes/gone.tif" in failure.message
    assert "GONE" in failure.message


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (BILLION_LAUGHS, "refused"),
        (EXTERNAL_ENTITY, "refused"),
        (b"<rep:browseReport", "not well-formed"),
        (report(browse("bad.tif", "")), "no geo-reference"),
    ],
    ids=["bomb", "xxe", "malformed", "rejected-browse"],
)
def test_one_bad_report_fails_alone(local: StoreSettings, bad: bytes, expected: str) -> None:
    put(
        local,
        {
            "landing/scenes/bad.tif": b"x",
            "landing/scenes/bad.xml": bad,
            "landing/scenes/good.tif": b"x",
            "landing/scenes/good.xml": report(browse("good.tif", identifier="GOOD")),
        },
    )
    found = discover(local, collections())
    assert [p.id for p in found.products] == ["GOOD"]
    (failure,) = found.failures
    assert failure.key == "landing/scenes/bad.xml"
    assert "landing/scenes/bad.xml" in failure.message
    assert expected in failure.message
    assert "root:" not in failure.message


def test_sidecar_problems_are_failures(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/scenes/ok.tif": b"x",
            "landing/scenes/ok.json": sidecar(date="2026-05-01T00:00:00Z"),
            "landing/scenes/when.tif": b"x",
            "landing/scenes/when.json": sidecar(name="WHEN", date="last tuesday"),
            "landing/scenes/other.tif": b"x",
            "landing/scenes/other.json": sidecar(collection_id="dem", filename="other.tif"),
            "landing/scenes/lonely.json": sidecar(date="2026-05-01"),
        },
    )
    found = discover(local, collections())
    assert [(p.id, p.datetime) for p in found.products] == [("ok", dt.datetime(2026, 5, 1, tzinfo=UTC))]
    messages = {f.key: f.message for f in found.failures}
    assert set(messages) == {
        "landing/scenes/when.json",
        "landing/scenes/other.json",
        "landing/scenes/lonely.json",
    }
    assert "product 'WHEN'" in messages["landing/scenes/when.json"]
    assert "last tuesday" in messages["landing/scenes/when.json"]
    assert "'dem'" in messages["landing/scenes/other.json"]
    assert "landing/scenes/" in messages["landing/scenes/other.json"]
    assert "no raster with its stem" in messages["landing/scenes/lonely.json"]


def test_unsafe_names_are_failures_never_products(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/scenes/good.tif": b"x",
            "landing/scenes/a..b.tif": b"x",
            "landing/scenes/with space.tif": b"x",
            "landing/scenes/ümlaut.tif": b"x",
            "landing/scenes/r.tif": b"x",
            "landing/scenes/r.xml": report(browse("r.tif", identifier="../../etc/passwd")),
            "landing/scenes/s.tif": b"x",
            "landing/scenes/s.json": sidecar(name="x/y"),
            "landing/scenes/up.xml": report(browse("../elsewhere/x.tif")),
        },
    )
    found = discover(local, collections())
    assert [p.id for p in found.products] == ["good"]
    messages = {f.key: f.message for f in found.failures}
    assert "'a..b'" in messages["landing/scenes/a..b.tif"]
    assert "'with space'" in messages["landing/scenes/with space.tif"]
    assert "'ümlaut'" in messages["landing/scenes/ümlaut.tif"]
    assert "'../../etc/passwd'" in messages["landing/scenes/r.xml"]
    assert "'x/y'" in messages["landing/scenes/s.json"]
    assert "'../elsewhere/x.tif'" in messages["landing/scenes/up.xml"]
    assert len(found.failures) == 6


def test_unknown_collection_folder_gives_one_failure_per_raster(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/scenes/a.tif": b"x",
            "landing/mystery/x.tif": b"x",
            "landing/mystery/y.tif": b"x",
            "landing/mystery/y.xml": report(browse("y.tif")),
            "landing/stray.tif": b"x",
        },
    )
    found = discover(local, collections())
    assert [p.id for p in found.products] == ["a"]
    assert [(f.collection, f.key) for f in found.failures] == [
        ("", "landing/stray.tif"),
        ("mystery", "landing/mystery/x.tif"),
        ("mystery", "landing/mystery/y.tif"),
    ]
    assert all("unknown collection 'mystery'" in f.message for f in found.failures[1:])
    with pytest.raises(UnknownCollectionError, match="'mystery'"):
        discover(local, collections(), collection="mystery")
    only = discover(local, collections(), collection="scenes")
    assert ([p.id for p in only.products], only.failures) == (["a"], [])


def test_duplicate_ids_are_one_failure_and_no_product(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/scenes/2025/x.tif": b"x",
            "landing/scenes/2026/x.tif": b"x",
            "landing/scenes/p.tif": b"x",
            "landing/scenes/q.tif": b"x",
            "landing/scenes/pq.xml": report(
                browse("p.tif", identifier="SAME"), browse("q.tif", identifier="SAME")
            ),
            "landing/scenes/unique.tif": b"x",
        },
    )
    found = discover(local, collections())
    assert [p.id for p in found.products] == ["unique"]
    assert len(found.failures) == 2
    dup_x = next(f for f in found.failures if "'x'" in f.message)
    assert "landing/scenes/2025/x.tif" in dup_x.message
    assert "landing/scenes/2026/x.tif" in dup_x.message
    dup_same = next(f for f in found.failures if "'SAME'" in f.message)
    assert "landing/scenes/p.tif" in dup_same.message
    assert "landing/scenes/q.tif" in dup_same.message


def test_raster_described_twice_is_a_failure(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/scenes/x.tif": b"x",
            "landing/scenes/x.json": sidecar(date="2026-01-01"),
            "landing/scenes/x.xml": report(browse("x.tif", identifier="X")),
        },
    )
    found = discover(local, collections())
    assert found.products == []
    (failure,) = found.failures
    assert failure.key == "landing/scenes/x.tif"
    assert "x.json" in failure.message
    assert "x.xml" in failure.message


def _age(settings: StoreSettings, key: str, when: dt.datetime) -> None:
    path = settings.root / key
    os.utime(path, (when.timestamp(), when.timestamp()))


def test_since_keeps_only_what_changed(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/scenes/old.tif": b"x",
            "landing/scenes/old_new_sidecar.tif": b"x",
            "landing/scenes/old_new_sidecar.json": sidecar(date="2026-01-01"),
            "landing/scenes/old_sidecar.tif": b"x",
            "landing/scenes/old_sidecar.json": sidecar(date="2026-01-01"),
            "landing/scenes/new.tif": b"x",
            "landing/scenes/old_bad.tif": b"x",
            "landing/scenes/old_bad.xml": b"<broken",
            "landing/scenes/new_bad.xml": b"<broken",
        },
    )
    cutoff = dt.datetime(2026, 1, 1, tzinfo=UTC)
    long_ago = cutoff - dt.timedelta(days=30)
    for key in [
        "old.tif",
        "old_new_sidecar.tif",
        "old_sidecar.tif",
        "old_sidecar.json",
        "old_bad.tif",
        "old_bad.xml",
    ]:
        _age(local, f"landing/scenes/{key}", long_ago)

    found = discover(local, collections(), since=cutoff)
    assert [p.id for p in found.products] == ["new", "old_new_sidecar"]
    assert [f.key for f in found.failures] == ["landing/scenes/new_bad.xml"]

    naive = discover(local, collections(), since=cutoff.replace(tzinfo=None))
    assert naive == found
    everything = discover(local, collections())
    assert [p.id for p in everything.products] == ["new", "old", "old_new_sidecar", "old_sidecar"]
    assert [f.key for f in everything.failures] == [
        "landing/scenes/new_bad.xml",
        "landing/scenes/old_bad.xml",
    ]


def test_glob_and_regex_patterns_and_override(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/glob/S2_20260601_B04.tif": b"x",
            "landing/glob/2026/S2_20260602_B04.tif": b"x",
            "landing/glob/S2_20260601_B03.tif": b"x",
            "landing/rx/S2_20260601.tif": b"x",
            "landing/rx/S2_2026060.tif": b"x",
            "landing/rx/sub/S2_20260603.tif": b"x",
            "landing/rx/S2_20260601.tif.bak": b"x",
        },
    )
    colls = collections(
        CollectionConfig(id="glob", pattern="*_B04.tif"),
        CollectionConfig(id="rx", pattern=r"(sub/)?S2_\d{8}\.tif", pattern_kind="regex"),
    )
    found = discover(local, colls)
    assert found.failures == []
    assert [(p.collection, p.source_key) for p in found.products] == [
        ("glob", "landing/glob/S2_20260601_B04.tif"),
        ("glob", "landing/glob/2026/S2_20260602_B04.tif"),
        ("rx", "landing/rx/S2_20260601.tif"),
        ("rx", "landing/rx/sub/S2_20260603.tif"),
    ]
    narrowed = discover(local, colls, collection="rx", pattern=r"S2_\d{8}\.tif")
    assert [p.source_key for p in narrowed.products] == ["landing/rx/S2_20260601.tif"]
    glob_override = discover(local, colls, collection="glob", pattern="2026/*")
    assert [p.id for p in glob_override.products] == ["S2_20260602_B04"]
    with pytest.raises(ConfigError, match=r"invalid regex pattern '\('"):
        discover(local, colls, collection="rx", pattern="(")


def test_browse_outside_the_pattern(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/scenes/a.tif": b"x",
            "landing/scenes/b.jp2": b"x",
            "landing/scenes/r.xml": report(browse("a.tif", identifier="A"), browse("b.jp2", identifier="B")),
        },
    )
    found = discover(local, collections())
    assert [p.id for p in found.products] == ["A"]
    (failure,) = found.failures
    assert "b.jp2" in failure.message
    assert "does not match the collection pattern '*.tif'" in failure.message
    narrowed = discover(local, collections(), pattern="a*")
    assert ([p.id for p in narrowed.products], narrowed.failures) == (["A"], [])


def test_products_from_one_report(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/scenes/a.tif": b"x",
            "landing/scenes/b.jp2": b"x",
            "landing/scenes/r.xml": report(
                browse("a.tif", identifier="A"), browse("b.jp2", identifier="B"), browse("c.tif")
            ),
            "landing/scenes/unrelated.tif": b"x",
            "landing/scenes/d.tif": b"x",
            "landing/scenes/d.json": sidecar(date="2026-03-04T05:06:07Z"),
            "landing/scenes/bomb.xml": BILLION_LAUGHS,
            "landing/mystery/m.xml": report(browse("m.tif")),
        },
    )
    colls = collections()
    one = products_from_report(local, colls, "landing/scenes/r.xml")
    assert [p.id for p in one.products] == ["A", "B"]
    assert all(p.sidecar_key == "landing/scenes/r.xml" for p in one.products)
    (failure,) = one.failures
    assert "landing/scenes/c.tif" in failure.message

    (d,) = products_from_report(local, colls, "landing/scenes/d.json").products
    assert (d.id, d.source_key, d.datetime) == (
        "d",
        "landing/scenes/d.tif",
        dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC),
    )

    bomb = products_from_report(local, colls, "landing/scenes/bomb.xml")
    assert bomb.products == []
    assert "refused" in bomb.failures[0].message

    with pytest.raises(UnknownCollectionError, match=r"landing/mystery/m\.xml"):
        products_from_report(local, colls, "landing/mystery/m.xml")
    with pytest.raises(ObjectNotFoundError, match=r"landing/scenes/nope\.xml"):
        products_from_report(local, colls, "landing/scenes/nope.xml")
    for key in ["landing/scenes/../r.xml", "cogs/scenes/r.xml", "landing/scenes/a.tif"]:
        with pytest.raises(ReportError, match="report"):
            products_from_report(local, colls, key)


def test_s3_discovery_beyond_1000_objects(s3_store_settings: StoreSettings) -> None:
    store = open_store(s3_store_settings)
    assert isinstance(store, S3Store)
    keys = [f"landing/scenes/T{i:05d}.tif" for i in range(1001)]

    def put_one(key: str) -> None:
        store._client.put_object(Bucket=store.bucket, Key=key, Body=b"x")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put_one, keys))
    store.put_bytes("landing/scenes/T01000.json", sidecar(date="2026-02-03", name="LAST"))
    found = discover(s3_store_settings, collections())
    assert found.failures == []
    assert len(found.products) == 1001
    assert found.products[0].id == "LAST"
    assert found.products[0].sidecar_key == "landing/scenes/T01000.json"
    assert found.products[1].id == "T00000"
    assert found.products[-1].id == "T00999"


def test_duplicate_with_an_unchanged_product_is_still_caught_with_since(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/scenes/2025/x.tif": b"x",
            "landing/scenes/2025/x.xml": report(browse("x.tif", identifier="SCENE")),
            "landing/scenes/2026/y.tif": b"x",
            "landing/scenes/2026/y.json": sidecar(name="SCENE"),
        },
    )
    cutoff = dt.datetime(2026, 1, 1, tzinfo=UTC)
    for key in ["2025/x.tif", "2025/x.xml"]:
        _age(local, f"landing/scenes/{key}", cutoff - dt.timedelta(days=1))
    found = discover(local, collections(), since=cutoff)
    assert found.products == []
    (failure,) = found.failures
    assert "duplicate product id 'SCENE'" in failure.message
    assert "landing/scenes/2025/x.tif" in failure.message


def test_sidecar_without_filename_prefers_the_raster_among_same_stem_files(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/scenes/x.tif": b"x",
            "landing/scenes/x.md5": b"d41d8cd98f00b204e9800998ecf8427e",
            "landing/scenes/x.json": sidecar(date="2026-01-02"),
        },
    )
    (product,) = discover(local, collections()).products
    assert (product.source_key, product.sidecar_key) == ("landing/scenes/x.tif", "landing/scenes/x.json")
    (single,) = products_from_report(local, collections(), "landing/scenes/x.json").products
    assert single == product


def test_deep_and_oversized_sidecars_fail_alone_naming_the_limit(any_store: StoreSettings) -> None:
    deep = b'{"name": "DEEP_1", "properties": ' + b"[" * 900 + b"]" * 900 + b"}"
    put(
        any_store,
        {
            "landing/scenes/DEEP_1.tif": b"x",
            "landing/scenes/DEEP_1.json": deep,
            "landing/scenes/BIG_1.tif": b"x",
            "landing/scenes/BIG_1.json": sidecar(name="BIG_1", properties={"pad": "x" * 5000}),
            "landing/scenes/BIGXML_1.tif": b"x",
            "landing/scenes/BIGXML_1.xml": report(*[browse("BIGXML_1.tif")] * 20),
            "landing/scenes/GOOD_1.tif": b"x",
            "landing/scenes/GOOD_1.json": sidecar(name="GOOD_1", date="2026-05-01"),
        },
    )
    found = discover(any_store, collections(), limits=LimitSettings(max_sidecar_bytes=4096))
    assert [p.id for p in found.products] == ["GOOD_1"]
    messages = {f.key: f.message for f in found.failures}
    assert set(messages) == {
        "landing/scenes/DEEP_1.json",
        "landing/scenes/BIG_1.json",
        "landing/scenes/BIGXML_1.xml",
    }
    assert "limits.max_nesting_depth = 64" in messages["landing/scenes/DEEP_1.json"]
    assert "limits.max_sidecar_bytes = 4096" in messages["landing/scenes/BIG_1.json"]
    assert "limits.max_sidecar_bytes = 4096" in messages["landing/scenes/BIGXML_1.xml"]

    one = products_from_report(any_store, collections(), "landing/scenes/DEEP_1.json")
    assert one.products == []
    assert [f.key for f in one.failures] == ["landing/scenes/DEEP_1.json"]


def test_links_out_of_a_local_store_fail_their_product_naming_the_key(
    local: StoreSettings, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.tif").write_bytes(b"not yours")
    (outside / "secret.json").write_bytes(sidecar(name="SECRET", filename="LINKED_1.tif"))
    store = put(local, {"landing/scenes/GOOD_1.tif": b"x", "landing/scenes/inside.tif": b"y"})
    folder = local.root / "landing" / "scenes"
    os.symlink(outside / "secret.tif", folder / "LINKED_1.tif")
    os.symlink(outside / "secret.json", folder / "LINKED_1.json")
    os.symlink(folder / "inside.tif", folder / "ALIAS_1.tif")

    found = discover(local, collections())

    assert [p.id for p in found.products] == ["ALIAS_1", "GOOD_1", "inside"]
    (failure,) = found.failures
    assert failure.key == "landing/scenes/LINKED_1.json"
    assert "outside the store root" in failure.message
    assert "not yours" not in failure.message
    assert store.get_bytes("landing/scenes/ALIAS_1.tif") == b"y"
    single = products_from_report(local, collections(), "landing/scenes/LINKED_1.json")
    assert single.products == []
    assert "'landing/scenes/LINKED_1.json'" in single.failures[0].message


def test_underscore_leading_ids_are_products_and_unsafe_ones_still_fail(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/scenes/_plain.tif": b"x",
            "landing/scenes/b.tif": b"x",
            "landing/scenes/b.xml": report(browse("b.tif", RECTIFIED, identifier="_B_20260601")),
            "landing/scenes/c.tif": b"x",
            "landing/scenes/c.xml": report(browse("c.tif", identifier="..")),
            "landing/scenes/d.tif": b"x",
            "landing/scenes/d.xml": report(browse("d.tif", identifier="_/d")),
            "landing/scenes/-dash.tif": b"x",
        },
    )
    found = discover(local, collections())
    assert [p.id for p in found.products] == ["_B_20260601", "_plain"]
    messages = {f.key: f.message for f in found.failures}
    assert "'..'" in messages["landing/scenes/c.xml"]
    assert "'_/d'" in messages["landing/scenes/d.xml"]
    assert "'-dash'" in messages["landing/scenes/-dash.tif"]
    assert len(found.failures) == 3


def test_browse_products_carry_their_placement(local: StoreSettings) -> None:
    put(
        local,
        {
            "landing/scenes/a.tif": b"x",
            "landing/scenes/b.tif": b"x",
            "landing/scenes/r.xml": report(
                browse("a.tif", FOOTPRINT, identifier="A", rsi="EPSG: 32631"),
                browse("b.tif", identifier="B"),
            ),
        },
    )
    products = by_id(discover(local, collections()))
    a = products["A"]
    assert a.crs_hint == "EPSG:32631"
    assert a.georeference is not None
    assert a.georeference.kind == "footprint"
    assert a.georeference.col_rows == (0, 0, 255, 0, 255, 255, 0, 255, 0, 0)
    assert a.georeference.coords == (46, 10, 46, 11, 45, 11, 45, 10, 46, 10)
    b = products["B"]
    assert b.georeference is not None
    assert b.georeference.kind == "modelInGeotiff"
    # the placement survives the trip through a task parameter or a COG record
    assert Product.model_validate_json(a.model_dump_json()) == a

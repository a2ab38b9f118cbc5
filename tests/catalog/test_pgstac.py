from __future__ import annotations

import datetime as dt
import multiprocessing
import socket
import time
from multiprocessing.synchronize import Event
from typing import Any

import psycopg
import pytest

from skyvault.catalog.pgstac import PgstacCatalog, public_dsn
from skyvault.catalog.registration import open_catalog
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import CatalogSettings, StoreSettings
from skyvault.errors import CatalogError, ItemsRejectedError, TransientCatalogError
from tests.catalog.items import stac_item, stamp

SCENES = CollectionConfig(
    id="scenes", title="Test scenes", description="Scenes for tests", license="CC-BY-4.0", keywords=["test"]
)
T0 = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def make_item(
    item_id: str,
    bbox: tuple[float, float, float, float] = (10.0, 45.0, 11.0, 46.0),
    when: dt.datetime | None = T0,
    span: tuple[dt.datetime, dt.datetime] | None = None,
    collection: str = "scenes",
    **props: Any,
) -> dict[str, Any]:
    return stac_item(
        item_id,
        collection,
        bbox=bbox,
        when=when,
        span=span,
        href=f"s3://bucket/cogs/{collection}/{item_id}.tif",
        **props,
    )


def settings(dsn: str, **overrides: Any) -> CatalogSettings:
    return CatalogSettings(backend="pgstac", dsn=dsn, **overrides)


def catalog(dsn: str, **overrides: Any) -> PgstacCatalog:
    backend = open_catalog(settings(dsn, **overrides), StoreSettings())
    assert isinstance(backend, PgstacCatalog)
    return backend


def sql(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description is not None else []


def rows_of(dsn: str, item_id: str) -> list[tuple[Any, ...]]:
    return sql(
        dsn,
        "SELECT datetime, end_datetime, tableoid::regclass::text FROM pgstac.items"
        " WHERE collection = 'scenes' AND id = %s",
        item_id,
    )


def extent(dsn: str, collection: str = "scenes") -> dict[str, Any]:
    ((content,),) = sql(dsn, "SELECT content FROM pgstac.collections WHERE id = %s", collection)
    value: dict[str, Any] = content["extent"]
    return value


def test_upserted_items_are_stored_searchable_and_covered_by_the_extent(pgstac_dsn: str) -> None:
    cat = catalog(pgstac_dsn)
    items = [
        make_item("alps", bbox=(10.0, 45.0, 11.0, 46.0), when=T0),
        make_item("andes", bbox=(-71.0, -33.0, -70.0, -32.0), when=T0 + 5 * DAY),
        make_item("fiji", bbox=(179.0, -17.0, -179.0, -16.0), span=(T0 + 2 * DAY, T0 + 40 * DAY)),
    ]
    refs = cat.upsert_items(SCENES, items)

    assert [(r.item_id, r.collection, r.created) for r in refs] == [
        ("alps", "scenes", True),
        ("andes", "scenes", True),
        ("fiji", "scenes", True),
    ]
    assert refs[0].datetime == T0
    assert refs[0].bbox == (10.0, 45.0, 11.0, 46.0)
    assert refs[0].href == f"{public_dsn(pgstac_dsn)}#scenes/alps"
    assert sql(pgstac_dsn, "SELECT id FROM pgstac.items ORDER BY id") == [("alps",), ("andes",), ("fiji",)]

    stored = {item["id"]: item for item in cat.search("scenes")}
    assert stored == {item["id"]: item for item in items}  # geometry, times, assets and links intact
    assert cat.get_item("scenes", "andes") == items[1]
    assert cat.get_item("scenes", "nope") is None
    assert cat.get_item("nowhere", "andes") is None
    assert cat.existing_ids("scenes", ["alps", "nope", "fiji"]) == {"alps", "fiji"}

    def ids(**query: Any) -> list[str]:
        return [item["id"] for item in cat.search("scenes", **query)]

    assert ids() == ["alps", "andes", "fiji"]
    assert ids(start=T0 + DAY) == ["andes", "fiji"]
    assert ids(end=T0 + DAY) == ["alps"]
    assert ids(start=T0 + 6 * DAY, end=T0 + 7 * DAY) == ["fiji"]
    assert ids(start=(T0 + 5 * DAY).replace(tzinfo=None), end=(T0 + 5 * DAY).replace(tzinfo=None)) == [
        "andes",
        "fiji",
    ]
    assert ids(bbox=(9.0, 44.0, 10.5, 45.5)) == ["alps"]
    assert ids(bbox=(-72.0, -34.0, -71.0, -33.0)) == ["andes"]  # touching corners meet
    assert ids(bbox=(170.0, -20.0, -175.0, -10.0)) == ["fiji"]  # across the antimeridian
    assert ids(bbox=(-178.5, -20.0, -175.0, -10.0)) == []
    assert ids(bbox=(0.0, 0.0, 1.0, 1.0)) == []
    assert ids(ids=["andes", "fiji", "nope"], bbox=(-180.0, -90.0, 0.0, 90.0)) == ["andes", "fiji"]
    assert ids(ids=[]) == []
    assert cat.search("nowhere") == []

    ext = extent(pgstac_dsn)
    assert ext["spatial"]["bbox"] == [[-180.0, -33.0, 180.0, 46.0]]
    assert ext["temporal"]["interval"] == [[stamp(T0), stamp(T0 + 40 * DAY)]]
    ((title, license_, keywords),) = sql(
        pgstac_dsn,
        "SELECT content->>'title', content->>'license', content->'keywords' FROM pgstac.collections",
    )
    assert (title, license_, keywords) == ("Test scenes", "CC-BY-4.0", ["test"])

    # the config refreshes the collection's metadata, never its extent
    cat.ensure_collection(SCENES.model_copy(update={"title": "Renamed", "keywords": []}))
    ((content,),) = sql(pgstac_dsn, "SELECT content FROM pgstac.collections")
    assert (content["title"], "keywords" in content, content["extent"]) == ("Renamed", False, ext)


def test_reupsert_creates_nothing_and_a_datetime_moved_to_another_month_leaves_one_row(
    pgstac_dsn: str,
) -> None:
    cat = catalog(pgstac_dsn)
    jan31 = dt.datetime(2024, 1, 31, 23, 30, tzinfo=dt.UTC)
    items = [make_item("a", when=jan31), make_item("b", when=jan31 - DAY)]
    assert [r.created for r in cat.upsert_items(SCENES, items)] == [True, True]
    assert [r.created for r in cat.upsert_items(SCENES, items)] == [False, False]
    assert sql(pgstac_dsn, "SELECT count(*) FROM pgstac.items") == [(2,)]
    ((old_partition,),) = [row[2:] for row in rows_of(pgstac_dsn, "a")]

    feb1 = dt.datetime(2024, 2, 1, 0, 30, tzinfo=dt.UTC)
    moved = make_item("a", bbox=(12.0, 47.0, 13.0, 48.0), when=feb1)
    (ref,) = cat.upsert_items(SCENES, [moved])

    assert ref.created is False
    assert ref.datetime == feb1
    ((when, end, partition),) = rows_of(pgstac_dsn, "a")
    assert (when, end) == (feb1, feb1)
    assert partition != old_partition
    assert sql(pgstac_dsn, "SELECT count(*) FROM pgstac.items") == [(2,)]
    assert cat.get_item("scenes", "a") == moved
    assert [i["id"] for i in cat.search("scenes", start=jan31 - dt.timedelta(hours=1), end=jan31)] == []
    assert extent(pgstac_dsn) == {
        "spatial": {"bbox": [[10.0, 45.0, 13.0, 48.0]]},
        "temporal": {"interval": [[stamp(jan31 - DAY), stamp(feb1)]]},
    }

    # deleting follows the extent too
    assert cat.delete_item("scenes", "a") is True
    assert cat.delete_item("scenes", "a") is False
    assert cat.delete_item("nowhere", "a") is False
    assert rows_of(pgstac_dsn, "a") == []
    assert extent(pgstac_dsn) == {
        "spatial": {"bbox": [[10.0, 45.0, 11.0, 46.0]]},
        "temporal": {"interval": [[stamp(jan31 - DAY), stamp(jan31 - DAY)]]},
    }


def test_an_item_stored_by_another_writer_after_the_read_is_updated_not_doubled(
    pgstac_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cat = catalog(pgstac_dsn)
    cat.upsert_items(SCENES, [make_item("a")])
    real_rows = PgstacCatalog._rows
    reads: list[int] = []

    def read_before_the_other_writer(conn: Any, collection_id: str, item_ids: Any) -> Any:
        reads.append(1)
        # the first read of the batch sees the collection as it was before "a" arrived
        return {} if len(reads) == 1 else real_rows(conn, collection_id, item_ids)

    monkeypatch.setattr(PgstacCatalog, "_rows", staticmethod(read_before_the_other_writer))
    changed = make_item("a", bbox=(20.0, 40.0, 21.0, 41.0))

    refs = cat.upsert_items(SCENES, [changed, make_item("b")])

    assert [r.item_id for r in refs] == ["a", "b"]
    assert [len(rows_of(pgstac_dsn, i)) for i in ("a", "b")] == [1, 1]
    assert cat.get_item("scenes", "a") == changed
    # the batch is loaded again as a whole, not taken for a refused one and loaded item by item
    assert not [r for r in caplog.records if "refused" in r.getMessage()]


def test_duplicate_ids_in_one_batch_the_last_one_wins(pgstac_dsn: str) -> None:
    cat = catalog(pgstac_dsn)
    first = make_item("dup", bbox=(1.0, 1.0, 2.0, 2.0), when=T0)
    other = make_item("other", when=T0)
    last = make_item("dup", bbox=(3.0, 3.0, 4.0, 4.0), when=T0 + 40 * DAY)

    refs = cat.upsert_items(SCENES, [first, other, last])

    assert [(r.item_id, r.created) for r in refs] == [("other", True), ("dup", True)]
    assert rows_of(pgstac_dsn, "dup") == [
        (T0 + 40 * DAY, T0 + 40 * DAY, rows_of(pgstac_dsn, "dup")[0][2]),
    ]
    assert cat.get_item("scenes", "dup") == last


def test_invalid_items_are_refused_by_id_and_the_others_written(pgstac_dsn: str) -> None:
    cat = catalog(pgstac_dsn)
    no_geometry = {**make_item("no-geometry"), "geometry": None}
    reversed_span = make_item("reversed", span=(T0 + DAY, T0))  # pypgstac refuses it
    nul_byte = make_item("nul-byte", note="a\x00b")  # PostgreSQL refuses it mid-load
    good = [make_item("good-1"), make_item("good-2", when=T0 + 31 * DAY)]

    with pytest.raises(ItemsRejectedError) as info:
        cat.upsert_items(SCENES, [good[0], no_geometry, reversed_span, nul_byte, good[1]])

    err = info.value
    assert err.collection_id == "scenes"
    assert set(err.errors) == {"no-geometry", "reversed", "nul-byte"}
    assert "geometry" in err.errors["no-geometry"]
    assert [(r.item_id, r.created) for r in err.written] == [("good-1", True), ("good-2", True)]
    assert sql(pgstac_dsn, "SELECT id FROM pgstac.items ORDER BY id") == [("good-1",), ("good-2",)]
    assert extent(pgstac_dsn)["temporal"]["interval"] == [[stamp(T0), stamp(T0 + 31 * DAY)]]

    with pytest.raises(ItemsRejectedError) as info:
        cat.upsert_items(SCENES, [no_geometry])
    assert info.value.written == []


def upsert_worker(start: Event, dsn: str, worker: int, count: int, overlap: int) -> None:
    """A registering process: ``count`` items from ``worker * (count - overlap)`` on, 50 per batch."""
    cat = catalog(dsn)
    first = worker * (count - overlap)
    items = [
        make_item(f"s{n:04d}", bbox=(n / 10, 0.0, n / 10 + 1, 1.0), when=T0 + dt.timedelta(minutes=n))
        for n in range(first, first + count)
    ]
    start.wait()
    for i in range(0, count, 50):
        cat.upsert_items(SCENES, items[i : i + 50])


def test_processes_loading_one_collection_at_once_store_every_item_once(pgstac_dsn: str) -> None:
    workers, count, overlap = 4, 200, 50
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Event()
    procs = [
        spawn.Process(target=upsert_worker, args=(start, pgstac_dsn, w, count, overlap))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * workers

    total = (workers - 1) * (count - overlap) + count
    assert sql(pgstac_dsn, "SELECT count(*), count(DISTINCT id) FROM pgstac.items") == [(total, total)]
    last = total - 1
    assert extent(pgstac_dsn) == {
        "spatial": {"bbox": [[0.0, 0.0, last / 10 + 1, 1.0]]},
        "temporal": {"interval": [[stamp(T0), stamp(T0 + dt.timedelta(minutes=last))]]},
    }


def test_a_database_that_is_down_gives_a_transient_error_after_the_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cat = catalog(
        f"postgresql://skyvault@127.0.0.1:{port}/catalog",
        password="s3cret-pw",
        max_attempts=2,
        backoff_seconds=0.05,
    )
    began = time.monotonic()
    with pytest.raises(TransientCatalogError) as info:
        cat.upsert_items(SCENES, [make_item("a"), make_item("b")])
    assert time.monotonic() - began < 10
    message = str(info.value)
    assert "'scenes'" in message
    assert "2 item(s)" in message
    assert "after 2 attempt(s)" in message
    assert "s3cret-pw" not in message
    with pytest.raises(TransientCatalogError, match="'scenes'"):
        cat.search("scenes")


def test_a_pgstac_version_pypgstac_cannot_load_is_named(pgstac_dsn: str) -> None:
    sql(
        pgstac_dsn,
        "INSERT INTO pgstac.migrations (version, datetime) VALUES ('0.8.5', now() + interval '1 day')",
    )
    with pytest.raises(CatalogError, match=r"pgstac 0\.8\.5 but pypgstac is 0\.10\.") as info:
        catalog(pgstac_dsn).upsert_items(SCENES, [make_item("a")])
    assert not isinstance(info.value, TransientCatalogError)


def test_the_password_is_passed_apart_and_never_shown() -> None:
    assert public_dsn("postgresql://u:pw@db.example:5432/stac?sslmode=require&password=pw") == (
        "postgresql://u@db.example:5432/stac?sslmode=require"
    )
    assert "pw" not in public_dsn("host=db.example user=u password=pw dbname=stac")


def test_a_connection_the_server_dropped_is_reopened(pgstac_dsn: str) -> None:
    cat = catalog(pgstac_dsn)
    cat.upsert_items(SCENES, [make_item("a")])
    sql(
        pgstac_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'skyvault'",
    )

    assert cat.existing_ids("scenes", ["a", "b"]) == {"a"}
    assert [r.created for r in cat.upsert_items(SCENES, [make_item("a"), make_item("b")])] == [False, True]


def test_geometries_are_stored_as_pypgstac_encodes_them_and_a_broken_one_is_refused(pgstac_dsn: str) -> None:
    from plpygis import Geometry  # pypgstac's own encoder: the reference

    shapes: dict[str, dict[str, Any]] = {
        "polygon": make_item("polygon")["geometry"],
        "antimeridian": {
            "type": "MultiPolygon",
            "coordinates": [
                [[[170.5, -10.25], [180.0, -10.25], [180.0, 0.125], [170.5, 0.125], [170.5, -10.25]]],
                [[[-180.0, -10.25], [-169.75, -10.25], [-169.75, 0.125], [-180.0, 0.125], [-180.0, -10.25]]],
            ],
        },
        "with-height": {
            "type": "Polygon",
            "coordinates": [[[1.1, 2.2, 30.5], [1.9, 2.2, 31.0], [1.9, 2.8, 29.0], [1.1, 2.2, 30.5]]],
        },
        "with-hole": {
            "type": "Polygon",
            "coordinates": [
                [[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0], [0.0, 0.0]],
                [[1.0, 1.0], [1.0, 2.0], [2.0, 2.0], [2.0, 1.0], [1.0, 1.0]],
            ],
        },
        "named-crs": {
            "type": "Point",
            "coordinates": [0.1 + 0.2, 45.123456789012345],
            "crs": {"type": "name", "properties": {"name": "EPSG:3857"}},
        },
    }
    items = [{**make_item(name), "geometry": geometry} for name, geometry in shapes.items()]
    broken = {**make_item("broken"), "geometry": {"type": "Polygon", "coordinates": [[[0.0, 0.0], [1.0]]]}}

    with pytest.raises(ItemsRejectedError) as info:
        catalog(pgstac_dsn).upsert_items(SCENES, [*items, broken])

    assert set(info.value.errors) == {"broken"}
    stored = dict(
        sql(
            pgstac_dsn,
            "SELECT id, encode(st_asewkb(geometry), 'hex') FROM pgstac.items WHERE collection = 'scenes'",
        )
    )
    expected = {
        name: str(Geometry.from_geojson({k: v for k, v in g.items() if k != "crs"}).ewkb).lower()
        for name, g in shapes.items()
    }
    assert stored == expected
    assert {s for (s,) in sql(pgstac_dsn, "SELECT DISTINCT st_srid(geometry) FROM pgstac.items")} == {4326}

"""One set of cases run against every catalog backend: static, stac-api and pgstac.

Each backend must behave the same to the flows: upserts without duplicates (also when an item's
datetime moves to another month, i.e. another pgstac partition), last-wins duplicates in a batch,
bad items refused by id while the rest are written, searches by time, bbox and ids, deletes, and
concurrent writers that lose nothing.
"""

from __future__ import annotations

import datetime as dt
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from skyvault.catalog.backend import CatalogBackend
from skyvault.catalog.registration import open_catalog
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import CatalogSettings, StoreSettings
from skyvault.errors import ItemsRejectedError
from skyvault.items import parse_time
from tests.catalog.test_static import make_item
from tests.conftest import StacApi

BACKENDS = ["static", "stac-api", "pgstac"]
MAY_1 = dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC)
MAY_20 = dt.datetime(2024, 5, 20, 10, tzinfo=dt.UTC)
JUNE_15 = dt.datetime(2024, 6, 15, 10, tzinfo=dt.UTC)


@pytest.fixture(params=BACKENDS)
def backend_setup(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[CatalogSettings, StoreSettings]:
    store = StoreSettings(root=tmp_path / "store")
    if request.param == "stac-api":
        api: StacApi = request.getfixturevalue("stac_api")
        return CatalogSettings(backend="stac-api", url=api.url, backoff_seconds=0.01), store
    if request.param == "pgstac":
        return CatalogSettings(backend="pgstac", dsn=request.getfixturevalue("pgstac_dsn")), store
    return CatalogSettings(), store


@pytest.fixture
def collection() -> CollectionConfig:
    """A collection of this test alone (the STAC API is shared by the session)."""
    return CollectionConfig(
        id=f"contract-{os.urandom(4).hex()}",
        title="Contract",
        description="Contract cases",
        license="CC0-1.0",
    )


@pytest.fixture
def catalog(backend_setup: tuple[CatalogSettings, StoreSettings]) -> CatalogBackend:
    return open_catalog(*backend_setup)


def item(
    collection: CollectionConfig, item_id: str, store: StoreSettings, when: dt.datetime = MAY_1, **kw: Any
) -> dict[str, Any]:
    return make_item(item_id, store, when=when, collection=collection.id, **kw)


def ids(items: list[dict[str, Any]]) -> list[str]:
    return sorted(i["id"] for i in items)


def when_of(found: dict[str, Any]) -> dt.datetime | None:
    return parse_time(found["properties"].get("datetime"))


def test_upserted_items_are_found_by_id_time_and_bbox(
    catalog: CatalogBackend,
    collection: CollectionConfig,
    backend_setup: tuple[CatalogSettings, StoreSettings],
) -> None:
    store = backend_setup[1]
    refs = catalog.upsert_items(
        collection,
        [
            item(collection, "alps", store, when=MAY_1, bbox=(10.0, 46.0, 11.0, 47.0)),
            item(collection, "andes", store, when=MAY_20, bbox=(-70.0, -33.0, -69.0, -32.0)),
            item(collection, "fiji", store, when=JUNE_15, bbox=(177.0, -18.0, 179.0, -16.0)),
        ],
    )
    assert [(r.item_id, r.created) for r in refs] == [("alps", True), ("andes", True), ("fiji", True)]
    assert catalog.existing_ids(collection.id, ["alps", "fiji", "nowhere"]) == {"alps", "fiji"}
    alps = catalog.get_item(collection.id, "alps")
    assert alps is not None
    assert alps["bbox"] == [10.0, 46.0, 11.0, 47.0]
    assert when_of(alps) == MAY_1
    assert catalog.get_item(collection.id, "nowhere") is None

    assert ids(catalog.search(collection.id)) == ["alps", "andes", "fiji"]
    assert ids(catalog.search(collection.id, start=MAY_1, end=MAY_20)) == ["alps", "andes"]
    assert ids(catalog.search(collection.id, start=JUNE_15)) == ["fiji"]
    assert ids(catalog.search(collection.id, bbox=(9.0, 45.0, 12.0, 48.0))) == ["alps"]
    # a bbox across the antimeridian (west > east) finds Fiji and nothing in the Americas
    assert ids(catalog.search(collection.id, bbox=(170.0, -20.0, -170.0, -10.0))) == ["fiji"]
    assert ids(catalog.search(collection.id, ids=["andes", "fiji"], end=MAY_20)) == ["andes"]
    assert catalog.search(f"{collection.id}-unknown") == []


def test_reupserting_changes_nothing_and_a_moved_datetime_leaves_one_item(
    catalog: CatalogBackend,
    collection: CollectionConfig,
    backend_setup: tuple[CatalogSettings, StoreSettings],
) -> None:
    store = backend_setup[1]
    catalog.upsert_items(collection, [item(collection, "a", store), item(collection, "b", store)])
    again = catalog.upsert_items(collection, [item(collection, "a", store), item(collection, "b", store)])
    assert [r.created for r in again] == [False, False]

    (moved,) = catalog.upsert_items(collection, [item(collection, "a", store, when=JUNE_15)])
    assert moved.created is False
    assert moved.datetime == JUNE_15
    found = catalog.search(collection.id)
    assert ids(found) == ["a", "b"]  # one "a", not one per month
    assert {i["id"]: when_of(i) for i in found} == {"a": JUNE_15, "b": MAY_1}
    assert ids(catalog.search(collection.id, end=MAY_20)) == ["b"]


def test_duplicate_ids_in_a_batch_merge_last_wins(
    catalog: CatalogBackend,
    collection: CollectionConfig,
    backend_setup: tuple[CatalogSettings, StoreSettings],
) -> None:
    store = backend_setup[1]
    refs = catalog.upsert_items(
        collection,
        [
            item(collection, "x", store, when=MAY_1),
            item(collection, "y", store),
            item(collection, "x", store, when=JUNE_15),
        ],
    )
    assert sorted(r.item_id for r in refs) == ["x", "y"]
    found = {i["id"]: when_of(i) for i in catalog.search(collection.id)}
    assert found == {"x": JUNE_15, "y": MAY_1}


def test_a_bad_item_is_refused_by_id_and_the_others_are_written(
    catalog: CatalogBackend,
    collection: CollectionConfig,
    backend_setup: tuple[CatalogSettings, StoreSettings],
) -> None:
    store = backend_setup[1]
    bad = item(collection, "no-geometry", store)
    bad["geometry"] = None
    with pytest.raises(ItemsRejectedError) as refused:
        catalog.upsert_items(
            collection, [item(collection, "good-1", store), bad, item(collection, "good-2", store)]
        )
    assert set(refused.value.errors) == {"no-geometry"}
    assert "no-geometry" in str(refused.value)
    assert sorted(r.item_id for r in refused.value.written) == ["good-1", "good-2"]
    assert ids(catalog.search(collection.id)) == ["good-1", "good-2"]


def test_a_deleted_item_is_gone(
    catalog: CatalogBackend,
    collection: CollectionConfig,
    backend_setup: tuple[CatalogSettings, StoreSettings],
) -> None:
    store = backend_setup[1]
    catalog.upsert_items(collection, [item(collection, "keep", store), item(collection, "drop", store)])
    assert catalog.delete_item(collection.id, "drop") is True
    assert catalog.delete_item(collection.id, "drop") is False
    assert catalog.get_item(collection.id, "drop") is None
    assert ids(catalog.search(collection.id)) == ["keep"]


def test_concurrent_writers_into_one_collection_lose_nothing(
    backend_setup: tuple[CatalogSettings, StoreSettings], collection: CollectionConfig
) -> None:
    settings, store = backend_setup

    def write(worker: int) -> int:
        catalog = open_catalog(settings, store)  # one client per writer, as separate runs have
        batch = [item(collection, f"w{worker}-{n}", store) for n in range(25)]
        batch += [item(collection, f"shared-{n}", store, when=MAY_20) for n in range(5)]
        return len(catalog.upsert_items(collection, batch))

    with ThreadPoolExecutor(max_workers=4) as pool:
        written = list(pool.map(write, range(4)))
    assert written == [30] * 4
    found = ids(open_catalog(settings, store).search(collection.id))
    assert found == sorted(
        [f"w{w}-{n}" for w in range(4) for n in range(25)] + [f"shared-{n}" for n in range(5)]
    )

"""The raster pipeline on every catalog backend: static, a STAC API (stac-fastapi-pgstac), pgstac.

Items are checked with the tools users have: pystac-client against the STAC API, SQL in pgstac.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
from prefect.client.schemas.objects import State
from pystac_client import Client
from shapely.geometry import shape

from skyvault.catalog.registration import open_catalog
from skyvault.cog.convert import cog_record_key, read_cog_record
from skyvault.config.settings import Settings, StoreSettings
from skyvault.errors import RegisterFailedError
from skyvault.flows.register import register
from skyvault.items import parse_time
from skyvault.models import RegisterReport
from skyvault.samples import write_samples
from skyvault.stac.item import build_item
from skyvault.storage.store import open_store
from tests.conftest import StacApi
from tests.flows.test_ingest import GOOD, run_ingest

pytestmark = pytest.mark.usefixtures("prefect_harness")

BACKENDS = ["static", "stac-api", "pgstac"]


def catalog_settings(backend: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The ``catalog`` section for ``backend``, starting the service it needs."""
    if backend == "stac-api":
        api = cast(StacApi, request.getfixturevalue("own_stac_api"))
        return {"backend": "stac-api", "url": api.url}
    if backend == "pgstac":
        return {"backend": "pgstac", "dsn": request.getfixturevalue("pgstac_dsn")}
    return {"backend": "static"}


def pgstac_rows(dsn: str) -> list[tuple[str, str, dt.datetime]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, collection, datetime FROM pgstac.items ORDER BY collection, id"
        ).fetchall()
    return [(str(r[0]), str(r[1]), r[2]) for r in rows]


def expected_items(s: Settings) -> dict[str, dict[str, Any]]:
    """The item each good sample product must have, built from its COG and record."""
    out: dict[str, dict[str, Any]] = {}
    for collection_id in s.collections:
        for info in open_store(s.store).list(f"cogs/{collection_id}/"):
            if info.key.endswith(".json"):
                product_id = info.key.rsplit("/", 1)[1][: -len(".json")]
                record = read_cog_record(collection_id, product_id, s.store)
                assert record is not None
                out[product_id] = build_item(record.product, record.cog, s.collection(collection_id), s.store)
    return out


def assert_same_item(found: dict[str, Any], wanted: dict[str, Any]) -> None:
    assert found["id"] == wanted["id"]
    assert found["collection"] == wanted["collection"]
    assert shape(found["geometry"]).equals_exact(shape(wanted["geometry"]), 1e-9)
    for name in ("datetime", "start_datetime", "end_datetime"):
        assert parse_time(found["properties"].get(name)) == parse_time(wanted["properties"].get(name))
    assert found["assets"]["data"]["href"] == wanted["assets"]["data"]["href"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ingest_registers_and_seeds_on_every_backend(
    backend: str, tmp_path: Path, configure: Callable[..., Settings], request: pytest.FixtureRequest
) -> None:
    s = configure(StoreSettings(root=tmp_path / "store"), catalog=catalog_settings(backend, request))
    write_samples(open_store(s.store))

    first = run_ingest()
    assert (first.failed, first.done) == (0, len(GOOD)), first
    wanted = expected_items(s)
    assert sorted(wanted) == sorted(GOOD)

    catalog = open_catalog(s.catalog, s.store)
    for product_id, item in wanted.items():
        stored = catalog.get_item(item["collection"], product_id)
        assert stored is not None, product_id
        assert_same_item(stored, item)
    # seeding found the items through the backend's search: every product has tiles
    assert all(o.tiles > 0 for o in first.outcomes), first.outcomes

    if backend == "stac-api":
        client = Client.open(s.catalog.url or "")
        for product_id, item in wanted.items():
            when = parse_time(item["properties"].get("datetime") or item["properties"]["start_datetime"])
            assert when is not None
            day = f"{(when - dt.timedelta(hours=1)).isoformat()}/{(when + dt.timedelta(hours=1)).isoformat()}"
            found = list(
                client.search(collections=[item["collection"]], bbox=item["bbox"], datetime=day).items()
            )
            assert product_id in [i.id for i in found]
            match = next(i for i in found if i.id == product_id)
            assert_same_item(match.to_dict(transform_hrefs=False), item)
        everything = list(client.search(collections=list(s.collections), max_items=None).items())
        assert sorted(i.id for i in everything) == sorted(GOOD)
    if backend == "pgstac":
        rows = pgstac_rows(s.catalog.dsn or "")
        assert sorted(r[0] for r in rows) == sorted(GOOD)
        for product_id, collection_id, when in rows:
            props = wanted[product_id]["properties"]
            assert collection_id == wanted[product_id]["collection"]
            assert when == parse_time(props.get("datetime") or props["start_datetime"])

    second = run_ingest()  # nothing to do, nothing duplicated
    assert second.skipped == len(GOOD)
    assert second.done == 0
    for collection_id in s.collections:
        ids = [i["id"] for i in catalog.search(collection_id)]
        assert len(ids) == len(set(ids))
    assert sorted(i["id"] for c in s.collections for i in catalog.search(c)) == sorted(GOOD)


def run_register(**params: Any) -> tuple[State[Any], RegisterReport]:
    state = cast("State[Any]", register(return_state=True, **params))
    report = state.result(raise_on_failure=False)
    if isinstance(report, RegisterFailedError):
        report = report.summary
    assert isinstance(report, RegisterReport), f"register ended {state.type}: {state.message}"
    return state, report


@pytest.mark.parametrize("backend", ["stac-api", "pgstac"])
def test_register_all_fills_a_new_catalog_from_the_cogs(
    backend: str, tmp_path: Path, configure: Callable[..., Settings], request: pytest.FixtureRequest
) -> None:
    store = StoreSettings(root=tmp_path / "store")
    s = configure(store)
    write_samples(open_store(s.store))
    assert run_ingest(seed_tiles=False).done == len(GOOD)
    static = open_catalog(s.catalog, s.store)
    before = {i["id"]: i for c in s.collections for i in static.search(c)}

    moved = configure(store, catalog=catalog_settings(backend, request))
    state, report = run_register(all_collections=True)
    assert (state.type.value, state.name) == ("COMPLETED", "Completed"), state.message
    assert (report.registered, report.created, report.failed) == (len(GOOD), len(GOOD), 0)
    target = open_catalog(moved.catalog, moved.store)
    after = {i["id"]: i for c in moved.collections for i in target.search(c)}
    assert sorted(after) == sorted(before)
    for product_id, item in before.items():
        assert_same_item(after[product_id], item)

    state, again = run_register(all_collections=True)
    assert (again.registered, again.created) == (len(GOOD), 0)
    assert sorted(i["id"] for c in moved.collections for i in target.search(c)) == sorted(GOOD)


def test_register_fails_a_product_without_cog_record_alone(
    tmp_path: Path, configure: Callable[..., Settings]
) -> None:
    s = configure(StoreSettings(root=tmp_path / "store"))
    write_samples(open_store(s.store))
    assert run_ingest(seed_tiles=False).done == len(GOOD)
    collection_id = "demo-dem"
    ids = sorted(i["id"] for i in open_catalog(s.catalog, s.store).search(collection_id))
    lost = ids[0]
    open_store(s.store).delete(cog_record_key(collection_id, lost))
    store = open_store(s.store)
    for key in [o.key for o in store.list(f"{s.catalog.prefix}/")]:
        store.delete(key)  # the catalog is gone: rebuild it

    state, report = run_register(collection=collection_id)
    assert state.name == "Partial", state.message
    (summary,) = report.summaries
    assert set(summary.failed) == {lost}
    assert lost in summary.failed[lost]
    assert "no COG record" in summary.failed[lost]
    assert summary.registered == len(ids) - 1
    rebuilt = sorted(i["id"] for i in open_catalog(s.catalog, s.store).search(collection_id))
    assert rebuilt == ids[1:]

    state, report = run_register(collection=collection_id, product_ids=[lost])
    assert state.is_failed()
    assert report.failed == 1
    assert report.registered == 0

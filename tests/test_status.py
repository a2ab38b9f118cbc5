"""Status records on the object store: key layout, atomic replace, bulk reads, the skip rule."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from skyvault import status
from skyvault.config.settings import StoreSettings
from skyvault.errors import InvalidIdentifierError
from skyvault.models import ObjectInfo, ProductStatus, StatusState
from skyvault.status import needs_processing, read_status, read_statuses, status_key, write_status
from skyvault.storage.store import LocalStore, ObjectStore


def record(collection: str, product: str, state: StatusState, step: str = "seed") -> ProductStatus:
    return ProductStatus(
        collection=collection,
        product_id=product,
        state=state,
        step=step,
        message=f"{state} at {step}",
        flow_run_id="0f1e",
        cog_key=f"cogs/{collection}/{product}.tif",
        tiles=3,
        updated_at=status.now(),
    )


@pytest.fixture
def store(tmp_path: Path) -> StoreSettings:
    return StoreSettings(root=tmp_path / "store")


def test_records_are_json_under_status_and_replaced_whole(store: StoreSettings) -> None:
    write_status(record("scenes", "P1", "running", "preprocess"), store)
    write_status(record("scenes", "P1", "done"), store)

    path = store.root / "status" / "scenes" / "P1.json"
    assert status_key("scenes", "P1") == "status/scenes/P1.json"
    assert json.loads(path.read_text())["state"] == "done"
    got = read_status("scenes", "P1", store)
    assert got is not None
    assert got.model_dump(exclude={"updated_at"}) == record("scenes", "P1", "done").model_dump(
        exclude={"updated_at"}
    )
    assert [p.name for p in path.parent.iterdir()] == ["P1.json"]  # no temporary file left
    assert read_status("scenes", "NEVER", store) is None


def test_status_keys_refuse_unsafe_ids() -> None:
    with pytest.raises(InvalidIdentifierError, match=r"\.\./x"):
        status_key("scenes", "../x")
    with pytest.raises(InvalidIdentifierError, match="a/b"):
        status_key("a/b", "P1")


class CountingStore:
    """A local store that counts listings and reads."""

    def __init__(self, root: Path) -> None:
        self.inner = LocalStore(root)
        self.listed: list[str] = []
        self.read: list[str] = []

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.listed.append(prefix)
        return self.inner.list(prefix)

    def get_bytes(self, key: str) -> bytes:
        self.read.append(key)
        return self.inner.get_bytes(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_bulk_read_lists_each_collection_once_and_reads_only_existing_records(
    store: StoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(1000):
        write_status(record("scenes", f"P{i:04d}", "done" if i % 3 else "failed"), store)
    write_status(record("dems", "D1", "running", "register"), store)
    write_status(record("other", "X1", "done"), store)
    counting = CountingStore(store.root)

    def fake_open(settings: StoreSettings) -> ObjectStore:
        return counting

    monkeypatch.setattr(status, "open_store", fake_open)
    wanted = [("scenes", f"P{i:04d}") for i in range(1000)] + [
        ("scenes", "NEW"),
        ("dems", "D1"),
        ("dems", "D2"),
    ]

    found = read_statuses(wanted, store)

    assert sorted(counting.listed) == ["status/dems/", "status/scenes/"]
    assert len(counting.read) == 1001  # the records that exist, never the 2 new products
    assert set(found) == {("scenes", f"P{i:04d}") for i in range(1000)} | {("dems", "D1")}
    assert found[("scenes", "P0001")].state == "done"
    assert found[("scenes", "P0003")].state == "failed"
    assert found[("dems", "D1")].step == "register"


def test_unreadable_or_misplaced_records_count_as_missing(store: StoreSettings) -> None:
    objects = LocalStore(store.root)
    objects.put_bytes("status/scenes/TORN.json", b'{"collection": "scenes", "product_')
    objects.put_bytes(
        "status/scenes/ALIEN.json", record("scenes", "OTHER", "done").model_dump_json().encode()
    )
    write_status(record("scenes", "OK", "done"), store)

    found = read_statuses([("scenes", "TORN"), ("scenes", "ALIEN"), ("scenes", "OK")], store)

    assert set(found) == {("scenes", "OK")}
    assert read_status("scenes", "TORN", store) is None


def test_newer_records_with_more_fields_are_still_read(store: StoreSettings) -> None:
    body = json.loads(record("scenes", "P1", "done").model_dump_json())
    LocalStore(store.root).put_bytes("status/scenes/P1.json", json.dumps({**body, "later": 1}).encode())
    found = read_status("scenes", "P1", store)
    assert found is not None
    assert found.state == "done"


@pytest.mark.parametrize(
    ("state", "step", "in_catalog", "replace", "seed_tiles", "expected"),
    [
        ("done", "seed", True, False, True, False),  # done and registered: skipped
        ("done", "seed", True, False, False, False),
        ("done", "seed", False, False, True, True),  # item gone from the catalog
        ("done", "seed", True, True, True, True),  # replace
        ("running", "seed", True, False, True, True),  # a killed run
        ("failed", "seed", True, False, True, True),
        ("done", "register", True, False, True, True),  # done without tiles, tiles now wanted
        ("done", "register", True, False, False, False),
        (None, None, True, False, True, True),  # registered by something else, never recorded
    ],
)
def test_needs_processing(
    state: StatusState | None,
    step: str | None,
    in_catalog: bool,
    replace: bool,
    seed_tiles: bool,
    expected: bool,
) -> None:
    found = record("c", "p", state, step or "seed") if state else None
    assert needs_processing(found, in_catalog, replace=replace, seed_tiles=seed_tiles) is expected


@pytest.mark.parametrize(
    ("recorded", "now", "expected"),
    [
        ("d1", "d1", False),  # the product as it was processed: skipped
        ("d1", "d2", True),  # its report or sidecar changed since: processed again
        (None, "d2", False),  # a record from before digests were kept: the old rule
    ],
)
def test_a_product_described_differently_since_it_was_done_is_processed_again(
    recorded: str | None, now: str, expected: bool
) -> None:
    found = record("c", "p", "done").model_copy(update={"product_digest": recorded})
    assert needs_processing(found, True, replace=False, seed_tiles=True, digest=now) is expected
    assert status.changed_since_done(found, now) is expected

"""Atomic updates and locks across processes: local folders (flock) and S3 (conditional writes, leases)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest

from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import StoreSettings
from skyvault.errors import LockTimeoutError, StorageError
from skyvault.storage.store import LocalStore, S3Store, open_store
from skyvault.tiles.seeding import tilejson_key, write_tilejson

SPAWN = multiprocessing.get_context("spawn")
PROCESSES = 4
KEY = "shared/counter.json"


@pytest.fixture(scope="session")
def serial_moto_endpoint() -> Iterator[str]:
    """A moto S3 server that answers one request at a time, for tests of concurrent writers.

    moto checks ``If-Match`` / ``If-None-Match`` and then stores the object in a second step with
    no lock between, and replaces an object's buffer while other threads may still read it: under
    load, concurrent conditional writes lose updates (600 increments from 6 processes ended at
    599) and reads fail with 500. S3 itself applies each conditional write atomically; serving one
    request at a time gives the tests that guarantee without weakening what they check.
    """
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    one_at_a_time = threading.Lock()

    def serial(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with one_at_a_time:
            return list(app(environ, start_response))

    server = make_server("127.0.0.1", 0, serial, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture
def serial_s3_settings(serial_moto_endpoint: str) -> StoreSettings:
    """A fresh bucket on :func:`serial_moto_endpoint`."""
    import boto3

    bucket = f"serial-{uuid.uuid4().hex[:12]}"
    settings = StoreSettings(
        kind="s3",
        bucket=bucket,
        endpoint_url=serial_moto_endpoint,
        access_key_id="test",
        secret_access_key="test",
    )
    boto3.client(
        "s3",
        endpoint_url=serial_moto_endpoint,
        region_name=settings.region,
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket=bucket)
    return settings


@pytest.fixture(params=["local", "s3"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    if request.param == "local":
        return StoreSettings(root=tmp_path / "store")
    s3: StoreSettings = request.getfixturevalue("serial_s3_settings")
    return s3


def run_processes(target: Callable[..., None], args: list[tuple[Any, ...]], timeout: float = 240) -> None:
    """Start one spawned process per args tuple (each gets a shared start event first), all at once."""
    start = SPAWN.Event()
    procs = [SPAWN.Process(target=target, args=(start, *a)) for a in args]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout)
    assert [p.exitcode for p in procs] == [0] * len(procs)


# --- update -----------------------------------------------------------------------------------------


def increment(data: bytes | None) -> bytes:
    count = json.loads(data)["count"] if data is not None else 0
    return json.dumps({"count": count + 1}).encode()


def count_up(start: Event, settings: StoreSettings, times: int) -> None:
    store = open_store(settings)
    start.wait()
    for _ in range(times):
        store.update(KEY, increment, content_type="application/json")


def test_concurrent_updates_from_processes_lose_no_increment(settings: StoreSettings) -> None:
    times = 40 if settings.kind == "local" else 20
    run_processes(count_up, [(settings, times)] * PROCESSES)
    assert json.loads(open_store(settings).get_bytes(KEY)) == {"count": PROCESSES * times}


def test_update_returns_what_is_stored_and_none_leaves_it(settings: StoreSettings) -> None:
    store = open_store(settings)
    assert store.update("doc", lambda data: None) is None
    assert not store.exists("doc")
    assert store.update("doc", lambda data: b"one") == b"one"
    assert store.update("doc", lambda data: None) == b"one"
    assert store.update("doc", lambda data: (data or b"") + b"+two") == b"one+two"
    assert store.get_bytes("doc") == b"one+two"
    assert [o.key for o in store.list("")] == ["doc"]


def test_an_error_in_the_change_writes_nothing(settings: StoreSettings) -> None:
    store = open_store(settings)
    store.put_bytes("doc", b"kept")

    def fail(data: bytes | None) -> bytes:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        store.update("doc", fail)
    assert store.get_bytes("doc") == b"kept"


# --- locks ------------------------------------------------------------------------------------------


def hold(settings: StoreSettings, key: str, lease: float, ready: Path) -> None:
    """Take the lock, say so, then hang until killed."""
    store = open_store(settings)
    with store.lock(key, lease_seconds=lease, timeout_seconds=30):
        ready.write_text(str(os.getpid()))
        time.sleep(600)


def start_holder(settings: StoreSettings, key: str, lease: float, tmp_path: Path) -> Any:
    ready = tmp_path / f"ready-{key.replace('/', '_')}"
    proc = SPAWN.Process(target=hold, args=(settings, key, lease, ready))
    proc.start()
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.is_alive(), "the lock holder died"
        assert time.monotonic() < deadline, "the lock holder never got the lock"
        time.sleep(0.02)
    return proc


def kill(proc: Any) -> float:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    return time.monotonic()


def test_a_killed_local_lock_holder_frees_the_lock_at_once(tmp_path: Path) -> None:
    settings = StoreSettings(root=tmp_path / "store")
    store = LocalStore(settings.root)
    holder = start_holder(settings, "locks/job", 30, tmp_path)
    try:
        t0 = time.monotonic()
        with (
            pytest.raises(LockTimeoutError) as err,
            store.lock("locks/job", lease_seconds=30, timeout_seconds=0.5),
        ):
            pass
        assert time.monotonic() - t0 >= 0.5
        assert "'locks/job'" in str(err.value)
        assert f"{socket.gethostname()}:{holder.pid}" in str(err.value)
    finally:
        killed = kill(holder)
    with store.lock("locks/job", lease_seconds=30, timeout_seconds=5):
        assert time.monotonic() - killed < 0.5
    assert list(store.list("")) == []


def test_local_locks_exclude_threads_of_one_process_too(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with store.lock("a", lease_seconds=30, timeout_seconds=1):
        with (
            pytest.raises(LockTimeoutError, match=rf"'a'.*held by {socket.gethostname()}:{os.getpid()}"),
            store.lock("a", lease_seconds=30, timeout_seconds=0.1),
        ):
            pass
        with store.lock("b", lease_seconds=30, timeout_seconds=0.1):
            pass
    with store.lock("a", lease_seconds=30, timeout_seconds=0):
        pass


def lease_of(settings: StoreSettings, key: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(open_store(settings).get_bytes(key))
    return data


def test_a_killed_s3_lease_holder_is_taken_over_after_its_lease(
    serial_s3_settings: StoreSettings, tmp_path: Path
) -> None:
    lease = 2.0
    store = S3Store(serial_s3_settings)
    holder = start_holder(serial_s3_settings, "locks/job", lease, tmp_path)
    try:
        assert lease_of(serial_s3_settings, "locks/job")["owner"].startswith(
            f"{socket.gethostname()}:{holder.pid}:"
        )
        # Longer than a lease: only the holder's renewals keep the waiter out.
        with (
            pytest.raises(LockTimeoutError) as err,
            store.lock("locks/job", lease_seconds=lease, timeout_seconds=2.5 * lease),
        ):
            pass
        assert "'locks/job'" in str(err.value)
        assert f"{socket.gethostname()}:{holder.pid}:" in str(err.value)
    finally:
        killed = kill(holder)
    with store.lock("locks/job", lease_seconds=lease, timeout_seconds=30):
        waited = time.monotonic() - killed
        assert lease_of(serial_s3_settings, "locks/job")["owner"].startswith(
            f"{socket.gethostname()}:{os.getpid()}:"
        )
    # Not before the dead holder's last renewal ran out (renewed every lease/3), and soon after.
    assert lease * 2 / 3 - 0.2 <= waited <= 3 * lease
    assert not store.exists("locks/job")


def test_an_s3_lock_is_free_again_after_release_and_a_lost_lease_is_reported(
    serial_s3_settings: StoreSettings,
) -> None:
    store = S3Store(serial_s3_settings)
    with store.lock("l", lease_seconds=30, timeout_seconds=1):
        assert store.exists("l")
    assert not store.exists("l")
    with store.lock("l", lease_seconds=30, timeout_seconds=0):
        pass

    def intrude() -> None:
        with store.lock("l", lease_seconds=0.6, timeout_seconds=1):
            intruder = {"owner": "intruder", "expires_at": "2000-01-01T00:00:00+00:00", "lease_seconds": 9}
            store.put_bytes("l", json.dumps(intruder).encode())
            time.sleep(0.5)

    with pytest.raises(StorageError, match=r"'l'.*lost to intruder"):
        intrude()
    assert lease_of(serial_s3_settings, "l")["owner"] == "intruder"


# --- documents updated through store.update: TileJSON ----------------------------------------------

LAYER_COLLECTION = CollectionConfig(id="scenes", title="Scenes", min_zoom=0, max_zoom=12)
LAYERS = [f"2024-05-{day:02d}" for day in range(1, 25)]


def side_bounds(worker: int) -> tuple[tuple[float, float, float, float], int, int]:
    """Bounds and zooms that reach further than the others' on one side only: the worker's own."""
    bounds = [0.0, 0.0, 1.0, 1.0]
    bounds[worker % 4] += (-1, -1, 1, 1)[worker % 4] * (10 + worker)
    return (bounds[0], bounds[1], bounds[2], bounds[3]), 5 - worker, 6 + worker


def seed_tilejsons(start: Event, settings: StoreSettings, worker: int) -> None:
    bounds, min_zoom, max_zoom = side_bounds(worker)
    start.wait()
    for layer in LAYERS:
        write_tilejson(LAYER_COLLECTION, settings, layer, bounds, min_zoom, max_zoom)


def test_tilejsons_of_one_layer_written_by_several_processes_keep_the_union(settings: StoreSettings) -> None:
    run_processes(seed_tilejsons, [(settings, w) for w in range(PROCESSES)])
    store = open_store(settings)
    for layer in LAYERS:
        doc = json.loads(store.get_bytes(tilejson_key("scenes", layer)))
        assert doc["bounds"] == [-10.0, -11.0, 13.0, 14.0], layer
        assert (doc["minzoom"], doc["maxzoom"]) == (2, 9), layer

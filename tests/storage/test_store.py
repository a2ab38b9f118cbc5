from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import rasterio

from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import StoreSettings
from skyvault.errors import (
    BucketNotFoundError,
    LinkOutsideStoreError,
    ObjectNotFoundError,
    StorageError,
    TransientError,
    TransientStorageError,
)
from skyvault.storage.store import LocalStore, ObjectStore, S3Store, open_store
from skyvault.tasks.discovery import discover as discover_task
from tests.storage.s3_faults import Action, FaultyS3Proxy


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return open_store(StoreSettings(root=tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_store_settings"))


def test_put_get_roundtrip(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(b"\x00\x01payload" * 100)
    store.put_file("cogs/c/p.tif", src)
    store.put_bytes("catalog/catalog.json", b"{}")
    dest = tmp_path / "out.bin"
    store.get_file("cogs/c/p.tif", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert store.get_bytes("catalog/catalog.json") == b"{}"
    with store.open_read("cogs/c/p.tif") as f:
        assert f.read() == src.read_bytes()
    info = store.head("cogs/c/p.tif")
    assert info is not None
    assert info.size == src.stat().st_size
    assert store.exists("cogs/c/p.tif")
    assert not store.exists("cogs/c")
    store.delete("cogs/c/p.tif")
    assert not store.exists("cogs/c/p.tif")


def test_move_file_stores_the_file_and_takes_it_away(store: ObjectStore, tmp_path: Path) -> None:
    payload = b"\x00cog" * 1000
    store.put_bytes("cogs/c/p.tif", b"old")
    src = tmp_path / "scratch" / "p.tif"
    src.parent.mkdir()
    src.write_bytes(payload)
    store.move_file("cogs/c/p.tif", src)
    assert store.get_bytes("cogs/c/p.tif") == payload
    assert not src.exists()
    with pytest.raises(StorageError, match=r"cogs/c/q\.tif"):
        store.move_file("cogs/c/q.tif", tmp_path / "scratch" / "gone.tif")
    assert [o.key for o in store.list("cogs/")] == ["cogs/c/p.tif"]


def test_local_move_renames_within_one_filesystem(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "scratch.tif"
    src.write_bytes(b"cog")
    inode = src.stat().st_ino
    store.move_file("cogs/c/p.tif", src)
    stored = tmp_path / "store" / "cogs" / "c" / "p.tif"
    assert stored.stat().st_ino == inode  # renamed, not copied
    assert stored.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in stored.parent.iterdir()] == ["p.tif"]


def test_missing_key_is_named(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError, match=r"nope/x\.tif"):
        store.get_bytes("nope/x.tif")
    with pytest.raises(ObjectNotFoundError, match=r"nope/x\.tif"):
        store.get_file("nope/x.tif", tmp_path / "x")
    assert store.head("nope/x.tif") is None


@pytest.mark.parametrize("key", ["", "/abs/key", "a/../b", "a//b", "./a", "a/.", "a\\b"])
def test_unsafe_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(StorageError, match="unsafe object key"):
        store.put_bytes(key, b"x")


def test_list_by_prefix_sorted_and_filtered(store: ObjectStore) -> None:
    for key in ["landing/a/2.tif", "landing/a/1.tif", "landing/ab/3.tif", "cogs/a/1.tif"]:
        store.put_bytes(key, b"x")
    assert [o.key for o in store.list("landing/a/")] == ["landing/a/1.tif", "landing/a/2.tif"]
    assert [o.key for o in store.list("landing/a")] == [
        "landing/a/1.tif",
        "landing/a/2.tif",
        "landing/ab/3.tif",
    ]
    assert list(store.list("nothing/")) == []


def test_s3_list_paginates_beyond_1000(s3_store_settings: StoreSettings) -> None:
    store = open_store(s3_store_settings)
    assert isinstance(store, S3Store)
    for i in range(1105):
        store._client.put_object(Bucket=store.bucket, Key=f"landing/many/{i:05d}.tif", Body=b"")
    keys = [o.key for o in store.list("landing/many/")]
    assert len(keys) == 1105
    assert keys[0] == "landing/many/00000.tif"
    assert keys[-1] == "landing/many/01104.tif"


def test_gdal_reads_in_place(store: ObjectStore, rgb_4326: Path) -> None:
    store.put_file("landing/c/rgb.tif", rgb_4326)
    with rasterio.Env(**store.gdal_env()), rasterio.open(store.gdal_path("landing/c/rgb.tif")) as ds:
        assert ds.count == 3
        assert ds.crs.to_epsg() == 4326
        with rasterio.open(rgb_4326) as ref:
            assert (ds.read() == ref.read()).all()


def test_s3_presigned_url_downloads(s3_store_settings: StoreSettings) -> None:
    store = open_store(s3_store_settings)
    store.put_bytes("retrieval/d/d_00000.tar", b"block")
    url = store.presigned_url("retrieval/d/d_00000.tar", 3600)
    assert "Signature" in url or "X-Amz-Signature" in url
    assert httpx.get(url).content == b"block"


def test_s3_missing_bucket_is_named(moto_endpoint: str) -> None:
    store = S3Store(
        StoreSettings(
            kind="s3",
            bucket="no-such-bucket-here",
            endpoint_url=moto_endpoint,
            access_key_id="test",
            secret_access_key="test",
        )
    )
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-here"):
        store.put_bytes("a/b", b"x")
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-here"):
        store.check_bucket()


def test_local_failed_write_keeps_old_object(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("cogs/c/p.tif", b"old")
    with pytest.raises(StorageError, match=r"cogs/c/p\.tif"):
        store.put_file("cogs/c/p.tif", tmp_path / "does-not-exist.tif")
    assert store.get_bytes("cogs/c/p.tif") == b"old"
    leftovers = [p.name for p in (tmp_path / "store" / "cogs" / "c").iterdir()]
    assert leftovers == ["p.tif"]


def test_local_listing_hides_partial_writes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("a/x", b"1")
    (tmp_path / "store" / "a" / ".x.abc.part").write_bytes(b"half")
    assert [o.key for o in store.list("a/")] == ["a/x"]


def test_a_local_write_is_locked_from_the_moment_it_can_be_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl
    import tempfile

    def no_named_temporary_file(*args: object, **kwargs: object) -> None:
        raise AssertionError("a named .new file was created: a kill could leave it behind")

    store = LocalStore(tmp_path / "store")
    store.put_bytes("tiles/a/1.png", b"old")
    folder = tmp_path / "store" / "tiles" / "a"
    monkeypatch.setattr(tempfile, "mkstemp", no_named_temporary_file)
    with store._atomic(store._path("tiles/a/2.png")) as tmp:
        # no unlocked ".new" stage: a writer killed here or earlier leaves nothing a sweep must age out
        assert sorted(p.name for p in folder.iterdir()) == sorted(["1.png", tmp.name])
        assert tmp.name.startswith(".2.png.")
        assert tmp.name.endswith(".part")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        tmp.write_bytes(b"new")
    assert store.get_bytes("tiles/a/2.png") == b"new"
    assert sorted(p.name for p in folder.iterdir()) == ["1.png", "2.png"]


WRITER = """
import sys, time
from pathlib import Path
from skyvault.storage.store import LocalStore

store = LocalStore(Path(sys.argv[1]))
with store._atomic(store._path(sys.argv[2])) as tmp:
    tmp.write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(float(sys.argv[3]))
    tmp.write_bytes(b"whole")
"""


def test_a_killed_local_writer_leaves_nothing_once_its_folder_is_written_again(tmp_path: Path) -> None:
    root = tmp_path / "store"
    folder = root / "tiles" / "l" / "5" / "1"

    def start(key: str, seconds: float) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-c", WRITER, str(root), key, str(seconds)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    dead, live = start("tiles/l/5/1/1.png", 600), start("tiles/l/5/1/2.png", 5)
    for proc in (dead, live):
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
    dead.kill()
    assert dead.wait(30) == -signal.SIGKILL
    assert len(list(folder.glob(".*.part"))) == 2

    LocalStore(root).put_bytes("tiles/l/5/1/1.png", b"tile")

    # the dead writer's file is gone, the living writer's is not
    assert [p.name.split(".")[1:3] for p in folder.glob(".*.part")] == [["2", "png"]]
    assert live.wait(30) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["1.png", "2.png"]
    assert (folder / "1.png").read_bytes() == b"tile"
    assert (folder / "2.png").read_bytes() == b"whole"


# --- links out of a local store ------------------------------------------------------------------


@pytest.fixture
def linked(tmp_path: Path) -> LocalStore:
    """A local store whose landing folder holds links out of the root and one link inside it."""
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "secret.tif").write_bytes(b"outside data")
    (outside / "folder" / "x.tif").write_bytes(b"outside folder data")
    store = LocalStore(tmp_path / "store")
    store.put_bytes("landing/c/inside.tif", b"inside data")
    folder = tmp_path / "store" / "landing" / "c"
    os.symlink(outside / "secret.tif", folder / "out.tif")
    os.symlink(outside / "folder", folder / "outdir")
    os.symlink(folder / "inside.tif", folder / "alias.tif")
    return store


def test_local_store_never_reads_through_a_link_out_of_its_root(linked: LocalStore, tmp_path: Path) -> None:
    reads: list[Callable[[str], object]] = [
        linked.get_bytes,
        linked.head,
        linked.exists,
        linked.gdal_path,
        lambda key: linked.get_file(key, tmp_path / "copy"),
        lambda key: linked.open_read(key).__enter__(),
    ]
    for key in ("landing/c/out.tif", "landing/c/outdir/x.tif"):
        for read in reads:
            with pytest.raises(LinkOutsideStoreError, match=re.escape(repr(key))) as caught:
                read(key)
            assert "outside the store root" in str(caught.value)
    assert not (tmp_path / "copy").exists()


def test_local_store_follows_links_inside_its_root(linked: LocalStore) -> None:
    assert linked.get_bytes("landing/c/alias.tif") == b"inside data"
    with linked.open_read("landing/c/alias.tif") as f:
        assert f.read() == b"inside data"
    info = linked.head("landing/c/alias.tif")
    assert info is not None
    assert info.size == len(b"inside data")
    assert linked.gdal_path("landing/c/alias.tif") == linked.gdal_path("landing/c/inside.tif")


def test_local_listing_shows_a_link_out_without_following_it(linked: LocalStore) -> None:
    listed = {o.key: o for o in linked.list("landing/")}
    assert sorted(listed) == ["landing/c/alias.tif", "landing/c/inside.tif", "landing/c/out.tif"]
    assert listed["landing/c/out.tif"].size != len(b"outside data")
    assert listed["landing/c/alias.tif"].size == len(b"inside data")


def test_local_store_never_writes_or_deletes_through_a_linked_folder(
    linked: LocalStore, tmp_path: Path
) -> None:
    src = tmp_path / "new.tif"
    src.write_bytes(b"new")
    with pytest.raises(LinkOutsideStoreError, match=r"landing/c/outdir/y\.tif"):
        linked.put_bytes("landing/c/outdir/y.tif", b"new")
    with pytest.raises(LinkOutsideStoreError, match=r"landing/c/outdir/y\.tif"):
        linked.put_file("landing/c/outdir/y.tif", src)
    with pytest.raises(LinkOutsideStoreError, match=r"landing/c/outdir/x\.tif"):
        linked.delete("landing/c/outdir/x.tif")
    assert sorted(p.name for p in (tmp_path / "outside" / "folder").iterdir()) == ["x.tif"]

    linked.put_bytes("landing/c/out.tif", b"replaced")  # replaces the link itself
    assert (tmp_path / "outside" / "secret.tif").read_bytes() == b"outside data"
    assert linked.get_bytes("landing/c/out.tif") == b"replaced"
    os.symlink(tmp_path / "outside" / "secret.tif", tmp_path / "store" / "landing" / "c" / "gone.tif")
    linked.delete("landing/c/gone.tif")  # removes the link, never its target
    assert (tmp_path / "outside" / "secret.tif").read_bytes() == b"outside data"


def test_local_listing_refuses_a_prefix_that_leads_out(tmp_path: Path) -> None:
    (tmp_path / "elsewhere" / "c").mkdir(parents=True)
    (tmp_path / "elsewhere" / "c" / "a.tif").write_bytes(b"x")
    store = LocalStore(tmp_path / "store")
    store.put_bytes("cogs/c/a.tif", b"x")
    os.symlink(tmp_path / "elsewhere", tmp_path / "store" / "landing")
    with pytest.raises(LinkOutsideStoreError, match="landing/"):
        list(store.list("landing/"))
    assert [o.key for o in store.list("")] == ["cogs/c/a.tif"]


# --- S3 faults: cut bodies, closed connections, timeouts -----------------------------------------


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultyS3Proxy]:
    p = FaultyS3Proxy(moto_endpoint)
    p.start()
    try:
        yield p
    finally:
        p.stop()


def through(proxy: FaultyS3Proxy, settings: StoreSettings, max_attempts: int) -> S3Store:
    """The bucket of ``settings`` reached through ``proxy``, with short timeouts."""
    return S3Store(
        settings.model_copy(
            update={
                "endpoint_url": proxy.url,
                "max_attempts": max_attempts,
                "read_timeout_seconds": 0.5,
                "connect_timeout_seconds": 0.5,
            }
        )
    )


PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


def _get_bytes(store: ObjectStore, key: str, tmp: Path) -> bytes:
    return store.get_bytes(key)


def _open_read(store: ObjectStore, key: str, tmp: Path) -> bytes:
    with store.open_read(key) as f:
        return f.read()


def _get_file(store: ObjectStore, key: str, tmp: Path) -> bytes:
    store.get_file(key, tmp / "download")
    return (tmp / "download").read_bytes()


READS = pytest.mark.parametrize("read", [_get_bytes, _open_read, _get_file], ids=lambda f: f.__name__[1:])


@READS
@pytest.mark.parametrize("action", ["cut", "stall-body"])
def test_s3_body_cut_or_stalled_while_read_is_transient_and_not_retried_inside(
    read: Callable[[ObjectStore, str, Path], bytes],
    action: Action,
    proxy: FaultyS3Proxy,
    s3_store_settings: StoreSettings,
    tmp_path: Path,
) -> None:
    open_store(s3_store_settings).put_bytes("landing/c/big.tif", PAYLOAD)
    store = through(proxy, s3_store_settings, max_attempts=3)
    proxy.fail("GET", action, key="big.tif", seconds=2)

    with pytest.raises(TransientStorageError, match=r"'landing/c/big\.tif' in bucket") as caught:
        read(store, "landing/c/big.tif", tmp_path)

    assert isinstance(caught.value, TransientError)
    assert proxy.count("GET", "big.tif") == 1, "a body error is left to the task retry policy"
    assert not (tmp_path / "download").exists()
    assert read(store, "landing/c/big.tif", tmp_path) == PAYLOAD


@READS
@pytest.mark.parametrize("action", ["close", "stall"])
def test_s3_closed_connection_and_read_timeout_are_transient(
    read: Callable[[ObjectStore, str, Path], bytes],
    action: Action,
    proxy: FaultyS3Proxy,
    s3_store_settings: StoreSettings,
    tmp_path: Path,
) -> None:
    open_store(s3_store_settings).put_bytes("landing/c/big.tif", PAYLOAD)
    store = through(proxy, s3_store_settings, max_attempts=2)
    proxy.fail("GET", action, key="big.tif", times=2, seconds=2)

    with pytest.raises(TransientStorageError, match=r"'landing/c/big\.tif' in bucket"):
        read(store, "landing/c/big.tif", tmp_path)

    assert proxy.count("GET", "big.tif") == 2, "the client makes exactly max_attempts attempts"
    assert read(store, "landing/c/big.tif", tmp_path) == PAYLOAD


def test_s3_client_retries_a_request_whose_connection_closed(
    proxy: FaultyS3Proxy, s3_store_settings: StoreSettings
) -> None:
    open_store(s3_store_settings).put_bytes("landing/c/a.json", b"{}")
    store = through(proxy, s3_store_settings, max_attempts=3)
    proxy.fail("GET", "close", key="a.json")
    proxy.fail("PUT", "stall", key="b.json", seconds=2)

    assert store.get_bytes("landing/c/a.json") == b"{}"
    store.put_bytes("landing/c/b.json", b"[]")

    assert proxy.count("GET", "a.json") == 2
    assert proxy.count("PUT", "b.json") == 2
    assert open_store(s3_store_settings).get_bytes("landing/c/b.json") == b"[]"


@pytest.fixture
def refusing_port() -> int:
    """A loopback port nobody listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: new connections never complete."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = int(server.getsockname()[1])
    queued = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        queued.append(c)
    try:
        yield port
    finally:
        for c in queued:
            c.close()
        server.close()


@pytest.mark.parametrize(
    ("port", "cause"),
    [("refusing_port", "EndpointConnectionError"), ("silent_port", "ConnectTimeoutError")],
    ids=["refused", "connect-timeout"],
)
def test_s3_unreachable_endpoint_is_transient(
    port: str, cause: str, s3_store_settings: StoreSettings, request: pytest.FixtureRequest
) -> None:
    endpoint = f"http://127.0.0.1:{request.getfixturevalue(port)}"
    store = S3Store(
        s3_store_settings.model_copy(
            update={"endpoint_url": endpoint, "max_attempts": 1, "connect_timeout_seconds": 0.5}
        )
    )
    with pytest.raises(TransientStorageError, match=rf"'landing/c/a\.json'.*{cause}") as caught:
        store.get_bytes("landing/c/a.json")
    assert type(caught.value.__cause__).__name__ == cause


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [(403, "AccessDenied", StorageError), (404, "NoSuchKey", ObjectNotFoundError)],
)
def test_s3_permanent_errors_are_not_retried(
    status: int,
    code: str,
    error: type[StorageError],
    proxy: FaultyS3Proxy,
    s3_store_settings: StoreSettings,
) -> None:
    open_store(s3_store_settings).put_bytes("landing/c/a.json", b"{}")
    store = through(proxy, s3_store_settings, max_attempts=3)
    proxy.fail("GET", "status", key="a.json", status=status, code=code, times=5)

    with pytest.raises(error, match=r"landing/c/a\.json") as caught:
        store.get_bytes("landing/c/a.json")

    assert not isinstance(caught.value, TransientError)
    assert proxy.count("GET", "a.json") == 1


def test_s3_server_errors_are_transient_after_the_client_attempts(
    proxy: FaultyS3Proxy, s3_store_settings: StoreSettings
) -> None:
    open_store(s3_store_settings).put_bytes("landing/c/a.json", b"{}")
    store = through(proxy, s3_store_settings, max_attempts=2)
    proxy.fail("GET", "status", key="a.json", status=503, code="SlowDown", times=2)

    with pytest.raises(TransientStorageError, match="SlowDown"):
        store.get_bytes("landing/c/a.json")

    assert proxy.count("GET", "a.json") == 2
    assert store.get_bytes("landing/c/a.json") == b"{}"


@pytest.mark.usefixtures("prefect_harness")
def test_a_cut_get_is_retried_by_the_task_policy_and_the_task_succeeds(
    proxy: FaultyS3Proxy, s3_store_settings: StoreSettings
) -> None:
    direct = open_store(s3_store_settings)
    direct.put_bytes("landing/scenes/A.tif", b"x")
    direct.put_bytes("landing/scenes/A.json", b'{"name": "A_1", "date": "2026-05-01", "properties": {}}')
    settings = through(proxy, s3_store_settings, max_attempts=3).settings
    collections = {"scenes": CollectionConfig(id="scenes")}
    proxy.fail("GET", "cut", key="A.json")

    found = discover_task(settings, collections)

    assert [p.id for p in found.products] == ["A_1"]
    assert found.failures == []
    assert proxy.count("GET", "A.json") == 2  # the cut one, then the task's retry

    listings = proxy.count("GET", "list-type")
    proxy.fail("GET", "status", key="list-type", status=403, code="AccessDenied", times=10)
    with pytest.raises(StorageError, match="AccessDenied") as caught:
        discover_task(settings, collections)
    assert not isinstance(caught.value, TransientError)
    assert proxy.count("GET", "list-type") == listings + 1  # neither the client nor the task retried


def test_s3_stores_of_one_process_share_one_client_per_settings(s3_store_settings: StoreSettings) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        stores = list(pool.map(lambda _: S3Store(s3_store_settings), range(16)))
    assert len({id(s._client) for s in stores}) == 1
    other = StoreSettings.model_validate({**s3_store_settings.model_dump(), "access_key_id": "someone-else"})
    assert S3Store(other)._client is not stores[0]._client
    stores[0].put_bytes("shared/a.txt", b"a")
    assert stores[-1].get_bytes("shared/a.txt") == b"a"

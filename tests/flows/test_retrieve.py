"""Archive then retrieve under a real Prefect server: byte-exact round trip on S3, shared retrievals."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from prefect.settings import PREFECT_API_URL

from skyvault.archive.lts import lock_path
from skyvault.config.settings import Settings, StoreSettings
from skyvault.errors import LockTimeoutError, MissingFilesError, VerificationError
from skyvault.flows.archive import archive
from skyvault.flows.retrieve import retrieve
from skyvault.models import RetrieveResult
from skyvault.storage.store import open_store
from tests.conftest import release_tag_slots
from tests.flows.test_archive import kill, skyvault_env, skyvault_result, start_skyvault, wait_for

pytestmark = pytest.mark.usefixtures("prefect_harness")


def round_trip_content() -> dict[str, bytes]:
    """Nested folders, empty files, non-ASCII names, one file larger than the block target, >1000 files."""
    content = {f"raw/séance-{i // 100:02d}/κύμα/frame-{i:04d}.dat": os.urandom(i % 257) for i in range(1010)}
    content["big/größe_données.bin"] = os.urandom(700_000)
    content["empty/leer.txt"] = b""
    content["notes/日本語 ファイル.txt"] = "こんにちは\n".encode()
    content["a/b/c/d/e/f/deep.json"] = b'{"deep": true}'
    return content


def run_download_script(result: RetrieveResult, store_settings: StoreSettings, dest: Path) -> None:
    script = open_store(store_settings).get_bytes(result.script_key).decode()
    done = subprocess.run(["bash", "-c", script, "download.sh", str(dest)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(": OK") == len(result.datablocks)


def extract_all(blocks: list[Path], dest: Path) -> dict[str, bytes]:
    dest.mkdir(parents=True, exist_ok=True)
    for block in blocks:
        subprocess.run(["tar", "-xf", str(block), "-C", str(dest)], check=True)
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}


def test_round_trip_on_s3_is_byte_and_path_exact(
    configure: Callable[..., Settings], s3_store_settings: StoreSettings, tmp_path: Path
) -> None:
    settings = configure(
        s3_store_settings,
        lts={
            "root": str(tmp_path / "lts"),
            "create_root": True,
            "datablock_bytes": 256 * 1024,
            "free_space_margin_bytes": 0,
        },
    )
    content = round_trip_content()
    bucket = s3_store_settings.bucket
    assert bucket
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_store_settings.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda item: s3.put_object(Bucket=bucket, Key=f"landing/ds-trip/{item[0]}", Body=item[1]),
                content.items(),
            )
        )

    archived = archive("ds-trip")

    assert archived.file_count == len(content) > 1000
    assert archived.total_bytes == sum(len(d) for d in content.values())
    assert any(b.files == 1 and b.size > 256 * 1024 for b in archived.datablocks)
    assert list(open_store(settings.store).list("landing/ds-trip/")) == []

    retrieved = retrieve("ds-trip")

    assert [b.name for b in retrieved.datablocks] == [b.name for b in archived.datablocks]
    assert all(b.copied for b in retrieved.datablocks)
    assert all(b.url.startswith(s3_store_settings.endpoint_url or "") for b in retrieved.datablocks)
    run_download_script(retrieved, settings.store, tmp_path / "download")
    got = extract_all([tmp_path / "download" / b.name for b in retrieved.datablocks], tmp_path / "restored")
    assert got.keys() == content.keys()
    assert got == content


@pytest.fixture
def archived(configure: Callable[..., Settings], tmp_path: Path) -> Settings:
    settings = configure(
        StoreSettings(root=tmp_path / "store"),
        lts={
            "root": str(tmp_path / "lts"),
            "create_root": True,
            "datablock_bytes": 64 * 1024,
            "free_space_margin_bytes": 0,
        },
    )
    store = open_store(settings.store)
    for i in range(3):
        store.put_bytes(f"landing/ds-shared/f{i}.bin", os.urandom(50_000))
    archive("ds-shared")
    return settings


def test_concurrent_retrievals_copy_each_block_once_and_bad_copies_are_replaced(archived: Settings) -> None:
    results: list[RetrieveResult] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        start.wait()
        try:
            results.append(retrieve("ds-shared"))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    names = [b.name for b in results[0].datablocks]
    assert len(names) == 3
    assert [b.name for b in results[1].datablocks] == names
    copies = {name: sum(b.copied for r in results for b in r.datablocks if b.name == name) for name in names}
    assert copies == dict.fromkeys(names, 1)

    store = open_store(archived.store)
    key = results[0].datablocks[1].key
    data = bytearray(store.get_bytes(key))
    data[1000] ^= 0xFF
    store.put_bytes(key, bytes(data))

    again = retrieve("ds-shared")
    assert [b.copied for b in again.datablocks] == [False, True, False]
    assert hashlib.sha256(store.get_bytes(key)).hexdigest() == again.datablocks[1].sha256


def test_retrieval_refuses_corrupt_lts_blocks_and_unarchived_datasets(archived: Settings) -> None:
    block = archived.lts.root / "ds-shared" / "ds-shared_00002.tar"
    data = bytearray(block.read_bytes())
    data[2000] ^= 0x01
    block.write_bytes(bytes(data))

    with pytest.raises(VerificationError, match=r"ds-shared.*ds-shared_00002\.tar"):
        retrieve("ds-shared")
    assert not open_store(archived.store).exists("retrieval/ds-shared/ds-shared_00002.tar")

    with pytest.raises(MissingFilesError, match="ds-never"):
        retrieve("ds-never")


def holds_lock(
    settings: Settings, kind: str, dataset_id: str, proc: subprocess.Popen[str]
) -> Callable[[], bool]:
    """Whether ``proc`` holds the dataset's lock (its holder name is written into the lock file)."""
    path = lock_path(settings.lts, kind, dataset_id)
    me = f"{socket.gethostname()}:{proc.pid}"
    return lambda: path.exists() and path.read_text() == me


def test_a_retrieval_in_another_process_is_waited_for_and_its_copies_reused(
    archived: Settings, tmp_path: Path
) -> None:
    other = start_skyvault(skyvault_env(tmp_path, PREFECT_API_URL.value()), "upload", "retrieve", "ds-shared")
    try:
        wait_for(other, holds_lock(archived, "retrieve", "ds-shared", other))

        mine = retrieve("ds-shared")  # waits for the other process, then finds every block there

        out, _ = other.communicate(timeout=300)
    finally:
        kill(other)
    assert other.returncode == 0, out
    theirs = skyvault_result(out)
    assert [b["copied"] for b in theirs["datablocks"]] == [True, True, True]
    assert [b.copied for b in mine.datablocks] == [False, False, False]


def test_a_killed_retrieval_never_blocks_the_next_which_copies_the_rest(
    configure: Callable[..., Settings], archived: Settings, tmp_path: Path
) -> None:
    settings = configure(
        archived.store,
        lts={**archived.lts.model_dump(mode="json"), "root": str(archived.lts.root)},
        locks={"wait_seconds": 1},
    )
    store = open_store(settings.store)

    def copied() -> set[str]:
        return {o.key.rsplit("/", 1)[1] for o in store.list("retrieval/ds-shared/") if o.key.endswith(".tar")}

    other = start_skyvault(skyvault_env(tmp_path, PREFECT_API_URL.value()), "upload", "retrieve", "ds-shared")
    held = holds_lock(settings, "retrieve", "ds-shared", other)
    try:
        wait_for(other, lambda: held() and len(copied()) == 1)
        with pytest.raises(
            LockTimeoutError, match=rf"retrieve of dataset 'ds-shared'.* {socket.gethostname()}:{other.pid} "
        ):
            retrieve("ds-shared")
    finally:
        kill(other)
    assert other.returncode == -signal.SIGKILL
    done = copied()
    assert len(done) in (1, 2)
    # The killed process's tag slots would come back when their leases expire, but the test
    # server (like the embedded one) runs no service that reclaims expired leases; free them as
    # an operator does.
    release_tag_slots()

    result = retrieve("ds-shared")

    assert {b.name for b in result.datablocks if not b.copied} == done
    assert len(result.datablocks) == 3
    run_download_script(result, settings.store, tmp_path / "download")

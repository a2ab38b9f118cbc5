"""Long-term storage: datablocks written, verified and read back; manifests; retrieval copies.

LTS is a mounted folder, ``<lts-root>/<dataset-id>/``. A datablock is streamed straight from its
sources into ``<name>.part`` while the tar's sha256 and every member's sha256 are computed (one
pass, no scratch copy), fsynced and renamed when complete. Verification reads it back with the
page cache for that file dropped, so the bytes come from the device, and compares the tar
checksum and every member's checksum. ``manifest.json`` is written last: its presence means the
dataset's archive is complete. Archive runs of one dataset, and retrieve runs of one dataset,
take turns through a ``flock`` under ``<lts-root>/.locks/`` (:func:`dataset_lock`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from skyvault.archive.packing import open_file, padding, tar_header, tar_trailer
from skyvault.checksum import sha256_stream
from skyvault.config.settings import LtsSettings, StoreSettings
from skyvault.errors import (
    DatasetError,
    InsufficientSpaceError,
    MissingFilesError,
    StorageError,
    VerificationError,
)
from skyvault.ids import check_id
from skyvault.models import (
    Datablock,
    DatablockMember,
    DatasetFile,
    DatasetSource,
    Manifest,
    PlannedDatablock,
    RetrievedBlock,
    RetrieveResult,
)
from skyvault.storage.lock import flock
from skyvault.storage.store import ObjectStore, open_store

CHUNK = 4 * 1024 * 1024
LOCKS = ".locks"
MANIFEST = "manifest.json"
PART = ".part"
SCRIPT = "download.sh"
SPACE_POLL_SECONDS = 10.0
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_ZEROS = bytes(512)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def dataset_dir(lts: LtsSettings, dataset_id: str) -> Path:
    """The dataset's folder on LTS, ``<lts-root>/<dataset-id>``."""
    return lts.root / check_id(dataset_id, "dataset id")


def manifest_path(lts: LtsSettings, dataset_id: str) -> Path:
    """Where the dataset's manifest is on LTS."""
    return dataset_dir(lts, dataset_id) / MANIFEST


# --- one run per dataset --------------------------------------------------------------------------


def lock_path(lts: LtsSettings, kind: str, dataset_id: str) -> Path:
    """The lock file of a dataset's ``kind`` runs, ``<lts-root>/.locks/<kind>-<dataset-id>.lock``."""
    return lts.root / LOCKS / f"{check_id(kind, 'lock kind')}-{check_id(dataset_id, 'dataset id')}.lock"


def dataset_lock(
    lts: LtsSettings, kind: str, dataset_id: str, *, timeout_seconds: float | None
) -> contextlib.AbstractContextManager[None]:
    """Hold the dataset's ``kind`` lock (``archive``, ``retrieve``) while inside.

    An exclusive ``flock`` on :func:`lock_path`, so runs of one kind and dataset wait for each
    other in any process on any host that mounts this LTS (with a filesystem whose ``flock`` is
    shared between its clients). The kernel frees the lock when its holder dies, so a killed run
    never blocks the next one. ``timeout_seconds=None`` waits until the holder is done.

    Raises:
        DatasetError: the LTS root is missing (see :func:`check_root`).
        LockTimeoutError: another run still holds it after ``timeout_seconds``; the message names
            the lock and the holder (``host:pid``).

    """
    check_root(lts, dataset_id, kind)
    return flock(
        lock_path(lts, kind, dataset_id), f"{kind} of dataset {dataset_id!r}", timeout_seconds=timeout_seconds
    )


# --- free space -----------------------------------------------------------------------------------


def check_root(lts: LtsSettings, dataset_id: str, action: str = "archive") -> None:
    """Make sure the LTS root is there (created only when ``lts.create_root``).

    Raises:
        DatasetError: the root is missing (an unmounted LTS, say) and may not be created; the
            message names the root, the ``action`` and the dataset.
    """
    if lts.root.is_dir():
        return
    if not lts.create_root:
        raise DatasetError(
            f"LTS root {lts.root} does not exist (not mounted?); cannot {action} dataset {dataset_id!r}"
        )
    try:
        lts.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create LTS root {lts.root} for dataset {dataset_id!r}: {e}") from e


def free_bytes(path: Path) -> int:
    """Bytes available to this process on the filesystem holding ``path`` (or its nearest parent)."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize


def ensure_free_space(
    lts: LtsSettings,
    dataset_id: str,
    needed: int,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Wait (at most ``lts.free_space_wait_seconds``) until LTS has ``needed`` bytes plus the margin.

    Returns:
        The free bytes seen.

    Raises:
        InsufficientSpaceError: still not enough space when the wait is over; the message names
            the dataset, the bytes needed (with the margin) and the bytes free.

    """
    check_root(lts, dataset_id)
    deadline = clock() + lts.free_space_wait_seconds
    while True:
        free = free_bytes(lts.root)
        if free >= needed + lts.free_space_margin_bytes:
            return free
        left = deadline - clock()
        if left <= 0:
            raise InsufficientSpaceError(
                f"not enough free space on LTS {lts.root} for dataset {dataset_id!r}: "
                f"{needed + lts.free_space_margin_bytes} bytes needed ({needed} for its datablocks "
                f"+ {lts.free_space_margin_bytes} margin), {free} bytes free"
            )
        sleep(min(SPACE_POLL_SECONDS, left))


# --- writing and verifying datablocks ---------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _TarWriter:
    """Writes bytes to a file descriptor, hashing them, and counts the offset."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0
        self.sha = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> None:
        self.sha.update(data)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.offset += len(data)


def _copy_member(
    source: DatasetSource, file: DatasetFile, objects: ObjectStore | None, out: _TarWriter
) -> str:
    sha = hashlib.sha256()
    with open_file(source, file, objects) as stream:
        remaining = file.size
        while remaining:
            chunk = stream.read(min(CHUNK, remaining))
            if not chunk:
                raise MissingFilesError(
                    f"dataset {source.dataset_id!r}: {file.path!r} ended after {file.size - remaining} "
                    f"of {file.size} bytes (changed while archiving?)"
                )
            sha.update(chunk)
            out.write(chunk)
            remaining -= len(chunk)
        if stream.read(1):
            raise DatasetError(
                f"dataset {source.dataset_id!r}: {file.path!r} grew beyond {file.size} bytes while archiving"
            )
    return sha.hexdigest()


def write_datablock(
    block: PlannedDatablock, source: DatasetSource, store: StoreSettings, lts: LtsSettings
) -> Datablock:
    """Stream a planned datablock from its sources to LTS, checksumming as it is written.

    The tar is written to ``<name>.part``, fsynced, then renamed to ``<name>``.

    Raises:
        InsufficientSpaceError: LTS filled up while writing (the ``.part`` file is removed).
        MissingFilesError: a source file disappeared or shrank.
        DatasetError: LTS could not be written, or a source changed.

    """
    folder = dataset_dir(lts, block.dataset_id)
    final = folder / block.name
    part = folder / (block.name + PART)
    objects = open_store(store) if source.kind == "store" else None
    started = _now()
    members: list[DatablockMember] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            out = _TarWriter(fd)
            for file in block.files:
                out.write(tar_header(file))
                if file.link is not None:
                    members.append(
                        DatablockMember(
                            path=file.path, size=0, sha256=EMPTY_SHA256, offset=out.offset, link=file.link
                        )
                    )
                    continue
                offset = out.offset
                digest = _copy_member(source, file, objects, out)
                out.write(_ZEROS[: padding(file.size)])
                members.append(DatablockMember(path=file.path, size=file.size, sha256=digest, offset=offset))
            out.write(bytes(tar_trailer(out.offset)))
            os.fsync(fd)
        finally:
            os.close(fd)
        if out.offset != block.size:
            raise DatasetError(
                f"dataset {block.dataset_id!r}: datablock {block.name} came out at {out.offset} bytes, "
                f"planned {block.size}"
            )
        os.replace(part, final)
        _fsync_dir(folder)
    except OSError as e:
        part.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientSpaceError(
                f"LTS {lts.root} ran out of space writing datablock {block.name} of dataset "
                f"{block.dataset_id!r} ({block.size} bytes needed, {free_bytes(lts.root)} bytes free)"
            ) from e
        raise DatasetError(
            f"dataset {block.dataset_id!r}: cannot write datablock {block.name} to {folder}: {e}"
        ) from e
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return Datablock(
        name=block.name,
        size=out.offset,
        sha256=out.sha.hexdigest(),
        members=tuple(members),
        write_started=started,
        write_finished=_now(),
    )


def drop_cache(fd: int) -> None:
    """Flush a file and drop its pages from the page cache, so the next read hits the device."""
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def read_checksums(path: Path, members: tuple[DatablockMember, ...]) -> tuple[str, int, list[str]]:
    """Read a tar once, uncached: its sha256, its size and the sha256 of each member's data.

    Members are located by their recorded offsets; the result list follows ``members``' order.
    """
    order = sorted(range(len(members)), key=lambda i: members[i].offset)
    hashes = [hashlib.sha256() for _ in members]
    whole = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    pos = 0
    first = 0
    with open(path, "rb", buffering=0) as f:
        drop_cache(f.fileno())
        while n := f.readinto(buf):
            chunk = view[:n]
            whole.update(chunk)
            end = pos + n
            k = first
            while k < len(order) and members[order[k]].offset < end:
                m = members[order[k]]
                lo, hi = max(m.offset, pos), min(m.offset + m.size, end)
                if hi > lo:
                    hashes[order[k]].update(chunk[lo - pos : hi - pos])
                k += 1
            while first < len(order) and members[order[first]].offset + members[order[first]].size <= end:
                first += 1
            pos = end
    return whole.hexdigest(), pos, [h.hexdigest() for h in hashes]


def verify_datablock(lts: LtsSettings, dataset_id: str, block: Datablock) -> Datablock:
    """Read a datablock back from LTS (page cache dropped) and check it against ``block``.

    Raises:
        VerificationError: the block is missing, has the wrong size, or its checksum or any
            member's checksum differs; the message names the dataset and the block.

    """
    path = dataset_dir(lts, dataset_id) / block.name
    try:
        sha, size, member_shas = read_checksums(path, block.members)
    except FileNotFoundError as e:
        raise VerificationError(
            f"dataset {dataset_id!r}: datablock {block.name} is missing from {path.parent}"
        ) from e
    except OSError as e:
        raise VerificationError(
            f"dataset {dataset_id!r}: cannot read datablock {block.name} back: {e}"
        ) from e
    problems = []
    if size != block.size:
        problems.append(f"size {size} instead of {block.size}")
    if sha != block.sha256:
        problems.append(f"sha256 {sha} instead of {block.sha256}")
    bad = [m.path for m, got in zip(block.members, member_shas, strict=True) if got != m.sha256]
    if bad:
        shown = ", ".join(repr(p) for p in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        problems.append(f"{len(bad)} member(s) differ: {shown}")
    if problems:
        raise VerificationError(
            f"dataset {dataset_id!r}: datablock {block.name} on LTS does not match what was written: "
            + "; ".join(problems)
        )
    return block


# --- manifests and cleanup --------------------------------------------------------------------------


def build_manifest(source: DatasetSource, lts: LtsSettings, blocks: list[Datablock]) -> Manifest:
    """The manifest of a dataset whose datablocks are all written and verified."""
    members = [m for b in blocks for m in b.members]
    return Manifest(
        dataset_id=source.dataset_id,
        source=source.describe(),
        created=_now(),
        datablock_bytes=lts.datablock_bytes,
        file_count=len(members),
        total_bytes=sum(m.size for m in members),
        datablocks=tuple(blocks),
    )


def write_manifest(lts: LtsSettings, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (``.part``, fsync, rename, fsync of the folder)."""
    path = manifest_path(lts, manifest.dataset_id)
    part = path.with_name(MANIFEST + PART)
    try:
        with open(part, "wb") as f:
            f.write(manifest.model_dump_json(indent=2).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
        _fsync_dir(path.parent)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise DatasetError(f"dataset {manifest.dataset_id!r}: cannot write the manifest {path}: {e}") from e
    return path


def read_manifest(lts: LtsSettings, dataset_id: str) -> Manifest | None:
    """The dataset's manifest, or None when the dataset is not (completely) archived.

    Raises:
        DatasetError: the manifest exists but cannot be read or parsed.

    """
    path = manifest_path(lts, dataset_id)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DatasetError(f"dataset {dataset_id!r}: cannot read the manifest {path}: {e}") from e
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as e:
        raise DatasetError(f"dataset {dataset_id!r}: the manifest {path} is invalid: {e}") from e
    if manifest.dataset_id != dataset_id:
        raise DatasetError(f"dataset {dataset_id!r}: the manifest {path} is for {manifest.dataset_id!r}")
    return manifest


def remove_partial(lts: LtsSettings, dataset_id: str) -> list[str]:
    """Remove what an unfinished archive left on LTS; returns the names removed.

    ``.part`` files always go. Datablocks go too when there is no manifest (the archive never
    completed); with a manifest they are the dataset's archive and stay.
    """
    folder = dataset_dir(lts, dataset_id)
    if not folder.is_dir():
        return []
    complete = (folder / MANIFEST).exists()
    removed = []
    for path in sorted(folder.iterdir()):
        name = path.name
        ours = name.startswith(f"{dataset_id}_") and name.endswith(".tar")
        if name.endswith(PART) or (ours and not complete):
            path.unlink(missing_ok=True)
            removed.append(name)
    if not complete:
        with contextlib.suppress(OSError):
            folder.rmdir()
    return removed


# --- retrieval --------------------------------------------------------------------------------------


def retrieval_key(lts: LtsSettings, dataset_id: str, name: str) -> str:
    """Object key of a retrieved file, ``<retrieval-prefix>/<dataset-id>/<name>``."""
    return f"{lts.retrieval_prefix.strip('/')}/{check_id(dataset_id, 'dataset id')}/{name}"


def retrieved_copy_ok(lts: LtsSettings, store: StoreSettings, dataset_id: str, block: Datablock) -> bool:
    """Whether the retrieval prefix already holds this datablock with the right size and sha256."""
    objects = open_store(store)
    key = retrieval_key(lts, dataset_id, block.name)
    info = objects.head(key)
    if info is None or info.size != block.size:
        return False
    with objects.open_read(key) as stream:
        sha, size = sha256_stream(stream)
    return sha == block.sha256 and size == block.size


def upload_datablock(lts: LtsSettings, store: StoreSettings, dataset_id: str, block: Datablock) -> str:
    """Copy a datablock from LTS to the retrieval prefix; returns its key."""
    key = retrieval_key(lts, dataset_id, block.name)
    path = dataset_dir(lts, dataset_id) / block.name
    try:
        open_store(store).put_file(key, path, content_type="application/x-tar")
    except StorageError as e:
        raise type(e)(f"dataset {dataset_id!r}: cannot upload datablock {block.name} to {key!r}: {e}") from e
    return key


def download_script(dataset_id: str, blocks: list[RetrievedBlock], expires_at: dt.datetime) -> str:
    """A bash script that downloads every datablock with curl and checks it with ``sha256sum -c``."""
    lines = [
        "#!/usr/bin/env bash",
        f"# Datablocks of dataset {dataset_id}; the links expire at {expires_at.isoformat()}.",
        "# Usage: bash download.sh [target-folder]",
        "set -euo pipefail",
        'mkdir -p "${1:-.}"',
        'cd "${1:-.}"',
    ]
    for b in blocks:
        lines.append(f"curl -fsSL --retry 3 -o {shlex.quote(b.name)} {shlex.quote(b.url)}")
    lines.append("sha256sum -c - <<'SHA256SUMS'")
    lines.extend(f"{b.sha256}  {b.name}" for b in blocks)
    lines.append("SHA256SUMS")
    return "\n".join(lines) + "\n"


def publish_retrieval(
    lts: LtsSettings, store: StoreSettings, manifest: Manifest, copied: set[str]
) -> RetrieveResult:
    """Presign every retrieved datablock, store the download script next to them, describe it all."""
    objects = open_store(store)
    seconds = int(lts.url_expiry_days * 86400)
    expires_at = _now() + dt.timedelta(seconds=seconds)
    blocks = []
    for block in manifest.datablocks:
        key = retrieval_key(lts, manifest.dataset_id, block.name)
        blocks.append(
            RetrievedBlock(
                name=block.name,
                key=key,
                size=block.size,
                sha256=block.sha256,
                url=objects.presigned_url(key, seconds),
                copied=block.name in copied,
            )
        )
    script_key = retrieval_key(lts, manifest.dataset_id, SCRIPT)
    script = download_script(manifest.dataset_id, blocks, expires_at)
    objects.put_bytes(script_key, script.encode("utf-8"), content_type="text/x-shellscript")
    objects.put_bytes(
        retrieval_key(lts, manifest.dataset_id, MANIFEST),
        manifest.model_dump_json(indent=2).encode("utf-8"),
        content_type="application/json",
    )
    return RetrieveResult(
        dataset_id=manifest.dataset_id,
        prefix=retrieval_key(lts, manifest.dataset_id, ""),
        datablocks=tuple(blocks),
        script_key=script_key,
        script_url=objects.presigned_url(script_key, seconds),
        expires_at=expires_at,
    )

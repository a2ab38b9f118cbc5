"""Datasets as files, and files as tar datablocks.

A dataset is every object under a landing prefix or every file under a local folder. Its files are
planned into uncompressed POSIX (pax) tar datablocks of about ``datablock_bytes`` each, in a
deterministic order so a re-run plans the same blocks. Member paths are always relative: absolute
paths, ``..`` and links that leave the dataset are refused. Tar headers are produced here so the
exact size of every block and the offset of every member's data are known before anything is
written.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

from skyvault.checksum import sha256_stream
from skyvault.config.settings import StoreSettings
from skyvault.errors import DatasetError, MissingFilesError, StorageError, UnsafePathError
from skyvault.ids import check_id
from skyvault.models import DatasetFile, DatasetSource, PlannedDatablock
from skyvault.storage.store import ObjectStore, check_prefix, open_store

BLOCKSIZE = tarfile.BLOCKSIZE
RECORDSIZE = tarfile.RECORDSIZE
DELETE_THREADS = 8


def landing_prefix(dataset_id: str) -> str:
    """The default landing prefix of a dataset, ``landing/<dataset-id>/``."""
    return f"landing/{check_id(dataset_id, 'dataset id')}/"


def datablock_name(dataset_id: str, index: int) -> str:
    """The name of a dataset's ``index``-th datablock (from 1), ``<dataset-id>_<nnnnn>.tar``."""
    return f"{dataset_id}_{index:05d}.tar"


def dataset_source(
    dataset_id: str, *, source_prefix: str | None = None, source_dir: str | Path | None = None
) -> DatasetSource:
    """Describe where a dataset's files are; by default its landing prefix on the object store.

    Raises:
        InvalidIdentifierError: the dataset id is unsafe.
        UnsafePathError: the prefix is unsafe.
        DatasetError: both a prefix and a folder were given.

    """
    check_id(dataset_id, "dataset id")
    if source_prefix is not None and source_dir is not None:
        raise DatasetError(f"dataset {dataset_id!r}: give a source prefix or a source folder, not both")
    if source_dir is not None:
        return DatasetSource(dataset_id=dataset_id, kind="local", location=str(Path(source_dir).absolute()))
    prefix = landing_prefix(dataset_id) if source_prefix is None else source_prefix
    if not prefix.endswith("/"):
        prefix += "/"
    try:
        check_prefix(prefix)
    except StorageError as e:
        raise UnsafePathError(f"dataset {dataset_id!r}: unsafe source prefix {prefix!r}") from e
    if prefix == "/":
        raise UnsafePathError(f"dataset {dataset_id!r}: the source prefix must not be the whole store")
    return DatasetSource(dataset_id=dataset_id, kind="store", location=prefix)


def check_member_path(path: str, dataset_id: str) -> str:
    """Return ``path`` if it is a safe relative member path, else raise naming it.

    Raises:
        UnsafePathError: the path is empty, absolute, has ``.``/``..``/empty segments, a NUL, or
            cannot be encoded as UTF-8.

    """
    bad = not path or path.startswith("/") or "\x00" in path
    if not bad:
        bad = any(part in ("", ".", "..") for part in path.split("/"))
    if not bad:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            bad = True
    if bad:
        raise UnsafePathError(f"dataset {dataset_id!r}: unsafe member path {path!r}")
    return path


def list_store_files(store: ObjectStore, source: DatasetSource) -> list[DatasetFile]:
    """Every object under the source prefix as a dataset file (folder markers ``x/`` are skipped)."""
    files = []
    for obj in store.list(source.location):
        rel = obj.key[len(source.location) :]
        if rel.endswith("/") and obj.size == 0:
            continue
        files.append(
            DatasetFile(
                path=check_member_path(rel, source.dataset_id),
                source=obj.key,
                size=obj.size,
                mtime=int(obj.last_modified.timestamp()),
            )
        )
    return files


def _link_target(root: Path, link: Path, dataset_id: str, rel: str) -> str:
    target = os.readlink(link)
    resolved = (link.parent / target).resolve()
    if os.path.isabs(target) or not resolved.is_relative_to(root):
        raise UnsafePathError(
            f"dataset {dataset_id!r}: link {rel!r} -> {target!r} points outside the dataset"
        )
    return target


def list_local_files(source: DatasetSource) -> list[DatasetFile]:
    """Every file and symbolic link under a local folder as a dataset file.

    Raises:
        MissingFilesError: the folder does not exist.
        UnsafePathError: a link points outside the folder or is absolute.
        DatasetError: an entry is neither a regular file nor a link (fifo, device, socket).

    """
    root = Path(source.location).resolve()
    if not root.is_dir():
        raise MissingFilesError(f"dataset {source.dataset_id!r}: folder {source.location} does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        names = sorted(filenames) + [d for d in dirnames if (here / d).is_symlink()]
        for name in names:
            full = here / name
            rel = full.relative_to(root).as_posix()
            check_member_path(rel, source.dataset_id)
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = _link_target(root, full, source.dataset_id, rel)
                files.append(
                    DatasetFile(path=rel, source=str(full), size=0, mtime=int(st.st_mtime), link=target)
                )
            elif stat.S_ISREG(st.st_mode):
                files.append(
                    DatasetFile(
                        path=rel,
                        source=str(full),
                        size=st.st_size,
                        mtime=int(st.st_mtime),
                        mode=stat.S_IMODE(st.st_mode),
                    )
                )
            else:
                raise DatasetError(f"dataset {source.dataset_id!r}: {rel!r} is not a regular file or link")
    return files


def list_dataset(source: DatasetSource, store: StoreSettings) -> list[DatasetFile]:
    """The dataset's files, sorted by path (empty when the source has none)."""
    if source.kind == "local":
        files = list_local_files(source)
    else:
        files = list_store_files(open_store(store), source)
    return sorted(files, key=lambda f: f.path)


def tar_header(file: DatasetFile) -> bytes:
    """The tar header bytes (pax extended header included when needed) of one member."""
    info = tarfile.TarInfo(file.path)
    info.mtime = file.mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if file.link is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = file.link
        info.size = 0
        info.mode = 0o777
    else:
        info.type = tarfile.REGTYPE
        info.size = file.size
        info.mode = file.mode
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def padding(size: int) -> int:
    """Bytes of NUL padding after ``size`` bytes of member data."""
    return -size % BLOCKSIZE


def member_bytes(file: DatasetFile) -> int:
    """Bytes one member takes in a tar: header, data and padding."""
    data = 0 if file.link is not None else file.size
    return len(tar_header(file)) + data + padding(data)


def tar_trailer(offset: int) -> int:
    """Bytes of the end-of-archive marker and record padding after ``offset`` bytes of members."""
    end = offset + 2 * BLOCKSIZE
    return end + (-end % RECORDSIZE) - offset


def plan_datablocks(dataset_id: str, files: list[DatasetFile], target_bytes: int) -> list[PlannedDatablock]:
    """Group files into datablocks of at most ``target_bytes`` (exact tar size) each.

    Files are taken in path order; a block is closed when the next file would make it larger than
    the target, so a file larger than the target gets a block of its own. The same files and
    target always give the same blocks.

    Raises:
        MissingFilesError: there are no files.
        UnsafePathError: a path is unsafe or appears twice.

    """
    if not files:
        raise MissingFilesError(f"dataset {dataset_id!r} has no files to archive")
    ordered = sorted(files, key=lambda f: f.path)
    seen: set[str] = set()
    blocks: list[PlannedDatablock] = []
    current: list[DatasetFile] = []
    used = 0

    def close() -> None:
        nonlocal current, used
        index = len(blocks) + 1
        blocks.append(
            PlannedDatablock(
                dataset_id=dataset_id,
                name=datablock_name(dataset_id, index),
                index=index,
                size=used + tar_trailer(used),
                files=tuple(current),
            )
        )
        current, used = [], 0

    for file in ordered:
        check_member_path(file.path, dataset_id)
        if file.path in seen:
            raise UnsafePathError(f"dataset {dataset_id!r}: member path {file.path!r} appears twice")
        seen.add(file.path)
        size = member_bytes(file)
        if current and used + size + tar_trailer(used + size) > target_bytes:
            close()
        current.append(file)
        used += size
    if current:
        close()
    return blocks


@contextlib.contextmanager
def open_file(source: DatasetSource, file: DatasetFile, store: ObjectStore | None) -> Iterator[IO[bytes]]:
    """Open one dataset file for reading (object store stream or local file).

    Raises:
        MissingFilesError: the file has disappeared since it was listed.

    """
    if source.kind == "store":
        if store is None:
            raise DatasetError(f"dataset {source.dataset_id!r}: no object store to read {file.source!r}")
        with store.open_read(file.source) as stream:
            yield stream
        return
    try:
        f = open(file.source, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError as e:
        raise MissingFilesError(f"dataset {source.dataset_id!r}: file {file.path!r} has disappeared") from e
    except OSError as e:
        raise DatasetError(f"dataset {source.dataset_id!r}: cannot read {file.path!r}: {e}") from e
    with f:
        yield f


def changed_files(
    source: DatasetSource,
    files: list[DatasetFile],
    store: StoreSettings,
    expected: dict[str, tuple[int, str]],
) -> list[str]:
    """Paths of the files whose size or sha256 differ from ``expected`` (or are not in it)."""
    objects = open_store(store) if source.kind == "store" else None
    changed = []
    for file in files:
        want = expected.get(file.path)
        if want is None or want[0] != file.size:
            changed.append(file.path)
            continue
        if file.link is not None:
            continue
        with open_file(source, file, objects) as stream:
            digest, _ = sha256_stream(stream)
        if digest != want[1]:
            changed.append(file.path)
    return changed


def delete_files(source: DatasetSource, files: list[DatasetFile], store: StoreSettings) -> int:
    """Delete a dataset's landing files (and the folders they leave empty); returns how many.

    A local folder itself is kept, only its content is removed.
    """
    if source.kind == "store":
        objects = open_store(store)
        with ThreadPoolExecutor(DELETE_THREADS) as pool:
            list(pool.map(objects.delete, [f.source for f in files]))
        return len(files)
    root = Path(source.location).resolve()
    parents: set[Path] = set()
    for file in files:
        path = Path(file.source)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise DatasetError(f"dataset {source.dataset_id!r}: cannot delete {file.path!r}: {e}") from e
        parents.update(p for p in path.parents if p.is_relative_to(root) and p != root)
    for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()
    return len(files)

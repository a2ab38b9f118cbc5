"""The object store: a local folder or an S3 bucket behind one small interface.

Keys are ``/``-separated relative names (``cogs/<collection>/<id>.tif``). Writes are atomic: a
reader sees either the old object or the complete new one, never a partial file (local: write to a
temporary name in the same folder, then rename; S3: a PUT or a completed multipart upload).
A local writer holds a ``flock`` on its temporary file, so a writer that was killed is recognised
by the lock the kernel dropped: the next process that writes into that folder removes its file.
Documents several processes change (catalog.json, collection.json, TileJSON) go through
:meth:`ObjectStore.update`, and :meth:`ObjectStore.lock` is a lock across processes and hosts
(see :mod:`skyvault.storage.lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable
from urllib.parse import urlparse

from skyvault.config.settings import StoreSettings
from skyvault.errors import (
    BucketNotFoundError,
    LinkOutsideStoreError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from skyvault.models import ObjectInfo
from skyvault.storage.lock import flock, s3_lock, s3_update


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key.

    Raises:
        StorageError: the key is empty, absolute, or has empty, ``.`` or ``..`` segments.

    """
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise StorageError(f"unsafe object key {key!r}")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise StorageError(f"unsafe object key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """Like :func:`check_key` but allows the empty prefix and a trailing ``/``."""
    if prefix == "":
        return prefix
    return check_key(prefix[:-1] if prefix.endswith("/") else prefix) + ("/" if prefix.endswith("/") else "")


@runtime_checkable
class ObjectStore(Protocol):
    """What skyvault needs from an object store."""

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None: ...
    def move_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        """Store the local file ``path`` as ``key`` and remove it from ``path``.

        A local store on the same filesystem renames it into place (no copy); otherwise it is
        copied or uploaded, then removed.
        """
        ...

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None: ...
    def get_file(self, key: str, dest: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def open_read(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...
    def head(self, key: str) -> ObjectInfo | None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def update(
        self, key: str, fn: Callable[[bytes | None], bytes | None], content_type: str | None = None
    ) -> bytes | None:
        """Atomically read-modify-write one object, safe against other processes and hosts.

        ``fn`` gets the current bytes (None when absent) and returns the new bytes (None, or the
        same bytes: leave it unchanged). It may run more than once, so it must only compute.
        Returns the bytes stored afterwards (None: still absent).
        """
        ...

    def lock(
        self, key: str, *, lease_seconds: float, timeout_seconds: float | None
    ) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock named ``key`` across processes and hosts, held while inside.

        A holder that dies frees it: at once on a local folder (``flock``), after
        ``lease_seconds`` on S3 (a lease object at ``key``, renewed while held; store no data
        there). ``timeout_seconds=None`` waits as long as it takes.

        Raises:
            LockTimeoutError: still held by another after ``timeout_seconds``; names key and holder.

        """
        ...

    def gdal_path(self, key: str) -> str: ...
    def holds_gdal_path(self, path: str) -> bool:
        """True when ``path`` (a file GDAL opened) is an object of this store, links resolved."""
        ...

    def gdal_env(self) -> dict[str, Any]:
        """Keyword arguments for ``rasterio.Env`` that let GDAL read :meth:`gdal_path` in place."""
        ...

    def url(self, key: str) -> str: ...
    def presigned_url(self, key: str, expires_seconds: int) -> str: ...


#: Suffixes of a local writer's temporary file: while it is being locked, and once it is.
NEW_SUFFIX, PART_SUFFIX = ".new", ".part"

#: A ``.new`` file older than this was left by a writer killed between creating and locking it.
STALE_NEW_SECONDS = 60.0

_swept: set[tuple[int, Path]] = set()
_swept_guard = threading.Lock()


def sweep_dead_writes(folder: Path) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder``; once per process and folder.

    A ``.part`` file whose ``flock`` can be taken has no living writer (the kernel drops the
    lock of a process that dies, whichever container it ran in). Returns the files removed.
    """
    with _swept_guard:
        if (os.getpid(), folder) in _swept:
            return []
        _swept.add((os.getpid(), folder))
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        path = Path(entry.path)
        if not entry.name.startswith("."):
            continue
        if entry.name.endswith(NEW_SUFFIX):
            with contextlib.suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_NEW_SECONDS:
                    path.unlink()
                    removed.append(path)
        elif entry.name.endswith(PART_SUFFIX) and _writer_is_gone(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def _locked_part(folder: Path, name: str) -> tuple[int, Path]:
    """A new ``.<name>.<random>.part`` file in ``folder``, locked before any process can see it.

    Where the filesystem allows, the file is made unnamed (``O_TMPFILE``), locked, then linked in:
    a writer killed at any point leaves nothing behind. Elsewhere it is created as
    ``.<name>.<random>.new``, locked and renamed; a writer killed before the rename leaves a
    ``.new`` file, removed by a later sweep once it is old. Returns the open descriptor holding
    the lock and the file's path.
    """
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            fd = os.open(folder, tmpfile | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
        else:
            path = folder / f".{name}.{secrets.token_hex(6)}{PART_SUFFIX}"
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/<fd>: os.link uses linkat only when
                # given a directory descriptor
                proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.link(str(fd), path, src_dir_fd=proc, follow_symlinks=True)
                finally:
                    os.close(proc)
            except OSError:
                os.close(fd)  # no /proc, or no linking of unnamed files here: the portable way
            else:
                return fd, path
    fd, new = tempfile.mkstemp(prefix=f".{name}.", suffix=NEW_SUFFIX, dir=folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = Path(new[: -len(NEW_SUFFIX)] + PART_SUFFIX)
        os.rename(new, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, path


def _writer_is_gone(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # renamed into place or removed since the folder was read
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # its writer holds it
    else:
        return True
    finally:
        os.close(fd)


class LocalStore:
    """An object store in a local folder; keys map to files below ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        """Where ``key`` lives: its folder resolved, which must lie inside the root.

        The last segment is left as it is, so a write replaces a link there and a delete removes
        the link, neither following it.

        Raises:
            StorageError: the key is unsafe.
            LinkOutsideStoreError: a folder on the way is a link that leads out of the root.

        """
        path = self.root / check_key(key)
        folder = Path(os.path.realpath(path.parent))
        if not folder.is_relative_to(self.root):
            raise LinkOutsideStoreError(
                f"object {key!r}: its folder leads to {folder}, outside the store root {self.root}; "
                "links out of the store are not followed"
            )
        return folder / path.name

    def _target(self, key: str) -> Path:
        """The file ``key`` names, following links only while they stay inside the root.

        Raises:
            LinkOutsideStoreError: ``key`` (or a folder on the way) is a link out of the root.

        """
        real = Path(os.path.realpath(self._path(key)))
        if not real.is_relative_to(self.root):
            raise LinkOutsideStoreError(
                f"object {key!r} is a link to {real}, outside the store root {self.root}; "
                "links out of the store are not followed"
            )
        return real

    def _open(self, key: str) -> IO[bytes]:
        """``key``'s file opened for reading; a link swapped in after the check is not followed."""
        path = self._target(key)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError as e:
            raise ObjectNotFoundError(f"object {key!r} not found in {self.root}") from e
        except OSError as e:
            raise StorageError(f"cannot read {key!r}: {e}") from e
        return os.fdopen(fd, "rb")

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        dest = self._path(key)
        with self._atomic(dest) as tmp:
            shutil.copyfile(path, tmp)

    def move_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        dest = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            sweep_dead_writes(dest.parent)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise StorageError(f"cannot write {dest}: {e}") from e
        try:
            if os.fstat(fd).st_dev != os.stat(dest.parent).st_dev:
                self.put_file(key, path, content_type)
                path.unlink()
                return
            # the file is locked before it appears as a .part file, as every .part file is
            fcntl.flock(fd, fcntl.LOCK_EX)
            tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}{PART_SUFFIX}"
            os.rename(path, tmp)
            try:
                os.chmod(tmp, 0o644)
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as e:
            raise StorageError(f"cannot write {dest}: {e}") from e
        finally:
            os.close(fd)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        dest = self._path(key)
        with self._atomic(dest) as tmp:
            tmp.write_bytes(data)

    @contextlib.contextmanager
    def _atomic(self, dest: Path) -> Iterator[Path]:
        """A locked temporary file beside ``dest``, renamed to ``dest`` when the block succeeds.

        Every ``.<name>.<random>.part`` file is locked while its writer lives: see
        :func:`_locked_part`.
        """
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            sweep_dead_writes(dest.parent)
            fd, tmp = _locked_part(dest.parent, dest.name)
        except OSError as e:
            raise StorageError(f"cannot write {dest}: {e}") from e
        try:
            yield tmp
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {dest}: {e}") from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)  # the lock goes with it, after the rename

    def get_file(self, key: str, dest: Path) -> None:
        src = self._target(key)
        try:
            shutil.copyfile(src, dest)
        except FileNotFoundError as e:
            raise ObjectNotFoundError(f"object {key!r} not found in {self.root}") from e
        except OSError as e:
            raise StorageError(f"cannot read {key!r}: {e}") from e

    def get_bytes(self, key: str) -> bytes:
        with self._open(key) as f:
            try:
                return f.read()
            except OSError as e:
                raise StorageError(f"cannot read {key!r}: {e}") from e

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        with self._open(key) as f:
            yield f

    def head(self, key: str) -> ObjectInfo | None:
        path = self._target(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if not path.is_file():
            return None
        return ObjectInfo(key=key, size=st.st_size, last_modified=datetime.fromtimestamp(st.st_mtime, UTC))

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return
        if not Path(os.path.realpath(base)).is_relative_to(self.root):
            raise LinkOutsideStoreError(
                f"prefix {prefix!r} leads to {os.path.realpath(base)}, outside the store root {self.root}; "
                "links out of the store are not followed"
            )
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in filenames:
                if name.startswith(".") and name.endswith((PART_SUFFIX, NEW_SUFFIX, ".lock")):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix) and (info := self._listed(full, key)) is not None:
                    found.append(info)
        yield from sorted(found, key=lambda o: o.key)

    def _listed(self, full: Path, key: str) -> ObjectInfo | None:
        """A listed file; a link out of the root is listed as the link itself, never followed.

        Reading such a key fails naming it, so what it describes fails with a clear message.
        """
        try:
            if full.is_symlink() and not Path(os.path.realpath(full)).is_relative_to(self.root):
                st = full.lstat()
            else:
                st = full.stat()
        except FileNotFoundError:
            return None  # a dangling link, or removed since the folder was read
        return ObjectInfo(key=key, size=st.st_size, last_modified=datetime.fromtimestamp(st.st_mtime, UTC))

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot delete {key!r}: {e}") from e

    def _lock_file(self, key: str, suffix: str) -> Path:
        """The hidden lock file beside ``key``: ``.<name><suffix>`` (never listed)."""
        path = self._path(key)
        return path.with_name(f".{path.name}{suffix}")

    def update(
        self, key: str, fn: Callable[[bytes | None], bytes | None], content_type: str | None = None
    ) -> bytes | None:
        path = self._path(key)
        with flock(self._lock_file(key, ".update.lock"), key, timeout_seconds=None):
            try:
                current: bytes | None = self._target(key).read_bytes()
            except FileNotFoundError:
                current = None
            except OSError as e:
                raise StorageError(f"cannot read {key!r}: {e}") from e
            new = fn(current)
            if new is None or new == current:
                return current
            with self._atomic(path) as tmp:
                tmp.write_bytes(new)
            return new

    def lock(
        self, key: str, *, lease_seconds: float, timeout_seconds: float | None
    ) -> contextlib.AbstractContextManager[None]:
        return flock(self._lock_file(key, ".lock"), key, timeout_seconds=timeout_seconds)

    def gdal_path(self, key: str) -> str:
        return str(self._target(key))

    def holds_gdal_path(self, path: str) -> bool:
        return Path(os.path.realpath(path)).is_relative_to(self.root)

    def gdal_env(self) -> dict[str, Any]:
        return {}

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def presigned_url(self, key: str, expires_seconds: int) -> str:
        return self.url(key)


_TRANSIENT_CODES = {
    "500",
    "502",
    "503",
    "504",
    "RequestTimeout",
    "RequestTimeoutException",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "InternalError",
}
_TRANSIENT_STATUS = {500, 502, 503, 504}


_S3_CLIENTS: dict[tuple[Any, ...], Any] = {}
_S3_CLIENTS_GUARD = threading.Lock()


def _s3_client(settings: StoreSettings) -> Any:
    """The process's one S3 client for these settings.

    Clients are safe to share between threads, but not to create concurrently from one session.
    """
    import boto3
    from botocore.config import Config

    secrets = tuple(
        s.get_secret_value() if s else None for s in (settings.access_key_id, settings.secret_access_key)
    )
    key = (os.getpid(), settings.model_dump_json(), *secrets)
    with _S3_CLIENTS_GUARD:
        if key not in _S3_CLIENTS:
            _S3_CLIENTS[key] = boto3.client(
                "s3",
                endpoint_url=settings.endpoint_url,
                region_name=settings.region,
                aws_access_key_id=settings.access_key_id.get_secret_value()
                if settings.access_key_id
                else None,
                aws_secret_access_key=(
                    settings.secret_access_key.get_secret_value() if settings.secret_access_key else None
                ),
                config=Config(
                    retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
                    connect_timeout=settings.connect_timeout_seconds,
                    read_timeout=settings.read_timeout_seconds,
                    s3={"addressing_style": "path"},
                ),
            )
        return _S3_CLIENTS[key]


class S3Store:
    """An object store in an S3 bucket (any S3-compatible endpoint)."""

    def __init__(self, settings: StoreSettings) -> None:
        from boto3.s3.transfer import TransferConfig

        if not settings.bucket:
            raise StorageError("S3 store needs a bucket")
        self.bucket = settings.bucket
        self.settings = settings
        self._client: Any = _s3_client(settings)
        # The client already retries each request (``max_attempts``); s3transfer's own loop around
        # it for downloads would multiply attempts, so a body cut while downloading surfaces as a
        # TransientStorageError for the task retry policy instead, as in get_bytes and open_read.
        self._download_config = TransferConfig(num_download_attempts=1)

    def _translate(self, e: BaseException, key: str) -> StorageError:
        """The skyvault error for a client error on ``key``; transient ones may succeed on retry.

        Transient: 5xx and throttling answers, a connection refused, closed or reset, a connect or
        read timeout, and a body cut while it is read (before or after the client's own attempts).
        """
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError
        from botocore.exceptions import ConnectionError as ClientConnectionError
        from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError
        from urllib3.exceptions import HTTPError as URLLib3Error

        where = f"{key!r} in bucket {self.bucket!r}"
        last = getattr(e, "last_exception", None)
        retried = isinstance(e, (RetriesExceededError, TransferRetriesExceededError))
        if retried and isinstance(last, Exception):
            return self._translate(last, key)
        if isinstance(e, S3UploadFailedError) and isinstance(e.__context__, Exception):
            return self._translate(e.__context__, key)
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return BucketNotFoundError(f"bucket {self.bucket!r} does not exist (while accessing {key!r})")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFoundError(f"object {key!r} not found in bucket {self.bucket!r}")
            if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS:
                return TransientStorageError(f"S3 error {code} on {where}: {e}")
            return StorageError(f"S3 error {code} on {where}: {e}")
        if isinstance(
            e,
            (
                ClientConnectionError,
                HTTPClientError,
                IncompleteReadError,
                URLLib3Error,
                ConnectionError,
                TimeoutError,
            ),
        ):
            return TransientStorageError(f"S3 connection failed on {where} ({type(e).__name__}): {e}")
        if isinstance(e, BotoCoreError):
            return StorageError(f"S3 client error on {where}: {e}")
        return StorageError(f"error on {where}: {e}")

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError
        from urllib3.exceptions import HTTPError as URLLib3Error

        try:
            yield
        except (
            ClientError,
            BotoCoreError,
            Boto3Error,
            TransferRetriesExceededError,
            URLLib3Error,
            ConnectionError,
            TimeoutError,
        ) as e:
            raise self._translate(e, key) from e

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else None
        with self._errors(check_key(key)):
            try:
                self._client.upload_file(str(path), self.bucket, key, ExtraArgs=extra)
            except (FileNotFoundError, IsADirectoryError, PermissionError) as e:  # the local file
                raise StorageError(f"cannot upload {path} as {key!r}: {e}") from e

    def move_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        self.put_file(key, path, content_type)
        path.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        kwargs: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        with self._errors(check_key(key)):
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, **kwargs)

    def get_file(self, key: str, dest: Path) -> None:
        with self._errors(check_key(key)):
            self._client.download_file(self.bucket, key, str(dest), Config=self._download_config)

    def get_bytes(self, key: str) -> bytes:
        with self._errors(check_key(key)):
            body: bytes = self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            return body

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        with self._errors(check_key(key)):
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
        try:
            with self._errors(key):
                yield body
        finally:
            body.close()

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with self._errors(check_key(key)):
                r = self._client.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFoundError:
            return None
        return ObjectInfo(key=key, size=int(r["ContentLength"]), last_modified=r["LastModified"])

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors(check_prefix(prefix) or "<root>"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(key=obj["Key"], size=int(obj["Size"]), last_modified=obj["LastModified"])

    def delete(self, key: str) -> None:
        with self._errors(check_key(key)):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def update(
        self, key: str, fn: Callable[[bytes | None], bytes | None], content_type: str | None = None
    ) -> bytes | None:
        return s3_update(self, check_key(key), fn, content_type)

    def lock(
        self, key: str, *, lease_seconds: float, timeout_seconds: float | None
    ) -> contextlib.AbstractContextManager[None]:
        return s3_lock(self, check_key(key), lease_seconds=lease_seconds, timeout_seconds=timeout_seconds)

    def gdal_path(self, key: str) -> str:
        return f"/vsis3/{self.bucket}/{check_key(key)}"

    def holds_gdal_path(self, path: str) -> bool:
        prefix = f"/vsis3/{self.bucket}/"
        if not path.startswith(prefix):
            return False
        try:
            check_key(path[len(prefix) :])
        except StorageError:
            return False
        return True

    def gdal_env(self) -> dict[str, Any]:
        from rasterio.session import AWSSession

        env: dict[str, Any] = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
        endpoint = None
        if self.settings.endpoint_url:
            u = urlparse(self.settings.endpoint_url)
            endpoint = u.netloc
            env["AWS_HTTPS"] = "YES" if u.scheme == "https" else "NO"
            env["AWS_VIRTUAL_HOSTING"] = "FALSE"
        key_id, secret = self.settings.access_key_id, self.settings.secret_access_key
        env["session"] = AWSSession(
            aws_access_key_id=key_id.get_secret_value() if key_id else None,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            region_name=self.settings.region,
            endpoint_url=endpoint,
        )
        return env

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{check_key(key)}"

    def presigned_url(self, key: str, expires_seconds: int) -> str:
        with self._errors(check_key(key)):
            url: str = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_seconds
            )
            return url

    def check_bucket(self) -> None:
        """Raise :class:`BucketNotFoundError` unless the bucket exists and is reachable."""
        try:
            with self._errors("<bucket>"):
                self._client.head_bucket(Bucket=self.bucket)
        except ObjectNotFoundError as e:
            raise BucketNotFoundError(f"bucket {self.bucket!r} does not exist") from e


def open_store(settings: StoreSettings) -> ObjectStore:
    """Open the object store the settings describe."""
    if settings.kind == "s3":
        return S3Store(settings)
    return LocalStore(settings.root)

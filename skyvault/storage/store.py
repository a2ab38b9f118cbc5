"""The object store: a local folder or an S3 bucket behind one small interface.

Keys are ``/``-separated relative names (``cogs/<collection>/<id>.tif``). Writes are atomic: a
reader sees either the old object or the complete new one, never a partial file (local: write to a
temporary name in the same folder, then rename; S3: a PUT or a completed multipart upload).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable
from urllib.parse import urlparse

from skyvault.config.settings import StoreSettings
from skyvault.errors import (
    BucketNotFoundError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from skyvault.models import ObjectInfo


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
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None: ...
    def get_file(self, key: str, dest: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def open_read(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...
    def head(self, key: str) -> ObjectInfo | None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def gdal_path(self, key: str) -> str: ...
    def gdal_env(self) -> dict[str, Any]:
        """Keyword arguments for ``rasterio.Env`` that let GDAL read :meth:`gdal_path` in place."""
        ...

    def url(self, key: str) -> str: ...
    def presigned_url(self, key: str, expires_seconds: int) -> str: ...


class LocalStore:
    """An object store in a local folder; keys map to files below ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        dest = self._path(key)
        with self._atomic(dest) as tmp:
            shutil.copyfile(path, tmp)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        dest = self._path(key)
        with self._atomic(dest) as tmp:
            tmp.write_bytes(data)

    @contextlib.contextmanager
    def _atomic(self, dest: Path) -> Iterator[Path]:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
            os.close(fd)
        except OSError as e:
            raise StorageError(f"cannot write {dest}: {e}") from e
        tmp = Path(name)
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

    def get_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        try:
            shutil.copyfile(src, dest)
        except FileNotFoundError as e:
            raise ObjectNotFoundError(f"object {key!r} not found in {self.root}") from e
        except OSError as e:
            raise StorageError(f"cannot read {key!r}: {e}") from e

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as e:
            raise ObjectNotFoundError(f"object {key!r} not found in {self.root}") from e
        except OSError as e:
            raise StorageError(f"cannot read {key!r}: {e}") from e

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        try:
            f = self._path(key).open("rb")
        except FileNotFoundError as e:
            raise ObjectNotFoundError(f"object {key!r} not found in {self.root}") from e
        except OSError as e:
            raise StorageError(f"cannot read {key!r}: {e}") from e
        with f:
            yield f

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
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
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in filenames:
                if name.startswith(".") and name.endswith(".part"):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    st = full.stat()
                    found.append(
                        ObjectInfo(
                            key=key, size=st.st_size, last_modified=datetime.fromtimestamp(st.st_mtime, UTC)
                        )
                    )
        yield from sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot delete {key!r}: {e}") from e

    def gdal_path(self, key: str) -> str:
        return str(self._path(key))

    def gdal_env(self) -> dict[str, Any]:
        return {}

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def presigned_url(self, key: str, expires_seconds: int) -> str:
        return self.url(key)


_TRANSIENT_CODES = {"500", "502", "503", "504", "RequestTimeout", "SlowDown", "Throttling", "InternalError"}


class S3Store:
    """An object store in an S3 bucket (any S3-compatible endpoint)."""

    def __init__(self, settings: StoreSettings) -> None:
        import boto3
        from botocore.config import Config

        if not settings.bucket:
            raise StorageError("S3 store needs a bucket")
        self.bucket = settings.bucket
        self.settings = settings
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id.get_secret_value() if settings.access_key_id else None,
            aws_secret_access_key=(
                settings.secret_access_key.get_secret_value() if settings.secret_access_key else None
            ),
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"}),
        )

    def _translate(self, e: Exception, key: str) -> StorageError:
        from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, EndpointConnectionError

        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                return BucketNotFoundError(f"bucket {self.bucket!r} does not exist (while accessing {key!r})")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFoundError(f"object {key!r} not found in bucket {self.bucket!r}")
            if code in _TRANSIENT_CODES:
                return TransientStorageError(f"S3 error {code} on {key!r} in bucket {self.bucket!r}: {e}")
            return StorageError(f"S3 error {code} on {key!r} in bucket {self.bucket!r}: {e}")
        if isinstance(e, (EndpointConnectionError, ConnectionError)):
            return TransientStorageError(f"cannot reach S3 for {key!r} in bucket {self.bucket!r}: {e}")
        if isinstance(e, BotoCoreError):
            return StorageError(f"S3 client error on {key!r} in bucket {self.bucket!r}: {e}")
        return StorageError(f"error on {key!r} in bucket {self.bucket!r}: {e}")

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError) as e:
            raise self._translate(e, key) from e

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else None
        with self._errors(check_key(key)):
            self._client.upload_file(str(path), self.bucket, key, ExtraArgs=extra)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        kwargs: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        with self._errors(check_key(key)):
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, **kwargs)

    def get_file(self, key: str, dest: Path) -> None:
        with self._errors(check_key(key)):
            self._client.download_file(self.bucket, key, str(dest))

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

    def gdal_path(self, key: str) -> str:
        return f"/vsis3/{self.bucket}/{check_key(key)}"

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

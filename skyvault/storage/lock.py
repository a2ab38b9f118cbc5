"""Locks and atomic read-modify-write across processes and hosts, for both kinds of object store.

Local folders use ``fcntl.flock`` on a hidden lock file: the kernel drops the lock when its holder
dies, so a killed process never blocks anyone. (Across hosts this needs a filesystem whose
``flock`` is shared between clients, such as NFSv4, CephFS or Lustre mounted with ``flock``.)

S3 has no locks, only conditional writes (``If-Match`` / ``If-None-Match``), so:

* :func:`s3_update` reads an object with its ETag, applies the change and writes it back only if
  the ETag is unchanged, retrying with jittered backoff when another writer got in first;
* :func:`s3_lock` holds a *lease*: an object created only if absent, holding its owner and expiry,
  renewed every third of the lease by a daemon thread and deleted on release. A waiter takes over
  a lease that has not been renewed for a whole lease, so a killed holder frees the lock after its
  lease. Expiry is judged by the waiter's own clock (the same ETag seen unchanged for a whole
  lease), so clock skew between hosts cannot make a live lease look expired; a lease whose
  written expiry is more than a lease in the past is taken at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skyvault.errors import LockTimeoutError, ObjectNotFoundError, StorageError, TransientStorageError

if TYPE_CHECKING:
    from skyvault.storage.store import S3Store

log = logging.getLogger(__name__)

#: Conditional writes an S3 update tries before giving up.
UPDATE_ATTEMPTS = 64
#: Backoff between conflicting attempts: full jitter up to ``min(cap, base * 2**n)`` seconds.
BACKOFF_BASE_SECONDS = 0.02
BACKOFF_CAP_SECONDS = 1.0
#: Longest pause between two looks at a held lock.
POLL_CAP_SECONDS = 0.25

_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def holder_name() -> str:
    """Who this process is, as written into locks it holds: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _pause(attempt: int, cap: float = BACKOFF_CAP_SECONDS) -> float:
    return random.uniform(0, min(cap, BACKOFF_BASE_SECONDS * 2**attempt))


# --- local folders ----------------------------------------------------------------------------------


@contextlib.contextmanager
def flock(path: Path, key: str, *, timeout_seconds: float | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) while inside.

    Any other holder, in this process or another, has its own open of the file, so threads
    exclude each other too. The holder's name is written into the file for error messages.

    Raises:
        LockTimeoutError: ``timeout_seconds`` passed with the lock still held elsewhere; the
            message names ``key`` and the holder.
        StorageError: the lock file cannot be created or locked.

    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StorageError(f"cannot open the lock file of {key!r} ({path}): {e}") from e
    try:
        _flock_acquire(fd, path, key, timeout_seconds)
        try:
            me = holder_name().encode()
            with contextlib.suppress(OSError):
                if os.pread(fd, len(me) + 1, 0) != me:  # unchanged: leave the file untouched
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, me, 0)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _flock_acquire(fd: int, path: Path, key: str, timeout_seconds: float | None) -> None:
    try:
        if timeout_seconds is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        deadline = time.monotonic() + timeout_seconds
        attempt = 0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "an unknown process"
                raise LockTimeoutError(
                    f"lock {key!r} ({path}) is still held by {holder} after {timeout_seconds:g} s"
                )
            time.sleep(min(left, max(0.005, _pause(attempt, POLL_CAP_SECONDS))))
            attempt += 1
    except OSError as e:
        raise StorageError(f"cannot lock {key!r} ({path}): {e}") from e


# --- S3 -------------------------------------------------------------------------------------------


class _ConflictError(Exception):
    """A conditional write lost: the object changed (or appeared, or vanished) since it was read."""


def _conditional(store: S3Store, key: str, call: Callable[[], Any]) -> Any:
    """Run an S3 call; a failed precondition raises :class:`_ConflictError`, other errors are translated."""
    from botocore.exceptions import ClientError

    with store._errors(key):
        try:
            return call()
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _CONFLICT_CODES or status in (409, 412) or code in ("NoSuchKey", "404"):
                # NoSuchKey: an If-Match write or delete found the object gone.
                raise _ConflictError(code) from e
            raise


def _read(store: S3Store, key: str) -> tuple[bytes | None, str | None]:
    """The object's bytes and ETag, or ``(None, None)`` when it is absent."""
    try:
        with store._errors(key):
            r = store._client.get_object(Bucket=store.bucket, Key=key)
            body: bytes = r["Body"].read()
            return body, str(r["ETag"])
    except ObjectNotFoundError:
        return None, None


def _put(store: S3Store, key: str, data: bytes, etag: str | None, content_type: str | None = None) -> str:
    """PUT ``data`` only if the object still has ``etag`` (None: only if absent); the new ETag."""
    condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
    extra = {"ContentType": content_type} if content_type else {}
    r = _conditional(
        store,
        key,
        lambda: store._client.put_object(Bucket=store.bucket, Key=key, Body=data, **condition, **extra),
    )
    return str(r["ETag"])


def s3_update(
    store: S3Store, key: str, fn: Callable[[bytes | None], bytes | None], content_type: str | None = None
) -> bytes | None:
    """Atomic read-modify-write of one S3 object by conditional PUT (see ``ObjectStore.update``).

    ``fn`` may run more than once (once per attempt), so it must only compute.

    Raises:
        TransientStorageError: every one of :data:`UPDATE_ATTEMPTS` writes lost to another writer.

    """
    for attempt in range(UPDATE_ATTEMPTS):
        current, etag = _read(store, key)
        new = fn(current)
        if new is None or new == current:
            return current
        try:
            _put(store, key, new, etag, content_type)
        except _ConflictError:
            time.sleep(_pause(attempt))
            continue
        return new
    raise TransientStorageError(
        f"cannot update {key!r} in bucket {store.bucket!r}: {UPDATE_ATTEMPTS} conditional writes in a row "
        "lost to concurrent writers"
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Lease:
    """One holding of an S3 lease object (see the module docstring)."""

    def __init__(self, store: S3Store, key: str, lease_seconds: float) -> None:
        if lease_seconds <= 0:
            raise StorageError(f"lock {key!r}: lease_seconds must be positive, not {lease_seconds}")
        self.store = store
        self.key = key
        self.lease_seconds = lease_seconds
        self.owner = f"{holder_name()}:{uuid.uuid4().hex[:8]}"
        self.etag: str | None = None
        self.lost_to: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        expires = _now() + dt.timedelta(seconds=self.lease_seconds)
        return json.dumps(
            {"owner": self.owner, "expires_at": expires.isoformat(), "lease_seconds": self.lease_seconds}
        ).encode()

    def _parse(self, body: bytes) -> tuple[str, float, dt.datetime | None]:
        """Holder, lease seconds and expiry of a lease body (defaults for what is not readable)."""
        info: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            loaded = json.loads(body)
            info = loaded if isinstance(loaded, dict) else {}
        holder = str(info.get("owner") or "an unknown holder")
        lease = self.lease_seconds
        with contextlib.suppress(ValueError, TypeError):
            lease = float(info["lease_seconds"]) if info.get("lease_seconds") else lease
        expires = None
        with contextlib.suppress(ValueError, TypeError):
            expires = dt.datetime.fromisoformat(str(info.get("expires_at")))
        if expires is not None and expires.tzinfo is None:
            expires = expires.replace(tzinfo=dt.UTC)
        return holder, lease, expires

    def acquire(self, timeout_seconds: float | None) -> None:
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        seen: tuple[str, float] | None = None  # an ETag and when it was first seen
        attempt = 0
        while True:
            try:
                self.etag = _put(self.store, self.key, self._body(), None)
                break
            except _ConflictError:
                pass
            body, etag = _read(self.store, self.key)
            if body is None or etag is None:
                continue  # released in between: try again at once
            holder, lease, expires = self._parse(body)
            if holder == self.owner:  # our create went through, its answer did not
                self.etag = etag
                break
            if seen is None or seen[0] != etag:
                seen = (etag, time.monotonic())
            unrenewed = time.monotonic() - seen[1] >= lease
            long_gone = expires is not None and _now() >= expires + dt.timedelta(seconds=lease)
            if unrenewed or long_gone:
                try:
                    self.etag = _put(self.store, self.key, self._body(), etag)
                except _ConflictError:
                    continue
                log.warning(
                    "lock %r: took over the lease of %s, not renewed for %g s", self.key, holder, lease
                )
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                until = expires.isoformat() if expires else "?"
                raise LockTimeoutError(
                    f"lock {self.key!r} in bucket {self.store.bucket!r} is still held by {holder} "
                    f"after {timeout_seconds:g} s (its lease runs until {until})"
                )
            pause = max(0.01, _pause(attempt, min(BACKOFF_CAP_SECONDS, lease / 3)))
            time.sleep(pause if deadline is None else min(pause, max(deadline - now, 0.0)))
            attempt += 1
        self._renewer = threading.Thread(target=self._renew, name=f"lease {self.key}", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.etag = _put(self.store, self.key, self._body(), self.etag)
            except _ConflictError:
                holder = self._recheck()
                if holder != self.owner:
                    self.lost_to = holder or "nobody (the lease object is gone)"
                    log.error("lock %r: lease lost to %s", self.key, self.lost_to)
                    return
            except StorageError as e:  # a hiccup: the next renewal may get through within the lease
                log.warning("lock %r: cannot renew the lease: %s", self.key, e)

    def _recheck(self) -> str | None:
        """After a failed precondition: who holds the lease now (None: nobody); adopts its ETag if us.

        (A write or delete whose answer was lost, and retried, fails its own precondition.)
        """
        body, etag = _read(self.store, self.key)
        if body is None:
            return None
        holder = self._parse(body)[0]
        if holder == self.owner:
            self.etag = etag
        return holder

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.lost_to is not None or self.etag is None:
            return
        while True:
            delete = functools.partial(
                self.store._client.delete_object, Bucket=self.store.bucket, Key=self.key, IfMatch=self.etag
            )
            try:
                _conditional(self.store, self.key, delete)
                return
            except _ConflictError:
                holder = self._recheck()
                if holder is None:  # gone: our delete went through, its answer did not
                    return
                if holder != self.owner:
                    self.lost_to = holder
                    return


@contextlib.contextmanager
def s3_lock(
    store: S3Store, key: str, *, lease_seconds: float, timeout_seconds: float | None
) -> Iterator[None]:
    """Hold the S3 lease at ``key`` while inside (see ``ObjectStore.lock``).

    Raises:
        LockTimeoutError: ``timeout_seconds`` passed with a live lease held by someone else.
        StorageError: on leaving, when the lease was lost while held (renewals were late by a whole
            lease and another process took it over): mutual exclusion was not kept.

    """
    lease = _Lease(store, key, lease_seconds)
    lease.acquire(timeout_seconds)
    try:
        yield
    finally:
        lease.release()
    if lease.lost_to is not None:
        raise StorageError(
            f"lock {key!r} in bucket {store.bucket!r}: the lease was lost to {lease.lost_to} while held "
            f"(not renewed within {lease_seconds:g} s)"
        )

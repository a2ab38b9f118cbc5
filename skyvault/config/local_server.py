"""The embedded default: each command starts a temporary local Prefect server for its run.

Such a server (Prefect calls it ephemeral) runs none of Prefect's background services, including
the one that gives back the concurrency slots of a run that died: a task run holds its tag slots
under a 60 s lease that it renews while it lives, and on a full server the repossessor service
returns the slots of leases that were not renewed in time. Without it, a SIGKILLed run's slots
stay taken for good and the next run waits on them forever.

So on the embedded default the leases live in files under ``PREFECT_HOME`` (Prefect's filesystem
lease storage, shared by every temporary server of that home and surviving them), and the command
itself does the repossessor's work: at start and then every few seconds it releases the slots of
every expired lease through the server's own API. A killed run's slots thus come back at most
one lease (60 s) plus one pass after its last renewal.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage
from prefect.server.utilities.leasing import ResourceLease
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
)
from prefect.utilities.asyncutils import run_coro_as_sync

logger = logging.getLogger(__name__)

#: How long a command waits for the temporary Prefect server it starts (at least; a larger
#: ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` is kept). Its first start on a fresh
#: ``PREFECT_HOME`` creates and migrates a database, which takes longer than Prefect's default of
#: 20 s on a small or busy machine.
EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 180

#: Prefect's lease storage that keeps leases in files under ``PREFECT_HOME``.
FILESYSTEM_LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"

#: Seconds between two passes over the leases while a command runs.
RECLAIM_INTERVAL_SECONDS = 10.0


def uses_local_server() -> bool:
    """Whether runs go to a temporary local server (``PREFECT_API_URL`` is unset)."""
    return not PREFECT_API_URL.value()


def local_server_settings() -> dict[Any, Any]:
    """Prefect settings for a command's run, to apply with ``prefect.settings.temporary_settings``.

    Empty when ``PREFECT_API_URL`` names a server: that server is configured by its operator.
    """
    if not uses_local_server():
        return {}
    updates: dict[Any, Any] = {
        PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE: FILESYSTEM_LEASE_STORAGE,
        # a server that lives for one command has no use for usage reports, and on a fresh
        # database their first write races the migrations and logs a "database is locked" error
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }
    if PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() < EPHEMERAL_STARTUP_TIMEOUT_SECONDS:
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = EPHEMERAL_STARTUP_TIMEOUT_SECONDS
    return updates


def reclaim_expired_leases() -> list[UUID]:
    """Release the slots of every expired lease in the filesystem lease storage.

    A live holder renews its lease long before it expires, so an expired lease belongs to a run
    that died. Each one is re-read just before it is released, and skipped if it was renewed in
    between. Returns the ids of the leases whose slots were released.
    """
    storage = ConcurrencyLeaseStorage()
    expired: list[UUID] = run_coro_as_sync(storage.read_expired_lease_ids(limit=1000)) or []
    released: list[UUID] = []
    if not expired:
        return released
    with get_client(sync_client=True) as client:
        for lease_id in expired:
            lease: ResourceLease[Any] | None = run_coro_as_sync(storage.read_lease(lease_id))
            if lease is None:  # only its index entry is left
                run_coro_as_sync(storage.revoke_lease(lease_id))
                continue
            if lease.expiration > datetime.now(UTC):
                continue
            client.release_concurrency_slots_with_lease(lease_id)
            released.append(lease_id)
    if released:
        logger.warning("gave back the tag slots of %d run(s) that died: leases %s", len(released), released)
    return released


@contextmanager
def reclaiming_expired_leases(interval_seconds: float = RECLAIM_INTERVAL_SECONDS) -> Iterator[None]:
    """Reclaim expired leases now and then every ``interval_seconds`` until the block ends.

    Does nothing when ``PREFECT_API_URL`` names a server, whose own services reclaim leases.
    """
    if not uses_local_server():
        yield
        return
    reclaim_expired_leases()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_seconds):
            try:
                reclaim_expired_leases()
            except Exception:  # a failed pass is retried on the next one
                logger.exception("could not reclaim expired concurrency leases")

    context = contextvars.copy_context()  # Prefect's settings and client live in context variables
    thread = threading.Thread(target=context.run, args=(loop,), name="skyvault-lease-reclaimer", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()

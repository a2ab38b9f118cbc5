"""Cross-process locks held on the Prefect server (global concurrency limits)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from skyvault.ids import check_id

LOCK_LEASE_SECONDS = 300.0


def lock_name(kind: str, dataset_id: str) -> str:
    """Name of the global concurrency limit that serialises ``kind`` runs of one dataset."""
    return f"skyvault-{kind}:{check_id(dataset_id, 'dataset id')}"


@contextlib.contextmanager
def dataset_lock(kind: str, dataset_id: str, *, timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold the dataset's ``kind`` lock (a Prefect global concurrency limit of 1) while inside.

    The limit is created on first use. A second run of the same kind and dataset waits here
    until the first one leaves, on any worker that talks to the same Prefect server.

    Raises:
        TimeoutError: ``timeout_seconds`` passed before the lock was free.

    """
    name = lock_name(kind, dataset_id)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(
        name, occupy=1, timeout_seconds=timeout_seconds, strict=True, lease_duration=LOCK_LEASE_SECONDS
    ):
        yield

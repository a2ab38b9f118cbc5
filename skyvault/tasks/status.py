"""Task adapters for :mod:`skyvault.status`."""

from __future__ import annotations

from prefect import task

from skyvault import status
from skyvault.config.settings import StoreSettings
from skyvault.models import ProductStatus
from skyvault.tasks.policy import TASK_POLICY


@task(name="read-statuses", **TASK_POLICY)
def read_statuses(pairs: list[tuple[str, str]], store: StoreSettings) -> dict[tuple[str, str], ProductStatus]:
    """Task: :func:`skyvault.status.read_statuses`."""
    return status.read_statuses(pairs, store)

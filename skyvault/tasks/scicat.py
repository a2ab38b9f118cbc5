"""Task adapters for :mod:`skyvault.scicat`."""

from __future__ import annotations

from typing import Any

from prefect import task

from skyvault.config.settings import DataCatalogSettings
from skyvault.scicat import jobs
from skyvault.scicat.jobs import DatasetLifecycle, JobStatus
from skyvault.tasks.policy import CLIENT_RETRIED_POLICY


@task(
    name="update-job",
    task_run_name="update-job/{job_id}/{status}",
    tags=["data-catalog"],
    **CLIENT_RETRIED_POLICY,
)
def update_job(
    settings: DataCatalogSettings, job_id: str, status: JobStatus, result: dict[str, Any] | None = None
) -> None:
    """Task: :func:`skyvault.scicat.jobs.update_job`."""
    jobs.update_job(settings, job_id, status, result)


@task(
    name="update-dataset",
    task_run_name="update-dataset/{pid}",
    tags=["data-catalog"],
    **CLIENT_RETRIED_POLICY,
)
def update_dataset(settings: DataCatalogSettings, pid: str, lifecycle: DatasetLifecycle) -> None:
    """Task: :func:`skyvault.scicat.jobs.update_dataset`."""
    jobs.update_dataset(settings, pid, lifecycle)

"""Archive and retrieve jobs from a data catalog: run each dataset and report in SciCat words.

A job (``archive-job/<job-id>``, ``retrieve-job/<job-id>``) reports the job ``inProgress``, then
for each dataset in turn reports it ``started``, runs the ``archive`` or ``retrieve`` flow as a
subflow and reports the dataset's outcome (see :mod:`skyvault.scicat.jobs` for the words and
fields). When every dataset is done it reports ``finishedSuccessful``, ``finishedWithDatasetErrors`` or
``finishedUnsuccessful`` with a ``jobResultObject`` listing every dataset (and, for retrieval, the
download URLs). If the job itself fails, crashes or is cancelled, a hook reports it
``finishedUnsuccessful``.

Without a data catalog (``data_catalog.url`` unset) the jobs run the same way and their status
lives only in Prefect: the run's final state (Completed when every dataset succeeded, Failed named
``DatasetErrors`` otherwise, its message naming the failed datasets) and a markdown and a table
artifact per job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import Flow as FlowModel
from prefect.client.schemas.objects import FlowRun, State
from prefect.states import Completed, Failed

from skyvault.config.settings import DataCatalogSettings, get_settings
from skyvault.errors import DatasetError, SkyvaultError
from skyvault.flows.archive import archive, artifact_key
from skyvault.flows.retrieve import retrieve
from skyvault.models import JobDataset, JobDatasetResult
from skyvault.scicat import jobs as scicat_jobs
from skyvault.scicat.jobs import (
    DatasetLifecycle,
    JobStatus,
    archive_outcome,
    archive_started,
    is_configured,
    job_result_object,
    job_state_message,
    job_status,
    job_summary,
    parse_job_datasets,
    retrieve_outcome,
    retrieve_started,
)
from skyvault.tasks.scicat import update_dataset, update_job

log = logging.getLogger(__name__)

#: Name of the Failed state a job ends in when it ran to the end but some datasets failed; its
#: final status is already reported, so the failure hook leaves it alone.
DATASET_ERRORS = "DatasetErrors"


def _outcome_of(state: State[Any], dataset: JobDataset) -> Any:
    """A subflow's result, or the exception it failed with."""
    if state.is_completed():
        return state.result()
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException):
        return exc
    return DatasetError(f"dataset {dataset.pid!r}: run ended {state.name}: {state.message or ''}".strip())


def _run_datasets(
    job_id: str,
    datasets: list[JobDataset],
    catalog: DataCatalogSettings,
    started: DatasetLifecycle,
    run: Callable[[JobDataset], State[Any]],
    outcome: Callable[[JobDataset, Any], tuple[JobDatasetResult, DatasetLifecycle]],
) -> list[JobDatasetResult]:
    reporting = is_configured(catalog)
    if reporting:
        update_job(catalog, job_id, JobStatus.IN_PROGRESS)
    results: list[JobDatasetResult] = []
    for dataset in datasets:
        if reporting:
            update_dataset(catalog, dataset.pid, started)
        result, lifecycle = outcome(dataset, _outcome_of(run(dataset), dataset))
        if reporting:
            update_dataset(catalog, dataset.pid, lifecycle)
        results.append(result)
    return results


def _finish(
    kind: str, job_id: str, results: list[JobDatasetResult], catalog: DataCatalogSettings
) -> State[Any]:
    status = job_status(sum(r.ok for r in results), sum(not r.ok for r in results))
    if is_configured(catalog):
        update_job(catalog, job_id, status, job_result_object(results))
    key = artifact_key(f"{kind}-job", job_id)
    create_markdown_artifact(
        markdown=job_summary(kind, job_id, status, results),
        key=key,
        description=f"{kind} job {job_id}: {status.value}",
    )
    create_table_artifact(
        table=[
            {
                "pid": r.pid,
                "dataset id": r.dataset_id,
                "status": r.status,
                "datablocks": r.datablocks,
                "bytes": r.bytes,
                "message": r.message,
            }
            for r in results
        ],
        key=f"{key}-datasets",
        description=f"{kind} job {job_id}: one line per dataset",
    )
    message = job_state_message(kind, job_id, results)
    if status is JobStatus.FINISHED_SUCCESSFUL:
        return Completed(message=message, data=results)
    return Failed(name=DATASET_ERRORS, message=message, data=results)


def report_job_failed(flow: FlowModel, flow_run: FlowRun, state: State[Any]) -> None:
    """Hook: a job that failed, crashed or was cancelled is reported ``finishedUnsuccessful``.

    A job that ran to the end (state named ``DatasetErrors``) already reported its final status.
    """
    if state.name == DATASET_ERRORS:
        return
    catalog = get_settings().data_catalog
    job_id = flow_run.parameters.get("job_id")
    if not is_configured(catalog) or not isinstance(job_id, str):
        return
    reason = f"{flow.name} run {flow_run.name} ended {state.name}: {state.message or ''}".strip()
    try:
        scicat_jobs.update_job(
            catalog, job_id, JobStatus.FINISHED_UNSUCCESSFUL, {"result": [], "message": reason}
        )
    except SkyvaultError as e:
        log.error("could not report job %s as %s: %s", job_id, JobStatus.FINISHED_UNSUCCESSFUL.value, e)


_HOOKS: dict[str, Any] = {
    "on_failure": [report_job_failed],
    "on_crashed": [report_job_failed],
    "on_cancellation": [report_job_failed],
}


@flow(name="archive-job", flow_run_name="archive-job/{job_id}", **_HOOKS)
def archive_job(job_id: str, datasets: list[str | dict[str, Any]]) -> State[Any]:
    """Archive every dataset of a catalog job to LTS and report job and dataset status.

    Args:
        job_id: the catalog's job id.
        datasets: the job's ``datasetList``: pids, or objects with ``pid`` (and optionally
            ``dataset_id``, ``source_prefix`` or ``source_dir``).

    """
    settings = get_settings()
    entries = parse_job_datasets(job_id, datasets)

    def run(dataset: JobDataset) -> State[Any]:
        state: State[Any] = archive(
            dataset.dataset_id,
            source_prefix=dataset.source_prefix,
            source_dir=dataset.source_dir,
            return_state=True,
        )
        return state

    results = _run_datasets(job_id, entries, settings.data_catalog, archive_started(), run, archive_outcome)
    return _finish("archive", job_id, results, settings.data_catalog)


@flow(name="retrieve-job", flow_run_name="retrieve-job/{job_id}", **_HOOKS)
def retrieve_job(job_id: str, datasets: list[str | dict[str, Any]]) -> State[Any]:
    """Retrieve every dataset of a catalog job from LTS and report status and download URLs.

    Args:
        job_id: the catalog's job id.
        datasets: the job's ``datasetList``: pids, or objects with ``pid`` (and optionally
            ``dataset_id``).

    """
    settings = get_settings()
    entries = parse_job_datasets(job_id, datasets)

    def run(dataset: JobDataset) -> State[Any]:
        state: State[Any] = retrieve(dataset.dataset_id, return_state=True)
        return state

    results = _run_datasets(job_id, entries, settings.data_catalog, retrieve_started(), run, retrieve_outcome)
    return _finish("retrieve", job_id, results, settings.data_catalog)

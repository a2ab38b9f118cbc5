"""``POST /jobs``: a data-catalog (SciCat) job becomes an ``archive-job`` or ``retrieve-job`` run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from skyvault.errors import InvalidIdentifierError, RequestError
from skyvault.gateway.runs import ARCHIVE_JOB, RETRIEVE_JOB, RunInfo, Runs, idempotency_key
from skyvault.scicat.jobs import check_path_id, parse_job_datasets


class JobRequest(BaseModel):
    """A job as the data catalog posts it (other fields of a SciCat job are ignored)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)

    id: str = Field(min_length=1)
    type: Literal["archive", "retrieve"]
    dataset_list: list[str | dict[str, Any]] = Field(alias="datasetList", min_length=1)


class JobAnswer(BaseModel):
    """The answer to the data catalog: the run that carries the job (``uuid``) and its name."""

    model_config = ConfigDict(populate_by_name=True)

    uuid: str
    name: str
    job_id: str = Field(serialization_alias="jobId")
    type: str


def job_parameters(job: JobRequest) -> dict[str, Any]:
    """The job flow's parameters; checks the ids first.

    Raises:
        RequestError: the job id or a dataset entry is unusable (naming ``id`` or ``datasetList``).

    """
    try:
        check_path_id(job.id, "job id")
    except InvalidIdentifierError as e:
        raise RequestError(f"id: {e}", field="id") from e
    try:
        parse_job_datasets(job.id, job.dataset_list)
    except InvalidIdentifierError as e:
        raise RequestError(f"datasetList: {e}", field="datasetList") from e
    return {"job_id": job.id, "datasets": job.dataset_list}


def start_job(job: JobRequest, runs: Runs) -> JobAnswer:
    """Start (or find, for a resent job) the run of a job.

    Raises:
        RequestError: the job is malformed.
        OrchestratorError: the run could not be started.

    """
    parameters = job_parameters(job)
    deployment = ARCHIVE_JOB if job.type == "archive" else RETRIEVE_JOB
    key = idempotency_key(deployment, {"id": job.id, "type": job.type, "datasetList": job.dataset_list})
    run: RunInfo = runs.start(deployment, parameters, key, name=f"{job.type}-job/{job.id}")
    return JobAnswer(uuid=run.id, name=run.name, job_id=job.id, type=job.type)

"""The data-catalog client: job and dataset status for a SciCat-style jobs API (v3).

Plain functions take :class:`DataCatalogSettings` and talk HTTP with ``httpx``:

- ``POST {url}/auth/login`` with ``username``/``password`` gives a token (``access_token`` or ``id``),
  unless a token is configured; it is kept in memory per catalog and user and renewed once on 401.
- ``PATCH {url}/jobs/{id}`` with ``jobStatusMessage`` (and ``jobResultObject`` when the job ends).
- ``PATCH {url}/datasets/{pid}`` with ``datasetlifecycle`` holding only the fields that change.

Every call sends ``Authorization: Bearer <token>``. Connection errors and 429/502/503/504 are
retried ``retries`` times with exponential backoff (``backoff_seconds`` doubled per try, at most
30 s), then raise :class:`TransientDataCatalogError`; any other error status raises
:class:`DataCatalogError` naming the job or dataset and the status. Passwords and tokens never
appear in logs, exceptions or reprs.

Lifecycle updates (what each outcome changes, SciCat words):

========================  ===========================================================================
archive started           ``archiveStatusMessage: started``
archived                  ``datasetOnArchiveDisk``, ``retrievable: true``
                          (+ ``isOnCentralDisk: false`` when the landing copy was removed)
missing files             ``missingFilesError``
other archive failure     ``scheduleArchiveJobFailed``, ``archivable: true`` (landing data is
                          untouched, the dataset stays on central disk and can be archived again)
retrieve started          ``retrieveStatusMessage: started``
retrieved                 ``datasetRetrieved``, ``retrieveIntegrityCheck: true``
retrieval failure         ``datasetRetrievalFailed`` (+ ``retrieveIntegrityCheck: false`` when a
                          checksum did not match)
========================  ===========================================================================
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from skyvault.config.settings import DataCatalogSettings
from skyvault.errors import (
    ConfigError,
    DataCatalogError,
    InvalidIdentifierError,
    MissingFilesError,
    TransientDataCatalogError,
    VerificationError,
)
from skyvault.ids import check_id
from skyvault.models import ArchiveResult, JobDataset, JobDatasetResult, RetrieveResult

log = logging.getLogger(__name__)

#: HTTP statuses worth another try: throttling and gateway errors.
TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
MAX_BACKOFF_SECONDS = 30.0


class JobStatus(StrEnum):
    """``jobStatusMessage`` words."""

    IN_PROGRESS = "inProgress"
    FINISHED_SUCCESSFUL = "finishedSuccessful"
    FINISHED_UNSUCCESSFUL = "finishedUnsuccessful"
    FINISHED_WITH_DATASET_ERRORS = "finishedWithDatasetErrors"


class ArchiveStatus(StrEnum):
    """``datasetlifecycle.archiveStatusMessage`` words."""

    STARTED = "started"
    IS_ON_CENTRAL_DISK = "isOnCentralDisk"
    DATASET_ON_ARCHIVE_DISK = "datasetOnArchiveDisk"
    SCHEDULE_ARCHIVE_JOB_FAILED = "scheduleArchiveJobFailed"
    MISSING_FILES_ERROR = "missingFilesError"


class RetrieveStatus(StrEnum):
    """``datasetlifecycle.retrieveStatusMessage`` words."""

    STARTED = "started"
    DATASET_RETRIEVED = "datasetRetrieved"
    DATASET_RETRIEVAL_FAILED = "datasetRetrievalFailed"


class DatasetLifecycle(BaseModel):
    """The ``datasetlifecycle`` fields one update changes; fields left ``None`` are never sent."""

    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)

    archive_status_message: ArchiveStatus | None = None
    retrieve_status_message: RetrieveStatus | None = None
    archivable: bool | None = None
    retrievable: bool | None = None
    is_on_central_disk: bool | None = None
    retrieve_integrity_check: bool | None = None

    def fields(self) -> dict[str, Any]:
        """The changed fields with their SciCat names, e.g. ``{"archiveStatusMessage": "started"}``."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- lifecycle transitions ----------------------------------------------------------------------


def archive_started() -> DatasetLifecycle:
    """A dataset's archive run begins."""
    return DatasetLifecycle(archive_status_message=ArchiveStatus.STARTED)


def archive_succeeded(*, landing_removed: bool) -> DatasetLifecycle:
    """A dataset is verified on LTS; ``landing_removed`` when its landing copy was deleted."""
    return DatasetLifecycle(
        archive_status_message=ArchiveStatus.DATASET_ON_ARCHIVE_DISK,
        retrievable=True,
        is_on_central_disk=False if landing_removed else None,
    )


def archive_failed(error: BaseException) -> DatasetLifecycle:
    """A dataset's archive run failed with ``error`` (its landing data is untouched)."""
    if isinstance(error, MissingFilesError):
        return DatasetLifecycle(archive_status_message=ArchiveStatus.MISSING_FILES_ERROR)
    return DatasetLifecycle(archive_status_message=ArchiveStatus.SCHEDULE_ARCHIVE_JOB_FAILED, archivable=True)


def retrieve_started() -> DatasetLifecycle:
    """A dataset's retrieval begins."""
    return DatasetLifecycle(retrieve_status_message=RetrieveStatus.STARTED)


def retrieve_succeeded() -> DatasetLifecycle:
    """A dataset's datablocks are verified and downloadable."""
    return DatasetLifecycle(
        retrieve_status_message=RetrieveStatus.DATASET_RETRIEVED, retrieve_integrity_check=True
    )


def retrieve_failed(error: BaseException) -> DatasetLifecycle:
    """A dataset's retrieval failed with ``error``."""
    return DatasetLifecycle(
        retrieve_status_message=RetrieveStatus.DATASET_RETRIEVAL_FAILED,
        retrieve_integrity_check=False if isinstance(error, VerificationError) else None,
    )


def job_status(succeeded: int, failed: int) -> JobStatus:
    """The final job word for a count of succeeded and failed datasets."""
    if failed == 0 and succeeded > 0:
        return JobStatus.FINISHED_SUCCESSFUL
    if succeeded > 0:
        return JobStatus.FINISHED_WITH_DATASET_ERRORS
    return JobStatus.FINISHED_UNSUCCESSFUL


# --- job datasets and outcomes ------------------------------------------------------------------


def dataset_id_for_pid(pid: str) -> str:
    """The archive id (LTS folder name) of a catalog dataset pid.

    A pid that is already a safe id is used as it is. Otherwise (SciCat pids such as
    ``20.500.12269/abc``) every ``/`` becomes ``_`` and the first 12 hex digits of the pid's SHA-256
    are appended, so two pids never share an id: ``20.500.12269_abc-<hash>``. The result is checked
    again by the archive and retrieve flows (a pid with ``..`` stays unsafe).
    """
    check_path_id(pid, "dataset pid")
    try:
        return check_id(pid, "dataset id")
    except InvalidIdentifierError:
        digest = hashlib.sha256(pid.encode("utf-8")).hexdigest()[:12]
        return f"{pid.replace('/', '_')[:180]}-{digest}"


def parse_job_datasets(job_id: str, datasets: Sequence[str | Mapping[str, Any]]) -> list[JobDataset]:
    """The datasets of a job from its ``datasetList``: pids, or objects with a ``pid``.

    An object may also give ``dataset_id`` (the archive id), ``source_prefix`` or ``source_dir``;
    other keys (SciCat's ``files``) are ignored. Without a source, a dataset's files are under
    ``landing/<pid>/`` on the object store.

    Raises:
        InvalidIdentifierError: the job id is unsafe, an entry has no usable pid, or the list is
            empty or names a pid twice.

    """
    check_path_id(job_id, "job id")
    if not datasets:
        raise InvalidIdentifierError(f"job {job_id!r} lists no datasets")
    out: list[JobDataset] = []
    for entry in datasets:
        spec: dict[str, Any] = {"pid": entry} if isinstance(entry, str) else dict(entry)
        pid = spec.get("pid")
        if not isinstance(pid, str):
            raise InvalidIdentifierError(f"job {job_id!r}: dataset entry {entry!r} has no pid")
        check_path_id(pid, "dataset pid")
        source_prefix = spec.get("source_prefix")
        source_dir = spec.get("source_dir")
        if source_prefix is None and source_dir is None:
            source_prefix = f"landing/{pid}/"
        out.append(
            JobDataset(
                pid=pid,
                dataset_id=spec.get("dataset_id") or dataset_id_for_pid(pid),
                source_prefix=source_prefix,
                source_dir=source_dir,
            )
        )
    pids = [d.pid for d in out]
    if len(set(pids)) != len(pids):
        raise InvalidIdentifierError(f"job {job_id!r} names a dataset twice: {pids}")
    return out


def _result(
    dataset: JobDataset, lifecycle: DatasetLifecycle, error: BaseException | None = None, **fields: Any
) -> tuple[JobDatasetResult, DatasetLifecycle]:
    word = lifecycle.archive_status_message or lifecycle.retrieve_status_message
    if error is not None:
        fields.update(message=f"{type(error).__name__}: {error}", error=type(error).__name__)
    result = JobDatasetResult(
        pid=dataset.pid, dataset_id=dataset.dataset_id, ok=error is None, status=str(word), **fields
    )
    return result, lifecycle


def archive_outcome(
    dataset: JobDataset, outcome: ArchiveResult | BaseException
) -> tuple[JobDatasetResult, DatasetLifecycle]:
    """The per-dataset result and lifecycle update for an archive run's result or error."""
    if isinstance(outcome, BaseException):
        return _result(dataset, archive_failed(outcome), outcome)
    return _result(
        dataset,
        archive_succeeded(landing_removed=outcome.landing_deleted > 0),
        message=(
            f"{outcome.file_count} files in {len(outcome.datablocks)} datablocks on LTS"
            if outcome.created
            else "already on LTS"
        ),
        datablocks=len(outcome.datablocks),
        bytes=outcome.archived_bytes,
    )


def retrieve_outcome(
    dataset: JobDataset, outcome: RetrieveResult | BaseException
) -> tuple[JobDatasetResult, DatasetLifecycle]:
    """The per-dataset result and lifecycle update for a retrieval's result or error."""
    if isinstance(outcome, BaseException):
        return _result(dataset, retrieve_failed(outcome), outcome)
    return _result(
        dataset,
        retrieve_succeeded(),
        message=f"{len(outcome.datablocks)} datablocks ready for download",
        datablocks=len(outcome.datablocks),
        bytes=sum(b.size for b in outcome.datablocks),
        urls=tuple(b.url for b in outcome.datablocks),
        script_url=outcome.script_url,
        expires_at=outcome.expires_at,
    )


def job_result_object(results: list[JobDatasetResult]) -> dict[str, Any]:
    """The ``jobResultObject`` of a finished job: one entry per dataset."""
    entries: list[dict[str, Any]] = []
    for r in results:
        entry: dict[str, Any] = {
            "pid": r.pid,
            "datasetId": r.dataset_id,
            "status": r.status,
            "success": r.ok,
            "message": r.message,
        }
        if r.datablocks:
            entry["datablocks"] = r.datablocks
            entry["size"] = r.bytes
        if r.urls:
            entry["urls"] = list(r.urls)
        if r.script_url:
            entry["downloadScript"] = r.script_url
        if r.expires_at:
            entry["expiresAt"] = r.expires_at.isoformat()
        entries.append(entry)
    return {"result": entries}


def job_summary(kind: str, job_id: str, status: JobStatus, results: list[JobDatasetResult]) -> str:
    """A markdown summary of a finished job: its final word and one line per dataset."""
    failed = [r for r in results if not r.ok]
    lines = [
        f"# {kind} job `{job_id}`: {status.value}",
        "",
        f"{len(results) - len(failed)} of {len(results)} datasets succeeded.",
        "",
        "| pid | dataset id | status | datablocks | message |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        message = r.message.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{r.pid}` | `{r.dataset_id}` | {r.status} | {r.datablocks} | {message} |")
    for r in results:
        if r.script_url:
            lines += ["", f"[download script for `{r.pid}`]({r.script_url})"]
    return "\n".join(lines) + "\n"


def job_state_message(kind: str, job_id: str, results: list[JobDatasetResult]) -> str:
    """The message of a job run's final state, naming every failed dataset."""
    failed = [r for r in results if not r.ok]
    if not failed:
        return f"{kind} job {job_id!r}: all {len(results)} datasets succeeded"
    names = "; ".join(f"{r.pid} ({r.status}: {r.message})" for r in failed)
    return f"{kind} job {job_id!r}: {len(failed)} of {len(results)} datasets failed: {names}"


# --- HTTP -----------------------------------------------------------------------------------------


def is_configured(settings: DataCatalogSettings) -> bool:
    """Whether a data catalog URL is configured (otherwise status lives only in Prefect)."""
    return bool(settings.url)


def check_path_id(value: str, what: str) -> str:
    """Return ``value`` if it can name a job or dataset in a URL path (it is percent-encoded).

    Raises:
        InvalidIdentifierError: empty, ``.``/``..``, or holding control characters.

    """
    if not isinstance(value, str) or value.strip() in ("", ".", "..") or any(ord(c) < 32 for c in value):
        raise InvalidIdentifierError(f"invalid {what} {value!r} for the data catalog")
    return value


def _segment(value: str) -> str:
    return quote(value, safe="")


def _secrets(settings: DataCatalogSettings) -> list[str]:
    out = [s.get_secret_value() for s in (settings.password, settings.token) if s is not None]
    with _TOKENS_LOCK:
        out.extend(t for k, t in _TOKENS.items() if k[0] == settings.url)
    return [s for s in out if s]


def _redact(text: str, settings: DataCatalogSettings) -> str:
    for secret in _secrets(settings):
        text = text.replace(secret, "***")
    return text


def _brief(response: httpx.Response, settings: DataCatalogSettings) -> str:
    try:
        body = response.text.strip()
    except Exception:  # noqa: BLE001 - an undecodable body only loses detail in the message
        return ""
    return f": {_redact(body[:300], settings)}" if body else ""


_TOKENS: dict[tuple[str | None, str | None], str] = {}
_TOKENS_LOCK = threading.Lock()


def clear_token_cache() -> None:
    """Forget every token obtained by login (the next call logs in again)."""
    with _TOKENS_LOCK:
        _TOKENS.clear()


def _base_url(settings: DataCatalogSettings) -> str:
    if not settings.url:
        raise ConfigError("no data catalog configured (data_catalog.url is empty)")
    return settings.url.rstrip("/") + "/"


def _send(
    settings: DataCatalogSettings,
    method: str,
    path: str,
    what: str,
    *,
    json: dict[str, Any],
    token: str | None,
    sleep: Callable[[float], None],
) -> httpx.Response:
    """One logical request with bounded retries; returns any non-transient response."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    attempts = settings.retries + 1
    last: str = ""
    with httpx.Client(base_url=_base_url(settings), timeout=settings.timeout_seconds) as client:
        for attempt in range(attempts):
            if attempt:
                delay = min(settings.backoff_seconds * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
                log.warning(
                    "data catalog: %s %s for %s failed (%s); try %d of %d in %.2fs",
                    method,
                    path,
                    what,
                    last,
                    attempt + 1,
                    attempts,
                    delay,
                )
                sleep(delay)
            try:
                response = client.request(method, path, json=json, headers=headers)
            except httpx.TransportError as e:
                last = type(e).__name__
                if attempt + 1 == attempts:
                    raise TransientDataCatalogError(
                        f"data catalog unreachable for {what} ({method} {path}) "
                        f"after {attempts} tries: {last}"
                    ) from e
                continue
            if response.status_code in TRANSIENT_STATUS:
                last = f"HTTP {response.status_code}"
                if attempt + 1 == attempts:
                    raise TransientDataCatalogError(
                        f"data catalog answered HTTP {response.status_code} for {what} ({method} {path}) "
                        f"after {attempts} tries"
                    )
                continue
            return response
    raise AssertionError("unreachable")  # pragma: no cover


def login(settings: DataCatalogSettings, *, sleep: Callable[[float], None] = time.sleep) -> str:
    """A token for the data catalog: the configured token, or one from ``POST /auth/login``.

    Raises:
        ConfigError: no catalog URL, or neither a token nor username and password are configured.
        DataCatalogError: the catalog refused the credentials or answered without a token.
        TransientDataCatalogError: the catalog stayed unreachable.

    """
    if settings.token is not None:
        return settings.token.get_secret_value()
    if not settings.username or settings.password is None:
        raise ConfigError(
            f"data catalog {settings.url}: set data_catalog.token or data_catalog.username and password"
        )
    what = f"user {settings.username!r}"
    response = _send(
        settings,
        "POST",
        "auth/login",
        what,
        json={"username": settings.username, "password": settings.password.get_secret_value()},
        token=None,
        sleep=sleep,
    )
    if response.status_code >= 400:
        raise DataCatalogError(
            f"data catalog {settings.url} refused login for {what}: HTTP {response.status_code}"
        )
    try:
        body = response.json()
    except ValueError:
        body = None
    token = (body.get("access_token") or body.get("id")) if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise DataCatalogError(f"data catalog {settings.url} answered login for {what} without a token")
    log.info("data catalog: logged in to %s as %s", settings.url, settings.username)
    return token


def _token(settings: DataCatalogSettings, sleep: Callable[[float], None], *, renew: bool = False) -> str:
    if settings.token is not None:
        return settings.token.get_secret_value()
    key = (settings.url, settings.username)
    with _TOKENS_LOCK:
        if renew:
            _TOKENS.pop(key, None)
        cached = _TOKENS.get(key)
    if cached:
        return cached
    token = login(settings, sleep=sleep)
    with _TOKENS_LOCK:
        _TOKENS[key] = token
    return token


def _patch(
    settings: DataCatalogSettings,
    path: str,
    what: str,
    body: dict[str, Any],
    sleep: Callable[[float], None],
) -> None:
    response = _send(settings, "PATCH", path, what, json=body, token=_token(settings, sleep), sleep=sleep)
    if response.status_code == 401 and settings.token is None:
        response = _send(
            settings, "PATCH", path, what, json=body, token=_token(settings, sleep, renew=True), sleep=sleep
        )
    if response.status_code >= 400:
        raise DataCatalogError(
            f"data catalog refused the update of {what}: HTTP {response.status_code}"
            f"{_brief(response, settings)}"
        )


def update_job(
    settings: DataCatalogSettings,
    job_id: str,
    status: JobStatus,
    result: dict[str, Any] | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """``PATCH /jobs/{job_id}`` with ``jobStatusMessage`` (and ``jobResultObject`` if given).

    Raises:
        DataCatalogError: the catalog refused the update (4xx, other 5xx), naming the job.
        TransientDataCatalogError: the catalog stayed unreachable or busy after every retry.

    """
    _base_url(settings)
    check_path_id(job_id, "job id")
    body: dict[str, Any] = {"jobStatusMessage": JobStatus(status).value}
    if result is not None:
        body["jobResultObject"] = result
    _patch(settings, f"jobs/{_segment(job_id)}", f"job {job_id!r}", body, sleep)
    log.info("data catalog: job %s -> %s", job_id, body["jobStatusMessage"])


def update_dataset(
    settings: DataCatalogSettings,
    pid: str,
    lifecycle: DatasetLifecycle,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """``PATCH /datasets/{pid}`` with ``datasetlifecycle`` holding only ``lifecycle``'s set fields.

    ``pid`` may contain ``/`` (e.g. ``20.500.12269/abc``); it is percent-encoded as one segment.

    Raises:
        DataCatalogError: the catalog refused the update, naming the dataset.
        TransientDataCatalogError: the catalog stayed unreachable or busy after every retry.

    """
    _base_url(settings)
    check_path_id(pid, "dataset pid")
    fields = lifecycle.fields()
    if not fields:
        return
    _patch(settings, f"datasets/{_segment(pid)}", f"dataset {pid!r}", {"datasetlifecycle": fields}, sleep)
    log.info("data catalog: dataset %s -> %s", pid, fields)

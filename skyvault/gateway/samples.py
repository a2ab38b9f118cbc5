"""``POST /series/{source}/samples``: a batch of sensor samples is ingested like a landed file.

The body is JSON lines (``application/x-ndjson``, ``application/jsonl``), CSV (``text/csv``) or a
fixture dump (``application/json``: a JSON array of ``{"model": "<app>.sample", "fields": {...}}``
entries), the formats :mod:`skyvault.series.samples` reads. The handler writes it unchanged to
``landing/samples/<source>/gateway-<sha256 of the body>.<jsonl|csv|json>`` and starts one
``ingest-samples/on-request`` run for that one key, with an idempotency key derived from it. An
identical batch posted again lands on the same key and finds the same run, so nothing is stored
twice (the flow also skips a file whose key and content it ingested before). When that run ended
Failed, Crashed or Cancelled, posting the batch again starts a new run keyed after it. When the run
cannot be started (503), the file stays landed: posting the batch again starts it, and so does
any ``ingest-samples`` run over the whole source.

Before accepting, the gateway checks only that the body is a batch at all: a supported media type,
not empty, UTF-8 text; JSON lines with a non-blank line; CSV with a header row and a data row; JSON
that parses as an array holding at least one fixture entry (plain sample objects go as JSON lines).
Everything else (header fields, values, limits, the shape of single entries) is checked by the
flow: a bad sample is rejected with its line and reason in the run's ``ingest-samples-rejections``
artifact, and a file it cannot read fails the run with the reason in its state message.

The answer (202) names the key and the run, and ``status_url``:
``GET /series/{source}/samples/runs/{run_id}`` gives that run's state; once it has ended, its
message holds the inserted, duplicate and rejected counts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from skyvault.config.settings import Settings
from skyvault.errors import RequestError, RequestTooLargeError, UnknownSeriesSourceError
from skyvault.gateway.body import read_body
from skyvault.gateway.runs import RunInfo, Runs, idempotency_key
from skyvault.series.ingest import landing_prefix
from skyvault.series.samples import FORMATS, sample_format
from skyvault.storage.store import ObjectStore

#: The deployment a batch starts (``<flow>/<deployment>``, see prefect.yaml).
INGEST_SAMPLES = "ingest-samples/on-request"

#: Media type of a batch -> extension of its landed file.
MEDIA_TYPES: dict[str, str] = {
    "application/x-ndjson": ".jsonl",
    "application/jsonl": ".jsonl",
    "text/csv": ".csv",
    "application/json": ".json",
}

#: Run states after which a re-posted batch starts a new run.
RETRIED_STATES = frozenset({"FAILED", "CRASHED", "CANCELLED"})

_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii"})


class EmptyBatchError(RequestError):
    """A posted sample batch holds no samples at all (answered 400)."""


class UnsupportedBatchTypeError(RequestError):
    """A posted sample batch has a media type the ingest does not read (answered 415)."""


@dataclass(frozen=True)
class Batch:
    """Where a posted batch lands: its key in the landing zone and the body's SHA-256 (hex)."""

    key: str
    sha256: str


def batch_extension(content_type: str | None) -> str:
    """The landed file's extension for a request's ``Content-Type`` (parameters allowed).

    Raises:
        UnsupportedBatchTypeError: no media type, one that is not a sample format, or a charset
            other than UTF-8.

    """
    accepted = ", ".join(MEDIA_TYPES)
    if not content_type or not content_type.strip():
        raise UnsupportedBatchTypeError(f"no Content-Type: send one of {accepted}", field="content-type")
    media, *params = (part.strip() for part in content_type.split(";"))
    extension = MEDIA_TYPES.get(media.lower())
    if extension is None:
        raise UnsupportedBatchTypeError(
            f"Content-Type {media[:100]!r} is not a sample batch: send one of {accepted}",
            field="content-type",
        )
    for param in params:
        name, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in _CHARSETS:
            raise UnsupportedBatchTypeError(
                f"charset {charset[:40]!r} is not accepted: sample batches are UTF-8", field="content-type"
            )
    return extension


def batch_key(prefix: str, data: bytes, extension: str) -> Batch:
    """The landing key of a batch: ``<prefix>gateway-<sha256 of data><extension>``.

    Raises:
        ValueError: ``extension`` is not one of a sample format.

    """
    sha256 = hashlib.sha256(data).hexdigest()
    key = f"{prefix}gateway-{sha256}{extension}"
    if extension not in FORMATS or sample_format(key) is None:
        raise ValueError(f"{extension!r} is not the extension of a sample format ({', '.join(FORMATS)})")
    return Batch(key=key, sha256=sha256)


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def check_batch(data: bytes, extension: str) -> None:
    """Refuse a body that is not a sample batch at all (see the module docstring).

    Raises:
        EmptyBatchError: the body holds no sample (no bytes, only blank lines, a CSV header
            alone, an empty JSON array).
        RequestError: not UTF-8, unreadable CSV, not a JSON array, or a JSON array without
            any fixture entry; the message names the line.

    """
    if not data.strip():
        raise EmptyBatchError("the request body is empty: a batch holds at least one sample", field="body")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RequestError(f"the request body is not UTF-8 text (line {line})", field="body") from e
    if extension == ".jsonl":
        if not text.strip():
            raise EmptyBatchError("the request body holds only blank lines", field="body")
    elif extension == ".csv":
        _check_csv(text)
    else:
        _check_fixture(text)


def _check_csv(text: str) -> None:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        while header == []:
            header = next(reader, None)
        if header is None:
            raise EmptyBatchError("the CSV body holds only blank lines", field="body")
        row = next(reader, None)
        while row == []:
            row = next(reader, None)
    except csv.Error as e:
        raise RequestError(f"the CSV body is unreadable at line {reader.line_num}: {e}", field="body") from e
    if row is None:
        raise EmptyBatchError("the CSV body holds a header row and no sample", field="body")


def _check_fixture(text: str) -> None:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"the JSON body is not valid JSON (line {e.lineno}): {e.msg}", field="body") from e
    except RecursionError as e:
        raise RequestError("the JSON body is nested too deeply", field="body") from e
    if not isinstance(doc, list):
        raise RequestError(
            'a JSON body is a fixture dump: an array of {"model": "<app>.sample", "fields": {...}} entries',
            field="body",
        )
    if not doc:
        raise EmptyBatchError("the JSON body is an empty array", field="body")
    if not any(isinstance(entry, dict) and isinstance(entry.get("fields"), dict) for entry in doc):
        raise RequestError(
            'no entry of the JSON array is a fixture entry {"model": "<app>.sample", "fields": {...}}; '
            "post plain sample objects as JSON lines (Content-Type: application/x-ndjson)",
            field="body",
        )


def run_view(run: RunInfo, runs: Runs) -> dict[str, Any]:
    """A run as the answers show it: id, name, state, message, creation time, UI link."""
    return {
        "id": run.id,
        "name": run.name,
        "state": run.state_name,
        "state_type": run.state_type,
        "message": run.message,
        "created": run.created.isoformat() if run.created else None,
        "ui_url": runs.ui_url(run.id),
    }


def status_path(source: str, run_id: str) -> str:
    """Where a caller reads the state of a batch's run."""
    return f"/series/{source}/samples/runs/{run_id}"


def start_ingest(source: str, key: str, runs: Runs) -> RunInfo:
    """Start (or find) the ``ingest-samples`` run of one landed file.

    A run that ended Failed, Crashed or Cancelled is followed by a new one keyed after it.

    Raises:
        OrchestratorError: the deployment is not registered or the Prefect API failed.

    """
    parameters: dict[str, Any] = {"source": source, "keys": [key]}
    name = f"ingest-samples/{source}"
    run_key = idempotency_key(INGEST_SAMPLES, {"source": source, "key": key})
    run = runs.start(INGEST_SAMPLES, parameters, run_key, name)
    while run.state_type in RETRIED_STATES:
        run_key = f"{run_key}/after/{run.id}"
        run = runs.start(INGEST_SAMPLES, parameters, run_key, name)
    return run


def land_batch(source: str, data: bytes, extension: str, settings: Settings, store: ObjectStore) -> Batch:
    """Check a batch and write it to the source's landing folder (once: the key is its hash).

    Raises:
        UnknownSeriesSourceError: the source is not configured.
        RequestTooLargeError: a fixture dump (read whole by the ingest) is over
            ``series.max_file_bytes``.
        EmptyBatchError, RequestError: the body is not a batch (see :func:`check_batch`).
        StorageError: the object store refused the write.

    """
    series = settings.series
    series.source(source)
    if sample_format(f"batch{extension}") == "fixture" and len(data) > series.max_file_bytes:
        raise RequestTooLargeError(
            f"request body is a fixture dump of {len(data)} bytes, more than series.max_file_bytes = "
            f"{series.max_file_bytes} (the largest fixture dump source {source!r} ingests; "
            f"send larger batches as JSON lines or CSV)",
            field="body",
        )
    check_batch(data, extension)
    batch = batch_key(landing_prefix(series, source), data, extension)
    if store.head(batch.key) is None:
        store.put_bytes(batch.key, data)
    return batch


def _refusal(status: int, error: RequestError) -> JSONResponse:
    return JSONResponse({"detail": str(error), "field": error.field}, status_code=status)


def samples_router(
    settings: Settings, store: ObjectStore, runs: Runs, caller: Callable[[Request], str]
) -> APIRouter:
    """``POST /series/{source}/samples`` and its run's status, behind ``caller``'s credential check."""
    router = APIRouter(dependencies=[Depends(caller)])
    limit = settings.gateway.max_body_bytes

    @router.post("/series/{source}/samples", status_code=202)
    async def post_samples(source: str, request: Request) -> Any:
        try:
            settings.series.source(source)
        except UnknownSeriesSourceError as e:
            return JSONResponse({"detail": str(e), "field": "source"}, status_code=404)
        try:
            extension = batch_extension(request.headers.get("content-type"))
            data = await read_body(request, limit)
            batch = await run_in_threadpool(land_batch, source, data, extension, settings, store)
        except UnsupportedBatchTypeError as e:
            return _refusal(415, e)
        except EmptyBatchError as e:
            return _refusal(400, e)
        run = await run_in_threadpool(start_ingest, source, batch.key, runs)
        return {
            "source": source,
            "key": batch.key,
            "sha256": batch.sha256,
            "bytes": len(data),
            "run": run_view(run, runs),
            "status_url": status_path(source, run.id),
        }

    @router.get("/series/{source}/samples/runs/{run_id}")
    def sample_run(source: str, run_id: str) -> Any:
        try:
            settings.series.source(source)
        except UnknownSeriesSourceError as e:
            return JSONResponse({"detail": str(e), "field": "source"}, status_code=404)
        run = runs.read(run_id)
        if (
            run is None
            or run.parameters.get("source") != source
            or not run.name.startswith("ingest-samples/")
        ):
            return JSONResponse(
                {"detail": f"no ingest-samples run {run_id[:100]!r} of source {source!r}", "field": "run_id"},
                status_code=404,
            )
        return {"source": source, "keys": run.parameters.get("keys"), "run": run_view(run, runs)}

    return router

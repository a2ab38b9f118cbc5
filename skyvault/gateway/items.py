"""The STAC pipeline API: ``POST /newitem`` and ``GET /status`` in that API's words.

A ``/newitem`` request becomes a JSON sidecar at ``landing/<collection_id>/<product-id>.json``
(the form the landing-zone discovery reads) and a run of ``ingest/on-request`` for that one
sidecar, which runs ``process-product`` for the product it describes. The request's id is a
UUID derived from the sidecar, so a resent request has the same id and the same run. What the
gateway needs to answer ``/status`` later is kept at ``gateway/newitem/<id>.json``.

``_operation`` follows the product through its steps, from its status record
(:mod:`skyvault.status`) and the ingest run:

==================================  =====================================================
ingest run not started yet          ``GETCOLLECTION``
ingest run reading the sidecar      ``GETITEMFILE``
``preprocess`` (COG made, uploaded) ``TRANF_COG``
``register`` (item written)         ``CREATEPYSTACITEM``
``seed`` (tiles of the published    ``UPLOAD_COG_TO_SERVER``
COG and item)
done                                ``PROCESS FINISHED``
==================================  =====================================================

``_status`` is ``error`` when the step failed (or the ingest run ended without the product),
with the reason in ``_description``.
"""

from __future__ import annotations

import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skyvault.config.settings import Settings
from skyvault.discovery.landing import LANDING, resolve_in_folder
from skyvault.discovery.reports import parse_newitem, parse_time
from skyvault.errors import (
    InvalidIdentifierError,
    NotFoundError,
    ObjectNotFoundError,
    ReportError,
    RequestError,
)
from skyvault.gateway.runs import INGEST, RunInfo, Runs, idempotency_key, request_uuid
from skyvault.ids import product_id_from_name
from skyvault.models import ProductStatus
from skyvault.status import now, read_statuses
from skyvault.storage.store import ObjectStore

REQUESTS_PREFIX = "gateway/newitem/"
_JSON = "application/json"

#: ``_operation`` of each ``process-product`` step.
STEP_OPERATIONS = {
    "preprocess": "TRANF_COG",
    "register": "CREATEPYSTACITEM",
    "seed": "UPLOAD_COG_TO_SERVER",
}
QUEUED, READING, FINISHED = "GETCOLLECTION", "GETITEMFILE", "PROCESS FINISHED"


class NewItemRequest(BaseModel):
    """``POST /newitem``: the item to make from a file in the landing zone."""

    model_config = ConfigDict(extra="ignore", strict=True)

    collection_id: str = Field(min_length=1)
    date: str | None = None
    name: str | None = None
    filename: str | None = None
    stac_api_server: str | None = None
    file_source_host: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


class NewItemRecord(BaseModel):
    """What the gateway keeps of one ``/newitem`` request (``gateway/newitem/<id>.json``)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    collection: str
    product_id: str
    sidecar_key: str
    flow_run_id: str
    received_at: dt.datetime
    param: dict[str, Any]


class StatusAnswer(BaseModel):
    """``GET /status`` in the pipeline API's words."""

    model_config = ConfigDict(populate_by_name=True)

    id: str = Field(serialization_alias="_id")
    operation: str = Field(serialization_alias="_operation")
    param: dict[str, Any] = Field(serialization_alias="_param")
    status: Literal["ok", "error"] = Field(serialization_alias="_status")
    description: str = Field(serialization_alias="_description")


def record_key(request_id: str) -> str:
    """Where a request's record is kept."""
    return f"{REQUESTS_PREFIX}{request_id}.json"


def sidecar_for(request: NewItemRequest, settings: Settings, store: ObjectStore) -> tuple[str, str, bytes]:
    """The product id, the sidecar's key and its bytes for a request.

    Raises:
        RequestError: unknown ``collection_id``, no ``name`` or ``filename``, a bad ``date``, an
            unsafe name, or a ``filename`` that is not in the collection's landing folder.

    """
    collection = request.collection_id
    if collection not in settings.collections:
        known = ", ".join(sorted(settings.collections)) or "none"
        raise RequestError(f"unknown collection_id {collection!r} (configured: {known})", "collection_id")
    if not (request.name or request.filename):
        raise RequestError("name or filename is required", "filename")
    field = "name" if request.name else "filename"
    try:
        product_id = product_id_from_name(request.name or request.filename.rsplit("/", 1)[-1])  # type: ignore[union-attr]
    except InvalidIdentifierError as e:
        raise RequestError(f"{field}: {e}", field) from e
    if request.date is not None:
        try:
            parse_time(request.date)
        except ValueError:
            raise RequestError(
                f"date {request.date[:60]!r} is not an ISO 8601 date or date-time", "date"
            ) from None
    key = f"{LANDING}{collection}/{product_id}.json"
    if request.filename:
        try:
            raster = resolve_in_folder(key, request.filename)
        except ReportError as e:
            raise RequestError(f"filename: {e}", "filename") from e
        if store.head(raster) is None:
            raise RequestError(
                f"filename {request.filename!r}: {raster!r} is not in the landing zone", "filename"
            )
    doc = request.model_dump(mode="json", exclude_none=True)
    data = json.dumps(doc, sort_keys=True, indent=2).encode("utf-8")
    try:
        parse_newitem(data, key, limits=settings.limits)
    except ReportError as e:
        raise RequestError(f"body: {e}", "body") from e
    return product_id, key, data


def submit_newitem(
    request: NewItemRequest, settings: Settings, store: ObjectStore, runs: Runs
) -> NewItemRecord:
    """Write the sidecar, start (or find) the ingest run, and keep the request's record.

    Raises:
        RequestError: the request is malformed (see :func:`sidecar_for`).
        OrchestratorError: the run could not be started.
        StorageError: the sidecar or the record could not be written.

    """
    product_id, key, data = sidecar_for(request, settings, store)
    payload = {"sidecar": key, "content": json.loads(data)}
    request_id = request_uuid("newitem", payload)
    existing = read_record(store, request_id)
    store.put_bytes(key, data, content_type=_JSON)
    run = runs.start(INGEST, {"report": key}, idempotency_key(INGEST, payload), name=f"ingest/{key}")
    if existing is not None and existing.flow_run_id == run.id:
        return existing
    record = NewItemRecord(
        id=request_id,
        collection=request.collection_id,
        product_id=product_id,
        sidecar_key=key,
        flow_run_id=run.id,
        received_at=now(),
        param=request.model_dump(mode="json", exclude_none=True),
    )
    store.put_bytes(record_key(request_id), record.model_dump_json(indent=2).encode(), content_type=_JSON)
    return record


def read_record(store: ObjectStore, request_id: str) -> NewItemRecord | None:
    """A request's record, or None when there is none (or it cannot be read as one)."""
    try:
        data = store.get_bytes(record_key(request_id))
    except ObjectNotFoundError:
        return None
    try:
        return NewItemRecord.model_validate_json(data)
    except ValidationError:
        return None


def status_of(record: NewItemRecord, product: ProductStatus | None, ingest: RunInfo | None) -> StatusAnswer:
    """The pipeline API's status of one request, from the product's record and the ingest run."""

    def answer(operation: str, ok: bool, description: str) -> StatusAnswer:
        return StatusAnswer(
            id=record.id,
            operation=operation,
            param=record.param,
            status="ok" if ok else "error",
            description=description,
        )

    label = f"product {record.collection}/{record.product_id}"
    fresh = product if product is not None and product.updated_at >= record.received_at else None
    if fresh is not None:
        if fresh.state == "done":
            return answer(FINISHED, True, f"{label} done: {fresh.message}".rstrip(": "))
        operation = STEP_OPERATIONS.get(fresh.step or "", STEP_OPERATIONS["preprocess"])
        if fresh.state == "failed":
            return answer(operation, False, fresh.message or f"{label} failed at {fresh.step}")
        return answer(operation, True, f"{label}: {fresh.step} running")
    if ingest is None or not ingest.started:
        word = ingest.state_name if ingest is not None else "not found"
        return answer(QUEUED, True, f"received; the ingest run is {word}")
    if not ingest.ended:
        return answer(READING, True, f"ingest run {ingest.name} is reading {record.sidecar_key}")
    if product is not None and product.state == "done":
        return answer(FINISHED, True, f"{label} was already done: {product.message}".rstrip(": "))
    reason = f": {ingest.message}" if ingest.message else ""
    return answer(READING, False, f"{label}: ingest run {ingest.name} ended {ingest.state_name}{reason}")


def request_status(request_id: str, settings: Settings, store: ObjectStore, runs: Runs) -> StatusAnswer:
    """``GET /status?id=``.

    Raises:
        NotFoundError: no request has this id.

    """
    record = read_record(store, request_id)
    if record is None:
        raise NotFoundError(f"no /newitem request with id {request_id!r}")
    return _statuses([record], settings, runs)[0]


def all_statuses(settings: Settings, store: ObjectStore, runs: Runs, limit: int) -> list[StatusAnswer]:
    """``GET /status/all``: the newest ``limit`` requests, newest first."""
    keys = [info.key for info in store.list(REQUESTS_PREFIX) if info.key.endswith(".json")]
    ids = [key[len(REQUESTS_PREFIX) : -len(".json")] for key in keys]
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="gateway-status") as pool:
        found = [r for r in pool.map(lambda i: read_record(store, i), ids) if r is not None]
    found.sort(key=lambda r: r.received_at, reverse=True)
    return _statuses(found[:limit], settings, runs)


def _statuses(records: list[NewItemRecord], settings: Settings, runs: Runs) -> list[StatusAnswer]:
    products = read_statuses({(r.collection, r.product_id) for r in records}, settings.store)
    ingests = runs.read_many([r.flow_run_id for r in records])
    return [
        status_of(r, products.get((r.collection, r.product_id)), ingests.get(r.flow_run_id)) for r in records
    ]

"""``POST /browse-reports``: a browse report is parsed, stored in the landing zone and ingested.

The report is parsed with the landing zone's own parser (defusedxml, no DTD or entities, size
and depth limits) before anything is written: a report that does not parse is refused and
nothing is stored or started. A parsed report is stored at
``landing/<collection>/browse-report-<sha256 prefix>.xml``, next to the images its browses name
(``fileName`` is relative to the report's folder), and ``ingest/on-request`` runs for it.

The answer uses the view server's words: one entry per browse, ``success`` or ``failure`` with an
``exceptionCode`` and ``exceptionMessage``, and ``success`` or ``partial`` for the report. A
report without any browse that can be ingested is refused as a whole (nothing stored).
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from skyvault.config.settings import Settings
from skyvault.discovery.landing import LANDING, resolve_in_folder
from skyvault.discovery.reports import BrowseReport, parse_browse_report
from skyvault.errors import InvalidIdentifierError, ReportError, RequestError, StorageError
from skyvault.gateway.runs import INGEST, Runs, idempotency_key
from skyvault.ids import product_id_from_name
from skyvault.storage.store import ObjectStore

_XML = "application/xml"


class BrowseError(BaseModel):
    """Why one browse failed, in the view server's words."""

    model_config = ConfigDict(populate_by_name=True)

    exception_code: str = Field(serialization_alias="exceptionCode")
    exception_message: str = Field(serialization_alias="exceptionMessage")


class BrowseResult(BaseModel):
    """The answer for one browse of the report."""

    model_config = ConfigDict(populate_by_name=True)

    identifier: str | None = None
    file_name: str | None = Field(None, serialization_alias="fileName")
    product_id: str | None = Field(None, serialization_alias="productId")
    status: Literal["success", "failure"]
    error: BrowseError | None = None


class ReportAnswer(BaseModel):
    """The answer for the report: ``success`` when every browse is accepted, else ``partial``."""

    model_config = ConfigDict(populate_by_name=True)

    status: Literal["success", "partial"]
    ingestion_result: list[BrowseResult] = Field(serialization_alias="ingestionResult")
    collection: str
    report_key: str | None = Field(None, serialization_alias="reportKey")
    flow_run_id: str | None = Field(None, serialization_alias="flowRunId")


class ReportRefusedError(RequestError):
    """No browse of a parsed report can be ingested; ``answer`` says why for each."""

    def __init__(self, message: str, answer: ReportAnswer) -> None:
        super().__init__(message, field="browse")
        self.answer = answer


def _failure(identifier: str | None, file_name: str | None, code: str, message: str) -> BrowseResult:
    return BrowseResult(
        identifier=identifier,
        file_name=file_name,
        status="failure",
        error=BrowseError(exception_code=code, exception_message=message),
    )


def report_collection(report: BrowseReport, collection: str | None, settings: Settings) -> str:
    """The collection a report goes to: the ``collection`` asked for, else its ``browseType``.

    Raises:
        RequestError: neither names a configured collection (field ``collection``).

    """
    chosen = collection or report.browse_type
    if chosen is None or chosen not in settings.collections:
        known = ", ".join(sorted(settings.collections)) or "none"
        given = f"collection {chosen!r}" if chosen else "no collection (and the report has no browseType)"
        raise RequestError(f"{given} is not a configured collection (configured: {known})", "collection")
    return chosen


def check_browses(report: BrowseReport, report_key: str, store: ObjectStore) -> list[BrowseResult]:
    """One result per browse, in the report's order.

    Rejected browses fail, and so do names that cannot be resolved or made into a product id and
    images missing from the landing zone.
    """
    results: dict[int, BrowseResult] = {}
    for rejected in report.rejected:
        results[rejected.index] = _failure(
            rejected.identifier, rejected.file_name, "ValidationError", rejected.message
        )
    for browse in report.browses:
        name = browse.identifier or browse.file_name.rsplit("/", 1)[-1]
        try:
            raster = resolve_in_folder(report_key, browse.file_name)
            product_id = product_id_from_name(name)
        except (ReportError, InvalidIdentifierError) as e:
            results[browse.index] = _failure(browse.identifier, browse.file_name, "InvalidReference", str(e))
            continue
        try:
            present = store.head(raster) is not None
        except StorageError as e:
            results[browse.index] = _failure(browse.identifier, browse.file_name, "StorageError", str(e))
            continue
        if not present:
            results[browse.index] = _failure(
                browse.identifier, browse.file_name, "FileNotFound", f"{raster!r} is not in the landing zone"
            )
            continue
        results[browse.index] = BrowseResult(
            identifier=browse.identifier, file_name=browse.file_name, product_id=product_id, status="success"
        )
    return [results[i] for i in sorted(results)]


def submit_report(
    data: bytes, collection: str | None, settings: Settings, store: ObjectStore, runs: Runs
) -> ReportAnswer:
    """Parse, check, store and ingest one browse report.

    Raises:
        ReportError: the XML is unsafe or malformed, or not a browse report.
        ReportLimitError: the report is over the size or depth limits.
        RequestError: no configured collection for it (field ``collection``).
        ReportRefusedError: no browse of it can be ingested.
        OrchestratorError: the run could not be started.

    """
    report = parse_browse_report(data, "request body", limits=settings.limits)
    chosen = report_collection(report, collection, settings)
    key = f"{LANDING}{chosen}/browse-report-{hashlib.sha256(data).hexdigest()[:24]}.xml"
    results = check_browses(report, key, store)
    ok = sum(r.status == "success" for r in results)
    status: Literal["success", "partial"] = "success" if ok == len(results) else "partial"
    if ok == 0:
        answer = ReportAnswer(status="partial", ingestion_result=results, collection=chosen)
        raise ReportRefusedError(f"no browse of the report can be ingested into {chosen!r}", answer)
    store.put_bytes(key, data, content_type=_XML)
    run = runs.start(INGEST, {"report": key}, idempotency_key(INGEST, {"report": key}), name=f"ingest/{key}")
    return ReportAnswer(
        status=status, ingestion_result=results, collection=chosen, report_key=key, flow_run_id=run.id
    )

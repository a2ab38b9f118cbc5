"""``GET /series/{source}``: a source's reduced series at a resolution, as CSV or JSON.

The read itself is :func:`skyvault.series.read.read_series`. When it reduced ended periods live
because their blocks are missing, the handler starts one ``seed-series/on-request`` run for
them, with an idempotency key derived from (source, level, periods): concurrent or repeated misses
of the same periods find that run instead of starting another. When the run that key names has
ended and the blocks are still missing, the next miss starts a new run keyed after it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from skyvault.config.settings import Settings
from skyvault.errors import OrchestratorError, SeriesRequestError, UnknownSeriesSourceError
from skyvault.gateway.runs import RunInfo, Runs, idempotency_key
from skyvault.series.read import SeriesRead, parse_resolution, parse_time, read_series
from skyvault.storage.store import ObjectStore

log = logging.getLogger(__name__)

#: The deployment a miss starts (``<flow>/<deployment>``, see prefect.yaml).
SEED_SERIES = "seed-series/on-request"
FORMATS = ("json", "csv")


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def seed_missing(read: SeriesRead, runs: Runs) -> RunInfo | None:
    """Start (or find) the ``seed-series`` run building the blocks ``read`` missed; None when none.

    Raises:
        OrchestratorError: the deployment is not registered or the Prefect API failed.

    """
    if not read.missing:
        return None
    periods = [_iso(p) for p in read.missing]
    key = idempotency_key(SEED_SERIES, {"source": read.source, "level": read.level.name, "periods": periods})
    parameters: dict[str, Any] = {"source": read.source, "blocks": {read.level.name: periods}}
    name = f"seed-series/{read.source}"
    run = runs.start(SEED_SERIES, parameters, key, name)
    if run.ended:  # that run is over and the blocks are still missing: build them again, once
        run = runs.start(SEED_SERIES, parameters, f"{key}/after/{run.id}", name)
    return run


def _refusal(status: int, message: str, field: str) -> JSONResponse:
    return JSONResponse({"detail": message, "field": field}, status_code=status)


def _csv(read: SeriesRead) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(read.columns())
    writer.writerows(read.rows())
    return out.getvalue()


def serve_series(
    source: str,
    start: str,
    end: str,
    resolution: str,
    fmt: str,
    settings: Settings,
    store: ObjectStore,
    runs: Runs,
) -> Response:
    """Answer one series request (see the module docstring); refusals name the field at fault."""
    if fmt not in FORMATS:
        return _refusal(422, f"format {fmt!r} is not one of {', '.join(FORMATS)}", "format")
    try:
        read = read_series(
            source,
            parse_time(start, "start"),
            parse_time(end, "end"),
            parse_resolution(resolution),
            settings.series,
            store,
        )
    except UnknownSeriesSourceError as e:
        return _refusal(404, str(e), "source")
    except SeriesRequestError as e:
        return _refusal(422, str(e), e.field)
    seeding: dict[str, Any] | None = None
    try:
        run = seed_missing(read, runs)
        if run is not None:
            seeding = {"run_id": run.id, "name": run.name, "state": run.state_name}
    except OrchestratorError as e:  # the answer stands; the blocks are built by a later miss
        log.error("series %s: cannot start seeding of %s: %s", source, [_iso(p) for p in read.missing], e)
        seeding = {"error": str(e)}
    missing = [_iso(p) for p in read.missing]
    if fmt == "csv":
        headers = {
            "X-Skyvault-Level": str(read.level),
            "X-Skyvault-Missing-Periods": ",".join(missing),
        }
        if seeding and "run_id" in seeding:
            headers["X-Skyvault-Seed-Run"] = seeding["run_id"]
        return Response(_csv(read), media_type="text/csv; charset=utf-8", headers=headers)
    body = {
        "source": read.source,
        "resolution_seconds": read.resolution_seconds,
        "level": str(read.level),
        "start": _iso(read.start),
        "end": _iso(read.end),
        "columns": read.columns(),
        "rows": list(read.rows()),
        "missing_periods": missing,
        "live_periods": [_iso(p) for p in read.live],
        "seeding": seeding,
    }
    return JSONResponse(body)


def series_router(
    settings: Settings, store: ObjectStore, runs: Runs, caller: Callable[[Request], str]
) -> APIRouter:
    """The ``/series/{source}`` route, behind ``caller``'s credential check."""
    router = APIRouter(dependencies=[Depends(caller)])

    @router.get("/series/{source}")
    def series(
        source: str,
        start: Annotated[str, Query(min_length=1, max_length=100)],
        end: Annotated[str, Query(min_length=1, max_length=100)],
        resolution: Annotated[str, Query(min_length=1, max_length=40)],
        format: Annotated[str, Query(max_length=20)] = "json",
    ) -> Response:
        return serve_series(source, start, end, resolution, format, settings, store, runs)

    return router

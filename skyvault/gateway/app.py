"""The gateway's FastAPI app (:func:`create_app`) and the ``skyvault-api`` command (:func:`main`)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from skyvault.config.settings import Settings, get_settings
from skyvault.discovery.reports import check_size
from skyvault.errors import (
    AuthenticationError,
    ConfigError,
    InvalidIdentifierError,
    NotFoundError,
    OrchestratorError,
    ReportError,
    ReportLimitError,
    RequestError,
    RequestTooLargeError,
    SkyvaultError,
    StorageError,
    UnknownCollectionError,
)
from skyvault.gateway.auth import authenticate, check_configured
from skyvault.gateway.body import BodyLimitMiddleware, read_body
from skyvault.gateway.browse import ReportAnswer, ReportRefusedError, submit_report
from skyvault.gateway.items import NewItemRequest, StatusAnswer, all_statuses, request_status, submit_newitem
from skyvault.gateway.jobs import JobRequest, start_job
from skyvault.gateway.map import map_router
from skyvault.gateway.payloads import json_object, validated
from skyvault.gateway.products import ProductState, list_products, product_view, retry_product
from skyvault.gateway.runs import Runs
from skyvault.gateway.samples import samples_router
from skyvault.gateway.series import series_router
from skyvault.storage.store import open_store

log = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP status of each refusal, most specific first.
_STATUS: tuple[tuple[type[SkyvaultError], int], ...] = (
    (AuthenticationError, 401),
    (RequestTooLargeError, 413),
    (ReportLimitError, 413),
    (ReportRefusedError, 422),
    (RequestError, 422),
    (ReportError, 422),
    (InvalidIdentifierError, 422),
    (UnknownCollectionError, 404),
    (NotFoundError, 404),
    (OrchestratorError, 503),
    (StorageError, 503),
)


def error_response(error: SkyvaultError) -> JSONResponse:
    """The HTTP answer to a refused or failed request: ``{"detail": <message>, "field": ...}``."""
    status = next((code for cls, code in _STATUS if isinstance(error, cls)), 500)
    body: dict[str, Any] = {"detail": str(error)}
    if isinstance(error, RequestError) and error.field:
        body["field"] = error.field
    elif isinstance(error, UnknownCollectionError):
        body["field"] = "collection"
    elif isinstance(error, ReportError):
        body["field"] = "body"
    if isinstance(error, ReportRefusedError):
        body.update(error.answer.model_dump(mode="json", by_alias=True, exclude_none=True))
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="skyvault", Bearer'
    if status == 413:
        headers["Connection"] = "close"  # the rest of the body is not read
    if status >= 500:
        log.error("request failed: %s", error)
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_response(error: RequestValidationError) -> JSONResponse:
    problems = [(str(e["loc"][-1]) if e["loc"] else "request", e["msg"]) for e in error.errors()]
    detail = "; ".join(f"{where}: {msg}" for where, msg in problems)
    return JSONResponse({"detail": f"invalid request: {detail}", "field": problems[0][0]}, status_code=422)


def create_app(settings: Settings, runs: Runs | None = None) -> FastAPI:
    """The gateway app for ``settings`` (``runs``: the Prefect API client to use).

    Raises:
        ConfigError: no credentials are configured (``gateway.username`` + ``gateway.password``
            or ``gateway.token``).

    """
    check_configured(settings.gateway)
    if runs is None:
        from skyvault.gateway.prefect_runs import PrefectRuns

        runs = PrefectRuns()
    prefect = runs
    store = open_store(settings.store)
    limit = settings.gateway.max_body_bytes

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(prefect.open)
        try:
            yield
        finally:
            await run_in_threadpool(prefect.close)

    app = FastAPI(title="skyvault gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimitMiddleware, limit=limit)

    @app.exception_handler(SkyvaultError)
    async def _refused(_: Request, error: SkyvaultError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_response(error)

    def caller(request: Request) -> str:
        return authenticate(request.headers.get("authorization"), settings.gateway)

    api = APIRouter(dependencies=[Depends(caller)])

    async def blocking(fn: Callable[..., T], *args: Any) -> T:
        return await run_in_threadpool(fn, *args)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/jobs", status_code=201)
    async def jobs(request: Request) -> dict[str, Any]:
        job = validated(JobRequest, json_object(await read_body(request, limit), settings.limits))
        answer = await blocking(start_job, job, prefect)
        return answer.model_dump(mode="json", by_alias=True)

    @api.post("/newitem")
    async def newitem(request: Request) -> dict[str, str]:
        item = validated(NewItemRequest, json_object(await read_body(request, limit), settings.limits))
        record = await blocking(submit_newitem, item, settings, store, prefect)
        return {"id": record.id, "msg": "received"}

    @api.get("/status/all")
    def status_all(limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[dict[str, Any]]:
        return [_words(a) for a in all_statuses(settings, store, prefect, limit)]

    @api.get("/status")
    def status(id: Annotated[str, Query(min_length=1, max_length=100)]) -> dict[str, Any]:
        return _words(request_status(id, settings, store, prefect))

    @api.post("/browse-reports")
    async def browse_reports(
        request: Request, collection: Annotated[str | None, Query(max_length=200)] = None
    ) -> dict[str, Any]:
        data = await read_body(request, limit)
        check_size(len(data), "browse report (request body)", settings.limits)
        answer: ReportAnswer = await blocking(submit_report, data, collection, settings, store, prefect)
        return answer.model_dump(mode="json", by_alias=True, exclude_none=True)

    @api.get("/products")
    def products(
        collection: Annotated[str, Query(min_length=1)], state: ProductState | None = None
    ) -> list[dict[str, Any]]:
        views = list_products(collection, state, settings, store, prefect)
        return [v.model_dump(mode="json") for v in views]

    @api.get("/products/{collection}/{product_id}")
    def product(collection: str, product_id: str) -> dict[str, Any]:
        return product_view(collection, product_id, settings, store, prefect).model_dump(mode="json")

    @api.post("/products/{collection}/{product_id}/retry", status_code=202)
    def retry(collection: str, product_id: str) -> dict[str, Any]:
        return retry_product(collection, product_id, settings, store, prefect).model_dump(mode="json")

    app.include_router(api)
    app.include_router(map_router(settings, store, prefect, None if settings.gateway.public_map else caller))
    app.include_router(series_router(settings, store, prefect, caller))
    app.include_router(samples_router(settings, store, prefect, caller))
    return app


def _words(answer: StatusAnswer) -> dict[str, Any]:
    return answer.model_dump(mode="json", by_alias=True)


def main(argv: list[str] | None = None) -> int:
    """``skyvault-api [--host H] [--port P]``: serve the gateway with uvicorn.

    The address defaults to ``gateway.host``/``gateway.port`` (127.0.0.1:8600); the Prefect
    server is the one ``PREFECT_API_URL`` names.
    """
    import uvicorn

    parser = argparse.ArgumentParser(prog="skyvault-api", description=__doc__)
    parser.add_argument("--host", help="address to listen on (default: gateway.host)")
    parser.add_argument("--port", type=int, help="port to listen on (default: gateway.port)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = get_settings()
        app = create_app(settings)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    uvicorn.run(
        app,
        host=args.host or settings.gateway.host,
        port=args.port or settings.gateway.port,
        proxy_headers=False,
        server_header=False,
        log_level="info",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

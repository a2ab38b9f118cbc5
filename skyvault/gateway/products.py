"""``/products``: where a product is (queued, running, done, failed), why, and links to its outputs.

The state comes from the product's status record (:mod:`skyvault.status`, what the outputs say)
and, for what the record cannot know, from Prefect: a ``process-product/<collection>/<id>`` run
that has not started is ``queued``; a record left ``running`` by a run that ended Crashed,
Cancelled or Failed is ``failed``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from skyvault.catalog.registration import read_item
from skyvault.config.settings import Settings
from skyvault.discovery.landing import discover
from skyvault.errors import (
    InvalidIdentifierError,
    NotFoundError,
    RequestError,
    SkyvaultError,
)
from skyvault.gateway.runs import PROCESS_PRODUCT, RunInfo, Runs, idempotency_key
from skyvault.ids import check_id
from skyvault.models import ProductStatus
from skyvault.status import STATUS_PREFIX, read_status, read_statuses
from skyvault.storage.store import ObjectStore
from skyvault.tiles.seeding import tilejson_key, time_key

ProductState = Literal["queued", "running", "done", "failed"]


class Links(BaseModel):
    """Where to look: the run in the Prefect UI, the item, the COG and the tiles (TileJSON)."""

    run: str | None = None
    item: str | None = None
    cog: str | None = None
    tiles: str | None = None


class ProductView(BaseModel):
    """One product's state for people and scripts."""

    model_config = ConfigDict(frozen=True)

    collection: str
    id: str
    state: ProductState
    step: str | None = None
    failed_step: str | None = None
    message: str = ""
    flow_run_id: str | None = None
    updated_at: dt.datetime | None = None
    links: Links = Links()


class RetryAnswer(BaseModel):
    """The run a retry started (or the one already queued or running)."""

    collection: str
    id: str
    flow_run_id: str
    name: str
    started: bool
    run: str | None = None


def run_name(collection_id: str, product_id: str) -> str:
    """The name of a product's ``process-product`` runs."""
    return f"process-product/{collection_id}/{product_id}"


def check_product(settings: Settings, collection_id: str, product_id: str) -> None:
    """Refuse an unknown collection or an unsafe product id.

    Raises:
        UnknownCollectionError: the collection is not configured.
        RequestError: the product id is not a safe id (field ``id``).

    """
    settings.collection(collection_id)
    try:
        check_id(product_id, "product id")
    except InvalidIdentifierError as e:
        raise RequestError(f"id: {e}", "id") from e


def state_of(
    collection_id: str,
    product_id: str,
    record: ProductStatus | None,
    latest: RunInfo | None,
    recorded_run: RunInfo | None,
) -> ProductView | None:
    """A product's view from its status record, its newest run and the run that wrote the record.

    None when there is neither a record nor a run.
    """
    base: dict[str, Any] = {"collection": collection_id, "id": product_id}
    newer = latest is not None and (
        record is None or (latest.created is not None and latest.created > record.updated_at)
    )
    if latest is not None and newer and not latest.started:
        return ProductView(
            **base,
            state="queued",
            message=f"run {latest.name} is {latest.state_name}",
            flow_run_id=latest.id,
        )
    if record is not None:
        view = ProductView(
            **base,
            state=record.state,
            step=record.step,
            failed_step=record.step if record.state == "failed" else None,
            message=record.message,
            flow_run_id=record.flow_run_id,
            updated_at=record.updated_at,
        )
        run = recorded_run
        if record.state == "running" and run is not None and run.ended and run.state_type != "COMPLETED":
            why = f": {run.message}" if run.message else ""
            message = f"run {run.name} ended {run.state_name} during {record.step}{why}"
            return view.model_copy(update={"state": "failed", "failed_step": record.step, "message": message})
        return view
    if latest is None:
        return None
    if latest.ended:
        why = f": {latest.message}" if latest.message else ""
        return ProductView(
            **base,
            state="failed" if latest.state_type != "COMPLETED" else "done",
            message=f"run {latest.name} ended {latest.state_name}{why}",
            flow_run_id=latest.id,
        )
    return ProductView(
        **base, state="running", message=f"run {latest.name} is running", flow_run_id=latest.id
    )


def _links(
    view: ProductView, record: ProductStatus | None, settings: Settings, store: ObjectStore, runs: Runs
) -> Links:
    links = Links(run=runs.ui_url(view.flow_run_id) if view.flow_run_id else None)
    if record is None:
        return links
    links.cog = store.url(record.cog_key) if record.cog_key else None
    links.item = record.item_href
    if record.state == "done" and record.tiles and record.item_href:
        try:
            item = read_item(view.collection, view.id, settings.catalog, settings.store)
        except SkyvaultError:
            item = None
        if item is not None:
            links.tiles = store.url(tilejson_key(view.collection, time_key(item)))
    return links


def product_view(
    collection_id: str, product_id: str, settings: Settings, store: ObjectStore, runs: Runs
) -> ProductView:
    """``GET /products/{collection}/{id}``.

    Raises:
        UnknownCollectionError: the collection is not configured.
        RequestError: the product id is unsafe.
        NotFoundError: the product has neither a status record nor a run.

    """
    check_product(settings, collection_id, product_id)
    record = read_status(collection_id, product_id, settings.store)
    latest = runs.latest_named(run_name(collection_id, product_id))
    recorded = None
    if record is not None and record.flow_run_id:
        recorded = (
            latest
            if latest is not None and latest.id == record.flow_run_id
            else runs.read(record.flow_run_id)
        )
    view = state_of(collection_id, product_id, record, latest, recorded)
    if view is None:
        raise NotFoundError(f"product {collection_id}/{product_id} is not known: no status record and no run")
    return view.model_copy(update={"links": _links(view, record, settings, store, runs)})


def list_products(
    collection_id: str, state: ProductState | None, settings: Settings, store: ObjectStore, runs: Runs
) -> list[ProductView]:
    """``GET /products?collection=&state=``: a collection's products, sorted by id.

    The products with a status record, plus those whose ``process-product`` run is queued.

    Raises:
        UnknownCollectionError: the collection is not configured.

    """
    settings.collection(collection_id)
    prefix = f"{STATUS_PREFIX}/{collection_id}/"
    ids = [
        info.key[len(prefix) : -len(".json")]
        for info in store.list(prefix)
        if info.key.endswith(".json") and "/" not in info.key[len(prefix) :]
    ]
    records = read_statuses([(collection_id, i) for i in ids], settings.store)
    queued = {}
    for run in runs.named_like(run_name(collection_id, "")):
        product_id = run.name[len(run_name(collection_id, "")) :]
        if not run.started and product_id not in queued:
            queued[product_id] = run
    views: dict[str, ProductView] = {}
    for product_id in sorted(set(ids) | set(queued)):
        record = records.get((collection_id, product_id))
        view = state_of(collection_id, product_id, record, queued.get(product_id), None)
        if view is not None and (state is None or view.state == state):
            links = Links(
                run=runs.ui_url(view.flow_run_id) if view.flow_run_id else None,
                item=record.item_href if record else None,
                cog=store.url(record.cog_key) if record and record.cog_key else None,
            )
            views[product_id] = view.model_copy(update={"links": links})
    return list(views.values())


def retry_product(
    collection_id: str, product_id: str, settings: Settings, store: ObjectStore, runs: Runs
) -> RetryAnswer:
    """``POST /products/{collection}/{id}/retry``: run ``process-product`` for it again.

    A product whose run is queued or running is not started twice: the answer names that run.
    The same retry sent twice (for the same status record) starts one run.

    Raises:
        UnknownCollectionError: the collection is not configured.
        NotFoundError: no product with this id is in the collection's landing folder.
        OrchestratorError: the run could not be started.

    """
    check_product(settings, collection_id, product_id)
    record = read_status(collection_id, product_id, settings.store)
    latest = runs.latest_named(run_name(collection_id, product_id))
    if latest is not None and not latest.ended:
        return RetryAnswer(
            collection=collection_id,
            id=product_id,
            flow_run_id=latest.id,
            name=latest.name,
            started=False,
            run=runs.ui_url(latest.id),
        )
    found = discover(settings.store, settings.collections, collection=collection_id, limits=settings.limits)
    product = next((p for p in found.products if p.id == product_id), None)
    if product is None:
        raise NotFoundError(
            f"product {collection_id}/{product_id} is not in landing/{collection_id}/: nothing to retry"
        )
    payload = {
        "product": product.model_dump(mode="json"),
        "after": record.model_dump(mode="json") if record else None,
    }
    run = runs.start(
        PROCESS_PRODUCT,
        {"product": product.model_dump(mode="json"), "replace": False},
        idempotency_key(PROCESS_PRODUCT, payload),
        name=run_name(collection_id, product_id),
    )
    return RetryAnswer(
        collection=collection_id,
        id=product_id,
        flow_run_id=run.id,
        name=run.name,
        started=True,
        run=runs.ui_url(run.id),
    )

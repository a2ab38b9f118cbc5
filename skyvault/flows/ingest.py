"""The ingest flow: discover products in the landing zone and process each one."""

from __future__ import annotations

import datetime as dt

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.objects import State, StateType
from prefect.futures import PrefectFuture
from prefect.states import Completed, Failed

from skyvault.config.settings import get_settings
from skyvault.errors import CatalogError, MissingDatetimeError, TilingError
from skyvault.flows.process import process_product
from skyvault.models import Discovery, IngestSummary, Product, ProductOutcome
from skyvault.tasks.catalog import find_existing_items
from skyvault.tasks.discovery import discover, products_from_report
from skyvault.tasks.status import PROCESS_PRODUCT, last_run_failed, read_product_states, run_name

_STEP_OF = ((MissingDatetimeError, "register"), (CatalogError, "register"), (TilingError, "seed"))


def _step_of(exc: BaseException) -> str:
    for kind, step in _STEP_OF:
        if isinstance(exc, kind):
            return step
    return "preprocess"


@task(name="run-product", retries=0)
def run_product(product: Product, replace: bool, seed_tiles: bool) -> ProductOutcome:
    """Run process-product for one product and turn its final state into an outcome line.

    Never raises for a product's own failure: one product failing must not stop the batch.
    """
    state = process_product(product, replace=replace, seed_tiles=seed_tiles, return_state=True)
    if state.is_completed():
        outcome: ProductOutcome = state.result()
        return outcome
    exc = state.result(raise_on_failure=False)
    message = str(exc) if isinstance(exc, BaseException) else (state.message or state.name or "failed")
    return ProductOutcome(
        collection=product.collection,
        product_id=product.id,
        state="failed",
        step=_step_of(exc) if isinstance(exc, BaseException) else None,
        message=message,
    )


def select_products(
    discovery: Discovery, registered: set[tuple[str, str]], states: dict[str, StateType], replace: bool
) -> tuple[list[Product], list[ProductOutcome]]:
    """Split discovered products into those to process and those already done (skipped)."""
    todo: list[Product] = []
    skipped: list[ProductOutcome] = []
    for product in discovery.products:
        key = (product.collection, product.id)
        state = states.get(run_name(PROCESS_PRODUCT, *key))
        if replace or key not in registered or last_run_failed(state):
            todo.append(product)
        else:
            skipped.append(
                ProductOutcome(
                    collection=product.collection,
                    product_id=product.id,
                    state="skipped",
                    message="already registered",
                )
            )
    return todo, skipped


def _ingest_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    what = p.get("report") or p.get("collection") or "all"
    return f"ingest/{what}"


@flow(name="ingest", flow_run_name=_ingest_run_name)
def ingest(
    collection: str | None = None,
    report: str | None = None,
    since: dt.datetime | None = None,
    pattern: str | None = None,
    replace: bool = False,
    seed_tiles: bool = True,
) -> State[IngestSummary]:
    """Discover products under ``landing/<collection>/`` (or read one report) and process each.

    Products already registered are skipped unless ``replace`` or their last run failed. Products
    run with bounded concurrency (``settings.concurrency.products``); a failed product never fails
    the others. The run ends Completed when every product is done or skipped, Completed named
    ``Partial`` when some failed, Failed when nothing succeeded. A table artifact lists every product.
    """
    settings = get_settings()
    if report:
        discovery = products_from_report(settings.store, settings.collections, report)
    else:
        discovery = discover(
            settings.store, settings.collections, collection=collection, since=since, pattern=pattern
        )
    pairs = [(p.collection, p.id) for p in discovery.products]
    registered = find_existing_items(pairs, settings.catalog, settings.store)
    states = read_product_states(pairs)
    todo, outcomes = select_products(discovery, registered, states, replace)

    window = settings.concurrency.products
    running: list[PrefectFuture[ProductOutcome]] = []
    for product in todo:
        if len(running) >= window:
            outcomes.append(running.pop(0).result())
        running.append(
            run_product.with_options(task_run_name=run_name("run", product.collection, product.id)).submit(
                product, replace, seed_tiles
            )
        )
    outcomes.extend(f.result() for f in running)
    outcomes.extend(
        ProductOutcome(
            collection=f.collection, product_id=f.key, state="failed", step="discover", message=f.message
        )
        for f in discovery.failures
    )
    summary = IngestSummary.from_outcomes(outcomes)
    create_table_artifact(
        key="ingest-summary",
        table=[o.model_dump(mode="json") for o in summary.outcomes],
        description=summary.headline(),
    )
    if summary.failed and not (summary.done or summary.skipped):
        return Failed(message=summary.headline(), data=summary)
    if summary.failed:
        return Completed(message=summary.headline(), data=summary, name="Partial")
    return Completed(message=summary.headline(), data=summary)

"""The ingest flow: discover products in the landing zone and process each one."""

from __future__ import annotations

import contextvars
import datetime as dt
import threading
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from skyvault.batching import batch_size, is_small, plan_runs
from skyvault.config.settings import StoreSettings, get_settings
from skyvault.errors import IngestFailedError, SkyvaultError
from skyvault.flows.process import process_product, process_products
from skyvault.models import Discovery, IngestSummary, Product, ProductOutcome, ProductStatus
from skyvault.status import changed_since_done, needs_processing, read_status
from skyvault.tasks.catalog import find_existing_items
from skyvault.tasks.discovery import discover, products_from_report
from skyvault.tasks.status import read_statuses


class _Slot:
    """One product's place in the window: started once its run is Running, freed once it ends.

    Starting a subflow run derives its tracking task's key from a counter shared by the parent
    run's threads, so two products started at the same instant could be given the same tracking
    task (and then the same flow run): each start is awaited (until the run is Running) before
    the next. The slot frees as soon as the run reaches its final state, before Prefect's own
    teardown of the run (which waits up to a second for its heartbeat thread), so the next product
    starts at once.
    """

    def __init__(self, slots: threading.Semaphore) -> None:
        self.started = threading.Event()
        self._slots = slots
        self._freed = False
        self._lock = threading.Lock()

    def free(self) -> None:
        with self._lock:
            if self._freed:
                return
            self._freed = True
        self.started.set()
        self._slots.release()


_SLOT: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("skyvault_product_slot", default=None)


def _run_started(flow: Any, flow_run: Any, state: Any) -> None:
    if slot := _SLOT.get():
        slot.started.set()


def _run_ended(flow: Any, flow_run: Any, state: Any) -> None:
    if slot := _SLOT.get():
        slot.free()


_HOOKS: dict[str, Any] = {
    "on_running": [_run_started],
    "on_completion": [_run_ended],
    "on_failure": [_run_ended],
    "on_crashed": [_run_ended],
    "on_cancellation": [_run_ended],
}
_process_product = process_product.with_options(**_HOOKS)
_process_products = process_products.with_options(**_HOOKS)


def select_products(
    discovery: Discovery,
    registered: set[tuple[str, str]],
    statuses: dict[tuple[str, str], ProductStatus],
    *,
    replace: bool,
    seed_tiles: bool,
) -> tuple[list[Product], list[ProductOutcome], set[tuple[str, str]]]:
    """Split discovered products into those to process and those already done (skipped).

    See :func:`skyvault.status.needs_processing` for the rule. Also returns the ``(collection,
    id)`` of the products to process that were done but are described differently now (a
    corrected report or sidecar): they are processed again as a replace.
    """
    todo: list[Product] = []
    skipped: list[ProductOutcome] = []
    changed: set[tuple[str, str]] = set()
    for product in discovery.products:
        key = (product.collection, product.id)
        status, digest = statuses.get(key), product.digest()
        if needs_processing(status, key in registered, replace=replace, seed_tiles=seed_tiles, digest=digest):
            todo.append(product)
            if changed_since_done(status, digest):
                changed.add(key)
        else:
            skipped.append(
                ProductOutcome(
                    collection=product.collection,
                    product_id=product.id,
                    state="skipped",
                    message="already done",
                )
            )
    return todo, skipped, changed


def outcome_of(product: Product, state: State[Any], recorded: ProductStatus | None = None) -> ProductOutcome:
    """The summary line of one finished ``process-product`` run, from its final state.

    A run that ended without its own outcome (it crashed, or failed before its first step) gets
    the step from ``recorded``, the product's status record, when that record was written by
    this very run: the step it was in when it stopped.
    """
    data = state.result(raise_on_failure=False)
    if isinstance(data, ProductOutcome):
        return data
    text = str(data) if isinstance(data, BaseException) else (state.message or state.name or "failed")
    label = f"{product.collection}/{product.id}"
    run_id = state.state_details.flow_run_id
    step = None
    if recorded is not None and run_id is not None and recorded.flow_run_id == str(run_id):
        step = recorded.step
    if step and not text.startswith(f"{step}:"):
        text = f"{step}: {text}"
    return ProductOutcome(
        collection=product.collection,
        product_id=product.id,
        state="failed",
        step=step,
        message=text if label in text or repr(product.id) in text else f"product {label}: {text}",
    )


def _record_of(product: Product, store: StoreSettings | None) -> ProductStatus | None:
    """The product's status record, or None when there is none or it cannot be read."""
    if store is None:
        return None
    try:
        return read_status(product.collection, product.id, store)
    except SkyvaultError:
        return None


def _run_one(
    product: Product, replace: bool, seed_tiles: bool, slot: _Slot, store: StoreSettings | None = None
) -> list[ProductOutcome]:
    """Run process-product for one product (inside a copy of the ingest run's context)."""
    _SLOT.set(slot)
    try:
        state = _process_product(product, replace=replace, seed_tiles=seed_tiles, return_state=True)
        data = state.result(raise_on_failure=False)
        recorded = None if isinstance(data, ProductOutcome) else _record_of(product, store)
        return [outcome_of(product, state, recorded)]
    except Exception as e:  # noqa: BLE001 - the run could not even start: this product fails alone
        return [_not_run(product, "process-product", e)]
    finally:
        slot.free()


def _run_batch(
    products: list[Product],
    replace: list[str],
    seed_tiles: bool,
    slot: _Slot,
    store: StoreSettings | None = None,
) -> list[ProductOutcome]:
    """Run process-products for a batch (inside a copy of the ingest run's context).

    A product the run gave no outcome for (it crashed) gets one from its final state and the
    product's status record, as in :func:`outcome_of`.
    """
    _SLOT.set(slot)
    try:
        state = _process_products(products, replace=replace, seed_tiles=seed_tiles, return_state=True)
        data = state.result(raise_on_failure=False)
        listed: list[Any] = data if isinstance(data, list) else []
        given = {o.product_id: o for o in listed if isinstance(o, ProductOutcome)}
        return [given.get(p.id) or outcome_of(p, state, _record_of(p, store)) for p in products]
    except Exception as e:  # noqa: BLE001 - the run could not even start: its products fail alone
        return [_not_run(p, "process-products", e) for p in products]
    finally:
        slot.free()


def _not_run(product: Product, flow_name: str, e: Exception) -> ProductOutcome:
    return ProductOutcome(
        collection=product.collection,
        product_id=product.id,
        state="failed",
        message=f"product {product.collection}/{product.id}: {flow_name} could not run: {e}",
    )


def run_products(
    products: Iterable[Product],
    *,
    replace: bool,
    seed_tiles: bool,
    window: int,
    store: StoreSettings | None = None,
    changed: Collection[tuple[str, str]] = (),
    batch: int = 1,
    batch_source_bytes: int = 0,
) -> Iterator[ProductOutcome]:
    """Run the products as subflows, at most ``window`` runs at a time.

    Products whose source is at most ``batch_source_bytes`` run ``batch`` at a time in one
    ``process-products`` run (one collection per batch); every other product runs alone in a
    ``process-product`` run. A slot frees as soon as any run ends (no head-of-line blocking), and
    products are taken from ``products`` only as slots free, so a large backlog streams through.
    Yields one outcome per product, in completion order; never raises for a product's failure.
    With ``store``, a product whose run ended without its own outcome is given the step its
    status record names (see :func:`outcome_of`). Products whose ``(collection, id)`` is in
    ``changed`` are processed as a replace.
    """
    slots = threading.Semaphore(window)
    # twice the window: a thread whose run has ended may still be in Prefect's teardown
    with ThreadPoolExecutor(max_workers=2 * window, thread_name_prefix="product") as pool:
        running: set[Future[list[ProductOutcome]]] = set()
        for unit in plan_runs(products, batch, batch_source_bytes):
            slots.acquire()
            finished = {f for f in running if f.done()}
            running -= finished
            for f in finished:
                yield from f.result()
            slot = _Slot(slots)
            context = contextvars.copy_context()
            again = [p.id for p in unit if replace or (p.collection, p.id) in changed]
            if len(unit) == 1:
                job = pool.submit(context.run, _run_one, unit[0], bool(again), seed_tiles, slot, store)
            else:
                job = pool.submit(context.run, _run_batch, unit, again, seed_tiles, slot, store)
            running.add(job)
            slot.started.wait()
        for future in as_completed(running):
            yield from future.result()


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

    A product is skipped when its status record (``status/<collection>/<id>.json``) says done and
    the catalog holds its item, unless ``replace``. Each other product runs as a
    ``process-product/<collection>/<id>`` subflow, at most ``settings.concurrency.products`` at a
    time; a failed product never fails the others. The run ends Completed when every product is
    done or skipped, Completed named ``Partial`` when some failed, and Failed with an
    :class:`IngestFailedError` carrying the summary when nothing succeeded.
    A table artifact lists every product.
    """
    settings = get_settings()
    if report:
        discovery = products_from_report(settings.store, settings.collections, report, limits=settings.limits)
    else:
        discovery = discover(
            settings.store,
            settings.collections,
            collection=collection,
            since=since,
            pattern=pattern,
            limits=settings.limits,
        )
    statuses: dict[tuple[str, str], ProductStatus] = {}
    registered: set[tuple[str, str]] = set()
    if not replace and discovery.products:
        statuses = read_statuses([(p.collection, p.id) for p in discovery.products], settings.store)
        done = [key for key, status in statuses.items() if status.state == "done"]
        if done:
            registered = find_existing_items(done, settings.catalog, settings.store)
    todo, outcomes, changed = select_products(
        discovery, registered, statuses, replace=replace, seed_tiles=seed_tiles
    )
    if changed:
        get_run_logger().info(
            "%d product(s) changed since they were done, processed again as a replace: %s",
            len(changed),
            ", ".join(f"{c}/{i}" for c, i in sorted(changed)),
        )
    limits = settings.concurrency
    small = sum(1 for p in todo if is_small(p, limits.batch_source_bytes))
    outcomes.extend(
        run_products(
            todo,
            replace=replace,
            seed_tiles=seed_tiles,
            window=limits.products,
            store=settings.store,
            changed=changed,
            batch=batch_size(small, limits.products, limits.batch_products),
            batch_source_bytes=limits.batch_source_bytes,
        )
    )
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
        return Failed(message=summary.headline(), data=IngestFailedError(summary.headline(), summary))
    if summary.failed:
        return Completed(message=summary.headline(), data=summary, name="Partial")
    return Completed(message=summary.headline(), data=summary)

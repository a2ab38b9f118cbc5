"""The per-product flows: preprocess → register → seed, as tasks of one run.

``process-product`` takes one product; its run name, ``process-product/<collection>/<product>``,
is the product's page in the Prefect UI. ``process-products`` takes a batch of small products of
one collection (``process-products/<collection>/<first>+<more>``) with the same steps, each a task
for the whole batch, so a backlog of small products costs a few runs instead of one each.
What is done is recorded on the object store, not in run history: a status record
(:mod:`skyvault.status`) says ``running`` as each step starts, ``failed`` with the step that
failed, and ``done`` last, once the COG, the item and the tiles exist.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from skyvault.config.settings import Settings, get_settings
from skyvault.errors import naming_product
from skyvault.flows.seed import run_seed
from skyvault.models import CogInfo, ItemRef, Product, ProductOutcome, ProductStatus, SeedRequest, StatusState
from skyvault.status import now, write_status
from skyvault.tasks.catalog import read_item, register_product, register_products
from skyvault.tasks.cog import preprocess_product, preprocess_products
from skyvault.tiles.seeding import reseed_extent


class _Recorder:
    """Writes one product's status records, stamped with this flow run's id."""

    def __init__(self, product: Product, settings: Settings) -> None:
        self.product = product
        self.settings = settings
        self.run_id = str(flow_run.id) if flow_run.id else None
        self.digest = product.digest()

    def write(self, state: StatusState, step: str, message: str = "", **outputs: Any) -> None:
        write_status(
            ProductStatus(
                collection=self.product.collection,
                product_id=self.product.id,
                state=state,
                step=step,
                message=message,
                flow_run_id=self.run_id,
                product_digest=self.digest,
                updated_at=now(),
                **outputs,
            ),
            self.settings.store,
        )


def _naming(product: Product, exc: BaseException) -> str:
    return naming_product(product.collection, product.id, exc)


@flow(name="process-product", flow_run_name="process-product/{product.collection}/{product.id}")
def process_product(
    product: Product, replace: bool = False, seed_tiles: bool = True
) -> State[ProductOutcome]:
    """Preprocess, register and (unless ``seed_tiles`` is false) seed one product.

    With ``replace`` the COG is rebuilt and the tiles of both the old and the new extent are
    re-rendered. A failure ends this run Failed with the failed step and a message naming the
    product (also in the returned outcome and the status record); earlier outputs stay in place,
    so a seeding failure leaves the registration.
    """
    settings = get_settings()
    logger = get_run_logger()
    status = _Recorder(product, settings)
    step = "preprocess"
    try:
        collection = settings.collection(product.collection)
        status.write("running", "preprocess")
        previous = None
        if replace:
            step = "register"
            previous = read_item(collection.id, product.id, settings.catalog, settings.store)
        step = "preprocess"
        cog = preprocess_product(
            product, collection, settings.store, settings.scratch_dir, replace=replace, limits=settings.limits
        )
        step = "register"
        status.write("running", step, cog_key=cog.key, source_sha256=cog.source_sha256)
        item = register_product(product, cog, collection, settings.catalog, settings.store)
        tiles = 0
        if seed_tiles:
            step = "seed"
            tiles = _seed(status, cog, item, previous, replace, settings)
        last, step = step, "status"
        outcome = _done(status, cog, item, last, tiles)
    except Exception as e:  # one product's failure, whatever it is, ends only this run
        message = _naming(product, e)
        logger.error("failed at %s: %s", step, message, exc_info=True)
        try:
            status.write("failed", step, message)
        except Exception as w:  # noqa: BLE001 - the outcome below still carries the failure
            logger.warning("the failure of %s could not be recorded: %s", product.id, w)
        failed = ProductOutcome(
            collection=product.collection, product_id=product.id, state="failed", step=step, message=message
        )
        return Failed(message=f"{step}: {message}", data=failed)
    return Completed(message=outcome.message, data=outcome)


def _batch_run_name() -> str:
    products = flow_run.parameters.get("products") or []
    if not products:
        return "process-products/empty"
    first = products[0] if isinstance(products[0], Product) else Product.model_validate(products[0])
    more = f"+{len(products) - 1}" if len(products) > 1 else ""
    return f"process-products/{first.collection}/{first.id}{more}"


class _Batch:
    """The products of one ``process-products`` run: their status records and outcomes."""

    def __init__(self, products: list[Product], settings: Settings) -> None:
        self.products = {p.id: p for p in products}
        self.status = {p.id: _Recorder(p, settings) for p in products}
        self.outcomes: dict[str, ProductOutcome] = {}
        self.logger = get_run_logger()

    def pending(self) -> list[str]:
        return [i for i in self.products if i not in self.outcomes]

    def fail(self, product_id: str, step: str, message: str) -> None:
        product = self.products[product_id]
        self.logger.error("%s/%s failed at %s: %s", product.collection, product_id, step, message)
        try:
            self.status[product_id].write("failed", step, message)
        except Exception as w:  # noqa: BLE001 - the outcome below still carries the failure
            self.logger.warning("the failure of %s could not be recorded: %s", product_id, w)
        self.outcomes[product_id] = ProductOutcome(
            collection=product.collection, product_id=product_id, state="failed", step=step, message=message
        )

    def fail_pending(self, step: str, exc: BaseException) -> None:
        """Every product without an outcome yet fails at ``step`` with ``exc``."""
        self.logger.error("step %s failed for the whole batch", step, exc_info=exc)
        for product_id in self.pending():
            self.fail(product_id, step, _naming(self.products[product_id], exc))


@flow(name="process-products", flow_run_name=_batch_run_name)
def process_products(
    products: list[Product], replace: list[str] | None = None, seed_tiles: bool = True
) -> State[list[ProductOutcome]]:
    """Preprocess, register and (unless ``seed_tiles`` is false) seed a batch of one collection's products.

    The steps, status records and outcomes of ``process-product``, with preprocess and register
    each one task for the whole batch (registration one catalog write). Products whose id is in
    ``replace`` are rebuilt and their old extent re-seeded. A product's failure fails it alone;
    a step that fails as a whole fails the products still in it. Ends Completed when every
    product is done, Completed named ``Partial`` when some failed and Failed when all did; the
    data is one outcome per product.
    """
    settings = get_settings()
    batch = _Batch(products, settings)
    again = set(replace or ())
    collection = settings.collection(products[0].collection)
    step = "preprocess"
    try:
        for recorder in batch.status.values():
            recorder.write("running", step)
        previous: dict[str, dict[str, Any] | None] = {}
        for product_id in sorted(again & set(batch.products)):
            step = "register"
            previous[product_id] = read_item(collection.id, product_id, settings.catalog, settings.store)
        step = "preprocess"
        converted = preprocess_products(
            products,
            collection,
            settings.store,
            settings.scratch_dir,
            replace=sorted(again),
            limits=settings.limits,
        )
        for product_id, message in converted.failed.items():
            batch.fail(product_id, step, message)
        cogs: dict[str, CogInfo] = {c.product_id: c for c in converted.cogs}
        step = "register"
        for cog in cogs.values():
            batch.status[cog.product_id].write(
                "running", step, cog_key=cog.key, source_sha256=cog.source_sha256
            )
        registered = register_products(
            [(batch.products[i], cog) for i, cog in cogs.items()],
            collection,
            settings.catalog,
            settings.store,
        )
        for product_id, message in registered.failed.items():
            batch.fail(product_id, step, message)
        for item in registered.items:
            replaced = item.item_id in again
            _finish(
                batch, cogs[item.item_id], item, previous.get(item.item_id), replaced, settings, seed_tiles
            )
    except Exception as e:  # noqa: BLE001 - a step that failed as a whole ends the products in it
        batch.fail_pending(step, e)
    for product_id in batch.pending():  # not expected: every step answers for each product
        batch.fail(product_id, step, f"product {collection.id}/{product_id}: {step} gave no result")
    outcomes = [batch.outcomes[i] for i in batch.products]
    done = sum(1 for o in outcomes if o.state == "done")
    message = f"{done} of {len(outcomes)} products done"
    if done == len(outcomes):
        return Completed(message=message, data=outcomes)
    if done:
        return Completed(message=message, data=outcomes, name="Partial")
    return Failed(message=message, data=outcomes)


def _finish(
    batch: _Batch,
    cog: CogInfo,
    item: ItemRef,
    previous: dict[str, Any] | None,
    replace: bool,
    settings: Settings,
    seed_tiles: bool,
) -> None:
    """Seed one registered product of a batch (when asked) and record it done, or failed alone."""
    product_id = cog.product_id
    status = batch.status[product_id]
    tiles, last = 0, "register"
    try:
        if seed_tiles:
            last = "seed"
            tiles = _seed(status, cog, item, previous, replace, settings)
        outcome = _done(status, cog, item, last, tiles)
    except Exception as e:  # noqa: BLE001 - this product fails alone
        batch.fail(product_id, last, _naming(batch.products[product_id], e))
        return
    batch.outcomes[product_id] = outcome


def _seed(
    status: _Recorder,
    cog: CogInfo,
    item: ItemRef,
    previous: dict[str, Any] | None,
    replace: bool,
    settings: Settings,
) -> int:
    """Record the seed step and seed the product's extent (and its old one, after a replace).

    Returns the tiles written.
    """
    status.write("running", "seed", cog_key=cog.key, source_sha256=cog.source_sha256, item_href=item.href)
    start, end, bbox = reseed_extent(item, previous)
    request = SeedRequest(collection=item.collection, start=start, end=end, bbox=bbox, force=replace)
    seeded, _, _ = run_seed(request, settings, [previous] if previous else ())
    return seeded.written


def _done(status: _Recorder, cog: CogInfo, item: ItemRef, last: str, tiles: int) -> ProductOutcome:
    """Record the product done after step ``last``, written last; returns its outcome."""
    message = "converted" if cog.created else "COG up to date"
    status.write(
        "done",
        last,
        message,
        cog_key=cog.key,
        source_sha256=cog.source_sha256,
        item_href=item.href,
        tiles=tiles,
    )
    return ProductOutcome(
        collection=item.collection,
        product_id=cog.product_id,
        state="done",
        cog_key=cog.key,
        item_href=item.href,
        tiles=tiles,
        message=message,
    )

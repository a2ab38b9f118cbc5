"""The per-product flow: ``process-product`` = preprocess → register → seed, as tasks of one run.

Its run name, ``process-product/<collection>/<product>``, is the product's page in the Prefect UI.
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
from skyvault.flows.seed import run_seed
from skyvault.models import Product, ProductOutcome, ProductStatus, SeedRequest, StatusState
from skyvault.status import now, write_status
from skyvault.tasks.catalog import read_item, register_product
from skyvault.tasks.cog import preprocess_product
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
    """The error's message, prefixed with the product when it does not name it already."""
    text = str(exc) or type(exc).__name__
    label = f"{product.collection}/{product.id}"
    return text if label in text or repr(product.id) in text else f"product {label}: {text}"


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
            status.write(
                "running", step, cog_key=cog.key, source_sha256=cog.source_sha256, item_href=item.href
            )
            start, end, bbox = reseed_extent(item, previous)
            request = SeedRequest(collection=collection.id, start=start, end=end, bbox=bbox, force=replace)
            seeded, _, _ = run_seed(request, settings, [previous] if previous else ())
            tiles = seeded.written
        outcome = ProductOutcome(
            collection=collection.id,
            product_id=product.id,
            state="done",
            cog_key=cog.key,
            item_href=item.href,
            tiles=tiles,
            message="converted" if cog.created else "COG up to date",
        )
        last, step = step, "status"
        status.write(
            "done",
            last,
            outcome.message,
            cog_key=cog.key,
            source_sha256=cog.source_sha256,
            item_href=item.href,
            tiles=tiles,
        )
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

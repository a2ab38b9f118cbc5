"""Per-product flows: preprocess, register, and process-product (preprocess → register → seed).

Run names are predictable, ``<step>/<collection>/<product>``, so the Prefect UI and API find the
newest run of any step for any product.
"""

from __future__ import annotations

from prefect import flow

from skyvault.config.settings import get_settings
from skyvault.flows.seed import seed
from skyvault.models import CogInfo, ItemRef, Product, ProductOutcome, SeedResult
from skyvault.tasks.catalog import read_item, register_product
from skyvault.tasks.cog import preprocess_product
from skyvault.tasks.status import run_name
from skyvault.tiles.seeding import reseed_extent


@flow(name="preprocess", flow_run_name="preprocess/{product.collection}/{product.id}")
def preprocess(product: Product, replace: bool = False) -> CogInfo:
    """Convert one product's raster to a validated COG on the object store."""
    settings = get_settings()
    collection = settings.collection(product.collection)
    return preprocess_product(product, collection, settings.store, settings.scratch_dir, replace=replace)


@flow(name="register", flow_run_name="register/{product.collection}/{product.id}")
def register(product: Product, cog: CogInfo) -> ItemRef:
    """Describe one COG as a STAC item and upsert it into the catalog."""
    settings = get_settings()
    collection = settings.collection(product.collection)
    return register_product(product, cog, collection, settings.catalog, settings.store)


@flow(name="process-product", flow_run_name="process-product/{product.collection}/{product.id}")
def process_product(product: Product, replace: bool = False, seed_tiles: bool = True) -> ProductOutcome:
    """Preprocess, register and seed one product.

    With ``replace`` the COG is rebuilt and the tiles of both the old and the new extent are
    re-rendered. A seeding failure fails this run but leaves the registration in place.
    """
    settings = get_settings()
    collection = settings.collection(product.collection)
    previous = read_item(collection.id, product.id, settings.catalog, settings.store) if replace else None
    cog = preprocess.with_options(flow_run_name=run_name("preprocess", collection.id, product.id))(
        product, replace=replace
    )
    item = register.with_options(flow_run_name=run_name("register", collection.id, product.id))(product, cog)
    tiles = SeedResult(collection=collection.id)
    if seed_tiles:
        start, end, bbox = reseed_extent(item, previous)
        tiles = seed.with_options(flow_run_name=run_name("seed", collection.id, product.id))(
            collection.id,
            start=start,
            end=end,
            bbox=bbox,
            force=replace,
            previous_items=[previous] if previous else None,
        )
    return ProductOutcome(
        collection=collection.id,
        product_id=product.id,
        state="done",
        cog_key=cog.key,
        item_href=item.href,
        tiles=tiles.written,
        message="converted" if cog.created else "COG up to date",
    )

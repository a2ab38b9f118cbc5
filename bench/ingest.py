"""Ingest orchestration overhead: the ingest flow against the same functions in a plain loop.

    uv run --frozen python -m bench.ingest [--products 40] [--size 512] [--reps 3]
        [--batch-products N] [--database sqlite|postgres] [--api-url URL]

``--products`` generated scenes of ``--size`` x ``--size`` x 3 uint8 land in one collection of a
local store. Each repetition, in alternating order, runs:

* flow: ``ingest(seed_tiles=False)`` (what ``skyvault ingest --no-seed`` runs) in this process,
  against a Prefect server started here on 127.0.0.1 (its database SQLite, the embedded default,
  or a private PostgreSQL cluster, the production setup; or the server of ``--api-url``), with the
  tag limits provisioned: discovery, status read, then the products' runs
  (``settings.concurrency.products`` at a time): small products in ``process-products`` batches
  (``concurrency.batch_products``, ``batch_source_bytes``), others one ``process-product`` run
  each, converting, registering and recording status;
* plain: the same domain functions (discover, read statuses, the same grouping, and per run the
  status records, ``preprocess_product(s)`` and ``register_product(s)``) in a thread pool of the
  same size, no Prefect.

``--batch-products 1`` gives every product its own run (and the loop single-product calls).

Outputs (COGs, catalog, status records) are removed before every run, so each does the full work.
Prints a markdown table (median and range of wall seconds, seconds per product, and the flow's
orchestration overhead per product: flow minus plain) and writes it to
``bench/out/ingest-<database>-<products>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import yaml
from rasterio.transform import from_origin

from bench.common import add_server_arguments, prefect_server, server_label
from skyvault.batching import batch_size, is_small, plan_runs
from skyvault.catalog import registration
from skyvault.cog import convert
from skyvault.config.settings import Settings
from skyvault.discovery import landing
from skyvault.models import Product, ProductStatus, StatusState
from skyvault.status import now, read_statuses, write_status

OUT = Path(__file__).parent / "out"
COLLECTION = "bench-scenes"
OUTPUTS = ("cogs", "catalog", "status")


@contextlib.contextmanager
def server_for(args: argparse.Namespace) -> Iterator[str]:
    """The Prefect API the flow side talks to: ``--api-url``, or a server started here."""
    with prefect_server(args.api_url, args.database) as url:
        yield url


def make_landing(root: Path, products: int, size: int) -> None:
    """``products`` plain GeoTIFFs of ``size`` x ``size`` x 3 uint8, each with its own place and day."""
    folder = root / "store" / "landing" / COLLECTION
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:size, 0:size].astype("float32") / size
    for i in range(products):
        noise = rng.normal(0, 8, (3, size, size))
        bands = np.stack([120 + 90 * np.sin((3 + b) * xx + (2 + i % 5) * yy) for b in range(3)])
        data = np.clip(bands + noise, 1, 255).astype("uint8")
        with rasterio.open(
            folder / f"P{i:05d}.tif",
            "w",
            driver="GTiff",
            width=size,
            height=size,
            count=3,
            dtype="uint8",
            crs="EPSG:4326",
            transform=from_origin(5.0 + (i % 20) * 0.5, 50.0 - (i // 20) * 0.5, 0.4 / size, 0.4 / size),
        ) as dst:
            dst.write(data)
            dst.update_tags(TIFFTAG_DATETIME=f"2026:01:{1 + i % 28:02d} 10:00:00")


def write_config(root: Path, batch_products: int | None = None) -> Path:
    """The config file both sides read (``batch_products`` overrides the default batch cap)."""
    path = root / "skyvault.yaml"
    body: dict[str, Any] = {
        "scratch_dir": str(root / "scratch"),
        "store": {"kind": "local", "root": str(root / "store")},
        "lts": {"root": str(root / "lts"), "create_root": True},
        "collections": {COLLECTION: {"render": {"bands": [1, 2, 3]}}},
    }
    if batch_products is not None:
        body["concurrency"] = {"batch_products": batch_products}
    path.write_text(yaml.safe_dump(body))
    return path


def wipe_outputs(settings: Settings) -> None:
    """Remove what an ingest writes, so the next run does the full work."""
    for name in OUTPUTS:
        shutil.rmtree(settings.store.root / name, ignore_errors=True)


def plain_ingest(settings: Settings, workers: int) -> int:
    """The ingest's work without Prefect: the same domain calls, ``workers`` runs at a time.

    Products are grouped as the flow groups them (:func:`skyvault.batching.plan_runs`): a batch
    is converted and registered with the batch functions, a product alone with the single ones.
    """
    found = landing.discover(settings.store, settings.collections, collection=COLLECTION)
    read_statuses([(p.collection, p.id) for p in found.products], settings.store)
    collection = settings.collection(COLLECTION)
    limits = settings.concurrency
    small = sum(1 for p in found.products if is_small(p, limits.batch_source_bytes))
    size = batch_size(small, workers, limits.batch_products)

    def record(product: Product, state: StatusState, step: str) -> None:
        write_status(
            ProductStatus(
                collection=product.collection,
                product_id=product.id,
                state=state,
                step=step,
                updated_at=now(),
            ),
            settings.store,
        )

    def run(products: list[Product]) -> int:
        for product in products:
            record(product, "running", "preprocess")
        if len(products) == 1:
            cog = convert.preprocess_product(
                products[0], collection, settings.store, settings.scratch_dir, limits=settings.limits
            )
            record(products[0], "running", "register")
            registration.register_product(products[0], cog, collection, settings.catalog, settings.store)
            record(products[0], "done", "register")
            return 1
        batch = convert.preprocess_products(
            products, collection, settings.store, settings.scratch_dir, limits=settings.limits
        )
        by_id = {p.id: p for p in products}
        for cog in batch.cogs:
            record(by_id[cog.product_id], "running", "register")
        pairs = [(by_id[c.product_id], c) for c in batch.cogs]
        registered = registration.register_products(pairs, collection, settings.catalog, settings.store)
        for item in registered.items:
            record(by_id[item.item_id], "done", "register")
        return len(registered.items)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(run, plan_runs(found.products, size, limits.batch_source_bytes)))


def flow_ingest(settings: Settings) -> int:
    """``ingest(seed_tiles=False)``, as ``skyvault ingest --no-seed`` runs it."""
    from skyvault.flows.ingest import ingest
    from skyvault.models import IngestSummary

    state = ingest(collection=COLLECTION, seed_tiles=False, return_state=True)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, IngestSummary) or summary.done != summary.found:
        raise RuntimeError(f"ingest did not do every product: {state.message}")
    return summary.done


def timed(fn: Callable[[], int], expected: int) -> float:
    start = time.perf_counter()
    done = fn()
    elapsed = time.perf_counter() - start
    if done != expected:
        raise RuntimeError(f"{done} products done, expected {expected}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--products", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--batch-products",
        type=int,
        default=None,
        help="concurrency.batch_products on both sides (1: a run per product; default: the setting's)",
    )
    add_server_arguments(parser)
    parser.add_argument("--dir", type=Path, default=None, help="parent of the working folder")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=args.dir) as tmp:
        root = Path(tmp)
        make_landing(root, args.products, args.size)
        os.environ["SKYVAULT_CONFIG_FILE"] = str(write_config(root, args.batch_products))
        with server_for(args) as api_url:
            # set before Prefect is imported: its settings are read once
            os.environ["PREFECT_API_URL"] = api_url
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            from skyvault.config.provision import provision_tag_limits
            from skyvault.config.settings import get_settings

            settings = get_settings()
            provision_tag_limits(settings)
            workers = settings.concurrency.products
            sides: dict[str, Callable[[], int]] = {
                "flow": lambda: flow_ingest(settings),
                "plain": lambda: plain_ingest(settings, workers),
            }
            # one untimed run of each side: imports, GDAL and server caches
            for fn in sides.values():
                wipe_outputs(settings)
                timed(fn, args.products)
            times: dict[str, list[float]] = {name: [] for name in sides}
            for rep in range(args.reps):
                order = list(sides) if rep % 2 == 0 else list(reversed(sides))
                for name in order:
                    wipe_outputs(settings)
                    times[name].append(timed(sides[name], args.products))
                    print(f"rep {rep + 1} {name}: {times[name][-1]:.2f} s", file=sys.stderr)
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # send the runs' logs while the server is still up
    table = render(times, args, workers, settings.concurrency.batch_products)
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"ingest-{args.database}-{args.products}.md").write_text(table)
    return 0


def render(times: dict[str, list[float]], args: argparse.Namespace, workers: int, batch: int) -> str:
    """The markdown table of both sides and the overhead per product."""
    n = args.products
    med = {name: statistics.median(values) for name, values in times.items()}
    lines = [
        f"### ingest --no-seed: {n} products of {args.size}x{args.size}x3 uint8, "
        f"{workers} at a time, batches of up to {batch} products, {args.reps} alternating repetitions",
        "",
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "",
        "| path | median wall s | range s | s/product |",
        "|---|---:|---:|---:|",
    ]
    server = server_label(args.api_url, args.database)
    labels = {"flow": f"ingest flow (Prefect server, {server})", "plain": "same functions, plain thread pool"}
    for name, values in times.items():
        spread = f"{min(values):.2f} to {max(values):.2f}"
        lines.append(f"| {labels[name]} | {med[name]:.2f} | {spread} | {med[name] / n:.3f} |")
    per_rep = [(f - p) / n for f, p in zip(times["flow"], times["plain"], strict=True)]
    lines += [
        "",
        f"Orchestration overhead per product (flow minus plain, median of repetitions): "
        f"{statistics.median(per_rep):.3f} s (range {min(per_rep):.3f} to {max(per_rep):.3f} s).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

"""Catalog registration benchmark: skyvault's pgstac and stac-api backends against the reference tools.

    uv run --frozen python -m bench.register [--items 20000] [--api-items 20000] [--reps 3]
        [--batch-size 500]

Generates ``--items`` prebuilt STAC items of one collection (footprints across Europe, datetimes
spread over a year) into an ndjson file, starts a private PostgreSQL cluster with pgstac and a
stac-fastapi-pgstac with transactions on 127.0.0.1, then in every repetition, in a rotating order
(each side takes each position), each side a fresh process writing into an empty collection:

* ``pypgstac load``: ``pypgstac load items FILE --dsn DSN --method upsert`` (pgstac's own loader);
* ``skyvault pgstac``: the same ndjson read in a fresh process and written with skyvault's pgstac
  backend, ``upsert_items`` per ``--batch-size`` items (default: the ``catalog.batch_size`` setting;
  what ``skyvault register`` calls per batch): one transaction per batch, with the collection
  lock, the datetime check, the extent update and the read-back verification;
* ``pypgstac Loader``: pypgstac's ``Loader.load_items`` (upsert) on all items in one call, in a
  fresh process: the in-process counterpart of ``pypgstac load``, for the in-process column;
* ``POST per item``: the first ``--api-items`` items, one ``POST /collections/{c}/items`` each
  (httpx, one kept-alive connection), the way a client without bulk support registers;
* ``skyvault stac-api``: the same items through skyvault's stac-api backend, ``upsert_items`` per
  ``--batch-size`` items (``POST /collections/{c}/bulk_items``), with the existence check and the
  extent update.

Each pgstac side writes into a fresh database copied from a migrated template holding the
collection; each STAC API side into a new collection of the one API. Every side is checked
afterwards (the item count must equal what it was given). Items/s is items / whole-process wall
seconds; the table gives medians with the range (min-max) and is written to
``bench/out/register.md`` and stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    Samples,
    cell,
    copy_database,
    create_database,
    machine_line,
    markdown_table,
    migrate_pgstac,
    postgres_cluster,
    ratio,
    rotation,
    run_child,
    stac_api,
    write_report,
)

COLLECTION = "bench-scenes"


def make_items(count: int, collection: str, seed: int = 7) -> list[dict[str, Any]]:
    """``count`` small valid items shaped like skyvault's, spread over Europe and over 2025."""
    rng = random.Random(seed)
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    items = []
    for n in range(count):
        west, south = rng.uniform(-10, 30), rng.uniform(35, 65)
        east, north = west + 0.1, south + 0.1
        when = start + dt.timedelta(seconds=rng.randrange(365 * 86400))
        item_id = f"scene-{n:06d}"
        items.append(
            {
                "type": "Feature",
                "stac_version": "1.1.0",
                "stac_extensions": [],
                "id": item_id,
                "collection": collection,
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [[west, south], [east, south], [east, north], [west, north], [west, south]]
                    ],
                },
                "bbox": [west, south, east, north],
                "properties": {
                    "datetime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "skyvault:cog_key": f"cogs/{collection}/{item_id}.tif",
                },
                "assets": {
                    "data": {
                        "href": f"https://data.example.org/cogs/{collection}/{item_id}.tif",
                        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                        "roles": ["data"],
                    }
                },
                "links": [{"rel": "collection", "href": "../collection.json", "type": "application/json"}],
            }
        )
    return items


def collection_doc(collection: str) -> dict[str, Any]:
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": collection,
        "title": "Benchmark scenes",
        "description": "Generated items for the registration benchmark",
        "license": "CC0-1.0",
        "partition_trunc": "month",  # as skyvault creates its collections: one partition per month
        "links": [],
        "extent": {
            "spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]]},
            "temporal": {"interval": [[None, None]]},
        },
    }


def read_ndjson(path: str, collection: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The items of an ndjson file, parsed with orjson as ``pypgstac load`` parses them."""
    import orjson

    items = []
    with open(path, "rb") as f:
        for line in f:
            item = orjson.loads(line)
            item["collection"] = collection
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    return items


# --- children: one process per measured run ---------------------------------------------------


def child_skyvault(backend: str, target: str, collection: str, path: str, count: str, batch: str) -> None:
    """skyvault's backend writing the items in batches; prints the wall time of the calls."""
    from skyvault.config.collections import CollectionConfig
    from skyvault.config.settings import CatalogSettings, StoreSettings

    if backend == "pgstac":
        from skyvault.catalog.pgstac import PgstacCatalog as Backend
    else:
        from skyvault.catalog.stac_api import StacApiCatalog as Backend  # type: ignore[assignment]

    items = read_ndjson(path, collection, int(count))
    settings = CatalogSettings(
        backend=backend, **({"dsn": target} if backend == "pgstac" else {"url": target})
    )
    config = CollectionConfig(id=collection, title="Benchmark scenes", license="CC0-1.0")
    size = settings.batch_size
    catalog = Backend(settings, StoreSettings())  # the backend open_catalog returns; connects lazily
    start = time.perf_counter()
    written = 0
    for n in range(0, len(items), size):
        written += len(catalog.upsert_items(config, items[n : n + size]))
    call = time.perf_counter() - start
    print(json.dumps({"call": call, "written": written}))


def child_pypgstac(dsn: str, collection: str, path: str, count: str) -> None:
    """pypgstac's Loader on all the items at once (what ``pypgstac load items`` runs)."""
    from pypgstac.db import PgstacDB
    from pypgstac.load import Loader, Methods

    items = read_ndjson(path, collection, int(count))
    start = time.perf_counter()
    with PgstacDB(dsn) as db:
        Loader(db).load_items(iter(items), insert_mode=Methods.upsert)
    print(json.dumps({"call": time.perf_counter() - start, "written": len(items)}))


def child_post_per_item(url: str, collection: str, path: str, count: str) -> None:
    """One POST per item, on one kept-alive connection."""
    import httpx

    items = read_ndjson(path, collection, int(count))
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60) as client:
        for item in items:
            client.post(f"/collections/{collection}/items", json=item).raise_for_status()
    print(json.dumps({"call": time.perf_counter() - start, "written": len(items)}))


# --- the parent -------------------------------------------------------------------------------------


@dataclass
class Side:
    whole: Samples = field(default_factory=Samples)
    call: Samples = field(default_factory=Samples)
    rss: Samples = field(default_factory=Samples)


def me(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.register", "--child", *args]


def count_items(dsn: str, collection: str) -> int:
    out = subprocess.run(
        ["psql", dsn, "-tAc", f"SELECT count(*) FROM pgstac.items WHERE collection = '{collection}'"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip())


def post_json(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()


def items_per_second(count: int, seconds: Samples) -> Samples:
    return Samples([count / s for s in seconds.values])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--items", type=int, default=20000, help="items written by the pgstac sides")
    parser.add_argument("--api-items", type=int, default=20000, help="items written by the STAC API sides")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each side (>= 3)")
    parser.add_argument(
        "--batch-size",
        default="default",
        help="items per skyvault catalog call (default: catalog.batch_size)",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, *rest = args.child
        if name == "skyvault":
            child_skyvault(*rest)
        elif name == "pypgstac":
            child_pypgstac(*rest)
        else:
            child_post_per_item(*rest)
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a terminated run still stops its services
    work = Path(tempfile.mkdtemp(prefix="skyvault-bench-register-"))
    os.chmod(work, 0o755)  # the PostgreSQL user must reach its data folder
    names = ["pypgstac load", "pypgstac Loader", "skyvault pgstac", "POST per item", "skyvault stac-api"]
    sides = {name: Side() for name in names}
    try:
        ndjson = work / "items.ndjson"
        with ndjson.open("w", encoding="utf-8") as f:
            for item in make_items(max(args.items, args.api_items), COLLECTION):
                f.write(json.dumps(item) + "\n")
        load_file = ndjson  # what `pypgstac load` reads: the first --items items
        if args.items < args.api_items:
            load_file = work / "head.ndjson"
            with ndjson.open() as src, load_file.open("w") as dst:
                for _, line in zip(range(args.items), src, strict=False):
                    dst.write(line)
        collection_file = work / "collection.json"
        collection_file.write_text(json.dumps(collection_doc(COLLECTION)))
        with contextlib.ExitStack() as stack:
            port = stack.enter_context(postgres_cluster(work / "postgres"))
            template = create_database(port, "bench_template")
            migrate_pgstac(template)
            pypgstac = str(Path(sys.executable).parent / "pypgstac")
            subprocess.run(
                [
                    pypgstac,
                    "load",
                    "collections",
                    str(collection_file),
                    "--dsn",
                    template,
                    "--method",
                    "upsert",
                ],
                check=True,
                capture_output=True,
            )
            api_dsn = create_database(port, "bench_api")
            migrate_pgstac(api_dsn)
            api = stack.enter_context(stac_api(api_dsn, work / "stac-api.log"))
            print(f"{args.items} items in {ndjson}; pgstac on port {port}; STAC API at {api}", flush=True)
            for rep in range(args.reps):
                for name in rotation(names, rep):
                    side = sides[name]
                    if "pgstac" in name:
                        dsn = copy_database(port, "bench_template", f"bench_{rep}_{names.index(name)}")
                        count, collection = args.items, COLLECTION
                        if name == "pypgstac load":
                            cmd = [
                                pypgstac,
                                "load",
                                "items",
                                str(load_file),
                                "--dsn",
                                dsn,
                                "--method",
                                "upsert",
                            ]
                        elif name == "pypgstac Loader":
                            cmd = me("pypgstac", dsn, COLLECTION, str(ndjson), str(count))
                        else:
                            cmd = me(
                                "skyvault",
                                "pgstac",
                                dsn,
                                COLLECTION,
                                str(ndjson),
                                str(count),
                                str(args.batch_size),
                            )
                        found_in = dsn
                    else:
                        count, collection = args.api_items, f"{COLLECTION}-{rep}-{names.index(name)}"
                        post_json(f"{api}/collections", collection_doc(collection))
                        if name == "POST per item":
                            cmd = me("post", api, collection, str(ndjson), str(count))
                        else:
                            cmd = me(
                                "skyvault",
                                "stac-api",
                                api,
                                collection,
                                str(ndjson),
                                str(count),
                                str(args.batch_size),
                            )
                        found_in = api_dsn
                    run = run_child(cmd)
                    found = count_items(found_in, collection)
                    if found != count:
                        raise SystemExit(f"{name}: {found} items in the catalog, {count} expected")
                    side.whole.add(run.wall)
                    side.rss.add(run.peak_rss_mb)
                    if name != "pypgstac load":
                        side.call.add(run.report()["call"])
                    print(
                        f"  rep {rep + 1} {name:18s} {run.wall:7.1f} s  {count / run.wall:8.0f} items/s",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for name in names:
        side = sides[name]
        count = args.items if "pgstac" in name else args.api_items
        rows.append(
            [
                name,
                str(count),
                cell(side.whole, 1),
                cell(items_per_second(count, side.whole), 0),
                cell(side.call, 1),
                cell(side.rss, 0),
            ]
        )
    speed = {
        name: items_per_second(args.items if "pgstac" in name else args.api_items, s.whole)
        for name, s in sides.items()
    }
    calls = {
        name: items_per_second(args.items, s.call) for name, s in sides.items() if "pgstac" in name and s.call
    }
    text = "\n".join(
        [
            "### Catalog registration: skyvault backends vs pypgstac load and one POST per item",
            "",
            f"`python -m bench.register --items {args.items} --api-items {args.api_items} --reps {args.reps} "
            f"--batch-size {args.batch_size}`; {machine_line()}",
            "",
            markdown_table(
                ["side", "items", "process s", "items/s", "in-process s", "peak RSS MB"], rows, numeric_from=1
            ),
            "",
            "- skyvault pgstac / pypgstac load (items/s, whole processes): "
            f"{ratio(speed['skyvault pgstac'], speed['pypgstac load'])} (target >= 0.9)",
            "- skyvault pgstac / pypgstac Loader (items/s, in-process calls): "
            f"{ratio(calls['skyvault pgstac'], calls['pypgstac Loader'])}",
            f"- skyvault stac-api / POST per item (items/s): "
            f"{ratio(speed['skyvault stac-api'], speed['POST per item'])} (target >= 5)",
        ]
    )
    write_report("register", text)


if __name__ == "__main__":
    main()

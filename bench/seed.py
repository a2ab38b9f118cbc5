"""Seeding throughput: the ``seed`` flow through a Prefect server against ``gdal2tiles``.

    uv run --frozen python -m bench.seed [--scenes 2000:0-11 10000:0-12] [--processes N ...]
                                         [--reps 3] [--resampling nearest]
                                         [--database sqlite|postgres | --api-url URL]

For each scene (``SIZE:MINZOOM-MAXZOOM``: a synthetic RGB uint8 COG, ``SIZE`` px square over 4 x 4
degrees at 45N, DEFLATE, 512 px blocks, overviews) the item is registered in a static catalog on a
local object store. Then each repetition runs, in rotating order, each in a fresh child process
and into an empty tile folder:

* **seed flow**: the child calls the ``seed`` flow against a Prefect server (one started here on
  127.0.0.1 on SQLite, or PostgreSQL with ``--database postgres``, unless ``--api-url``),
  ``concurrency.seed_workers = N``. Reported twice:
  the flow call as the child times it (run created to result returned) and the whole child
  (interpreter start-up and imports included);
* **in-process**: the child times ``plan_seed`` + ``render_chunk`` on a thread pool of N +
  ``write_tilejsons``: the same functions without Prefect;
* **gdal2tiles**: ``gdal2tiles --xyz -x -w none -r <same resampling> --processes N`` over the same
  zoom range (Debian's GDAL; skyvault uses the GDAL bundled with rasterio).

Tiles/s divides the tiles each side wrote (PNG files; tiles without data are not written on either
side) by the wall time; the ratio is over gdal2tiles' tiles/s (median, and the range of the
ratios of the paired runs). CPU seconds: for a "call" row the child's own CPU time over the call
(all its threads; the Prefect server's is not counted), for a "whole process" row the child's,
its pool workers included. Prints a markdown table and writes it to ``bench/out/seed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Samples,
    add_server_arguments,
    cell,
    flow_env,
    machine_line,
    markdown_table,
    prefect_server,
    ratio,
    rotation,
    run_child,
    write_report,
)

COLLECTION = "bench"
COG_KEY = f"cogs/{COLLECTION}/scene.tif"
WEST, NORTH, SPAN = 8.0, 47.0, 4.0
#: gdal2tiles' names for the resampling methods skyvault's collections use.
GDAL2TILES_RESAMPLING = {"nearest": "near"}
SIDES = ("seed flow", "in-process", "gdal2tiles")


# --- children -----------------------------------------------------------------------------------------


def make_scene(path: Path, size: int, strip: int = 1024) -> None:
    """A smooth RGB scene with some texture, so tiles compress like imagery does (written in strips)."""
    import numpy as np
    import rasterio
    import rasterio.shutil
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(42)
    plain = path.with_suffix(".plain.tif")
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:4326",
        "transform": from_origin(WEST, NORTH, SPAN / size, SPAN / size),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
    }
    xx = np.arange(size, dtype="float32")[None, :] / size
    with rasterio.open(plain, "w", **profile) as dst:
        for top in range(0, size, strip):
            rows = min(strip, size - top)
            yy = np.arange(top, top + rows, dtype="float32")[:, None] / size
            bands = np.stack(
                [
                    128 + 100 * np.sin(6 * xx) * np.cos(4 * yy),
                    128 + 100 * np.cos(5 * xx + 3 * yy),
                    np.broadcast_to(255 * (xx + yy) / 2, (rows, size)),
                ]
            )
            noise = rng.normal(0, 12, (3, rows, size)).astype("float32")
            dst.write(np.clip(bands + noise, 0, 255).astype("uint8"), window=Window(0, top, size, rows))
    rasterio.shutil.copy(
        plain,
        path,
        driver="COG",
        compress="DEFLATE",
        blocksize=512,
        overview_resampling="average",
        num_threads="ALL_CPUS",
    )
    plain.unlink()


def scene_item() -> dict[str, Any]:
    w, s, e, n = WEST, NORTH - SPAN, WEST + SPAN, NORTH
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": "scene",
        "collection": COLLECTION,
        "bbox": [w, s, e, n],
        "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
        "properties": {"datetime": "2026-01-01T00:00:00Z", "skyvault:cog_key": COG_KEY},
        "assets": {},
        "links": [],
    }


def child_prepare(work: Path, size: int, zooms: tuple[int, int], resampling: str) -> None:
    """Make the scene's COG, register its item and write the settings file the other children use."""
    import yaml

    from skyvault.catalog.registration import open_catalog
    from skyvault.config.collections import CollectionConfig
    from skyvault.config.settings import CatalogSettings, StoreSettings

    store = StoreSettings(root=work / "store")
    cog = store.root / COG_KEY
    cog.parent.mkdir(parents=True, exist_ok=True)
    make_scene(cog, size)
    collection = CollectionConfig(
        id=COLLECTION, min_zoom=zooms[0], max_zoom=zooms[1], cog={"warp_resampling": resampling}
    )
    open_catalog(CatalogSettings(), store).upsert_items(collection, [scene_item()])
    config = {
        "store": {"root": str(store.root)},
        "scratch_dir": str(work / "scratch"),
        "collections": {COLLECTION: collection.model_dump(mode="json", exclude={"id"})},
    }
    (work / "skyvault.yaml").write_text(yaml.safe_dump(config))
    print(json.dumps({"cog": str(cog)}))


def child_flow() -> None:
    """Call the ``seed`` flow once (settings from ``SKYVAULT_*``); print times and tiles as JSON."""
    from skyvault.flows.seed import seed

    start, cpu = time.perf_counter(), time.process_time()
    result = seed(COLLECTION)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu": cpu, "written": result.written}))


def child_in_process() -> None:
    """The seeding functions without Prefect, ``concurrency.seed_workers`` chunks at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from skyvault.config.settings import get_settings
    from skyvault.flows.seed import CHUNKS_PER_WORKER
    from skyvault.models import SeedChunk, SeedRequest, SeedResult
    from skyvault.tiles.seeding import combine_results, plan_seed, render_chunk, write_tilejsons

    settings = get_settings()
    collection = settings.collection(COLLECTION)
    workers = settings.concurrency.seed_workers
    start, cpu = time.perf_counter(), time.process_time()
    request = SeedRequest(collection=COLLECTION)
    chunks = plan_seed([scene_item()], request, collection, min_chunks=CHUNKS_PER_WORKER * workers)

    def render(chunk: SeedChunk) -> SeedResult:
        return render_chunk(chunk, collection, settings.store)

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(render, chunks))
    write_tilejsons(chunks, collection, settings.store)
    written = combine_results(COLLECTION, results).written
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu": cpu, "written": written}))


# --- the parent -----------------------------------------------------------------------------------------


def gdal2tiles_command() -> str:
    for name in ("gdal2tiles", "gdal2tiles.py"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("gdal2tiles not found: install gdal-bin (make setup-system)")


def gdal_version() -> str:
    out = subprocess.run(["gdalinfo", "--version"], check=False, capture_output=True, text=True).stdout
    return out.split(",")[0].strip() or "GDAL"


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Side:
    """The repetitions of one way of seeding: wall and CPU seconds, tiles written, tiles/s."""

    def __init__(self) -> None:
        self.seconds, self.cpu, self.rate, self.tiles = Samples(), Samples(), Samples(), Samples()

    def add(self, seconds: float, tiles: int, cpu: float | None = None) -> None:
        self.seconds.add(seconds)
        self.tiles.add(tiles)
        self.rate.add(tiles / seconds)
        if cpu is not None:
            self.cpu.add(cpu)


def bench_scene(
    root: Path, api_url: str, text: str, processes: list[int], reps: int, resampling: str
) -> list[list[str]]:
    """Table rows for one scene, for each process count."""
    size, zooms = parse_scene(text)
    work = root / f"scene-{size}"
    me = [sys.executable, "-m", "bench.seed", "--child"]
    print(f"making a {size}x{size} scene ...", flush=True)
    prepared = run_child([*me, "prepare", str(work), str(size), f"{zooms[0]}-{zooms[1]}", resampling])
    cog = Path(prepared.report()["cog"])
    tiles = work / "store" / "tiles"
    out = work / "gdal2tiles"
    rows: list[list[str]] = []
    for n in processes:
        env = flow_env(
            api_url,
            SKYVAULT_CONFIG_FILE=str(work / "skyvault.yaml"),
            SKYVAULT_CONCURRENCY__SEED_WORKERS=str(n),
            PREFECT_HOME=str(root / "client-home"),
        )
        flow, whole, bare, g2t = Side(), Side(), Side(), Side()
        for rep in range(reps):
            for name in rotation(SIDES, rep):
                print(f"  {size} px, zooms {zooms[0]}-{zooms[1]}, N={n}, rep {rep + 1}: {name}", flush=True)
                shutil.rmtree(tiles, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
                if name == "seed flow":
                    run = run_child([*me, "flow"], env=env)
                    report = run.report()
                    flow.add(float(report["seconds"]), int(report["written"]), float(report["cpu"]))
                    whole.add(run.wall, int(report["written"]), run.cpu)
                elif name == "in-process":
                    run = run_child([*me, "in-process"], env=env)
                    report = run.report()
                    bare.add(float(report["seconds"]), int(report["written"]), float(report["cpu"]))
                else:
                    cmd = [
                        gdal2tiles_command(),
                        "--xyz",
                        "-x",
                        "-q",
                        "-w",
                        "none",
                        "-r",
                        GDAL2TILES_RESAMPLING.get(resampling, resampling),
                        "-z",
                        f"{zooms[0]}-{zooms[1]}",
                        f"--processes={n}",
                        str(cog),
                        str(out),
                    ]
                    run = run_child(cmd)
                    g2t.add(run.wall, sum(1 for _ in out.rglob("*.png")), run.cpu)
        scene = f"{size} px, z{zooms[0]}-{zooms[1]}"
        for label, side in (
            ("seed flow (call)", flow),
            ("seed flow (whole process)", whole),
            ("in-process (call)", bare),
            ("gdal2tiles (whole process)", g2t),
        ):
            rows.append(
                [
                    scene,
                    str(n),
                    label,
                    f"{side.tiles.median:.0f}",
                    cell(side.seconds),
                    cell(side.cpu),
                    f"{side.rate.median:.0f}",
                    ratio(side.rate, g2t.rate),
                ]
            )
    shutil.rmtree(work, ignore_errors=True)
    return rows


def parse_scene(text: str) -> tuple[int, tuple[int, int]]:
    size, zooms = text.split(":")
    lo, hi = zooms.split("-")
    return int(size), (int(lo), int(hi))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenes", nargs="+", default=["2000:0-11", "10000:0-12"], help="SIZE:MINZOOM-MAXZOOM"
    )
    parser.add_argument("--processes", type=int, nargs="+", default=[cpus()], help="N for both sides")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--resampling", default="nearest", help="skyvault's name (gdal2tiles': near)")
    add_server_arguments(parser)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, *rest = args.child
        if mode == "prepare":
            work, size, zooms = Path(rest[0]), int(rest[1]), parse_scene(f"0:{rest[2]}")[1]
            child_prepare(work, size, zooms, rest[3])
        elif mode == "flow":
            child_flow()
        else:
            child_in_process()
        return

    gdal2tiles_command()
    rows: list[list[str]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-seed-") as tmp,
        prefect_server(args.api_url, args.database) as api_url,
    ):
        for text in args.scenes:
            rows += bench_scene(Path(tmp), api_url, text, args.processes, args.reps, args.resampling)

    headers = ["scene", "N", "path", "tiles", "wall s", "CPU s", "tiles/s", "ratio to gdal2tiles"]
    text = (
        "### Seeding: the `seed` flow vs `gdal2tiles`\n\n"
        "Synthetic RGB uint8 COGs (EPSG:4326 over 4 x 4 degrees, DEFLATE, 512 px blocks, overviews), "
        f"256 px PNG tiles with alpha, tiles without data not written on either side, resampling "
        f"`{args.resampling}` on both sides, against {gdal_version()}'s gdal2tiles. Median (min-max) of "
        f"{args.reps} repetitions in rotating order, each into an empty tile folder; N is both "
        "`concurrency.seed_workers` and `gdal2tiles --processes`; CPU s: over the call for a call row "
        "(the Prefect server's not counted), of the whole process otherwise. "
        f"{machine_line()}.\n\n" + markdown_table(headers, rows, numeric_from=3) + "\n"
    )
    write_report("seed", text)


if __name__ == "__main__":
    main()

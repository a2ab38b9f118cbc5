"""Seeding throughput: skyvault's render_chunk against gdal2tiles on the same COG and zoom range.

    uv run --frozen python -m bench.seed [--size 2000] [--max-zoom 11] [--processes 1 2]

A synthetic RGB scene (``--size`` px square over 4 x 4 degrees at 45N) is written as a COG. For
each process count, skyvault plans the tiles (``plan_seed``) and renders the chunks
(``render_chunk``) in that many processes, and ``gdal2tiles --xyz -x`` renders the same zoom
range with ``--processes`` equal. Tiles/s counts the PNG files each writes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.transform import from_origin

from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import StoreSettings
from skyvault.models import SeedChunk, SeedRequest, SeedResult
from skyvault.tiles.seeding import combine_results, plan_seed, render_chunk, write_tilejsons

OUT = Path(__file__).parent / "out" / "seed.md"
WEST, NORTH, SPAN = 8.0, 47.0, 4.0
COG_KEY = "cogs/bench/scene.tif"


def make_scene(path: Path, size: int) -> None:
    """A smooth RGB scene with some texture, so tiles compress like imagery does."""
    yy, xx = np.mgrid[0:size, 0:size].astype("float32") / size
    rng = np.random.default_rng(42)
    noise = rng.normal(0, 12, (3, size, size)).astype("float32")
    bands = np.stack(
        [
            128 + 100 * np.sin(6 * xx) * np.cos(4 * yy),
            128 + 100 * np.cos(5 * xx + 3 * yy),
            255 * (xx + yy) / 2,
        ]
    )
    data = np.clip(bands + noise, 0, 255).astype("uint8")
    plain = path.with_suffix(".plain.tif")
    with rasterio.open(
        plain,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=3,
        dtype="uint8",
        crs="EPSG:4326",
        transform=from_origin(WEST, NORTH, SPAN / size, SPAN / size),
    ) as dst:
        dst.write(data)
    rasterio.shutil.copy(
        plain, path, driver="COG", compress="DEFLATE", blocksize=512, overview_resampling="average"
    )
    plain.unlink()


def gdal2tiles_command() -> str:
    for name in ("gdal2tiles", "gdal2tiles.py"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("gdal2tiles not found: install gdal-bin (make setup-system)")


def _render(args: tuple[SeedChunk, CollectionConfig, StoreSettings]) -> SeedResult:
    chunk, collection, store = args
    return render_chunk(chunk, collection, store, force=True)


def run_skyvault(
    store: StoreSettings, collection: CollectionConfig, processes: int, chunk_size: int
) -> tuple[float, int, int]:
    """Seconds, tiles written and chunks for planning + rendering + TileJSON."""
    item = {
        "type": "Feature",
        "id": "scene",
        "collection": collection.id,
        "bbox": [WEST, NORTH - SPAN, WEST + SPAN, NORTH],
        "geometry": {
            "type": "Polygon",
            "coordinates": [
                [
                    [WEST, NORTH - SPAN],
                    [WEST + SPAN, NORTH - SPAN],
                    [WEST + SPAN, NORTH],
                    [WEST, NORTH],
                    [WEST, NORTH - SPAN],
                ]
            ],
        },
        "properties": {"datetime": "2026-01-01T00:00:00Z", "skyvault:cog_key": COG_KEY},
    }
    start = time.perf_counter()
    chunks = plan_seed([item], SeedRequest(collection=collection.id), collection, chunk_size)
    if processes == 1:
        results = [_render((c, collection, store)) for c in chunks]
    else:
        with ProcessPoolExecutor(processes) as pool:
            results = list(pool.map(_render, [(c, collection, store) for c in chunks]))
    write_tilejsons(chunks, collection, store)
    elapsed = time.perf_counter() - start
    return elapsed, combine_results(collection.id, results).written, len(chunks)


def run_gdal2tiles(cog: Path, out: Path, min_zoom: int, max_zoom: int, processes: int) -> tuple[float, int]:
    cmd = [
        gdal2tiles_command(),
        "--xyz",
        "-x",
        "-q",
        "-w",
        "none",
        "-z",
        f"{min_zoom}-{max_zoom}",
        f"--processes={processes}",
        str(cog),
        str(out),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    return elapsed, sum(1 for _ in out.rglob("*.png"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=2000, help="scene width and height in pixels")
    parser.add_argument("--min-zoom", type=int, default=0)
    parser.add_argument("--max-zoom", type=int, default=11)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunk-size", type=int, default=64, help="tiles per skyvault chunk")
    args = parser.parse_args()

    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-seed-") as tmp:
        root = Path(tmp)
        store = StoreSettings(root=root / "store")
        cog = root / "store" / COG_KEY
        cog.parent.mkdir(parents=True)
        make_scene(cog, args.size)
        collection = CollectionConfig(id="bench", min_zoom=args.min_zoom, max_zoom=args.max_zoom)
        for processes in args.processes:
            shutil.rmtree(root / "store" / "tiles", ignore_errors=True)
            sv_time, sv_tiles, n_chunks = run_skyvault(store, collection, processes, args.chunk_size)
            g2t_dir = root / f"gdal2tiles-{processes}"
            g2t_time, g2t_tiles = run_gdal2tiles(cog, g2t_dir, args.min_zoom, args.max_zoom, processes)
            sv_rate, g2t_rate = sv_tiles / sv_time, g2t_tiles / g2t_time
            rows.append(
                f"| {processes} | {sv_tiles} | {n_chunks} | {sv_time:.1f} | {sv_rate:.0f} | "
                f"{g2t_tiles} | {g2t_time:.1f} | {g2t_rate:.0f} | {sv_rate / g2t_rate:.2f} |"
            )
            shutil.rmtree(g2t_dir, ignore_errors=True)

    header = (
        f"### Seeding: skyvault render_chunk vs gdal2tiles\n\n"
        f"{args.size}x{args.size} px RGB uint8 COG (EPSG:4326, DEFLATE, 512 px blocks, overviews), "
        f"zooms {args.min_zoom}-{args.max_zoom}, 256 px PNG tiles with alpha, tiles without data not "
        f"written on either side. skyvault: plan_seed + render_chunk (rio-tiler, nearest, reading "
        f"overviews; chunks of {args.chunk_size} tiles over a process pool) + TileJSON. gdal2tiles "
        f"{gdal_version()}: `--xyz -x -w none -z {args.min_zoom}-{args.max_zoom} --processes N` "
        f"(resampling average, lower zooms built from the tiles above).\n\n"
        "| processes | skyvault tiles | chunks | skyvault s | skyvault tiles/s | gdal2tiles tiles | "
        "gdal2tiles s | gdal2tiles tiles/s | ratio (skyvault / gdal2tiles) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    table = header + "\n".join(rows) + "\n"
    print(table)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(table, encoding="utf-8")
    print(f"written to {OUT}")


def gdal_version() -> str:
    out = subprocess.run(["gdalinfo", "--version"], check=False, capture_output=True, text=True).stdout
    return out.split(",")[0].strip() or "GDAL"


if __name__ == "__main__":
    main()

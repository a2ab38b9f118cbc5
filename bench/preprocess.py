"""Preprocess benchmark: skyvault's preprocess_product against ``gdal_translate -of COG``.

Generates a seeded 6000x6000x3 uint8 scene (smooth gradients plus noise) as a plain tiled GeoTIFF
in a local object store, then alternates runs of

* ``gdal_translate -of COG`` with the collection's creation options, and
* ``preprocess_product`` (``replace=True``) on the local store,

each in a fresh child process whose wall time and peak RSS come from ``wait4``. skyvault's child
also reports the wall time of the ``preprocess_product`` call itself (without interpreter start-up
and imports) and its RSS after imports. Prints a markdown table with medians and
skyvault/gdal_translate ratios and writes it to ``bench/out/preprocess.md``.

Run: ``uv run --frozen python -m bench.preprocess [--reps 5] [--size 6000]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GDAL_TRANSLATE = "/usr/bin/gdal_translate"
TIME = "/usr/bin/time"
COLLECTION = "bench"
REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "preprocess.md"


@dataclass
class Runs:
    wall: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    call_wall: list[float] = field(default_factory=list)
    call_cpu: list[float] = field(default_factory=list)
    base_rss_mb: list[float] = field(default_factory=list)


def make_scene(path: Path, size: int, seed: int = 20240501) -> None:
    """A seeded RGB scene: sums of smooth sinusoids per band plus small integer noise."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    x = np.arange(size, dtype=np.float32) / size
    data = np.empty((3, size, size), np.uint8)
    for b in range(3):
        fx = (2 + b) * 2 * np.pi * x
        fy = (1.5 + 0.7 * b) * 2 * np.pi * x
        field_ = np.sin(fx)[None, :] * np.cos(fy)[:, None] + np.cos(fx)[None, :] * np.sin(fy)[:, None]
        field_ += 0.5 * np.cos((3 - b) * 2 * np.pi * x)[:, None] + 0.3 * np.sin(9 * np.pi * x)[None, :]
        field_ = field_ * 48 + 128
        field_ += rng.integers(-1, 2, size=(size, size), dtype=np.int8)
        data[b] = np.clip(field_, 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32632",
        "transform": from_origin(500000.0, 5000000.0, 10.0, 10.0),
        "photometric": "RGB",
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def run_child(cmd: list[str]) -> tuple[float, float, float, str]:
    """Run ``cmd`` in a fresh process under ``/usr/bin/time``.

    Returns wall seconds, peak RSS (MB), CPU seconds (user + system) and stdout. ``/usr/bin/time``
    is a small process, so the child's peak RSS is not inflated by this (larger) parent's.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as usage, tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.run(
            [TIME, "-f", "%M %U %S", "-o", usage.name, *cmd],
            stdout=out,
            stderr=subprocess.PIPE,
            check=False,
            cwd=REPO,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr.decode()}")
        rss_kb, user, system = usage.read().split()[-3:]
        out.seek(0)
        return wall, int(rss_kb) / 1024, float(user) + float(system), out.read().decode()


def gdal_translate_cmd(source: Path, dest: Path, options: dict[str, str]) -> list[str]:
    cmd = [GDAL_TRANSLATE, "-q", "-of", "COG"]
    for name, value in options.items():
        cmd += ["-co", f"{name}={value}"]
    return [*cmd, str(source), str(dest)]


def child(store_root: str, scratch: str, source_key: str) -> None:
    """In a fresh process: one preprocess_product call on the local store, timed from inside."""
    from skyvault.cog.convert import preprocess_product
    from skyvault.config.collections import CollectionConfig
    from skyvault.config.settings import StoreSettings
    from skyvault.models import Product

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    product = Product(collection=COLLECTION, id=Path(source_key).stem, source_key=source_key)
    store = StoreSettings(root=Path(store_root))
    start, start_cpu = time.perf_counter(), time.process_time()
    info = preprocess_product(product, CollectionConfig(id=COLLECTION), store, Path(scratch), replace=True)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(json.dumps({"call_wall": wall, "call_cpu": cpu, "base_rss_mb": base_rss, "size": info.size}))


def same_pixels(a: Path, b: Path) -> bool:
    import numpy as np
    import rasterio

    with rasterio.open(a) as da, rasterio.open(b) as db:
        return bool(np.array_equal(da.read(), db.read())) and da.transform == db.transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each tool")
    parser.add_argument("--size", type=int, default=6000, help="scene width and height in pixels")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the scene (temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("STORE", "SCRATCH", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from skyvault.config.collections import CollectionConfig

    options = CollectionConfig(id=COLLECTION).cog.creation_options()
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-", dir=args.workdir) as tmp:
        work = Path(tmp)
        store_root, scratch = work / "store", work / "scratch"
        source_key = f"landing/{COLLECTION}/scene.tif"
        source = store_root / source_key
        start = time.perf_counter()
        make_scene(source, args.size)
        print(
            f"scene {args.size}x{args.size}x3 uint8, {source.stat().st_size / 1e6:.1f} MB,"
            f" written in {time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs",
            flush=True,
        )
        gdal_out = work / "gdal_translate.tif"
        gdal_cmd = gdal_translate_cmd(source, gdal_out, options)
        sky_cmd = [
            sys.executable,
            "-m",
            "bench.preprocess",
            "--child",
            str(store_root),
            str(scratch),
            source_key,
        ]

        gdal, sky = Runs(), Runs()

        def once(tool: str, record: bool) -> None:
            if tool == "gdal":
                gdal_out.unlink(missing_ok=True)
                wall, rss, cpu, _ = run_child(gdal_cmd)
                if record:
                    gdal.wall.append(wall)
                    gdal.rss_mb.append(rss)
                    gdal.cpu.append(cpu)
                print(
                    f"  gdal_translate  wall {wall:6.2f} s  CPU {cpu:6.2f} s  peak RSS {rss:5.0f} MB",
                    flush=True,
                )
            else:
                wall, rss, cpu, out = run_child(sky_cmd)
                report = json.loads(out.strip().splitlines()[-1])
                if record:
                    sky.wall.append(wall)
                    sky.rss_mb.append(rss)
                    sky.cpu.append(cpu)
                    sky.call_wall.append(report["call_wall"])
                    sky.call_cpu.append(report["call_cpu"])
                    sky.base_rss_mb.append(report["base_rss_mb"])
                print(
                    f"  skyvault        wall {wall:6.2f} s  CPU {cpu:6.2f} s  peak RSS {rss:5.0f} MB"
                    f"  (call: wall {report['call_wall']:.2f} s, CPU {report['call_cpu']:.2f} s;"
                    f" RSS after imports {report['base_rss_mb']:.0f} MB)",
                    flush=True,
                )

        print("warm-up", flush=True)
        once("gdal", record=False)
        once("sky", record=False)
        for rep in range(args.reps):
            print(f"rep {rep + 1}/{args.reps}", flush=True)
            for tool in ("gdal", "sky") if rep % 2 == 0 else ("sky", "gdal"):
                once(tool, record=True)

        sky_out = store_root / f"cogs/{COLLECTION}/scene.tif"
        identical = same_pixels(gdal_out, sky_out)
        table = render(args, options, gdal, sky, source, gdal_out, sky_out, identical)
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(table)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(table + "\n", encoding="utf-8")
    print(f"\nwritten to {OUT}")


def render(
    args: argparse.Namespace,
    options: dict[str, str],
    gdal: Runs,
    sky: Runs,
    source: Path,
    gdal_out: Path,
    sky_out: Path,
    identical: bool,
) -> str:
    med = statistics.median
    g_wall, g_cpu, g_rss = med(gdal.wall), med(gdal.cpu), med(gdal.rss_mb)
    s_wall, s_cpu, s_rss = med(sky.wall), med(sky.cpu), med(sky.rss_mb)
    c_wall, c_cpu, s_base = med(sky.call_wall), med(sky.call_cpu), med(sky.base_rss_mb)
    co = " ".join(f"-co {k}={v}" for k, v in options.items())
    lines = [
        f"### preprocess: {args.size}x{args.size}x3 uint8 scene "
        f"({source.stat().st_size / 1e6:.0f} MB tiled GeoTIFF) to COG, {os.cpu_count()} CPUs",
        "",
        f"Median of {args.reps} runs per tool, alternating order, each in a fresh process; peak RSS and "
        f"CPU from `/usr/bin/time`. Creation options on both sides: `{co}`.",
        "",
        "| run | wall (s) | fastest wall (s) | CPU (s) | peak RSS (MB) | COG (MB) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| gdal_translate {gdal_version()} process | {g_wall:.2f} | {min(gdal.wall):.2f} | {g_cpu:.2f} |"
        f" {g_rss:.0f} | {gdal_out.stat().st_size / 1e6:.1f} |",
        f"| skyvault `preprocess_product` call | {c_wall:.2f} | {min(sky.call_wall):.2f} | {c_cpu:.2f} |"
        f" {s_rss:.0f} | {sky_out.stat().st_size / 1e6:.1f} |",
        f"| skyvault process (+ Python start-up, imports) | {s_wall:.2f} | {min(sky.wall):.2f} |"
        f" {s_cpu:.2f} | {s_rss:.0f} | |",
        "",
        "| skyvault / gdal_translate | ratio | target |",
        "|---|---:|---:|",
        f"| wall, `preprocess_product` call (medians) | {c_wall / g_wall:.3f} | <= 1.05 |",
        f"| wall, `preprocess_product` call (fastest runs) | {min(sky.call_wall) / min(gdal.wall):.3f} | |",
        f"| CPU, `preprocess_product` call | {c_cpu / g_cpu:.3f} | |",
        f"| wall, whole process | {s_wall / g_wall:.3f} | |",
        f"| peak RSS, whole process | {s_rss / g_rss:.3f} | <= 1.5 |",
        f"| peak RSS minus RSS after imports ({s_base:.0f} MB) | {(s_rss - s_base) / g_rss:.3f} | |",
        "",
        f"Pixels of both COGs identical: {'yes' if identical else 'NO'}. The skyvault call also "
        "hashes the source (while converting) and the COG (while uploading), validates the COG "
        "strictly and uploads it atomically to the local store.",
        "",
        f"Load average at the end: {os.getloadavg()[0]:.1f}. "
        f"All runs, wall (s): gdal_translate {', '.join(f'{w:.2f}' for w in gdal.wall)}; "
        f"skyvault call {', '.join(f'{w:.2f}' for w in sky.call_wall)}.",
    ]
    return "\n".join(lines)


def gdal_version() -> str:
    out = subprocess.run([GDAL_TRANSLATE, "--version"], capture_output=True, text=True, check=False)
    parts = out.stdout.split()
    return parts[1].rstrip(",") if len(parts) > 1 else "?"


if __name__ == "__main__":
    main()

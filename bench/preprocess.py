"""Preprocess benchmark: skyvault's preprocess against the same GDAL doing the same conversion.

    uv run --frozen python -m bench.preprocess [--scenes rgb:6000 float:10000] [--reps 3]
        [--database sqlite|postgres | --api-url URL | --no-flow] [--no-gdal-translate] [--workdir DIR]

For each scene (``rgb:N``: N x N x 3 uint8; ``float:N``: N x N float32; seeded smooth fields plus
noise, written as plain tiled GeoTIFFs into a local object store), every repetition runs, each in
a fresh child process and in a rotating order (each tool takes each position in turn):

* ``gdal``: ``rasterio.shutil.copy(src, dst, driver="COG", **options)`` with the collection's
  creation options, in a Python process that imports only rasterio (the GDAL bundled in
  rasterio's wheel, the one skyvault uses);
* ``skyvault``: ``skyvault.cog.convert.preprocess_product`` of the product (no COG yet): source
  hashed, converted, checksum stamped, validated strictly, hashed and stored atomically;
* ``flow``: the ``preprocess-product`` task inside a flow, against a running Prefect server (one
  started here on 127.0.0.1, SQLite or ``--database postgres``, unless ``--api-url``; ``--no-flow`` skips it);
* ``gdal_translate``: Debian's ``gdal_translate -of COG`` (its own, older GDAL) as an extra.

Each child reports, from inside, the wall time of the call itself and its RSS after imports; the
parent measures the whole process (wall, CPU, peak RSS from ``wait4``). The table gives medians
with the range (min-max) of the runs, and the ratios to the ``gdal`` call; pixels of the outputs
are compared. Written to ``bench/out/preprocess.md`` and stdout.

This module's top level imports only the standard library, so the ``gdal`` child pays for
nothing but Python and rasterio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    ChildRun,
    Samples,
    add_server_arguments,
    cell,
    flow_env,
    machine_line,
    markdown_table,
    own_peak_rss_mb,
    prefect_server,
    ratio,
    rotation,
    run_child,
    write_report,
)

COLLECTION = "bench"
GDAL_TRANSLATE = "/usr/bin/gdal_translate"
DEFAULT_SCENES = ("rgb:6000", "float:10000")
TOOLS = ("gdal", "skyvault", "flow", "gdal_translate")


# --- children: each runs in a fresh process and prints one JSON line -----------------------------


def _rss_now_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def child_make_scene(kind: str, size: int, path: str, seed: int = 20240501) -> None:
    """A seeded scene as a tiled, uncompressed GeoTIFF, written in strips to bound memory."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    count, dtype = (3, "uint8") if kind == "rgb" else (1, "float32")
    rng = np.random.default_rng(seed)
    x = np.arange(size, dtype=np.float32) / size
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": count,
        "dtype": dtype,
        "crs": "EPSG:32632",
        "transform": from_origin(500000.0, 5000000.0, 10.0, 10.0),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    if kind == "rgb":
        profile["photometric"] = "RGB"
    strip = 1024
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, size, strip):
            y = x[top : top + strip]
            rows = len(y)
            for b in range(count):
                fx = (2 + b) * 2 * np.pi * x
                fy = (1.5 + 0.7 * b) * 2 * np.pi * y
                field_ = np.sin(fx)[None, :] * np.cos(fy)[:, None] + np.cos(fx)[None, :] * np.sin(fy)[:, None]
                field_ += (
                    0.5 * np.cos((3 - b) * 2 * np.pi * y)[:, None] + 0.3 * np.sin(9 * np.pi * x)[None, :]
                )
                if kind == "rgb":
                    field_ = field_ * 48 + 128 + rng.integers(-1, 2, size=(rows, size), dtype=np.int8)
                    data = np.clip(field_, 0, 255).astype(np.uint8)
                else:
                    data = (field_ * 850 + 1200 + rng.normal(0, 0.5, size=(rows, size))).astype(np.float32)
                dst.write(data, b + 1, window=Window(0, top, size, rows))
    print(json.dumps({"bytes": Path(path).stat().st_size}))


def child_gdal(source: str, dest: str, options_json: str) -> None:
    """The bare conversion: ``rasterio.shutil.copy(driver="COG")``, timed from inside."""
    import rasterio.shutil

    options = json.loads(options_json)
    base = _rss_now_mb()
    start, start_cpu = time.perf_counter(), time.process_time()
    rasterio.shutil.copy(source, dest, driver="COG", **options)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(json.dumps({"call_wall": wall, "call_cpu": cpu, "base_rss_mb": base}))


def _product_args(store_root: str, scratch: str, key: str) -> tuple[Any, Any, Any, Path]:
    from skyvault.config.collections import CollectionConfig
    from skyvault.config.settings import StoreSettings
    from skyvault.models import Product

    product = Product(collection=COLLECTION, id=Path(key).stem, source_key=key)
    return product, CollectionConfig(id=COLLECTION), StoreSettings(root=Path(store_root)), Path(scratch)


def child_skyvault(store_root: str, scratch: str, key: str) -> None:
    """One ``preprocess_product`` call on the local store, timed from inside."""
    from skyvault.cog.convert import preprocess_product

    product, collection, store, scratch_dir = _product_args(store_root, scratch, key)
    base = _rss_now_mb()
    start, start_cpu = time.perf_counter(), time.process_time()
    info = preprocess_product(product, collection, store, scratch_dir)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if not info.created:
        raise SystemExit("the COG already existed: nothing was converted")
    print(json.dumps({"call_wall": wall, "call_cpu": cpu, "base_rss_mb": base, "size": info.size}))


def child_flow(store_root: str, scratch: str, key: str) -> None:
    """The ``preprocess-product`` task inside a flow run on the server, timed from inside."""
    from prefect import flow

    from skyvault.models import CogInfo
    from skyvault.tasks.cog import preprocess_product

    product, collection, store, scratch_dir = _product_args(store_root, scratch, key)

    @flow(name="bench-preprocess", flow_run_name="bench-preprocess/{product.id}")
    def bench_preprocess(product: Any, collection: Any, store: Any, scratch_dir: Path) -> CogInfo:
        info: CogInfo = preprocess_product(product, collection, store, scratch_dir)
        return info

    base = _rss_now_mb()
    start, start_cpu = time.perf_counter(), time.process_time()
    info = bench_preprocess(product, collection, store, scratch_dir)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if not info.created:
        raise SystemExit("the COG already existed: nothing was converted")
    print(json.dumps({"call_wall": wall, "call_cpu": cpu, "base_rss_mb": base, "size": info.size}))


def child_provision() -> None:
    """Create the tag concurrency limits the task uses, as ``skyvault`` commands do."""
    from skyvault.config.provision import provision_tag_limits
    from skyvault.config.settings import Settings

    provision_tag_limits(Settings())
    print(json.dumps({}))


def child_compare(reference: str, *others: str) -> None:
    """Whether every other file has the reference's pixels, shape, CRS and transform."""
    import numpy as np
    import rasterio

    same = {}
    with rasterio.open(reference) as ref:
        for other in others:
            with rasterio.open(other) as ds:
                same[other] = bool(
                    (ds.count, ds.width, ds.height, ds.crs, ds.transform)
                    == (ref.count, ref.width, ref.height, ref.crs, ref.transform)
                    and all(
                        np.array_equal(ref.read(b, window=w), ds.read(b, window=w), equal_nan=True)
                        for b in range(1, ref.count + 1)
                        for _, w in ref.block_windows(b)
                    )
                )
    print(json.dumps(same))


# --- the parent ----------------------------------------------------------------------------------


@dataclass
class Tool:
    """Measurements of one tool on one scene."""

    whole_wall: Samples = field(default_factory=Samples)
    whole_cpu: Samples = field(default_factory=Samples)
    peak_rss: Samples = field(default_factory=Samples)
    call_wall: Samples = field(default_factory=Samples)
    call_cpu: Samples = field(default_factory=Samples)
    call_rss: Samples = field(default_factory=Samples)

    def record(self, run: ChildRun, report: dict[str, Any] | None) -> None:
        self.whole_wall.add(run.wall)
        self.whole_cpu.add(run.cpu)
        self.peak_rss.add(run.peak_rss_mb)
        if report is not None:
            self.call_wall.add(report["call_wall"])
            self.call_cpu.add(report["call_cpu"])
            self.call_rss.add(run.peak_rss_mb - report["base_rss_mb"])


def me(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.preprocess", *args]


def gdal_translate_version() -> str | None:
    if not Path(GDAL_TRANSLATE).exists():
        return None
    out = subprocess.run([GDAL_TRANSLATE, "--version"], capture_output=True, text=True, check=False)
    parts = out.stdout.split()
    return parts[1].rstrip(",") if len(parts) > 1 else "?"


def bench_scene(
    spec: str, work: Path, reps: int, options: dict[str, str], api_url: str | None, translate: str | None
) -> str:
    kind, size_text = spec.split(":")
    size = int(size_text)
    if kind not in ("rgb", "float"):
        raise SystemExit(f"unknown scene kind {kind!r} (rgb or float)")
    store, scratch = work / "store", work / "scratch"
    key = f"landing/{COLLECTION}/{kind}{size}.tif"
    source = store / key
    cog = store / f"cogs/{COLLECTION}/{kind}{size}.tif"
    bare_out, translate_out = work / f"gdal-{kind}{size}.tif", work / f"gdal_translate-{kind}{size}.tif"
    sky_out, flow_out = work / f"skyvault-{kind}{size}.tif", work / f"flow-{kind}{size}.tif"
    made = run_child(me("--child", "make-scene", kind, str(size), str(source))).report()
    shape = f"{size}x{size}x3 uint8" if kind == "rgb" else f"{size}x{size} float32"
    print(f"scene {shape}: {made['bytes'] / 1e6:.0f} MB", flush=True)

    client_env = flow_env(api_url, PREFECT_HOME=str(work / "prefect-client")) if api_url else None
    commands: dict[str, tuple[list[str], dict[str, str] | None, Path]] = {
        "gdal": (me("--child", "gdal", str(source), str(bare_out), json.dumps(options)), None, bare_out),
        "skyvault": (me("--child", "skyvault", str(store), str(scratch), key), None, sky_out),
    }
    if client_env:
        commands["flow"] = (me("--child", "flow", str(store), str(scratch), key), client_env, flow_out)
    if translate:
        co = [a for k, v in options.items() for a in ("-co", f"{k}={v}")]
        cmd = [GDAL_TRANSLATE, "-q", "-of", "COG", *co, str(source), str(translate_out)]
        commands["gdal_translate"] = (cmd, None, translate_out)
    tools = {name: Tool() for name in commands}

    def once(name: str, record: bool) -> None:
        cmd, env, out = commands[name]
        out.unlink(missing_ok=True)
        run = run_child(cmd, env=env)
        report = None if name == "gdal_translate" else run.report()
        if name in ("skyvault", "flow"):
            os.replace(cog, out)  # the next run starts without a COG, as for a new product
        if record:
            tools[name].record(run, report)
        inside = f"  call {report['call_wall']:6.2f} s" if report else ""
        print(
            f"  {name:15s} process {run.wall:6.2f} s  CPU {run.cpu:6.2f} s"
            f"  peak RSS {run.peak_rss_mb:5.0f} MB{inside}",
            flush=True,
        )

    print("warm-up", flush=True)
    for name in commands:
        once(name, record=False)
    for rep in range(reps):
        print(f"rep {rep + 1}/{reps}", flush=True)
        for name in rotation(list(commands), rep):
            once(name, record=True)
    outputs = [sky_out] + ([flow_out] if "flow" in commands else [])
    same = run_child(me("--child", "compare", str(bare_out), *map(str, outputs))).report()
    identical = all(same.values())
    sizes = {"gdal": bare_out.stat().st_size, "skyvault": sky_out.stat().st_size}
    for path in (source, bare_out, sky_out, flow_out, translate_out):
        path.unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return render(spec, shape, made["bytes"], reps, options, tools, identical, sizes, translate)


def render(
    spec: str,
    shape: str,
    source_bytes: int,
    reps: int,
    options: dict[str, str],
    tools: dict[str, Tool],
    identical: bool,
    sizes: dict[str, int],
    translate: str | None,
) -> str:
    gdal, sky, flow = tools["gdal"], tools["skyvault"], tools.get("flow")
    co = " ".join(f"{k}={v}" for k, v in options.items())
    header = ["row", "what it measures", "wall s", "CPU s", "peak RSS MB", "call memory MB"]
    rows = [
        [
            "in-process: GDAL",
            '`rasterio.shutil.copy(src, dst, driver="COG", **options)` call',
            cell(gdal.call_wall),
            cell(gdal.call_cpu),
            "",
            cell(gdal.call_rss, 0),
        ],
        [
            "in-process: skyvault",
            "`preprocess_product` call: hash source, convert, stamp, validate, hash + store COG",
            cell(sky.call_wall),
            cell(sky.call_cpu),
            "",
            cell(sky.call_rss, 0),
        ],
    ]
    if flow:
        rows.append(
            [
                "in-process: skyvault flow",
                "a flow running the `preprocess-product` task, through the Prefect server",
                cell(flow.call_wall),
                cell(flow.call_cpu),
                "",
                cell(flow.call_rss, 0),
            ]
        )
    rows += [
        [
            "whole process: GDAL",
            "`python` importing rasterio, then the call above",
            cell(gdal.whole_wall),
            cell(gdal.whole_cpu),
            cell(gdal.peak_rss, 0),
            "",
        ],
        [
            "whole process: skyvault",
            "`python` importing skyvault's preprocess, then the call above",
            cell(sky.whole_wall),
            cell(sky.whole_cpu),
            cell(sky.peak_rss, 0),
            "",
        ],
    ]
    if flow:
        rows.append(
            [
                "whole process: skyvault flow",
                "`python` importing prefect and skyvault, then the flow above",
                cell(flow.whole_wall),
                cell(flow.whole_cpu),
                cell(flow.peak_rss, 0),
                "",
            ]
        )
    if "gdal_translate" in tools:
        t = tools["gdal_translate"]
        rows.append(
            [
                f"extra: Debian gdal_translate (GDAL {translate})",
                "`gdal_translate -of COG` with the same options, an older GDAL",
                cell(t.whole_wall),
                cell(t.whole_cpu),
                cell(t.peak_rss, 0),
                "",
            ]
        )
    ratios = [
        ["skyvault / GDAL, in-process wall", ratio(sky.call_wall, gdal.call_wall), "<= 1.05"],
        ["skyvault / GDAL, whole-process wall", ratio(sky.whole_wall, gdal.whole_wall), "<= 1.05"],
        ["skyvault / GDAL, whole-process peak RSS", ratio(sky.peak_rss, gdal.peak_rss), "<= 1.3"],
        [
            "skyvault / GDAL, call memory (peak RSS above RSS after imports)",
            ratio(sky.call_rss, gdal.call_rss),
            "",
        ],
    ]
    if flow:
        ratios += [
            ["skyvault flow / GDAL, in-process wall", ratio(flow.call_wall, gdal.call_wall), ""],
            ["skyvault flow / GDAL, whole-process wall", ratio(flow.whole_wall, gdal.whole_wall), ""],
        ]
    also = " and the flow's" if flow else ""
    return "\n".join(
        [
            f"### {shape} scene ({source_bytes / 1e6:.0f} MB tiled GeoTIFF) to COG (`--scenes {spec}`)",
            "",
            f"Median (min-max) of {reps} runs per tool, each in a fresh process, in rotating order. "
            f"Creation options on every side: `{co}`. {machine_line()}.",
            "",
            markdown_table(header, rows, numeric_from=2),
            "",
            markdown_table(["ratio (medians; range of paired runs)", "value", "target"], ratios),
            "",
            f"Pixels, shape, CRS and transform of skyvault's COG{also} "
            f"identical to the GDAL call's: {'yes' if identical else 'NO'}. COG size: GDAL "
            f"{sizes['gdal'] / 1e6:.2f} MB, skyvault {sizes['skyvault'] / 1e6:.2f} MB (its metadata adds "
            "the source checksum and settings fingerprint).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scenes", nargs="+", default=list(DEFAULT_SCENES), help="kind:size (rgb or float)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each tool (>= 3)")
    add_server_arguments(parser)
    parser.add_argument("--no-flow", action="store_true", help="skip the flow row")
    parser.add_argument("--no-gdal-translate", action="store_true", help="skip the Debian gdal_translate row")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put scenes (default: temp dir)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, *rest = args.child
        if name == "make-scene":
            child_make_scene(rest[0], int(rest[1]), rest[2])
        elif name == "gdal":
            child_gdal(*rest)
        elif name == "skyvault":
            child_skyvault(*rest)
        elif name == "flow":
            child_flow(*rest)
        elif name == "provision":
            child_provision()
        else:
            child_compare(*rest)
        return

    options = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import json; from skyvault.config.collections import CollectionConfig; "
                f"print(json.dumps(CollectionConfig(id={COLLECTION!r}).cog.creation_options()))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    translate = None if args.no_gdal_translate else gdal_translate_version()
    tables = []
    with tempfile.TemporaryDirectory(prefix="skyvault-bench-preprocess-", dir=args.workdir) as tmp:
        work = Path(tmp)
        server = contextlib.nullcontext(None) if args.no_flow else prefect_server(args.api_url, args.database)
        with server as api_url:
            if api_url:
                env = flow_env(api_url, PREFECT_HOME=str(work / "prefect-client"))
                run_child(me("--child", "provision"), env=env)
            for spec in args.scenes:
                tables.append(bench_scene(spec, work, args.reps, options, api_url, translate))
    if own_peak_rss_mb() > 60:
        print(f"warning: this parent process peaked at {own_peak_rss_mb():.0f} MB", file=sys.stderr)
    command = "uv run --frozen python -m bench.preprocess" + "".join(f" {a}" for a in sys.argv[1:])
    write_report(
        "preprocess",
        "\n\n".join(
            [
                f"Command: `{command}`",
                *tables,
            ]
        ),
    )


if __name__ == "__main__":
    main()

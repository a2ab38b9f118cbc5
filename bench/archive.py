"""Archive benchmark: skyvault's archive (functions and the flow) against tar | tee | openssl dgst.

    uv run --frozen python -m bench.archive [--gb 2.0] [--reps 3] [--dir /var/tmp]
        [--database sqlite|postgres | --api-url URL | --no-flow]

Generates a dataset of incompressible random files of mixed sizes (a few hundred MB down to a few
KB) on local disk, then in every repetition, in a rotating order (each side takes each position):

* ``baseline``: ``tar -cf - DIR | tee LTS/x.tar | openssl dgst -sha256``, ``sync LTS/x.tar``, the
  page cache of ``x.tar`` dropped, then ``openssl dgst -sha256 LTS/x.tar`` (the verification read)
  and the two digests compared: OpenSSL's SHA-256 uses the CPU's SHA instructions, as Python's
  ``hashlib`` does;
* ``functions``: in a fresh process, skyvault's archive functions in a plain sequence: list the
  folder, plan datablocks (the default target, so one block like the baseline), check free space,
  stream the block to LTS while hashing the tar and every member, fsync, read it back with its
  page cache dropped and check the tar and every member checksum, write the manifest;
* ``flow``: in a fresh process, ``skyvault archive bench --source-dir DIR --keep-landing``: the
  ``archive`` flow a user runs, through a running Prefect server (one started here on 127.0.0.1,
  on SQLite or with ``--database postgres`` on PostgreSQL, unless ``--api-url``; ``--no-flow``
  skips it): the same steps as tasks, plus the lock, the tag
  limits and the summary artifacts.

Before every run the page cache of every source file is dropped, so each side reads the dataset
from the device, and each side's output is removed afterwards. Throughput is dataset bytes / wall
seconds. Skyvault's children report the wall time of their calls from inside (in-process rows);
the parent measures whole processes. The table gives medians with the range (min-max) and is
written to ``bench/out/archive.md`` and stdout. The generated files are removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    MB,
    ChildRun,
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

DATASET = "bench"
OPENSSL = "openssl dgst -sha256 -r"
SIZES = [  # (size in bytes, weight): mixed sizes, most bytes in large files, most files small
    (300 * MB, 1),
    (64 * MB, 3),
    (8 * MB, 10),
    (1 * MB, 30),
    (100_000, 60),
    (4_000, 120),
]


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            drop_cache(path)


def generate(root: Path, total: int, seed: int = 7) -> tuple[int, int]:
    """Random files of mixed sizes under nested folders until ``total`` bytes; returns (files, bytes)."""
    rng = random.Random(seed)
    sizes, weights = zip(*SIZES, strict=True)
    written = count = 0
    chunk = 8 * MB
    while written < total:
        size = min(rng.choices(sizes, weights)[0], max(total - written, 1))
        size = max(1, int(size * rng.uniform(0.5, 1.5)))
        path = root / f"d{count % 13:02d}" / f"s{count % 5}" / f"file-{count:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(chunk, left)
                f.write(os.urandom(n))
                left -= n
        written += size
        count += 1
    subprocess.run(["sync"], check=True)
    drop_tree(root)
    return count, written


def run_baseline(src: Path, lts: Path) -> tuple[float, float]:
    """Wall seconds of (write + sync, uncached verification read) of the shell pipeline."""
    lts.mkdir(parents=True, exist_ok=True)
    tar = lts / "x.tar"
    t0 = time.perf_counter()
    first = subprocess.run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            f'tar -cf - -C "{src.parent}" "{src.name}" | tee "{tar}" | {OPENSSL}',
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[0]
    subprocess.run(["sync", str(tar)], check=True)
    t1 = time.perf_counter()
    drop_cache(tar)
    second = subprocess.run(
        ["bash", "-c", f'{OPENSSL} "{tar}"'], check=True, capture_output=True, text=True
    ).stdout.split()[0]
    t2 = time.perf_counter()
    if first != second:
        raise SystemExit(f"baseline verification failed: {first} != {second}")
    return t1 - t0, t2 - t1


# --- children -------------------------------------------------------------------------------------


def child_functions(src: str, lts_root: str) -> None:
    """The archive functions in a plain sequence, timed from inside (write, verify + manifest)."""
    from skyvault.archive.lts import (
        build_manifest,
        ensure_free_space,
        verify_datablock,
        write_datablock,
        write_manifest,
    )
    from skyvault.archive.packing import dataset_source, list_dataset, plan_datablocks
    from skyvault.config.settings import LtsSettings, StoreSettings

    lts = LtsSettings(root=Path(lts_root), create_root=True)
    store = StoreSettings(root=Path(lts_root).parent / "unused-store")
    t0 = time.perf_counter()
    source = dataset_source(DATASET, source_dir=src)
    plan = plan_datablocks(DATASET, list_dataset(source, store), lts.datablock_bytes)
    ensure_free_space(lts, DATASET, sum(b.size for b in plan))
    written = [write_datablock(b, source, store, lts) for b in plan]
    t1 = time.perf_counter()
    blocks = [verify_datablock(lts, DATASET, b) for b in written]
    write_manifest(lts, build_manifest(source, lts, blocks))
    t2 = time.perf_counter()
    print(json.dumps({"write": t1 - t0, "verify": t2 - t1, "blocks": len(plan)}))


def child_flow(src: str) -> None:
    """``skyvault archive`` (the command's ``main``), timed from inside."""
    from skyvault.cli import main

    t0 = time.perf_counter()
    code = main(["archive", DATASET, "--source-dir", src, "--keep-landing"])
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"skyvault archive exited with {code}")
    print(json.dumps({"call": wall}))


# --- the parent -------------------------------------------------------------------------------------


@dataclass
class Side:
    """Measurements of one side."""

    write: Samples = field(default_factory=Samples)
    verify: Samples = field(default_factory=Samples)
    call: Samples = field(default_factory=Samples)
    whole: Samples = field(default_factory=Samples)
    peak_rss: Samples = field(default_factory=Samples)

    def record(self, run: ChildRun) -> None:
        self.whole.add(run.wall)
        self.peak_rss.add(run.peak_rss_mb)


def me(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.archive", "--child", *args]


def rate(total: int, seconds: Samples) -> str:
    """Throughput (MB/s) of the median, with the range over the runs."""
    if not seconds:
        return ""
    mbs = Samples([total / MB / s for s in seconds.values])
    return cell(mbs, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="dataset size in GB (1e9 bytes)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each side (>= 3)")
    parser.add_argument("--dir", type=Path, default=None, help="where to generate (local disk)")
    add_server_arguments(parser)
    parser.add_argument("--no-flow", action="store_true", help="skip the flow row")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, *rest = args.child
        if name == "functions":
            child_functions(*rest)
        else:
            child_flow(*rest)
        return

    work = Path(tempfile.mkdtemp(prefix="skyvault-bench-archive-", dir=args.dir))
    sides = {"baseline": Side(), "functions": Side(), "flow": Side()}
    blocks = 0
    try:
        src = work / "dataset"
        files, total = generate(src, int(args.gb * 1e9))
        print(f"dataset: {files} files, {total / MB:.0f} MB in {work}", flush=True)
        lts_root = work / "lts"
        server = contextlib.nullcontext(None) if args.no_flow else prefect_server(args.api_url, args.database)
        with server as api_url:
            env = None
            if api_url:
                env = flow_env(
                    api_url,
                    PREFECT_HOME=str(work / "prefect-client"),
                    SKYVAULT_LTS__ROOT=str(lts_root),
                    SKYVAULT_STORE__ROOT=str(work / "store"),
                    SKYVAULT_SCRATCH_DIR=str(work / "scratch"),
                )
                env.pop("SKYVAULT_CONFIG_FILE", None)
            names = ["baseline", "functions"] + (["flow"] if api_url else [])
            for rep in range(args.reps):
                for name in rotation(names, rep):
                    shutil.rmtree(lts_root, ignore_errors=True)
                    lts_root.mkdir()
                    drop_tree(src)
                    side = sides[name]
                    if name == "baseline":
                        write, verify = run_baseline(src, lts_root)
                        side.write.add(write)
                        side.verify.add(verify)
                        side.whole.add(write + verify)
                        line = f"write {write:.1f} s, verify {verify:.1f} s"
                    elif name == "functions":
                        run = run_child(me("functions", str(src), str(lts_root)))
                        report = run.report()
                        side.record(run)
                        side.write.add(report["write"])
                        side.verify.add(report["verify"])
                        side.call.add(report["write"] + report["verify"])
                        blocks = report["blocks"]
                        line = (
                            f"write {report['write']:.1f} s, verify {report['verify']:.1f} s,"
                            f" process {run.wall:.1f} s"
                        )
                    else:
                        run = run_child(me("flow", str(src)), env=env)
                        side.record(run)
                        side.call.add(run.report()["call"])
                        line = f"flow {side.call.values[-1]:.1f} s, process {run.wall:.1f} s"
                    print(f"  rep {rep + 1} {name:9s} {line}", flush=True)
        shutil.rmtree(lts_root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base, fun, flow = sides["baseline"], sides["functions"], sides["flow"]
    header = ["row", "what it measures", "write s", "verify s", "total s", "MB/s"]
    rows = [
        [
            "baseline (openssl)",
            f"`tar -cf - DIR | tee LTS/x.tar | {OPENSSL}`; `sync`; drop cache; `{OPENSSL} LTS/x.tar`",
            cell(base.write, 1),
            cell(base.verify, 1),
            cell(base.whole, 1),
            rate(total, base.whole),
        ],
        [
            "in-process: skyvault functions",
            f"list, plan ({blocks} datablock), space check, `write_datablock`, `verify_datablock`, manifest",
            cell(fun.write, 1),
            cell(fun.verify, 1),
            cell(fun.call, 1),
            rate(total, fun.call),
        ],
        [
            "whole process: skyvault functions",
            "`python` importing skyvault, then the calls above",
            "",
            "",
            cell(fun.whole, 1),
            rate(total, fun.whole),
        ],
    ]
    if flow.call:
        rows += [
            [
                "in-process: `archive` flow",
                "`skyvault archive bench --source-dir DIR --keep-landing` (its `main`), through the "
                "Prefect server",
                "",
                "",
                cell(flow.call, 1),
                rate(total, flow.call),
            ],
            [
                "whole process: `archive` flow",
                "the same command as a fresh process (Python start-up, imports)",
                "",
                "",
                cell(flow.whole, 1),
                rate(total, flow.whole),
            ],
        ]
    ratios = [
        ["skyvault functions (in-process) / baseline, throughput", ratio(base.whole, fun.call)],
        ["skyvault functions (whole process) / baseline, throughput", ratio(base.whole, fun.whole)],
    ]
    if flow.call:
        ratios += [
            ["`archive` flow (in-process) / baseline, throughput", ratio(base.whole, flow.call)],
            ["`archive` flow (whole process) / baseline, throughput", ratio(base.whole, flow.whole)],
        ]
    command = "uv run --frozen python -m bench.archive" + "".join(f" {a}" for a in sys.argv[1:])
    text = "\n".join(
        [
            f"Command: `{command}`",
            "",
            f"Archive of {files} files, {total / MB:.0f} MB (random, mixed sizes) to a local LTS folder "
            f"on the same disk, write + uncached verification read. Median (min-max) of {args.reps} "
            f"runs per side, in rotating order; {machine_line()}.",
            "",
            markdown_table(header, rows, numeric_from=2),
            "",
            markdown_table(["ratio (medians; range of paired runs)", "value"], ratios),
        ]
    )
    write_report("archive", text)


if __name__ == "__main__":
    main()

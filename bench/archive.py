"""Archive benchmark: skyvault's datablock write + uncached verification against tar | tee | sha256sum.

Generates a dataset of incompressible random files of mixed sizes (a few hundred MB down to a few
KB, >= 2 GB in total by default) on local disk, then, in one run and for each repetition:

* baseline: ``tar -cf - DIR | tee LTS/x.tar | sha256sum``, ``sync LTS/x.tar``, the page cache of
  ``x.tar`` dropped, then ``sha256sum LTS/x.tar`` (the verification read) and the two digests
  compared;
* skyvault: list the folder, plan datablocks (the default target, so one block like the baseline),
  check free space, stream the block to LTS while hashing the tar and every member, fsync, read it
  back with its page cache dropped and check the tar and every member checksum, write the manifest.

Before each side the page cache of every source file is dropped, so both read the dataset from the
device. Throughput is dataset bytes / wall seconds. Prints a markdown table with both throughputs
and the skyvault/baseline ratio and writes it to ``bench/out/archive.md``. For reference the
baseline also runs with ``openssl dgst -sha256`` (hardware SHA extensions) in place of
``sha256sum``; the ratio on that line is skyvault / that pipeline. The generated files are
removed at the end.

Run: ``uv run --frozen python -m bench.archive [--gb 2.2] [--reps 2] [--dir /var/tmp]``
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from skyvault.archive.lts import (
    build_manifest,
    ensure_free_space,
    verify_datablock,
    write_datablock,
    write_manifest,
)
from skyvault.archive.packing import dataset_source, list_dataset, plan_datablocks
from skyvault.config.settings import LtsSettings, StoreSettings

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "archive.md"
MB = 1_000_000
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


def run_baseline(src: Path, lts: Path, hasher: str = "sha256sum") -> tuple[float, float]:
    """Wall seconds of (write + sync, verification read); ``hasher`` prints the hex digest first."""
    lts.mkdir(parents=True, exist_ok=True)
    tar = lts / "x.tar"
    drop_tree(src)
    t0 = time.perf_counter()
    first = subprocess.run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            f'tar -cf - -C "{src.parent}" "{src.name}" | tee "{tar}" | {hasher}',
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[0]
    subprocess.run(["sync", str(tar)], check=True)
    t1 = time.perf_counter()
    drop_cache(tar)
    second = subprocess.run(
        ["bash", "-c", f'{hasher} < "{tar}"'], check=True, capture_output=True, text=True
    ).stdout.split()[0]
    t2 = time.perf_counter()
    if first != second:
        raise SystemExit(f"baseline verification failed: {first} != {second}")
    shutil.rmtree(lts)
    return t1 - t0, t2 - t1


def run_skyvault(src: Path, lts_root: Path) -> tuple[float, float, int]:
    """Wall seconds of (list + plan + space check + write, verification + manifest), and blocks."""
    lts = LtsSettings(root=lts_root)
    store = StoreSettings(root=lts_root.parent / "unused-store")
    drop_tree(src)
    t0 = time.perf_counter()
    source = dataset_source("bench", source_dir=src)
    plan = plan_datablocks("bench", list_dataset(source, store), lts.datablock_bytes)
    ensure_free_space(lts, "bench", sum(b.size for b in plan))
    written = [write_datablock(b, source, store, lts) for b in plan]
    t1 = time.perf_counter()
    blocks = [verify_datablock(lts, "bench", b) for b in written]
    write_manifest(lts, build_manifest(source, lts, blocks))
    t2 = time.perf_counter()
    shutil.rmtree(lts_root)
    return t1 - t0, t2 - t1, len(plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.2, help="dataset size in GB (1e9 bytes)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to generate (local disk)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="skyvault-bench-archive-", dir=args.dir))
    try:
        src = work / "dataset"
        files, total = generate(src, int(args.gb * 1e9))
        print(f"dataset: {files} files, {total / MB:.0f} MB in {work}")
        runs: dict[str, list[tuple[float, float]]] = {"baseline": [], "skyvault": [], "openssl": []}
        blocks = 0
        for rep in range(args.reps):
            order = ["baseline", "skyvault", "openssl"]
            for side in order if rep % 2 == 0 else order[::-1]:
                if side == "baseline":
                    phases = run_baseline(src, work / "lts-baseline")
                elif side == "openssl":
                    phases = run_baseline(src, work / "lts-openssl", OPENSSL)
                else:
                    *two, blocks = run_skyvault(src, work / "lts-skyvault")
                    phases = (two[0], two[1])
                runs[side].append(phases)
                print(
                    f"  rep {rep + 1} {side:9s} {total / MB / sum(phases):7.1f} MB/s "
                    f"(write {phases[0]:.1f} s, verify {phases[1]:.1f} s)"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(side: str, phase: int | None = None) -> float:
        return statistics.median(sum(r) if phase is None else r[phase] for r in runs[side])

    base_mbs = total / MB / median("baseline")
    sky_mbs = total / MB / median("skyvault")
    ssl_mbs = total / MB / median("openssl")
    table = "\n".join(
        [
            f"Archive of {files} files, {total / MB:.0f} MB (random, mixed sizes) to a local LTS folder, "
            f"write + uncached verification read, median of {args.reps} run(s) "
            f"({os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}).",
            "",
            "| pipeline | write s | verify s | MB/s | ratio |",
            "|---|---:|---:|---:|---:|",
            f"| `tar -cf - DIR \\| tee LTS/x.tar \\| sha256sum`; `sync`; drop cache; `sha256sum LTS/x.tar` "
            f"| {median('baseline', 0):.1f} | {median('baseline', 1):.1f} | {base_mbs:.1f} | 1.00 |",
            f"| skyvault `write_datablock` + `verify_datablock` ({blocks} block(s), tar + member sha256s) "
            f"| {median('skyvault', 0):.1f} | {median('skyvault', 1):.1f} | {sky_mbs:.1f} "
            f"| {sky_mbs / base_mbs:.2f} |",
            f"| for reference: the baseline with `{OPENSSL}` in place of `sha256sum` "
            f"| {median('openssl', 0):.1f} | {median('openssl', 1):.1f} | {ssl_mbs:.1f} "
            f"| {sky_mbs / ssl_mbs:.2f} |",
            "",
            "Command: `uv run --frozen python -m bench.archive"
            + (f" --gb {args.gb}" if args.gb != 2.2 else "")
            + (f" --reps {args.reps}" if args.reps != 2 else "")
            + "`",
        ]
    )
    print()
    print(table)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(table + "\n")


if __name__ == "__main__":
    main()

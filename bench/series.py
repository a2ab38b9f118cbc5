"""Time-series benchmark: sample ingest vs a plain COPY, the reduction vs pandas, cached vs live reads.

    uv run --frozen python -m bench.series [--samples 10000000] [--duplicates 0.2] [--reps 3]
        [--nodes 100] [--file-hours 6] [--database sqlite|postgres | --api-url URL] [--no-read]

Generates CSV sample files for ``--nodes`` nodes at a 1-minute cadence (each node at its own
second of the minute, a few seconds of jitter) holding ``--samples`` rows in all: the distinct
samples in one file per ``--file-hours`` of all nodes (a gateway's upload), plus re-sent files
(the same rows as a window of ``--file-hours`` starting at a random minute, so overlapping two
uploads) making up the ``--duplicates`` share of the rows. They land under
``landing/samples/bench/`` of a local object store.

**Ingest.** A private PostgreSQL cluster holds the sample databases; each run writes into a fresh
database holding skyvault's sample tables (``series_samples``: primary key (node, ts), index on
(source, ts)). In every repetition, in a rotating order (each side takes each position), each side
a fresh process:

* ``ingest-samples flow``: ``skyvault ingest-samples bench --no-seed``, the command a user runs,
  through a running Prefect server (one started here on 127.0.0.1, on SQLite or with
  ``--database postgres`` on PostgreSQL, unless ``--api-url``): list the files, then per file one
  ``ingest-sample-file`` task (read, hash, parse and validate every row, COPY into a temporary
  table, ``INSERT ... SELECT DISTINCT ON ... ON CONFLICT DO NOTHING``, record the file);
* ``skyvault functions``: the same functions in a plain loop, no Prefect
  (``list_sample_files``, then ``ingest_sample_file`` per file);
* ``psql \\copy``: the reference, ``\\copy series_samples FROM distinct.csv (FORMAT csv)``: the
  distinct rows, deduplicated beforehand, in one COPY into the same table;
* ``psycopg COPY``: the same file streamed through psycopg's ``COPY ... FROM STDIN`` (in-process
  counterpart of ``psql``).

After every run the bench checks that the database holds exactly the distinct samples (count and
the sum of their times) and fails otherwise. Rows/s is distinct rows stored / seconds, the same
numerator on every side. Skyvault's and psycopg's children report the wall time of their calls
(in-process); the parent measures whole processes.

**Reduction.** The distinct samples that enter blocks (statuses M and R) as arrays in memory,
reduced to 60 s bins (min / mean / max / count per node and variable): skyvault's
``reduce_samples`` in one call per year (level ``60 s | yearly``) and per daily block (``60 s |
daily``, the default level; each day's samples sliced beforehand, as the database returns them)
against pandas ``df.groupby("node").resample("60s", on="time")[variables].agg(["min", "mean",
"max", "count"])`` on a DataFrame of the same columns. One fresh process per repetition runs the
three in a rotating order and checks that they give the same bins and statistics (means to 1e-12
relative) before their times count.

**Read** (``--no-read`` leaves it out). The distinct samples, ingested once more with the
ingest functions into a database of their own, behind source ``bench`` configured (a config file,
read by every child and the gateway alike) with the one cache level ``1 h | monthly``. The range
read is the calendar month of the first samples when they cover it whole (January 2026; with the
defaults the samples span 55 days), else the whole hours they cover from that month's start (the
report says which). That month's block is built once with ``seed_blocks`` (untimed), and checked
against the generated samples: as many (node, hour) rows and sample counts as they hold in the
range. Between sides the block file is moved out of the store and back (untimed), so a cached
side always finds it and a live side never does; each read's answer is checked for that (no
period served live, or the month served live and reported missing) and against the cached
answer (same (node, bin) rows, min/max/count exactly, means to 1e-9 relative) before its time
counts. Sides, at resolution 3600 s:

* ``cached read (function)`` / ``live read (function)``: ``read_series`` in a fresh process per
  repetition, after one untimed read of each state, the two in a rotating order;
* ``cached read (gateway)`` / ``live read (gateway)``: ``GET /series/bench?start=&end=&resolution=
  3600&format=json`` to ``python -m skyvault.gateway.app`` on a free loopback port, timed by an
  httpx client on a kept-alive connection to the whole body, after one untimed request of each
  state. A live request also starts (or finds, by its idempotency key) the
  ``seed-series/on-request`` run, registered on a work pool no worker polls: the run stays
  Scheduled and the block absent, which the bench checks after every live request.

Each repetition runs the function pair and the gateway pair in a rotating order. Rows/s is the
answer's (node, bin) rows / s, the same numerator on every side.

The tables go to ``bench/out/series.md`` and stdout; the generated files and databases are
removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    ChildRun,
    Samples,
    add_server_arguments,
    cell,
    create_database,
    drop_database,
    flow_env,
    machine_line,
    markdown_table,
    postgres_cluster,
    prefect_server,
    ratio,
    rotation,
    run_child,
    server_label,
    write_report,
)

SOURCE = "bench"
#: 2026-01-01T00:01:00Z: the first minute's samples (jitter included) stay in 2026.
START_S = 1767225660
VARIABLES = ("co2_ppm", "temperature_celsius", "rel_humidity_percent")
STATUSES = ("M", "R", "E")
CSV_HEADER = "node,timestamp_s,co2_ppm,temperature_celsius,rel_humidity_percent,status\n"
COPY_HEADER = "node,ts,source,co2_ppm,temperature_celsius,rel_humidity_percent,status\n"


# --- the samples ----------------------------------------------------------------------------------


def distinct_samples(count: int, nodes: int, seed: int = 7) -> dict[str, Any]:
    """``count`` distinct samples, minute by minute, every node each minute: numpy columns.

    ``node`` is the node's index into ``node_ids``; ``ts`` is epoch seconds: the minute, the node's
    own second of the minute and up to 4 s of jitter either way (so a few 60 s bins hold two samples
    of a node and a few none); ``status`` indexes :data:`STATUSES`.
    """
    import uuid

    import numpy as np

    rng = np.random.default_rng(seed)
    node_ids = [str(uuid.UUID(int=int(rng.integers(0, 2**62)) << 64 | n, version=4)) for n in range(nodes)]
    i = np.arange(count, dtype=np.int64)
    minute, node = np.divmod(i, nodes)
    second = (node * 37) % 60 + rng.integers(-4, 5, count)
    ts = START_S + minute * 60 + second
    day = 2 * np.pi * ((minute % 1440) / 1440.0) + node * 0.1
    co2 = np.clip(np.round(600 + 200 * np.sin(day) + rng.normal(0, 25, count), 1), 350, 5000)
    temperature = np.clip(np.round(21 + 3 * np.sin(day - 1) + rng.normal(0, 0.3, count), 1), -20, 40)
    humidity = np.clip(np.round(45 + 10 * np.cos(day) + rng.normal(0, 2, count), 1), 0, 100)
    status = rng.choice(len(STATUSES), count, p=[0.97, 0.02, 0.01])
    return {
        "node_ids": node_ids,
        "node": node,
        "ts": ts,
        "co2_ppm": co2,
        "temperature_celsius": temperature,
        "rel_humidity_percent": humidity,
        "status": status,
    }


def plan_files(
    distinct: int, duplicates: int, per_file: int, nodes: int, seed: int = 11
) -> list[tuple[int, int, bool]]:
    """(first row, end row, re-sent) of every file: the uploads, then re-sent overlapping windows."""
    import numpy as np

    files = [(a, min(a + per_file, distinct), False) for a in range(0, distinct, per_file)]
    rng = np.random.default_rng(seed)
    left = duplicates
    while left > 0:
        length = min(per_file, left, distinct)
        first = int(rng.integers(0, (distinct - length) // nodes + 1)) * nodes
        files.append((first, first + length, True))
        left -= length
    return files


def child_prepare(work: str, samples: str, duplicates: str, nodes: str, file_hours: str) -> None:
    """Write the sample files and the deduplicated COPY file; print what they hold."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.csv as pacsv

    total, share, n_nodes = int(samples), float(duplicates), int(nodes)
    distinct = round(total * (1 - share))
    data = distinct_samples(distinct, n_nodes)
    node_text = pa.array(data["node_ids"]).take(pa.array(data["node"]))
    table = pa.table(
        {
            "node": node_text,
            "timestamp_s": data["ts"],
            **{v: data[v] for v in VARIABLES},
            "status": pa.array(STATUSES).take(pa.array(data["status"])),
        }
    )
    landing = Path(work) / "store" / "landing" / "samples" / SOURCE
    landing.mkdir(parents=True, exist_ok=True)
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    files = plan_files(distinct, total - distinct, n_nodes * 60 * int(file_hours), n_nodes)
    for first, end, resent in files:
        when = dt.datetime.fromtimestamp(START_S + (first // n_nodes) * 60, dt.UTC)
        name = f"gw-{when:%Y%m%dT%H%M}Z{'-resent' if resent else ''}.csv"
        with (landing / name).open("wb") as f:
            f.write(CSV_HEADER.encode())
            pacsv.write_csv(table.slice(first, end - first), f, options)
    copy_table = pa.table(
        {
            "node": node_text,
            "ts": data["ts"],
            "source": pa.array([SOURCE]).take(pa.array([0] * distinct)),
            **{v: data[v] for v in VARIABLES},
            "status": table["status"],
        }
    )
    with (Path(work) / "distinct.csv").open("wb") as f:
        f.write(COPY_HEADER.encode())
        pacsv.write_csv(copy_table, f, options)
    rows = sum(end - first for first, end, _ in files)
    print(
        json.dumps(
            {
                "files": len(files),
                "rows": rows,
                "distinct": distinct,
                "ts_sum": int(data["ts"].sum()),
                "ts_min": int(data["ts"].min()),
                "ts_max": int(data["ts"].max()),
            }
        )
    )


# --- ingest children ------------------------------------------------------------------------------


def child_schema(dsn: str) -> None:
    """Create skyvault's sample tables in the empty database ``dsn``."""
    from skyvault.series.database import PostgresSampleDatabase

    PostgresSampleDatabase(dsn, None, 30).close()


def child_functions() -> None:
    """The ingest functions in a plain loop (settings from ``SKYVAULT_*``), timed from inside."""
    from skyvault.config.settings import get_settings
    from skyvault.series.ingest import ingest_sample_file, list_sample_files

    settings = get_settings()
    start = time.perf_counter()
    results = [
        ingest_sample_file(SOURCE, key, settings.series, settings.store)
        for key in list_sample_files(SOURCE, settings.series, settings.store)
    ]
    call = time.perf_counter() - start
    inserted = sum(r.inserted for r in results)
    print(json.dumps({"call": call, "inserted": inserted, "duplicate": sum(r.duplicate for r in results)}))


def child_flow() -> None:
    """``skyvault ingest-samples bench --no-seed`` (the command's ``main``), timed from inside."""
    from skyvault.cli import main

    start = time.perf_counter()
    code = main(["ingest-samples", SOURCE, "--no-seed"])
    call = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"skyvault ingest-samples exited with {code}")
    print(json.dumps({"call": call}))


def child_psycopg(dsn: str, path: str) -> None:
    """The deduplicated file through psycopg's ``COPY ... FROM STDIN``, timed from inside."""
    import psycopg

    start = time.perf_counter()
    with (
        psycopg.connect(dsn) as conn,
        conn.cursor() as cur,
        open(path, "rb") as f,
        cur.copy("COPY series_samples FROM STDIN (FORMAT csv, HEADER true)") as copy,
    ):
        while block := f.read(1 << 20):
            copy.write(block)
    print(json.dumps({"call": time.perf_counter() - start}))


# --- the reduction child --------------------------------------------------------------------------


def child_reduce(distinct: str, nodes: str, rep: str) -> None:
    """skyvault's reduce_samples (one call per year, per daily block) and pandas, checked equal."""
    import datetime as dt

    import numpy as np
    import pandas as pd

    from skyvault.config.settings import CacheLevel
    from skyvault.series.database import SampleArrays
    from skyvault.series.reduce import ReducedSeries, periods_between, reduce_samples

    data = distinct_samples(int(distinct), int(nodes))
    keep = data["status"] < 2  # M and R: what seeding reads
    node = np.array(data["node_ids"], dtype="U36")[data["node"][keep]]
    ts = data["ts"][keep]
    values = {v: data[v][keep] for v in VARIABLES}
    arrays = SampleArrays(node=node, ts=ts, values=values)
    first = dt.datetime.fromtimestamp(int(ts.min()), dt.UTC)
    last = dt.datetime.fromtimestamp(int(ts.max()) + 1, dt.UTC)
    yearly = CacheLevel(resolution_seconds=60, period="yearly")
    daily = CacheLevel(resolution_seconds=60, period="daily")
    years = periods_between(first, last, "yearly")
    days = periods_between(first, last, "daily")
    by_day = []  # each day's samples ordered by node and time, as read_samples returns them
    for day in days:
        start = int(day.timestamp())
        inside = np.flatnonzero((ts >= start) & (ts < start + 86400))
        order = inside[np.lexsort((ts[inside], node[inside]))]
        by_day.append(
            SampleArrays(node=node[order], ts=ts[order], values={v: values[v][order] for v in VARIABLES})
        )
    frame = pd.DataFrame(
        {"node": node, **{v: values[v] for v in VARIABLES}}, index=pd.to_datetime(ts, unit="s").rename("time")
    )
    del data
    stats = ("min", "mean", "max", "count")

    def one_call() -> list[ReducedSeries]:
        return [reduce_samples(arrays, SOURCE, yearly, year) for year in years]

    def per_day() -> list[ReducedSeries]:
        return [reduce_samples(part, SOURCE, daily, day) for part, day in zip(by_day, days, strict=True)]

    def pandas_resample() -> Any:
        resampler = frame.groupby("node")[list(VARIABLES)].resample("60s")
        return pd.concat({s: getattr(resampler, s)() for s in stats}, axis=1).swaplevel(axis=1)

    def pandas_grouper() -> Any:
        keys = ["node", pd.Grouper(level="time", freq="60s")]
        return frame.groupby(keys)[list(VARIABLES)].agg(list(stats))

    sides = {
        "skyvault one call": one_call,
        "skyvault per day": per_day,
        "pandas resample": pandas_resample,
        "pandas Grouper": pandas_grouper,
    }
    seconds: dict[str, float] = {}
    results: dict[str, Any] = {}
    for name in rotation(list(sides), int(rep)):
        start_t = time.perf_counter()
        results[name] = sides[name]()
        seconds[name] = time.perf_counter() - start_t

    def columns(name: str) -> dict[str, Any]:
        result = results[name]
        if name.startswith("pandas"):
            result = result[result[(VARIABLES[0], "count")] > 0]  # resample keeps empty bins
            return {
                "node": result.index.get_level_values(0).to_numpy(dtype="U36"),
                "bin_start": result.index.get_level_values(1)
                .to_numpy(dtype="datetime64[s]")
                .astype(np.int64),
                **{f"{v}_{s}": result[(v, s)].to_numpy() for v in VARIABLES for s in stats},
            }
        joined = {
            "node": np.concatenate([p.node for p in result]),
            "bin_start": np.concatenate([p.bin_start for p in result]),
            **{f"{v}_{s}": np.concatenate([p.stats[v][s] for p in result]) for v in VARIABLES for s in stats},
        }
        order = np.lexsort((joined["bin_start"], joined["node"]))  # blocks follow each other in time
        return {column: values[order] for column, values in joined.items()}

    expected = columns("pandas resample")
    for name in sides:
        got = columns(name)
        for column, want in expected.items():
            same = len(got[column]) == len(want) and (
                np.allclose(got[column], want, rtol=1e-12, atol=0)
                if column.endswith("_mean")
                else np.array_equal(got[column], want)
            )
            if not same:
                raise SystemExit(f"{name}: column {column} differs from pandas resample")
    bins = len(expected["node"])
    print(
        json.dumps(
            {
                "seconds": seconds,
                "samples": len(arrays),
                "bins": bins,
                "days": len(days),
            }
        )
    )


# --- the read children ----------------------------------------------------------------------------

#: The cache level the read section configures and the resolution it asks for (that level's).
READ_LEVEL = "1 h | monthly"
READ_RESOLUTION = 3600
#: A work pool no worker polls: the ``seed-series`` runs a live gateway read starts stay Scheduled.
READ_POOL = "bench-series-unpolled"
FUNCTION_SIDES = ("cached read (function)", "live read (function)")
GATEWAY_SIDES = ("cached read (gateway)", "live read (gateway)")
READ_SIDES = (*FUNCTION_SIDES, *GATEWAY_SIDES)


def place_block(block: Path, aside: Path, present: bool) -> None:
    """Put the seeded block into the store (``present``) or move it aside, outside the store; check it."""
    src, dest = (aside, block) if present else (block, aside)
    if src.exists():
        os.replace(src, dest)
    if block.exists() != present or aside.exists() == present:
        raise SystemExit(f"the block {block} is {'absent' if present else 'still there'}")


def read_columns(read: Any) -> dict[str, Any]:
    """A :class:`~skyvault.series.read.SeriesRead` as columns named like its rows."""
    from skyvault.series.reduce import STATISTICS

    return {
        "node": read.node,
        "bin_start": read.bin_start,
        **{f"{v}_{s}": read.stats[v][s] for v in VARIABLES for s in STATISTICS},
    }


def same_read(want: Any, got: Any, name: str) -> None:
    """Fail unless ``got`` has ``want``'s (node, bin) rows, min/max/count exactly, means to 1e-9."""
    import numpy as np

    expected, found = read_columns(want), read_columns(got)
    for column, values in expected.items():
        same = len(found[column]) == len(values) and (
            np.allclose(found[column], values, rtol=1e-9, atol=0, equal_nan=True)
            if column.endswith("_mean")
            else np.array_equal(found[column], values, equal_nan=column not in ("node", "bin_start"))
        )
        if not same:
            raise SystemExit(f"{name}: column {column} differs from the cached read")


def check_served(read: Any, cached: bool, period: int, name: str) -> None:
    """Fail unless a cached read found the block and a live one reduced (and reported) the period."""
    live = [int(p.timestamp()) for p in read.live]
    missing = [int(p.timestamp()) for p in read.missing]
    want = ([], []) if cached else ([period], [period])
    if (live, missing) != want:
        raise SystemExit(f"{name}: periods served live {live}, reported missing {missing}; expected {want}")


def child_read_setup(start: str, end: str, period: str, distinct: str, nodes: str) -> None:
    """Seed the period's block, check a read of it against the samples, register ``seed-series``."""
    import datetime as dt

    import numpy as np
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import RunnerDeployment

    from skyvault.config.settings import CacheLevel, get_settings
    from skyvault.flows.series import seed_series
    from skyvault.series.ingest import seed_blocks
    from skyvault.series.read import read_series
    from skyvault.storage.store import open_store

    settings = get_settings()
    lo, hi = int(start), int(end)
    level = CacheLevel.model_validate(READ_LEVEL)
    when = dt.datetime.fromtimestamp(int(period), dt.UTC)
    blocks = seed_blocks(SOURCE, level.name, [when], settings.series, settings.store, settings.locks)
    if len(blocks) != 1:
        raise SystemExit(f"seeding {when.isoformat()} at {level} wrote {len(blocks)} blocks")
    read = read_series(
        SOURCE,
        dt.datetime.fromtimestamp(lo, dt.UTC),
        dt.datetime.fromtimestamp(hi, dt.UTC),
        READ_RESOLUTION,
        settings.series,
        open_store(settings.store),
    )
    check_served(read, True, int(period), "the read after seeding")
    # independently of skyvault: the samples that enter blocks in the range, and their (node, hour)s
    data = distinct_samples(int(distinct), int(nodes))
    keep = (data["status"] < 2) & (data["ts"] >= lo) & (data["ts"] < hi)
    pairs = np.unique(np.stack([data["node"][keep], data["ts"][keep] // READ_RESOLUTION]), axis=1)
    for variable in VARIABLES:
        counted = int(read.stats[variable]["count"].sum())
        if counted != int(keep.sum()) or len(read) != pairs.shape[1]:
            raise SystemExit(
                f"the cached read holds {len(read)} (node, bin) rows counting {counted} {variable} samples; "
                f"the samples give {pairs.shape[1]} rows and {int(keep.sum())} samples"
            )
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=READ_POOL, type="process"), overwrite=True)
    deployment = seed_series.to_deployment(name="on-request", work_pool_name=READ_POOL)
    if not isinstance(deployment, RunnerDeployment):
        raise SystemExit("seed-series/on-request: not a runner deployment")
    deployment.apply()
    print(
        json.dumps(
            {
                "key": blocks[0].key,
                "block_rows": blocks[0].rows,
                "rows": len(read),
                "samples": int(keep.sum()),
            }
        )
    )


def child_read(start: str, end: str, period: str, block: str, aside: str, rep: str) -> None:
    """The two function sides in a rotating order after an untimed read of each; answers checked equal."""
    import datetime as dt

    from skyvault.config.settings import get_settings
    from skyvault.series.read import SeriesRead, read_series
    from skyvault.storage.store import open_store

    settings = get_settings()
    store = open_store(settings.store)
    first, last = (dt.datetime.fromtimestamp(int(t), dt.UTC) for t in (start, end))
    where = Path(block), Path(aside)

    def read() -> SeriesRead:
        return read_series(SOURCE, first, last, READ_RESOLUTION, settings.series, store)

    place_block(*where, present=True)
    cached = read()
    check_served(cached, True, int(period), "untimed cached read")
    place_block(*where, present=False)
    live = read()
    check_served(live, False, int(period), "untimed live read")
    same_read(cached, live, "untimed live read")
    seconds: dict[str, float] = {}
    for name in rotation(FUNCTION_SIDES, int(rep)):
        present = name.startswith("cached")
        place_block(*where, present=present)
        start_t = time.perf_counter()
        got = read()
        seconds[name] = time.perf_counter() - start_t
        check_served(got, present, int(period), name)
        same_read(cached, got, name)
    place_block(*where, present=True)
    print(json.dumps({"seconds": seconds, "rows": len(cached)}))


# --- the parent -----------------------------------------------------------------------------------


@dataclass
class Side:
    whole: Samples = field(default_factory=Samples)
    call: Samples = field(default_factory=Samples)
    rss: Samples = field(default_factory=Samples)

    def record(self, run: ChildRun, call: float | None) -> None:
        self.whole.add(run.wall)
        self.rss.add(run.peak_rss_mb)
        if call is not None:
            self.call.add(call)


def me(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.series", "--child", *args]


def stored(dsn: str) -> tuple[int, int]:
    """Rows in ``series_samples`` and the sum of their times."""
    out = subprocess.run(
        ["psql", dsn, "-tAc", "SELECT count(*), coalesce(sum(ts), 0) FROM series_samples"],
        check=True,
        capture_output=True,
        text=True,
    )
    count, total = out.stdout.strip().split("|")
    return int(count), int(total)


def per_second(rows: int, seconds: Samples) -> Samples:
    return Samples([rows / s for s in seconds.values])


PSQL = "psql \\copy"
INGEST_SIDES = ("ingest-samples flow", "skyvault functions", PSQL, "psycopg COPY")
REDUCE_SIDES = ("skyvault one call", "skyvault per day", "pandas resample", "pandas Grouper")


def bench_ingest(
    args: argparse.Namespace, work: Path, info: dict[str, Any], port: int, api_url: str
) -> dict[str, Side]:
    sides = {name: Side() for name in INGEST_SIDES}
    distinct_csv = work / "distinct.csv"
    base_env = flow_env(
        api_url,
        PREFECT_HOME=str(work / "prefect-client"),
        SKYVAULT_STORE__ROOT=str(work / "store"),
        SKYVAULT_SCRATCH_DIR=str(work / "scratch"),
        SKYVAULT_SERIES__DATABASE="postgresql",
        SKYVAULT_SERIES__SOURCES=json.dumps({SOURCE: {}}),
    )
    base_env.pop("SKYVAULT_CONFIG_FILE", None)
    for rep in range(args.reps):
        for name in rotation(INGEST_SIDES, rep):
            database = f"series_{rep}_{INGEST_SIDES.index(name)}"
            dsn = create_database(port, database)
            run_child(me("schema", dsn))
            env = {**base_env, "SKYVAULT_SERIES__DSN": dsn}
            call: float | None = None
            if name == "ingest-samples flow":
                run = run_child(me("flow"), env=env)
                call = run.report()["call"]
            elif name == "skyvault functions":
                run = run_child(me("functions"), env=env)
                report = run.report()
                call = report["call"]
                if report["duplicate"] != info["rows"] - info["distinct"]:
                    raise SystemExit(f"{name}: {report['duplicate']} duplicates reported")
            elif name == PSQL:
                copy = f"\\copy series_samples FROM '{distinct_csv}' WITH (FORMAT csv, HEADER true)"
                run = run_child(["psql", dsn, "-v", "ON_ERROR_STOP=1", "-qc", copy])
            else:
                run = run_child(me("psycopg", dsn, str(distinct_csv)))
                call = run.report()["call"]
            found = stored(dsn)
            if found != (info["distinct"], info["ts_sum"]):
                raise SystemExit(
                    f"{name}: the database holds {found[0]} samples (time sum {found[1]}), "
                    f"expected {info['distinct']} ({info['ts_sum']})"
                )
            drop_database(port, database)
            sides[name].record(run, call)
            print(
                f"  ingest rep {rep + 1} {name:20s} process {run.wall:7.1f} s"
                + (f", call {call:7.1f} s" if call is not None else "")
                + f", {info['distinct'] / run.wall:9.0f} rows/s",
                flush=True,
            )
    return sides


def bench_reduce(args: argparse.Namespace, info: dict[str, Any]) -> tuple[dict[str, Samples], dict[str, Any]]:
    seconds = {name: Samples() for name in REDUCE_SIDES}
    report: dict[str, Any] = {}
    for rep in range(args.reps):
        report = run_child(me("reduce", str(info["distinct"]), str(args.nodes), str(rep))).report()
        for name in REDUCE_SIDES:
            seconds[name].add(report["seconds"][name])
        shown = ", ".join(f"{name} {report['seconds'][name]:.2f} s" for name in rotation(REDUCE_SIDES, rep))
        print(f"  reduce rep {rep + 1}: {shown} (results equal)", flush=True)
    return seconds, report


@dataclass(frozen=True)
class ReadRange:
    """The range the read section asks for: ``[start, end)`` (epoch s) inside the month at ``period``."""

    start: int
    end: int
    period: int
    whole_month: bool

    @staticmethod
    def of(info: dict[str, Any]) -> ReadRange:
        """The month of the first samples when they cover it, else its whole hours they cover."""
        import datetime as dt

        first = dt.datetime.fromtimestamp(info["ts_min"], dt.UTC)
        month = dt.datetime(first.year, first.month, 1, tzinfo=dt.UTC)
        following = dt.datetime(first.year + first.month // 12, first.month % 12 + 1, 1, tzinfo=dt.UTC)
        start, month_end = int(month.timestamp()), int(following.timestamp())
        if info["ts_min"] < start + READ_RESOLUTION and info["ts_max"] >= month_end:
            return ReadRange(start, month_end, start, whole_month=True)
        end = min(month_end, info["ts_max"] // READ_RESOLUTION * READ_RESOLUTION)
        if end <= start:
            raise SystemExit(
                "the samples cover less than one whole hour: raise --samples for the read section"
            )
        return ReadRange(start, end, start, whole_month=False)

    def iso(self, when: int) -> str:
        import datetime as dt

        return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    @property
    def text(self) -> str:
        days = (self.end - self.start) / 86400
        return f"{self.iso(self.start)}..{self.iso(self.end)} ({days:.2f} days)"


@dataclass
class ReadResult:
    range: ReadRange
    setup: dict[str, Any]
    block_bytes: int
    seconds: dict[str, Samples]
    seed_runs: set[str]


def json_rows_equal(want: dict[str, Any], got: dict[str, Any], name: str) -> None:
    """Fail unless two JSON answers have the same rows: min/max/count exactly, means to 1e-9 relative."""
    import math

    columns = want["columns"]
    if got["columns"] != columns or len(got["rows"]) != len(want["rows"]):
        raise SystemExit(f"{name}: {len(got['rows'])} rows of {got['columns']}, expected {len(want['rows'])}")
    means = [i for i, c in enumerate(columns) if c.endswith("_mean")]
    exact = [i for i in range(len(columns)) if i not in means]
    for a, b in zip(want["rows"], got["rows"], strict=True):
        if any(a[i] != b[i] for i in exact) or not all(
            math.isclose(a[i], b[i], rel_tol=1e-9, abs_tol=0) for i in means
        ):
            raise SystemExit(f"{name}: row {b} differs from the cached answer's {a}")


def gateway_get(client: Any, span: ReadRange) -> tuple[float, dict[str, Any]]:
    """``GET /series/bench`` for the range at 1 h as JSON: the seconds to the whole body, the answer."""
    params = {
        "start": span.iso(span.start),
        "end": span.iso(span.end),
        "resolution": str(READ_RESOLUTION),
        "format": "json",
    }
    start = time.perf_counter()
    response = client.get(f"/series/{SOURCE}", params=params)  # reads the whole body
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise SystemExit(f"GET /series/{SOURCE}: HTTP {response.status_code}: {response.text[:2000]}")
    answer: dict[str, Any] = response.json()
    return seconds, answer


def check_answer(answer: dict[str, Any], cached: bool, span: ReadRange, block: Path, name: str) -> str | None:
    """Fail unless a cached answer came from the block and a live one reduced the period and started
    a seeding run (the block still absent after it); the run's id."""
    period = [span.iso(span.period)]
    want = ([], []) if cached else (period, period)
    found = (answer["live_periods"], answer["missing_periods"])
    if found != want:
        raise SystemExit(f"{name}: periods served live and missing {found}, expected {want}")
    if cached:
        return None
    seeding = answer.get("seeding") or {}
    if "run_id" not in seeding:
        raise SystemExit(f"{name}: the gateway started no seed-series run: {seeding}")
    if block.exists():
        raise SystemExit(f"{name}: the block {block} appeared (a worker ran the seeding?)")
    return str(seeding["run_id"])


def bench_read(
    args: argparse.Namespace, work: Path, info: dict[str, Any], port: int, api_url: str
) -> ReadResult:
    """Seed the block, then time cached and live reads through the functions and the gateway."""
    import httpx

    from bench.gateway import TOKEN, USER, gateway_process

    span = ReadRange.of(info)
    root = work / "read"
    root.mkdir()
    dsn = create_database(port, "series_read")
    config = root / "skyvault.yaml"
    body = {
        "scratch_dir": str(work / "scratch"),
        "store": {"kind": "local", "root": str(work / "store")},
        "series": {
            "database": "postgresql",
            "dsn": dsn,
            "sources": {SOURCE: {"cache_levels": [READ_LEVEL]}},
        },
        "gateway": {"username": USER},
    }
    config.write_text(json.dumps(body, indent=2))  # JSON is YAML
    env = {k: v for k, v in flow_env(api_url).items() if not k.startswith("SKYVAULT_")}
    env.update(PREFECT_HOME=str(root / "prefect-client"), SKYVAULT_CONFIG_FILE=str(config))
    run_child(me("schema", dsn))
    run_child(me("functions"), env=env)
    if stored(dsn) != (info["distinct"], info["ts_sum"]):
        raise SystemExit(f"the read section's database does not hold the {info['distinct']} distinct samples")
    setup = run_child(
        me(
            "read-setup",
            str(span.start),
            str(span.end),
            str(span.period),
            str(info["distinct"]),
            str(args.nodes),
        ),
        env=env,
    ).report()
    block = work / "store" / setup["key"]
    aside = root / "block-aside.parquet"
    block_bytes = block.stat().st_size
    print(
        f"read section: {span.text} at {READ_RESOLUTION} s, {setup['rows']} (node, bin) rows from "
        f"{setup['samples']} samples; block {setup['key']} ({block_bytes} bytes)",
        flush=True,
    )
    seconds = {name: Samples() for name in READ_SIDES}
    seed_runs: set[str] = set()
    with (
        gateway_process(root, api_url) as (gateway_url, _),
        httpx.Client(
            base_url=gateway_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600
        ) as client,
    ):
        # untimed: one read of each state, the reference the timed answers are checked against
        place_block(block, aside, present=True)
        _, reference = gateway_get(client, span)
        check_answer(reference, True, span, block, "untimed cached gateway read")
        if len(reference["rows"]) != setup["rows"]:
            raise SystemExit(
                f"the gateway answers {len(reference['rows'])} rows, the function {setup['rows']}"
            )
        place_block(block, aside, present=False)
        _, live = gateway_get(client, span)
        seed_runs.add(check_answer(live, False, span, block, "untimed live gateway read") or "")
        json_rows_equal(reference, live, "untimed live gateway read")
        for rep in range(args.reps):
            for group in rotation(("function", "gateway"), rep):
                if group == "function":
                    report = run_child(
                        me(
                            "read",
                            str(span.start),
                            str(span.end),
                            str(span.period),
                            str(block),
                            str(aside),
                            str(rep),
                        ),
                        env=env,
                    ).report()
                    if report["rows"] != setup["rows"]:
                        raise SystemExit(f"the function read {report['rows']} rows, expected {setup['rows']}")
                    for name in FUNCTION_SIDES:
                        seconds[name].add(report["seconds"][name])
                    continue
                for name in rotation(GATEWAY_SIDES, rep):
                    present = name.startswith("cached")
                    place_block(block, aside, present=present)
                    took, answer = gateway_get(client, span)
                    run_id = check_answer(answer, present, span, block, name)
                    if run_id:
                        seed_runs.add(run_id)
                    json_rows_equal(reference, answer, name)
                    seconds[name].add(took)
            shown = ", ".join(f"{name} {seconds[name].values[-1]:.3f} s" for name in READ_SIDES)
            print(f"  read rep {rep + 1}: {shown} (answers equal)", flush=True)
        place_block(block, aside, present=True)
    seed_runs.discard("")
    return ReadResult(span, setup, block_bytes, seconds, seed_runs)


def render_read(read: ReadResult) -> list[str]:
    span, rows = read.range, read.setup["rows"]
    what = {
        "cached read (function)": "`read_series` at 3600 s, the block in the store: Parquet read, "
        "filter, sort",
        "live read (function)": "`read_series` at 3600 s, no block: the period's samples read from "
        "PostgreSQL and reduced",
        "cached read (gateway)": f"`GET /series/{SOURCE}?...&resolution=3600&format=json`, the block "
        "in the store",
        "live read (gateway)": "the same request, no block (the gateway also starts or finds the "
        "`seed-series/on-request` run)",
    }
    table_rows = [
        [name, what[name], cell(read.seconds[name], 3), cell(per_second(rows, read.seconds[name]), 0)]
        for name in READ_SIDES
    ]
    speed = {name: per_second(rows, s) for name, s in read.seconds.items()}
    covered = (
        "one whole calendar month"
        if span.whole_month
        else "not a whole month: the samples cover only part of it, so the range is the whole hours "
        "they cover from the month's start"
    )
    return [
        f"Read: {span.text} at 1 h ({covered}) from level `{READ_LEVEL}`: {rows} (node, bin) rows from "
        f"{read.setup['samples']} samples (statuses M and R) in a PostgreSQL sample database; the "
        f"month's block {read.setup['block_rows']} rows, {read.block_bytes} bytes of Parquet on a local "
        "store. Every answer checked equal to the cached one (min/max/count exactly, means to 1e-9) "
        "and its state (block found, or period served live and reported missing) before timing counts; "
        f"the live gateway reads started {len(read.seed_runs)} `seed-series` run(s), left Scheduled on a "
        "work pool no worker polls.",
        "",
        markdown_table(["side", "what", "s", "rows/s"], table_rows, numeric_from=2),
        "",
        "- cached / live, function (rows/s, speedup): "
        f"{ratio(speed['cached read (function)'], speed['live read (function)'])}",
        "- cached / live, gateway (rows/s, speedup): "
        f"{ratio(speed['cached read (gateway)'], speed['live read (gateway)'])}",
        "- gateway / function, cached (rows/s): "
        f"{ratio(speed['cached read (gateway)'], speed['cached read (function)'])}",
        "- gateway / function, live (rows/s): "
        f"{ratio(speed['live read (gateway)'], speed['live read (function)'])}",
    ]


def render(
    args: argparse.Namespace,
    info: dict[str, Any],
    ingest: dict[str, Side],
    reduce_seconds: dict[str, Samples],
    reduced: dict[str, Any],
    read: ReadResult | None,
) -> str:
    distinct = info["distinct"]
    label = server_label(args.api_url, args.database)
    what = {
        "ingest-samples flow": f"`skyvault ingest-samples {SOURCE} --no-seed`, Prefect server on {label}",
        "skyvault functions": "`list_sample_files` + `ingest_sample_file` per file, no Prefect",
        PSQL: "`\\copy series_samples FROM distinct.csv (FORMAT csv)`: reference",
        "psycopg COPY": "the same file through psycopg `COPY ... FROM STDIN`",
    }
    rows = []
    for name in INGEST_SIDES:
        side = ingest[name]
        rows.append(
            [
                name,
                what[name],
                str(info["rows"] if name in INGEST_SIDES[:2] else distinct),
                cell(side.call, 1),
                cell(per_second(distinct, side.call), 0),
                cell(side.whole, 1),
                cell(per_second(distinct, side.whole), 0),
                cell(side.rss, 0),
            ]
        )
    speed = {name: per_second(distinct, side.whole) for name, side in ingest.items()}
    calls = {name: per_second(distinct, side.call) for name, side in ingest.items() if side.call}
    reduce_rows = [
        [
            name,
            {
                "skyvault one call": "`reduce_samples` at `60 s | yearly`, one call per year",
                "skyvault per day": f"`reduce_samples` at `60 s | daily`, per block ({reduced['days']})",
                "pandas resample": '`r = df.groupby("node")[vars].resample("60s")`; '
                "`r.min()`, `r.mean()`, `r.max()`, `r.count()`",
                "pandas Grouper": '`df.groupby(["node", pd.Grouper(level="time", freq="60s")])'
                "[vars].agg([min, mean, max, count])`",
            }[name],
            cell(reduce_seconds[name], 2),
            cell(per_second(reduced["samples"], reduce_seconds[name]), 0),
        ]
        for name in REDUCE_SIDES
    ]
    rs = {name: per_second(reduced["samples"], s) for name, s in reduce_seconds.items()}
    return "\n".join(
        [
            "### Time series: sample ingest vs COPY, reduction vs pandas"
            + (", cached vs live reads" if read else ""),
            "",
            f"`python -m bench.series --samples {args.samples} --duplicates {args.duplicates} "
            f"--reps {args.reps} --nodes {args.nodes} --file-hours {args.file_hours}"
            + (f" --database {args.database}" if not args.api_url else " --api-url URL")
            + ("" if read else " --no-read")
            + f"`; {machine_line()}",
            "",
            f"Ingest: {info['files']} CSV files, {info['rows']} rows, {distinct} distinct "
            f"({info['rows'] - distinct} re-sent duplicates); rows/s = distinct rows stored / s.",
            "",
            markdown_table(
                [
                    "side",
                    "what",
                    "rows read",
                    "in-process s",
                    "in-process rows/s",
                    "process s",
                    "process rows/s",
                    "peak RSS MB",
                ],
                rows,
                numeric_from=2,
            ),
            "",
            "- skyvault functions / psycopg COPY (rows/s, in-process): "
            f"{ratio(calls['skyvault functions'], calls['psycopg COPY'])}",
            "- skyvault functions / psql \\copy (rows/s, whole processes): "
            f"{ratio(speed['skyvault functions'], speed[PSQL])}",
            "- ingest-samples flow / psql \\copy (rows/s, whole processes): "
            f"{ratio(speed['ingest-samples flow'], speed[PSQL])}",
            "- ingest-samples flow / skyvault functions (rows/s, in-process): "
            f"{ratio(calls['ingest-samples flow'], calls['skyvault functions'])}",
            "",
            f"Reduction to 60 s bins: {reduced['samples']} samples (statuses M and R) in memory, "
            f"{reduced['bins']} (node, bin) rows; results checked equal before timing counts.",
            "",
            markdown_table(["side", "what", "s", "samples/s"], reduce_rows, numeric_from=2),
            "",
            "- skyvault one call / pandas resample (samples/s): "
            f"{ratio(rs['skyvault one call'], rs['pandas resample'])}",
            "- skyvault one call / pandas Grouper (samples/s): "
            f"{ratio(rs['skyvault one call'], rs['pandas Grouper'])}",
            "- skyvault per day / pandas resample (samples/s): "
            f"{ratio(rs['skyvault per day'], rs['pandas resample'])}",
            "- skyvault per day / pandas Grouper (samples/s): "
            f"{ratio(rs['skyvault per day'], rs['pandas Grouper'])}",
            *(["", *render_read(read)] if read else []),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--samples", type=int, default=10_000_000, help="rows in all the sample files")
    parser.add_argument(
        "--duplicates", type=float, default=0.2, help="share of the rows that are re-sent duplicates"
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each side (>= 3)")
    parser.add_argument("--nodes", type=int, default=100, help="sensor nodes, one sample a minute each")
    parser.add_argument("--file-hours", type=int, default=6, help="hours of all nodes' samples per file")
    parser.add_argument(
        "--read",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time cached against live reads of a month at 1 h (functions and gateway)",
    )
    add_server_arguments(parser)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, *rest = args.child
        children: dict[str, Callable[..., None]] = {
            "prepare": child_prepare,
            "schema": child_schema,
            "functions": child_functions,
            "flow": child_flow,
            "psycopg": child_psycopg,
            "reduce": child_reduce,
            "read-setup": child_read_setup,
            "read": child_read,
        }
        children[name](*rest)
        return
    if not 0 <= args.duplicates < 1:
        parser.error("--duplicates is a share in [0, 1)")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a terminated run still stops its services
    work = Path(tempfile.mkdtemp(prefix="skyvault-bench-series-"))
    os.chmod(work, 0o755)  # the PostgreSQL user must reach its data folder and the COPY file
    try:
        prepared = run_child(
            me(
                "prepare",
                str(work),
                str(args.samples),
                str(args.duplicates),
                str(args.nodes),
                str(args.file_hours),
            )
        )
        info = prepared.report()
        print(
            f"{info['files']} files, {info['rows']} rows, {info['distinct']} distinct, in {work} "
            f"({prepared.wall:.0f} s)",
            flush=True,
        )
        if args.read:
            ReadRange.of(info)  # enough samples for the read section, before the long ingest
        read: ReadResult | None = None
        with contextlib.ExitStack() as stack:
            port = stack.enter_context(postgres_cluster(work / "postgres"))
            api_url = stack.enter_context(prefect_server(args.api_url, args.database))
            ingest = bench_ingest(args, work, info, port, api_url)
            if args.read:
                read = bench_read(args, work, info, port, api_url)
        reduce_seconds, reduced = bench_reduce(args, info)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report("series", render(args, info, ingest, reduce_seconds, reduced, read))


if __name__ == "__main__":
    main()

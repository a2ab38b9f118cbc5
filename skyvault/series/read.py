"""Reading a source's series at a resolution: from cached blocks, live where blocks are missing.

A read asks for ``[start, end)`` at ``resolution`` seconds. It is served from one cache level: the
coarsest whose resolution is at most the one asked for and divides it (levels ``60 s`` and ``1 h``:
15 min and 90 min read the 60 s level, 2 h the 1 h level). A resolution that no level divides (or
finer than every level) is refused, naming the resolutions allowed. Answer bins are aligned on UTC
epoch multiples of the resolution (so on midnight when it divides a day), the range is widened to
whole bins, and each holds per node and variable the min of the level's mins, the max of its maxes,
the count-weighted mean of its means and the sum of its counts; at the level's own resolution the
level's bins are answered as they are.

The level's periods overlapping the range are read from their blocks. A period without a block is
reduced live from full-resolution samples (the sample database, or the source's reader) with the
same reduction seeding uses, so the answer equals the one served from blocks once they are built.
Such periods are reported (``missing``) so the caller can have them seeded; a period that has not
ended yet is served live but not reported, as its block would go stale (``ingest-samples``
rebuilds the blocks it fills).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from skyvault.config.settings import CacheLevel, SeriesSettings, SeriesSource
from skyvault.errors import SeriesRequestError
from skyvault.series.blocks import block_key, read_block
from skyvault.series.readers import SampleReader, full_resolution
from skyvault.series.reduce import STATISTICS, next_period, periods_between, reduce_samples
from skyvault.series.samples import VARIABLES
from skyvault.storage.store import ObjectStore

_UNITS = {"": 1, "s": 1, "min": 60, "h": 3600, "d": 86400}
_RESOLUTION = re.compile(r"^\s*(\d+)\s*(s|min|h|d)?\s*$")

Columns = dict[str, dict[str, np.ndarray[Any, Any]]]


def parse_resolution(text: str) -> int:
    """A resolution in seconds from ``900``, ``900s``, ``15 min``, ``1h`` or ``1 d``.

    Raises:
        SeriesRequestError: not a positive whole number of s, min, h or d (field ``resolution``).

    """
    match = _RESOLUTION.match(text)
    seconds = int(match.group(1)) * _UNITS[match.group(2) or ""] if match else 0
    if seconds <= 0:
        raise SeriesRequestError(
            f"resolution {text!r} is not a positive whole number of seconds (900, 900s, 15 min, 1 h, 1 d)",
            "resolution",
        )
    return seconds


def parse_time(text: str, name: str) -> dt.datetime:
    """An ISO 8601 time as aware UTC; a time without a zone is UTC.

    Raises:
        SeriesRequestError: not ISO 8601 (field ``name``).

    """
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise SeriesRequestError(f"{name} {text!r} is not an ISO 8601 time", name) from None
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def choose_level(config: SeriesSource, resolution_seconds: int) -> CacheLevel:
    """The coarsest cache level whose resolution is at most ``resolution_seconds`` and divides it.

    Raises:
        SeriesRequestError: no level fits (field ``resolution``); names the resolutions allowed.

    """
    fits = [
        level
        for level in config.cache_levels
        if level.resolution_seconds <= resolution_seconds
        and resolution_seconds % level.resolution_seconds == 0
    ]
    if not fits:
        allowed = sorted({level.resolution_seconds for level in config.cache_levels})
        served = " or ".join(f"{r} s" for r in allowed) if allowed else "none (no cache levels)"
        raise SeriesRequestError(
            f"series source {config.id!r} cannot serve resolution {resolution_seconds} s: a resolution "
            f"is a whole multiple of a cache level's, here of {served}",
            "resolution",
        )
    return max(fits, key=lambda level: level.resolution_seconds)


@dataclass(frozen=True)
class SeriesRead:
    """A read's answer: a row per (node, bin) holding samples, sorted by node then bin.

    ``stats[variable][statistic]``: float64 for min/mean/max, int64 for count. ``missing``: the
    level's ended periods that had no block and were reduced live (to be seeded); ``live``: every
    period reduced live, including one not ended yet.
    """

    source: str
    resolution_seconds: int
    level: CacheLevel
    start: dt.datetime
    end: dt.datetime
    node: np.ndarray[Any, Any]
    bin_start: np.ndarray[Any, Any]
    stats: Columns
    missing: list[dt.datetime] = field(default_factory=list)
    live: list[dt.datetime] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.bin_start.shape[0])

    @staticmethod
    def columns() -> list[str]:
        """Column names of :meth:`rows`: ``node``, ``bin_start``, then ``<variable>_<statistic>``."""
        return ["node", "bin_start", *(f"{v}_{s}" for v in VARIABLES for s in STATISTICS)]

    def rows(self) -> Iterator[list[Any]]:
        """The rows as plain values: node text, bin start as ISO 8601 UTC, then the statistics."""
        values = [self.stats[v][s].tolist() for v in VARIABLES for s in STATISTICS]
        for i, (node, start) in enumerate(zip(self.node.tolist(), self.bin_start.tolist(), strict=True)):
            when = dt.datetime.fromtimestamp(start, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            yield [node, when, *(column[i] for column in values)]


def _from_table(
    table: pa.Table, lo: int, hi: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], Columns]:
    # Parquet has no seconds unit: bin_start comes back in milliseconds
    seconds = table.column("bin_start").cast(pa.timestamp("s", tz="UTC")).cast(pa.int64())
    bins = np.asarray(seconds.to_numpy(), dtype=np.int64)
    keep = (bins >= lo) & (bins < hi)
    node = np.asarray(table.column("node").to_numpy(zero_copy_only=False)).astype("U36")[keep]
    stats: Columns = {}
    for variable in VARIABLES:
        stats[variable] = {}
        for stat in STATISTICS:
            kind = np.int64 if stat == "count" else np.float64
            column = table.column(f"{variable}_{stat}").to_numpy(zero_copy_only=False)
            stats[variable][stat] = np.asarray(column, dtype=kind)[keep]
    return node, bins[keep], stats


def _concat(
    parts: Sequence[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], Columns]],
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], Columns]:
    node = np.concatenate([p[0] for p in parts]) if parts else np.array([], dtype="U36")
    bins = np.concatenate([p[1] for p in parts]) if parts else np.array([], dtype=np.int64)
    stats: Columns = {}
    for variable in VARIABLES:
        stats[variable] = {}
        for stat in STATISTICS:
            kind = np.int64 if stat == "count" else np.float64
            columns = [p[2][variable][stat] for p in parts]
            stats[variable][stat] = (
                np.concatenate(columns).astype(kind) if columns else np.array([], dtype=kind)
            )
    return node.astype("U36"), bins.astype(np.int64), stats


def rebin(
    node: np.ndarray[Any, Any],
    bins: np.ndarray[Any, Any],
    stats: Columns,
    resolution_seconds: int,
    level: int,
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], Columns]:
    """Rows of (node, bin) at ``level`` seconds merged into bins of ``resolution_seconds``, by node and bin.

    Min of mins, max of maxes, sum of counts, count-weighted mean of means. At the level's own
    resolution the rows are only sorted.
    """
    target = bins - bins % resolution_seconds
    order = np.lexsort((target, node))
    node, target = node[order], target[order]
    if resolution_seconds == level or not len(target):
        return node, target, {v: {s: c[order] for s, c in stats[v].items()} for v in VARIABLES}
    change = np.empty(len(target), dtype=bool)
    change[0] = True
    change[1:] = (node[1:] != node[:-1]) | (target[1:] != target[:-1])
    firsts = np.flatnonzero(change)
    out: Columns = {}
    for variable in VARIABLES:
        column = {s: c[order] for s, c in stats[variable].items()}
        counts = np.add.reduceat(column["count"], firsts)
        out[variable] = {
            "min": np.minimum.reduceat(column["min"], firsts),
            "mean": np.add.reduceat(column["mean"] * column["count"], firsts) / counts,
            "max": np.maximum.reduceat(column["max"], firsts),
            "count": counts.astype(np.int64),
        }
    return node[firsts], target[firsts], out


def read_series(
    source: str,
    start: dt.datetime,
    end: dt.datetime,
    resolution_seconds: int,
    series: SeriesSettings,
    store: ObjectStore,
    samples: SampleReader | None = None,
    now: dt.datetime | None = None,
) -> SeriesRead:
    """The source's series over ``[start, end)`` (UTC; no zone is UTC) at ``resolution_seconds``.

    See the module docstring for the level chosen, the bins and the periods served live.

    ``samples``: where missing periods are reduced from (default: the source's reader, else the
    sample database, opened only when a period is missing). ``now`` decides which periods ended.

    Raises:
        UnknownSeriesSourceError: no such source.
        SeriesRequestError: start not before end (``start``), a resolution no level serves
            (``resolution``), more bins than ``series.max_read_bins`` (``end``).
        SeriesReaderError, SeriesDatabaseError, SeriesBlockError: reading a block or samples failed.

    """
    config = series.source(source)
    start, end = (
        t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC) for t in (start, end)
    )
    if start >= end:
        raise SeriesRequestError(
            f"series source {source!r}: start {start.isoformat()} is not before end {end.isoformat()}",
            "start",
        )
    level = choose_level(config, resolution_seconds)
    lo = int(start.timestamp()) // resolution_seconds * resolution_seconds
    hi = -(-int(end.timestamp()) // resolution_seconds) * resolution_seconds
    bins = (hi - lo) // resolution_seconds
    if bins > series.max_read_bins:
        raise SeriesRequestError(
            f"series source {source!r}: {start.isoformat()}..{end.isoformat()} at {resolution_seconds} s "
            f"is {bins} bins, over series.max_read_bins ({series.max_read_bins}); narrow the range or "
            "coarsen the resolution",
            "end",
        )
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    first, last = dt.datetime.fromtimestamp(lo, dt.UTC), dt.datetime.fromtimestamp(hi, dt.UTC)
    parts = []
    missing: list[dt.datetime] = []
    live: list[dt.datetime] = []
    with contextlib.ExitStack() as stack:
        for period in periods_between(first, last, level.period):
            table = read_block(store, block_key(series.prefix, source, level, period))
            if table is not None:
                parts.append(_from_table(table, lo, hi))
                continue
            if samples is None:
                samples = stack.enter_context(full_resolution(config, series))
            period_end = next_period(period, level.period)
            a, b = max(lo, int(period.timestamp())), min(hi, int(period_end.timestamp()))
            reduced = reduce_samples(
                samples.read_samples(source, a, b, config.reduce_statuses), source, level, period
            )
            parts.append((reduced.node, reduced.bin_start, reduced.stats))
            live.append(period)
            if period_end <= now:
                missing.append(period)
    node, bin_start, stats = rebin(*_concat(parts), resolution_seconds, level.resolution_seconds)
    return SeriesRead(
        source=source,
        resolution_seconds=resolution_seconds,
        level=level,
        start=first,
        end=last,
        node=node,
        bin_start=bin_start,
        stats=stats,
        missing=missing,
        live=live,
    )

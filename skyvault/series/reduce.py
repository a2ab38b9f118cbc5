"""Reduced series: UTC periods, and samples binned to min / mean / max / count per node and bin.

A cache level ``resolution | period`` cuts time into periods that start at UTC boundaries (the hour,
midnight, the first of the month, the first of the year); each period is one block. Inside it, bin
``k`` covers ``[period_start + k * resolution, period_start + (k + 1) * resolution)``. The
resolution divides the hour (hourly) or the day (other periods), so bins never straddle periods.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from skyvault.config.settings import CacheLevel
from skyvault.series.database import SampleArrays
from skyvault.series.samples import VARIABLES

#: The statistics a block holds per bin and variable.
STATISTICS: tuple[str, ...] = ("min", "mean", "max", "count")


def _utc(when: dt.datetime | int) -> dt.datetime:
    if isinstance(when, int):
        return dt.datetime.fromtimestamp(when, dt.UTC)
    if when.tzinfo is None:
        raise ValueError(f"time {when.isoformat()} has no time zone")
    return when.astimezone(dt.UTC)


def period_start(when: dt.datetime | int, period: str) -> dt.datetime:
    """The start (UTC) of the ``period`` holding ``when`` (an aware datetime or epoch seconds)."""
    t = _utc(when)
    if period == "hourly":
        return t.replace(minute=0, second=0, microsecond=0)
    if period == "daily":
        return t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "monthly":
        return t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if period == "yearly":
        return t.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(f"unknown period {period!r}")


def next_period(start: dt.datetime, period: str) -> dt.datetime:
    """The start of the period after the one starting at ``start``."""
    if period == "hourly":
        return start + dt.timedelta(hours=1)
    if period == "daily":
        return start + dt.timedelta(days=1)
    if period == "monthly":
        return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    if period == "yearly":
        return start.replace(year=start.year + 1)
    raise ValueError(f"unknown period {period!r}")


def periods_between(start: dt.datetime, end: dt.datetime, period: str) -> list[dt.datetime]:
    """Starts of every ``period`` that overlaps ``[start, end)``."""
    out: list[dt.datetime] = []
    current = period_start(start, period)
    end = _utc(end)
    while current < end:
        out.append(current)
        current = next_period(current, period)
    return out


def periods_of_hours(hours: Iterable[int], period: str) -> list[dt.datetime]:
    """Starts of the ``period``s holding the given UTC hours (epoch seconds), sorted, once each."""
    return sorted({period_start(int(h), period) for h in hours})


@dataclass(frozen=True)
class ReducedSeries:
    """One block's content: a row per (node, bin) that holds samples, sorted by node then bin.

    ``stats[variable][statistic]`` is a column: float64 for min/mean/max, int64 for count.
    """

    source: str
    level: CacheLevel
    period_start: dt.datetime
    period_end: dt.datetime
    node: np.ndarray[Any, Any]
    bin_start: np.ndarray[Any, Any]
    stats: dict[str, dict[str, np.ndarray[Any, Any]]]

    def __len__(self) -> int:
        return int(self.bin_start.shape[0])


def reduce_samples(
    samples: SampleArrays, source: str, level: CacheLevel, start: dt.datetime
) -> ReducedSeries:
    """Bin the samples of one period (those in ``[start, end of period)``) at the level's resolution.

    Samples outside the period are left out. Bins without samples have no row.
    """
    start = period_start(start, level.period)
    end = next_period(start, level.period)
    start_s, end_s = int(start.timestamp()), int(end.timestamp())
    inside = (samples.ts >= start_s) & (samples.ts < end_s)
    ts = samples.ts[inside]
    node = samples.node[inside]
    res = level.resolution_seconds
    bins = start_s + (ts - start_s) // res * res
    order = np.lexsort((bins, node))
    node, bins = node[order], bins[order]
    if len(bins):
        change = np.empty(len(bins), dtype=bool)
        change[0] = True
        change[1:] = (node[1:] != node[:-1]) | (bins[1:] != bins[:-1])
        firsts = np.flatnonzero(change)
    else:
        firsts = np.array([], dtype=np.intp)
    counts = np.diff(np.append(firsts, len(bins))).astype(np.int64)
    stats: dict[str, dict[str, np.ndarray[Any, Any]]] = {}
    for variable in VARIABLES:
        values = samples.values[variable][inside][order]
        if len(firsts):
            stats[variable] = {
                "min": np.minimum.reduceat(values, firsts),
                "mean": np.add.reduceat(values, firsts) / counts,
                "max": np.maximum.reduceat(values, firsts),
                "count": counts,
            }
        else:
            empty = np.array([], dtype=np.float64)
            stats[variable] = {"min": empty, "mean": empty, "max": empty, "count": counts}
    return ReducedSeries(
        source=source,
        level=level,
        period_start=start,
        period_end=end,
        node=node[firsts],
        bin_start=bins[firsts].astype(np.int64),
        stats=stats,
    )

"""Reduced series blocks on the object store: ``series/<source>/<resolution>s/<period-start>.parquet``.

``<period-start>`` is the period's UTC start in ISO 8601 basic format (``20260601T000000Z``). A
block is one Parquet table with a row per (node, bin) holding samples: ``node`` (UUID text),
``bin_start`` (UTC timestamp, seconds), and ``<variable>_<statistic>`` for every variable and
min / mean / max / count. Its schema metadata names the source, the level and the period. A
period without samples still gets a block, with no rows: the period is built and empty.

A block is serialised whole in memory, then stored with one atomic write (a temporary file renamed
on a local store, one PUT on S3): a reader sees the previous block or the new one, never part of
one. Builders of one level take turns (a store lock per source and level) and read the database
while holding it, so the last block written includes every sample committed before it was read.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from skyvault.config.settings import CacheLevel, LockSettings, SeriesSource
from skyvault.errors import ObjectNotFoundError, SeriesBlockError
from skyvault.ids import check_id
from skyvault.series.readers import SampleReader
from skyvault.series.reduce import STATISTICS, ReducedSeries, next_period, period_start, reduce_samples
from skyvault.series.samples import VARIABLES
from skyvault.storage.store import ObjectStore

PERIOD_KEY_FORMAT = "%Y%m%dT%H%M%SZ"


class BlockInfo(BaseModel):
    """One block written: its key, period and number of (node, bin) rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    level: str
    period_start: dt.datetime
    rows: int


def block_key(prefix: str, source: str, level: CacheLevel, start: dt.datetime) -> str:
    """The key of the block of ``level`` holding the period that starts at (or holds) ``start``."""
    snapped = period_start(start, level.period)
    name = snapped.strftime(PERIOD_KEY_FORMAT)
    return f"{prefix}/{check_id(source, 'series source')}/{level.name}/{name}.parquet"


def lock_key(source: str, level: CacheLevel) -> str:
    """The store lock held while blocks of one source and level are built."""
    return f"locks/series/{check_id(source, 'series source')}/{level.name}"


def to_table(series: ReducedSeries) -> pa.Table:
    """The block's Arrow table (columns and metadata as the module docstring says)."""
    columns: dict[str, pa.Array] = {
        "node": pa.array(series.node.astype(str), type=pa.string()),
        "bin_start": pa.array(series.bin_start.astype(np.int64), type=pa.int64()).cast(
            pa.timestamp("s", tz="UTC")
        ),
    }
    for variable in VARIABLES:
        for stat in STATISTICS:
            kind = pa.int64() if stat == "count" else pa.float64()
            columns[f"{variable}_{stat}"] = pa.array(series.stats[variable][stat], type=kind)
    table = pa.table(columns)
    return table.replace_schema_metadata(
        {
            "skyvault.source": series.source,
            "skyvault.resolution_seconds": str(series.level.resolution_seconds),
            "skyvault.period": series.level.period,
            "skyvault.period_start": series.period_start.isoformat(),
            "skyvault.period_end": series.period_end.isoformat(),
        }
    )


def write_block(store: ObjectStore, key: str, series: ReducedSeries) -> None:
    """Serialise a block whole, then store it at ``key`` in one atomic write.

    Raises:
        SeriesBlockError: the block cannot be serialised (nothing is written); names the key.
        StorageError: the store refused the write (the previous block, if any, stays).

    """
    sink = io.BytesIO()
    try:
        pq.write_table(to_table(series), sink, compression="zstd")
    except (pa.ArrowException, OSError, ValueError) as e:
        raise SeriesBlockError(f"cannot serialise series block {key!r}: {e}") from e
    store.put_bytes(key, sink.getvalue(), content_type="application/vnd.apache.parquet")


def read_block(store: ObjectStore, key: str) -> pa.Table | None:
    """The block at ``key`` as an Arrow table, None when there is none.

    Raises:
        SeriesBlockError: the object is not a readable Parquet block; names the key.

    """
    try:
        data = store.get_bytes(key)
    except ObjectNotFoundError:
        return None
    try:
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        raise SeriesBlockError(f"series block {key!r} is not a readable Parquet file: {e}") from e


def build_blocks(
    db: SampleReader,
    store: ObjectStore,
    source: SeriesSource,
    level: CacheLevel,
    starts: Sequence[dt.datetime],
    prefix: str,
    locks: LockSettings,
) -> list[BlockInfo]:
    """Build and write the blocks of ``level`` for the periods starting at (or holding) ``starts``.

    Holds the level's store lock throughout; each block reads its period from ``db`` (the sample
    database, or the source's reader), and a block whose read fails is not written.
    """
    periods = sorted({period_start(s, level.period) for s in starts})
    written: list[BlockInfo] = []
    with store.lock(
        lock_key(source.id, level), lease_seconds=locks.lease_seconds, timeout_seconds=locks.wait_seconds
    ):
        for start in periods:
            end = next_period(start, level.period)
            samples = db.read_samples(
                source.id, int(start.timestamp()), int(end.timestamp()), source.reduce_statuses
            )
            series = reduce_samples(samples, source.id, level, start)
            key = block_key(prefix, source.id, level, start)
            write_block(store, key, series)
            written.append(BlockInfo(key=key, level=str(level), period_start=start, rows=len(series)))
    return written

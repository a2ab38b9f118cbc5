"""Reduced series blocks: equal to an independent reduction, on UTC period boundaries, written whole."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from skyvault.config.settings import LockSettings, SeriesSettings, StoreSettings
from skyvault.errors import SeriesBlockError, StorageError
from skyvault.series.blocks import block_key, write_block
from skyvault.series.database import sample_database
from skyvault.series.ingest import ingest_sample_file, seed_blocks
from skyvault.series.reduce import reduce_samples
from skyvault.storage.store import open_store
from tests.series.common import (
    DAY,
    SOURCE,
    database_settings,
    jsonl,
    make_samples,
    new_nodes,
    reference_reduction,
)

LEVELS = ["60 s | daily", "15 min | hourly", "1 h | monthly"]
#: Samples from 30 May 22:00 to 2 June 02:00 UTC: crosses days and a month boundary.
START = dt.datetime(2026, 5, 30, 22, tzinfo=dt.UTC)
SPAN = 2 * DAY + 4 * 3600


@pytest.fixture(params=["sqlite", "postgresql"])
def series(request: pytest.FixtureRequest, tmp_path: Path) -> SeriesSettings:
    return database_settings(request.param, tmp_path, request, sources={SOURCE: {"cache_levels": LEVELS}})


def _utc_start(name: str) -> dt.datetime:
    return dt.datetime.strptime(name, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)


def test_blocks_equal_an_independent_reduction_on_utc_periods(series: SeriesSettings, tmp_path: Path) -> None:
    store = StoreSettings(root=tmp_path / "store")
    samples = make_samples(
        np.random.default_rng(5), new_nodes(3), START, SPAN, step=20, keep=0.6, statuses="MRE"
    )
    key = f"landing/samples/{SOURCE}/all.jsonl"
    open_store(store).put_bytes(key, jsonl(samples))
    ingest_sample_file(SOURCE, key, series, store)

    # ask for a few instants; each level builds the periods that hold them
    wanted = [START + dt.timedelta(hours=h) for h in (0, 1, 30, 50)]
    levels = series.source(SOURCE).cache_levels
    written = {
        b.key: b
        for level in levels
        for b in seed_blocks(SOURCE, level.name, wanted, series, store, LockSettings())
    }
    # the periods each level must hold, computed by hand
    expected_starts = {
        "60s": [
            dt.datetime(2026, 5, 30, tzinfo=dt.UTC),
            dt.datetime(2026, 6, 1, tzinfo=dt.UTC),
            dt.datetime(2026, 6, 2, tzinfo=dt.UTC),
        ],
        "900s": [
            dt.datetime(2026, 5, 30, 22, tzinfo=dt.UTC),
            dt.datetime(2026, 5, 30, 23, tzinfo=dt.UTC),
            dt.datetime(2026, 6, 1, 4, tzinfo=dt.UTC),
            dt.datetime(2026, 6, 2, 0, tzinfo=dt.UTC),
        ],
        "3600s": [dt.datetime(2026, 5, 1, tzinfo=dt.UTC), dt.datetime(2026, 6, 1, tzinfo=dt.UTC)],
    }
    period_ends: dict[str, Callable[[dt.datetime], dt.datetime]] = {
        "60s": lambda s: s + dt.timedelta(days=1),
        "900s": lambda s: s + dt.timedelta(hours=1),
        "3600s": lambda s: dt.datetime(s.year + s.month // 12, s.month % 12 + 1, 1, tzinfo=dt.UTC),
    }
    assert sorted(written) == sorted(
        f"series/{SOURCE}/{res}/{s:%Y%m%dT%H%M%SZ}.parquet"
        for res, starts in expected_starts.items()
        for s in starts
    )
    objects = open_store(store)
    for key in written:
        _, _, res, name = key.split("/")
        start = _utc_start(name.removesuffix(".parquet"))
        end = period_ends[res](start)
        resolution = int(res.removesuffix("s"))
        table = pq.read_table(io.BytesIO(objects.get_bytes(key)))
        rows = table.to_pylist()
        assert table.schema.metadata[b"skyvault.period_start"].decode() == start.isoformat()
        reference = reference_reduction(samples, resolution, int(start.timestamp()), int(end.timestamp()))
        got = {(r["node"], int(r["bin_start"].timestamp())): r for r in rows}
        assert set(got) == set(reference), key
        assert len(rows) == len(got) == written[key].rows
        for (node, bin_start), stats in reference.items():
            assert start.timestamp() <= bin_start < end.timestamp()
            row = got[(node, bin_start)]
            for v, (lo, mean, hi, count) in stats.items():
                assert row[f"{v}_min"] == lo
                assert row[f"{v}_max"] == hi
                assert row[f"{v}_count"] == count
                assert row[f"{v}_mean"] == pytest.approx(mean, rel=1e-12)


def test_a_period_without_samples_gets_an_empty_block(series: SeriesSettings, tmp_path: Path) -> None:
    store = StoreSettings(root=tmp_path / "store")
    [info] = seed_blocks(
        SOURCE, "60s", [dt.datetime(2020, 1, 1, 12, tzinfo=dt.UTC)], series, store, LockSettings()
    )
    assert info.key == f"series/{SOURCE}/60s/20200101T000000Z.parquet"
    assert pq.read_table(io.BytesIO(open_store(store).get_bytes(info.key))).num_rows == 0


def _series_block(tmp_path: Path) -> tuple[Any, Any]:
    series = SeriesSettings(sqlite_path=tmp_path / "s.sqlite3", sources={SOURCE: {"cache_levels": LEVELS}})
    level = series.source(SOURCE).cache_levels[0]
    start = dt.datetime(2026, 5, 30, tzinfo=dt.UTC)
    samples = make_samples(np.random.default_rng(9), new_nodes(2), start, DAY, step=60)
    store = StoreSettings(root=tmp_path / "store")
    open_store(store).put_bytes(f"landing/samples/{SOURCE}/a.jsonl", jsonl(samples))
    ingest_sample_file(SOURCE, f"landing/samples/{SOURCE}/a.jsonl", series, store)
    with sample_database(series) as db:
        arrays = db.read_samples(SOURCE, int(start.timestamp()), int(start.timestamp()) + DAY, ("M", "R"))
    return reduce_samples(arrays, SOURCE, level, start), block_key("series", SOURCE, level, start)


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "locks" not in p.parts)


def test_a_failure_while_serialising_leaves_no_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reduced, key = _series_block(tmp_path)
    store = open_store(StoreSettings(root=tmp_path / "blocks"))
    real = pq.write_table

    def half_then_fail(table: Any, sink: Any, **kwargs: Any) -> None:
        real(table.slice(0, len(table) // 2), sink, **kwargs)
        raise OSError("disk went away")

    monkeypatch.setattr(pq, "write_table", half_then_fail)
    with pytest.raises(SeriesBlockError, match=key):
        write_block(store, key, reduced)
    assert not store.exists(key)
    assert not (tmp_path / "blocks").exists() or _leftovers(tmp_path / "blocks") == []


def test_a_failure_while_storing_keeps_the_previous_block_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reduced, key = _series_block(tmp_path)
    root = tmp_path / "blocks"
    store = open_store(StoreSettings(root=root))
    write_block(store, key, reduced)
    before = store.get_bytes(key)

    def write_half(self: Path, data: bytes) -> int:
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("no space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_half)
    with pytest.raises(StorageError):
        write_block(store, key, reduced)
    monkeypatch.undo()
    assert store.get_bytes(key) == before
    assert _leftovers(root) == [key]
    assert pq.read_table(io.BytesIO(store.get_bytes(key))).num_rows == len(reduced)

"""The sample database, on SQLite and on PostgreSQL: one row per (node, timestamp), exact counts."""

from __future__ import annotations

import datetime as dt
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from skyvault.config.settings import SeriesSettings, StoreSettings
from skyvault.series.ingest import ingest_sample_file
from skyvault.series.samples import SampleFileResult
from tests.series.common import (
    DAY,
    SOURCE,
    csv_bytes,
    database_settings,
    fixture_json,
    jsonl,
    make_samples,
    new_nodes,
    pairs,
    put_sample_file,
    stored_rows,
)

START = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def series(request: pytest.FixtureRequest, tmp_path: Path) -> SeriesSettings:
    return database_settings(request.param, tmp_path, request)


def _hours(samples: list[dict[str, Any]]) -> list[int]:
    return sorted({ts - ts % 3600 for _, ts in pairs(samples)})


def test_resent_overlapping_and_backfilled_files_store_each_sample_once(
    series: SeriesSettings, store: StoreSettings
) -> None:
    rng = np.random.default_rng(7)
    nodes = new_nodes(3)
    days = make_samples(rng, nodes, START, 3 * DAY, step=300)
    day1 = [s for s in days if s["timestamp_s"] < START.timestamp() + DAY]
    day12 = [s for s in days if s["timestamp_s"] < START.timestamp() + 2 * DAY]
    day23 = [s for s in days if s["timestamp_s"] >= START.timestamp() + DAY]

    first = ingest_sample_file(SOURCE, put_sample_file(store, "day1.jsonl", jsonl(day1)), series, store)
    assert (first.skipped, first.inserted, first.duplicate, first.rejected) == (False, len(day1), 0, 0)
    assert first.hours == _hours(day1)

    again = ingest_sample_file(SOURCE, f"landing/samples/{SOURCE}/day1.jsonl", series, store)
    assert again.skipped
    assert again.inserted == 0

    # the same samples re-sent under another name and format: all duplicates
    resent = ingest_sample_file(
        SOURCE, put_sample_file(store, "day1-again.csv", csv_bytes(day1)), series, store
    )
    assert (resent.skipped, resent.inserted, resent.duplicate) == (False, 0, len(day1))
    assert resent.hours == []

    overlap = ingest_sample_file(
        SOURCE, put_sample_file(store, "day12.csv", csv_bytes(day12, iso=True)), series, store
    )
    new = pairs(day12) - pairs(day1)
    assert (overlap.inserted, overlap.duplicate) == (len(new), len(day1))
    assert overlap.hours == sorted({ts - ts % 3600 for _, ts in new})

    # a backfill dump of days 2-3 that repeats day 2 inside itself
    repeated = [s for s in day23 if s["timestamp_s"] < START.timestamp() + 2 * DAY]
    dump = day23 + repeated
    backfill = ingest_sample_file(
        SOURCE, put_sample_file(store, "backfill.json", fixture_json(dump)), series, store
    )
    assert backfill.inserted == len(pairs(days) - pairs(day12))
    assert backfill.duplicate == len(dump) - backfill.inserted

    rows = stored_rows(series)
    assert len(rows) == len({(r[0], r[1]) for r in rows}) == len(pairs(days))
    expected = sorted(
        (
            s["node"],
            s["timestamp_s"],
            s["co2_ppm"],
            s["temperature_celsius"],
            s["rel_humidity_percent"],
            s["status"],
        )
        for s in days
    )
    assert rows == expected


def test_a_file_with_bad_lines_stores_the_good_ones(series: SeriesSettings, store: StoreSettings) -> None:
    samples = make_samples(np.random.default_rng(3), new_nodes(1), START, 3600, keep=1.0)
    samples[10]["co2_ppm"] = 20000
    samples[20]["status"] = "Q"
    result = ingest_sample_file(SOURCE, put_sample_file(store, "bad.jsonl", jsonl(samples)), series, store)
    assert (result.inserted, result.duplicate, result.rejected) == (len(samples) - 2, 0, 2)
    assert [r.line for r in result.rejections] == [11, 21]
    assert "co2_ppm 20000" in result.rejections[0].reason
    assert "status 'Q'" in result.rejections[1].reason
    stored = {(r[0], r[1]) for r in stored_rows(series)}
    assert stored == pairs(samples) - pairs([samples[10], samples[20]])


def _ingest_in_process(
    source: str, key: str, series: SeriesSettings, store: StoreSettings, barrier: Any, out: Any
) -> None:
    barrier.wait()
    try:
        out.put(ingest_sample_file(source, key, series, store).model_dump_json())
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
        out.put(f"error: {type(e).__name__}: {e}")


def test_concurrent_ingests_of_overlapping_files_lose_and_double_nothing(
    series: SeriesSettings, store: StoreSettings
) -> None:
    series = series.model_copy(update={"busy_timeout_seconds": 120.0})
    rng = np.random.default_rng(11)
    samples = make_samples(rng, new_nodes(4), START, DAY, step=60, keep=0.9)
    rng.shuffle(samples)
    third = len(samples) // 3
    # four files, each overlapping the others, written in different orders
    parts = [samples[: 2 * third], samples[third:], samples[::2], samples[::-3]]
    keys = [put_sample_file(store, f"part{n}.jsonl", jsonl(p)) for n, p in enumerate(parts)]
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(len(keys)), ctx.Queue()
    procs = [
        ctx.Process(target=_ingest_in_process, args=(SOURCE, k, series, store, barrier, out)) for k in keys
    ]
    for p in procs:
        p.start()
    answers = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert not [a for a in answers if a.startswith("error")]
    results = [SampleFileResult.model_validate_json(a) for a in answers]
    everything = pairs(samples)
    assert sum(r.inserted for r in results) == len(everything)
    assert sum(r.inserted + r.duplicate for r in results) == sum(len(p) for p in parts)
    rows = stored_rows(series)
    assert len(rows) == len(everything)
    assert {(r[0], r[1]) for r in rows} == everything

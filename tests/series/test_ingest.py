"""Ingesting one sample file: streamed in chunks inside one transaction, with exact counts and lines."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from skyvault.config.settings import SeriesSettings, StoreSettings
from skyvault.errors import SampleFileError
from skyvault.series.ingest import ingest_sample_file
from tests.series.common import (
    SOURCE,
    csv_bytes,
    database_settings,
    fixture_json,
    jsonl,
    make_samples,
    many_samples_jsonl,
    new_nodes,
    pairs,
    put_sample_file,
    recorded_files,
    stored_rows,
)

START = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
CHUNK = 40


@pytest.fixture(params=["sqlite", "postgresql"])
def series(request: pytest.FixtureRequest, tmp_path: Path) -> SeriesSettings:
    return database_settings(request.param, tmp_path, request, ingest_chunk_samples=CHUNK)


def _row(s: dict[str, Any]) -> tuple[str, int, float, float, float, str]:
    return (
        s["node"],
        int(s["timestamp_s"]),
        float(s["co2_ppm"]),
        float(s["temperature_celsius"]),
        float(s["rel_humidity_percent"]),
        s["status"],
    )


def _left_in(scratch: Path) -> list[Path]:
    return sorted(scratch.rglob("*")) if scratch.exists() else []


def _messy_file(samples: list[dict[str, Any]]) -> tuple[bytes, list[dict[str, Any]], list[int]]:
    """JSON lines of ``samples`` with, spread over many chunks, repeats of earlier samples carrying
    other values, invalid samples, unreadable and blank lines. Returns the file, the valid samples
    in file order, and the lines of the invalid ones."""
    lines: list[str] = []
    valid: list[dict[str, Any]] = []
    bad: list[int] = []
    for n, s in enumerate(samples):
        lines.append(json.dumps(s))
        valid.append(s)
        if n % 29 == 7:
            lines.append(json.dumps({**s, "co2_ppm": 20000}))
            bad.append(len(lines))
        if n % 53 == 11:
            lines.append("{not json")
            bad.append(len(lines))
        if n % 61 == 3:
            lines.append("")
        if n % 17 == 5 and n > 3 * CHUNK:  # a repeat of a sample read chunks earlier
            repeat = {**samples[n - 3 * CHUNK], "co2_ppm": 4999.0}
            lines.append(json.dumps(repeat))
            valid.append(repeat)
    return ("\n".join(lines) + "\n").encode(), valid, bad


def test_a_file_of_many_chunks_goes_in_once_with_exact_counts_and_lines(
    series: SeriesSettings, store: StoreSettings, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    samples = make_samples(np.random.default_rng(5), new_nodes(3), START, 6 * 3600, step=60, keep=0.8)
    data, valid, bad = _messy_file(samples)
    assert len(valid) > 10 * CHUNK
    first: dict[tuple[str, int], dict[str, Any]] = {}
    for s in valid:
        first.setdefault((s["node"], s["timestamp_s"]), s)

    key = put_sample_file(store, "messy.jsonl", data)
    result = ingest_sample_file(SOURCE, key, series, store, scratch)

    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert (result.skipped, result.inserted, result.duplicate) == (False, len(first), len(valid) - len(first))
    assert result.rejected == len(bad)
    assert [r.line for r in result.rejections] == bad
    assert result.hours == sorted({ts - ts % 3600 for _, ts in first})
    # the first occurrence of each (node, timestamp) is the one kept, across chunks
    assert stored_rows(series) == sorted(_row(s) for s in first.values())
    assert _left_in(scratch) == []

    again = ingest_sample_file(SOURCE, key, series, store, scratch)
    assert (again.skipped, again.inserted, again.duplicate) == (True, 0, 0)

    # hours 4..9 as CSV: hours 4 and 5 are stored already
    later = make_samples(
        np.random.default_rng(6), [s["node"] for s in samples[:1]], START, 10 * 3600, step=60, keep=0.9
    )
    later = [s for s in later if s["timestamp_s"] >= START.timestamp() + 4 * 3600]
    new = pairs(later) - set(first)
    overlap = ingest_sample_file(
        SOURCE, put_sample_file(store, "later.csv", csv_bytes(later)), series, store, scratch
    )
    assert (overlap.inserted, overlap.duplicate, overlap.rejected) == (len(new), len(later) - len(new), 0)
    assert overlap.hours == sorted({ts - ts % 3600 for _, ts in new})
    assert len(stored_rows(series)) == len(first) + len(new)
    assert sorted(recorded_files(series)) == sorted(
        [
            (SOURCE, key, result.sha256, result.inserted, result.duplicate, result.rejected),
            (SOURCE, overlap.key, overlap.sha256, overlap.inserted, overlap.duplicate, 0),
        ]
    )
    assert _left_in(scratch) == []


def test_a_file_unreadable_after_many_chunks_leaves_nothing_stored(
    series: SeriesSettings, store: StoreSettings, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    samples = make_samples(np.random.default_rng(8), new_nodes(2), START, 4 * 3600, step=60, keep=1.0)
    good = jsonl(samples)
    lines = good.splitlines(keepends=True)
    broken_line = 10 * CHUNK + 3
    lines[broken_line - 1] = b'{"node": "\xff"}\n'
    key = put_sample_file(store, "broken.jsonl", b"".join(lines))

    with pytest.raises(SampleFileError) as caught:
        ingest_sample_file(SOURCE, key, series, store, scratch)
    assert f"line {broken_line}" in str(caught.value)
    assert key in str(caught.value)
    assert stored_rows(series) == []
    assert recorded_files(series) == []
    assert _left_in(scratch) == []

    put_sample_file(store, "broken.jsonl", good)  # the file is sent again, whole
    result = ingest_sample_file(SOURCE, key, series, store, scratch)
    assert (result.inserted, result.duplicate, result.rejected) == (len(samples), 0, 0)
    assert stored_rows(series) == sorted(_row(s) for s in samples)


def test_rejections_are_all_counted_and_the_first_ones_listed(
    series: SeriesSettings, store: StoreSettings, tmp_path: Path
) -> None:
    series = series.model_copy(update={"max_listed_rejections": 25})
    samples = make_samples(np.random.default_rng(9), new_nodes(1), START, 3 * 3600, step=60, keep=1.0)
    lines = []
    bad = []
    for n, s in enumerate(samples):
        if n % 3 == 0:
            lines.append(json.dumps({**s, "status": "Q"}))
            bad.append(n + 1)
        else:
            lines.append(json.dumps(s))
    kept = [s for n, s in enumerate(samples) if n % 3]
    result = ingest_sample_file(
        SOURCE,
        put_sample_file(store, "garbage.jsonl", "\n".join(lines).encode()),
        series,
        store,
        tmp_path / "scratch",
    )
    assert len(bad) > 25
    assert result.rejected == len(bad)
    assert [r.line for r in result.rejections] == bad[:25]
    assert all("status 'Q'" in r.reason for r in result.rejections)
    assert result.inserted == len(kept)
    assert stored_rows(series) == sorted(_row(s) for s in kept)
    assert recorded_files(series)[0][3:] == (len(kept), 0, len(bad))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_memory_stays_bounded_by_the_chunk_not_the_file(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, store: StoreSettings
) -> None:
    series = database_settings(kind, tmp_path, request, ingest_chunk_samples=2000)
    data, valid, _ = many_samples_jsonl(150_000, seed=10)
    key = put_sample_file(store, "big.jsonl", data)
    size = len(data)
    del data
    assert size > 20 * 1024**2

    tracemalloc.start()
    try:
        result = ingest_sample_file(SOURCE, key, series, store, tmp_path / "scratch")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (result.inserted, result.duplicate, result.rejected) == (len(valid), 0, 0)
    assert {(r[0], r[1]) for r in stored_rows(series)} == valid
    # reading the file whole would take at least its size (the bytes), twice with its text
    assert peak < size / 5, f"peak {peak} bytes for a {size}-byte file"


def test_only_fixture_json_is_bound_by_max_file_bytes(tmp_path: Path, store: StoreSettings) -> None:
    series = SeriesSettings(
        sqlite_path=tmp_path / "series.sqlite3", sources={SOURCE: {}}, max_file_bytes=2000
    )
    samples = make_samples(np.random.default_rng(12), new_nodes(1), START, 3600, step=60, keep=1.0)
    lines = jsonl(samples)
    assert len(lines) > 2000
    streamed = ingest_sample_file(
        SOURCE, put_sample_file(store, "a.jsonl", lines), series, store, tmp_path / "scratch"
    )
    assert streamed.inserted == len(samples)

    key = put_sample_file(store, "a.json", fixture_json(samples))
    with pytest.raises(SampleFileError) as caught:
        ingest_sample_file(SOURCE, key, series, store, tmp_path / "scratch")
    assert key in str(caught.value)
    assert "max_file_bytes" in str(caught.value)

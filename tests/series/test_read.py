"""Series reads: the coarsest adequate level, live reductions of missing blocks, reader commands."""

from __future__ import annotations

import datetime as dt
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from skyvault.config.settings import (
    LockSettings,
    SampleLimits,
    SeriesSettings,
    SeriesSource,
    Settings,
    StoreSettings,
)
from skyvault.errors import SeriesReaderError, SeriesRequestError
from skyvault.flows.series import seed_series
from skyvault.series.database import sample_database
from skyvault.series.ingest import seed_blocks
from skyvault.series.read import SeriesRead, choose_level, parse_resolution, read_series
from skyvault.series.samples import VARIABLES, validate_sample
from skyvault.storage.store import open_store
from tests.series.common import DAY, SOURCE, csv_bytes, make_samples, new_nodes, reference_reduction

LEVELS = ["60 s | daily", "15 min | daily", "1 h | monthly"]
#: Three days from 30 April 00:00 UTC (crossing into May); long ended by the time tests run.
START = dt.datetime(2026, 4, 30, tzinfo=dt.UTC)
DAYS = [START + dt.timedelta(days=n) for n in range(3)]


def _as_dict(read: SeriesRead) -> dict[tuple[str, int], Any]:
    out = {}
    for i, (node, start) in enumerate(zip(read.node.tolist(), read.bin_start.tolist(), strict=True)):
        out[(node, start)] = {
            v: tuple(read.stats[v][s][i] for s in ("min", "mean", "max", "count")) for v in VARIABLES
        }
    return out


def _assert_matches(read: SeriesRead, reference: dict[tuple[str, int], Any]) -> None:
    got = _as_dict(read)
    assert set(got) == set(reference)
    for key, stats in reference.items():
        for v in VARIABLES:
            lo, mean, hi, count = got[key][v]
            assert (lo, hi, count) == (stats[v][0], stats[v][2], stats[v][3]), (key, v)
            assert mean == pytest.approx(stats[v][1], rel=1e-12), (key, v)


def _assert_same(a: SeriesRead, b: SeriesRead) -> None:
    assert a.node.tolist() == b.node.tolist()
    assert a.bin_start.tolist() == b.bin_start.tolist()
    for v in VARIABLES:
        for s in ("min", "mean", "max", "count"):
            assert a.stats[v][s].tolist() == b.stats[v][s].tolist(), (v, s)


def _store_samples(series: SeriesSettings, samples: list[dict[str, Any]]) -> None:
    parsed = [validate_sample(s, n + 1, SampleLimits()) for n, s in enumerate(samples)]
    with sample_database(series) as db:
        db.ingest_chunks(SOURCE, "landing/samples/office/test.jsonl", "sha-test", [parsed], 0)


def _reader_script(tmp_path: Path, samples: list[dict[str, Any]]) -> list[str]:
    """A reader command printing the samples of its range from a CSV file, as an archive tool would."""
    data = tmp_path / "archive.csv"
    data.write_bytes(csv_bytes(samples, iso=True))
    script = tmp_path / "reader.py"
    script.write_text(
        textwrap.dedent(
            """
            import csv, datetime, sys
            start, end = (datetime.datetime.fromisoformat(a.replace("Z", "+00:00")) for a in sys.argv[2:4])
            with open(sys.argv[1], newline="") as f:
                rows = list(csv.DictReader(f))
            out = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\\n")
            out.writeheader()
            for row in rows:
                if start <= datetime.datetime.fromisoformat(row["timestamp"]) < end:
                    out.writerow(row)
            """
        )
    )
    return [sys.executable, str(script), str(data), "{start}", "{end}"]


def test_the_coarsest_level_that_divides_the_resolution_serves_it() -> None:
    source = SeriesSource.model_validate({"id": SOURCE, "cache_levels": LEVELS})
    chosen = {
        r: choose_level(source, parse_resolution(r)).resolution_seconds
        for r in ("60", "2 min", "15 min", "30min", "90 min", "1 h", "2h", "1 d", "7 min")
    }
    # the coarsest level whose resolution is <= the one asked for and divides it
    for text, level in chosen.items():
        seconds = parse_resolution(text)
        fits = [
            lv.resolution_seconds
            for lv in source.cache_levels
            if lv.resolution_seconds <= seconds and seconds % lv.resolution_seconds == 0
        ]
        assert level == max(fits), text
    assert (chosen["15 min"], chosen["90 min"], chosen["2h"], chosen["7 min"]) == (900, 900, 3600, 60)
    for text in ("30 s", "90 s"):
        with pytest.raises(SeriesRequestError) as e:
            choose_level(source, parse_resolution(text))
        assert e.value.field == "resolution"
        assert "60 s or 900 s or 3600 s" in str(e.value)


def test_a_read_uses_the_chosen_levels_blocks_and_rebins_them(tmp_path: Path) -> None:
    series = SeriesSettings(sqlite_path=tmp_path / "s.sqlite3", sources={SOURCE: {"cache_levels": LEVELS}})
    store_settings = StoreSettings(root=tmp_path / "store")
    samples = make_samples(np.random.default_rng(5), new_nodes(3), START, 2 * DAY, step=60, statuses="MRE")
    _store_samples(series, samples)
    # only the 15 min level is built: a 45 min read is served from it, nothing missing
    seed_blocks(SOURCE, "900s", DAYS[:2], series, store_settings, LockSettings())
    store = open_store(store_settings)
    lo, hi = START + dt.timedelta(hours=5), START + dt.timedelta(days=1, hours=20)
    read = read_series(SOURCE, lo, hi, 2700, series, store)
    assert read.level.resolution_seconds == 900
    assert (read.missing, read.live) == ([], [])
    # the range widens to whole 45 min bins counted from the epoch
    assert read.start.timestamp() == int(lo.timestamp()) // 2700 * 2700
    assert read.end.timestamp() == -(-int(hi.timestamp()) // 2700) * 2700
    _assert_matches(
        read, reference_reduction(samples, 2700, int(read.start.timestamp()), int(read.end.timestamp()))
    )

    # a 1 h read goes to the 1 h level, which has no blocks: served live, the month is missing
    hourly = read_series(SOURCE, lo, hi, 3600, series, store)
    assert hourly.level.resolution_seconds == 3600
    assert hourly.missing == [dt.datetime(2026, 4, 1, tzinfo=dt.UTC), dt.datetime(2026, 5, 1, tzinfo=dt.UTC)]
    _assert_matches(
        hourly, reference_reduction(samples, 3600, int(hourly.start.timestamp()), int(hourly.end.timestamp()))
    )


def test_bad_reads_are_refused_naming_the_parameter(tmp_path: Path) -> None:
    series = SeriesSettings(
        sqlite_path=tmp_path / "s.sqlite3", sources={SOURCE: {"cache_levels": LEVELS}}, max_read_bins=100
    )
    store = open_store(StoreSettings(root=tmp_path / "store"))
    cases = {
        "start": (START, START, 60),
        "resolution": (START, START + dt.timedelta(hours=1), 45),
        "end": (START, START + dt.timedelta(hours=2), 60),  # 120 bins > 100
    }
    for field, (lo, hi, resolution) in cases.items():
        with pytest.raises(SeriesRequestError) as e:
            read_series(SOURCE, lo, hi, resolution, series, store)
        assert e.value.field == field
        assert SOURCE in str(e.value)
    assert not list(store.list("series/"))


@pytest.fixture(params=["database", "reader"])
def settings(
    request: pytest.FixtureRequest, tmp_path: Path, configure: Callable[..., Settings]
) -> tuple[Settings, list[dict[str, Any]]]:
    samples = make_samples(np.random.default_rng(9), new_nodes(2), START, 3 * DAY, step=120, statuses="MRE")
    source: dict[str, Any] = {"cache_levels": ["60 s | daily", "1 h | monthly"]}
    if request.param == "reader":
        source["reader"] = _reader_script(tmp_path, samples)
    series = SeriesSettings(sqlite_path=tmp_path / "s.sqlite3", sources={SOURCE: source})
    if request.param == "database":
        _store_samples(series, samples)
    body = series.model_dump(mode="json")
    return configure(StoreSettings(root=tmp_path / "store"), series=body), samples


@pytest.mark.usefixtures("prefect_harness")
def test_a_miss_is_served_live_and_equals_the_cached_answer_once_seeded(
    settings: tuple[Settings, list[dict[str, Any]]],
) -> None:
    config, samples = settings
    store = open_store(config.store)
    seeded = seed_series(source=SOURCE, start=DAYS[1], end=DAYS[2], levels=["60s"], return_state=True)
    assert seeded.is_completed(), seeded.message
    lo, hi = START + dt.timedelta(hours=3), START + dt.timedelta(days=2, hours=21, minutes=10)

    live = read_series(SOURCE, lo, hi, 600, config.series, store)
    assert live.level.resolution_seconds == 60
    assert live.missing == [DAYS[0], DAYS[2]]
    _assert_matches(
        live, reference_reduction(samples, 600, int(live.start.timestamp()), int(live.end.timestamp()))
    )

    seeded = seed_series(source=SOURCE, blocks={"60s": live.missing}, return_state=True)
    assert seeded.is_completed(), seeded.message
    cached = read_series(SOURCE, lo, hi, 600, config.series, store)
    assert (cached.missing, cached.live) == ([], [])
    _assert_same(live, cached)

    # a period not ended yet is served live but never reported for seeding
    later = read_series(SOURCE, lo, hi, 600, config.series, store, now=DAYS[2] + dt.timedelta(hours=22))
    assert later.missing == []
    _assert_same(later, cached)


def _failing_source(tmp_path: Path, kind: str) -> dict[str, Any]:
    script = tmp_path / f"{kind}.py"
    body = {
        "exit": (
            "import sys\nprint('node,timestamp_s')\n"
            "sys.stderr.write('archive tape 7 offline\\n')\nsys.exit(3)\n"
        ),
        "malformed": (
            "print('node,timestamp_s,co2_ppm,temperature_celsius,rel_humidity_percent,status')\n"
            "print('4f6a3c1e-8d7b-4c2a-9e5f-0a1b2c3d4e5f,1777507200,412,21.5,40,M')\n"
            "print('4f6a3c1e-8d7b-4c2a-9e5f-0a1b2c3d4e5f,1777507260,lots,21.5,40,M')\n"
        ),
        "timeout": (
            "import sys, time\nsys.stderr.write('waiting for the archive\\n')\n"
            "sys.stderr.flush()\ntime.sleep(30)\n"
        ),
        "flood": "import sys\nprint('node,timestamp_s')\nsys.stdout.write('x' * 100000)\n",
    }[kind]
    script.write_text(body)
    return {
        "cache_levels": ["60 s | daily"],
        "reader": [sys.executable, str(script), "{start}", "{end}"],
        "reader_timeout_seconds": 1.5,
        "reader_max_bytes": 10000,
    }


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("exit", "exited with status 3; stderr: archive tape 7 offline"),
        ("malformed", "malformed CSV at line 3: co2_ppm 'lots' is not a number"),
        ("timeout", "timed out after 1.5 s (reader_timeout_seconds); stderr: waiting for the archive"),
        ("flood", "wrote more than 10000 bytes (reader_max_bytes)"),
    ],
)
def test_a_failing_reader_fails_naming_source_and_range_and_leaves_no_block(
    kind: str, says: str, tmp_path: Path, configure: Callable[..., Settings]
) -> None:
    series = SeriesSettings(
        sqlite_path=tmp_path / "s.sqlite3", sources={SOURCE: _failing_source(tmp_path, kind)}
    )
    config = configure(StoreSettings(root=tmp_path / "store"), series=series.model_dump(mode="json"))
    store = open_store(config.store)
    where = f"series source {SOURCE!r}, reader for 2026-04-30T00:00:00Z/2026-05-01T00:00:00Z"

    with pytest.raises(SeriesReaderError) as e:
        read_series(SOURCE, DAYS[0], DAYS[1], 60, config.series, store)
    assert where in str(e.value)
    assert says in str(e.value)

    state = seed_series(source=SOURCE, start=DAYS[0], end=DAYS[1], return_state=True)
    assert state.is_failed()
    assert where in (state.message or "")
    assert list(store.list("series/")) == []

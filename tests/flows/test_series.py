"""The series flows on a Prefect server: ingest-samples reports exact counts and rebuilds touched blocks."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from skyvault.config.settings import Settings, StoreSettings
from skyvault.flows.series import ingest_samples, seed_series
from skyvault.series.samples import SampleIngestReport
from skyvault.storage.store import open_store
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
    stored_rows,
    table_artifact,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")

START = dt.datetime(2026, 4, 28, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path, configure: Callable[..., Settings]) -> Settings:
    series = database_settings(
        request.param,
        tmp_path,
        request,
        sources={SOURCE: {"cache_levels": ["60 s | daily", "1 h | monthly"]}},
    )
    body = series.model_dump(mode="json")
    return configure(StoreSettings(root=tmp_path / "store"), series=body)


def _ingest() -> tuple[Any, SampleIngestReport]:
    state = ingest_samples(source=SOURCE, return_state=True)
    report = state.result(raise_on_failure=False)
    assert isinstance(report, SampleIngestReport), report
    return state, report


def _day_keys(samples: list[dict[str, Any]]) -> set[str]:
    days = {dt.datetime.fromtimestamp(ts - ts % DAY, dt.UTC) for _, ts in pairs(samples)}
    return {f"series/{SOURCE}/60s/{d:%Y%m%dT%H%M%SZ}.parquet" for d in days}


def test_ingest_samples_reports_exact_counts_and_rebuilds_the_touched_blocks(settings: Settings) -> None:
    store = open_store(settings.store)
    landing = f"landing/samples/{SOURCE}"
    rng = np.random.default_rng(21)
    nodes = new_nodes(2)
    days = make_samples(rng, nodes, START, 4 * DAY, step=600)  # 28 April .. 1 May
    first = [s for s in days if s["timestamp_s"] < START.timestamp() + 2 * DAY]
    store.put_bytes(f"{landing}/first.jsonl", jsonl(first))

    state, report = _ingest()
    assert state.is_completed()
    assert state.name == "Completed"
    assert (report.inserted, report.duplicate, report.rejected) == (len(first), 0, 0)
    summary = table_artifact(state.state_details.flow_run_id, "ingest-samples-summary")
    assert summary[-1] == {
        "file": "total",
        "status": "",
        "inserted": len(first),
        "duplicate": 0,
        "rejected": 0,
        "first rejection": "",
    }
    blocks = {o.key for o in store.list(f"series/{SOURCE}/")}
    assert {k for k in blocks if "/60s/" in k} == _day_keys(first)
    assert {k for k in blocks if "/3600s/" in k} == {f"series/{SOURCE}/3600s/20260401T000000Z.parquet"}

    # the same file re-sent under a new name, an overlapping CSV with two bad lines, a backfill
    # dump that repeats its second day
    second = [s for s in days if START.timestamp() + DAY <= s["timestamp_s"] < START.timestamp() + 3 * DAY]
    bad = [dict(second[4], co2_ppm=12000), dict(second[9], temperature_celsius=41.0)]
    backfill = [s for s in days if s["timestamp_s"] >= START.timestamp() + 2 * DAY]
    repeat = [s for s in backfill if s["timestamp_s"] < START.timestamp() + 3 * DAY]
    store.put_bytes(f"{landing}/first-again.jsonl", jsonl(first))
    store.put_bytes(f"{landing}/second.csv", csv_bytes(second[:4] + bad + second[4:]))
    store.put_bytes(f"{landing}/zz-backfill.json", fixture_json(backfill + repeat))
    before = {k: store.get_bytes(k) for k in blocks}

    state, report = _ingest()
    assert state.is_completed()
    by_file = {f.key.rsplit("/", 1)[1]: f for f in report.files}
    assert by_file["first.jsonl"].skipped
    assert (by_file["first-again.jsonl"].inserted, by_file["first-again.jsonl"].duplicate) == (0, len(first))
    new_in_second = pairs(second) - pairs(first)
    assert (by_file["second.csv"].inserted, by_file["second.csv"].rejected) == (len(new_in_second), 2)
    assert by_file["second.csv"].duplicate == len(second) - len(new_in_second)
    new_in_backfill = pairs(backfill) - pairs(first) - pairs(second)
    assert by_file["zz-backfill.json"].inserted == len(new_in_backfill)
    assert by_file["zz-backfill.json"].duplicate == len(backfill) + len(repeat) - len(new_in_backfill)

    rows = stored_rows(settings.series)
    assert len(rows) == len(pairs(days))
    assert {(r[0], r[1]) for r in rows} == pairs(days)

    files = {
        row["file"]: row for row in table_artifact(state.state_details.flow_run_id, "ingest-samples-summary")
    }
    assert files[f"{landing}/first.jsonl"]["status"] == "already ingested"
    assert files["total"]["inserted"] == report.inserted == len(pairs(days)) - len(first)
    assert files["total"]["duplicate"] == report.duplicate
    assert files["total"]["rejected"] == 2
    rejections = table_artifact(state.state_details.flow_run_id, "ingest-samples-rejections")
    assert [(r["file"], r["line"]) for r in rejections] == [
        (f"{landing}/second.csv", 6),
        (f"{landing}/second.csv", 7),
    ]
    assert "co2_ppm 12000" in rejections[0]["reason"]
    assert "temperature_celsius 41" in rejections[1]["reason"]

    # the first day got nothing new: its block was left alone; the month blocks cover April and May
    untouched = f"series/{SOURCE}/60s/{START:%Y%m%dT%H%M%SZ}.parquet"
    assert store.get_bytes(untouched) == before[untouched]
    blocks = {o.key for o in store.list(f"series/{SOURCE}/")}
    assert {k for k in blocks if "/60s/" in k} == _day_keys(days)
    assert {k for k in blocks if "/3600s/" in k} == {
        f"series/{SOURCE}/3600s/20260401T000000Z.parquet",
        f"series/{SOURCE}/3600s/20260501T000000Z.parquet",
    }
    # every day block counts exactly the day's reducible samples
    for key in _day_keys(days):
        table = pq.read_table(io.BytesIO(store.get_bytes(key)))
        day = dt.datetime.strptime(key.rsplit("/", 1)[1], "%Y%m%dT%H%M%SZ.parquet").replace(tzinfo=dt.UTC)
        lo, hi = day.timestamp(), day.timestamp() + DAY
        expected = sum(1 for s in days if lo <= s["timestamp_s"] < hi and s["status"] != "E")
        assert sum(table.column("co2_ppm_count").to_pylist()) == expected


def test_seed_series_builds_every_block_of_an_interval(settings: Settings) -> None:
    state = seed_series(
        source=SOURCE,
        start=dt.datetime(2026, 1, 30, 12),
        end=dt.datetime(2026, 2, 2, 0, 0, 1),
        return_state=True,
    )
    assert state.is_completed()
    keys = sorted(o.key for o in open_store(settings.store).list(f"series/{SOURCE}/"))
    assert keys == [
        f"series/{SOURCE}/3600s/20260101T000000Z.parquet",
        f"series/{SOURCE}/3600s/20260201T000000Z.parquet",
        f"series/{SOURCE}/60s/20260130T000000Z.parquet",
        f"series/{SOURCE}/60s/20260131T000000Z.parquet",
        f"series/{SOURCE}/60s/20260201T000000Z.parquet",
        f"series/{SOURCE}/60s/20260202T000000Z.parquet",
    ]
    summary = table_artifact(state.state_details.flow_run_id, "seed-series-summary")
    assert {r["level"]: r["blocks"] for r in summary} == {"60 s | daily": 4, "3600 s | monthly": 2}

"""Shared helpers of the series tests: sample generators, file writers, direct database reads."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from skyvault.config.settings import SeriesSettings, StoreSettings
from skyvault.storage.store import open_store

SOURCE = "office"
DAY = 86400


def database_settings(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, **extra: Any
) -> SeriesSettings:
    """SeriesSettings on a fresh SQLite file or a fresh plain PostgreSQL database."""
    sources = extra.pop("sources", {SOURCE: {}})
    if kind == "sqlite":
        return SeriesSettings(sqlite_path=tmp_path / "series.sqlite3", sources=sources, **extra)
    from bench.common import create_database

    server = request.getfixturevalue("pgstac_server")
    dsn = create_database(server.port, "series_" + os.urandom(6).hex())
    return SeriesSettings(database="postgresql", dsn=dsn, sources=sources, **extra)


def _fetch(series: SeriesSettings, query: str) -> list[tuple[Any, ...]]:
    """The rows of ``query`` read straight from the sample database."""
    if series.database == "sqlite":
        with sqlite3.connect(series.sqlite_path) as conn:
            return list(conn.execute(query).fetchall())
    assert series.dsn is not None
    with psycopg.connect(series.dsn) as pg:
        return list(pg.execute(query).fetchall())


def stored_rows(series: SeriesSettings) -> list[tuple[str, int, float, float, float, str]]:
    """Every stored sample read straight from the database: node, ts, co2, temperature, humidity, status."""
    rows = _fetch(
        series,
        "SELECT node, ts, co2_ppm, temperature_celsius, rel_humidity_percent, status"
        " FROM series_samples ORDER BY node, ts",
    )
    return [(str(r[0]), int(r[1]), float(r[2]), float(r[3]), float(r[4]), str(r[5])) for r in rows]


def recorded_files(series: SeriesSettings) -> list[tuple[str, str, str, int, int, int]]:
    """The ``series_files`` records read straight from the database: source, key, sha256, inserted,
    duplicate, rejected, by key."""
    rows = _fetch(
        series,
        "SELECT source, key, sha256, inserted, duplicate, rejected FROM series_files ORDER BY key, sha256",
    )
    return [(str(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows]


def put_sample_file(store: StoreSettings, name: str, data: bytes) -> str:
    """Land ``data`` as ``landing/samples/<SOURCE>/<name>``; returns its key."""
    key = f"landing/samples/{SOURCE}/{name}"
    open_store(store).put_bytes(key, data)
    return key


def table_artifact(flow_run_id: uuid.UUID | str | None, key: str) -> list[dict[str, Any]]:
    """The rows of the flow run's table artifact ``key`` (exactly one must exist)."""
    assert flow_run_id is not None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(str(flow_run_id))]),
                key=ArtifactFilterKey(any_=[key]),
            )
        )
    assert len(found) == 1, f"artifact {key}"
    data = found[0].data
    rows = json.loads(data) if isinstance(data, str) else data
    assert isinstance(rows, list)
    return rows


def make_samples(
    rng: np.random.Generator,
    nodes: list[str],
    start: dt.datetime,
    seconds: int,
    step: int = 60,
    keep: float = 0.7,
    statuses: str = "MR",
) -> list[dict[str, Any]]:
    """Valid samples of each node every ``step`` s over ``seconds`` from ``start``, a random ``keep`` share
    of them (gaps), with random values inside the default limits."""
    t0 = int(start.timestamp())
    out: list[dict[str, Any]] = []
    for node in nodes:
        for ts in range(t0, t0 + seconds, step):
            if rng.random() > keep:
                continue
            out.append(
                {
                    "node": node,
                    "timestamp_s": ts,
                    "co2_ppm": float(rng.integers(350, 5000)),
                    "temperature_celsius": round(float(rng.integers(-200, 400)) / 10, 1),
                    "rel_humidity_percent": round(float(rng.uniform(0, 100)), 2),
                    "status": str(rng.choice(list(statuses))),
                }
            )
    return out


def many_samples_jsonl(
    count: int, seed: int, bad_every: int | None = None
) -> tuple[bytes, set[tuple[str, int]], int]:
    """JSON lines of ``count`` samples of four nodes, one minute apart, quickly written; with
    ``bad_every``, every such sample has an invalid status.

    Returns the file, the (node, timestamp) pairs of its valid samples, and its invalid count.
    """
    rng = np.random.default_rng(seed)
    nodes = [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(4)]
    co2 = rng.integers(350, 5000, count)
    temperature = rng.integers(-200, 400, count)
    humidity = rng.integers(0, 10000, count)
    t0 = 1_782_000_000
    lines = []
    valid: set[tuple[str, int]] = set()
    bad = 0
    for i in range(count):
        node, ts = nodes[i % 4], t0 + (i // 4) * 60
        status = "M"
        if bad_every is not None and i % bad_every == bad_every // 2:
            status, bad = "Q", bad + 1
        else:
            valid.add((node, ts))
        lines.append(
            f'{{"node": "{node}", "timestamp_s": {ts}, "co2_ppm": {co2[i]}, '
            f'"temperature_celsius": {temperature[i] / 10}, "rel_humidity_percent": {humidity[i] / 100}, '
            f'"status": "{status}"}}\n'
        )
    return "".join(lines).encode(), valid, bad


def new_nodes(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def jsonl(samples: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(s) + "\n" for s in samples).encode()


def csv_bytes(samples: list[dict[str, Any]], iso: bool = False) -> bytes:
    out = io.StringIO()
    fields = [
        "node",
        "timestamp" if iso else "timestamp_s",
        "co2_ppm",
        "temperature_celsius",
        "rel_humidity_percent",
        "status",
    ]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for s in samples:
        row = dict(s)
        if iso:
            row["timestamp"] = dt.datetime.fromtimestamp(row.pop("timestamp_s"), dt.UTC).isoformat()
        writer.writerow(row)
    return out.getvalue().encode()


def fixture_json(samples: list[dict[str, Any]]) -> bytes:
    """A Django-style fixture dump, one entry per sample, indented as ``dumpdata --indent 2`` writes."""
    entries = [{"model": "airquality.sample", "pk": n + 1, "fields": s} for n, s in enumerate(samples)]
    return json.dumps(entries, indent=2).encode()


def pairs(samples: list[dict[str, Any]]) -> set[tuple[str, int]]:
    return {(s["node"], int(s["timestamp_s"])) for s in samples}


def reference_reduction(
    samples: list[dict[str, Any]], resolution: int, lo: int, hi: int
) -> dict[tuple[str, int], dict[str, tuple[float, float, float, int]]]:
    """min/mean/max/count per variable, per (node, epoch-aligned bin start) of the reducible samples
    (status not E) in [lo, hi): the reduction computed apart from skyvault's, for comparison."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for s in samples:
        if lo <= s["timestamp_s"] < hi and s["status"] != "E":
            groups.setdefault((s["node"], s["timestamp_s"] // resolution * resolution), []).append(s)
    return {
        key: {
            v: (min(m[v] for m in ms), float(np.mean([m[v] for m in ms])), max(m[v] for m in ms), len(ms))
            for v in ("co2_ppm", "temperature_celsius", "rel_humidity_percent")
        }
        for key, ms in groups.items()
    }

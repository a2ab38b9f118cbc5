"""Task adapters for :mod:`skyvault.series`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from prefect import task

from skyvault.config.settings import LockSettings, SeriesSettings, StoreSettings
from skyvault.series import ingest
from skyvault.series.blocks import BlockInfo
from skyvault.series.samples import SampleFileResult
from skyvault.tasks.policy import TASK_POLICY


@task(name="list-sample-files", **TASK_POLICY)
def list_sample_files(source: str, series: SeriesSettings, store: StoreSettings) -> list[str]:
    """Task: :func:`skyvault.series.ingest.list_sample_files`."""
    return ingest.list_sample_files(source, series, store)


@task(
    name="ingest-sample-file",
    task_run_name="ingest-samples/{source}/{key}",
    tags=["object-store-read"],
    **TASK_POLICY,
)
def ingest_sample_file(
    source: str,
    key: str,
    series: SeriesSettings,
    store: StoreSettings,
    scratch_dir: Path | None = None,
    stale_scratch_seconds: float = 24 * 3600.0,
) -> SampleFileResult:
    """Task: :func:`skyvault.series.ingest.ingest_sample_file` (one transaction per file)."""
    return ingest.ingest_sample_file(source, key, series, store, scratch_dir, stale_scratch_seconds)


@task(name="seed-blocks", task_run_name="seed-series/{source}/{level}", **TASK_POLICY)
def seed_blocks(
    source: str,
    level: str,
    starts: list[dt.datetime],
    series: SeriesSettings,
    store: StoreSettings,
    locks: LockSettings,
) -> list[BlockInfo]:
    """Task: :func:`skyvault.series.ingest.seed_blocks`.

    No concurrency tag: it holds the level's store lock while it runs, so it never waits for a slot
    while others wait for its lock.
    """
    return ingest.seed_blocks(source, level, starts, series, store, locks)

"""The series flows: ingest sensor samples (``ingest-samples``) and build reduced blocks (``seed-series``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from skyvault.config.settings import SeriesSettings, get_settings
from skyvault.errors import InvalidRequestError, RunFailedError, SampleIngestFailedError
from skyvault.series.blocks import BlockInfo
from skyvault.series.ingest import landing_prefix
from skyvault.series.reduce import periods_between, periods_of_hours
from skyvault.series.samples import SampleFileResult, SampleIngestReport
from skyvault.tasks.series import ingest_sample_file, list_sample_files, seed_blocks

#: Rejected lines listed in the run's rejection table (all of them are in the run's result).
MAX_LISTED_REJECTIONS = 1000


def _run_name(flow_name: str) -> str:
    from prefect.runtime import flow_run

    return f"{flow_name}/{flow_run.parameters.get('source')}"


def _ingest_run_name() -> str:
    return _run_name("ingest-samples")


def _seed_run_name() -> str:
    return _run_name("seed-series")


def _utc(when: dt.datetime) -> dt.datetime:
    """An aware UTC time; a time without a zone is taken as UTC."""
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def touched_blocks(series: SeriesSettings, source: str, hours: list[int]) -> dict[str, list[dt.datetime]]:
    """The period starts, per cache level of ``source``, of the blocks holding the given UTC hours."""
    return {level.name: periods_of_hours(hours, level.period) for level in series.source(source).cache_levels}


def _ingest_artifacts(report: SampleIngestReport) -> None:
    rows: list[dict[str, Any]] = []
    for f in report.files:
        rows.append(
            {
                "file": f.key,
                "status": "already ingested" if f.skipped else "ingested",
                "inserted": f.inserted,
                "duplicate": f.duplicate,
                "rejected": f.rejected,
                "first rejection": (
                    f"line {f.rejections[0].line}: {f.rejections[0].reason}" if f.rejections else ""
                ),
            }
        )
    for key, message in report.failed.items():
        rows.append(
            {
                "file": key,
                "status": "failed",
                "inserted": 0,
                "duplicate": 0,
                "rejected": 0,
                "first rejection": message,
            }
        )
    rows.append(
        {
            "file": "total",
            "status": "",
            "inserted": report.inserted,
            "duplicate": report.duplicate,
            "rejected": report.rejected,
            "first rejection": "",
        }
    )
    create_table_artifact(key="ingest-samples-summary", table=rows, description=report.headline())
    rejected = [
        {"file": f.key, "line": r.line, "reason": r.reason} for f in report.files for r in f.rejections
    ]
    if rejected:
        shown = rejected[:MAX_LISTED_REJECTIONS]
        more = f" (the first {len(shown)} of {report.rejected})" if report.rejected > len(shown) else ""
        create_table_artifact(
            key="ingest-samples-rejections",
            table=shown,
            description=f"source {report.source}: rejected samples{more}",
        )


@flow(name="ingest-samples", flow_run_name=_ingest_run_name)
def ingest_samples(
    source: str, keys: list[str] | None = None, seed: bool = True
) -> State[SampleIngestReport]:
    """Store the new samples of a source's files under ``landing/samples/<source>/`` (or of ``keys``).

    Each file goes in with one transaction: its valid samples whose (node, timestamp) is not stored
    yet are inserted, the others counted as duplicates, invalid ones rejected with their line and
    reason. A file ingested before (same key and content) is skipped. The counts go to the table
    artifact ``ingest-samples-summary`` (rejected lines to ``ingest-samples-rejections``).

    With ``seed``, the blocks of every cache level that hold new samples are rebuilt by a
    ``seed-series`` subflow run at the end. Ends Completed; named ``Partial`` when a file could not
    be read or seeding failed; Failed when no file could be read.
    """
    settings = get_settings()
    series = settings.series
    series.source(source)
    if keys is None:
        keys = list_sample_files(source, series, settings.store)
    else:
        prefix = landing_prefix(series, source)
        outside = [k for k in keys if not k.startswith(prefix)]
        if outside:
            raise InvalidRequestError(f"files {outside} are not under {prefix} (source {source!r})")
    results: list[SampleFileResult] = []
    failed: dict[str, str] = {}
    for key in keys:
        state = ingest_sample_file(
            source,
            key,
            series,
            settings.store,
            settings.scratch_dir,
            settings.limits.stale_scratch_seconds,
            return_state=True,
        )
        if state.is_completed():
            results.append(state.result())
        else:
            failed[key] = state.message or f"ingesting {key} failed"
    report = SampleIngestReport(source=source, files=results, failed=failed)
    _ingest_artifacts(report)
    seed_failed = None
    if seed and report.hours:
        seeded = seed_series(
            source=source, blocks=touched_blocks(series, source, report.hours), return_state=True
        )
        if not seeded.is_completed():
            seed_failed = f"seeding the new samples' blocks failed: {seeded.message}"
    message = report.headline() + (f"; {seed_failed}" if seed_failed else "")
    if failed and not results:
        return Failed(message=message, data=SampleIngestFailedError(message, report))
    if failed or seed_failed:
        return Completed(message=message, data=report, name="Partial")
    return Completed(message=message, data=report)


@flow(name="seed-series", flow_run_name=_seed_run_name)
def seed_series(
    source: str,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    blocks: dict[str, list[dt.datetime]] | None = None,
    levels: list[str] | None = None,
) -> State[list[BlockInfo]]:
    """Build reduced series blocks of a source, for a time interval or for listed periods.

    ``start``/``end`` (UTC; a time without a zone is UTC): every block of every cache level (or of
    ``levels``, named by resolution folder such as ``60s``) that overlaps ``[start, end)``.
    ``blocks``: level name -> the periods to rebuild (what ``ingest-samples`` passes). Each block
    holds min / mean / max / count per node, bin and variable, and is written whole to
    ``series/<source>/<resolution>/<period-start>.parquet``. Samples come from the source's reader
    command when it has one (a period it fails on gets no block), else from the sample database.
    """
    settings = get_settings()
    series = settings.series
    config = series.source(source)
    known = {level.name: level for level in config.cache_levels}
    wanted = levels if levels is not None else list(known)
    unknown = [name for name in [*wanted, *(blocks or {})] if name not in known]
    if unknown:
        raise InvalidRequestError(
            f"source {source!r} has no cache level {unknown} (configured: {', '.join(known) or 'none'})"
        )
    if blocks is None:
        if start is None or end is None or _utc(start) >= _utc(end):
            raise InvalidRequestError("seed-series needs start < end, or blocks")
        plan = {name: periods_between(_utc(start), _utc(end), known[name].period) for name in wanted}
    else:
        if start is not None or end is not None:
            raise InvalidRequestError("seed-series takes either start and end, or blocks")
        plan = {name: [_utc(t) for t in blocks[name]] for name in wanted if name in blocks}
    size = series.blocks_per_task
    futures = [
        (name, seed_blocks.submit(source, name, starts[i : i + size], series, settings.store, settings.locks))
        for name, starts in plan.items()
        for i in range(0, len(starts), size)
    ]
    written: list[BlockInfo] = []
    failures: list[str] = []
    for name, future in futures:
        future.wait()
        state = future.state
        if state.is_completed():
            written.extend(state.result())
        else:
            failures.append(f"{name}: {state.message}")
    create_table_artifact(
        key="seed-series-summary",
        table=[
            {
                "level": str(known[name]),
                "blocks": sum(1 for b in written if b.level == str(known[name])),
                "rows": sum(b.rows for b in written if b.level == str(known[name])),
            }
            for name in plan
        ],
        description=f"source {source}: {len(written)} block(s) written, {len(failures)} task(s) failed",
    )
    message = f"source {source}: {len(written)} block(s) written"
    if failures:
        message += f"; failed: {'; '.join(failures)}"
        return Failed(message=message, data=RunFailedError(message, written))
    return Completed(message=message, data=written)

"""The steps the series flows run: list a source's sample files, ingest one, build blocks."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence

from skyvault.config.settings import LockSettings, SeriesSettings, StoreSettings
from skyvault.errors import InvalidRequestError, SampleFileError
from skyvault.ids import check_id
from skyvault.series.blocks import BlockInfo, build_blocks
from skyvault.series.database import sample_database
from skyvault.series.readers import full_resolution
from skyvault.series.samples import SampleFileResult, parse_samples, sample_format
from skyvault.storage.store import open_store


def landing_prefix(series: SeriesSettings, source: str) -> str:
    """Where a source's sample files arrive: ``landing/samples/<source>/``."""
    return f"{series.landing_prefix}/{check_id(source, 'series source')}/"


def list_sample_files(source: str, series: SeriesSettings, store: StoreSettings) -> list[str]:
    """Keys of the source's sample files (known extensions, hidden files left out), sorted."""
    prefix = landing_prefix(series, source)
    return sorted(o.key for o in open_store(store).list(prefix) if sample_format(o.key) is not None)


def ingest_sample_file(
    source: str, key: str, series: SeriesSettings, store: StoreSettings
) -> SampleFileResult:
    """Read one sample file and store its new samples; a file ingested before is skipped.

    Raises:
        SampleFileError: the file is too large or cannot be read as a whole (names source, file, line).
        SeriesDatabaseError: the database refused the samples (nothing of this file is stored).

    """
    config = series.source(source)
    objects = open_store(store)
    info = objects.head(key)
    if info is not None and info.size > series.max_file_bytes:
        raise SampleFileError(
            f"source {source!r}, file {key!r}: {info.size} bytes is over series.max_file_bytes "
            f"({series.max_file_bytes}; SKYVAULT_SERIES__MAX_FILE_BYTES raises it)"
        )
    data = objects.get_bytes(key)
    sha256 = hashlib.sha256(data).hexdigest()
    with sample_database(series) as db:
        if db.file_ingested(source, key, sha256):
            return SampleFileResult(source=source, key=key, sha256=sha256, skipped=True)
        parsed = parse_samples(data, key, source, config.limits)
        outcome = db.ingest_file(source, key, sha256, parsed.samples, len(parsed.rejections))
    if outcome is None:  # another run recorded the same file meanwhile
        return SampleFileResult(source=source, key=key, sha256=sha256, skipped=True)
    return SampleFileResult(
        source=source,
        key=key,
        sha256=sha256,
        inserted=outcome.inserted,
        duplicate=outcome.duplicate,
        rejected=len(parsed.rejections),
        rejections=parsed.rejections,
        hours=sorted(outcome.hours),
    )


def seed_blocks(
    source: str,
    level: str,
    starts: Sequence[dt.datetime],
    series: SeriesSettings,
    store: StoreSettings,
    locks: LockSettings,
) -> list[BlockInfo]:
    """Build the blocks of one level (named by its resolution folder, ``60s``) for the given periods.

    Samples come from the source's reader when it has one, else from the sample database.
    """
    config = series.source(source)
    by_name = {lv.name: lv for lv in config.cache_levels}
    if level not in by_name:
        raise InvalidRequestError(
            f"source {source!r} has no cache level {level!r} (configured: {', '.join(by_name) or 'none'})"
        )
    with full_resolution(config, series) as samples:
        return build_blocks(samples, open_store(store), config, by_name[level], starts, series.prefix, locks)

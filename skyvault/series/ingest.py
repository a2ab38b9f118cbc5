"""The steps the series flows run: list a source's sample files, ingest one, build blocks."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import tempfile
from collections.abc import Sequence
from pathlib import Path

from skyvault.cog.scratch import is_out_of_space, scratch_folder
from skyvault.config.settings import LockSettings, SeriesSettings, StoreSettings
from skyvault.errors import InvalidRequestError, SampleFileError, SkyvaultError, StorageError
from skyvault.ids import check_id
from skyvault.series.blocks import BlockInfo, build_blocks
from skyvault.series.database import sample_database
from skyvault.series.readers import full_resolution
from skyvault.series.samples import FORMATS, SampleFileResult, sample_format, stream_samples
from skyvault.storage.store import ObjectStore, open_store


def landing_prefix(series: SeriesSettings, source: str) -> str:
    """Where a source's sample files arrive: ``landing/samples/<source>/``."""
    return f"{series.landing_prefix}/{check_id(source, 'series source')}/"


def list_sample_files(source: str, series: SeriesSettings, store: StoreSettings) -> list[str]:
    """Keys of the source's sample files (known extensions, hidden files left out), sorted."""
    prefix = landing_prefix(series, source)
    return sorted(o.key for o in open_store(store).list(prefix) if sample_format(o.key) is not None)


#: Bytes copied per read while a sample file is spooled from the store.
SPOOL_BLOCK_BYTES = 1024**2


def _spool(objects: ObjectStore, key: str, dest: Path, where: str) -> tuple[str, int]:
    """Copy object ``key`` to ``dest`` a block at a time; its sha256 and size, from the same pass.

    Raises:
        SampleFileError: the scratch disk has no room for the file.
        StorageError: the object cannot be read, or the copy cannot be written.

    """
    digest = hashlib.sha256()
    size = 0
    try:
        with objects.open_read(key) as src, dest.open("wb") as out:
            while block := src.read(SPOOL_BLOCK_BYTES):
                digest.update(block)
                out.write(block)
                size += len(block)
    except OSError as e:
        if is_out_of_space(e):
            raise SampleFileError(
                f"{where}: no space left on the scratch disk at {dest.parent} after {size} bytes; free "
                "some space or set scratch_dir (SKYVAULT_SCRATCH_DIR) to a larger disk"
            ) from e
        raise StorageError(f"{where}: cannot copy it to {dest}: {e}") from e
    return digest.hexdigest(), size


def _check_whole_size(size: int, series: SeriesSettings, where: str) -> None:
    if size > series.max_file_bytes:
        raise SampleFileError(
            f"{where}: {size} bytes is over series.max_file_bytes ({series.max_file_bytes}), the limit "
            "of fixture JSON files, which are read whole (SKYVAULT_SERIES__MAX_FILE_BYTES raises it; "
            "JSON lines and CSV files have no size limit)"
        )


def ingest_sample_file(
    source: str,
    key: str,
    series: SeriesSettings,
    store: StoreSettings,
    scratch_dir: Path | None = None,
    stale_scratch_seconds: float = 24 * 3600.0,
) -> SampleFileResult:
    """Read one sample file and store its new samples; a file ingested before is skipped.

    The file is copied to a scratch folder while its sha256 is computed, then read in chunks of
    ``series.ingest_chunk_samples`` samples that go into the database inside the file's one
    transaction: memory holds one chunk whatever the file's size (a fixture JSON file is read
    whole, up to ``series.max_file_bytes``). The result lists the first
    ``series.max_listed_rejections`` rejected samples and counts all. The copy is removed at the
    end; one left by a killed process is removed by the next ingest on this host.

    Args:
        source: The series source the file belongs to.
        key: The file's key under the source's landing prefix.
        series: The series settings (database, sources, limits).
        store: The object store holding the file.
        scratch_dir: Where the file is copied (default: the system temp dir).
        stale_scratch_seconds: Age after which a scratch folder of another host is swept.

    Raises:
        SampleFileError: the file cannot be read as a whole (format, encoding, size, no room on
            the scratch disk); names the source, the file and, where one is at fault, the line.
        SeriesDatabaseError: the database refused the samples (nothing of this file is stored).

    """
    config = series.source(source)
    where = f"source {source!r}, file {key!r}"
    fmt = sample_format(key)
    if fmt is None:
        raise SampleFileError(f"{where}: unknown sample format (extensions: {', '.join(FORMATS)})")
    objects = open_store(store)
    if fmt == "fixture":
        info = objects.head(key)
        if info is not None:
            _check_whole_size(info.size, series, where)
    base = scratch_dir if scratch_dir is not None else Path(tempfile.gettempdir())
    with contextlib.ExitStack() as stack:
        try:
            work = stack.enter_context(scratch_folder(base, "samples", where, stale_scratch_seconds))
        except SkyvaultError as e:
            reason = e.__cause__ or e
            raise SampleFileError(f"{where}: cannot create a scratch folder in {base}: {reason}") from e
        spool = work / "sample-file"
        sha256, size = _spool(objects, key, spool, where)
        if fmt == "fixture":
            _check_whole_size(size, series, where)  # the object may have been replaced meanwhile
        with sample_database(series) as db:
            if db.file_ingested(source, key, sha256):
                return SampleFileResult(source=source, key=key, sha256=sha256, skipped=True)
            with spool.open("rb") as f:
                stream = stream_samples(
                    f,
                    key,
                    source,
                    config.limits,
                    chunk_samples=series.ingest_chunk_samples,
                    max_listed_rejections=series.max_listed_rejections,
                )
                outcome = db.ingest_chunks(source, key, sha256, stream, lambda: stream.rejected)
    if outcome is None:  # another run recorded the same file meanwhile
        return SampleFileResult(source=source, key=key, sha256=sha256, skipped=True)
    return SampleFileResult(
        source=source,
        key=key,
        sha256=sha256,
        inserted=outcome.inserted,
        duplicate=outcome.duplicate,
        rejected=stream.rejected,
        rejections=stream.rejections,
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

"""Full-resolution samples for reductions: the sample database, or a source's reader command.

A source with ``reader`` set is read by running that command once per range: its arguments with
``{start}`` and ``{end}`` replaced by the range in ISO 8601 UTC (``2026-04-28T00:00:00Z``, end
exclusive), without a shell, under a timeout and an output cap. It writes CSV with the sample
files' columns (a header line, then one sample per line) to stdout and its errors to stderr. A run
that exits non-zero, times out, writes too much, or writes a line that is not a valid sample fails
the whole range, naming the source, the range and the tail of its stderr: a reduction never sees
part of a range. Samples outside the range are left out; a (node, timestamp) repeated keeps its
first line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from skyvault.config.settings import SeriesSettings, SeriesSource
from skyvault.errors import SampleFileError, SeriesReaderError
from skyvault.series.database import SampleArrays, sample_database
from skyvault.series.samples import VARIABLES, parse_samples

#: Characters of a failed reader's stderr quoted in its error.
STDERR_TAIL = 2000


class SampleReader(Protocol):
    """Where reductions read full-resolution samples (a :class:`SampleDatabase` is one)."""

    def read_samples(self, source: str, start_s: int, end_s: int, statuses: Sequence[str]) -> SampleArrays:
        """A source's samples with ``start_s <= ts < end_s`` and one of ``statuses``, by node and time."""
        ...


def iso(seconds: int) -> str:
    """Epoch seconds as ISO 8601 UTC with a ``Z``: ``2026-04-28T00:00:00Z``."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class CommandReader:
    """A source's reader command (:attr:`SeriesSource.reader`), run once per range."""

    def __init__(self, config: SeriesSource) -> None:
        if config.reader is None:
            raise ValueError(f"series source {config.id!r} has no reader")
        self.config = config
        self.command: tuple[str, ...] = config.reader

    def run(self, start_s: int, end_s: int) -> bytes:
        """The reader's stdout for ``[start_s, end_s)``.

        Raises:
            SeriesReaderError: it could not start, exited non-zero, timed out or wrote more than
                ``reader_max_bytes``; names the source, the range and the stderr tail.

        """
        config = self.config
        start, end = iso(start_s), iso(end_s)
        where = f"series source {config.id!r}, reader for {start}/{end}"
        args = [a.replace("{start}", start).replace("{end}", end) for a in self.command]
        try:
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group, killed whole on a timeout
            )
        except OSError as e:
            raise SeriesReaderError(f"{where}: cannot run {args[0]!r}: {e}") from e
        assert process.stdout is not None
        assert process.stderr is not None
        out: list[bytes] = []
        size = 0
        err = b""
        problem = None
        deadline = time.monotonic() + config.reader_timeout_seconds
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            selector.register(process.stderr, selectors.EVENT_READ)
            while selector.get_map() and problem is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    problem = f"timed out after {config.reader_timeout_seconds:g} s (reader_timeout_seconds)"
                    break
                for key, _ in selector.select(timeout=left):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                    elif key.fileobj is process.stdout:
                        size += len(chunk)
                        if size > config.reader_max_bytes:
                            problem = f"wrote more than {config.reader_max_bytes} bytes (reader_max_bytes)"
                            break
                        out.append(chunk)
                    else:
                        err = (err + chunk)[-4 * STDERR_TAIL :]
        if problem is None:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problem = f"timed out after {config.reader_timeout_seconds:g} s (reader_timeout_seconds)"
        if problem is not None:
            _kill(process)
        process.stdout.close()
        process.stderr.close()
        tail = err.decode("utf-8", "replace").strip()[-STDERR_TAIL:]
        stderr = f"; stderr: {tail}" if tail else "; no stderr"
        if problem is not None:
            raise SeriesReaderError(f"{where}: {problem}{stderr}")
        if process.returncode != 0:
            raise SeriesReaderError(f"{where}: exited with status {process.returncode}{stderr}")
        return b"".join(out)

    def read_samples(self, source: str, start_s: int, end_s: int, statuses: Sequence[str]) -> SampleArrays:
        """The reader's samples in ``[start_s, end_s)`` with one of ``statuses``, by node and time.

        Raises:
            SeriesReaderError: the run failed (see :meth:`run`), or its output is not CSV of valid
                samples; names the source, the range and the first bad line.

        """
        if source != self.config.id:
            raise ValueError(f"reader of series source {self.config.id!r} asked for source {source!r}")
        data = self.run(start_s, end_s)
        where = f"series source {source!r}, reader for {iso(start_s)}/{iso(end_s)}"
        if not data.strip():
            raise SeriesReaderError(f"{where}: wrote no CSV (not even the header line)")
        try:
            parsed = parse_samples(data, "reader-output.csv", source, self.config.limits)
        except SampleFileError as e:
            raise SeriesReaderError(f"{where}: malformed CSV: {e}") from e
        if parsed.rejections:
            first = parsed.rejections[0]
            more = f" (and {len(parsed.rejections) - 1} more)" if len(parsed.rejections) > 1 else ""
            raise SeriesReaderError(f"{where}: malformed CSV at line {first.line}: {first.reason}{more}")
        seen: set[tuple[str, int]] = set()
        rows: list[tuple[str, int, float, float, float]] = []
        wanted = set(statuses)
        for s in parsed.samples:
            pair = (str(s.node), s.timestamp_s)
            if pair in seen:
                continue
            seen.add(pair)
            if start_s <= s.timestamp_s < end_s and s.status in wanted:
                rows.append(
                    (pair[0], s.timestamp_s, s.co2_ppm, s.temperature_celsius, s.rel_humidity_percent)
                )
        rows.sort(key=lambda r: (r[0], r[1]))
        columns = list(zip(*rows, strict=True)) if rows else [(), (), (), (), ()]
        return SampleArrays(
            node=np.array(columns[0], dtype="U36"),
            ts=np.array(columns[1], dtype=np.int64),
            values={v: np.array(columns[2 + i], dtype=np.float64) for i, v in enumerate(VARIABLES)},
        )


@contextlib.contextmanager
def full_resolution(config: SeriesSource, series: SeriesSettings) -> Iterator[SampleReader]:
    """The source's full-resolution samples: its reader when it has one, else the sample database."""
    if config.reader is not None:
        yield CommandReader(config)
        return
    with sample_database(series) as db:
        yield db

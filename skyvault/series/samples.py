"""Sensor sample files: formats, parsing, validation, and the records an ingest run reports.

A source's files arrive under ``landing/samples/<source>/`` in one of three formats, told apart by
their extension:

- JSON lines (``.jsonl``, ``.ndjson``): one JSON object per line; blank lines are skipped.
- CSV (``.csv``): a header line naming the fields, then one sample per line.
- Fixture JSON (``.json``), as the platform's backfill tool dumps its database: a JSON array of
  Django-style fixture entries ``{"model": "<app>.sample", "pk": ..., "fields": {...}}``; entries
  of other models are rejected.

Every format carries the same fields: ``node`` (or ``node_id``, a UUID), the time as
``timestamp_s`` (UTC epoch seconds) or ``timestamp`` (ISO 8601 with a zone, or epoch seconds),
``co2_ppm``, ``temperature_celsius``, ``rel_humidity_percent`` and ``status``. Other fields are
ignored. Times are whole seconds. A sample that fails validation is rejected with its line number
(the first line of its fixture entry) and the reason; the rest of the file is kept.

:func:`stream_samples` reads a file in chunks of valid samples: JSON lines and CSV a line at a
time, so a file of any size is read in bounded memory; a fixture file is read whole.
:func:`parse_samples` reads a file held in memory at once.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import math
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field

from skyvault.config.settings import SampleLimits
from skyvault.errors import InvalidSampleError, SampleFileError

#: The measured variables of a sample, in the order they are stored and reduced.
VARIABLES: tuple[str, ...] = ("co2_ppm", "temperature_celsius", "rel_humidity_percent")

#: File extension -> format.
FORMATS: dict[str, str] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".json": "fixture"}

#: Latest accepted time (exclusive): 10000-01-01T00:00:00Z.
MAX_TIMESTAMP_S = 253402300800


@dataclass(frozen=True, slots=True)
class Sample:
    """One validated sample; ``line`` is where it was read in its file."""

    line: int
    node: uuid.UUID
    timestamp_s: int
    co2_ppm: float
    temperature_celsius: float
    rel_humidity_percent: float
    status: str


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Rejection(_Record):
    """A sample that was not stored: its line in the file and why."""

    line: int
    reason: str


@dataclass(frozen=True)
class ParsedSamples:
    """What one file held: valid samples (in file order) and rejected ones."""

    samples: list[Sample]
    rejections: list[Rejection]


class SampleFileResult(_Record):
    """The outcome of ingesting one sample file.

    ``duplicate`` counts valid samples whose (node, timestamp) was stored already (or earlier in
    the same file); ``hours`` are the UTC hours (epoch seconds) holding the samples this file
    added, from which the blocks to rebuild are derived. ``rejected`` counts every rejected sample;
    ``rejections`` lists the first ones (``series.max_listed_rejections``), so ``rejected -
    len(rejections)`` more were not listed. ``skipped``: this file (key and content) was ingested
    before, nothing was read into the database.
    """

    source: str
    key: str
    sha256: str
    skipped: bool = False
    inserted: int = 0
    duplicate: int = 0
    rejected: int = 0
    rejections: list[Rejection] = Field(default_factory=list)
    hours: list[int] = Field(default_factory=list)


class SampleIngestReport(_Record):
    """An ingest-samples run: one result per file read, and the files that could not be read."""

    source: str
    files: list[SampleFileResult] = Field(default_factory=list)
    failed: dict[str, str] = Field(default_factory=dict)

    @property
    def inserted(self) -> int:
        return sum(f.inserted for f in self.files)

    @property
    def duplicate(self) -> int:
        return sum(f.duplicate for f in self.files)

    @property
    def rejected(self) -> int:
        return sum(f.rejected for f in self.files)

    @property
    def hours(self) -> list[int]:
        """Every UTC hour (epoch seconds) that received new samples, sorted."""
        return sorted({h for f in self.files for h in f.hours})

    def headline(self) -> str:
        """One line for the run's state message."""
        skipped = sum(f.skipped for f in self.files)
        return (
            f"source {self.source}: {len(self.files) - skipped} file(s) ingested, {skipped} already "
            f"ingested, {len(self.failed)} failed; samples: {self.inserted} inserted, "
            f"{self.duplicate} duplicate, {self.rejected} rejected"
        )


def sample_format(key: str) -> str | None:
    """The format of a sample file from its key's extension, None when it is not a sample file."""
    name = key.rsplit("/", 1)[-1]
    if name.startswith("."):
        return None
    for ext, fmt in FORMATS.items():
        if name.lower().endswith(ext):
            return fmt
    return None


# --- validation -----------------------------------------------------------------------------------


def _number(raw: Mapping[str, Any], name: str) -> float:
    value: Any = raw.get(name)
    kind = type(value)
    if kind is str and value:  # the common cases first: CSV text, JSON numbers
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name} {value!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{name} {value!r} is not a finite number")
        return number
    if kind is float or kind is int:  # not bool, an int subclass
        if not math.isfinite(value):
            raise ValueError(f"{name} {value!r} is not a finite number")
        return float(value)
    if value is None or value == "":
        raise ValueError(f"{name} is missing")
    if isinstance(value, bool):
        raise ValueError(f"{name} {value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} {value!r} is not a number") from None
    if not isinstance(value, int | float):
        raise ValueError(f"{name} {value!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} {value!r} is not a finite number")
    return number


def _in_range(name: str, value: float, low: float, high: float, setting: str) -> float:
    if not low <= value <= high:
        raise ValueError(f"{name} {value:g} is outside {low:g}..{high:g} (limits.{setting}_min/_max)")
    return value


def _timestamp(raw: Mapping[str, Any]) -> int:
    if raw.get("timestamp_s") not in (None, ""):
        seconds = _number(raw, "timestamp_s")
    elif raw.get("timestamp") not in (None, ""):
        value = raw["timestamp"]
        if isinstance(value, str) and not _looks_numeric(value):
            try:
                when = dt.datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(f"timestamp {value!r} is not ISO 8601") from None
            if when.tzinfo is None:
                raise ValueError(f"timestamp {value!r} has no time zone (give Z or an offset)")
            if when.microsecond:
                raise ValueError(f"timestamp {value!r} is not a whole second")
            seconds = when.timestamp()
        else:
            seconds = _number(raw, "timestamp")
    else:
        raise ValueError("timestamp_s (or timestamp) is missing")
    if seconds != int(seconds):
        raise ValueError(f"timestamp {seconds!r} is not a whole second")
    if not 0 <= seconds < MAX_TIMESTAMP_S:
        raise ValueError(f"timestamp {seconds:.0f} is outside 1970..9999")
    return int(seconds)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


#: Node ids already parsed: a file names a few nodes many times (cleared when it grows large).
_NODES: dict[str, uuid.UUID] = {}
_MAX_CACHED_NODES = 100_000


def _node(text: str) -> uuid.UUID:
    node = _NODES.get(text)
    if node is None:
        try:
            node = uuid.UUID(text)
        except ValueError:
            raise ValueError(f"node {text!r} is not a UUID") from None
        if len(_NODES) >= _MAX_CACHED_NODES:
            _NODES.clear()
        _NODES[text] = node
    return node


def validate_sample(raw: Any, line: int, limits: SampleLimits) -> Sample:
    """One sample from its raw fields, checked against ``limits``.

    Raises:
        ValueError: the sample is invalid; the message is the reason.

    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"a sample is an object of fields, not {type(raw).__name__}")
    node_text = raw.get("node", raw.get("node_id"))
    if node_text in (None, ""):
        raise ValueError("node is missing")
    node = _node(str(node_text))
    timestamp_s = _timestamp(raw)
    co2 = _in_range("co2_ppm", _number(raw, "co2_ppm"), limits.co2_ppm_min, limits.co2_ppm_max, "co2_ppm")
    temperature = _in_range(
        "temperature_celsius",
        _number(raw, "temperature_celsius"),
        limits.temperature_celsius_min,
        limits.temperature_celsius_max,
        "temperature_celsius",
    )
    scaled = temperature * 10**limits.temperature_decimals
    if abs(scaled - round(scaled)) > 1e-6 * max(1.0, abs(scaled)):
        raise ValueError(
            f"temperature_celsius {temperature!r} has more than {limits.temperature_decimals} "
            "decimal(s) (limits.temperature_decimals)"
        )
    humidity = _in_range(
        "rel_humidity_percent",
        _number(raw, "rel_humidity_percent"),
        limits.rel_humidity_percent_min,
        limits.rel_humidity_percent_max,
        "rel_humidity_percent",
    )
    status = raw.get("status")
    if status in (None, ""):
        raise ValueError("status is missing")
    if status not in limits.statuses:
        raise ValueError(f"status {status!r} is not one of {', '.join(limits.statuses)} (limits.statuses)")
    return Sample(line, node, timestamp_s, co2, temperature, humidity, str(status))


# --- formats --------------------------------------------------------------------------------------


#: Longest line (in characters) of a JSON lines or CSV file. A longer line is rejected (JSON lines)
#: or fails its file (CSV) without being held in memory, so a file without line breaks cannot
#: exhaust memory.
MAX_LINE_CHARS = 1024**2

#: One record of a file as read: its line, its raw fields (None when unreadable), the problem.
_Raw = tuple[int, Any, str | None]


def _text(data: bytes, source: str, key: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SampleFileError(f"source {source!r}, file {key!r}, line {line}: not UTF-8 text") from e


def _lines(stream: IO[bytes], newline: str, source: str, key: str) -> Iterator[str | None]:
    """The text lines of ``stream`` (UTF-8, a leading BOM dropped), read one at a time.

    ``newline`` is the line ending as :class:`io.TextIOWrapper` takes it: a line feed alone, or
    ``""`` for any. A line longer than :data:`MAX_LINE_CHARS` is skipped unread and stands as None.

    Raises:
        SampleFileError: a line is not UTF-8 text; names the source, file and line.

    """
    ends = ("\n",) if newline == "\n" else ("\n", "\r")
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline=newline)
    try:
        number = 0
        while line := text.readline(MAX_LINE_CHARS):
            number += 1
            if len(line) == MAX_LINE_CHARS and not line.endswith(ends):
                while (rest := text.readline(MAX_LINE_CHARS)) and len(rest) == MAX_LINE_CHARS:
                    if rest.endswith(ends):
                        break
                yield None
                continue
            if not line.isascii():
                try:
                    line.encode("utf-8")  # bytes that were not UTF-8 decoded to lone surrogates
                except UnicodeEncodeError as e:
                    raise SampleFileError(
                        f"source {source!r}, file {key!r}, line {number}: not UTF-8 text"
                    ) from e
            yield line
    finally:
        with contextlib.suppress(ValueError):  # the stream was closed already
            text.detach()  # leaves the stream open for its owner


def _jsonl_records(lines: Iterable[str | None]) -> Iterator[_Raw]:
    for number, line in enumerate(lines, start=1):
        if line is None:
            yield number, None, f"a line longer than {MAX_LINE_CHARS} characters"
            continue
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except (ValueError, RecursionError) as e:
            yield number, None, f"not a JSON object: {e}"


def _csv_records(lines: Iterable[str | None], source: str, key: str) -> Iterator[_Raw]:
    def physical() -> Iterator[str]:
        for number, line in enumerate(lines, start=1):
            if line is None:
                raise SampleFileError(
                    f"source {source!r}, file {key!r}, line {number}: a line longer than "
                    f"{MAX_LINE_CHARS} characters; not a CSV sample file"
                )
            yield line

    reader = csv.DictReader(physical())
    try:
        fields = reader.fieldnames
    except csv.Error as e:
        raise SampleFileError(f"source {source!r}, file {key!r}, line 1: unreadable CSV header: {e}") from e
    if not fields:
        return
    missing = {"co2_ppm", "temperature_celsius", "rel_humidity_percent", "status"} - set(fields)
    if not ({"node", "node_id"} & set(fields)):
        missing.add("node")
    if not ({"timestamp_s", "timestamp"} & set(fields)):
        missing.add("timestamp_s")
    if missing:
        raise SampleFileError(
            f"source {source!r}, file {key!r}, line 1: the CSV header lacks {', '.join(sorted(missing))}"
        )
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, None, f"unreadable CSV: {e}"
            start = reader.line_num + 1
            continue
        if None in row:
            yield start, None, "more values than header fields"
        elif None in row.values():
            yield start, None, "fewer values than header fields"
        else:
            yield start, row, None
        start = reader.line_num + 1


def _fixture_records(text: str, source: str, key: str) -> Iterator[_Raw]:
    decoder = json.JSONDecoder()
    where = f"source {source!r}, file {key!r}"

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    pos = skip(0)
    if pos == len(text) or text[pos] != "[":
        raise SampleFileError(f"{where}, line {line_of(pos)}: a fixture file is a JSON array of entries")
    pos = skip(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line = line_of(pos)
        try:
            entry, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as e:
            raise SampleFileError(f"{where}, line {line}: not JSON: {e}") from e
        if not isinstance(entry, dict) or not isinstance(entry.get("fields"), dict):
            yield line, None, 'not a fixture entry {"model": ..., "fields": {...}}'
        elif not str(entry.get("model", "")).lower().endswith(".sample"):
            yield line, None, f"model {entry.get('model')!r} is not a sample model (<app>.sample)"
        else:
            yield line, entry["fields"], None
        pos = skip(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if skip(pos + 1) != len(text):
                raise SampleFileError(f"{where}, line {line_of(skip(pos + 1))}: text after the array")
            return
        raise SampleFileError(f"{where}, line {line_of(pos)}: expected ',' or ']' between entries")


def _records(stream: IO[bytes], key: str, source: str) -> Iterator[_Raw]:
    fmt = sample_format(key)
    if fmt == "jsonl":
        return _jsonl_records(_lines(stream, "\n", source, key))
    if fmt == "csv":
        return _csv_records(_lines(stream, "", source, key), source, key)
    if fmt == "fixture":
        return _fixture_records(_text(stream.read(), source, key), source, key)
    raise SampleFileError(
        f"source {source!r}, file {key!r}: unknown sample format (extensions: {', '.join(FORMATS)})"
    )


class SampleStream:
    """A sample file read as chunks of valid samples, its rejections counted on the way.

    Iterating (once) yields lists of at most ``chunk_samples`` valid samples, in file order;
    meanwhile ``rejected`` counts every rejected sample and ``rejections`` lists the first
    ``max_listed`` of them (every one when None). JSON lines and CSV are read a line at a time,
    so memory holds one chunk whatever the file's size; a fixture file is read whole.
    """

    def __init__(
        self, records: Iterator[_Raw], limits: SampleLimits, chunk_samples: int, max_listed: int | None
    ) -> None:
        if chunk_samples < 1:
            raise ValueError(f"chunk_samples must be at least 1, not {chunk_samples}")
        self._records = records
        self._limits = limits
        self._chunk_samples = chunk_samples
        self._max_listed = max_listed
        self.valid = 0
        self.rejected = 0
        self.rejections: list[Rejection] = []

    def __iter__(self) -> Iterator[list[Sample]]:
        chunk: list[Sample] = []
        for line, raw, problem in self._records:
            if problem is None:
                try:
                    sample = validate_sample(raw, line, self._limits)
                except ValueError as e:
                    problem = str(e)
                else:
                    chunk.append(sample)
                    if len(chunk) >= self._chunk_samples:
                        self.valid += len(chunk)
                        yield chunk
                        chunk = []
                    continue
            self.rejected += 1
            if self._max_listed is None or len(self.rejections) < self._max_listed:
                self.rejections.append(Rejection(line=line, reason=problem))
        if chunk:
            self.valid += len(chunk)
            yield chunk


def stream_samples(
    stream: IO[bytes],
    key: str,
    source: str,
    limits: SampleLimits,
    *,
    chunk_samples: int = 100_000,
    max_listed_rejections: int | None = None,
) -> SampleStream:
    """Read one sample file from ``stream`` in chunks; its format comes from the key's extension.

    The stream is read as the result is iterated (a fixture file at once) and left open.

    Raises:
        SampleFileError: the file as a whole cannot be read (see :func:`parse_samples`); raised
            while iterating when the fault lies past the file's start.

    """
    return SampleStream(_records(stream, key, source), limits, chunk_samples, max_listed_rejections)


def parse_samples(data: bytes, key: str, source: str, limits: SampleLimits) -> ParsedSamples:
    """Parse and validate one sample file held in memory; its format comes from the key's extension.

    Raises:
        SampleFileError: the file as a whole cannot be read (unknown format, not UTF-8, a line
            over :data:`MAX_LINE_CHARS` in a CSV file, a CSV header without the sample fields, a
            fixture that is not a JSON array); the message names the source, the file and the line.

    """
    stream = stream_samples(io.BytesIO(data), key, source, limits)
    samples = [sample for chunk in stream for sample in chunk]
    return ParsedSamples(samples=samples, rejections=stream.rejections)


def rejection_error(source: str, key: str, rejection: Rejection) -> InvalidSampleError:
    """The error naming one rejected sample (source, file, line, reason), for logs and reports."""
    return InvalidSampleError(source, key, rejection.line, rejection.reason)

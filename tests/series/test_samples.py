"""Sample files: the three formats read alike; bad samples are rejected with their line and reason."""

from __future__ import annotations

import datetime as dt
import io
import json

import numpy as np
import pytest

from skyvault.config.settings import SampleLimits, SeriesSettings
from skyvault.errors import SampleFileError
from skyvault.series.samples import MAX_LINE_CHARS, Sample, parse_samples, stream_samples
from tests.series.common import SOURCE, csv_bytes, fixture_json, jsonl, make_samples, new_nodes

LIMITS = SampleLimits()


def _as_tuples(parsed_samples: list[Sample]) -> list[tuple[object, ...]]:
    return [
        (str(s.node), s.timestamp_s, s.co2_ppm, s.temperature_celsius, s.rel_humidity_percent, s.status)
        for s in parsed_samples
    ]


def test_every_format_reads_the_same_samples() -> None:
    samples = make_samples(
        np.random.default_rng(1), new_nodes(2), dt.datetime(2026, 3, 1, tzinfo=dt.UTC), 3600
    )
    expected = [
        (
            s["node"],
            s["timestamp_s"],
            s["co2_ppm"],
            s["temperature_celsius"],
            s["rel_humidity_percent"],
            s["status"],
        )
        for s in samples
    ]
    files = {
        "a.jsonl": jsonl(samples),
        "a.csv": csv_bytes(samples),
        "iso.csv": csv_bytes(samples, iso=True),
        "a.json": fixture_json(samples),
    }
    for name, data in files.items():
        parsed = parse_samples(data, f"landing/samples/{SOURCE}/{name}", SOURCE, LIMITS)
        assert parsed.rejections == [], name
        assert _as_tuples(parsed.samples) == expected, name


def test_bad_lines_are_rejected_with_line_and_reason_and_the_rest_kept() -> None:
    node = new_nodes(1)[0]
    good = {
        "node": node,
        "timestamp_s": 1_780_000_000,
        "co2_ppm": 800,
        "temperature_celsius": 21.5,
        "rel_humidity_percent": 40,
        "status": "M",
    }

    def variant(**change: object) -> str:
        row = {**good, **change}
        return json.dumps({k: v for k, v in row.items() if v is not ...})

    lines = [
        json.dumps(good),  # 1
        variant(co2_ppm=10001),  # 2
        variant(temperature_celsius=40.5),  # 3
        variant(temperature_celsius=21.25),  # 4
        variant(rel_humidity_percent=100.5),  # 5
        variant(status="X"),  # 6
        variant(node="not-a-uuid"),  # 7
        "",  # 8: blank, skipped
        "{not json",  # 9
        variant(timestamp_s=..., timestamp="2026-06-01T12:00:00"),  # 10: no zone
        variant(co2_ppm=...),  # 11
        variant(timestamp_s=1_780_000_060, temperature_celsius=-20.0, co2_ppm=10000),  # 12: at the limits
        variant(timestamp_s=1_780_000_000.5),  # 13
    ]
    parsed = parse_samples(
        ("\n".join(lines) + "\n").encode(), "landing/samples/office/x.jsonl", SOURCE, LIMITS
    )
    assert [s.line for s in parsed.samples] == [1, 12]
    reasons = {r.line: r.reason for r in parsed.rejections}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 9, 10, 11, 13]
    assert "co2_ppm 10001" in reasons[2]
    assert "0..10000" in reasons[2]
    assert "temperature_celsius 40.5" in reasons[3]
    assert "-20..40" in reasons[3]
    assert "21.25" in reasons[4]
    assert "decimal" in reasons[4]
    assert "rel_humidity_percent 100.5" in reasons[5]
    assert "status 'X'" in reasons[6]
    assert "not-a-uuid" in reasons[7]
    assert "UUID" in reasons[7]
    assert "JSON" in reasons[9]
    assert "time zone" in reasons[10]
    assert reasons[11] == "co2_ppm is missing"
    assert "whole second" in reasons[13]


def test_limits_are_set_per_source() -> None:
    series = SeriesSettings(
        sources={"lab": {"limits": {"co2_ppm_max": 5000, "statuses": ["M"]}}, "office": {}}
    )
    row = {
        "node": new_nodes(1)[0],
        "timestamp_s": 1_780_000_000,
        "co2_ppm": 6000,
        "temperature_celsius": 21.5,
        "rel_humidity_percent": 40,
        "status": "R",
    }
    data = jsonl([row])
    lab = parse_samples(data, "landing/samples/lab/a.jsonl", "lab", series.source("lab").limits)
    office = parse_samples(data, "landing/samples/office/a.jsonl", "office", series.source("office").limits)
    assert [r.line for r in lab.rejections] == [1]
    assert "co2_ppm 6000" in lab.rejections[0].reason
    assert len(office.samples) == 1


def test_fixture_entries_are_named_by_their_line() -> None:
    samples = make_samples(
        np.random.default_rng(2), new_nodes(1), dt.datetime(2026, 3, 1, tzinfo=dt.UTC), 600, keep=1.0
    )
    samples[3]["status"] = "Z"
    entries = [{"model": "airquality.sample", "pk": n, "fields": s} for n, s in enumerate(samples)]
    entries.insert(5, {"model": "airquality.node", "pk": "n1", "fields": {"name": "lobby"}})
    text = json.dumps(entries, indent=2)
    parsed = parse_samples(text.encode(), "landing/samples/office/dump.json", SOURCE, LIMITS)
    lines = text.splitlines()
    # each rejection's line is the line where its entry's "{" opens (dumpdata's layout)
    starts = [n for n, line in enumerate(lines, start=1) if line == "  {"]
    rejected = {r.line: r.reason for r in parsed.rejections}
    assert sorted(rejected) == [starts[3], starts[5]]
    assert "status 'Z'" in rejected[starts[3]]
    assert "airquality.node" in rejected[starts[5]]
    assert [s.line for s in parsed.samples] == [starts[i] for i in range(len(entries)) if i not in (3, 5)]


@pytest.mark.parametrize(
    ("name", "data", "line", "words"),
    [
        ("dump.json", b'{"model": "a.sample"}', 1, "JSON array"),
        ("dump.json", b'[\n  {"model": "a.sample", "fields": {}},\n  {"model": \n', 3, "not JSON"),
        (
            "a.csv",
            b"node,timestamp_s,co2_ppm\n",
            1,
            "lacks rel_humidity_percent, status, temperature_celsius",
        ),
        ("a.jsonl", b'{"a": 1}\n\xff\n', 2, "UTF-8"),
    ],
)
def test_an_unreadable_file_fails_naming_source_file_and_line(
    name: str, data: bytes, line: int, words: str
) -> None:
    key = f"landing/samples/office/{name}"
    with pytest.raises(SampleFileError) as caught:
        parse_samples(data, key, SOURCE, LIMITS)
    message = str(caught.value)
    assert f"'{SOURCE}'" in message
    assert key in message
    assert f"line {line}" in message
    assert words in message


def test_a_stream_yields_bounded_chunks_of_the_samples_at_their_lines() -> None:
    samples = make_samples(
        np.random.default_rng(4), new_nodes(2), dt.datetime(2026, 3, 1, tzinfo=dt.UTC), 3600, keep=1.0
    )
    header = "\ufeffnode,timestamp_s,co2_ppm,temperature_celsius,rel_humidity_percent,status,note\r\n"
    rows: list[str] = []
    expected_lines: list[int] = []
    bad_lines: list[int] = []
    line = 2
    for n, s in enumerate(samples):
        note = '"two\r\nlines"' if n % 10 == 4 else "plain"  # a quoted field spanning two lines
        status = "Q" if n % 13 == 6 else s["status"]
        rows.append(
            f"{s['node']},{s['timestamp_s']},{s['co2_ppm']},{s['temperature_celsius']},"
            f"{s['rel_humidity_percent']},{status},{note}\r\n"
        )
        (bad_lines if status == "Q" else expected_lines).append(line)
        line += 2 if n % 10 == 4 else 1
    data = (header + "".join(rows)).encode()

    stream = stream_samples(io.BytesIO(data), "landing/samples/office/a.csv", SOURCE, LIMITS, chunk_samples=7)
    chunks = list(stream)
    assert [len(c) for c in chunks[:-1]] == [7] * (len(chunks) - 1)
    assert 1 <= len(chunks[-1]) <= 7
    got = [s for c in chunks for s in c]
    assert [s.line for s in got] == expected_lines
    assert [s.timestamp_s for s in got] == [s["timestamp_s"] for n, s in enumerate(samples) if n % 13 != 6]
    assert (stream.valid, stream.rejected) == (len(expected_lines), len(bad_lines))
    assert [r.line for r in stream.rejections] == bad_lines


def test_rejections_listed_by_a_stream_stop_at_its_cap_and_all_are_counted() -> None:
    node = new_nodes(1)[0]
    lines = [
        json.dumps({"node": node, "timestamp_s": 1_780_000_000 + n, "co2_ppm": 800, "status": "M"})
        for n in range(50)
    ]
    stream = stream_samples(
        io.BytesIO("\n".join(lines).encode()),
        "landing/samples/office/a.jsonl",
        SOURCE,
        LIMITS,
        max_listed_rejections=5,
    )
    assert list(stream) == []
    assert stream.rejected == 50
    assert [r.line for r in stream.rejections] == [1, 2, 3, 4, 5]
    assert all(r.reason == "temperature_celsius is missing" for r in stream.rejections)


def test_an_overlong_line_is_rejected_in_json_lines_and_fails_a_csv_file() -> None:
    row = {
        "node": new_nodes(1)[0],
        "timestamp_s": 1_780_000_000,
        "co2_ppm": 800,
        "temperature_celsius": 21.5,
        "rel_humidity_percent": 40,
        "status": "M",
    }
    huge = json.dumps({**row, "comment": "x" * (MAX_LINE_CHARS + 10)})
    later = json.dumps({**row, "timestamp_s": 1_780_000_060})
    parsed = parse_samples(
        f"{json.dumps(row)}\n{huge}\n{later}\n".encode(), "landing/samples/office/a.jsonl", SOURCE, LIMITS
    )
    assert [s.line for s in parsed.samples] == [1, 3]
    assert [r.line for r in parsed.rejections] == [2]
    assert "longer than" in parsed.rejections[0].reason

    text = "node,timestamp_s,co2_ppm,temperature_celsius,rel_humidity_percent,status\n"
    text += f"{row['node']},1780000000,800,21.5,40,M\n" + "9" * (MAX_LINE_CHARS + 10) + "\n"
    with pytest.raises(SampleFileError) as caught:
        parse_samples(text.encode(), "landing/samples/office/a.csv", SOURCE, LIMITS)
    assert "line 3" in str(caught.value)
    assert "longer than" in str(caught.value)

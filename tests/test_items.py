from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from skyvault.errors import MissingDatetimeError
from skyvault.items import bbox_parts, interval_overlaps, item_interval, parse_time, utc

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
T1 = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)


def item(**properties: Any) -> dict[str, Any]:
    return {"id": "scene-1", "properties": properties}


def test_utc_takes_naive_as_utc_and_converts_aware() -> None:
    assert utc(dt.datetime(2026, 1, 1)) == T0
    assert utc(dt.datetime(2026, 1, 1)).tzinfo == dt.UTC
    plus_two = dt.datetime(2026, 1, 1, 2, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert utc(plus_two) == T0
    assert utc(plus_two).hour == 0


def test_parse_time_reads_iso_text_as_utc() -> None:
    assert parse_time("2026-01-01T00:00:00Z") == T0
    assert parse_time("2026-01-01T03:00:00+03:00") == T0
    assert parse_time("2026-01-01T00:00:00") == T0
    assert parse_time(None) is None
    assert parse_time(None, what="item 'scene-1' datetime") is None


def test_parse_time_unreadable_gives_none_or_raises_naming_what() -> None:
    assert parse_time("yesterday") is None
    assert parse_time("") is None
    with pytest.raises(MissingDatetimeError, match=r"item 'scene-1' datetime.*'yesterday'"):
        parse_time("yesterday", what="item 'scene-1' datetime")


def test_item_interval_instant() -> None:
    assert item_interval(item(datetime="2026-01-01T00:00:00Z")) == (T0, T0)


def test_item_interval_range_wins_over_datetime() -> None:
    found = item_interval(
        item(
            datetime="2025-06-01T00:00:00Z",
            start_datetime="2026-01-01T00:00:00Z",
            end_datetime="2026-01-02T00:00:00Z",
        )
    )
    assert found == (T0, T1)


def test_item_interval_orders_a_reversed_range() -> None:
    found = item_interval(item(start_datetime="2026-01-02T00:00:00Z", end_datetime="2026-01-01T00:00:00Z"))
    assert found == (T0, T1)


def test_item_interval_naive_time_is_utc() -> None:
    start, end = item_interval(item(datetime="2026-01-01T00:00:00"))
    assert start == end == T0
    assert start.tzinfo == dt.UTC


def test_item_interval_without_time_names_the_item() -> None:
    with pytest.raises(MissingDatetimeError, match="scene-1"):
        item_interval(item(datetime=None, start_datetime="2026-01-01T00:00:00Z"))
    with pytest.raises(MissingDatetimeError, match="<no id>"):
        item_interval({"properties": {}})


def test_item_interval_unreadable_time_raises_or_counts_as_absent() -> None:
    broken = item(datetime="2026-01-01T00:00:00Z", start_datetime="soon", end_datetime="2026-01-02T00:00:00Z")
    with pytest.raises(MissingDatetimeError, match=r"scene-1.*start_datetime"):
        item_interval(broken)
    assert item_interval(broken, strict=False) == (T0, T0)
    with pytest.raises(MissingDatetimeError, match="scene-1"):
        item_interval(item(datetime="soon"), strict=False)


def test_bbox_parts_plain_and_antimeridian() -> None:
    assert bbox_parts([10, -5, 20, 5]) == [(10.0, -5.0, 20.0, 5.0)]
    assert bbox_parts([170, -10, -170, 10]) == [(170.0, -10.0, 180.0, 10.0), (-180.0, -10.0, -170.0, 10.0)]


def test_bbox_parts_drops_heights_of_a_3d_bbox() -> None:
    assert bbox_parts([10, -5, 0, 20, 5, 100]) == [(10.0, -5.0, 20.0, 5.0)]
    assert bbox_parts([170, -10, 0, -170, 10, 100]) == [
        (170.0, -10.0, 180.0, 10.0),
        (-180.0, -10.0, -170.0, 10.0),
    ]


def test_interval_overlaps_includes_edges_and_open_ends() -> None:
    day = (T0, T1)
    assert interval_overlaps(day, T1, None)
    assert interval_overlaps(day, None, T0)
    assert interval_overlaps(day, None, None)
    assert not interval_overlaps(day, T1 + dt.timedelta(microseconds=1), None)
    assert not interval_overlaps(day, None, T0 - dt.timedelta(microseconds=1))
    assert interval_overlaps((T0, T0), T0, T0)


def test_interval_overlaps_reads_naive_bounds_as_utc() -> None:
    assert interval_overlaps((T0, T0), dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 1))
    assert not interval_overlaps((T0, T0), dt.datetime(2026, 1, 1, 0, 0, 1), None)

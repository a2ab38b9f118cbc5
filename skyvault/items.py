"""Times and bboxes of STAC item dicts: the vocabulary the catalog and the tile cache share.

Times are ISO 8601 text in an item's ``properties``; naive times are UTC and every datetime
returned here is UTC-aware. Bboxes are lon/lat ``[west, south, east, north]`` (or 6-element 3D
bboxes, whose heights are ignored); ``west > east`` means the bbox crosses the antimeridian.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from skyvault.errors import MissingDatetimeError

Box = tuple[float, float, float, float]


def utc(value: dt.datetime) -> dt.datetime:
    """``value`` in UTC; a naive datetime is taken as UTC."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def parse_time(value: Any, *, what: str | None = None) -> dt.datetime | None:
    """An ISO 8601 time as a UTC datetime; None when ``value`` is None.

    Args:
        value: the text (anything else is read as ``str(value)``).
        what: names the value (e.g. ``"item 'x' start_datetime"``). Without it an unreadable
            value gives None; with it, an unreadable value raises.

    Raises:
        MissingDatetimeError: ``what`` is given and ``value`` is not an ISO 8601 time.

    """
    if value is None:
        return None
    try:
        return utc(dt.datetime.fromisoformat(str(value)))
    except ValueError as e:
        if what is None:
            return None
        raise MissingDatetimeError(f"{what} is not an ISO 8601 time: {value!r}") from e


def item_interval(item: Mapping[str, Any], *, strict: bool = True) -> tuple[dt.datetime, dt.datetime]:
    """The item's time as a closed UTC interval (an instant gives ``(t, t)``).

    A ``start_datetime``/``end_datetime`` pair wins over ``datetime``; a reversed pair is put in
    order.

    Args:
        item: a STAC item dict.
        strict: raise on an unreadable time; when False an unreadable time counts as absent.

    Raises:
        MissingDatetimeError: the item has neither ``datetime`` nor both ``start_datetime`` and
            ``end_datetime`` (or, when ``strict``, one of them is unreadable); names the item.

    """
    item_id = item.get("id", "<no id>")
    props = item.get("properties", {})

    def read(name: str) -> dt.datetime | None:
        return parse_time(props.get(name), what=f"item {str(item_id)!r} {name}" if strict else None)

    start = read("start_datetime")
    end = read("end_datetime")
    if start is not None and end is not None:
        return (start, end) if start <= end else (end, start)
    instant = read("datetime")
    if instant is None:
        raise MissingDatetimeError(
            f"item {str(item_id)!r} has no datetime and no start_datetime/end_datetime pair"
        )
    return instant, instant


def interval_overlaps(
    interval: tuple[dt.datetime, dt.datetime], start: dt.datetime | None, end: dt.datetime | None
) -> bool:
    """Whether ``interval`` overlaps ``[start, end]`` (None = unbounded; ends included; naive = UTC)."""
    lo, hi = interval
    return (end is None or lo <= utc(end)) and (start is None or hi >= utc(start))


def bbox_parts(bbox: Sequence[float]) -> list[Box]:
    """A lon/lat bbox as one 2D box, or two when it crosses the antimeridian (``west > east``)."""
    if len(bbox) == 6:
        bbox = (bbox[0], bbox[1], bbox[3], bbox[4])
    west, south, east, north = (float(v) for v in bbox)
    if west > east:
        return [(west, south, 180.0, north), (-180.0, south, east, north)]
    return [(west, south, east, north)]

"""The catalog backend interface and the helpers every backend shares."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from skyvault.config.collections import CollectionConfig
from skyvault.errors import (
    CatalogError,
    InvalidIdentifierError,
    MissingDatetimeError,
)
from skyvault.ids import check_id
from skyvault.items import bbox_parts, item_interval, parse_time, utc
from skyvault.models import BBox, ItemRef

JSON_TYPE = "application/json"
GEOJSON_TYPE = "application/geo+json"
LINK_BBOX = "skyvault:bbox"
LINK_INTERVAL = "skyvault:interval"
STRUCTURAL_RELS = frozenset({"self", "root", "parent", "collection"})
WORLD_BBOX: list[float] = [-180.0, -90.0, 180.0, 90.0]


class CatalogBackend(Protocol):
    """What skyvault needs from a STAC catalog.

    Implementations take their settings in ``__init__`` and are built by :func:`open_catalog`.
    Items are STAC Item dicts as made by :func:`skyvault.stac.item.build_item`; an item's
    ``properties["skyvault:cog_key"]`` names its COG. Store or network failures are raised as
    :class:`CatalogError` (:class:`TransientCatalogError` when a retry may help) naming the
    collection or item. Every method is safe to call again with the same arguments, and from
    several processes and hosts at once: concurrent upserts into one collection lose no item and
    leave its extents covering every item (the static catalog changes its documents through
    ``ObjectStore.update``; a database backend through its transactions).
    """

    def ensure_collection(self, collection: CollectionConfig) -> None:
        """Create the collection if missing (title, description, license, keywords from config)."""
        ...

    def get_item(self, collection_id: str, item_id: str) -> dict[str, Any] | None:
        """The stored item with absolute hrefs, or None if the collection or item is missing."""
        ...

    def existing_ids(self, collection_id: str, item_ids: Iterable[str]) -> set[str]:
        """Which of ``item_ids`` are in the collection (one cheap query, no item bodies)."""
        ...

    def upsert_items(self, collection: CollectionConfig, items: list[dict[str, Any]]) -> list[ItemRef]:
        """Insert or replace ``items`` in one batch; ensure the collection; keep its extents current.

        Duplicate ids in a batch: the last one wins. Re-upserting an unchanged item changes
        nothing and reports ``created=False``; an item whose datetime changed is replaced, never
        duplicated. Returns one ref per distinct id, in input order. Items that are invalid (see
        :func:`prepare_batch`) or that the catalog refuses do not stop the others: they are
        written, then :class:`ItemsRejectedError` names every refused id and carries the refs of
        the written ones.
        """
        ...

    def delete_item(self, collection_id: str, item_id: str) -> bool:
        """Remove an item; True if it was there. The collection's extents follow."""
        ...

    def search(
        self,
        collection_id: str,
        *,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        bbox: Sequence[float] | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Items whose time interval overlaps ``[start, end]``, whose bbox meets ``bbox``, among ``ids``.

        Open ends are unbounded; naive datetimes are UTC; a bbox with ``west > east`` crosses the
        antimeridian. An unknown collection has no items.
        """
        ...


# --- helpers shared by backends -------------------------------------------------------------------


def prepare_batch(
    collection_id: str, items: Iterable[dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Split a batch into the items to write (by id, last duplicate wins, input order) and refusals.

    An item is refused, with the reason by id, when its id is not a safe identifier, it names
    another collection, or :func:`check_item_shape` finds it unfit for a catalog. (Items built by
    skyvault were already validated against the STAC schema when built; this check is the cheap
    one a bulk load of thousands of items can afford.)
    """
    batch: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    for item in items:
        item_id = str(item.get("id", ""))
        try:
            check_id(item_id, "item id")
            found = item.get("collection")
            if found not in (None, collection_id):
                raise CatalogError(f"item {item_id!r} names collection {found!r}, not {collection_id!r}")
            check_item_shape(item)
        except (CatalogError, InvalidIdentifierError) as e:
            batch.pop(item_id, None)
            refused[item_id] = str(e)
            continue
        refused.pop(item_id, None)
        batch.pop(item_id, None)  # a later duplicate takes the place of the earlier one
        batch[item_id] = {**item, "collection": collection_id}
    return batch, refused


def check_item_shape(item: dict[str, Any]) -> None:
    """Raise :class:`CatalogError` naming the item if it lacks what every catalog needs.

    A GeoJSON Feature with a geometry, a bbox of 4 or 6 numbers, properties with a readable
    ``datetime`` (or ``start_datetime`` and ``end_datetime``), assets and links.
    """
    name = f"item {item.get('id')!r}"
    if item.get("type") != "Feature":
        raise CatalogError(f"{name} is not a GeoJSON Feature (type {item.get('type')!r})")
    geometry = item.get("geometry")
    if (
        not isinstance(geometry, dict)
        or not isinstance(geometry.get("type"), str)
        or ("coordinates" not in geometry and "geometries" not in geometry)
    ):
        raise CatalogError(f"{name} has no geometry")
    bbox = item.get("bbox")
    if (
        not isinstance(bbox, list)
        or len(bbox) not in (4, 6)
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
    ):
        raise CatalogError(f"{name} has no bbox of 4 or 6 numbers: {bbox!r}")
    props = item.get("properties")
    if not isinstance(props, dict):
        raise CatalogError(f"{name} has no properties")
    if parse_time(props.get("datetime")) is None and (
        parse_time(props.get("start_datetime")) is None or parse_time(props.get("end_datetime")) is None
    ):
        raise CatalogError(
            f"{name} has no readable datetime, nor both start_datetime and end_datetime "
            f"(datetime {props.get('datetime')!r})"
        )
    if not isinstance(item.get("assets", {}), dict) or not isinstance(item.get("links", []), list):
        raise CatalogError(f"{name}: assets must be an object and links a list")


def item_datetime_key(item: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """The item's ``(datetime, start_datetime, end_datetime)`` as normalised UTC strings."""
    props = item.get("properties", {})
    out: list[str | None] = []
    for name in ("datetime", "start_datetime", "end_datetime"):
        value = parse_time(props.get(name))
        out.append(iso_time(value) if value is not None else None)
    return out[0], out[1], out[2]


def iso_time(value: dt.datetime) -> str:
    """``value`` as ISO 8601 UTC text ending in ``Z`` (naive = UTC), as pystac writes times."""
    text = utc(value).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def readable_interval(item: dict[str, Any]) -> tuple[dt.datetime, dt.datetime] | None:
    """The item's readable time interval (see :func:`item_interval`), or None if it has none."""
    try:
        return item_interval(item, strict=False)
    except MissingDatetimeError:
        return None


def bboxes_intersect(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two lon/lat bboxes meet (edges included), antimeridian-aware."""
    return any(
        pa[0] <= pb[2] and pb[0] <= pa[2] and pa[1] <= pb[3] and pb[1] <= pa[3]
        for pa in bbox_parts(a)
        for pb in bbox_parts(b)
    )


def union_bbox(bboxes: Iterable[Sequence[float]]) -> list[float] | None:
    """The bbox covering every bbox given (antimeridian crossers count as both halves)."""
    parts = [p for b in bboxes for p in bbox_parts(b)]
    if not parts:
        return None
    return [
        min(p[0] for p in parts),
        min(p[1] for p in parts),
        max(p[2] for p in parts),
        max(p[3] for p in parts),
    ]


def item_ref(item: dict[str, Any], href: str, created: bool) -> ItemRef:
    """The :class:`ItemRef` of a stored item."""
    props = item.get("properties", {})
    raw = item.get("bbox") or WORLD_BBOX
    bbox: BBox = (
        (float(raw[0]), float(raw[1]), float(raw[3]), float(raw[4]))
        if len(raw) == 6
        else (float(raw[0]), float(raw[1]), float(raw[2]), float(raw[3]))
    )
    return ItemRef(
        collection=str(item.get("collection")),
        item_id=str(item.get("id")),
        href=href,
        datetime=parse_time(props.get("datetime")),
        start_datetime=parse_time(props.get("start_datetime")),
        end_datetime=parse_time(props.get("end_datetime")),
        bbox=bbox,
        created=created,
    )

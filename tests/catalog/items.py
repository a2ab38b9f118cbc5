"""Small valid STAC items for catalog tests, shaped like the ones ``build_item`` makes."""

from __future__ import annotations

import datetime as dt
from typing import Any

COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"


def stamp(when: dt.datetime) -> str:
    """An RFC 3339 UTC time with a ``Z``."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def stac_item(
    item_id: str,
    collection: str,
    *,
    bbox: tuple[float, float, float, float] = (10.0, 45.0, 11.0, 46.0),
    when: dt.datetime | None = None,
    span: tuple[dt.datetime, dt.datetime] | None = None,
    href: str | None = None,
    **props: Any,
) -> dict[str, Any]:
    """A STAC 1.1 item: a footprint filling ``bbox`` (a MultiPolygon across the antimeridian when
    west > east), ``when`` or the ``span`` as its time, a COG data asset and a collection link."""
    w, s, e, n = bbox
    parts = [(w, s, 180.0, n), (-180.0, s, e, n)] if w > e else [(w, s, e, n)]
    rings = [[[[a, b], [c, b], [c, d], [a, d], [a, b]]] for a, b, c, d in parts]
    geometry = (
        {"type": "Polygon", "coordinates": rings[0]}
        if len(rings) == 1
        else {"type": "MultiPolygon", "coordinates": rings}
    )
    properties: dict[str, Any] = {"skyvault:cog_key": f"cogs/{collection}/{item_id}.tif", **props}
    if span is not None:
        properties.update(datetime=None, start_datetime=stamp(span[0]), end_datetime=stamp(span[1]))
    else:
        properties["datetime"] = stamp(when) if when else None
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [],
        "id": item_id,
        "collection": collection,
        "geometry": geometry,
        "bbox": list(bbox),
        "properties": properties,
        "assets": {
            "data": {
                "href": href or f"file:///data/cogs/{collection}/{item_id}.tif",
                "type": COG_TYPE,
                "roles": ["data"],
            }
        },
        "links": [{"rel": "collection", "href": "../collection.json", "type": "application/json"}],
    }

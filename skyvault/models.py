"""Pydantic models passed between tasks and flows: plain, serialisable records, never handles."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

BBox = tuple[float, float, float, float]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ObjectInfo(_Record):
    """One object in the store."""

    key: str
    size: int
    last_modified: dt.datetime


class Product(_Record):
    """A discovered product: where its raster is and what its sidecar said about it."""

    collection: str
    id: str
    source_key: str
    sidecar_key: str | None = None
    datetime: dt.datetime | None = None
    start_datetime: dt.datetime | None = None
    end_datetime: dt.datetime | None = None
    crs_hint: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


class DiscoveryFailure(_Record):
    """Something under the landing prefix that could not become a product (bad report, bad name)."""

    collection: str
    key: str
    message: str


class CogInfo(_Record):
    """The COG made for a product, and whether this run made it or found it already done."""

    collection: str
    product_id: str
    key: str
    sha256: str
    size: int
    source_sha256: str
    created: bool


class ItemRef(_Record):
    """An item written to (or found in) the catalog."""

    collection: str
    item_id: str
    href: str
    datetime: dt.datetime | None = None
    start_datetime: dt.datetime | None = None
    end_datetime: dt.datetime | None = None
    bbox: BBox
    created: bool


class SeedRequest(_Record):
    """What to seed: a collection, a time interval, a zoom range and an optional lon/lat bbox."""

    collection: str
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    min_zoom: int | None = None
    max_zoom: int | None = None
    bbox: BBox | None = None
    item_ids: tuple[str, ...] | None = None
    force: bool = False


class SeedResult(_Record):
    """Tile counts of one seeding run."""

    collection: str
    written: int = 0
    skipped: int = 0
    empty: int = 0
    layers: tuple[str, ...] = ()


ProductState = Literal["done", "skipped", "failed"]


class ProductOutcome(_Record):
    """The per-product line of an ingest summary."""

    collection: str
    product_id: str
    state: ProductState
    message: str = ""
    step: str | None = None
    cog_key: str | None = None
    item_href: str | None = None
    tiles: int = 0


class IngestSummary(_Record):
    """What an ingest run did: counts and one line per product."""

    found: int
    done: int
    skipped: int
    failed: int
    outcomes: tuple[ProductOutcome, ...]

    @classmethod
    def from_outcomes(cls, outcomes: list[ProductOutcome]) -> IngestSummary:
        """Count outcomes by state; lines sorted by collection and product."""
        ordered = tuple(sorted(outcomes, key=lambda o: (o.collection, o.product_id)))
        return cls(
            found=len(ordered),
            done=sum(o.state == "done" for o in ordered),
            skipped=sum(o.state == "skipped" for o in ordered),
            failed=sum(o.state == "failed" for o in ordered),
            outcomes=ordered,
        )

    def headline(self) -> str:
        """One line: found / done / skipped / failed."""
        return f"{self.found} products: {self.done} done, {self.skipped} skipped, {self.failed} failed"


class SeedChunk(_Record):
    """A batch of tiles of one layer (a collection and a time key) that one seeding task renders.

    ``tiles`` are ``(z, x, y)`` on WebMercatorQuad. ``cog_keys`` are the COGs of every item of the
    layer that touches these tiles, in mosaic order (first valid pixel wins). ``bounds``,
    ``min_zoom`` and ``max_zoom`` describe the whole layer's seeded extent (for its TileJSON).
    """

    collection: str
    time_key: str
    cog_keys: tuple[str, ...]
    tiles: tuple[tuple[int, int, int], ...]
    bounds: BBox
    min_zoom: int
    max_zoom: int
    index: int = 0
    total: int = 1


class Discovery(_Record):
    """What a discovery run found: products ready to process and what could not become one.

    Both lists are sorted (products by collection and id, failures by collection, key and message).
    """

    products: list[Product] = Field(default_factory=list)
    failures: list[DiscoveryFailure] = Field(default_factory=list)

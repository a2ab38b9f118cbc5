"""Pydantic models passed between tasks and flows: plain, serialisable records, never handles."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
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


GeoReferenceKind = Literal["rectifiedBrowse", "footprint", "regularGrid", "modelInGeotiff"]


class GeoReference(_Record):
    """How a browse image is placed on the ground, numbers as given in its browse report.

    ``rectifiedBrowse``: ``coords`` holds the 4 numbers of ``coordList`` (two corners).
    ``footprint``: ``col_rows`` (``colRowList``) and ``coords`` (``coordList``) hold matching
    pixel / coordinate pairs. ``regularGrid``: the node counts and steps, and ``coords`` holds every
    ``coordList`` row concatenated. ``modelInGeotiff``: the raster's own georeferencing, no numbers.
    Coordinates are in the report's reference system and axis order (``lat lon`` for EPSG:4326).
    """

    kind: GeoReferenceKind
    coords: tuple[float, ...] = ()
    col_rows: tuple[float, ...] = ()
    node_number: int | None = None
    col_node_number: int | None = None
    row_node_number: int | None = None
    col_step: float | None = None
    row_step: float | None = None

    def summary(self) -> dict[str, Any]:
        """A short JSON-ready form for product properties (grid coordinates are left out)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "rectifiedBrowse":
            out["coordList"] = list(self.coords)
        elif self.kind == "footprint":
            out["nodeNumber"] = len(self.coords) // 2
            out["colRowList"] = list(self.col_rows)
            out["coordList"] = list(self.coords)
        elif self.kind == "regularGrid":
            out["colNodeNumber"] = self.col_node_number
            out["rowNodeNumber"] = self.row_node_number
            out["colStep"] = self.col_step
            out["rowStep"] = self.row_step
        return out


class Product(_Record):
    """A discovered product: where its raster is and what its sidecar said about it.

    ``georeference`` is the placement a browse report gives the raster (with ``crs_hint``, the
    report's reference system); preprocess places the image by it unless it is ``modelInGeotiff``.
    """

    collection: str
    id: str
    source_key: str
    sidecar_key: str | None = None
    datetime: dt.datetime | None = None
    start_datetime: dt.datetime | None = None
    end_datetime: dt.datetime | None = None
    crs_hint: str | None = None
    georeference: GeoReference | None = None
    properties: dict[str, Any] = Field(default_factory=dict)

    #: Bytes of the source raster when discovery listed it (not part of :meth:`digest`).
    source_size: int | None = None

    def digest(self) -> str:
        """A digest of everything discovery said about the product (its report or sidecar included)."""
        said = self.model_dump(mode="json", exclude={"source_size"})
        text = json.dumps(said, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


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


class CogRecord(_Record):
    """What a COG was made from, stored next to it (``cogs/<collection>/<product-id>.json``).

    Bulk registration rebuilds a collection's items from these records and the COGs alone.
    """

    product: Product
    cog: CogInfo


class RegisterSummary(_Record):
    """What a bulk registration did for one collection; ``failed`` maps product id to reason."""

    collection: str
    found: int
    registered: int
    created: int
    failed: dict[str, str] = Field(default_factory=dict)

    def headline(self) -> str:
        """One line: collection, found / registered (new) / failed."""
        return (
            f"{self.collection}: {self.found} found, {self.registered} registered "
            f"({self.created} new), {len(self.failed)} failed"
        )


class RegisterReport(_Record):
    """What a bulk registration run did, one summary per collection."""

    summaries: tuple[RegisterSummary, ...]
    registered: int
    created: int
    failed: int

    @classmethod
    def from_summaries(cls, summaries: list[RegisterSummary]) -> RegisterReport:
        """Totals over the collections' summaries."""
        return cls(
            summaries=tuple(summaries),
            registered=sum(s.registered for s in summaries),
            created=sum(s.created for s in summaries),
            failed=sum(len(s.failed) for s in summaries),
        )

    def headline(self) -> str:
        """One line: items registered (new) / failed, over how many collections."""
        noun = "collection" if len(self.summaries) == 1 else "collections"
        return (
            f"{self.registered} items registered ({self.created} new), {self.failed} failed, "
            f"in {len(self.summaries)} {noun}"
        )


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


class PreprocessBatch(_Record):
    """What preprocessing several products did: their COGs, and why the others failed (by id)."""

    cogs: list[CogInfo] = Field(default_factory=list)
    failed: dict[str, str] = Field(default_factory=dict)


class RegisterBatch(_Record):
    """What registering several products did: their items, and why the others failed (by id)."""

    items: list[ItemRef] = Field(default_factory=list)
    failed: dict[str, str] = Field(default_factory=dict)


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


StatusState = Literal["running", "done", "failed"]


class ProductStatus(BaseModel):
    """A product's status record on the object store (``status/<collection>/<product-id>.json``).

    ``process-product`` writes ``running`` as each step starts, ``failed`` with the step that
    failed, and ``done`` last, once the COG, the item and (when seeded) the tiles and TileJSON
    exist. ``step`` of a ``done`` record is the last step done: ``seed`` when tiles were rendered,
    ``register`` when seeding was off. Unknown fields are ignored, so older readers accept newer
    records.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    collection: str
    product_id: str
    state: StatusState
    step: str | None = None
    message: str = ""
    flow_run_id: str | None = None
    cog_key: str | None = None
    source_sha256: str | None = None
    item_href: str | None = None
    tiles: int = 0
    product_digest: str | None = None
    updated_at: dt.datetime


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
        noun = "product" if self.found == 1 else "products"
        return f"{self.found} {noun}: {self.done} done, {self.skipped} skipped, {self.failed} failed"


class SeedChunk(_Record):
    """A batch of tiles of one layer (a collection and a time key) that one seeding task renders.

    ``tiles`` are ``(z, x, y)`` on WebMercatorQuad. ``cog_keys`` are the COGs of every item of the
    layer that touches these tiles, in mosaic order (first valid pixel wins). ``bounds``,
    ``min_zoom`` and ``max_zoom`` describe the whole layer's seeded extent (for its TileJSON).
    ``band_ranges`` are the layer's ``(minimum, maximum)`` per COG band from its items' statistics
    (None where unknown): the default stretch of data that is not 8-bit.
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
    band_ranges: tuple[tuple[float, float] | None, ...] = ()


class Discovery(_Record):
    """What a discovery run found: products ready to process and what could not become one.

    Both lists are sorted (products by collection and id, failures by collection, key and message).
    """

    products: list[Product] = Field(default_factory=list)
    failures: list[DiscoveryFailure] = Field(default_factory=list)


# --- datasets, datablocks and LTS ----------------------------------------------------------------


class DatasetSource(_Record):
    """Where a dataset's files are: an object-store prefix (``kind="store"``) or a local folder."""

    dataset_id: str
    kind: Literal["store", "local"]
    location: str

    def describe(self) -> str:
        """Human-readable location, for messages and the manifest."""
        return f"store:{self.location}" if self.kind == "store" else f"local:{self.location}"


class DatasetFile(_Record):
    """One file of a dataset: its relative path inside the archive and where its bytes are read.

    ``source`` is the object key (store) or the absolute file path (local folder). A symbolic link
    inside a local folder has ``link`` set to its relative target and no data.
    """

    path: str
    source: str
    size: int
    mtime: int = 0
    mode: int = 0o644
    link: str | None = None


class PlannedDatablock(_Record):
    """A datablock before it is written: its name, exact tar size and the files it will hold."""

    dataset_id: str
    name: str
    index: int
    size: int
    files: tuple[DatasetFile, ...]


class DatablockMember(_Record):
    """One member of a written datablock; ``offset`` is where its data starts inside the tar."""

    path: str
    size: int
    sha256: str
    offset: int
    link: str | None = None


class Datablock(_Record):
    """A datablock written to LTS: its tar checksum, size and every member's checksum."""

    name: str
    size: int
    sha256: str
    members: tuple[DatablockMember, ...]
    write_started: dt.datetime | None = None
    write_finished: dt.datetime | None = None


class Manifest(_Record):
    """What LTS holds for a dataset; written last, so its presence means the archive is complete."""

    format: Literal["skyvault-manifest/1"] = "skyvault-manifest/1"
    dataset_id: str
    source: str
    created: dt.datetime
    datablock_bytes: int
    file_count: int
    total_bytes: int
    datablocks: tuple[Datablock, ...]


class DatablockInfo(_Record):
    """The per-datablock line of an archive result (no member list)."""

    name: str
    size: int
    sha256: str
    files: int
    write_started: dt.datetime | None = None
    write_finished: dt.datetime | None = None

    @classmethod
    def of(cls, block: Datablock) -> DatablockInfo:
        """Summarise a written datablock."""
        return cls(
            name=block.name,
            size=block.size,
            sha256=block.sha256,
            files=len(block.members),
            write_started=block.write_started,
            write_finished=block.write_finished,
        )


class ArchiveResult(_Record):
    """What an archive run did.

    ``created`` is false when the dataset was already archived (a manifest existed) and nothing
    was written. ``landing_deleted`` counts the landing files removed after verification.
    """

    dataset_id: str
    source: str
    manifest_path: str
    file_count: int
    total_bytes: int
    archived_bytes: int
    datablocks: tuple[DatablockInfo, ...]
    landing_deleted: int
    created: bool = True


class RetrievedBlock(_Record):
    """One datablock in the retrieval prefix; ``copied`` is false when an existing copy was reused."""

    name: str
    key: str
    size: int
    sha256: str
    url: str
    copied: bool


class RetrieveResult(_Record):
    """A retrieval: the blocks in the retrieval prefix, their URLs and the download script."""

    dataset_id: str
    prefix: str
    datablocks: tuple[RetrievedBlock, ...]
    script_key: str
    script_url: str
    expires_at: dt.datetime

    @property
    def copied(self) -> int:
        """How many blocks this retrieval copied from LTS."""
        return sum(b.copied for b in self.datablocks)


# --- data-catalog jobs ----------------------------------------------------------------------------


class JobDataset(_Record):
    """One dataset of a data-catalog job: its catalog pid, its archive id and where its files are."""

    pid: str
    dataset_id: str
    source_prefix: str | None = None
    source_dir: str | None = None


class JobDatasetResult(_Record):
    """What a job did for one dataset, in the data catalog's words (``status``).

    ``urls`` (retrieval) are the presigned datablock URLs, ``script_url`` the download script.
    """

    pid: str
    dataset_id: str
    ok: bool
    status: str
    message: str = ""
    error: str | None = None
    datablocks: int = 0
    bytes: int = 0
    urls: tuple[str, ...] = ()
    script_url: str | None = None
    expires_at: dt.datetime | None = None

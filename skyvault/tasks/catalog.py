"""The STAC catalog: a backend interface, the static catalog on the object store, and registration.

Adding a backend (pgstac, a STAC API with the transactions extension) is one class that implements
:class:`CatalogBackend` plus one branch in :func:`open_catalog`; the tasks below only use the
protocol.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol

import pystac
from prefect import task

from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import CatalogSettings, StoreSettings
from skyvault.errors import (
    CatalogError,
    ConfigError,
    InvalidIdentifierError,
    MissingDatetimeError,
    ObjectNotFoundError,
    StorageError,
    TransientCatalogError,
    TransientStorageError,
)
from skyvault.ids import check_id
from skyvault.items import bbox_parts, interval_overlaps, item_interval, parse_time, utc
from skyvault.models import BBox, CogInfo, ItemRef, Product
from skyvault.tasks.policy import TASK_POLICY
from skyvault.tasks.stac import build_item, validate_item
from skyvault.tasks.storage import ObjectStore, check_prefix, open_store

JSON_TYPE = "application/json"
GEOJSON_TYPE = "application/geo+json"
LINK_BBOX = "skyvault:bbox"
LINK_INTERVAL = "skyvault:interval"
_STRUCTURAL_RELS = frozenset({"self", "root", "parent", "collection"})
_WORLD: list[float] = [-180.0, -90.0, 180.0, 90.0]


class CatalogBackend(Protocol):
    """What skyvault needs from a STAC catalog.

    Implementations take their settings in ``__init__`` and are built by :func:`open_catalog`.
    Items are STAC Item dicts as made by :func:`skyvault.tasks.stac.build_item`; an item's
    ``properties["skyvault:cog_key"]`` names its COG. Store or network failures are raised as
    :class:`CatalogError` (:class:`TransientCatalogError` when a retry may help) naming the
    collection or item. Every method is safe to call again with the same arguments.
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
        nothing and reports ``created=False``. Returns one ref per distinct id, in input order.
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


def open_catalog(catalog: CatalogSettings, store: StoreSettings) -> CatalogBackend:
    """The catalog backend the settings name.

    Raises:
        ConfigError: the backend is not known.

    """
    if catalog.backend == "static":
        return StaticCatalog(catalog, store)
    raise ConfigError(f"unknown catalog backend {catalog.backend!r}")


# --- helpers shared by backends -------------------------------------------------------------------


def _iso(value: dt.datetime) -> str:
    text: str = pystac.utils.datetime_to_str(utc(value))
    return text


def _interval(item: dict[str, Any]) -> tuple[dt.datetime, dt.datetime] | None:
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
    raw = item.get("bbox") or _WORLD
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


# --- the static catalog ---------------------------------------------------------------------------

_LOCKS: dict[tuple[str, ...], threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(key: tuple[str, ...]) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def _dumps(obj: dict[str, Any], what: str) -> bytes:
    try:
        return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as e:
        raise CatalogError(f"{what} cannot be written as JSON: {e}") from e


class StaticCatalog:
    """A self-contained static STAC catalog under ``catalog.prefix`` on the object store.

    Layout: ``catalog.json`` → ``<collection>/collection.json`` → ``<collection>/<id>/<id>.json``,
    every link relative, asset hrefs relative when they point into the same store. The item links
    of ``collection.json`` are the commit record: an item counts as present once its link is
    written, and each link carries the item's bbox and time interval (``skyvault:bbox``,
    ``skyvault:interval``) so searches, existence checks and extents never read item bodies.

    Writes to one collection from threads of one process are serialised by a per-collection lock;
    several processes writing the same collection need a concurrency limit of one on the
    ``catalog-write`` tag (or a database backend).
    """

    def __init__(self, catalog: CatalogSettings, store: StoreSettings) -> None:
        self.settings = catalog
        self.prefix = check_prefix(catalog.prefix.strip("/"))
        self.store: ObjectStore = open_store(store)
        self._store_id = (
            ("s3", store.endpoint_url or "", store.bucket or "")
            if store.kind == "s3"
            else ("local", str(store.root.resolve()))
        )
        root_key = self.root_key()
        self._base_url = self.store.url(root_key)[: -len(root_key)]

    # keys and hrefs

    def _key(self, *parts: str) -> str:
        return posixpath.join(self.prefix, *parts) if self.prefix else posixpath.join(*parts)

    def root_key(self) -> str:
        """Key of ``catalog.json``."""
        return self._key("catalog.json")

    def collection_key(self, collection_id: str) -> str:
        """Key of a collection's ``collection.json``."""
        return self._key(self._check(collection_id, "collection id"), "collection.json")

    def item_key(self, collection_id: str, item_id: str) -> str:
        """Key of an item's JSON."""
        item_id = self._check(item_id, "item id", collection_id)
        return self._key(self._check(collection_id, "collection id"), item_id, f"{item_id}.json")

    @staticmethod
    def _check(value: str, what: str, collection_id: str | None = None) -> str:
        try:
            return check_id(value, what)
        except InvalidIdentifierError as e:
            where = f" in collection {collection_id!r}" if collection_id else ""
            raise CatalogError(f"{e}{where}") from e

    def _relative(self, href: str, from_key: str) -> str:
        if not href.startswith(self._base_url):
            return href
        return posixpath.relpath(href[len(self._base_url) :], posixpath.dirname(from_key))

    def _absolute(self, href: str, from_key: str) -> str:
        if "://" in href or href.startswith("/"):
            return href
        target = posixpath.normpath(posixpath.join(posixpath.dirname(from_key), href))
        if target.startswith(".."):
            return href
        return self._base_url + target

    def _absolute_item(self, item: dict[str, Any], key: str) -> dict[str, Any]:
        out = dict(item)
        out["assets"] = {
            name: {**asset, "href": self._absolute(asset["href"], key)} if "href" in asset else asset
            for name, asset in item.get("assets", {}).items()
        }
        out["links"] = [
            {**link, "href": self._absolute(link["href"], key)} if "href" in link else link
            for link in item.get("links", [])
        ]
        return out

    # store access with errors named

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except TransientStorageError as e:
            raise TransientCatalogError(f"catalog: {what}: {e}") from e
        except StorageError as e:
            raise CatalogError(f"catalog: {what}: {e}") from e

    def _read_bytes(self, key: str, what: str) -> bytes | None:
        with self._errors(f"cannot read {what}"):
            try:
                return self.store.get_bytes(key)
            except ObjectNotFoundError:
                return None

    def _read_json(self, key: str, what: str) -> dict[str, Any] | None:
        data = self._read_bytes(key, what)
        if data is None:
            return None
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise CatalogError(f"catalog: {what} ({key!r}) is not valid JSON: {e}") from e
        if not isinstance(obj, dict):
            raise CatalogError(f"catalog: {what} ({key!r}) is not a JSON object")
        return obj

    def _write(self, key: str, data: bytes, what: str, content_type: str = JSON_TYPE) -> None:
        with self._errors(f"cannot write {what}"):
            self.store.put_bytes(key, data, content_type=content_type)

    # the root catalog and collections

    def _ensure_root_link(self, collection: CollectionConfig) -> None:
        href = f"./{collection.id}/collection.json"
        with _lock((*self._store_id, self.prefix, "")):
            root = self._read_json(self.root_key(), "root catalog")
            before = _dumps(root, "root catalog") if root is not None else None
            if root is None:
                root = pystac.Catalog(
                    id=self.settings.id, description=self.settings.description, title=self.settings.title
                ).to_dict(include_self_link=False, transform_hrefs=False)
                root["links"] = [{"rel": "root", "href": "./catalog.json", "type": JSON_TYPE}]
            links: list[dict[str, Any]] = root.setdefault("links", [])
            child = {
                "rel": "child",
                "href": href,
                "type": JSON_TYPE,
                "title": collection.title or collection.id,
            }
            kept = [link for link in links if not (link.get("rel") == "child" and link.get("href") == href)]
            kept.append(child)
            root["links"] = kept
            after = _dumps(root, "root catalog")
            if after != before:
                self._write(self.root_key(), after, "root catalog")

    @staticmethod
    def _apply_config(doc: dict[str, Any], collection: CollectionConfig) -> None:
        fields: dict[str, Any] = {
            "title": collection.title or None,
            "description": collection.description or collection.title or collection.id,
            "license": collection.license,
            "keywords": list(collection.keywords) or None,
        }
        for name, value in fields.items():
            if value is None:
                doc.pop(name, None)
            else:
                doc[name] = value

    @staticmethod
    def _new_collection(collection: CollectionConfig) -> dict[str, Any]:
        unbounded: list[list[dt.datetime | None]] = [[None, None]]
        extent = pystac.Extent(pystac.SpatialExtent([list(_WORLD)]), pystac.TemporalExtent(unbounded))
        doc: dict[str, Any] = pystac.Collection(
            id=collection.id, description=collection.description or collection.id, extent=extent
        ).to_dict(include_self_link=False, transform_hrefs=False)
        doc["links"] = [
            {"rel": "root", "href": "../catalog.json", "type": JSON_TYPE},
            {"rel": "parent", "href": "../catalog.json", "type": JSON_TYPE},
        ]
        return doc

    @staticmethod
    def _link_id(link: dict[str, Any]) -> str | None:
        if link.get("rel") != "item" or "href" not in link:
            return None
        name = posixpath.basename(str(link["href"]))
        return name[: -len(".json")] if name.endswith(".json") else None

    @classmethod
    def _item_links(cls, doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {i: link for link in doc.get("links", []) if (i := cls._link_id(link)) is not None}

    @classmethod
    def _set_item_links(cls, doc: dict[str, Any], item_links: dict[str, dict[str, Any]]) -> None:
        others = [link for link in doc.get("links", []) if cls._link_id(link) is None]
        doc["links"] = others + [item_links[i] for i in sorted(item_links)]

    @staticmethod
    def _set_extent(doc: dict[str, Any], item_links: dict[str, dict[str, Any]]) -> None:
        bbox = union_bbox(link[LINK_BBOX] for link in item_links.values() if link.get(LINK_BBOX))
        intervals = [
            (s, e)
            for link in item_links.values()
            if isinstance(link.get(LINK_INTERVAL), list) and len(link[LINK_INTERVAL]) == 2
            for s, e in [(parse_time(link[LINK_INTERVAL][0]), parse_time(link[LINK_INTERVAL][1]))]
            if s and e
        ]
        temporal: list[str | None] = (
            [_iso(min(s for s, _ in intervals)), _iso(max(e for _, e in intervals))]
            if intervals
            else [None, None]
        )
        doc["extent"] = {"spatial": {"bbox": [bbox or list(_WORLD)]}, "temporal": {"interval": [temporal]}}

    def _update_collection(
        self,
        collection_id: str,
        config: CollectionConfig | None,
        change: Mapping[str, dict[str, Any] | None],
    ) -> set[str] | None:
        """Read-modify-write ``collection.json`` under the collection lock.

        ``config`` refreshes the collection's metadata and creates it when missing (without it a
        missing collection stays missing). ``change`` maps item ids to their new link (None
        removes it). Writes only if something changed. Returns the item ids linked before, or
        None if there was no collection.
        """
        key = self.collection_key(collection_id)
        what = f"collection {collection_id!r}"
        with _lock((*self._store_id, self.prefix, collection_id)):
            doc = self._read_json(key, what)
            before = _dumps(doc, what) if doc is not None else None
            if doc is None:
                if config is None:
                    return None
                doc = self._new_collection(config)
            if config is not None:
                self._apply_config(doc, config)
            links = self._item_links(doc)
            previous = set(links)
            for item_id, link in change.items():
                if link is None:
                    links.pop(item_id, None)
                else:
                    links[item_id] = link
            self._set_item_links(doc, links)
            self._set_extent(doc, links)
            after = _dumps(doc, what)
            if after != before:
                self._write(key, after, what)
        return previous if before is not None else set()

    def ensure_collection(self, collection: CollectionConfig) -> None:
        self._update_collection(collection.id, collection, {})
        self._ensure_root_link(collection)

    def _collection_links(self, collection_id: str) -> dict[str, dict[str, Any]] | None:
        doc = self._read_json(self.collection_key(collection_id), f"collection {collection_id!r}")
        return None if doc is None else self._item_links(doc)

    # items

    def _stored_item(self, collection_id: str, item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        item_id = str(item.get("id", ""))
        key = self.item_key(collection_id, item_id)
        stored = dict(item)
        stored["collection"] = collection_id
        extra = [link for link in item.get("links", []) if link.get("rel") not in _STRUCTURAL_RELS]
        stored["links"] = [
            {"rel": "root", "href": "../../catalog.json", "type": JSON_TYPE},
            {"rel": "parent", "href": "../collection.json", "type": JSON_TYPE},
            {"rel": "collection", "href": "../collection.json", "type": JSON_TYPE},
            *(
                {**link, "href": self._relative(link["href"], key)} if "href" in link else link
                for link in extra
            ),
        ]
        stored["assets"] = {
            name: {**asset, "href": self._relative(asset["href"], key)} if "href" in asset else asset
            for name, asset in item.get("assets", {}).items()
        }
        return key, stored

    @staticmethod
    def _item_link(item: dict[str, Any]) -> dict[str, Any]:
        item_id = item["id"]
        link: dict[str, Any] = {"rel": "item", "href": f"./{item_id}/{item_id}.json", "type": GEOJSON_TYPE}
        if item.get("bbox"):
            link[LINK_BBOX] = [float(v) for v in item["bbox"]]
        interval = _interval(item)
        if interval:
            link[LINK_INTERVAL] = [_iso(interval[0]), _iso(interval[1])]
        return link

    def get_item(self, collection_id: str, item_id: str) -> dict[str, Any] | None:
        links = self._collection_links(collection_id)
        if links is None or item_id not in links:
            return None
        return self._read_item(collection_id, item_id)

    def existing_ids(self, collection_id: str, item_ids: Iterable[str]) -> set[str]:
        links = self._collection_links(collection_id) or {}
        return {i for i in item_ids if i in links}

    def upsert_items(self, collection: CollectionConfig, items: list[dict[str, Any]]) -> list[ItemRef]:
        batch: dict[str, dict[str, Any]] = {}
        for item in items:
            found = item.get("collection")
            if found not in (None, collection.id):
                raise CatalogError(
                    f"item {item.get('id')!r} names collection {found!r}, not {collection.id!r}"
                )
            batch[str(item.get("id", ""))] = item
        written: dict[str, tuple[str, dict[str, Any]]] = {}
        for item_id, item in batch.items():
            key, stored = self._stored_item(collection.id, item)
            validate_item(stored)
            what = f"item {item_id!r} of collection {collection.id!r}"
            data = _dumps(stored, what)
            if self._read_bytes(key, what) != data:
                self._write(key, data, what, content_type=GEOJSON_TYPE)
            written[item_id] = (key, stored)
        links = {i: self._item_link(stored) for i, (_, stored) in written.items()}
        previous = self._update_collection(collection.id, collection, links) or set()
        self._ensure_root_link(collection)
        return [
            item_ref(stored, self.store.url(key), created=i not in previous)
            for i, (key, stored) in written.items()
        ]

    def delete_item(self, collection_id: str, item_id: str) -> bool:
        key = self.item_key(collection_id, item_id)
        previous = self._update_collection(collection_id, None, {item_id: None})
        with self._errors(f"cannot delete item {item_id!r} of collection {collection_id!r}"):
            self.store.delete(key)
        return previous is not None and item_id in previous

    def search(
        self,
        collection_id: str,
        *,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        bbox: Sequence[float] | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        links = self._collection_links(collection_id)
        if not links:
            return []
        wanted = set(ids) if ids is not None else None

        def may_match(item_id: str, link: dict[str, Any]) -> bool:
            if wanted is not None and item_id not in wanted:
                return False
            if bbox is not None and link.get(LINK_BBOX) and not bboxes_intersect(link[LINK_BBOX], bbox):
                return False
            span = link.get(LINK_INTERVAL)
            if (start or end) and isinstance(span, list) and len(span) == 2:
                lo, hi = parse_time(span[0]), parse_time(span[1])
                if lo and hi and not interval_overlaps((lo, hi), start, end):
                    return False
            return True

        def matches(item: dict[str, Any]) -> bool:
            if bbox is not None and item.get("bbox") and not bboxes_intersect(item["bbox"], bbox):
                return False
            interval = _interval(item)
            return not ((start or end) and interval and not interval_overlaps(interval, start, end))

        candidates = [i for i, link in links.items() if may_match(i, link)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            found = list(pool.map(lambda i: self._read_item(collection_id, i), candidates))
        return [item for item in found if item is not None and matches(item)]

    def _read_item(self, collection_id: str, item_id: str) -> dict[str, Any] | None:
        key = self.item_key(collection_id, item_id)
        item = self._read_json(key, f"item {item_id!r} of collection {collection_id!r}")
        return None if item is None else self._absolute_item(item, key)


# --- registration ---------------------------------------------------------------------------------


def register_product(
    product: Product,
    cog: CogInfo,
    collection: CollectionConfig,
    catalog: CatalogSettings,
    store: StoreSettings,
) -> ItemRef:
    """Describe a product's COG as a STAC item, validate it offline and upsert it.

    Raises:
        MissingDatetimeError: no datetime for the product.
        RasterError: the COG cannot be read or has no valid pixel.
        CatalogError: the item is invalid or the catalog write failed.

    """
    item = build_item(product, cog, collection, store)
    validate_item(item)
    return open_catalog(catalog, store).upsert_items(collection, [item])[0]


def has_item(collection_id: str, item_id: str, catalog: CatalogSettings, store: StoreSettings) -> bool:
    """Whether the catalog holds the item."""
    return bool(open_catalog(catalog, store).existing_ids(collection_id, [item_id]))


def find_existing_items(
    pairs: Iterable[tuple[str, str]], catalog: CatalogSettings, store: StoreSettings
) -> set[tuple[str, str]]:
    """Which ``(collection_id, item_id)`` pairs the catalog holds (one query per collection)."""
    backend = open_catalog(catalog, store)
    by_collection: dict[str, list[str]] = {}
    for collection_id, item_id in pairs:
        by_collection.setdefault(collection_id, []).append(item_id)
    return {
        (collection_id, item_id)
        for collection_id, item_ids in by_collection.items()
        for item_id in backend.existing_ids(collection_id, item_ids)
    }


@task(name="register", tags=["catalog-write"], **TASK_POLICY)
def register(
    product: Product,
    cog: CogInfo,
    collection: CollectionConfig,
    catalog: CatalogSettings,
    store: StoreSettings,
) -> ItemRef:
    """Task: :func:`register_product`."""
    return register_product(product, cog, collection, catalog, store)


@task(name="item-exists", tags=["object-store-read"], **TASK_POLICY)
def item_exists(collection_id: str, item_id: str, catalog: CatalogSettings, store: StoreSettings) -> bool:
    """Task: :func:`has_item`."""
    return has_item(collection_id, item_id, catalog, store)


@task(name="existing-items", tags=["object-store-read"], **TASK_POLICY)
def existing_items(
    pairs: list[tuple[str, str]], catalog: CatalogSettings, store: StoreSettings
) -> set[tuple[str, str]]:
    """Task: :func:`find_existing_items`."""
    return find_existing_items(pairs, catalog, store)


@task(name="read-item", tags=["object-store-read"], **TASK_POLICY)
def read_item(
    collection_id: str, item_id: str, catalog: CatalogSettings, store: StoreSettings
) -> dict[str, Any] | None:
    """Task: the stored item, or None (read before a replace so its old extent can be re-seeded)."""
    return open_catalog(catalog, store).get_item(collection_id, item_id)

"""The static STAC catalog on the object store: catalog.json, collection.json, item files."""

from __future__ import annotations

import datetime as dt
import json
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pystac

from skyvault.catalog.backend import (
    GEOJSON_TYPE,
    JSON_TYPE,
    LINK_BBOX,
    LINK_INTERVAL,
    STRUCTURAL_RELS,
    WORLD_BBOX,
    bboxes_intersect,
    iso_time,
    item_ref,
    prepare_batch,
    readable_interval,
    union_bbox,
)
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import CatalogSettings, StoreSettings
from skyvault.errors import (
    CatalogError,
    InvalidIdentifierError,
    ItemsRejectedError,
    ObjectNotFoundError,
    StorageError,
    TransientCatalogError,
    TransientStorageError,
)
from skyvault.ids import check_id
from skyvault.items import interval_overlaps, parse_time
from skyvault.models import ItemRef
from skyvault.stac.item import validate_item
from skyvault.storage.store import ObjectStore, check_prefix, open_store

# --- the static catalog ---------------------------------------------------------------------------


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

    ``catalog.json`` and ``collection.json`` are changed only through ``store.update`` (an
    exclusive ``flock`` on a local folder, a conditional PUT on S3), so any number of threads,
    processes and hosts can register into one collection at once without losing a link.
    """

    def __init__(self, catalog: CatalogSettings, store: StoreSettings) -> None:
        self.settings = catalog
        self.prefix = check_prefix(catalog.prefix.strip("/"))
        self.store: ObjectStore = open_store(store)
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
        return None if data is None else self._parse(data, key, what)

    @staticmethod
    def _parse(data: bytes, key: str, what: str) -> dict[str, Any]:
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

    def _update(
        self, key: str, what: str, change: Callable[[dict[str, Any] | None], dict[str, Any] | None]
    ) -> None:
        """Read-modify-write one JSON document atomically across processes (``store.update``).

        ``change`` gets the parsed document (None when missing) and returns it changed, or None to
        leave it as it is; it may run more than once when another writer gets in first.
        """

        def apply(data: bytes | None) -> bytes | None:
            doc = None if data is None else self._parse(data, key, what)
            changed = change(doc)
            return None if changed is None else _dumps(changed, what)

        with self._errors(f"cannot write {what}"):
            self.store.update(key, apply, content_type=JSON_TYPE)

    def _ensure_root_link(self, collection: CollectionConfig) -> None:
        href = f"./{collection.id}/collection.json"
        child = {"rel": "child", "href": href, "type": JSON_TYPE, "title": collection.title or collection.id}

        def link(root: dict[str, Any] | None) -> dict[str, Any]:
            if root is None:
                root = pystac.Catalog(
                    id=self.settings.id, description=self.settings.description, title=self.settings.title
                ).to_dict(include_self_link=False, transform_hrefs=False)
                root["links"] = [{"rel": "root", "href": "./catalog.json", "type": JSON_TYPE}]
            links: list[dict[str, Any]] = root.get("links", [])
            kept = [link for link in links if not (link.get("rel") == "child" and link.get("href") == href)]
            root["links"] = [*kept, child]
            return root

        self._update(self.root_key(), "root catalog", link)

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
        extent = pystac.Extent(pystac.SpatialExtent([list(WORLD_BBOX)]), pystac.TemporalExtent(unbounded))
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
            [iso_time(min(s for s, _ in intervals)), iso_time(max(e for _, e in intervals))]
            if intervals
            else [None, None]
        )
        doc["extent"] = {
            "spatial": {"bbox": [bbox or list(WORLD_BBOX)]},
            "temporal": {"interval": [temporal]},
        }

    def _update_collection(
        self,
        collection_id: str,
        config: CollectionConfig | None,
        change: Mapping[str, dict[str, Any] | None],
    ) -> set[str] | None:
        """Read-modify-write ``collection.json`` atomically across processes and hosts.

        ``config`` refreshes the collection's metadata and creates it when missing (without it a
        missing collection stays missing). ``change`` maps item ids to their new link (None
        removes it). Writes only if something changed. Returns the item ids linked before, or
        None if there was no collection.
        """
        previous: set[str] | None = None

        def apply(doc: dict[str, Any] | None) -> dict[str, Any] | None:
            nonlocal previous
            previous = None if doc is None else set(self._item_links(doc))
            if doc is None:
                if config is None:
                    return None
                doc = self._new_collection(config)
            if config is not None:
                self._apply_config(doc, config)
            links = self._item_links(doc)
            for item_id, link in change.items():
                if link is None:
                    links.pop(item_id, None)
                else:
                    links[item_id] = link
            self._set_item_links(doc, links)
            self._set_extent(doc, links)
            return doc

        self._update(self.collection_key(collection_id), f"collection {collection_id!r}", apply)
        return previous

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
        extra = [link for link in item.get("links", []) if link.get("rel") not in STRUCTURAL_RELS]
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
        interval = readable_interval(item)
        if interval:
            link[LINK_INTERVAL] = [iso_time(interval[0]), iso_time(interval[1])]
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
        batch, refused = prepare_batch(collection.id, items)
        written: dict[str, tuple[str, dict[str, Any]]] = {}
        for item_id, item in batch.items():
            key, stored = self._stored_item(collection.id, item)
            try:
                validate_item(stored)
            except CatalogError as e:
                refused[item_id] = str(e)
                continue
            what = f"item {item_id!r} of collection {collection.id!r}"
            data = _dumps(stored, what)
            if self._read_bytes(key, what) != data:
                self._write(key, data, what, content_type=GEOJSON_TYPE)
            written[item_id] = (key, stored)
        refs: list[ItemRef] = []
        if written or not refused:
            links = {i: self._item_link(stored) for i, (_, stored) in written.items()}
            previous = self._update_collection(collection.id, collection, links) or set()
            self._ensure_root_link(collection)
            refs = [
                item_ref(stored, self.store.url(key), created=i not in previous)
                for i, (key, stored) in written.items()
            ]
        if refused:
            raise ItemsRejectedError(collection.id, refused, refs)
        return refs

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
            interval = readable_interval(item)
            return not ((start or end) and interval and not interval_overlaps(interval, start, end))

        candidates = [i for i, link in links.items() if may_match(i, link)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            found = list(pool.map(lambda i: self._read_item(collection_id, i), candidates))
        return [item for item in found if item is not None and matches(item)]

    def _read_item(self, collection_id: str, item_id: str) -> dict[str, Any] | None:
        key = self.item_key(collection_id, item_id)
        item = self._read_json(key, f"item {item_id!r} of collection {collection_id!r}")
        return None if item is None else self._absolute_item(item, key)

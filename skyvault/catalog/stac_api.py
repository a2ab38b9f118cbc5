"""A STAC API with the Transactions extension as catalog (e.g. stac-fastapi-pgstac).

Requests (paths under ``catalog.url``):

- collections: ``GET /collections/{c}``, ``POST /collections``, ``PUT /collections/{c}``;
- items: ``POST /collections/{c}/bulk_items`` (``{"items": {id: item}, "method": "upsert"}``, the
  Bulk Transactions extension) where the server offers it, else ``POST /collections/{c}/items``
  and, for an id already there, ``PUT /collections/{c}/items/{id}``; ``GET`` and ``DELETE`` of one
  item;
- reads: ``POST /search`` with ``collections``, ``ids``, ``bbox`` or ``intersects``, ``datetime``
  and the Fields extension, following ``next`` links to the last page.

Connection errors (refused, reset, timeouts) and HTTP 429 and 5xx are retried
``catalog.max_attempts`` times in all with exponential backoff from ``catalog.backoff_seconds``
(a small ``Retry-After`` is honoured), then raise :class:`TransientCatalogError`; other refusals
raise :class:`CatalogError` with the server's message. Tokens and passwords never appear in logs or
messages.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pystac

from skyvault.catalog.backend import (
    STRUCTURAL_RELS,
    WORLD_BBOX,
    bboxes_intersect,
    iso_time,
    item_datetime_key,
    item_ref,
    prepare_batch,
    readable_interval,
    union_bbox,
)
from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import CatalogSettings, StoreSettings
from skyvault.errors import (
    CatalogError,
    ConfigError,
    InvalidIdentifierError,
    ItemsRejectedError,
    TransientCatalogError,
)
from skyvault.ids import check_id
from skyvault.items import bbox_parts, interval_overlaps, parse_time, utc
from skyvault.models import ItemRef

log = logging.getLogger(__name__)

#: Statuses worth another try: throttling and server-side failures (not 501/505, which never change).
RETRY_STATUS = frozenset({429, 500, 502, 503, 504, *range(506, 600)})
#: Longest wait between two tries, and the longest ``Retry-After`` honoured.
MAX_BACKOFF_SECONDS = 30.0
#: Items per ``/search`` page, and ids per ``/search`` request.
PAGE_SIZE = 1000
#: Pages followed by one search before it is cut short (a server that keeps answering ``next``).
MAX_PAGES = 100_000
#: Rounds of read-widen-write of a collection's extent before giving up under contention.
EXTENT_ROUNDS = 5
#: Links the server makes for every item and collection; never sent to it.
SERVER_RELS = frozenset(
    {*STRUCTURAL_RELS, "item", "items", "child", "http://www.opengis.net/def/rel/ogc/1.0/queryables"}
)
ID_FIELDS: dict[str, list[str]] = {
    "include": [
        "id",
        "collection",
        "properties.datetime",
        "properties.start_datetime",
        "properties.end_datetime",
    ],
    "exclude": ["geometry", "assets", "links", "bbox"],
}

_LOCAL = threading.local()
_NO_BULK: set[str] = set()
_NO_BULK_LOCK = threading.Lock()


def _shared_client(key: tuple[Any, ...], make: Callable[[], httpx.Client]) -> httpx.Client:
    """The calling thread's client for ``key`` (connections are reused across instances)."""
    pid = os.getpid()
    if getattr(_LOCAL, "pid", None) != pid:  # a forked child never reuses its parent's sockets
        _LOCAL.pid = pid
        _LOCAL.clients = {}
    clients: dict[tuple[Any, ...], httpx.Client] = _LOCAL.clients
    client = clients.get(key)
    if client is None or client.is_closed:
        client = clients[key] = make()
    return client


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _retry_after(response: httpx.Response) -> float | None:
    """The response's ``Retry-After`` in seconds (a number or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (utc(when) - dt.datetime.now(dt.UTC)).total_seconds())


class StacApiCatalog:
    """Items and collections kept by a STAC API with the Transactions extension at ``catalog.url``.

    Authenticates with ``catalog.token`` (``Authorization: Bearer``) or ``catalog.username`` +
    ``catalog.password`` (basic). Each thread keeps one ``httpx.Client`` per URL and credentials,
    shared by every instance, so connections are reused from call to call.

    Collection extents are kept by the client: after a batch is written, a collection whose extent
    does not cover the batch is read again, widened and written back (``PUT``), until a read shows
    it covers the batch. The API offers no conditional write, so a writer that widens the extent
    between another writer's check and that writer's ``PUT`` can still be undone; the next batch of
    either writer widens it again. Extents only grow: a deleted or moved item leaves them wider
    than needed, still covering every item.
    """

    def __init__(self, catalog: CatalogSettings, store: StoreSettings) -> None:
        if not catalog.url:
            raise ConfigError("catalog.backend 'stac-api' needs catalog.url (SKYVAULT_CATALOG__URL)")
        self.settings = catalog
        self.store_settings = store
        self.url = catalog.url.rstrip("/")
        parts = urlsplit(self.url)
        self._origin = (parts.scheme, parts.netloc)
        self._display_url = _without_userinfo(self.url)
        secrets = [s.get_secret_value() for s in (catalog.token, catalog.password) if s is not None]
        self._secrets = [s for s in (*secrets, parts.password) if s]
        self._headers = {"Accept": "application/json", "User-Agent": "skyvault"}
        self._auth: httpx.Auth | None = None
        auth_key: tuple[str, ...] = ()
        if catalog.token is not None:
            self._headers["Authorization"] = f"Bearer {catalog.token.get_secret_value()}"
            auth_key = ("bearer", _digest(catalog.token.get_secret_value()))
        elif catalog.username or catalog.password is not None:
            if not catalog.username or catalog.password is None:
                raise ConfigError(
                    "catalog 'stac-api': basic authentication needs both catalog.username and "
                    "catalog.password (or give catalog.token)"
                )
            password = catalog.password.get_secret_value()
            self._auth = httpx.BasicAuth(catalog.username, password)
            self._secrets.append(base64.b64encode(f"{catalog.username}:{password}".encode()).decode())
            auth_key = ("basic", catalog.username, _digest(password))
        self._client_key = (self.url, auth_key, catalog.timeout_seconds)
        with _NO_BULK_LOCK:
            self._bulk: bool | None = False if self.url in _NO_BULK else None

    # HTTP

    @property
    def _client(self) -> httpx.Client:
        return _shared_client(
            self._client_key,
            lambda: httpx.Client(
                base_url=self.url + "/",
                headers=self._headers,
                auth=self._auth,
                timeout=self.settings.timeout_seconds,
            ),
        )

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _server_message(self, response: httpx.Response) -> str:
        """The server's explanation of a refusal (``description``, ``detail`` or the body)."""
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        text: str
        if isinstance(body, dict) and (body.get("description") or body.get("detail")):
            detail = body.get("description") or body.get("detail")
            if isinstance(detail, list):
                detail = "; ".join(
                    f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}"
                    if isinstance(d, dict)
                    else str(d)
                    for d in detail[:5]
                )
            text = str(detail)
        else:
            try:
                text = response.text.strip()
            except UnicodeDecodeError:
                text = ""
        text = " ".join(text.split())[:500]
        return self._redact(text) if text else f"HTTP {response.status_code}"

    def _refused(self, response: httpx.Response, what: str) -> CatalogError:
        request = response.request
        return CatalogError(
            f"{what} at {self._display_url}: {request.method} {request.url.path} answered "
            f"HTTP {response.status_code}: {self._server_message(response)}"
        )

    def _target(self, path_or_url: str) -> str:
        """A path under the API's URL, or an absolute URL moved onto the API's origin."""
        if "://" not in path_or_url:
            return path_or_url.lstrip("/")
        parts = urlsplit(path_or_url)
        if (parts.scheme, parts.netloc) == self._origin:
            return path_or_url
        return urlunsplit((*self._origin, parts.path, parts.query, ""))

    def _request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        json_body: Any = None,
        retry: frozenset[int] = RETRY_STATUS,
        give_back: frozenset[int] = frozenset(),
    ) -> httpx.Response:
        """One logical request with bounded retries; returns the first response not retried.

        Statuses in ``retry`` are tried again; once the tries are used up, a status in
        ``give_back`` is returned, any other raises.

        Raises:
            TransientCatalogError: the API stayed unreachable, busy or failing; names ``what``.

        """
        attempts = self.settings.max_attempts
        target = self._target(path)
        shown = f"{method} /{urlsplit(target).path.lstrip('/')}"
        for attempt in range(1, attempts + 1):
            try:
                response = self._client.request(method, target, json=json_body)
            except httpx.TransportError as e:
                if attempt == attempts:
                    raise TransientCatalogError(
                        f"{what} at {self._display_url}: unreachable after {attempts} tries "
                        f"({shown}: {type(e).__name__})"
                    ) from e
                self._pause(attempt, None, shown, what, type(e).__name__)
                continue
            if response.status_code >= 500:
                # A server that failed mid-request may drop the connection without saying so:
                # the next request starts on fresh connections.
                self._client.close()
            if response.status_code not in retry:
                return response
            if attempt == attempts:
                if response.status_code in give_back:
                    return response
                raise TransientCatalogError(
                    f"{what} at {self._display_url}: HTTP {response.status_code} after {attempts} tries "
                    f"({shown}: {self._server_message(response)})"
                )
            self._pause(attempt, response, shown, what, f"HTTP {response.status_code}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _pause(
        self, attempt: int, response: httpx.Response | None, request: str, what: str, why: str
    ) -> None:
        delay = min(self.settings.backoff_seconds * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
        asked = _retry_after(response) if response is not None else None
        if asked is not None and asked <= MAX_BACKOFF_SECONDS:
            delay = max(delay, asked)
        log.warning(
            "catalog %s: %s for %s failed (%s); try %d of %d in %.2fs",
            self._display_url,
            request,
            what,
            why,
            attempt + 1,
            self.settings.max_attempts,
            delay,
        )
        time.sleep(delay)

    def _json(self, response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError as e:
            raise CatalogError(
                f"{what} at {self._display_url}: {response.request.method} {response.request.url.path} "
                f"answered HTTP {response.status_code} with a body that is not JSON"
            ) from e

    # paths and ids

    @staticmethod
    def _check(value: str, what: str, collection_id: str | None = None) -> str:
        try:
            return check_id(value, what)
        except InvalidIdentifierError as e:
            where = f" in collection {collection_id!r}" if collection_id else ""
            raise CatalogError(f"{e}{where}") from e

    @staticmethod
    def _segment(value: str) -> str:
        return quote(value, safe="")

    def _collection_path(self, collection_id: str) -> str:
        return f"collections/{self._segment(self._check(collection_id, 'collection id'))}"

    def _item_path(self, collection_id: str, item_id: str) -> str:
        item_id = self._check(item_id, "item id", collection_id)
        return f"{self._collection_path(collection_id)}/items/{self._segment(item_id)}"

    def item_url(self, collection_id: str, item_id: str) -> str:
        """The item's self URL: ``{url}/collections/{collection_id}/items/{item_id}``."""
        return f"{self._display_url}/{self._item_path(collection_id, item_id)}"

    # collections

    def _read_collection(self, collection_id: str, what: str) -> dict[str, Any] | None:
        response = self._request("GET", self._collection_path(collection_id), what)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._refused(response, what)
        doc = self._json(response, what)
        if not isinstance(doc, dict):
            raise CatalogError(f"{what} at {self._display_url}: the collection is not a JSON object")
        return doc

    def _write_collection(self, doc: dict[str, Any], what: str) -> None:
        body = {**doc, "links": [link for link in doc.get("links", []) if link.get("rel") not in SERVER_RELS]}
        response = self._request("PUT", self._collection_path(str(doc["id"])), what, json_body=body)
        if response.status_code >= 400:
            raise self._refused(response, what)

    @staticmethod
    def _metadata(collection: CollectionConfig) -> dict[str, Any]:
        return {
            "title": collection.title or None,
            "description": collection.description or collection.title or collection.id,
            "license": collection.license,
            "keywords": list(collection.keywords) or None,
        }

    def _new_collection(self, collection: CollectionConfig) -> dict[str, Any]:
        unbounded: list[list[dt.datetime | None]] = [[None, None]]
        extent = pystac.Extent(pystac.SpatialExtent([list(WORLD_BBOX)]), pystac.TemporalExtent(unbounded))
        doc: dict[str, Any] = pystac.Collection(
            id=collection.id, description=collection.description or collection.id, extent=extent
        ).to_dict(include_self_link=False, transform_hrefs=False)
        doc.update({k: v for k, v in self._metadata(collection).items() if v is not None})
        doc["links"] = []
        return doc

    def _ensure(self, collection: CollectionConfig, what: str) -> dict[str, Any]:
        """The collection's document, created (or its metadata refreshed) from the config."""
        doc = self._read_collection(collection.id, what)
        if doc is None:
            new = self._new_collection(collection)
            response = self._request("POST", "collections", what, json_body=new)
            if response.status_code == 409:  # another writer created it first
                doc = self._read_collection(collection.id, what)
                if doc is None:
                    raise CatalogError(
                        f"{what} at {self._display_url}: collection {collection.id!r} is reported as "
                        "existing but cannot be read"
                    )
            elif response.status_code >= 400:
                raise self._refused(response, what)
            else:
                log.info("catalog %s: created collection %s", self._display_url, collection.id)
                return new
        wanted = self._metadata(collection)
        if any(doc.get(name) != value for name, value in wanted.items()):
            for name, value in wanted.items():
                if value is None:
                    doc.pop(name, None)
                else:
                    doc[name] = value
            self._write_collection(doc, what)
        return doc

    def ensure_collection(self, collection: CollectionConfig) -> None:
        self._ensure(collection, f"collection {collection.id!r}")

    # extents

    @staticmethod
    def _extent(doc: dict[str, Any]) -> tuple[list[float] | None, list[dt.datetime | None] | None]:
        """The collection's overall bbox and interval; None for a placeholder (no items seen yet)."""
        extent = _mapping(doc.get("extent"))
        try:
            bbox: list[float] | None = [float(v) for v in extent["spatial"]["bbox"][0]]
        except (KeyError, IndexError, TypeError, ValueError):
            bbox = None
        try:
            raw = extent["temporal"]["interval"][0]
            interval: list[dt.datetime | None] | None = [parse_time(raw[0]), parse_time(raw[1])]
        except (KeyError, IndexError, TypeError):
            interval = None
        if interval is None or interval == [None, None]:
            return None, None
        return bbox, interval

    @classmethod
    def _covers(cls, doc: dict[str, Any], bbox: list[float], lo: dt.datetime, hi: dt.datetime) -> bool:
        have_bbox, have_interval = cls._extent(doc)
        if have_bbox is None or have_interval is None:
            return False
        start, end = have_interval
        return (
            union_bbox([have_bbox, bbox]) == union_bbox([have_bbox])
            and (start is None or start <= lo)
            and (end is None or end >= hi)
        )

    @classmethod
    def _widened(
        cls, doc: dict[str, Any], bbox: list[float], lo: dt.datetime, hi: dt.datetime
    ) -> dict[str, Any]:
        """``doc`` with its overall extent grown to cover ``bbox`` and ``[lo, hi]`` (set if a placeholder)."""
        have_bbox, have_interval = cls._extent(doc)
        extent = _mapping(doc.get("extent"))
        spatial, temporal = _mapping(extent.get("spatial")), _mapping(extent.get("temporal"))
        interval: list[str | None]
        if have_bbox is None or have_interval is None:
            bboxes: list[Any] = [bbox]
            interval = [iso_time(lo), iso_time(hi)]
        else:
            bboxes = [union_bbox([have_bbox, bbox]) or bbox, *list(spatial.get("bbox") or [])[1:]]
            start, end = have_interval
            interval = [
                None if start is None else iso_time(min(start, lo)),
                None if end is None else iso_time(max(end, hi)),
            ]
        intervals = [interval, *list(temporal.get("interval") or [])[1:]]
        return {
            **doc,
            "extent": {
                **extent,
                "spatial": {**spatial, "bbox": bboxes},
                "temporal": {**temporal, "interval": intervals},
            },
        }

    def _keep_extent(
        self, collection_id: str, items: Iterable[dict[str, Any]], doc: dict[str, Any], what: str
    ) -> None:
        """Widen the collection's extent until it covers ``items`` (no write when it already does)."""
        items = list(items)
        bbox = union_bbox(item["bbox"] for item in items if item.get("bbox"))
        intervals = [span for item in items if (span := readable_interval(item)) is not None]
        if bbox is None or not intervals:
            return
        lo, hi = min(s for s, _ in intervals), max(e for _, e in intervals)
        for _ in range(EXTENT_ROUNDS):
            if self._covers(doc, bbox, lo, hi):
                return
            fresh = self._read_collection(collection_id, what)
            if fresh is None:
                raise CatalogError(f"{what} at {self._display_url}: collection {collection_id!r} disappeared")
            if self._covers(fresh, bbox, lo, hi):
                return
            self._write_collection(self._widened(fresh, bbox, lo, hi), what)
            doc = self._read_collection(collection_id, what) or fresh
        if not self._covers(doc, bbox, lo, hi):
            raise TransientCatalogError(
                f"{what} at {self._display_url}: the extent of collection {collection_id!r} was changed by "
                f"other writers {EXTENT_ROUNDS} times while it was widened; try again"
            )

    # reads

    def _pages(self, body: dict[str, Any], what: str) -> Iterator[dict[str, Any]]:
        """Every feature a ``POST /search`` finds, page after page (``next`` links)."""
        method, target = "POST", "search"
        payload: dict[str, Any] | None = body
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            response = self._request(method, target, what, json_body=payload)
            if response.status_code == 404:
                return
            if response.status_code != 200:
                raise self._refused(response, what)
            page = self._json(response, what)
            if not isinstance(page, dict):
                raise CatalogError(f"{what} at {self._display_url}: a search page is not a JSON object")
            for feature in page.get("features") or []:
                if isinstance(feature, dict):
                    yield feature
            link = next(
                (
                    link
                    for link in page.get("links") or []
                    if isinstance(link, dict) and link.get("rel") == "next" and link.get("href")
                ),
                None,
            )
            if link is None or not page.get("features"):
                return
            method = str(link.get("method") or "GET").upper()
            target = str(link["href"])
            if method == "POST":
                given = link.get("body") if isinstance(link.get("body"), dict) else None
                payload = (
                    {**(payload or {}), **given}
                    if given is not None and link.get("merge")
                    else given or payload
                )
            else:
                payload = None
            marker = json.dumps([method, target, payload], sort_keys=True, default=str)
            if marker in seen:
                return
            seen.add(marker)
        raise CatalogError(f"{what} at {self._display_url}: the search did not end after {MAX_PAGES} pages")

    def _found(
        self, collection_id: str, item_ids: Sequence[str], what: str
    ) -> dict[str, list[dict[str, Any]]]:
        """The stored copies of ``item_ids`` (id, collection and times only), by id."""
        found: dict[str, list[dict[str, Any]]] = {}
        ids = [i for i in dict.fromkeys(item_ids) if _is_id(i)]
        for start in range(0, len(ids), PAGE_SIZE):
            chunk = ids[start : start + PAGE_SIZE]
            body = {"collections": [collection_id], "ids": chunk, "limit": PAGE_SIZE, "fields": ID_FIELDS}
            for feature in self._pages(body, what):
                item_id = feature.get("id")
                if item_id in chunk and feature.get("collection", collection_id) == collection_id:
                    found.setdefault(str(item_id), []).append(feature)
        return found

    def get_item(self, collection_id: str, item_id: str) -> dict[str, Any] | None:
        what = f"item {item_id!r} of collection {collection_id!r}"
        response = self._request("GET", self._item_path(collection_id, item_id), what)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._refused(response, what)
        item = self._json(response, what)
        if not isinstance(item, dict):
            raise CatalogError(f"{what} at {self._display_url}: the item is not a JSON object")
        return item

    def existing_ids(self, collection_id: str, item_ids: Iterable[str]) -> set[str]:
        self._check(collection_id, "collection id")
        return set(self._found(collection_id, list(item_ids), f"ids of collection {collection_id!r}"))

    def search(
        self,
        collection_id: str,
        *,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        bbox: Sequence[float] | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        self._check(collection_id, "collection id")
        what = f"search of collection {collection_id!r}"
        body: dict[str, Any] = {"collections": [collection_id], "limit": PAGE_SIZE}
        if ids is not None:
            wanted = [i for i in dict.fromkeys(ids) if _is_id(i)]
            if not wanted:
                return []
            body["ids"] = wanted
        if start is not None and end is not None and utc(start) > utc(end):
            return []
        if start is not None or end is not None:
            lo, hi = (".." if t is None else iso_time(t) for t in (start, end))
            body["datetime"] = f"{lo}/{hi}"
        if bbox is not None:
            parts = bbox_parts(bbox)
            if len(parts) == 1:
                body["bbox"] = list(parts[0])
            else:  # across the antimeridian: one box each side
                body["intersects"] = {
                    "type": "MultiPolygon",
                    "coordinates": [[[[w, s], [e, s], [e, n], [w, n], [w, s]]] for w, s, e, n in parts],
                }
        among = set(body.get("ids", []))
        out: dict[str, dict[str, Any]] = {}
        for item in self._pages(body, what):
            if item.get("collection", collection_id) != collection_id or "id" not in item:
                continue
            if among and item["id"] not in among:
                continue
            if bbox is not None and item.get("bbox") and not bboxes_intersect(item["bbox"], bbox):
                continue
            interval = readable_interval(item)
            if (start or end) and interval and not interval_overlaps(interval, start, end):
                continue
            out[str(item["id"])] = item
        return list(out.values())

    # writes

    @staticmethod
    def _outgoing(item: dict[str, Any]) -> dict[str, Any]:
        """The item as sent: links the server makes itself (self, root, parent...) left out."""
        return {
            **item,
            "links": [link for link in item.get("links", []) if link.get("rel") not in SERVER_RELS],
        }

    def _write_bulk(
        self, collection_id: str, items: dict[str, dict[str, Any]], what: str
    ) -> tuple[set[str], dict[str, str]] | None:
        """One bulk upsert; the ids written and refused, or None when it must go item by item."""
        response = self._request(
            "POST",
            f"{self._collection_path(collection_id)}/bulk_items",
            what,
            json_body={"items": items, "method": "upsert"},
            retry=RETRY_STATUS - {500},
        )
        status = response.status_code
        if status in (404, 405):
            log.info("catalog %s: no bulk transactions; items are written one by one", self._display_url)
            self._bulk = False
            with _NO_BULK_LOCK:
                _NO_BULK.add(self.url)
            return None
        if status in (401, 403):
            raise self._refused(response, what)
        if status >= 400:
            # The whole batch was refused (a body too large, an item the database cannot take):
            # item by item, the server names the bad ones and takes the others.
            log.warning(
                "catalog %s: bulk write of %s refused (HTTP %d: %s); writing its items one by one",
                self._display_url,
                what,
                status,
                self._server_message(response),
            )
            return None
        self._bulk = True
        body = self._json(response, what)
        refused: dict[str, str] = {}
        for error in (body.get("errors") or []) if isinstance(body, dict) else []:
            if isinstance(error, dict) and str(error.get("id")) in items:
                refused[str(error["id"])] = self._redact(str(error.get("msg") or "refused by the catalog"))
        return set(items) - set(refused), refused

    def _write_one(
        self, collection_id: str, item_id: str, item: dict[str, Any], exists: bool, what: str
    ) -> str | None:
        """Create or replace one item; None when written, else why the server refused it."""
        name = f"item {item_id!r} of {what}"
        method = "PUT" if exists else "POST"
        for _ in range(4):
            path = (
                self._item_path(collection_id, item_id)
                if method == "PUT"
                else f"{self._collection_path(collection_id)}/items"
            )
            response = self._request(method, path, name, json_body=item, give_back=frozenset({500}))
            status = response.status_code
            if status < 300:
                return None
            if method == "POST" and status == 409:
                method = "PUT"
            elif method == "PUT" and status == 404:
                method = "POST"
            elif status in (401, 403, 404):
                raise self._refused(response, name)
            else:  # the server refuses this item: 400, 413, 422..., or a 500 that persisted
                return f"HTTP {status}: {self._server_message(response)}"
        raise TransientCatalogError(
            f"{name} at {self._display_url}: it kept being created and deleted by other writers"
        )

    def _write(
        self, collection_id: str, items: dict[str, dict[str, Any]], known: set[str], what: str
    ) -> tuple[set[str], dict[str, str]]:
        if not items:
            return set(), {}
        if self._bulk is not False:
            result = self._write_bulk(collection_id, items, what)
            if result is not None:
                return result
        written: set[str] = set()
        refused: dict[str, str] = {}
        for item_id, item in items.items():
            why = self._write_one(collection_id, item_id, item, item_id in known, what)
            if why is None:
                written.add(item_id)
            else:
                refused[item_id] = why
        if not written and all(why.startswith("HTTP 5") for why in refused.values()):
            raise TransientCatalogError(
                f"{what} at {self._display_url}: every item failed with a server error: "
                + "; ".join(f"{i}: {why}" for i, why in list(refused.items())[:3])
            )
        return written, refused

    def upsert_items(self, collection: CollectionConfig, items: list[dict[str, Any]]) -> list[ItemRef]:
        """Insert or replace ``items`` (see :meth:`CatalogBackend.upsert_items`).

        Which ids exist is learnt first (one ``/search``); the batch is written with one bulk
        upsert where the server offers it, else item by item. An item whose datetime changed is
        checked afterwards to be stored exactly once.

        Raises:
            ItemsRejectedError: some items were refused (invalid, or by the server); the others are
                written and their refs carried.
            TransientCatalogError: the API stayed unreachable or busy; names the batch.
            CatalogError: the API refused the collection or the batch as a whole.

        """
        batch, refused = prepare_batch(collection.id, items)
        what = f"batch of {len(batch)} items for collection {collection.id!r}"
        refs: list[ItemRef] = []
        if batch or not refused:
            doc = self._ensure(collection, what)
            before = self._found(collection.id, list(batch), what)
            outgoing = {item_id: self._outgoing(item) for item_id, item in batch.items()}
            written, server_refused = self._write(collection.id, outgoing, set(before), what)
            refused.update(server_refused)
            moved = [
                i
                for i in written
                if any(item_datetime_key(old) != item_datetime_key(batch[i]) for old in before.get(i, []))
            ]
            if moved:
                copies = self._found(collection.id, moved, what)
                doubled = sorted(i for i, found in copies.items() if len(found) > 1)
                if doubled:
                    raise CatalogError(
                        f"{what} at {self._display_url}: items {doubled} changed datetime and are now "
                        "stored more than once"
                    )
            self._keep_extent(collection.id, (batch[i] for i in batch if i in written), doc, what)
            refs = [
                item_ref(batch[i], self.item_url(collection.id, i), created=i not in before)
                for i in batch
                if i in written
            ]
        if refused:
            raise ItemsRejectedError(collection.id, refused, refs)
        return refs

    def delete_item(self, collection_id: str, item_id: str) -> bool:
        """Remove an item; True if it was there (the collection's extent is left as it is)."""
        what = f"item {item_id!r} of collection {collection_id!r}"
        response = self._request("DELETE", self._item_path(collection_id, item_id), what)
        if response.status_code == 404:
            return False
        if response.status_code >= 400:
            raise self._refused(response, what)
        return True


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _without_userinfo(url: str) -> str:
    """``url`` without a ``user:password@`` part, fit for messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[1], parts.path, parts.query, ""))


def _is_id(value: Any) -> bool:
    try:
        check_id(value)
    except InvalidIdentifierError:
        return False
    return True

"""A pgstac database as catalog: items loaded with pypgstac, read and searched with SQL.

Every call runs on one connection per instance (opened on first use, ``search_path``
``pgstac,public``), with the password from ``catalog.password`` given apart from the DSN. Writes
of one collection take a transaction-level advisory lock on the collection id, so loads of one
collection from several processes or hosts take turns instead of deadlocking on its partitions.

New collections are partitioned by month (:data:`PARTITION_TRUNC`); the first load into a
collection locks pgstac's ``items`` table until it commits, as creating the collection's partition
does anyway. An item whose datetime changed is loaded with pypgstac's ``delsert`` (delete by id,
then insert), so it never stays behind in the partition of its old month; the others with
``upsert``. Each write then refreshes the statistics of the partitions it touched and sets the
collection's extent from them.

A lost connection, a server that is down, a deadlock or a serialization failure is retried within
the call ``catalog.max_attempts`` times in all with exponential backoff from
``catalog.backoff_seconds``, then raises :class:`TransientCatalogError`; other database errors
raise :class:`CatalogError`. Both name the collection (and the item or the batch size).

The href of an :class:`ItemRef` is the item's ``self`` link when it has one, else
``<dsn without password>#<collection>/<item id>``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import psycopg
import psycopg.conninfo
import psycopg.errors
from psycopg import sql
from psycopg.rows import BaseRowFactory, TupleRow, tuple_row
from psycopg.types.json import Jsonb
from pypgstac import version as pypgstac_version
from pypgstac.db import PgstacDB
from pypgstac.load import Loader, Methods

from skyvault.catalog.backend import (
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
    ConfigError,
    ItemsRejectedError,
    TransientCatalogError,
)
from skyvault.items import bbox_parts, interval_overlaps, parse_time
from skyvault.models import ItemRef

logger = logging.getLogger(__name__)

T = TypeVar("T")
Connection = psycopg.Connection[TupleRow]

#: The pypgstac this module loads with (the database's pgstac must match its major.minor).
PYPGSTAC_VERSION: str = pypgstac_version.__version__
SEARCH_PATH = "pgstac,public"
#: How pgstac partitions the items of a collection this backend creates.
PARTITION_TRUNC = "month"
#: Longest wait between two attempts of one call.
MAX_BACKOFF_SECONDS = 30.0
#: Errors one item can cause (bad values, constraint violations, pgstac or PostGIS refusing it):
#: a batch failing with one of these is loaded again item by item.
ITEM_ERRORS: tuple[type[psycopg.Error], ...] = (
    psycopg.DataError,
    psycopg.IntegrityError,
    psycopg.InternalError,
    psycopg.errors.RaiseException,
)
TIME_PROPERTIES = ("datetime", "start_datetime", "end_datetime")
_UTC_TEXT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z\Z")


def public_dsn(dsn: str) -> str:
    """``dsn`` without its password (URL or ``key=value`` form), fit for messages and hrefs."""
    if "://" in dsn:
        parts = urllib.parse.urlsplit(dsn)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            netloc = f"{userinfo.partition(':')[0]}@{host}"
        query = urllib.parse.urlencode(
            [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "password"]
        )
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return re.sub(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "password=***", dsn)
    params.pop("password", None)
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})


def pgstac_times(item: dict[str, Any]) -> tuple[dt.datetime, dt.datetime] | None:
    """The ``(datetime, end_datetime)`` pgstac stores for the item (see :func:`readable_interval`)."""
    return readable_interval(item)


def _normalised(item: dict[str, Any]) -> dict[str, Any]:
    """The item with its readable times written in UTC (pypgstac picks partitions from the text)."""
    props = item.get("properties") or {}
    if all(_UTC_TEXT.match(v) for v in (props.get(n) for n in TIME_PROPERTIES) if isinstance(v, str)):
        return item  # already UTC with a Z, as skyvault writes items
    props = dict(props)
    for name in TIME_PROPERTIES:
        value = parse_time(props.get(name))
        if value is not None:
            props[name] = iso_time(value)
    return {**item, "properties": props}


def _json_text(value: Any) -> str:
    """``value`` as one JSON text parameter (ids and times of a whole batch)."""
    return json.dumps(value, separators=(",", ":"))


def _refused_item(error: BaseException) -> bool:
    """Whether ``error`` refuses the items being loaded (bad data), not the connection or the code."""
    if isinstance(error, psycopg.Error):
        return isinstance(error, ITEM_ERRORS)
    # pypgstac raises a bare Exception (or a KeyError, ValueError...) for an item it cannot read
    return not isinstance(error, (CatalogError, MemoryError, RecursionError))


def _as_read(content: dict[str, Any]) -> dict[str, Any]:
    """A stored item as STAC wants it: pgstac drops JSON nulls, but ``datetime`` must be there."""
    item = dict(content)
    props = item.get("properties")
    if isinstance(props, dict) and "datetime" not in props:
        item["properties"] = {"datetime": None, **props}
    return item


def _one_line(error: BaseException, limit: int = 500) -> str:
    """The error's message on one line, cut at ``limit`` characters (a CONTEXT may quote the data)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _same_major_minor(a: str, b: str) -> bool:
    ma, mb = re.match(r"^(\d+)\.(\d+)", a), re.match(r"^(\d+)\.(\d+)", b)
    return ma is not None and mb is not None and ma.groups() == mb.groups()


class _Session(PgstacDB):
    """pypgstac's database handle over one connection that stays ours (no pool, no commits)."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(dsn="", connection=conn, commit_on_exit=False)
        self._conn = conn

    def connect(self) -> Connection:
        return self._conn

    def disconnect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def query(  # type: ignore[override]
        self,
        query: str | sql.Composed,
        args: Sequence[Any] | None = None,
        row_factory: BaseRowFactory[Any] = tuple_row,
    ) -> Generator[Any, None, None]:
        with self._conn.cursor(row_factory=row_factory) as cur:
            cur.execute(query, args, prepare=False)
            if cur.description is None:
                yield None
                return
            yield from cur


#: Prefix of a GeoJSON geometry handed to PostGIS: names its CRS, so it is stored with SRID 4326.
_GEOJSON_4326 = b'{"crs":{"type":"name","properties":{"name":"EPSG:4326"}},'


def geojson_4326(geometry: dict[str, Any]) -> str:
    """A GeoJSON geometry as PostGIS text input that gives it SRID 4326 (as pypgstac's EWKB does)."""
    if "crs" in geometry:
        geometry = {k: v for k, v in geometry.items() if k != "crs"}
    text = orjson.dumps(geometry)
    return (_GEOJSON_4326 + text[1:] if text.startswith(b"{") and len(text) > 2 else text).decode()


class _Loader(Loader):
    """pypgstac's Loader, with each geometry passed to PostGIS as GeoJSON text.

    pypgstac encodes geometries as EWKB in Python (plpygis), about half of its client time per
    item; PostGIS parses the GeoJSON in C on the server into the same geometry (same coordinates,
    SRID 4326). A geometry PostGIS refuses fails the load like any refused item.
    """

    def format_item(self, _item: Any) -> dict[str, Any]:
        item: dict[str, Any] = _item
        geometry = item.get("geometry")
        if not isinstance(geometry, dict):
            return super().format_item(item)
        out = super().format_item({**item, "geometry": None})
        out["geometry"] = geojson_4326(geometry)
        return out


@dataclass(frozen=True)
class _Row:
    """Where and when an item is stored."""

    datetime: dt.datetime
    end_datetime: dt.datetime
    partition: str


@dataclass
class _Outcome:
    written: list[str]
    created: set[str]
    refused: dict[str, str]


class PgstacCatalog:
    """A STAC catalog in a pgstac database at ``catalog.dsn`` (see the module docstring)."""

    def __init__(self, catalog: CatalogSettings, store: StoreSettings) -> None:
        if not catalog.dsn:
            raise ConfigError("catalog.backend 'pgstac' needs catalog.dsn (SKYVAULT_CATALOG__DSN)")
        self.settings = catalog
        self.store_settings = store
        self.dsn: str = catalog.dsn
        self.public_dsn = public_dsn(catalog.dsn)
        self._password = catalog.password.get_secret_value() if catalog.password is not None else None
        self._conn: Connection | None = None
        self._pid = os.getpid()
        self._lock = threading.RLock()

    # connection

    def _connect(self) -> Connection:
        timeout = max(2, math.ceil(self.settings.timeout_seconds))
        kwargs: dict[str, Any] = {
            "connect_timeout": timeout,
            "keepalives": 1,
            "keepalives_idle": timeout,
            "keepalives_interval": max(1, timeout // 3),
            "keepalives_count": 3,
            "application_name": "skyvault",
        }
        if self._password is not None:
            kwargs["password"] = self._password
        conn = psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None, **kwargs)
        try:
            conn.execute("SELECT set_config('search_path', %s, false)", (SEARCH_PATH,))
            self._check_version(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_version(self, conn: Connection) -> None:
        version = _Session(conn).version
        if version is None:
            raise CatalogError(f"pgstac at {self.public_dsn}: the database has no pgstac installed")
        if version != "unreleased" and not _same_major_minor(version, PYPGSTAC_VERSION):
            raise CatalogError(
                f"pgstac at {self.public_dsn}: the database has pgstac {version} but pypgstac is "
                f"{PYPGSTAC_VERSION}; their major.minor versions must match (migrate the database "
                f"with `pypgstac migrate` or install a matching pypgstac)"
            )

    def _connection(self) -> Connection:
        if self._pid != os.getpid():  # inherited through fork: the parent's session, never used here
            self._conn, self._pid = None, os.getpid()
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._discard()
            self._conn = self._connect()
        return self._conn

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        with self._lock:
            if self._pid == os.getpid():
                self._discard()
            self._conn = None

    def __enter__(self) -> PgstacCatalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None and getattr(self, "_pid", None) == os.getpid():
            with contextlib.suppress(Exception):  # nothing more can be done during collection
                conn.close()

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def _call(self, what: str, action: Callable[[Connection], T]) -> T:
        """Run ``action`` on the connection; retry what may pass on retry; translate errors."""
        attempts = self.settings.max_attempts
        with self._lock:
            for attempt in range(1, attempts + 1):
                try:
                    return action(self._connection())
                except psycopg.OperationalError as e:
                    if self._conn is not None and (self._conn.closed or self._conn.broken):
                        self._discard()
                    if attempt >= attempts:
                        raise TransientCatalogError(
                            self._scrub(
                                f"pgstac at {self.public_dsn}: {what} failed after {attempts} "
                                f"attempt(s): {_one_line(e)}"
                            )
                        ) from e
                    delay = min(MAX_BACKOFF_SECONDS, self.settings.backoff_seconds * 2 ** (attempt - 1))
                    delay *= random.uniform(0.5, 1.0)  # two deadlocked writers do not retry in step
                    logger.warning(
                        "pgstac: %s failed (attempt %d of %d), retrying in %.2f s: %s",
                        what,
                        attempt,
                        attempts,
                        delay,
                        self._scrub(_one_line(e)),
                    )
                    time.sleep(delay)
                except psycopg.Error as e:
                    raise CatalogError(
                        self._scrub(f"pgstac at {self.public_dsn}: {what} failed: {_one_line(e)}")
                    ) from e
        raise AssertionError("unreachable")

    # shared steps

    @staticmethod
    def _lock_collection(conn: Connection, collection_id: str) -> None:
        """Take the collection's write lock until the end of the transaction."""
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('skyvault pgstac collection ' || %s, 0))",
            (collection_id,),
        )

    @staticmethod
    def _rows(conn: Connection, collection_id: str, item_ids: Iterable[str]) -> dict[str, list[_Row]]:
        """Where and when each of ``item_ids`` is stored (one row per copy)."""
        ids = list(item_ids)
        out: dict[str, list[_Row]] = {}
        if not ids:
            return out
        cur = conn.execute(
            "SELECT id, datetime, end_datetime, tableoid::regclass::text FROM items"
            " WHERE collection = %s AND id = ANY(ARRAY(SELECT jsonb_array_elements_text(%s::jsonb)))",
            (collection_id, _json_text(ids)),
        )
        for item_id, start, end, partition in cur.fetchall():
            out.setdefault(item_id, []).append(_Row(start, end, partition))
        return out

    @staticmethod
    def _misstored(
        conn: Connection,
        collection_id: str,
        item_ids: list[str],
        times: dict[str, tuple[dt.datetime, dt.datetime] | None],
    ) -> list[str]:
        """Which of ``item_ids`` are not stored exactly once with their time (compared in SQL)."""
        if not item_ids:
            return []
        expected = [
            [i, *((t[0].isoformat(), t[1].isoformat()) if (t := times[i]) else (None, None))]
            for i in item_ids
        ]
        # one JSON parameter: psycopg's text dump of large Python lists costs more than the query
        rows = conn.execute(
            "WITH b AS (SELECT e->>0 AS id, (e->>1)::timestamptz AS dt, (e->>2)::timestamptz AS edt"
            "  FROM jsonb_array_elements(%s::jsonb) AS e)"
            " SELECT b.id FROM b LEFT JOIN (SELECT id, count(*) AS n, min(datetime) AS dt,"
            "  max(end_datetime) AS edt FROM items"
            "  WHERE collection = %s AND id = ANY(ARRAY(SELECT id FROM b)) GROUP BY id) s USING (id)"
            " WHERE s.n IS DISTINCT FROM 1 OR s.dt IS DISTINCT FROM b.dt OR s.edt IS DISTINCT FROM b.edt",
            (_json_text(expected), collection_id),
        ).fetchall()
        return sorted(str(r[0]) for r in rows)

    @staticmethod
    def _collection_doc(collection: CollectionConfig) -> dict[str, Any]:
        import pystac  # only to create a collection: a bulk load's process need not import it

        unbounded: list[list[dt.datetime | None]] = [[None, None]]
        extent = pystac.Extent(pystac.SpatialExtent([list(WORLD_BBOX)]), pystac.TemporalExtent(unbounded))
        doc: dict[str, Any] = pystac.Collection(
            id=collection.id,
            description=collection.description or collection.title or collection.id,
            extent=extent,
            license=collection.license,
        ).to_dict(include_self_link=False, transform_hrefs=False)
        doc.update(PgstacCatalog._config_fields(collection))
        return {k: v for k, v in doc.items() if v is not None}

    @staticmethod
    def _config_fields(collection: CollectionConfig) -> dict[str, Any]:
        return {
            "title": collection.title or None,
            "description": collection.description or collection.title or collection.id,
            "license": collection.license,
            "keywords": list(collection.keywords) or None,
        }

    def _ensure(self, conn: Connection, collection: CollectionConfig) -> None:
        """Create the collection if missing; refresh its title, description, license and keywords.

        An existing collection keeps everything else (extent, links, item_assets, partitioning).
        """
        with conn.transaction():
            row = conn.execute("SELECT content FROM collections WHERE id = %s", (collection.id,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO collections (content, partition_trunc) VALUES (%s, %s)"
                    " ON CONFLICT DO NOTHING",
                    (Jsonb(self._collection_doc(collection)), PARTITION_TRUNC),
                )
                return
            content: dict[str, Any] = row[0]
            fields = self._config_fields(collection)
            updated = {k: v for k, v in content.items() if not (k in fields and fields[k] is None)}
            updated.update({k: v for k, v in fields.items() if v is not None})
            if updated != content:
                drop = [k for k, v in fields.items() if v is None]
                keep = {k: v for k, v in fields.items() if v is not None}
                conn.execute(
                    "UPDATE collections SET content = (content - %s::text[]) || %s WHERE id = %s",
                    (drop, Jsonb(keep), collection.id),
                )

    def _refresh_extent(self, conn: Connection, collection_id: str, partitions: Iterable[str]) -> None:
        """Refresh the statistics of ``partitions`` (and any lacking them); set the collection's extent.

        Runs last in a write transaction: it updates ``collections``, which partition creation locks.
        """
        stale = {
            p
            for (p,) in conn.execute(
                "SELECT partition FROM partition_stats"
                " WHERE collection = %s AND (spatial IS NULL OR dtrange IS NULL OR edtrange IS NULL)",
                (collection_id,),
            )
        }
        todo = sorted(set(partitions) | stale)
        for partition in todo:
            conn.execute("SELECT update_partition_stats(%s, true, true)", (partition,))
        # an emptied partition keeps its last footprint otherwise
        conn.execute(
            "UPDATE partition_stats SET spatial = NULL"
            " WHERE partition = ANY(%s) AND lower(dtrange) IS NULL AND spatial IS NOT NULL",
            (todo,),
        )
        row = conn.execute(
            "SELECT st_xmin(e), st_ymin(e), st_xmax(e), st_ymax(e), lo, hi FROM ("
            " SELECT st_extent(spatial) AS e, min(lower(dtrange)) AS lo, max(upper(edtrange)) AS hi"
            " FROM partition_stats WHERE collection = %s) s",
            (collection_id,),
        ).fetchone()
        bbox: list[float] = list(WORLD_BBOX)
        interval: list[str | None] = [None, None]
        if row is not None and None not in row:
            bbox = [float(v) for v in row[:4]]
            interval = [iso_time(row[4]), iso_time(row[5])]
        extent = Jsonb({"spatial": {"bbox": [bbox]}, "temporal": {"interval": [interval]}})
        conn.execute(
            "UPDATE collections SET content = jsonb_set(content, '{extent}', %s)"
            " WHERE id = %s AND content->'extent' IS DISTINCT FROM %s",
            (extent, collection_id, extent),
        )

    @staticmethod
    def _widen_extent(
        conn: Connection,
        collection_id: str,
        items: list[dict[str, Any]],
        times: list[tuple[dt.datetime, dt.datetime] | None],
    ) -> None:
        """Grow the collection's extent to cover ``items`` (no partition is read).

        Enough when no item left its partition in this batch: items were only added or updated in
        place, so the extent can only grow (an item updated to a smaller footprint leaves it
        wider, still covering every item). An empty collection's placeholder extent is replaced.
        """
        row = conn.execute(
            "SELECT content->'extent' FROM collections WHERE id = %s", (collection_id,)
        ).fetchone()
        current = row[0] if row and isinstance(row[0], dict) else {}
        try:
            (old_bbox,) = current["spatial"]["bbox"][:1]
            ((old_lo, old_hi),) = current["temporal"]["interval"][:1]
        except (KeyError, TypeError, ValueError):
            old_bbox, old_lo, old_hi = None, None, None
        empty = old_lo is None and old_hi is None
        bboxes = [i["bbox"] for i in items if i.get("bbox")] + ([] if empty or not old_bbox else [old_bbox])
        spans = [t for t in times if t is not None]
        if not empty:
            spans.append((parse_time(old_lo) or spans[0][0], parse_time(old_hi) or spans[0][1]))
        bbox = union_bbox(bboxes) or list(WORLD_BBOX)
        interval = [iso_time(min(t[0] for t in spans)), iso_time(max(t[1] for t in spans))]
        extent = Jsonb({"spatial": {"bbox": [bbox]}, "temporal": {"interval": [interval]}})
        conn.execute(
            "UPDATE collections SET content = jsonb_set(content, '{extent}', %s)"
            " WHERE id = %s AND content->'extent' IS DISTINCT FROM %s",
            (extent, collection_id, extent),
        )

    def _href(self, item: dict[str, Any]) -> str:
        for link in item.get("links") or []:
            if isinstance(link, dict) and link.get("rel") == "self" and isinstance(link.get("href"), str):
                return str(link["href"])
        return f"{self.public_dsn}#{item.get('collection')}/{item.get('id')}"

    # the backend

    def ensure_collection(self, collection: CollectionConfig) -> None:
        self._call(f"ensuring collection {collection.id!r}", lambda conn: self._ensure(conn, collection))

    def get_item(self, collection_id: str, item_id: str) -> dict[str, Any] | None:
        def read(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(
                "SELECT content_hydrate(i) FROM items i WHERE i.collection = %s AND i.id = %s LIMIT 1",
                (collection_id, item_id),
            ).fetchone()
            return None if row is None else _as_read(row[0])

        return self._call(f"reading item {item_id!r} of collection {collection_id!r}", read)

    def existing_ids(self, collection_id: str, item_ids: Iterable[str]) -> set[str]:
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return set()

        def read(conn: Connection) -> set[str]:
            cur = conn.execute(
                "SELECT DISTINCT id FROM items WHERE collection = %s AND id = ANY(%s)", (collection_id, ids)
            )
            return {str(item_id) for (item_id,) in cur}

        return self._call(f"looking up {len(ids)} id(s) in collection {collection_id!r}", read)

    def upsert_items(self, collection: CollectionConfig, items: list[dict[str, Any]]) -> list[ItemRef]:
        batch, refused = prepare_batch(collection.id, items)
        if refused and not batch:
            raise ItemsRejectedError(collection.id, refused, [])
        batch = {item_id: _normalised(item) for item_id, item in batch.items()}
        outcome = self._call(
            f"upsert of {len(batch)} item(s) into collection {collection.id!r}",
            lambda conn: self._upsert(conn, collection, batch),
        )
        refs = [
            item_ref(batch[item_id], self._href(batch[item_id]), created=item_id in outcome.created)
            for item_id in outcome.written
        ]
        refused.update(outcome.refused)
        if refused:
            raise ItemsRejectedError(collection.id, refused, refs)
        return refs

    def _upsert(
        self, conn: Connection, collection: CollectionConfig, batch: dict[str, dict[str, Any]]
    ) -> _Outcome:
        # committed apart: a write of collections before a partition is created could deadlock
        self._ensure(conn, collection)
        if not batch:
            return _Outcome([], set(), {})
        with conn.transaction():
            self._lock_collection(conn, collection.id)
            first = conn.execute(
                "SELECT to_regclass(format('_items_%%s', key)) IS NULL FROM collections WHERE id = %s",
                (collection.id,),
            ).fetchone()
            if first is None or first[0]:
                # the collection's first partition needs this lock: taken before any other on items
                conn.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
            before = self._rows(conn, collection.id, batch)
            loader = _Loader(_Session(conn))
            refused: dict[str, str] = {}
            times = {item_id: pgstac_times(item) for item_id, item in batch.items()}
            delsert = {
                item_id
                for item_id in batch
                if item_id in before
                and (
                    len(before[item_id]) > 1
                    or (before[item_id][0].datetime, before[item_id][0].end_datetime) != times[item_id]
                )
            }
            new = {item_id for item_id in batch if item_id not in before}
            try:
                try:
                    with conn.transaction():
                        self._load(loader, batch, new, delsert)
                except psycopg.errors.UniqueViolation:
                    # an id was stored meanwhile by a writer outside the collection lock
                    new = set()
                    with conn.transaction():
                        self._load(loader, batch, new, delsert)
                written = list(batch)
            except Exception as e:
                if not _refused_item(e):
                    raise
                logger.warning(
                    "pgstac: collection %r: a batch of %d item(s) was refused (%s); loading them one by one",
                    collection.id,
                    len(batch),
                    _one_line(e),
                )
                written = []
                for item_id, item in batch.items():
                    try:
                        with conn.transaction():
                            self._load(loader, {item_id: item}, set(), delsert)
                        written.append(item_id)
                    except Exception as item_error:
                        if not _refused_item(item_error):
                            raise
                        refused[item_id] = f"refused by pgstac: {_one_line(item_error)}"
            if written and (delsert & set(written)):
                # items left their partition: the extent may shrink, so it is computed again
                after = self._rows(conn, collection.id, written)
                partitions = {row.partition for rows in (*before.values(), *after.values()) for row in rows}
                self._refresh_extent(conn, collection.id, partitions)
            elif written:
                self._widen_extent(
                    conn, collection.id, [batch[i] for i in written], [times[i] for i in written]
                )
            wrong = self._misstored(conn, collection.id, written, times)
            if wrong:
                shown = ", ".join(repr(i) for i in wrong[:10]) + (
                    f" and {len(wrong) - 10} more" if len(wrong) > 10 else ""
                )
                raise CatalogError(
                    f"collection {collection.id!r}: after the load, {len(wrong)} item(s) are missing or not "
                    f"stored once with their datetime: {shown}"
                )
        return _Outcome(written, {i for i in written if i not in before}, refused)

    @staticmethod
    def _load(loader: Loader, items: dict[str, dict[str, Any]], new: set[str], delsert: set[str]) -> None:
        """Load ``items`` into their partitions.

        ``new`` ones (stored nowhere when read under the collection lock) are copied in, those in
        ``delsert`` are deleted by id first, the others are upserted in place.
        """
        groups: dict[Methods, list[dict[str, Any]]] = {}
        for item_id, item in items.items():
            mode = (
                Methods.delsert
                if item_id in delsert
                else Methods.insert
                if item_id in new
                else Methods.upsert
            )
            groups.setdefault(mode, []).append(item)
        for mode in (Methods.insert, Methods.upsert, Methods.delsert):
            if mode in groups:
                loader.load_items(iter(groups[mode]), insert_mode=mode)

    def delete_item(self, collection_id: str, item_id: str) -> bool:
        def delete(conn: Connection) -> bool:
            with conn.transaction():
                self._lock_collection(conn, collection_id)
                partitions = [
                    p
                    for (p,) in conn.execute(
                        "DELETE FROM items WHERE collection = %s AND id = %s"
                        " RETURNING tableoid::regclass::text",
                        (collection_id, item_id),
                    )
                ]
                if partitions:
                    self._refresh_extent(conn, collection_id, partitions)
            return bool(partitions)

        return self._call(f"deleting item {item_id!r} of collection {collection_id!r}", delete)

    def search(
        self,
        collection_id: str,
        *,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        bbox: Sequence[float] | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        if ids is not None and not ids:
            return []
        where: list[sql.Composable] = [sql.SQL("i.collection = %(collection)s")]
        params: dict[str, Any] = {"collection": collection_id}
        if ids is not None:
            where.append(sql.SQL("i.id = ANY(%(ids)s)"))
            params["ids"] = list(ids)
        if start is not None:
            where.append(sql.SQL("i.end_datetime >= %(start)s"))
            params["start"] = start if start.tzinfo else start.replace(tzinfo=dt.UTC)
        if end is not None:
            where.append(sql.SQL("i.datetime <= %(end)s"))
            params["end"] = end if end.tzinfo else end.replace(tzinfo=dt.UTC)
        if bbox is not None:
            boxes = []
            for n, (west, south, east, north) in enumerate(bbox_parts(bbox)):
                boxes.append(
                    sql.SQL("i.geometry && st_makeenvelope({}, {}, {}, {}, 4326)").format(
                        sql.Placeholder(f"w{n}"),
                        sql.Placeholder(f"s{n}"),
                        sql.Placeholder(f"e{n}"),
                        sql.Placeholder(f"n{n}"),
                    )
                )
                params.update({f"w{n}": west, f"s{n}": south, f"e{n}": east, f"n{n}": north})
            where.append(sql.SQL("({})").format(sql.SQL(" OR ").join(boxes)))
        query = sql.SQL("SELECT content_hydrate(i) FROM items i WHERE {} ORDER BY i.id").format(
            sql.SQL(" AND ").join(where)
        )

        def read(conn: Connection) -> list[dict[str, Any]]:
            return [_as_read(content) for (content,) in conn.execute(query, params)]

        found = self._call(f"searching collection {collection_id!r}", read)

        def matches(item: dict[str, Any]) -> bool:
            if bbox is not None and item.get("bbox") and not bboxes_intersect(item["bbox"], bbox):
                return False
            interval = readable_interval(item)
            return not ((start or end) and interval and not interval_overlaps(interval, start, end))

        return [item for item in found if matches(item)]

"""Discovery: find products under ``landing/<collection>/`` and read what their sidecars say.

Rasters are the objects of a collection folder matched by the collection's ``pattern`` (glob with
``fnmatch`` rules, where ``*`` also matches ``/``, or a regex that must match in full) against the
key relative to ``landing/<collection>/``; a ``pattern`` given to :func:`discover` replaces it and is
read with the collection's ``pattern_kind``. Browse reports (``*.xml``) and ``/newitem`` sidecars
(``*.json``) in the same folder describe rasters: a browse's ``fileName`` or a sidecar's
``filename`` is resolved in the describing file's folder; a sidecar without ``filename`` describes
the raster with the same stem next to it. Dot-files and GDAL ``*.aux.xml`` files are ignored.

A product id is the browse identifier, else the sidecar's ``name``, else the raster's file stem,
and must be a safe id. A browse's product carries the report's geo-reference and reference
system, by which preprocess places the image. Anything that cannot become a product is a
:class:`DiscoveryFailure` naming the key; one bad report never stops the others: whatever goes
wrong reading one report or sidecar (too large or too deep for ``limits``, malformed, unreadable, a
link out of the store) fails only the products it concerns. Results are sorted, so a re-run over the same
objects gives the same answer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fnmatch
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import LimitSettings, StoreSettings
from skyvault.discovery.reports import (
    BrowseReport,
    NewItem,
    check_size,
    parse_browse_report,
    parse_newitem,
)
from skyvault.errors import (
    ConfigError,
    InvalidIdentifierError,
    LinkOutsideStoreError,
    ObjectNotFoundError,
    ReportError,
    StorageError,
    TransientError,
    UnknownCollectionError,
)
from skyvault.ids import product_id_from_name
from skyvault.items import utc
from skyvault.models import Discovery, DiscoveryFailure, GeoReference, ObjectInfo, Product
from skyvault.storage.store import ObjectStore, check_key, open_store

LANDING = "landing/"

#: What counts as a raster in a folder that is not a configured collection (for its failures).
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt")

#: Reports and sidecars read at the same time (object store GETs are I/O bound).
READ_WORKERS = 8

ObjectKind = Literal["report", "sidecar", "ignored", "data"]


def object_kind(key: str) -> ObjectKind:
    """Classify a landing key: browse report, JSON sidecar, ignored (dot-file, ``.aux.xml``) or data."""
    name = key.rsplit("/", 1)[-1]
    lower = name.lower()
    if name.startswith(".") or lower.endswith(".aux.xml"):
        return "ignored"
    if lower.endswith(".xml"):
        return "report"
    if lower.endswith(".json"):
        return "sidecar"
    return "data"


def raster_matcher(pattern: str, kind: Literal["glob", "regex"]) -> Callable[[str], bool]:
    """A predicate on keys relative to ``landing/<collection>/``.

    Raises:
        ConfigError: ``pattern`` is not a valid regular expression.

    """
    if kind == "regex":
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"invalid regex pattern {pattern!r}: {e}") from e
        return lambda rel: rx.fullmatch(rel) is not None
    return lambda rel: fnmatch.fnmatchcase(rel, pattern)


def resolve_in_folder(describer_key: str, file_name: str) -> str:
    """The key of ``file_name`` resolved in the folder of ``describer_key``.

    Raises:
        ReportError: ``file_name`` is absolute, a URL, or has empty, ``.`` or ``..`` segments.

    """
    parts = file_name.split("/")
    if "://" in file_name or "\\" in file_name or any(p in ("", ".", "..") for p in parts):
        raise ReportError(
            f"{describer_key!r} names file {file_name!r}: it must be a path relative to the report's "
            "folder, without '..'"
        )
    key = describer_key.rsplit("/", 1)[0] + "/" + file_name
    try:
        return check_key(key)
    except StorageError as e:
        raise ReportError(
            f"{describer_key!r} names file {file_name!r}, which is not a safe object key"
        ) from e


def _is_raster_name(key: str) -> bool:
    return object_kind(key) == "data" and key.lower().endswith(RASTER_SUFFIXES)


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _basename(key: str) -> str:
    return key.rsplit("/", 1)[-1]


# --- views of the store --------------------------------------------------------------------------


class _View(Protocol):
    def get(self, key: str) -> ObjectInfo | None: ...
    def same_stem(self, describer_key: str) -> list[str]: ...


def _is_same_stem(describer_key: str, key: str) -> bool:
    stem = _stem(_basename(describer_key))
    name = _basename(key)
    return (
        key.rsplit("/", 1)[0] == describer_key.rsplit("/", 1)[0]
        and object_kind(key) == "data"
        and (name == stem or _stem(name) == stem)
    )


class _ListedView:
    """Objects of one listing, looked up by key; ``rasters`` (if given) limits same-stem matches."""

    def __init__(self, objects: Iterable[ObjectInfo], rasters: set[str] | None = None) -> None:
        self.objects = {o.key: o for o in objects}
        self._by_stem: dict[tuple[str, str], set[str]] = defaultdict(set)
        for key in self.objects if rasters is None else rasters:
            if object_kind(key) == "data":
                folder, _, name = key.rpartition("/")
                self._by_stem[(folder, name)].add(key)
                self._by_stem[(folder, _stem(name))].add(key)

    def get(self, key: str) -> ObjectInfo | None:
        return self.objects.get(key)

    def same_stem(self, describer_key: str) -> list[str]:
        folder, _, name = describer_key.rpartition("/")
        return sorted(self._by_stem.get((folder, _stem(name)), ()))


class _LiveView:
    """The store itself, asked key by key (for a single report)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def get(self, key: str) -> ObjectInfo | None:
        try:
            return self.store.head(key)
        except LinkOutsideStoreError:
            # Listed like a listing shows it; reading it fails that product, naming the key.
            return ObjectInfo(key=key, size=0, last_modified=dt.datetime.fromtimestamp(0, dt.UTC))

    def same_stem(self, describer_key: str) -> list[str]:
        prefix = describer_key.rsplit("/", 1)[0] + "/" + _stem(_basename(describer_key))
        return sorted(o.key for o in self.store.list(prefix) if _is_same_stem(describer_key, o.key))


# --- claims: what one browse or sidecar says about one raster ------------------------------------


@dataclass(frozen=True)
class _Claim:
    describer: str
    what: str
    file_name: str
    raster_key: str
    name: str | None
    datetime: dt.datetime | None = None
    start_datetime: dt.datetime | None = None
    end_datetime: dt.datetime | None = None
    crs_hint: str | None = None
    georeference: GeoReference | None = None
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Failure:
    failure: DiscoveryFailure
    keys: tuple[str, ...]


@dataclass
class _Described:
    claims: list[_Claim] = field(default_factory=list)
    failures: list[_Failure] = field(default_factory=list)
    held: set[str] = field(default_factory=set)


def _fail(collection: str, key: str, message: str, *related: str) -> _Failure:
    return _Failure(DiscoveryFailure(collection=collection, key=key, message=message), (key, *related))


def _browse_label(index: int, identifier: str | None) -> str:
    return f"browse {index}" + (f" ({identifier!r})" if identifier else "")


def _report_claims(collection: str, report: BrowseReport, out: _Described) -> None:
    key = report.source
    for rejected in report.rejected:
        related: tuple[str, ...] = ()
        if rejected.file_name:
            try:
                related = (resolve_in_folder(key, rejected.file_name),)
            except ReportError:
                related = ()
        out.held.update(related)
        label = _browse_label(rejected.index, rejected.identifier)
        out.failures.append(
            _fail(collection, key, f"{label} of report {key!r} rejected: {rejected.message}", *related)
        )
    header: dict[str, Any] = {
        "browse:type": report.browse_type,
        "browse:responsible_org_name": report.responsible_org_name,
        "browse:report_datetime": report.date_time.isoformat() if report.date_time else None,
    }
    for browse in report.browses:
        label = _browse_label(browse.index, browse.identifier)
        try:
            raster_key = resolve_in_folder(key, browse.file_name)
        except ReportError as e:
            out.failures.append(_fail(collection, key, f"{label} of report {key!r}: {e}"))
            continue
        properties = {
            **header,
            "browse:identifier": browse.identifier,
            "browse:image_type": browse.image_type,
            "browse:reference_system": browse.reference_system,
            "browse:georeference": browse.georeference.summary(),
        }
        out.claims.append(
            _Claim(
                describer=key,
                what=f"{label} of report {key!r}",
                file_name=browse.file_name,
                raster_key=raster_key,
                name=browse.identifier,
                datetime=browse.start,
                start_datetime=browse.start,
                end_datetime=browse.end,
                crs_hint=browse.reference_system,
                georeference=browse.georeference,
                properties={k: v for k, v in properties.items() if v is not None},
            )
        )


def _sidecar_claim(collection: str, item: NewItem, view: _View) -> _Claim:
    key = item.source
    if item.collection_id is not None and item.collection_id != collection:
        raise ReportError(
            f"sidecar {key!r} names collection {item.collection_id!r} but lies in {LANDING}{collection}/"
        )
    if item.filename:
        file_name = item.filename
        raster_key = resolve_in_folder(key, file_name)
    else:
        candidates = view.same_stem(key)
        if len(candidates) > 1:
            candidates = [k for k in candidates if _is_raster_name(k)] or candidates
        if not candidates:
            raise ReportError(f"sidecar {key!r} has no filename and no raster with its stem lies next to it")
        if len(candidates) > 1:
            raise ReportError(
                f"sidecar {key!r} has no filename and several rasters share its stem: {', '.join(candidates)}"
            )
        raster_key = candidates[0]
        file_name = _basename(raster_key)
    return _Claim(
        describer=key,
        what=f"sidecar {key!r}",
        file_name=file_name,
        raster_key=raster_key,
        name=item.name,
        datetime=item.date,
        properties=dict(item.properties),
    )


def _read_describer(
    store: ObjectStore, collection: str, info: ObjectInfo, view: _View, limits: LimitSettings
) -> _Described:
    """Read one report or sidecar into claims; its own problems become failures, never exceptions.

    Transient storage errors propagate so the calling task is retried. Any other error while
    reading or parsing one file (even an unexpected one) fails that file's products only.
    """
    out = _Described()
    key = info.key
    kind = object_kind(key)
    what = f"browse report {key!r}" if kind == "report" else f"sidecar {key!r}"
    try:
        check_size(info.size, what, limits)
        data = store.get_bytes(key)
        if kind == "report":
            _report_claims(collection, parse_browse_report(data, key, limits=limits), out)
        else:
            item = parse_newitem(data, key, limits=limits)
            if item.filename:
                with contextlib.suppress(ReportError):
                    out.held.add(resolve_in_folder(key, item.filename))
            out.claims.append(_sidecar_claim(collection, item, view))
    except TransientError:
        raise
    except (ReportError, StorageError) as e:
        _describer_failed(collection, key, str(e), view, out)
    except Exception as e:  # noqa: BLE001 - one file's bad content must never fail the whole discovery
        _describer_failed(collection, key, f"{what} cannot be read: {type(e).__name__}: {e}", view, out)
    return out


def _describer_failed(collection: str, key: str, message: str, view: _View, out: _Described) -> None:
    out.claims.clear()
    out.held.update(view.same_stem(key))
    out.failures.append(_fail(collection, key, message, *sorted(out.held)))


# --- from claims and rasters to products ---------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    product: Product
    keys: tuple[str, ...]


def _product(collection: str, raster_key: str, claim: _Claim | None) -> Product:
    name = claim.name if claim is not None and claim.name else _basename(raster_key)
    product_id = product_id_from_name(name)
    if claim is None:
        return Product(collection=collection, id=product_id, source_key=raster_key)
    return Product(
        collection=collection,
        id=product_id,
        source_key=raster_key,
        sidecar_key=claim.describer,
        datetime=claim.datetime,
        start_datetime=claim.start_datetime,
        end_datetime=claim.end_datetime,
        crs_hint=claim.crs_hint,
        georeference=claim.georeference,
        properties=claim.properties,
    )


def _candidates(
    collection: str,
    rasters: Iterable[str],
    claims: dict[str, list[_Claim]],
    held: set[str],
    failures: list[_Failure],
) -> list[_Candidate]:
    out: list[_Candidate] = []
    for raster_key in sorted(rasters):
        described = claims.get(raster_key, [])
        if not described and raster_key in held:
            continue
        describers = tuple(sorted({c.describer for c in described}))
        if len(described) > 1:
            what = "; ".join(c.what for c in described)
            failures.append(
                _fail(
                    collection,
                    raster_key,
                    f"raster {raster_key!r} is described more than once: {what}",
                    *describers,
                )
            )
            continue
        claim = described[0] if described else None
        try:
            product = _product(collection, raster_key, claim)
        except InvalidIdentifierError as e:
            key = claim.describer if claim is not None and claim.name else raster_key
            failures.append(_fail(collection, key, f"{e} (raster {raster_key!r})", raster_key, *describers))
            continue
        out.append(_Candidate(product, (raster_key, *describers)))
    return out


def _dedupe(candidates: list[_Candidate], failures: list[_Failure]) -> list[_Candidate]:
    """Keep ids that occur once; every id claimed by several rasters becomes one failure."""
    groups: dict[tuple[str, str], list[_Candidate]] = defaultdict(list)
    for c in candidates:
        groups[(c.product.collection, c.product.id)].append(c)
    kept: list[_Candidate] = []
    for (collection, product_id), group in sorted(groups.items()):
        if len(group) == 1:
            kept.extend(group)
            continue
        sources = sorted(c.product.source_key for c in group)
        failures.append(
            _fail(
                collection,
                sources[0],
                f"duplicate product id {product_id!r} in collection {collection!r}, claimed by "
                f"{', '.join(sources)}; none of them is ingested until their ids differ",
                *sorted({k for c in group for k in c.keys}),
            )
        )
    return kept


def _sized(product: Product, view: _View) -> Product:
    """The product with the size of its source as listed."""
    info = view.get(product.source_key)
    return product if info is None else product.model_copy(update={"source_size": info.size})


def _changed(keys: Iterable[str], view: _View, since: dt.datetime | None) -> bool:
    if since is None:
        return True
    for key in keys:
        info = view.get(key)
        if info is not None and info.last_modified > since:
            return True
    return False


def _finish(
    candidates: list[_Candidate], failures: list[_Failure], view: _View, since: dt.datetime | None
) -> Discovery:
    kept = _dedupe(candidates, failures)
    products = sorted(
        (_sized(c.product, view) for c in kept if _changed(c.keys, view, since)),
        key=lambda p: (p.collection, p.id),
    )
    reported = {f.failure for f in failures if _changed(f.keys, view, since)}
    return Discovery(
        products=products, failures=sorted(reported, key=lambda f: (f.collection, f.key, f.message))
    )


def _link(
    collection: str,
    described: _Described,
    view: _View,
    accept: Callable[[str], str | None],
) -> dict[str, list[_Claim]]:
    """Group claims by raster; a claim on a missing or refused file becomes a failure."""
    by_raster: dict[str, list[_Claim]] = defaultdict(list)
    for claim in described.claims:
        if object_kind(claim.raster_key) != "data" or view.get(claim.raster_key) is None:
            described.failures.append(
                _fail(
                    collection,
                    claim.describer,
                    f"{claim.what} names file {claim.file_name!r}, "
                    f"but raster {claim.raster_key!r} is not there",
                )
            )
            continue
        refusal = accept(claim.raster_key)
        if refusal is None:
            by_raster[claim.raster_key].append(claim)
        elif refusal:
            described.failures.append(
                _fail(collection, claim.describer, f"{claim.what}: {refusal}", claim.raster_key)
            )
    return by_raster


# --- public functions ----------------------------------------------------------------------------


def _collection_folder(
    store: ObjectStore,
    config: CollectionConfig,
    objects: list[ObjectInfo],
    matches: Callable[[str], bool],
    pattern_overridden: bool,
    limits: LimitSettings,
) -> tuple[list[_Candidate], list[_Failure]]:
    """Candidates and failures of one collection folder, before ``since`` and duplicate checks.

    Every report and sidecar is read, even unchanged ones, so ids (and their duplicates) are the
    same whatever ``since`` is; reads run concurrently.
    """
    prefix = f"{LANDING}{config.id}/"
    rasters = {o.key for o in objects if object_kind(o.key) == "data" and matches(o.key[len(prefix) :])}
    view = _ListedView(objects, rasters)
    describers = [o for o in objects if object_kind(o.key) in ("report", "sidecar")]
    described = _Described()
    with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
        for one in pool.map(lambda info: _read_describer(store, config.id, info, view, limits), describers):
            described.claims.extend(one.claims)
            described.failures.extend(one.failures)
            described.held.update(one.held)

    def accept(raster_key: str) -> str | None:
        if raster_key in rasters:
            return None
        if pattern_overridden:
            return ""
        return (
            f"{raster_key!r} does not match the collection pattern {config.pattern!r} ({config.pattern_kind})"
        )

    claims = _link(config.id, described, view, accept)
    candidates = _candidates(config.id, rasters, claims, described.held, described.failures)
    return candidates, described.failures


def discover(
    store: StoreSettings,
    collections: dict[str, CollectionConfig],
    *,
    collection: str | None = None,
    since: dt.datetime | None = None,
    pattern: str | None = None,
    limits: LimitSettings | None = None,
) -> Discovery:
    """Find the products under ``landing/`` (or ``landing/<collection>/``).

    Args:
        store: the object store holding ``landing/``.
        collections: the configured collections, by id.
        collection: only this collection; else every folder under ``landing/``, where a folder that
            is not a configured collection gives one failure per raster in it.
        since: only products whose raster or sidecar changed after this time (naive means UTC);
            failures likewise only when something they concern changed.
        pattern: replaces every collection's ``pattern`` (read with its ``pattern_kind``); browses
            naming rasters it does not match are left out silently.
        limits: size and nesting depth allowed for reports and sidecars (defaults:
            :class:`LimitSettings`).

    Raises:
        UnknownCollectionError: ``collection`` is not configured.
        ConfigError: a regex pattern does not compile.
        StorageError: the landing prefix cannot be listed (transient errors are retried by the task).

    """
    if collection is not None and collection not in collections:
        known = ", ".join(sorted(collections)) or "none"
        raise UnknownCollectionError(f"unknown collection {collection!r} (configured: {known})")
    targets = {collection: collections[collection]} if collection is not None else collections
    matchers = {cid: raster_matcher(pattern or c.pattern, c.pattern_kind) for cid, c in targets.items()}
    since = utc(since) if since is not None else None
    obj_store = open_store(store)
    groups: dict[str, list[ObjectInfo]] = defaultdict(list)
    loose: list[ObjectInfo] = []
    for info in obj_store.list(f"{LANDING}{collection}/" if collection is not None else LANDING):
        folder, sep, _ = info.key[len(LANDING) :].partition("/")
        (groups[folder] if sep else loose).append(info)

    candidates: list[_Candidate] = []
    failures: list[_Failure] = []
    known = ", ".join(sorted(collections)) or "none"
    for folder in sorted(groups):
        if folder in targets:
            found, failed = _collection_folder(
                obj_store,
                targets[folder],
                groups[folder],
                matchers[folder],
                pattern is not None,
                limits or LimitSettings(),
            )
            candidates.extend(found)
            failures.extend(failed)
            continue
        failures.extend(
            _fail(
                folder,
                info.key,
                f"unknown collection {folder!r}: {info.key!r} lies in {LANDING}{folder}/, "
                f"which is not a configured collection (configured: {known})",
            )
            for info in groups[folder]
            if _is_raster_name(info.key)
        )
    failures.extend(
        _fail("", info.key, f"{info.key!r} lies directly in {LANDING}, outside any collection folder")
        for info in loose
        if _is_raster_name(info.key)
    )
    everything = _ListedView([o for objects in groups.values() for o in objects] + loose)
    return _finish(candidates, failures, everything, since)


def products_from_report(
    store: StoreSettings,
    collections: dict[str, CollectionConfig],
    report_key: str,
    *,
    limits: LimitSettings | None = None,
) -> Discovery:
    """The products one browse report (``.xml``) or ``/newitem`` sidecar (``.json``) describes.

    The collection is the report's folder under ``landing/``. Problems inside the report (unsafe
    or malformed content, a rejected browse, a missing raster, a bad id) are failures in the
    returned :class:`Discovery`; no collection pattern applies.

    Raises:
        ReportError: the key is unsafe, not under ``landing/<collection>/``, or neither .xml nor .json.
        UnknownCollectionError: the report's folder is not a configured collection.
        ObjectNotFoundError: there is no such report.

    """
    try:
        check_key(report_key)
    except StorageError as e:
        raise ReportError(f"report key {report_key!r} is not a safe object key") from e
    parts = report_key.split("/")
    if len(parts) < 3 or parts[0] != LANDING.rstrip("/"):
        raise ReportError(f"report {report_key!r} is not under {LANDING}<collection>/")
    if object_kind(report_key) not in ("report", "sidecar"):
        raise ReportError(
            f"report {report_key!r} is neither a browse report (.xml) nor a JSON sidecar (.json)"
        )
    collection = parts[1]
    if collection not in collections:
        known = ", ".join(sorted(collections)) or "none"
        raise UnknownCollectionError(
            f"report {report_key!r} lies in {LANDING}{collection}/, which is not a configured collection "
            f"(configured: {known})"
        )
    obj_store = open_store(store)
    try:
        info = obj_store.head(report_key)
    except LinkOutsideStoreError as e:
        failure = DiscoveryFailure(collection=collection, key=report_key, message=str(e))
        return Discovery(products=[], failures=[failure])
    if info is None:
        raise ObjectNotFoundError(f"report {report_key!r} not found")
    view = _LiveView(obj_store)
    described = _read_describer(obj_store, collection, info, view, limits or LimitSettings())
    claims = _link(collection, described, view, lambda _key: None)
    candidates = _candidates(collection, claims, claims, described.held, described.failures)
    return _finish(candidates, described.failures, view, None)

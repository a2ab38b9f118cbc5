"""Sidecar reports that describe products: ngEO browse reports (XML) and ``/newitem`` JSON sidecars.

Browse reports are read bare (``rep:browseReport``) or wrapped in the browse server's ingestion
request (``bsi:ingestBrowse``). They are parsed with defusedxml with DTDs forbidden, so entity
expansion, external entities and document type declarations are refused before anything is
expanded or fetched.
Reports and sidecars larger or nested deeper than the configured limits (``limits.*``) are refused
before they are parsed (JSON) or as soon as the parser reaches the limit (XML).
A report-level problem (unsafe or malformed XML, wrong root, no browse) is a :class:`ReportError`
naming the report; a problem with one browse rejects that browse only, so a report with some good
browses is ``partial`` rather than lost.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import re
from typing import Any, Literal
from xml.etree.ElementTree import Element, ParseError

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import iterparse
from pydantic import BaseModel, ConfigDict, Field

from skyvault.config.settings import LimitSettings
from skyvault.errors import ReportError, ReportLimitError
from skyvault.items import utc
from skyvault.models import GeoReference, GeoReferenceKind

NS_BROWSE_REPORT = "http://ngeo.eo.esa.int/ngEO/browseReport/1.0"
NS_BROWSE_REPORT_OLD = "http://ngeo.eo.esa.int/schema/browseReport"
NAMESPACES = (NS_BROWSE_REPORT, NS_BROWSE_REPORT_OLD)
#: Namespace of the browse server's ingestion request, ``bsi:ingestBrowse``, which wraps a report.
NS_BROWSE_INGESTION = "http://ngeo.eo.esa.int/schema/browse/ingestion"

GEOREFERENCE_KINDS: tuple[GeoReferenceKind, ...] = (
    "rectifiedBrowse",
    "footprint",
    "regularGrid",
    "modelInGeotiff",
)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Browse(_Model):
    """One valid ``rep:browse`` of a browse report."""

    index: int
    identifier: str | None = None
    file_name: str
    image_type: str | None = None
    reference_system: str | None = None
    georeference: GeoReference
    start: dt.datetime
    end: dt.datetime


class RejectedBrowse(_Model):
    """A ``rep:browse`` that could not be read, with the reason."""

    index: int
    identifier: str | None = None
    file_name: str | None = None
    message: str


class BrowseReport(_Model):
    """A parsed browse report: its header, its valid browses and the browses it rejected."""

    source: str
    namespace: str
    responsible_org_name: str | None = None
    date_time: dt.datetime | None = None
    browse_type: str | None = None
    browses: tuple[Browse, ...] = ()
    rejected: tuple[RejectedBrowse, ...] = ()

    @property
    def status(self) -> Literal["success", "partial", "failure"]:
        """``success`` when every browse is valid, ``partial`` when some are, else ``failure``."""
        if not self.rejected:
            return "success"
        return "partial" if self.browses else "failure"


class NewItem(_Model):
    """A ``/newitem`` JSON sidecar: ``{collection_id, date, name, filename, ..., properties}``."""

    source: str
    collection_id: str | None = None
    date: dt.datetime | None = None
    name: str | None = None
    filename: str | None = None
    stac_api_server: str | None = None
    file_source_host: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


# --- shared helpers ------------------------------------------------------------------------------


def parse_time(value: str) -> dt.datetime:
    """Parse an ISO 8601 date or date-time as a timezone-aware UTC datetime.

    A value without an offset is taken as UTC; a date alone is midnight UTC.

    Raises:
        ValueError: ``value`` is not an ISO 8601 date or date-time.

    """
    text = value.strip()
    if not text:
        raise ValueError("empty date")
    if text[-1] in "zZ":
        text = text[:-1] + "+00:00"
    return utc(dt.datetime.fromisoformat(text))


_EPSG = re.compile(r"^epsg:+(\d+)$", re.IGNORECASE)


def normalize_reference_system(value: str) -> str:
    """Drop stray whitespace from a reference system identifier: ``EPSG: 4326`` -> ``EPSG:4326``."""
    compact = re.sub(r"\s+", "", value)
    m = _EPSG.match(compact)
    return f"EPSG:{m.group(1)}" if m else compact


# --- browse reports ------------------------------------------------------------------------------


class _BrowseError(Exception):
    """One browse cannot be used; becomes a :class:`RejectedBrowse`."""


def _text(parent: Element, ns: str, name: str) -> str | None:
    child = parent.find(f"{{{ns}}}{name}")
    if child is None or child.text is None:
        return None
    text = child.text.strip()
    return text or None


def _numbers(text: str | None, what: str) -> tuple[float, ...]:
    if text is None:
        raise _BrowseError(f"{what} is missing or empty")
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise _BrowseError(f"{what} holds something that is not a number: {text[:80]!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise _BrowseError(f"{what} holds a non-finite number: {text[:80]!r}")
    return values


def _integer(text: str | None, what: str) -> int:
    if text is None:
        raise _BrowseError(f"{what} is missing")
    try:
        value = int(text)
    except ValueError:
        raise _BrowseError(f"{what} is not an integer: {text[:40]!r}") from None
    if value < 2:
        raise _BrowseError(f"{what} must be at least 2, got {value}")
    return value


def _step(text: str | None, what: str) -> float:
    values = _numbers(text, what)
    if len(values) != 1 or not values[0] > 0:
        raise _BrowseError(f"{what} must be one positive number, got {text!r}")
    return values[0]


def _georeference(browse: Element, ns: str) -> GeoReference:
    present = [k for k in GEOREFERENCE_KINDS if browse.find(f"{{{ns}}}{k}") is not None]
    if not present:
        raise _BrowseError(f"no geo-reference (expected one of {', '.join(GEOREFERENCE_KINDS)})")
    if len(present) > 1:
        raise _BrowseError(f"more than one geo-reference: {', '.join(present)}")
    kind = present[0]
    elem = browse.find(f"{{{ns}}}{kind}")
    assert elem is not None
    if kind == "rectifiedBrowse":
        coords = _numbers(_text(elem, ns, "coordList"), "rectifiedBrowse/coordList")
        if len(coords) != 4:
            raise _BrowseError(f"rectifiedBrowse/coordList needs 4 numbers, got {len(coords)}")
        return GeoReference(kind=kind, coords=coords)
    if kind == "footprint":
        col_rows = _numbers(_text(elem, ns, "colRowList"), "footprint/colRowList")
        coords = _numbers(_text(elem, ns, "coordList"), "footprint/coordList")
        if len(coords) % 2 or len(col_rows) % 2 or len(coords) != len(col_rows) or len(coords) < 6:
            raise _BrowseError(
                "footprint needs colRowList and coordList with the same number (at least 3) of pairs, "
                f"got {len(col_rows)} and {len(coords)} numbers"
            )
        declared = elem.get("nodeNumber")
        if declared is not None and declared.strip() != str(len(coords) // 2):
            raise _BrowseError(
                f"footprint nodeNumber {declared!r} differs from the {len(coords) // 2} pairs given"
            )
        return GeoReference(kind=kind, coords=coords, col_rows=col_rows, node_number=len(coords) // 2)
    if kind == "regularGrid":
        cols = _integer(_text(elem, ns, "colNodeNumber"), "regularGrid/colNodeNumber")
        rows = _integer(_text(elem, ns, "rowNodeNumber"), "regularGrid/rowNodeNumber")
        col_step = _step(_text(elem, ns, "colStep"), "regularGrid/colStep")
        row_step = _step(_text(elem, ns, "rowStep"), "regularGrid/rowStep")
        lists = elem.findall(f"{{{ns}}}coordList")
        if len(lists) != rows:
            raise _BrowseError(f"regularGrid has {len(lists)} coordList rows, rowNodeNumber says {rows}")
        coords_all: list[float] = []
        for i, row in enumerate(lists, 1):
            numbers = _numbers((row.text or "").strip() or None, f"regularGrid/coordList row {i}")
            if len(numbers) != 2 * cols:
                raise _BrowseError(
                    f"regularGrid/coordList row {i} needs {2 * cols} numbers (colNodeNumber {cols}), "
                    f"got {len(numbers)}"
                )
            coords_all.extend(numbers)
        return GeoReference(
            kind=kind,
            coords=tuple(coords_all),
            col_node_number=cols,
            row_node_number=rows,
            col_step=col_step,
            row_step=row_step,
        )
    return GeoReference(kind="modelInGeotiff")


def _browse_time(elem: Element, ns: str, name: str) -> dt.datetime:
    value = _text(elem, ns, name)
    if value is None:
        raise _BrowseError(f"{name} is missing")
    try:
        return parse_time(value)
    except ValueError:
        raise _BrowseError(f"{name} {value[:60]!r} is not an ISO 8601 date-time") from None


def _browse(elem: Element, ns: str, index: int) -> Browse:
    file_name = _text(elem, ns, "fileName")
    if file_name is None:
        raise _BrowseError("fileName is missing")
    start = _browse_time(elem, ns, "startTime")
    end = _browse_time(elem, ns, "endTime")
    if end < start:
        raise _BrowseError(f"endTime {end.isoformat()} is before startTime {start.isoformat()}")
    rsi = _text(elem, ns, "referenceSystemIdentifier")
    return Browse(
        index=index,
        identifier=_text(elem, ns, "browseIdentifier"),
        file_name=file_name,
        image_type=_text(elem, ns, "imageType"),
        reference_system=normalize_reference_system(rsi) if rsi else None,
        georeference=_georeference(elem, ns),
        start=start,
        end=end,
    )


def check_size(size: int, what: str, limits: LimitSettings) -> None:
    """Refuse a report or sidecar (``what`` names it) larger than ``limits.max_sidecar_bytes``.

    Raises:
        ReportLimitError: ``size`` is over the limit; names the file, the limit and its setting.

    """
    if size > limits.max_sidecar_bytes:
        raise ReportLimitError(
            f"{what} is {size} bytes, more than the limit limits.max_sidecar_bytes = "
            f"{limits.max_sidecar_bytes}; raise it (SKYVAULT_LIMITS__MAX_SIDECAR_BYTES) if such files "
            "are expected"
        )


def _too_deep(what: str, limits: LimitSettings) -> ReportLimitError:
    return ReportLimitError(
        f"{what} is nested deeper than the limit limits.max_nesting_depth = {limits.max_nesting_depth}; "
        "raise it (SKYVAULT_LIMITS__MAX_NESTING_DEPTH) if such files are expected"
    )


def _parse_xml(data: bytes, source: str, limits: LimitSettings) -> Element:
    what = f"browse report {source!r}"
    check_size(len(data), what, limits)
    try:
        events = iterparse(
            io.BytesIO(data),
            events=("start", "end"),
            forbid_dtd=True,
            forbid_entities=True,
            forbid_external=True,
        )
        depth = 0
        for event, _ in events:
            depth += 1 if event == "start" else -1
            if depth > limits.max_nesting_depth:
                raise _too_deep(what, limits)
        root: Element = events.root  # type: ignore[attr-defined]
        return root
    except DefusedXmlException as e:
        raise ReportError(
            f"browse report {source!r} refused: it declares a DTD, entities or external references "
            f"({type(e).__name__}); reports must be plain XML"
        ) from e
    except ParseError as e:
        raise ReportError(f"browse report {source!r} is not well-formed XML: {e}") from e


def _split_tag(tag: str) -> tuple[str, str]:
    ns, _, local = tag[1:].partition("}") if tag.startswith("{") else ("", "", tag)
    return ns, local


def _report_root(root: Element, source: str) -> tuple[Element, str]:
    """The element holding the report's header and browses, and the report namespace it uses.

    A ``bsi:ingestBrowse`` request either wraps a ``browseReport`` element or, as the browse
    server's requests do, holds the report's elements (``dateTime``, ``browse``, ...) directly.
    """
    ns, local = _split_tag(root.tag)
    if local == "browseReport" and ns in NAMESPACES:
        return root, ns
    if local == "ingestBrowse" and ns == NS_BROWSE_INGESTION:
        children = [(child, *_split_tag(child.tag)) for child in root if isinstance(child.tag, str)]
        wrapped = [(c, n) for c, n, name in children if name == "browseReport" and n in NAMESPACES]
        if len(wrapped) == 1:
            return wrapped[0]
        inner = sorted({n for _, n, _ in children if n in NAMESPACES})
        if not wrapped and len(inner) == 1:
            return root, inner[0]
        raise ReportError(
            f"browse report {source!r}: ingestBrowse must hold one browse report (a browseReport "
            f"element or its elements in namespace {NS_BROWSE_REPORT} or {NS_BROWSE_REPORT_OLD})"
        )
    raise ReportError(
        f"browse report {source!r}: root element is {root.tag!r}, expected browseReport in "
        f"namespace {NS_BROWSE_REPORT} or {NS_BROWSE_REPORT_OLD}, or ingestBrowse in namespace "
        f"{NS_BROWSE_INGESTION}"
    )


def parse_browse_report(data: bytes, source: str, *, limits: LimitSettings | None = None) -> BrowseReport:
    """Parse an ngEO browse report safely (also when wrapped in a ``bsi:ingestBrowse`` request).

    Args:
        data: the report's bytes.
        source: the report's key or file name, used in every message.
        limits: size and nesting depth allowed (defaults: :class:`LimitSettings`).

    Raises:
        ReportError: the XML is unsafe (DTD, entities, external references), malformed, not a
            ``rep:browseReport`` in a known namespace (bare or in a ``bsi:ingestBrowse``), has a
            bad ``dateTime`` or no browse.
        ReportLimitError: the report is larger or nested deeper than ``limits`` allow.

    """
    root, ns = _report_root(_parse_xml(data, source, limits or LimitSettings()), source)
    date_text = _text(root, ns, "dateTime")
    try:
        date_time = parse_time(date_text) if date_text else None
    except ValueError:
        raise ReportError(
            f"browse report {source!r}: dateTime {date_text!r} is not an ISO 8601 date-time"
        ) from None
    elems = root.findall(f"{{{ns}}}browse")
    if not elems:
        raise ReportError(f"browse report {source!r} holds no browse")
    browses: list[Browse] = []
    rejected: list[RejectedBrowse] = []
    for index, elem in enumerate(elems, 1):
        try:
            browses.append(_browse(elem, ns, index))
        except _BrowseError as e:
            rejected.append(
                RejectedBrowse(
                    index=index,
                    identifier=_text(elem, ns, "browseIdentifier"),
                    file_name=_text(elem, ns, "fileName"),
                    message=str(e),
                )
            )
    return BrowseReport(
        source=source,
        namespace=ns,
        responsible_org_name=_text(root, ns, "responsibleOrgName"),
        date_time=date_time,
        browse_type=_text(root, ns, "browseType"),
        browses=tuple(browses),
        rejected=tuple(rejected),
    )


# --- /newitem JSON sidecars ----------------------------------------------------------------------

_NEWITEM_STRINGS = ("collection_id", "name", "filename", "stac_api_server", "file_source_host")


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def json_depth(data: bytes) -> int:
    """How deeply arrays and objects nest in the JSON text ``data``, without parsing it."""
    steps = _STEP[np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)]
    steps = steps[steps != 0]
    return int(np.cumsum(steps, dtype=np.int32).max()) if steps.size else 0


def parse_newitem(data: bytes, source: str, *, limits: LimitSettings | None = None) -> NewItem:
    """Parse a ``/newitem`` JSON sidecar.

    Every field is optional; ``date`` is the item's datetime (ISO 8601, UTC when no offset is given).
    Top-level keys outside the ``/newitem`` shape are ignored.

    Raises:
        ReportError: not UTF-8 JSON, not an object, a field of the wrong type, or a ``date`` that
            does not parse (the message names the product).
        ReportLimitError: the sidecar is larger or nested deeper than ``limits`` allow (checked
            before parsing).

    """
    limits = limits or LimitSettings()
    what = f"sidecar {source!r}"
    check_size(len(data), what, limits)
    if json_depth(data) > limits.max_nesting_depth:
        raise _too_deep(what, limits)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ReportError(f"sidecar {source!r} is not valid UTF-8 JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ReportError(f"sidecar {source!r} must hold a JSON object, got {type(doc).__name__}")
    fields: dict[str, Any] = {}
    for name in _NEWITEM_STRINGS:
        value = doc.get(name)
        if value is not None and not isinstance(value, str):
            raise ReportError(f"sidecar {source!r}: {name} must be a string, got {type(value).__name__}")
        fields[name] = (value.strip() or None) if isinstance(value, str) else None
    properties = doc.get("properties")
    if properties is None:
        properties = {}
    if not isinstance(properties, dict):
        raise ReportError(
            f"sidecar {source!r}: properties must be an object, got {type(properties).__name__}"
        )
    raw_date = doc.get("date")
    date: dt.datetime | None = None
    if raw_date is not None:
        product = fields["name"] or fields["filename"] or source
        if not isinstance(raw_date, str):
            raise ReportError(
                f"product {product!r} (sidecar {source!r}): date must be an ISO 8601 string, got {raw_date!r}"
            )
        try:
            date = parse_time(raw_date)
        except ValueError:
            raise ReportError(
                f"product {product!r} (sidecar {source!r}): date {raw_date[:60]!r} is not an ISO 8601 "
                "date or date-time"
            ) from None
    return NewItem(source=source, date=date, properties=properties, **fields)

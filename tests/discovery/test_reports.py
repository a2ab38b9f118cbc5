from __future__ import annotations

import datetime as dt
import json

import pytest

from skyvault.config.settings import LimitSettings
from skyvault.discovery.reports import (
    NS_BROWSE_REPORT,
    NS_BROWSE_REPORT_OLD,
    normalize_reference_system,
    parse_browse_report,
    parse_newitem,
    parse_time,
)
from skyvault.errors import ReportError, ReportLimitError

UTC = dt.UTC

RECTIFIED = "<rep:rectifiedBrowse><rep:coordList>45.0 10.0 46.0 11.0</rep:coordList></rep:rectifiedBrowse>"
FOOTPRINT = (
    '<rep:footprint nodeNumber="5">'
    "<rep:colRowList>0 0 255 0 255 255 0 255 0 0</rep:colRowList>"
    "<rep:coordList>46 10 46 11 45 11 45 10 46 10</rep:coordList>"
    "</rep:footprint>"
)
REGULAR_GRID = (
    "<rep:regularGrid><rep:colNodeNumber>2</rep:colNodeNumber><rep:rowNodeNumber>2</rep:rowNodeNumber>"
    "<rep:colStep>255</rep:colStep><rep:rowStep>255.5</rep:rowStep>"
    "<rep:coordList>46 10 46 11</rep:coordList><rep:coordList>45 10 45 11</rep:coordList>"
    "</rep:regularGrid>"
)
IN_GEOTIFF = "<rep:modelInGeotiff>true</rep:modelInGeotiff>"


def browse(
    file_name: str | None,
    georef: str = IN_GEOTIFF,
    *,
    identifier: str | None = None,
    rsi: str = "EPSG:4326",
    start: str = "2026-06-01T10:00:00Z",
    end: str = "2026-06-01T10:00:30Z",
) -> str:
    parts = ["<rep:browse>"]
    if identifier is not None:
        parts.append(f"<rep:browseIdentifier>{identifier}</rep:browseIdentifier>")
    if file_name is not None:
        parts.append(f"<rep:fileName>{file_name}</rep:fileName>")
    parts += [
        "<rep:imageType>GeoTIFF</rep:imageType>",
        f"<rep:referenceSystemIdentifier>{rsi}</rep:referenceSystemIdentifier>",
        georef,
        f"<rep:startTime>{start}</rep:startTime><rep:endTime>{end}</rep:endTime>",
        "</rep:browse>",
    ]
    return "".join(parts)


def report(*browses: str, ns: str = NS_BROWSE_REPORT, date_time: str = "2026-06-01T12:00:00Z") -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<rep:browseReport xmlns:rep="{ns}" version="1.3">'
        "<rep:responsibleOrgName>ESA</rep:responsibleOrgName>"
        f"<rep:dateTime>{date_time}</rep:dateTime>"
        "<rep:browseType>OPTICAL</rep:browseType>" + "".join(browses) + "</rep:browseReport>"
    ).encode()


@pytest.mark.parametrize("ns", [NS_BROWSE_REPORT, NS_BROWSE_REPORT_OLD])
def test_both_namespaces_are_read(ns: str) -> None:
    parsed = parse_browse_report(report(browse("a.tif", RECTIFIED, identifier="A"), ns=ns), "landing/c/r.xml")
    assert parsed.namespace == ns
    assert parsed.status == "success"
    assert parsed.responsible_org_name == "ESA"
    assert parsed.browse_type == "OPTICAL"
    assert parsed.date_time == dt.datetime(2026, 6, 1, 12, tzinfo=UTC)
    (b,) = parsed.browses
    assert (b.identifier, b.file_name, b.image_type) == ("A", "a.tif", "GeoTIFF")
    assert b.start == dt.datetime(2026, 6, 1, 10, tzinfo=UTC)
    assert b.end == dt.datetime(2026, 6, 1, 10, 0, 30, tzinfo=UTC)


def test_several_browses_with_every_georeference_kind() -> None:
    parsed = parse_browse_report(
        report(
            browse("r.tif", RECTIFIED, identifier="R"),
            browse("f.tif", FOOTPRINT),
            browse("g.tif", REGULAR_GRID),
            browse("m.tif", IN_GEOTIFF),
        ),
        "landing/c/many.xml",
    )
    assert parsed.status == "success"
    by_file = {b.file_name: b.georeference for b in parsed.browses}
    assert [b.index for b in parsed.browses] == [1, 2, 3, 4]

    rect = by_file["r.tif"]
    assert rect.kind == "rectifiedBrowse"
    assert rect.coords == (45.0, 10.0, 46.0, 11.0)
    assert rect.summary() == {"kind": "rectifiedBrowse", "coordList": [45.0, 10.0, 46.0, 11.0]}

    fp = by_file["f.tif"]
    assert fp.kind == "footprint"
    assert fp.node_number == 5
    assert fp.col_rows[:4] == (0.0, 0.0, 255.0, 0.0)
    assert fp.coords[-2:] == (46.0, 10.0)
    assert fp.summary()["nodeNumber"] == 5

    grid = by_file["g.tif"]
    assert grid.kind == "regularGrid"
    assert (grid.col_node_number, grid.row_node_number, grid.col_step, grid.row_step) == (2, 2, 255.0, 255.5)
    assert grid.coords == (46.0, 10.0, 46.0, 11.0, 45.0, 10.0, 45.0, 11.0)
    assert grid.summary() == {
        "kind": "regularGrid",
        "colNodeNumber": 2,
        "rowNodeNumber": 2,
        "colStep": 255.0,
        "rowStep": 255.5,
    }

    assert by_file["m.tif"].kind == "modelInGeotiff"
    assert by_file["m.tif"].summary() == {"kind": "modelInGeotiff"}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("EPSG: 4326", "EPSG:4326"),
        (" EPSG :32632 ", "EPSG:32632"),
        ("epsg:3857", "EPSG:3857"),
        ("EPSG:4326", "EPSG:4326"),
    ],
)
def test_reference_system_stray_spaces_are_normalised(given: str, expected: str) -> None:
    parsed = parse_browse_report(report(browse("a.tif", rsi=given)), "r.xml")
    assert parsed.browses[0].reference_system == expected
    assert normalize_reference_system(given) == expected


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<rep:browseReport xmlns:rep="http://ngeo.eo.esa.int/ngEO/browseReport/1.0">
 <rep:responsibleOrgName>&lol9;</rep:responsibleOrgName>
</rep:browseReport>
"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE rep:browseReport [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<rep:browseReport xmlns:rep="http://ngeo.eo.esa.int/ngEO/browseReport/1.0">
 <rep:responsibleOrgName>&xxe;</rep:responsibleOrgName>
</rep:browseReport>
"""

PLAIN_DOCTYPE = b"""<?xml version="1.0"?>
<!DOCTYPE rep:browseReport SYSTEM "http://127.0.0.1:9/browseReport.dtd">
<rep:browseReport xmlns:rep="http://ngeo.eo.esa.int/ngEO/browseReport/1.0"/>
"""


@pytest.mark.parametrize(
    "data", [BILLION_LAUGHS, EXTERNAL_ENTITY, PLAIN_DOCTYPE], ids=["bomb", "xxe", "doctype"]
)
def test_unsafe_xml_is_refused_without_expansion(data: bytes) -> None:
    with pytest.raises(ReportError, match=r"landing/c/evil\.xml.*refused") as info:
        parse_browse_report(data, "landing/c/evil.xml")
    message = str(info.value)
    assert "lollol" not in message
    assert "root:" not in message
    assert len(message) < 400


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"<rep:browseReport xmlns:rep='x'><unclosed></rep:browseReport>", "not well-formed"),
        (b"", "not well-formed"),
        (b"<browseReport/>", "root element"),
        (b"<rep:browseReport xmlns:rep='http://example.com/other'/>", "root element"),
        (f'<rep:browseReport xmlns:rep="{NS_BROWSE_REPORT}"/>'.encode(), "holds no browse"),
    ],
)
def test_malformed_or_foreign_xml_names_the_report(data: bytes, match: str) -> None:
    with pytest.raises(ReportError, match=rf"landing/c/bad\.xml.*{match}|{match}.*landing/c/bad\.xml"):
        parse_browse_report(data, "landing/c/bad.xml")


def test_bad_report_datetime_is_a_report_error() -> None:
    with pytest.raises(ReportError, match=r"r\.xml.*dateTime 'yesterday'"):
        parse_browse_report(report(browse("a.tif"), date_time="yesterday"), "r.xml")


def test_bad_browses_are_rejected_and_good_ones_kept() -> None:
    parsed = parse_browse_report(
        report(
            browse("ok.tif", RECTIFIED, identifier="OK"),
            browse(
                "three.tif", "<rep:rectifiedBrowse><rep:coordList>1 2 3</rep:coordList></rep:rectifiedBrowse>"
            ),
            browse(
                "fp.tif",
                "<rep:footprint><rep:colRowList>0 0 1 1</rep:colRowList>"
                "<rep:coordList>1 2 3 4 5 6</rep:coordList></rep:footprint>",
            ),
            browse("none.tif", ""),
            browse("two.tif", RECTIFIED + IN_GEOTIFF),
            browse("when.tif", start="soon"),
            browse("back.tif", start="2026-06-02T00:00:00Z", end="2026-06-01T00:00:00Z"),
            browse(None, identifier="NOFILE"),
            browse(
                "nan.tif",
                "<rep:rectifiedBrowse><rep:coordList>1 2 nan 4</rep:coordList></rep:rectifiedBrowse>",
            ),
        ),
        "landing/c/mixed.xml",
    )
    assert parsed.status == "partial"
    assert [b.file_name for b in parsed.browses] == ["ok.tif"]
    messages = {r.file_name: r.message for r in parsed.rejected}
    assert "needs 4 numbers, got 3" in messages["three.tif"]
    assert "same number" in messages["fp.tif"]
    assert "no geo-reference" in messages["none.tif"]
    assert "more than one geo-reference" in messages["two.tif"]
    assert "startTime 'soon'" in messages["when.tif"]
    assert "before startTime" in messages["back.tif"]
    assert "fileName is missing" in messages[None]
    assert "non-finite" in messages["nan.tif"]
    assert [r.index for r in parsed.rejected] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert next(r for r in parsed.rejected if r.file_name is None).identifier == "NOFILE"


def test_all_browses_rejected_is_a_failed_report() -> None:
    parsed = parse_browse_report(report(browse("a.tif", "")), "r.xml")
    assert parsed.status == "failure"
    assert parsed.browses == ()


def test_times_without_offset_are_utc_and_offsets_converted() -> None:
    assert parse_time("2026-06-01T10:00:00") == dt.datetime(2026, 6, 1, 10, tzinfo=UTC)
    assert parse_time("2026-06-01T12:00:00+02:00") == dt.datetime(2026, 6, 1, 10, tzinfo=UTC)
    assert parse_time("2026-06-01") == dt.datetime(2026, 6, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="empty"):
        parse_time("  ")


# --- /newitem sidecars ---------------------------------------------------------------------------


def newitem(**fields: object) -> bytes:
    doc: dict[str, object] = {
        "collection_id": "dem",
        "date": "2026-05-01T02:00:00+02:00",
        "name": "DEM_N47E010",
        "filename": "DEM_N47E010.tif",
        "stac_api_server": "https://stac.example.com",
        "file_source_host": "https://files.example.com",
        "properties": {"platform": "demo", "gsd": 30},
    }
    doc.update(fields)
    return json.dumps(doc).encode()


def test_newitem_sidecar_is_read() -> None:
    item = parse_newitem(newitem(), "landing/dem/DEM_N47E010.json")
    assert item.collection_id == "dem"
    assert item.date == dt.datetime(2026, 5, 1, tzinfo=UTC)
    assert item.date.tzinfo is UTC
    assert (item.name, item.filename) == ("DEM_N47E010", "DEM_N47E010.tif")
    assert item.stac_api_server == "https://stac.example.com"
    assert item.properties == {"platform": "demo", "gsd": 30}


def test_newitem_fields_are_optional() -> None:
    item = parse_newitem(b'{"date": "2026-05-01", "unrelated": 1}', "x.json")
    assert item.date == dt.datetime(2026, 5, 1, tzinfo=UTC)
    assert item.name is None
    assert item.properties == {}


@pytest.mark.parametrize("date", ["01/05/2026", "2026-13-01", "", 20260501, ["2026-05-01"]])
def test_newitem_bad_date_names_the_product(date: object) -> None:
    with pytest.raises(ReportError, match=r"product 'DEM_N47E010'.*DEM_N47E010\.json.*date"):
        parse_newitem(newitem(date=date), "landing/dem/DEM_N47E010.json")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (b"[1, 2]", "must hold a JSON object"),
        (newitem(name=7), "name must be a string"),
        (newitem(properties=[1]), "properties must be an object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than the limit limits.max_nesting_depth = 64"),
    ],
)
def test_newitem_malformed_names_the_sidecar(data: bytes, match: str) -> None:
    with pytest.raises(ReportError, match=rf"landing/dem/x\.json.*{match}"):
        parse_newitem(data, "landing/dem/x.json")


def nested(depth: int) -> bytes:
    """A ``/newitem`` sidecar whose properties nest ``depth`` levels (objects and arrays)."""
    return (
        b'{"name": "DEEP_1", "properties": ' + b'{"a": [' * (depth // 2) + b"1" + b"]}" * (depth // 2) + b"}"
    )


def test_sidecar_nested_too_deep_fails_naming_the_limit_before_parsing() -> None:
    with pytest.raises(ReportLimitError, match=r"sidecar 'landing/dem/x\.json' is nested deeper") as caught:
        parse_newitem(nested(900), "landing/dem/x.json")
    assert "limits.max_nesting_depth = 64" in str(caught.value)
    assert "SKYVAULT_LIMITS__MAX_NESTING_DEPTH" in str(caught.value)

    raised = LimitSettings(max_nesting_depth=200)
    item = parse_newitem(nested(120), "landing/dem/x.json", limits=raised)
    assert item.name == "DEEP_1"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"name": "x", "properties": {"note": "[[[[{{{{" * 50, "quote": '\\"[[[['}})
    item = parse_newitem(text.encode(), "landing/dem/x.json", limits=LimitSettings(max_nesting_depth=2))
    assert item.properties["note"].startswith("[[[[")


def test_browse_report_nested_too_deep_fails_naming_the_limit() -> None:
    deep = "<rep:x>" * 70 + "</rep:x>" * 70
    data = report(browse("a.tif")).replace(b"</rep:browseReport>", deep.encode() + b"</rep:browseReport>")
    with pytest.raises(ReportLimitError, match=r"browse report 'landing/c/r\.xml' is nested deeper"):
        parse_browse_report(data, "landing/c/r.xml")
    parsed = parse_browse_report(data, "landing/c/r.xml", limits=LimitSettings(max_nesting_depth=80))
    assert [b.file_name for b in parsed.browses] == ["a.tif"]


def test_oversized_sidecar_and_report_fail_naming_the_limit() -> None:
    small = LimitSettings(max_sidecar_bytes=1000)
    big_item = newitem(properties={"padding": "x" * 2000})
    with pytest.raises(ReportLimitError, match=r"sidecar 'landing/dem/x\.json' is \d+ bytes") as caught:
        parse_newitem(big_item, "landing/dem/x.json", limits=small)
    assert "limits.max_sidecar_bytes = 1000" in str(caught.value)
    assert "SKYVAULT_LIMITS__MAX_SIDECAR_BYTES" in str(caught.value)
    big_report = report(*[browse(f"{i}.tif") for i in range(10)])
    with pytest.raises(ReportLimitError, match=r"browse report 'landing/c/r\.xml' is \d+ bytes"):
        parse_browse_report(big_report, "landing/c/r.xml", limits=small)
    assert parse_newitem(big_item, "landing/dem/x.json").properties["padding"] == "x" * 2000


NS_INGESTION = "http://ngeo.eo.esa.int/schema/browse/ingestion"


def test_a_report_wrapped_for_browse_server_ingestion_is_read() -> None:
    plain = report(browse("a.jpg", FOOTPRINT, identifier="_A"))
    inner = plain.decode().split("?>", 1)[1]
    wrapped = f'<bsi:ingestBrowse xmlns:bsi="{NS_INGESTION}">{inner}</bsi:ingestBrowse>'.encode()
    # the browse server's own requests hold the report's elements directly
    body = inner.split(">", 1)[1].rsplit("</rep:browseReport>", 1)[0]
    direct = (
        f'<bsi:ingestBrowse xmlns:bsi="{NS_INGESTION}" xmlns:rep="{NS_BROWSE_REPORT_OLD}">'
        f"{body}</bsi:ingestBrowse>"
    ).encode()

    expected = parse_browse_report(plain, "r.xml")
    for data in (wrapped, direct):
        parsed = parse_browse_report(data, "r.xml")
        assert parsed.browses == expected.browses
        assert parsed.status == "success"
        assert (parsed.responsible_org_name, parsed.browse_type) == ("ESA", "OPTICAL")
    assert parse_browse_report(wrapped, "r.xml").namespace == NS_BROWSE_REPORT
    assert parse_browse_report(direct, "r.xml").namespace == NS_BROWSE_REPORT_OLD


_TWO_REPORTS = report(browse("a.tif")).decode().split("?>", 1)[1] * 2


@pytest.mark.parametrize(
    "data",
    [
        f'<bsi:ingestBrowse xmlns:bsi="{NS_INGESTION}"/>'.encode(),
        f'<bsi:ingestBrowse xmlns:bsi="{NS_INGESTION}"><x:browseReport xmlns:x="http://example.com"/>'
        "</bsi:ingestBrowse>".encode(),
        f'<bsi:ingestBrowse xmlns:bsi="{NS_INGESTION}">{_TWO_REPORTS}</bsi:ingestBrowse>'.encode(),
        b'<bsi:ingestBrowse xmlns:bsi="http://example.com/other"/>',
    ],
)
def test_an_ingestion_request_without_one_report_names_the_report(data: bytes) -> None:
    with pytest.raises(ReportError, match=r"browse report 'r\.xml'.*ingestBrowse"):
        parse_browse_report(data, "r.xml")


def test_wrapped_reports_keep_the_safety_limits() -> None:
    inner = report(browse("a.tif")).decode().split("?>", 1)[1]
    data = f'<bsi:ingestBrowse xmlns:bsi="{NS_INGESTION}">{inner}</bsi:ingestBrowse>'.encode()
    with pytest.raises(ReportLimitError, match="max_nesting_depth"):
        parse_browse_report(data, "r.xml", limits=LimitSettings(max_nesting_depth=3))
    entity = (
        b'<?xml version="1.0"?><!DOCTYPE bsi:ingestBrowse [<!ENTITY a "aaaa">]>'
        + f'<bsi:ingestBrowse xmlns:bsi="{NS_INGESTION}">&a;</bsi:ingestBrowse>'.encode()
    )
    with pytest.raises(ReportError, match="refused"):
        parse_browse_report(entity, "r.xml")

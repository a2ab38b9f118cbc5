"""Browses placed by their reports and rasters placed by GCPs: where the COG lands, and its pixels."""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyproj
import pytest
import rasterio
import rasterio.shutil
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

from skyvault.cog.convert import preprocess_product
from skyvault.cog.georef import (
    PlacementError,
    coordinate_pairs,
    gcp_method,
    northing_first,
    reference_crs,
    report_placement,
    unwrap_longitudes,
)
from skyvault.config.collections import CogProfile, CollectionConfig
from skyvault.config.settings import LimitSettings, StoreSettings
from skyvault.discovery.reports import parse_browse_report
from skyvault.errors import RasterError, RasterLimitError
from skyvault.models import CogInfo, GeoReference, Product
from skyvault.stac.item import build_item
from tests.discovery.test_reports import browse, report

# The browse image: 160 x 120 pixels in blocks of 20 x 20; red grows to the right, green downwards.
W, H, BLOCK = 160, 120, 20
COLLECTION = CollectionConfig(id="browses", cog=CogProfile(blocksize=64))

Ground = Callable[[float, float], tuple[float, float]]


def pattern() -> np.ndarray:
    rows, cols = np.mgrid[0:H, 0:W]
    red = 20 + 28 * (cols // BLOCK)
    green = 20 + 36 * (rows // BLOCK)
    return np.stack([red, green, np.full_like(red, 128)]).astype("uint8")


def block_value(col: float, row: float) -> tuple[int, int]:
    """Red and green of the source block holding pixel position (col, row)."""
    return 20 + 28 * int(col // BLOCK), 20 + 36 * int(row // BLOCK)


def write_jpeg(path: Path) -> Path:
    """The pattern as a JPEG without any georeferencing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile() as mem, mem.open(driver="GTiff", width=W, height=H, count=3, dtype="uint8") as ds:
            ds.write(pattern())
            rasterio.shutil.copy(ds, path, driver="JPEG", QUALITY="95")
    return path


def affine_ground(
    lon0: float, lat0: float, dlon_col: float, dlon_row: float, dlat_col: float, dlat_row: float
) -> Ground:
    def ground(col: float, row: float) -> tuple[float, float]:
        return lon0 + dlon_col * col + dlon_row * row, lat0 + dlat_col * col + dlat_row * row

    return ground


# a scene rotated by about 20 degrees near 3E 45N; one source pixel is about 0.005 degrees
ROTATED = affine_ground(3.0, 45.5, 0.0047, 0.0017, -0.0017, -0.0047)
PIXEL_DEG = 0.0051
CORNERS = [(0, 0), (W, 0), (W, H), (0, H)]


def latlon(points: list[tuple[float, float]]) -> str:
    """Lon/lat points as a GML coordinate list in EPSG:4326 axis order (lat lon)."""
    return " ".join(f"{lat!r} {lon!r}" for lon, lat in points)


def footprint_xml(pixels: Sequence[tuple[float, float]], coords: str) -> str:
    ring = [*pixels, pixels[0]]
    col_rows = " ".join(f"{c} {r}" for c, r in ring)
    first = " ".join(coords.split()[:2])
    return (
        f'<rep:footprint nodeNumber="{len(ring)}"><rep:colRowList>{col_rows}</rep:colRowList>'
        f"<rep:coordList>{coords} {first}</rep:coordList></rep:footprint>"
    )


def georeference_of(georef_xml: str, rsi: str = "EPSG:4326") -> tuple[GeoReference, str | None]:
    parsed = parse_browse_report(report(browse("b.jpg", georef_xml, identifier="B", rsi=rsi)), "r.xml")
    (b,) = parsed.browses
    return b.georeference, b.reference_system


@pytest.fixture
def jpeg(store: StoreSettings) -> str:
    key = "landing/browses/b.jpg"
    write_jpeg(store.root / key)
    return key


def product_for(key: str, georef_xml: str, rsi: str = "EPSG:4326", pid: str = "_b") -> Product:
    georeference, reference_system = georeference_of(georef_xml, rsi)
    return Product(
        collection="browses",
        id=pid,
        source_key=key,
        datetime=dt.datetime(2026, 6, 1, tzinfo=dt.UTC),
        crs_hint=reference_system,
        georeference=georeference,
    )


def convert(
    product: Product,
    store: StoreSettings,
    scratch: Path,
    collection: CollectionConfig = COLLECTION,
    **kw: Any,
) -> CogInfo:
    info = preprocess_product(product, collection, store, scratch, **kw)
    assert list(scratch.iterdir()) == [], "the scratch folder is cleaned"
    return info


def assert_placed(
    cog: Path, ground: Ground, *, to_cog: Callable[[float, float], tuple[float, float]] | None = None
) -> None:
    """The COG shows each source block where ``ground`` puts it, and its corners where they belong."""
    with rasterio.open(cog) as ds:
        data = ds.read()
        if ds.count == 3:  # not warped: every pixel holds data
            data = np.concatenate([data, np.full_like(data[:1], 255)])

        def at(col: float, row: float) -> np.ndarray:
            x, y = ground(col, row)
            if to_cog is not None:
                x, y = to_cog(x, y)
            r, c = ds.index(x, y)
            assert 0 <= r < ds.height, (col, row)
            assert 0 <= c < ds.width, (col, row)
            pixel: np.ndarray = data[:, r, c]
            return pixel

        for by in range(H // BLOCK):
            for bx in range(W // BLOCK):
                col, row = bx * BLOCK + BLOCK / 2, by * BLOCK + BLOCK / 2
                red, green, blue, alpha = (int(v) for v in at(col, row))
                assert alpha == 255, (col, row)
                want_red, want_green = block_value(col, row)
                assert abs(red - want_red) <= 8, (col, row, red)
                assert abs(green - want_green) <= 8, (col, row, green)
                assert abs(blue - 128) <= 8
        cx, cy = W / 2, H / 2
        for col, row in CORNERS:
            # about 1.5 source pixels inside each corner there is data, outside there is none
            inward = np.array([cx - col, cy - row]) / np.hypot(cx - col, cy - row) * 1.5 * np.sqrt(2)
            assert at(col + inward[0], row + inward[1])[3] == 255, ("inside", col, row)
            x, y = ground(col - inward[0], row - inward[1])
            if to_cog is not None:
                x, y = to_cog(x, y)
            r, c = ds.index(x, y)
            if 0 <= r < ds.height and 0 <= c < ds.width:
                assert data[3, r, c] == 0, ("outside", col, row)


def bounds_of(cog: Path) -> tuple[float, float, float, float]:
    with rasterio.open(cog) as ds:
        b = ds.bounds
        return b.left, b.bottom, b.right, b.top


def expected_bounds(ground: Ground) -> tuple[float, float, float, float]:
    pts = [ground(c, r) for c, r in CORNERS]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def assert_bounds(cog: Path, want: tuple[float, float, float, float], tolerance: float) -> None:
    got = bounds_of(cog)
    assert all(abs(g - w) <= tolerance for g, w in zip(got, want, strict=True)), (got, want)


# --- report forms -------------------------------------------------------------------------------


def test_rectified_browse_is_placed_by_its_corners(jpeg: str, store: StoreSettings, scratch: Path) -> None:
    # lower-left (lat lon) then upper-right, pixel edges
    georef = "<rep:rectifiedBrowse><rep:coordList>44.6 2.5 45.2 3.3</rep:coordList></rep:rectifiedBrowse>"
    info = convert(product_for(jpeg, georef), store, scratch)

    cog = store.root / info.key
    with rasterio.open(cog) as ds:
        assert ds.crs == CRS.from_epsg(4326)
    assert_bounds(cog, (2.5, 44.6, 3.3, 45.2), 0.6 / H)
    assert_placed(cog, affine_ground(2.5, 45.2, 0.8 / W, 0.0, 0.0, -0.6 / H))


def test_footprint_places_a_rotated_browse(jpeg: str, store: StoreSettings, scratch: Path) -> None:
    georef = footprint_xml(CORNERS, latlon([ROTATED(c, r) for c, r in CORNERS]))
    info = convert(product_for(jpeg, georef), store, scratch)

    cog = store.root / info.key
    assert_bounds(cog, expected_bounds(ROTATED), PIXEL_DEG)
    assert_placed(cog, ROTATED)


def test_regular_grid_places_a_browse_with_its_last_nodes_on_the_edges(
    jpeg: str, store: StoreSettings, scratch: Path
) -> None:
    # 5 x 4 nodes every 42 x 45 pixels reach 168 x 135 pixels, past the 160 x 120 image: the report
    # gives the last column and row of nodes on the image's right and bottom edges
    cols = [0, 42, 84, 126, W]
    rows = [0, 45, 90, H]
    lists = "".join(f"<rep:coordList>{latlon([ROTATED(c, r) for c in cols])}</rep:coordList>" for r in rows)
    georef = (
        "<rep:regularGrid><rep:colNodeNumber>5</rep:colNodeNumber><rep:rowNodeNumber>4</rep:rowNodeNumber>"
        f"<rep:colStep>42</rep:colStep><rep:rowStep>45</rep:rowStep>{lists}</rep:regularGrid>"
    )
    info = convert(product_for(jpeg, georef), store, scratch)

    cog = store.root / info.key
    assert_bounds(cog, expected_bounds(ROTATED), PIXEL_DEG)
    assert_placed(cog, ROTATED)


def test_a_footprint_no_polynomial_fits_is_placed_by_a_thin_plate_spline(
    jpeg: str, store: StoreSettings, scratch: Path
) -> None:
    # a trapezoid: the top edge is half as wide as the bottom one
    corners = [(3.2, 46.0), (3.6, 46.0), (3.8, 45.6), (3.0, 45.6)]
    georef = footprint_xml(CORNERS, latlon(corners))

    auto = store.root / convert(product_for(jpeg, georef), store, scratch).key
    with rasterio.open(auto) as ds:
        alpha = ds.read(4)
        centre = np.mean(corners, axis=0)
        for (lon, lat), (col, row) in zip(corners, CORNERS, strict=True):
            # about two pixels in from each footprint corner lies data of the matching image corner
            lon_in, lat_in = np.array([lon, lat]) + 0.03 * (centre - [lon, lat])
            r, c = ds.index(lon_in, lat_in)
            assert alpha[r, c] == 255, (lon, lat)
            red, green = (int(v) for v in ds.read(window=((r, r + 1), (c, c + 1)))[:2, 0, 0])
            want_red, want_green = block_value(min(col, W - 1), min(row, H - 1))
            assert abs(red - want_red) <= 8
            assert abs(green - want_green) <= 8
        assert_bounds(auto, (3.0, 45.6, 3.8, 46.0), 0.8 / W)

    polynomial = COLLECTION.model_copy(update={"cog": CogProfile(blocksize=64, gcp_transformer="polynomial")})
    fitted = store.root / convert(product_for(jpeg, georef), store, scratch, polynomial).key
    # GDAL's first-order polynomial cannot bend the image into the trapezoid: its corners move off
    assert max(abs(a - b) for a, b in zip(bounds_of(fitted), (3.0, 45.6, 3.8, 46.0), strict=True)) > 0.02


# --- axis order and reference systems -------------------------------------------------------------


def test_axis_order_follows_the_reference_system(store: StoreSettings, scratch: Path) -> None:
    lonlat = [ROTATED(c, r) for c, r in CORNERS]
    to_utm = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32631", always_xy=True)
    utm = [to_utm.transform(lon, lat) for lon, lat in lonlat]
    forms = {
        "EPSG:4326": latlon(lonlat),  # latitude first
        "urn:ogc:def:crs:OGC:1.3:CRS84": " ".join(f"{lon!r} {lat!r}" for lon, lat in lonlat),
        "EPSG:32631": " ".join(f"{e!r} {n!r}" for e, n in utm),  # easting first
    }
    cogs: dict[str, Path] = {}
    for n, (rsi, coords) in enumerate(forms.items()):
        key = f"landing/browses/b{n}.jpg"
        write_jpeg(store.root / key)
        info = convert(product_for(key, footprint_xml(CORNERS, coords), rsi, pid=f"b{n}"), store, scratch)
        cogs[rsi] = store.root / info.key

    for rsi, cog in cogs.items():
        with rasterio.open(cog) as ds:
            assert ds.crs == CRS.from_epsg(4326), rsi
        assert_bounds(cog, expected_bounds(ROTATED), PIXEL_DEG)
        assert_placed(cog, ROTATED)


def test_projected_target_crs_is_honoured(jpeg: str, store: StoreSettings, scratch: Path) -> None:
    georef = footprint_xml(CORNERS, latlon([ROTATED(c, r) for c, r in CORNERS]))
    utm = COLLECTION.model_copy(update={"target_crs": "EPSG:32631"})
    info = convert(product_for(jpeg, georef), store, scratch, utm)

    to_utm = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32631", always_xy=True)
    with rasterio.open(store.root / info.key) as ds:
        assert ds.crs == CRS.from_epsg(32631)
    assert_placed(store.root / info.key, ROTATED, to_cog=to_utm.transform)


def test_footprint_across_the_antimeridian_stays_one_piece(store: StoreSettings, scratch: Path) -> None:
    ground = affine_ground(175.0, -10.0, 10.0 / W, 0.0, 0.0, -5.0 / H)  # 175E .. 185E = 175W
    wrapped = [(lon - 360 if lon > 180 else lon, lat) for lon, lat in (ground(c, r) for c, r in CORNERS)]
    assert wrapped[1][0] == pytest.approx(-175.0)
    key = "landing/browses/dateline.jpg"
    write_jpeg(store.root / key)
    product = product_for(key, footprint_xml(CORNERS, latlon(wrapped)), pid="dateline")
    info = convert(product, store, scratch)

    cog = store.root / info.key
    left, _, right, _ = bounds_of(cog)
    assert right - left == pytest.approx(10.0, abs=2 * 10.0 / W), "no world-wide smear"
    assert_bounds(cog, (175.0, -15.0, 185.0, -10.0), 10.0 / W)
    assert_placed(cog, ground)

    item = build_item(product, info, COLLECTION, store)
    west, south, east, north = item["bbox"]
    assert west == pytest.approx(175.0, abs=0.1)
    assert east == pytest.approx(-175.0, abs=0.1)
    assert (south, north) == (pytest.approx(-15.0, abs=0.1), pytest.approx(-10.0, abs=0.1))
    assert item["geometry"]["type"] == "MultiPolygon"


# --- GCP-only rasters -----------------------------------------------------------------------------


def test_gcp_only_geotiff_is_warped_with_its_gcps(store: StoreSettings, scratch: Path) -> None:
    # GCPs in UTM 31N on a 30 m grid rotated by about 15 degrees
    origin, size = (500000.0, 5000000.0), 30.0
    cos, sin = np.cos(np.radians(15)), np.sin(np.radians(15))

    def utm(col: float, row: float) -> tuple[float, float]:
        return origin[0] + size * (col * cos + row * sin), origin[1] + size * (col * sin - row * cos)

    gcps = [
        GroundControlPoint(row=r, col=c, x=utm(c, r)[0], y=utm(c, r)[1], z=0.0, id=f"{c}-{r}", info="")
        for c in (0, W / 2, W)
        for r in (0, H / 2, H)
    ]
    key = "landing/browses/gcps.tif"
    path = store.root / key
    path.parent.mkdir(parents=True)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=W,
        height=H,
        count=3,
        dtype="uint8",
        gcps=gcps,
        crs=CRS.from_epsg(32631),
    ) as ds:
        ds.write(pattern())
    with rasterio.open(path) as ds:
        assert ds.transform.is_identity
        assert ds.crs is None
        assert ds.gcps[0]

    info = convert(Product(collection="browses", id="gcps", source_key=key), store, scratch)

    to_lonlat = pyproj.Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True)

    def ground(col: float, row: float) -> tuple[float, float]:
        lon, lat = to_lonlat.transform(*utm(col, row))
        return float(lon), float(lat)

    cog = store.root / info.key
    with rasterio.open(cog) as ds:
        assert ds.crs == CRS.from_epsg(4326)
    assert_bounds(cog, expected_bounds(ground), 1.5 * size / 111_000 / np.cos(np.radians(45)))
    assert_placed(cog, ground)


# --- re-placement and failures ---------------------------------------------------------------------


def test_a_corrected_report_rebuilds_the_cog_at_the_new_place(
    jpeg: str, store: StoreSettings, scratch: Path
) -> None:
    first = footprint_xml(CORNERS, latlon([ROTATED(c, r) for c, r in CORNERS]))
    info = convert(product_for(jpeg, first), store, scratch)
    assert info.created
    assert convert(product_for(jpeg, first), store, scratch).created is False  # same report: kept

    moved = affine_ground(4.0, 45.5, 0.0047, 0.0017, -0.0017, -0.0047)  # one degree east
    second = footprint_xml(CORNERS, latlon([moved(c, r) for c, r in CORNERS]))
    again = convert(product_for(jpeg, second), store, scratch)

    assert again.created
    assert again.source_sha256 == info.source_sha256
    assert_bounds(store.root / again.key, expected_bounds(moved), PIXEL_DEG)
    assert_placed(store.root / again.key, moved)


@pytest.mark.parametrize(
    ("georef", "rsi", "reason"),
    [
        (
            "<rep:rectifiedBrowse><rep:coordList>45.2 3.3 44.6 2.5</rep:coordList></rep:rectifiedBrowse>",
            "EPSG:4326",
            "rectifiedBrowse.*not lower-left and upper-right",
        ),
        (
            footprint_xml([(0, 0), (W, 0), (W, 0), (0, H)], "46 3 46 4 45 4 45 3"),
            "EPSG:4326",
            "footprint.*given twice",
        ),
        (
            "<rep:rectifiedBrowse><rep:coordList>44.6 2.5 45.2 3.3</rep:coordList></rep:rectifiedBrowse>",
            "EPSG:999999",
            "rectifiedBrowse.*not a known reference system",
        ),
    ],
)
def test_a_report_that_cannot_place_its_browse_fails_naming_the_product(
    georef: str, rsi: str, reason: str, jpeg: str, store: StoreSettings, scratch: Path
) -> None:
    scratch.mkdir()
    with pytest.raises(RasterError, match=reason) as caught:
        preprocess_product(product_for(jpeg, georef, rsi), COLLECTION, store, scratch)
    message = str(caught.value)
    assert message.startswith("product browses/_b: placing browse 'landing/browses/b.jpg' from report")
    assert not (store.root / "cogs").exists()
    assert list(scratch.iterdir()) == []


def test_a_jpeg_without_a_placing_report_still_fails_for_its_missing_crs(
    jpeg: str, store: StoreSettings, scratch: Path
) -> None:
    scratch.mkdir()
    product = Product(collection="browses", id="plain", source_key=jpeg)
    with pytest.raises(RasterError, match=r"product browses/plain: source .*b\.jpg.* has no CRS"):
        preprocess_product(product, COLLECTION, store, scratch)


# --- the pure functions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rsi", "swapped"),
    [
        ("EPSG:4326", True),
        ("urn:ogc:def:crs:EPSG::4326", True),
        ("EPSG:3035", True),  # ETRS89-LAEA: northing first
        ("urn:ogc:def:crs:OGC:1.3:CRS84", False),
        ("EPSG:32631", False),
        (None, True),  # no reference system: EPSG:4326
    ],
)
def test_pairs_are_swapped_for_northing_first_systems(rsi: str | None, swapped: bool) -> None:
    crs = reference_crs(rsi)
    assert northing_first(crs) is swapped
    assert coordinate_pairs((1.0, 2.0, 3.0, 4.0), crs) == (
        [(2.0, 1.0), (4.0, 3.0)] if swapped else [(1.0, 2.0), (3.0, 4.0)]
    )


@pytest.mark.parametrize(
    ("lons", "expected"),
    [
        ([170.0, -170.0, -175.0, 175.0], [170.0, 190.0, 185.0, 175.0]),
        ([-10.0, 10.0, 20.0], [-10.0, 10.0, 20.0]),
        ([-179.0, 0.0, 179.0], [-179.0, 0.0, 179.0]),  # spans the world either way: left alone
    ],
)
def test_longitudes_are_unwrapped_only_across_the_antimeridian(
    lons: list[float], expected: list[float]
) -> None:
    assert unwrap_longitudes(lons) == expected


def test_regular_grid_nodes_past_the_image_are_placed_on_its_edge() -> None:
    georeference, rsi = georeference_of(
        "<rep:regularGrid><rep:colNodeNumber>3</rep:colNodeNumber><rep:rowNodeNumber>2</rep:rowNodeNumber>"
        "<rep:colStep>90</rep:colStep><rep:rowStep>130</rep:rowStep>"
        "<rep:coordList>46 3 46 3.5 46 4</rep:coordList><rep:coordList>45 3 45 3.5 45 4</rep:coordList>"
        "</rep:regularGrid>"
    )
    placement = report_placement(georeference, rsi, W, H)
    assert [(g.col, g.row) for g in placement.gcps] == [(0, 0), (90, 0), (W, 0), (0, H), (90, H), (W, H)]
    assert [(g.x, g.y) for g in placement.gcps][:3] == [(3.0, 46.0), (3.5, 46.0), (4.0, 46.0)]

    too_far = georeference.model_copy(update={"col_step": 200.0})
    with pytest.raises(PlacementError, match="colStep"):
        report_placement(too_far, rsi, W, H)


def test_auto_keeps_the_polynomial_when_it_fits_and_else_takes_the_spline() -> None:
    def gcps(points: list[tuple[float, float]]) -> list[GroundControlPoint]:
        return [
            GroundControlPoint(row=r, col=c, x=x, y=y, z=0.0, id=str(n), info="")
            for n, ((c, r), (x, y)) in enumerate(zip(CORNERS, points, strict=True))
        ]

    parallelogram = gcps([ROTATED(c, r) for c, r in CORNERS])
    trapezoid = gcps([(3.2, 46.0), (3.6, 46.0), (3.8, 45.6), (3.0, 45.6)])
    assert gcp_method(parallelogram, "auto") == "polynomial"
    assert gcp_method(trapezoid, "auto") == "tps"
    assert gcp_method(trapezoid, "polynomial") == "polynomial"
    assert gcp_method(parallelogram, "tps") == "tps"


def test_rectified_corners_across_the_antimeridian_make_one_continuous_grid() -> None:
    georeference, rsi = georeference_of(
        "<rep:rectifiedBrowse><rep:coordList>-15 175 -10 -175</rep:coordList></rep:rectifiedBrowse>"
    )
    placement = report_placement(georeference, rsi, W, H)
    assert placement.transform is not None
    assert placement.transform @ (0, 0) == pytest.approx((175.0, -10.0))
    assert placement.transform @ (W, H) == pytest.approx((185.0, -15.0))


def test_the_warped_size_is_held_to_the_pixel_limit(jpeg: str, store: StoreSettings, scratch: Path) -> None:
    scratch.mkdir()
    georef = footprint_xml(CORNERS, latlon([ROTATED(c, r) for c, r in CORNERS]))
    limits = LimitSettings(max_pixels=W * H + 100)  # the source fits, its rotated warp does not
    with pytest.raises(RasterLimitError, match=r"product browses/_b: .*warped by its GCPs to EPSG:4326"):
        preprocess_product(product_for(jpeg, georef), COLLECTION, store, scratch, limits=limits)
    assert not (store.root / "cogs").exists()
    assert list(scratch.iterdir()) == []

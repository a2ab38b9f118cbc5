"""Where an image lies on the ground: a browse report's geo-reference as GCPs or a geotransform.

A browse report places its image in the CRS of its ``referenceSystemIdentifier`` (EPSG:4326 when
the report names none), its coordinates written in that CRS's axis order as GML writes them: for
EPSG:4326 each pair is "lat lon". Pairs are swapped to easting/longitude first when the CRS's first
axis points north or south, whatever the CRS, so GDAL (which takes x/longitude first) gets them right.

- ``rectifiedBrowse``: the lower-left and upper-right corners of the image (pixel edges) give a
  geotransform.
- ``footprint``: every ``colRowList`` pixel position (column, row; pixel edges) is a GCP at the
  matching ``coordList`` point; a ring's closing point, repeating the first, is dropped.
- ``regularGrid``: node ``(i, j)`` of the grid is a GCP at column ``i * colStep``, row
  ``j * rowStep`` and the ``i``-th point of the ``j``-th ``coordList``. A node past the image's right
  or bottom edge is placed on that edge (reports often let the last node overshoot the image by a
  fraction of a step); a grid whose nodes would then coincide is refused.
- ``modelInGeotiff``: the image's own georeferencing; nothing here.

Longitudes of a geographic CRS that jump across the antimeridian (170 .. -170) are unwrapped past
180 (170 .. 190), so a warp sees one continuous image instead of one spanning the whole world.

Everything here is pure: numbers in, GCPs or a transform out; a geo-reference that cannot place an
image raises :class:`PlacementError` (a ``ValueError``), which the caller reports naming the product.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import pyproj
from affine import Affine
from pyproj.exceptions import CRSError
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.transform import GCPTransformer, from_bounds

from skyvault.models import GeoReference

#: Reference system of a browse report that names none.
DEFAULT_REFERENCE_SYSTEM = "EPSG:4326"
#: The geo-reference kinds whose numbers in the report place the image.
REPORT_KINDS = ("rectifiedBrowse", "footprint", "regularGrid")
#: How far (in source pixels) GDAL's polynomial may miss a GCP before ``auto`` uses a thin-plate spline.
POLYNOMIAL_TOLERANCE = 0.5

GcpTransformer = Literal["auto", "polynomial", "tps"]
GcpMethod = Literal["polynomial", "tps"]


class PlacementError(ValueError):
    """A geo-reference cannot place the image (bad CRS, degenerate corners or GCPs)."""


@dataclass(frozen=True)
class Placement:
    """An image's position: a CRS and either a geotransform or GCPs (pixel edges, x/longitude first)."""

    crs: CRS
    transform: Affine | None = None
    gcps: tuple[GroundControlPoint, ...] = field(default=())

    @property
    def uses_gcps(self) -> bool:
        """True when the image is placed by GCPs (it must be warped with them)."""
        return bool(self.gcps)


def placed_by_report(georeference: GeoReference | None) -> bool:
    """True when ``georeference`` places the image from the report's numbers (not ``modelInGeotiff``)."""
    return georeference is not None and georeference.kind in REPORT_KINDS


def reference_crs(reference_system: str | None) -> pyproj.CRS:
    """The CRS a report's coordinates are in (EPSG:4326 when it names none).

    Raises:
        PlacementError: the identifier is not a CRS PROJ knows (``RAW`` included).

    """
    value = reference_system or DEFAULT_REFERENCE_SYSTEM
    try:
        return pyproj.CRS.from_user_input(value)
    except CRSError as e:
        raise PlacementError(f"referenceSystemIdentifier {value!r} is not a known reference system") from e


def northing_first(crs: pyproj.CRS) -> bool:
    """True when the CRS's first axis is a northing or latitude (its pairs are written y first)."""
    axes = crs.axis_info
    return bool(axes) and axes[0].direction.lower() in ("north", "south")


def coordinate_pairs(coords: Sequence[float], crs: pyproj.CRS) -> list[tuple[float, float]]:
    """A report's coordinate list as ``(x, y)`` pairs, easting/longitude first."""
    pairs = [(coords[i], coords[i + 1]) for i in range(0, len(coords) - 1, 2)]
    return [(b, a) for a, b in pairs] if northing_first(crs) else pairs


def unwrap_longitudes(lons: Sequence[float]) -> list[float]:
    """Longitudes made continuous across the antimeridian.

    When they spread over more than 180 degrees and adding 360 to the negative ones brings them
    within 180 degrees, the negative ones are shifted (``170, -170`` becomes ``170, 190``); otherwise
    they are returned as they are.
    """
    values = list(lons)
    if not values or max(values) - min(values) <= 180:
        return values
    shifted = [v + 360 if v < 0 else v for v in values]
    return shifted if max(shifted) - min(shifted) <= 180 else values


def _gcps(
    pixels: Sequence[tuple[float, float]], points: Sequence[tuple[float, float]], crs: pyproj.CRS
) -> tuple[GroundControlPoint, ...]:
    xs = [x for x, _ in points]
    if crs.is_geographic:
        xs = unwrap_longitudes(xs)
    return tuple(
        GroundControlPoint(row=row, col=col, x=x, y=y, z=0.0, id=str(n), info="")
        for n, ((col, row), x, (_, y)) in enumerate(zip(pixels, xs, points, strict=True), 1)
    )


def _rectified(coords: Sequence[float], crs: pyproj.CRS, width: int, height: int) -> Affine:
    if len(coords) != 4:
        raise PlacementError(f"coordList needs 4 numbers (two corners), got {len(coords)}")
    (x0, y0), (x1, y1) = coordinate_pairs(coords, crs)
    if crs.is_geographic and x1 < x0:
        x1 += 360  # the image crosses the antimeridian
    if not (x1 > x0 and y1 > y0):
        raise PlacementError(
            f"coordList corners ({x0}, {y0}) and ({x1}, {y1}) (x/longitude first) are not lower-left "
            "and upper-right of an image"
        )
    transform: Affine = from_bounds(x0, y0, x1, y1, width, height)
    return transform


def _footprint(georeference: GeoReference, crs: pyproj.CRS) -> tuple[GroundControlPoint, ...]:
    cr = georeference.col_rows
    pixels = [(cr[i], cr[i + 1]) for i in range(0, len(cr) - 1, 2)]
    points = coordinate_pairs(georeference.coords, crs)
    if len(pixels) != len(points):
        raise PlacementError(f"colRowList has {len(pixels)} pairs but coordList has {len(points)}")
    if len(pixels) > 3 and pixels[0] == pixels[-1] and points[0] == points[-1]:
        pixels, points = pixels[:-1], points[:-1]  # the ring's closing point
    seen: dict[tuple[float, float], tuple[float, float]] = {}
    for pixel, point in zip(pixels, points, strict=True):
        if seen.setdefault(pixel, point) != point:
            raise PlacementError(f"pixel (col, row) {pixel} is given twice with different coordinates")
    if len(seen) < 3:
        raise PlacementError(f"needs at least 3 distinct pixel positions, got {len(seen)}")
    unique = dict(zip(pixels, points, strict=True))
    return _gcps(list(unique), list(unique.values()), crs)


def _grid_positions(nodes: int, step: float, size: int, what: str) -> list[float]:
    positions = [min(i * step, float(size)) for i in range(nodes)]
    if any(b <= a for a, b in itertools.pairwise(positions)):
        raise PlacementError(
            f"{what} nodes every {step} pixels reach {(nodes - 1) * step} pixels, beyond the image's "
            f"{size} by more than one step"
        )
    return positions


def _regular_grid(
    georeference: GeoReference, crs: pyproj.CRS, width: int, height: int
) -> tuple[GroundControlPoint, ...]:
    cols, rows = georeference.col_node_number, georeference.row_node_number
    col_step, row_step = georeference.col_step, georeference.row_step
    if cols is None or rows is None or col_step is None or row_step is None:
        raise PlacementError("regularGrid lacks its node numbers or steps")
    points = coordinate_pairs(georeference.coords, crs)
    if len(points) != cols * rows:
        raise PlacementError(f"{cols} x {rows} nodes need {cols * rows} points, got {len(points)}")
    xs = _grid_positions(cols, col_step, width, "colStep: column")
    ys = _grid_positions(rows, row_step, height, "rowStep: row")
    pixels = [(x, y) for y in ys for x in xs]
    return _gcps(pixels, points, crs)


def report_placement(
    georeference: GeoReference, reference_system: str | None, width: int, height: int
) -> Placement:
    """Where a browse report puts an image of ``width`` x ``height`` pixels.

    Raises:
        PlacementError: the geo-reference is ``modelInGeotiff`` (nothing to place from), its CRS is
            unknown, or its numbers do not place an image (corners swapped, repeated pixels).

    """
    crs = reference_crs(reference_system)
    try:
        epsg = crs.to_epsg(min_confidence=100)
        out_crs = CRS.from_epsg(epsg) if epsg is not None else CRS.from_wkt(crs.to_wkt())
    except RasterioError as e:
        raise PlacementError(f"GDAL does not know the reference system {reference_system!r}: {e}") from e
    if georeference.kind == "rectifiedBrowse":
        return Placement(crs=out_crs, transform=_rectified(georeference.coords, crs, width, height))
    if georeference.kind == "footprint":
        return Placement(crs=out_crs, gcps=_footprint(georeference, crs))
    if georeference.kind == "regularGrid":
        return Placement(crs=out_crs, gcps=_regular_grid(georeference, crs, width, height))
    raise PlacementError(f"a {georeference.kind} geo-reference holds no placement")


def file_gcps_placement(gcps: Sequence[GroundControlPoint], crs: CRS) -> Placement:
    """A raster's own GCPs as a placement, longitudes unwrapped when the GCP CRS is geographic."""
    points = [(g.x, g.y) for g in gcps]
    xs = unwrap_longitudes([x for x, _ in points]) if crs.is_geographic else [x for x, _ in points]
    return Placement(
        crs=crs,
        gcps=tuple(
            GroundControlPoint(
                row=g.row, col=g.col, x=x, y=g.y, z=g.z or 0.0, id=g.id or str(n), info=g.info or ""
            )
            for n, (g, x) in enumerate(zip(gcps, xs, strict=True), 1)
        ),
    )


def gcp_method(gcps: Sequence[GroundControlPoint], setting: GcpTransformer) -> GcpMethod:
    """The GCP transformer to warp with.

    ``polynomial`` and ``tps`` are taken as they are. ``auto`` keeps GDAL's polynomial (of the order
    GDAL picks for the number of GCPs) when it passes within :data:`POLYNOMIAL_TOLERANCE` source
    pixels of every GCP, and uses a thin-plate spline, which passes through every GCP, otherwise
    (a footprint that is not a parallelogram, a curved swath given as a grid).

    Raises:
        PlacementError: GDAL cannot fit a polynomial to the GCPs (too few, all on one line).

    """
    if setting != "auto":
        return setting
    return "polynomial" if max_polynomial_miss(gcps) <= POLYNOMIAL_TOLERANCE else "tps"


def max_polynomial_miss(gcps: Sequence[GroundControlPoint]) -> float:
    """How far (in source pixels) GDAL's polynomial fit misses the GCP it misses most.

    Raises:
        PlacementError: GDAL cannot fit a polynomial to the GCPs.

    """
    rows = [g.row for g in gcps]
    cols = [g.col for g in gcps]
    try:
        with GCPTransformer(list(gcps)) as fit:
            x0, y0 = fit.xy(rows, cols, offset="ul")
            xc, yc = fit.xy(rows, [c + 1 for c in cols], offset="ul")
            xr, yr = fit.xy([r + 1 for r in rows], cols, offset="ul")
    except (RasterioError, ValueError) as e:
        raise PlacementError(f"GDAL cannot fit a polynomial to the {len(gcps)} GCPs: {e}") from e
    worst = 0.0
    for n, g in enumerate(gcps):
        pixel = (math.hypot(xc[n] - x0[n], yc[n] - y0[n]) + math.hypot(xr[n] - x0[n], yr[n] - y0[n])) / 2
        miss = math.hypot(x0[n] - g.x, y0[n] - g.y)
        if pixel <= 0 or not math.isfinite(pixel):
            return math.inf
        worst = max(worst, miss / pixel)
    return worst


def transformer_options(method: GcpMethod) -> dict[str, str]:
    """GDAL transformer options selecting ``method`` for a source placed by GCPs."""
    return {"SRC_METHOD": "GCP_TPS" if method == "tps" else "GCP_POLYNOMIAL"}

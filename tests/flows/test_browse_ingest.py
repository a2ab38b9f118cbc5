"""Ingest of a JPEG browse placed by its browse report, end to end on a local store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import rasterio

from skyvault.catalog.registration import open_catalog
from skyvault.config.settings import Settings, StoreSettings
from skyvault.models import ProductStatus
from skyvault.stac.item import validate_item
from skyvault.status import read_status
from skyvault.storage.store import open_store
from tests.cog.test_georef import (
    BLOCK,
    CORNERS,
    ROTATED,
    Ground,
    H,
    W,
    affine_ground,
    block_value,
    footprint_xml,
    latlon,
    write_jpeg,
)
from tests.discovery.test_reports import browse, report
from tests.flows.test_ingest import by_id, run_ingest
from tests.tiles.test_rendering import ZOOM, pixel_at

pytestmark = pytest.mark.usefixtures("prefect_harness")

PRODUCT = "_S1_20260601"
NS_INGESTION = "http://ngeo.eo.esa.int/schema/browse/ingestion"


def wrapped_report(ground: Ground) -> bytes:
    """A browse report for ``_scene.jpg`` placed by ``ground``, wrapped as a browse-server request."""
    footprint = footprint_xml(CORNERS, latlon([ground(c, r) for c, r in CORNERS]))
    inner = report(browse("_scene.jpg", footprint, identifier=PRODUCT)).decode().split("?>", 1)[1]
    return f'<bsi:ingestBrowse xmlns:bsi="{NS_INGESTION}">{inner}</bsi:ingestBrowse>'.encode()


def footprint_bounds(ground: Ground) -> list[float]:
    points = [ground(c, r) for c, r in CORNERS]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [min(xs), min(ys), max(xs), max(ys)]


@pytest.fixture
def settings(configure: Callable[..., Settings], tmp_path: Path) -> Settings:
    collections = {"browses": {"title": "Browses", "pattern": "*.jpg", "render": {"bands": [1, 2, 3]}}}
    return configure(StoreSettings(root=tmp_path / "store"), collections=collections)


def done(settings: Settings) -> ProductStatus:
    status = read_status("browses", PRODUCT, settings.store)
    assert status is not None
    assert status.state == "done"
    return status


def test_a_jpeg_browse_is_ingested_where_its_report_puts_it(settings: Settings) -> None:
    store = open_store(settings.store)
    write_jpeg(settings.store.root / "landing/browses/_scene.jpg")
    store.put_bytes("landing/browses/_scene.xml", wrapped_report(ROTATED))

    summary = run_ingest(collection="browses", seed_tiles=False)

    outcome = by_id(summary)[PRODUCT]
    assert outcome.state == "done", outcome
    assert done(settings).cog_key == f"cogs/browses/{PRODUCT}.tif"
    (item,) = open_catalog(settings.catalog, settings.store).search("browses")
    validate_item(item)
    assert item["id"] == PRODUCT
    pixel = 0.0051  # one source pixel, in degrees
    assert item["bbox"] == pytest.approx(footprint_bounds(ROTATED), abs=pixel)
    assert item["properties"]["browse:georeference"]["kind"] == "footprint"
    first_cog = store.get_bytes(f"cogs/browses/{PRODUCT}.tif")

    # unchanged: skipped
    assert by_id(run_ingest(collection="browses", seed_tiles=False))[PRODUCT].state == "skipped"

    # the report is corrected (same image, moved one degree east): the next ingest moves the COG
    moved = affine_ground(4.0, 45.5, 0.0047, 0.0017, -0.0017, -0.0047)
    store.put_bytes("landing/browses/_scene.xml", wrapped_report(moved))
    summary = run_ingest(collection="browses", seed_tiles=False)

    assert by_id(summary)[PRODUCT].state == "done"
    done(settings)
    (item,) = open_catalog(settings.catalog, settings.store).search("browses")
    assert item["bbox"] == pytest.approx(footprint_bounds(moved), abs=pixel)
    assert store.get_bytes(f"cogs/browses/{PRODUCT}.tif") != first_cog
    with rasterio.open(settings.store.root / f"cogs/browses/{PRODUCT}.tif") as ds:
        left, _, right, _ = ds.bounds
    assert (left, right) == (
        pytest.approx(footprint_bounds(moved)[0], abs=pixel),
        pytest.approx(footprint_bounds(moved)[2], abs=pixel),
    )


def test_tiles_of_a_placed_browse_show_its_pixels_where_the_report_puts_them(
    configure: Callable[..., Settings], tmp_path: Path
) -> None:
    collections = {
        "browses": {"pattern": "*.jpg", "render": {"bands": [1, 2, 3]}, "min_zoom": ZOOM, "max_zoom": ZOOM}
    }
    settings = configure(StoreSettings(root=tmp_path / "store"), collections=collections)
    store = open_store(settings.store)
    write_jpeg(settings.store.root / "landing/browses/_scene.jpg")
    store.put_bytes("landing/browses/_scene.xml", wrapped_report(ROTATED))

    summary = run_ingest(collection="browses")

    assert by_id(summary)[PRODUCT].state == "done"
    (item,) = open_catalog(settings.catalog, settings.store).search("browses")
    collection = settings.collection("browses")
    for block_row in range(H // BLOCK):
        for block_col in range(W // BLOCK):
            col, row = (block_col + 0.5) * BLOCK, (block_row + 0.5) * BLOCK
            found = pixel_at(settings.store, collection, item, *ROTATED(col, row))
            assert found is not None, (block_col, block_row)
            red, green, _, alpha = (int(v) for v in found)
            want_red, want_green = block_value(col, row)
            assert alpha == 255
            assert abs(red - want_red) <= 6, (block_col, block_row)
            assert abs(green - want_green) <= 6, (block_col, block_row)
    # just outside the image, beyond its first row: nothing drawn
    outside = pixel_at(settings.store, collection, item, *ROTATED(W / 2, -3 * BLOCK))
    assert outside is None or int(outside[3]) == 0

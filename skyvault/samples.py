"""Generated sample products for the demo and the end-to-end tests (nothing is downloaded).

Two collections: ``demo-scenes`` (3-band uint8 images, one in UTM 32N described by a browse-report
XML, one in EPSG:4326 with a nodata border and its time in a TIFF tag) and ``demo-dem``
(1-band float32 elevation, EPSG:4326 with a nodata hole and a ``/newitem`` JSON sidecar, and a UTM
tile with a JSON sidecar). ``broken=True`` adds a truncated TIFF to show how a bad product fails.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.transform import from_origin

from skyvault.storage.store import ObjectStore

COLLECTIONS: dict[str, dict[str, Any]] = {
    "demo-scenes": {
        "title": "Demo scenes",
        "description": "Generated 3-band 8-bit scenes",
        "license": "CC-BY-4.0",
        "keywords": ["demo", "rgb"],
        "render": {"bands": [1, 2, 3]},
        "min_zoom": 5,
        "max_zoom": 11,
    },
    "demo-dem": {
        "title": "Demo elevation",
        "description": "Generated 32-bit float elevation tiles",
        "license": "CC0-1.0",
        "keywords": ["demo", "elevation"],
        "cog": {"predictor": "FLOATING_POINT", "overview_resampling": "average"},
        "render": {"bands": [1], "rescale": [[0, 1500]], "colormap": "terrain"},
        "min_zoom": 5,
        "max_zoom": 10,
    },
}

UTM_ORIGIN = (600000.0, 5200000.0)  # EPSG:32632, ~10.3E 46.9N
UTM_PIXEL = 60.0
SIZE = 512


def _pattern(bands: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype("float32") / size
    out = []
    for b in range(bands):
        wave = np.sin((xx * (3 + b) + yy * (2 + b)) * np.pi) * 0.5 + 0.5
        out.append(wave * 200 + rng.normal(0, 6, (size, size)) + 20)
    pattern: np.ndarray = np.clip(np.stack(out), 1, 255).astype("uint8")
    return pattern


def _dem(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype("float32") / size
    hill = 1200 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 6) + rng.normal(0, 5, (size, size))
    dem: np.ndarray = hill.astype("float32")[np.newaxis]
    return dem


def _write(
    path: Path, data: np.ndarray, crs: str, transform: Any, nodata: float | None = None, **tags: str
) -> None:
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if tags:
            dst.update_tags(**tags)


BROWSE_REPORT = """<?xml version="1.0" encoding="UTF-8"?>
<rep:browseReport xmlns:rep="http://ngeo.eo.esa.int/ngEO/browseReport/1.0" version="1.3">
  <rep:responsibleOrgName>skyvault demo</rep:responsibleOrgName>
  <rep:dateTime>2026-06-01T12:00:00Z</rep:dateTime>
  <rep:browseType>demo-scenes</rep:browseType>
  <rep:browse>
    <rep:browseIdentifier>S2_UTM_20260601</rep:browseIdentifier>
    <rep:fileName>S2_UTM_20260601.tif</rep:fileName>
    <rep:imageType>GeoTIFF</rep:imageType>
    <rep:referenceSystemIdentifier>EPSG: 32632</rep:referenceSystemIdentifier>
    <rep:modelInGeotiff>true</rep:modelInGeotiff>
    <rep:startTime>2026-06-01T10:20:30Z</rep:startTime>
    <rep:endTime>2026-06-01T10:20:45Z</rep:endTime>
  </rep:browse>
</rep:browseReport>
"""


def write_samples(store: ObjectStore, *, broken: bool = False) -> list[str]:
    """Write the sample products to ``landing/`` in ``store``; returns the keys written."""
    written: list[str] = []
    with tempfile.TemporaryDirectory(prefix="skyvault-samples-") as tmp:
        root = Path(tmp)

        def put(key: str, path: Path) -> None:
            store.put_file(key, path)
            written.append(key)

        def put_text(key: str, text: str) -> None:
            store.put_bytes(key, text.encode("utf-8"))
            written.append(key)

        # demo-scenes: a UTM scene with a browse report
        p = root / "utm.tif"
        _write(p, _pattern(3, SIZE, 1), "EPSG:32632", from_origin(*UTM_ORIGIN, UTM_PIXEL, UTM_PIXEL))
        put("landing/demo-scenes/S2_UTM_20260601.tif", p)
        put_text("landing/demo-scenes/S2_UTM_20260601.xml", BROWSE_REPORT)

        # demo-scenes: an EPSG:4326 scene, nodata border, time only in the TIFF tag
        data = _pattern(3, SIZE, 2)
        data[:, :, :96] = 0
        data[:, -64:, :] = 0
        p = root / "ll.tif"
        _write(
            p,
            data,
            "EPSG:4326",
            from_origin(11.0, 47.5, 0.6 / SIZE, 0.6 / SIZE),
            nodata=0,
            TIFFTAG_DATETIME="2026:06:02 09:15:00",
        )
        put("landing/demo-scenes/LS_4326_20260602.tif", p)

        # demo-dem: an EPSG:4326 tile with a nodata hole and a /newitem JSON sidecar
        dem = _dem(SIZE, 3)
        dem[0, 200:300, 200:300] = -9999.0
        p = root / "dem_ll.tif"
        _write(p, dem, "EPSG:4326", from_origin(10.0, 47.5, 0.5 / SIZE, 0.5 / SIZE), nodata=-9999.0)
        put("landing/demo-dem/DEM_N47E010.tif", p)
        put_text(
            "landing/demo-dem/DEM_N47E010.json",
            json.dumps(
                {
                    "collection_id": "demo-dem",
                    "date": "2026-05-01T00:00:00Z",
                    "name": "DEM_N47E010",
                    "filename": "DEM_N47E010.tif",
                    "stac_api_server": None,
                    "file_source_host": None,
                    "properties": {"platform": "demo", "dem:source": "generated"},
                },
                indent=2,
            ),
        )

        # demo-dem: a UTM tile with a JSON sidecar
        p = root / "dem_utm.tif"
        _write(
            p,
            _dem(SIZE, 4),
            "EPSG:32632",
            from_origin(UTM_ORIGIN[0] + SIZE * UTM_PIXEL, UTM_ORIGIN[1], UTM_PIXEL, UTM_PIXEL),
            nodata=-9999.0,
        )
        put("landing/demo-dem/DEM_UTM32_0001.tif", p)
        put_text(
            "landing/demo-dem/DEM_UTM32_0001.json",
            json.dumps(
                {
                    "collection_id": "demo-dem",
                    "date": "2026-05-02T00:00:00Z",
                    "name": "DEM_UTM32_0001",
                    "filename": "DEM_UTM32_0001.tif",
                    "properties": {"platform": "demo"},
                }
            ),
        )

        if broken:
            p = root / "broken.tif"
            _write(p, _pattern(3, SIZE, 5), "EPSG:4326", from_origin(12.0, 47.0, 0.001, 0.001))
            raw = p.read_bytes()
            p.write_bytes(raw[: len(raw) // 3])
            put("landing/demo-scenes/BROKEN_20260603.tif", p)
    return sorted(written)

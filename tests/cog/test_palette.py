from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp
from rasterio.enums import Resampling as GdalResampling
from rasterio.transform import from_origin
from rio_cogeo.cogeo import cog_validate

from skyvault.cog.convert import preprocess_product
from skyvault.config.collections import CogProfile, CollectionConfig
from skyvault.config.settings import StoreSettings
from skyvault.models import Product

#: Land-cover classes of the source. The palette is a ramp over all 256 entries, so an averaged
#: colour is close to an entry no pixel uses, and averaging indices gives indices in between.
CLASSES = (20, 90, 160, 230)
PALETTE = {i: (i, 255 - i, (3 * i) % 256, 255) for i in range(256)}
SIZE = 1024


def landcover() -> np.ndarray:
    """Blocks of one class, each with a one-pixel checker of the next class."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    block = (rows // 256 + cols // 256) % len(CLASSES)
    checker = (rows + cols) % 2 == 1
    index = np.where(checker, (block + 1) % len(CLASSES), block)
    data: np.ndarray = np.asarray(CLASSES, dtype="uint8")[index]
    return data


def write_paletted(path: Path, *, overviews: bool = False) -> Path:
    """A 1024 x 1024 uint8 land-cover map with a colour table over 10..10.4E, 45.5..45.9N."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": SIZE,
        "height": SIZE,
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:4326",
        "transform": from_origin(10.0, 45.9, 0.4 / SIZE, 0.4 / SIZE),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(landcover(), 1)
        dst.write_colormap(1, PALETTE)
    if overviews:
        with rasterio.open(path, "r+") as dst:
            dst.build_overviews([2, 4, 8], GdalResampling.average)
    return path


def write_two_band_vrt(folder: Path) -> Path:
    """A VRT whose band 1 is a grey ramp and band 2 the paletted land-cover map."""
    paletted = write_paletted(folder / "classes.tif")
    grey = folder / "grey.tif"
    with rasterio.open(paletted) as src:
        profile = src.profile
    profile.update(photometric="MINISBLACK")
    ramp = (np.arange(SIZE * SIZE, dtype="uint32") % 251).astype("uint8").reshape(SIZE, SIZE)
    with rasterio.open(grey, "w", **profile) as dst:
        dst.write(ramp, 1)
        dst.colorinterp = [ColorInterp.gray]
    entries = "".join(f'<Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>' for r, g, b, a in PALETTE.values())

    def band(n: int, name: str, interp: str, table: str = "") -> str:
        return (
            f'<VRTRasterBand dataType="Byte" band="{n}"><ColorInterp>{interp}</ColorInterp>{table}'
            f'<SimpleSource><SourceFilename relativeToVRT="1">{name}</SourceFilename>'
            f"<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>"
        )

    vrt = folder / "stack.vrt"
    vrt.write_text(
        f'<VRTDataset rasterXSize="{SIZE}" rasterYSize="{SIZE}"><SRS>EPSG:4326</SRS>'
        f"<GeoTransform>10.0, {0.4 / SIZE}, 0, 45.9, 0, {-0.4 / SIZE}</GeoTransform>"
        + band(1, "grey.tif", "Gray")
        + band(2, "classes.tif", "Palette", f"<ColorTable>{entries}</ColorTable>")
        + "</VRTDataset>"
    )
    return vrt


def levels(path: Path) -> list[np.ndarray]:
    """The valid pixels of band 1 at full resolution and at every overview level."""
    with rasterio.open(path) as ds:
        count = len(ds.overviews(1))
    out = []
    for level in [None, *range(count)]:
        options = {} if level is None else {"overview_level": level}
        with rasterio.open(path, **options) as ds:
            out.append(ds.read(1, masked=True).compressed())
    return out


def land(store: StoreSettings, collection: str, files: list[Path]) -> Product:
    """Copy the files to the landing zone; the first is the product's source."""
    folder = store.root / "landing" / collection
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, folder / f.name)
    return Product(
        collection=collection, id=files[0].stem, source_key=f"landing/{collection}/{files[0].name}"
    )


@pytest.mark.parametrize("case", ["plain", "reprojected", "source-overviews", "band-selection"])
def test_paletted_raster_stays_categorical(case: str, tmp_path: Path, store: StoreSettings) -> None:
    src_dir = tmp_path / "src"
    settings: dict[str, Any] = {}
    if case == "band-selection":
        vrt = write_two_band_vrt(src_dir)
        files = [vrt, src_dir / "classes.tif", src_dir / "grey.tif"]
        settings["bands"] = [2]
    else:
        files = [write_paletted(src_dir / "classes.tif", overviews=case == "source-overviews")]
    if case == "reprojected":
        settings["target_crs"] = "EPSG:32632"
    if case == "source-overviews":
        # the source's own overviews averaged the classes into ones the map does not have
        source_levels = levels(files[0])
        assert len(source_levels) == 4
        assert not set(np.unique(source_levels[1])) <= set(CLASSES)
    # the default profile (AVERAGE overviews) with small blocks, for several overview levels
    collection = CollectionConfig(id="landcover", cog=CogProfile(blocksize=128), **settings)
    assert collection.cog.overview_resampling == "average"

    info = preprocess_product(land(store, "landcover", files), collection, store, tmp_path / "scratch")

    cog = store.root / info.key
    valid, errors, warns = cog_validate(cog, strict=True, quiet=True)
    assert valid, (errors, warns)
    with rasterio.open(cog) as ds:
        assert ds.colorinterp[0] == ColorInterp.palette
        table = ds.colormap(1)
        if case == "reprojected":
            assert ds.crs == "EPSG:32632"
    assert {i: table[i] for i in range(256)} == PALETTE
    found = levels(cog)
    assert len(found) >= 4, "the COG has overviews"
    for level, values in enumerate(found):
        assert values.size > 0
        unexpected = set(np.unique(values)) - set(CLASSES)
        assert not unexpected, f"level {level} has indices {sorted(unexpected)} the source does not have"

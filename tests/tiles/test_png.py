from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

from skyvault.tiles.png import COMPRESSORS, encode_png


def read_png(data: bytes) -> tuple[np.ndarray, list[ColorInterp]]:
    """Pixels ``(rows, cols, bands)`` and band meanings of a PNG, as GDAL decodes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(data) as mem, mem.open() as ds:
            assert ds.driver == "PNG"
            return np.moveaxis(ds.read(), 0, -1), list(ds.colorinterp)


def textured(rows: int, cols: int, bands: int) -> np.ndarray:
    rng = np.random.default_rng(rows * cols + bands)
    yy, xx = np.mgrid[0:rows, 0:cols]
    smooth = np.stack([(xx * (b + 1) + yy) % 256 for b in range(bands)], axis=-1)
    image = (smooth + rng.integers(0, 8, (rows, cols, bands))).astype("uint8")
    image[..., -1] = np.where(xx < cols // 3, 0, 255)  # alpha: a transparent strip
    return image


@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
@pytest.mark.parametrize(
    ("bands", "meaning"),
    [
        (4, [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]),
        (2, [ColorInterp.gray, ColorInterp.alpha]),
    ],
)
def test_tiles_decode_to_the_pixels_encoded(bands: int, meaning: list[ColorInterp], compressor: str) -> None:
    image = textured(256, 256, bands)
    compress: Callable[[np.ndarray], bytes] = COMPRESSORS[compressor]
    pixels, colorinterp = read_png(encode_png(image, compress=compress))
    assert colorinterp == meaning
    assert pixels.shape == image.shape
    assert (pixels == image).all()


def test_a_window_of_a_larger_image_encodes_as_that_window() -> None:
    block = textured(512, 768, 4)
    window = block[256:512, 256:512]
    pixels, _ = read_png(encode_png(window))
    assert (pixels == window).all()


def test_smooth_tiles_compress_well() -> None:
    image = textured(256, 256, 4)
    image[..., :3] = image[:1, :, :3]  # every row alike, as when zoomed in
    assert len(encode_png(image)) < image.nbytes / 20


@pytest.mark.parametrize(
    "image",
    [np.zeros((8, 8, 3), "uint8"), np.zeros((8, 8, 4), "uint16"), np.zeros((8, 8), "uint8")],
)
def test_other_images_are_refused(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        encode_png(image)

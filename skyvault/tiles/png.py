"""A fast PNG encoder for 8-bit tiles: the *Up* filter on every row, then deflate.

GDAL's PNG driver (libpng) tries all five filters on every row and deflates at zlib level 6,
which makes encoding the larger part of rendering a tile. The *Up* filter (each row minus the one
above) is one vectorised subtraction, and on map tiles, whose rows repeat when zoomed in and vary
smoothly otherwise, it compresses as well as libpng's adaptive choice. Deflate runs in libdeflate
(the copy bundled with rasterio's wheels) when it can be loaded, otherwise in zlib; both release
the GIL, so threads encode in parallel.

The output is a standard PNG (8-bit grey+alpha or RGBA, no interlace) that every decoder reads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import struct
import threading
import zlib
from collections.abc import Callable

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour types by the number of bands (data bands + alpha).
_COLOUR_TYPES = {2: 4, 4: 6}
_FILTER_UP = 2
#: libdeflate's level 1 compresses tiles about as well as zlib's level 6, several times faster.
LIBDEFLATE_LEVEL = 1
ZLIB_LEVEL = 6


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def _libdeflate_candidates() -> list[str]:
    paths: list[str] = []
    try:
        import rasterio

        for root in rasterio.__path__:
            paths += sorted(glob.glob(os.path.join(f"{root}.libs", "libdeflate*.so*")))
    except ImportError:  # pragma: no cover - rasterio is a dependency
        pass
    found = ctypes.util.find_library("deflate")
    if found:
        paths.append(found)
    return paths


class _LibDeflate:
    """zlib-format compression through libdeflate, one compressor per thread (they are not shared)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.libdeflate_alloc_compressor.restype = ctypes.c_void_p
        lib.libdeflate_alloc_compressor.argtypes = [ctypes.c_int]
        lib.libdeflate_free_compressor.restype = None
        lib.libdeflate_free_compressor.argtypes = [ctypes.c_void_p]
        lib.libdeflate_zlib_compress_bound.restype = ctypes.c_size_t
        lib.libdeflate_zlib_compress_bound.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.libdeflate_zlib_compress.restype = ctypes.c_size_t
        lib.libdeflate_zlib_compress.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]
        self._lib = lib
        self._local = threading.local()

    def _compressor(self) -> int:
        handle: int | None = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._lib.libdeflate_alloc_compressor(LIBDEFLATE_LEVEL)
            if not handle:
                raise MemoryError("libdeflate could not allocate a compressor")
            self._local.handle = handle
        return handle

    def compress(self, data: np.ndarray) -> bytes:
        handle = self._compressor()
        bound = self._lib.libdeflate_zlib_compress_bound(handle, data.nbytes)
        out = ctypes.create_string_buffer(bound)
        n = self._lib.libdeflate_zlib_compress(handle, data.ctypes.data, data.nbytes, out, bound)
        if n == 0:  # cannot happen with a buffer of the bound's size
            raise RuntimeError("libdeflate could not compress a tile")
        return out.raw[:n]


def _zlib_compress(data: np.ndarray) -> bytes:
    return zlib.compress(data.data, ZLIB_LEVEL)


def _load_compressors() -> dict[str, Callable[[np.ndarray], bytes]]:
    found: dict[str, Callable[[np.ndarray], bytes]] = {}
    for path in _libdeflate_candidates():
        try:
            found["libdeflate"] = _LibDeflate(ctypes.CDLL(path)).compress
            break
        except (OSError, AttributeError):
            continue
    found["zlib"] = _zlib_compress
    return found


#: The deflate implementations that can encode tiles here, fastest first.
COMPRESSORS = _load_compressors()
#: The one :func:`encode_png` uses by default: ``"libdeflate"`` or ``"zlib"``.
COMPRESSOR = next(iter(COMPRESSORS))
_compress = COMPRESSORS[COMPRESSOR]


def encodable(bands: int, dtype: np.dtype) -> bool:
    """Whether :func:`encode_png` takes an image of ``bands`` bands (alpha included) of ``dtype``."""
    return dtype == np.uint8 and bands in _COLOUR_TYPES


def encode_png(pixels: np.ndarray, *, compress: Callable[[np.ndarray], bytes] | None = None) -> bytes:
    """Encode a ``(rows, cols, bands)`` uint8 array, the last band alpha, as PNG.

    Two bands are grey+alpha, four are RGBA. The array may be a strided view (a window of a larger
    image). ``compress`` (zlib-format deflate of a contiguous uint8 array) defaults to the fastest
    available.

    Raises:
        ValueError: the array is not uint8 with 2 or 4 bands.

    """
    if pixels.ndim != 3 or not encodable(pixels.shape[2], pixels.dtype):
        raise ValueError(f"cannot encode an array of shape {pixels.shape} and dtype {pixels.dtype} as PNG")
    rows, cols, bands = pixels.shape
    lines = pixels.reshape(rows, cols * bands)
    scanlines = np.empty((rows, cols * bands + 1), dtype=np.uint8)
    scanlines[:, 0] = _FILTER_UP
    scanlines[0, 1:] = lines[0]
    np.subtract(lines[1:], lines[:-1], out=scanlines[1:, 1:])
    header = struct.pack(">IIBBBBB", cols, rows, 8, _COLOUR_TYPES[bands], 0, 0, 0)
    body = (compress or _compress)(scanlines)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")

"""Streaming sha256 helpers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO

#: Read size of the helpers: large enough for few calls, small enough to stay in the CPU's cache.
CHUNK = 1024 * 1024


def sha256_stream(stream: IO[bytes], chunk_size: int = CHUNK) -> tuple[str, int]:
    """Hex sha256 and byte count of everything left in ``stream``.

    Streams that can fill a buffer (files, S3 bodies) are read into one reused buffer, so hashing
    allocates no memory per chunk.
    """
    h = hashlib.sha256()
    size = 0
    readinto = getattr(stream, "readinto", None)
    if readinto is None:
        while block := stream.read(chunk_size):
            h.update(block)
            size += len(block)
        return h.hexdigest(), size
    view = memoryview(bytearray(chunk_size))
    while n := readinto(view):
        h.update(view[:n])
        size += n
    return h.hexdigest(), size


def sha256_file(path: Path) -> tuple[str, int]:
    """Hex sha256 and size of a local file."""
    with path.open("rb", buffering=0) as f:
        return sha256_stream(f)

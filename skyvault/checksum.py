"""Streaming sha256 helpers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO

CHUNK = 4 * 1024 * 1024


def sha256_stream(stream: IO[bytes], chunk_size: int = CHUNK) -> tuple[str, int]:
    """Hex sha256 and byte count of everything left in ``stream``."""
    h = hashlib.sha256()
    size = 0
    while block := stream.read(chunk_size):
        h.update(block)
        size += len(block)
    return h.hexdigest(), size


def sha256_file(path: Path) -> tuple[str, int]:
    """Hex sha256 and size of a local file."""
    with path.open("rb") as f:
        return sha256_stream(f)

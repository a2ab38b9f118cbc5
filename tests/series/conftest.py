"""Fixtures shared by the series tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyvault.config.settings import StoreSettings


@pytest.fixture
def store(tmp_path: Path) -> StoreSettings:
    """A local object store in the test's folder."""
    return StoreSettings(root=tmp_path / "store")

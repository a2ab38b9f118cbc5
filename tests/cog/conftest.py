"""Fixtures of the COG tests: a local store and a scratch folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyvault.config.settings import StoreSettings


@pytest.fixture
def store(tmp_path: Path) -> StoreSettings:
    return StoreSettings(root=tmp_path / "store")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    return tmp_path / "scratch"

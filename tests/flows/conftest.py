"""Fixtures for flow tests: a configured environment (store, catalog, collections) per test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from skyvault.config.settings import Settings, StoreSettings, get_settings
from skyvault.samples import COLLECTIONS


def store_as_yaml(store: StoreSettings) -> dict[str, Any]:
    data = store.model_dump(mode="json")
    for secret in ("access_key_id", "secret_access_key"):
        value = getattr(store, secret)
        data[secret] = value.get_secret_value() if value is not None else None
    data["root"] = str(store.root)
    return data


@pytest.fixture
def configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """Write a config file for ``store`` (+ overrides), point SKYVAULT_CONFIG_FILE at it, return settings."""

    def _configure(store: StoreSettings | None = None, **overrides: Any) -> Settings:
        store = store or StoreSettings(root=tmp_path / "store")
        body: dict[str, Any] = {
            "scratch_dir": str(tmp_path / "scratch"),
            "store": store_as_yaml(store),
            "lts": {"root": str(tmp_path / "lts"), "create_root": True},
            "collections": COLLECTIONS,
        }
        body.update(overrides)
        path = tmp_path / "skyvault.yaml"
        path.write_text(yaml.safe_dump(body))
        monkeypatch.setenv("SKYVAULT_CONFIG_FILE", str(path))
        get_settings.cache_clear()
        return get_settings()

    return _configure

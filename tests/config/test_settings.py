from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from skyvault.config.collections import CogProfile, CollectionConfig
from skyvault.config.settings import Settings, get_settings, tag_limits
from skyvault.errors import ConfigError, InvalidIdentifierError, UnknownCollectionError


def test_defaults_are_the_embedded_setup() -> None:
    s = Settings()
    assert s.store.kind == "local"
    assert s.catalog.backend == "static"
    assert s.collections == {}


def test_file_then_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "skyvault.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "store": {"kind": "s3", "bucket": "from-file", "endpoint_url": "http://127.0.0.1:9"},
                "collections": {"s2": {"title": "Sentinel-2", "max_zoom": 9}},
            }
        )
    )
    monkeypatch.setenv("SKYVAULT_CONFIG_FILE", str(cfg))
    s = Settings()
    assert s.store.bucket == "from-file"
    assert s.collection("s2").title == "Sentinel-2"
    assert s.collection("s2").id == "s2"
    monkeypatch.setenv("SKYVAULT_STORE__BUCKET", "from-env")
    monkeypatch.setenv("SKYVAULT_STORE__ACCESS_KEY_ID", "AKID")
    monkeypatch.setenv("SKYVAULT_STORE__SECRET_ACCESS_KEY", "hush")
    s = Settings()
    assert s.store.bucket == "from-env"
    assert s.store.endpoint_url == "http://127.0.0.1:9"
    assert "hush" not in repr(s)
    assert s.store.secret_access_key is not None
    assert s.store.secret_access_key.get_secret_value() == "hush"


def test_get_settings_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYVAULT_SCRATCH_DIR", "/tmp/a")
    first = get_settings()
    monkeypatch.setenv("SKYVAULT_SCRATCH_DIR", "/tmp/b")
    assert get_settings() is first
    get_settings.cache_clear()
    assert get_settings().scratch_dir == Path("/tmp/b")


def test_bad_config_file_is_a_named_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("store: [unclosed")
    monkeypatch.setenv("SKYVAULT_CONFIG_FILE", str(cfg))
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        get_settings()


def test_s3_without_bucket_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYVAULT_STORE__KIND", "s3")
    with pytest.raises(ConfigError, match="bucket"):
        get_settings()


def test_unknown_collection_names_known_ones() -> None:
    s = Settings(collections={"a": {}, "b": {}})
    with pytest.raises(UnknownCollectionError, match=r"'zzz'.*a, b"):
        s.collection("zzz")


def test_unsafe_collection_id_refused() -> None:
    with pytest.raises((InvalidIdentifierError, ValueError)):
        CollectionConfig(id="../etc")


def test_categorical_collections_must_use_nearest_or_mode() -> None:
    with pytest.raises(ValueError, match="categorical"):
        CogProfile(categorical=True, overview_resampling="average")
    ok = CogProfile(categorical=True, overview_resampling="mode", warp_resampling="nearest")
    assert ok.creation_options()["OVERVIEW_RESAMPLING"] == "MODE"
    assert ok.creation_options()["OVERVIEWS"] == "IGNORE_EXISTING"


def test_creation_options_follow_profile() -> None:
    opts = CogProfile(compress="ZSTD", blocksize=256, predictor="YES", level=9).creation_options()
    assert opts["COMPRESS"] == "ZSTD"
    assert opts["BLOCKSIZE"] == "256"
    assert opts["PREDICTOR"] == "YES"
    assert opts["LEVEL"] == "9"
    assert opts["OVERVIEWS"] == "AUTO"
    assert opts["BIGTIFF"] == "IF_SAFER"


def test_io_tags_get_their_default_limits() -> None:
    s = Settings(collections={"a": {}, "b": {}})
    limits = tag_limits(s)
    assert limits["lts-write"] == 4
    assert limits["lts-read"] == 4


@pytest.mark.usefixtures("prefect_harness")
def test_prefect_variables_sit_below_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.variables import Variable

    Variable.set(
        "skyvault_store", {"kind": "s3", "bucket": "from-variable", "region": "eu-west-1"}, overwrite=True
    )
    Variable.set("skyvault_scratch_dir", "/tmp/from-variable", overwrite=True)
    try:
        assert Settings().store.kind == "local"  # variables are only read when asked for
        monkeypatch.setenv("SKYVAULT_PREFECT_VARIABLES", "true")
        s = Settings()
        assert s.store.bucket == "from-variable"
        assert s.scratch_dir == Path("/tmp/from-variable")
        monkeypatch.setenv("SKYVAULT_SCRATCH_DIR", "/tmp/from-env")
        monkeypatch.setenv("SKYVAULT_STORE__BUCKET", "from-env")
        s = Settings()
        assert s.scratch_dir == Path("/tmp/from-env")
        assert s.store.bucket == "from-env"
        assert s.store.region == "eu-west-1"
    finally:
        Variable.unset("skyvault_store")
        Variable.unset("skyvault_scratch_dir")


@pytest.mark.parametrize(
    ("backend", "needs"), [("stac-api", "SKYVAULT_CATALOG__URL"), ("pgstac", "SKYVAULT_CATALOG__DSN")]
)
def test_a_catalog_backend_without_its_address_is_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, backend: str, needs: str
) -> None:
    monkeypatch.setenv("SKYVAULT_CATALOG__BACKEND", backend)
    with pytest.raises(ConfigError, match=needs):
        get_settings()


def test_the_catalog_password_comes_from_its_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "pgstac-password"
    secret.write_text("p@ss word\n", encoding="utf-8")
    monkeypatch.setenv("SKYVAULT_CATALOG__BACKEND", "pgstac")
    monkeypatch.setenv("SKYVAULT_CATALOG__DSN", "postgresql://pgstac_ingest@127.0.0.1:5432/catalog")
    monkeypatch.setenv("SKYVAULT_CATALOG__PASSWORD_FILE", str(secret))
    catalog = get_settings().catalog
    assert catalog.password is not None
    assert catalog.password.get_secret_value() == "p@ss word"
    assert "p@ss" not in repr(catalog)

"""Shared fixtures: clean settings, tiny generated rasters, a moto S3 server, a Prefect harness."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.crs import CRS
from rasterio.transform import from_origin

from skyvault.config.settings import Settings, StoreSettings, get_settings
from skyvault.samples import COLLECTIONS


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No SKYVAULT_* variable from the caller's shell leaks into a test; settings are rebuilt."""
    for name in list(os.environ):
        if name.startswith("SKYVAULT_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def write_raster(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:4326",
    transform: Any = None,
    nodata: float | None = None,
    tags: dict[str, str] | None = None,
) -> Path:
    """Write ``data`` (bands, rows, cols) as a plain (non-COG) GeoTIFF."""
    if data.ndim == 2:
        data = data[np.newaxis]
    count, height, width = data.shape
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": data.dtype.name,
    }
    if crs is not None:
        profile["crs"] = CRS.from_user_input(crs)
    if transform is not None:
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if tags:
            dst.update_tags(**tags)
    return path


@pytest.fixture
def rgb_4326(tmp_path: Path) -> Path:
    """A 3-band uint8 scene in EPSG:4326 over 10..11E, 45..46N, 256x256 px, a gradient."""
    yy, xx = np.mgrid[0:256, 0:256]
    data = np.stack([xx, yy, (xx + yy) // 2]).astype("uint8")
    return write_raster(
        tmp_path / "src" / "rgb_4326.tif",
        data,
        crs="EPSG:4326",
        transform=from_origin(10.0, 46.0, 1 / 256, 1 / 256),
    )


@pytest.fixture
def float_utm(tmp_path: Path) -> Path:
    """A 1-band float32 scene in UTM 32N (EPSG:32632), 300x200 px at 30 m, left quarter nodata."""
    yy, xx = np.mgrid[0:200, 0:300]
    data = (xx * 0.5 + yy).astype("float32")
    data[:, :75] = -9999.0
    return write_raster(
        tmp_path / "src" / "float_utm.tif",
        data,
        crs="EPSG:32632",
        transform=from_origin(500000.0, 5000000.0, 30.0, 30.0),
        nodata=-9999.0,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server over HTTP on loopback for the whole session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_store_settings(moto_endpoint: str, request: pytest.FixtureRequest) -> StoreSettings:
    """Store settings for a fresh, empty bucket on the moto server."""
    import boto3

    bucket = (
        "t-"
        + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
        + "-"
        + os.urandom(3).hex()
    )
    bucket = "".join(c for c in bucket if c.isalnum() or c == "-")[:63]
    boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket=bucket)
    return StoreSettings(
        kind="s3",
        bucket=bucket,
        endpoint_url=moto_endpoint,
        access_key_id="test",
        secret_access_key="test",
    )


@pytest.fixture
def local_settings(tmp_path: Path) -> Settings:
    """Settings for the embedded default in a temporary folder, with no collections."""
    return Settings(
        scratch_dir=tmp_path / "scratch",
        store=StoreSettings(root=tmp_path / "store"),
        lts={"root": tmp_path / "lts", "create_root": True},
    )


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One ephemeral Prefect server (SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        _HARNESS.append(True)
        try:
            yield
        finally:
            _HARNESS.clear()


_HARNESS: list[bool] = []


def release_tag_slots() -> None:
    """Set every tag limit's active slots to 0, as an operator frees a dead run's slots
    (``prefect gcl update tag:<tag> --active-slots 0``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        for limit in client.read_global_concurrency_limits(limit=200):
            if limit.name.startswith("tag:") and limit.active_slots:
                client.update_global_concurrency_limit(
                    limit.name, GlobalConcurrencyLimitUpdate(active_slots=0)
                )


@pytest.fixture(autouse=True)
def _free_tag_slots() -> None:
    """Every test starts with the tag slots free, as on a fresh server.

    Tests that SIGKILL a flow process leave its tag slots taken; a production server's lease
    service gives them back when their leases expire, but the test server runs no such service.
    Tests run one at a time, so no slot is legitimately held between two tests.
    """
    if _HARNESS:
        release_tag_slots()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (the suite runs as root), unmounted after it."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


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


# --- catalog services: PostgreSQL with pgstac, and stac-fastapi-pgstac ---------------------------


@dataclass(frozen=True)
class PgstacServer:
    """A private PostgreSQL cluster on loopback holding a migrated pgstac template database."""

    port: int
    template: str

    def new_database(self, name: str) -> str:
        """A fresh pgstac database copied from the template; returns its DSN."""
        from bench.common import copy_database

        return copy_database(self.port, self.template, name)


@dataclass(frozen=True)
class StacApi:
    """A stac-fastapi-pgstac with transactions on loopback, and the DSN of its pgstac database."""

    url: str
    dsn: str


@pytest.fixture(scope="session")
def pgstac_server() -> Iterator[PgstacServer]:
    """PostgreSQL with PostGIS and pgstac (``pypgstac migrate``) for the whole session."""
    from bench.common import create_database, migrate_pgstac, postgres_cluster

    root = Path(tempfile.mkdtemp(prefix="skyvault-test-pgstac-"))
    os.chmod(root, 0o755)  # the postgres user must reach its data folder
    with postgres_cluster(root / "cluster") as port:
        migrate_pgstac(create_database(port, "pgstac_template"))
        yield PgstacServer(port=port, template="pgstac_template")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pgstac_dsn(pgstac_server: PgstacServer) -> str:
    """The DSN of a fresh, empty pgstac database for one test."""
    return pgstac_server.new_database("t_" + os.urandom(6).hex())


@pytest.fixture(scope="session")
def stac_api(pgstac_server: PgstacServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StacApi]:
    """stac-fastapi-pgstac (transactions enabled) on its own pgstac database, for the whole session.

    Tests share it: each uses collection ids of its own.
    """
    from bench.common import stac_api as start_stac_api

    dsn = pgstac_server.new_database("stac_api")
    with start_stac_api(dsn, tmp_path_factory.mktemp("stac-api") / "api.log") as url:
        yield StacApi(url=url, dsn=dsn)


@pytest.fixture
def own_stac_api(pgstac_dsn: str, tmp_path: Path) -> Iterator[StacApi]:
    """stac-fastapi-pgstac (transactions enabled) on a fresh pgstac database of this test alone."""
    from bench.common import stac_api as start_stac_api

    with start_stac_api(pgstac_dsn, tmp_path / "stac-api.log") as url:
        yield StacApi(url=url, dsn=pgstac_dsn)

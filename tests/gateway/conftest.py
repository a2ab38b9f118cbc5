"""A real gateway process (uvicorn on a free loopback port) over a real Prefect server.

The deployments the gateway starts are registered on the test server against a work pool no
worker polls, so a started run stays Scheduled: tests check which deployment it belongs to and
with which parameters, and drive the product's state by writing its status records.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.deployments.runner import RunnerDeployment
from prefect.settings import get_current_settings
from rasterio.transform import from_origin

from skyvault.config.settings import StoreSettings
from skyvault.flows.ingest import ingest
from skyvault.flows.jobs import archive_job, retrieve_job
from skyvault.flows.process import process_product
from skyvault.samples import COLLECTIONS
from skyvault.storage.store import ObjectStore, open_store
from tests.conftest import write_raster

POOL = "gateway-test-unpolled"
USER, PASSWORD, TOKEN = "scicat", "s3cret-pass", "tok-0123456789"
BODY_LIMIT = 1024 * 1024
COLLECTION = "demo-scenes"


@dataclass
class Gateway:
    """The running gateway: its URL, process, store and deployments (name -> id)."""

    url: str
    process: subprocess.Popen[bytes]
    store_settings: StoreSettings
    deployments: dict[str, str]

    @property
    def store(self) -> ObjectStore:
        return open_store(self.store_settings)

    @property
    def basic(self) -> dict[str, str]:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS for the gateway process")

    def runs_of(self, deployment: str) -> list[Any]:
        """Every flow run of a deployment (``<flow>/<name>``)."""
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[self.deployments[deployment]])
                ),
                limit=200,
            )

    def run(self, run_id: str) -> Any:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(uuid.UUID(run_id))

    def total_runs(self) -> int:
        with get_client(sync_client=True) as client:
            return len(client.read_flow_runs(limit=200))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _register_deployments() -> dict[str, str]:
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
    out: dict[str, str] = {}
    for flow, name in (
        (ingest, "on-request"),
        (process_product, "on-request"),
        (archive_job, "data-catalog"),
        (retrieve_job, "data-catalog"),
    ):
        deployment = flow.to_deployment(name=name, work_pool_name=POOL)
        assert isinstance(deployment, RunnerDeployment)
        deployment_id = deployment.apply()
        out[f"{flow.name}/{name}"] = str(deployment_id)
    return out


def landing_raster(root: Path, name: str) -> Path:
    """A tiny GeoTIFF at ``landing/demo-scenes/<name>`` of the local store under ``root``."""
    data = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    return write_raster(root / "landing" / COLLECTION / name, data, transform=from_origin(10, 46, 0.1, 0.1))


@contextmanager
def gateway_process(
    config: Path, prefect_home: Path, secrets: dict[str, Path], log_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m skyvault.gateway.app`` on a free port with ``config`` and the gateway secrets
    given as files (``{"PASSWORD": path, ...}``); yields its URL and process once it answers."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYVAULT_", "PREFECT_"))}
    env.update(
        PREFECT_API_URL=str(get_current_settings().api.url),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(prefect_home),
        SKYVAULT_CONFIG_FILE=str(config),
        **{f"SKYVAULT_GATEWAY__{name}_FILE": str(path) for name, path in secrets.items()},
    )
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "skyvault.gateway.app", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, log_path.read_text()
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            yield url, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def gateway(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The gateway in its own process, configured with files as in production."""
    folder = tmp_path_factory.mktemp("gateway")
    store = StoreSettings(root=folder / "store")
    (folder / "password").write_text(PASSWORD + "\n")
    (folder / "token").write_text(TOKEN + "\n")
    config = {
        "scratch_dir": str(folder / "scratch"),
        "store": {"kind": "local", "root": str(store.root)},
        "collections": {COLLECTION: COLLECTIONS[COLLECTION]},
        "gateway": {"username": USER, "max_body_bytes": BODY_LIMIT},
    }
    (folder / "skyvault.yaml").write_text(yaml.safe_dump(config))
    deployments = _register_deployments()
    secrets = {"PASSWORD": folder / "password", "TOKEN": folder / "token"}
    with gateway_process(
        folder / "skyvault.yaml", folder / "prefect-home", secrets, folder / "gateway.log"
    ) as (
        url,
        process,
    ):
        yield Gateway(url=url, process=process, store_settings=store, deployments=deployments)

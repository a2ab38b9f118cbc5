"""End to end: the dev environment on Docker work pools, as an operator sets it up and uses it.

One test starts everything on this machine, on loopback only: a private PostgreSQL cluster, a
Prefect server on it, moto's S3 server, and a Docker engine without a bridge (every container uses
the host network). It builds the runtime image (scripts/build-runtime-image.sh), runs the config
job twice (``skyvault-provision --env dev``, the second run changes nothing), deploys prefect.yaml,
starts one Docker worker per pool, and then drives the deployments with ``prefect deployment run``
and the REST API: ingest of sample products from the S3 landing prefix, archive of a dataset to an
LTS folder mounted into the containers, and its retrieval, whose container is killed mid-run and
retried from the API; then the register flow writes the COGs' items into a stac-fastapi-pgstac
that answers its first bulk write with 503, and the task is retried inside the container.
Everything started is stopped by its process or container id at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pystac_client
import pytest
from rasterio.transform import from_origin

from bench.common import free_port, pgstac, postgres, stac_api
from tests.catalog.test_stac_api import FlakyProxy, serve
from tests.conftest import write_raster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("SKYVAULT_CACHE_DIR", ROOT / "skyvault-data" / "cache"))
IMAGE = "skyvault/runtime:dev"  # config/dev.yaml's image
RUNTIME_UID = 10001  # the image's user `skyvault`
POOLS = ("skyvault-ingest", "skyvault-archival", "skyvault-retrieval")
COLLECTION = "e2e-scenes"
DATASET = "ds-e2e"
INTERVAL_MINUTES = 1440
LTS_WRITE_LIMIT = 3
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# --- processes and services ------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes], group: bool = True) -> None:
    """Stop a process this test started (its own process group when ``group``), by its id."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for(what: str, check: Callable[[], Any], timeout: float, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (OSError, urllib.error.URLError, subprocess.SubprocessError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            pytest.fail(f"{what}: not after {timeout:.0f} s\n{tail}")
        time.sleep(0.5)


@dataclass
class Stack:
    """What the test started, and where."""

    tmp: Path
    exits: contextlib.ExitStack
    env: dict[str, str] = field(default_factory=dict)
    api: str = ""
    docker_host: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def start(self, name: str, cmd: list[str], env: dict[str, str], group: bool = True) -> Path:
        log = self.tmp / f"{name}.log"
        out = self.exits.enter_context(log.open("wb"))
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=group
        )
        self.exits.callback(_stop, proc, group)
        return log

    def run(self, cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 600) -> str:
        done = subprocess.run(
            cmd, env=env or self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, (
            f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
        return done.stdout

    def timed(self, name: str, start: float) -> None:
        self.timings[name] = round(time.monotonic() - start, 1)


def _require_system() -> None:
    missing = [tool for tool in ("dockerd", "debootstrap", "runuser") if shutil.which(tool) is None]
    if not sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        missing.append("postgresql")
    if missing:
        pytest.fail(
            f"the Docker end-to-end test needs {missing}: run `make setup-system` (scripts/setup-system.sh)"
        )
    if os.geteuid() != 0:
        pytest.fail("the Docker end-to-end test runs as root: it starts a Docker engine")


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bool(response.status == 200)


def start_prefect_server(stack: Stack) -> None:
    home = stack.tmp / "prefect-server"
    home.mkdir()
    database = stack.exits.enter_context(postgres(stack.tmp / "postgres"))
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": database,
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = stack.start(
        "prefect-server",
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
    )
    stack.api = f"http://127.0.0.1:{port}/api"
    _wait_for("the Prefect server answers", lambda: _healthy(f"{stack.api}/health"), 240, log)


def start_docker_engine(stack: Stack) -> Any:
    import docker  # type: ignore[import-untyped]

    run_dir = stack.tmp / "docker"
    run_dir.mkdir()
    data_root = CACHE / "docker"
    data_root.mkdir(parents=True, exist_ok=True)
    socket = run_dir / "docker.sock"
    stack.docker_host = f"unix://{socket}"
    cmd = [
        "dockerd",
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--data-root",
        str(data_root),
        "--exec-root",
        str(run_dir / "exec"),
        "--pidfile",
        str(run_dir / "docker.pid"),
        "--host",
        stack.docker_host,
    ]
    # after the engine stops: the mounts it leaves (its network namespace, its data root)
    stack.exits.callback(_unmount_under, [run_dir, data_root])
    log = stack.start("dockerd", cmd, {**os.environ}, group=False)

    def connect() -> Any:
        if not socket.exists():
            return None
        try:
            client = docker.DockerClient(base_url=stack.docker_host, timeout=120)
        except docker.errors.DockerException:
            return None
        return client if client.ping() else None

    client = _wait_for("the Docker engine answers", connect, 120, log)
    stack.exits.callback(client.close)
    return client


def _unmount_under(roots: list[Path]) -> None:
    """Unmount what is mounted at or below ``roots`` (deepest first)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if any(point == str(r) or point.startswith(f"{r}/") for r in roots):
            points.append(point)
    for point in sorted(set(points), key=len, reverse=True):
        for _ in range(points.count(point)):
            subprocess.run(["umount", point], check=False, capture_output=True)


# --- S3 -----------------------------------------------------------------------------------------


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="e2e-key",
        aws_secret_access_key="e2e-secret",
    )


def keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    found: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found += [o["Key"] for o in page.get("Contents", [])]
    return sorted(found)


def put_samples(s3: Any, bucket: str, folder: Path) -> dict[str, bytes]:
    """Two tiny scenes under landing/<collection>/ and a small dataset under landing/<dataset>/."""
    yy, xx = np.mgrid[0:64, 0:64]
    for n, west in enumerate((10.0, 10.5)):
        data = np.stack([xx * 4, yy * 4, (xx + yy) * 2]).astype("uint8") + n
        path = write_raster(
            folder / f"SCENE_{n}.tif",
            data,
            crs="EPSG:4326",
            transform=from_origin(west, 46.0, 1 / 128, 1 / 128),
            tags={"TIFFTAG_DATETIME": f"2026:06:0{n + 1} 10:00:00"},
        )
        s3.upload_file(str(path), bucket, f"landing/{COLLECTION}/SCENE_{n}.tif")
    files = {
        "readme.txt": b"an archived dataset\n",
        "data/values.bin": os.urandom(200_000),
        "data/more/notes.json": json.dumps({"dataset": DATASET}).encode(),
    }
    for name, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"landing/{DATASET}/{name}", Body=body)
    return files


# --- the Prefect API ------------------------------------------------------------------------------


def api(stack: Stack, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"{stack.api}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read() or b"null")


def deployment_id(stack: Stack, flow: str, name: str) -> str:
    _, deployment = api(stack, "GET", f"/deployments/name/{flow}/{name}")
    return str(deployment["id"])


def flow_run(stack: Stack, run_id: str) -> dict[str, Any]:
    _, run = api(stack, "GET", f"/flow_runs/{run_id}")
    assert isinstance(run, dict)
    return run


def wait_final(stack: Stack, run_id: str, timeout: float = 600) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        run = flow_run(stack, run_id)
        return run if run["state_type"] in FINAL else None

    result: dict[str, Any] = _wait_for(f"flow run {run_id} ends", final, timeout, stack.tmp / "worker-logs")
    return result


def run_logs(stack: Stack, run_id: str) -> str:
    _, logs = api(stack, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    return "\n".join(entry["message"] for entry in logs)


def runs_report(stack: Stack) -> str:
    """Every flow run that ended other than Completed: name, state and message."""
    _, runs = api(stack, "POST", "/flow_runs/filter", {"limit": 200})
    return "\n".join(
        f"{r['name']}: {r['state_type']} {r['state']['message']}"
        for r in runs
        if r["state_type"] not in ("COMPLETED", "SCHEDULED")
    )


def assert_completed_in_runtime_container(
    stack: Stack, docker_client: Any, run: dict[str, Any], image_id: str
) -> None:
    assert run["state_type"] == "COMPLETED", (
        f"{run['name']}: {run['state_type']} {run['state']['message']}\n{run_logs(stack, run['id'])}\n"
        f"{runs_report(stack)}"
    )
    pid = run["infrastructure_pid"]
    assert pid, f"{run['name']} has no container"
    container = docker_client.containers.get(pid.rsplit(":", 1)[1])
    assert container.image.id == image_id, f"{run['name']} ran in {container.image.tags}, not {IMAGE}"
    assert container.labels["io.prefect.flow-run-id"] == run["id"]
    assert container.attrs["HostConfig"]["NetworkMode"] == "host"
    assert container.attrs["State"]["ExitCode"] == 0


# --- the test -------------------------------------------------------------------------------------


@pytest.fixture
def stack(moto_endpoint: str) -> Iterator[Stack]:
    _require_system()
    tmp = Path(tempfile.mkdtemp(prefix="skyvault-e2e-"))
    os.chmod(tmp, 0o755)
    with contextlib.ExitStack() as exits:
        exits.callback(shutil.rmtree, tmp, ignore_errors=True)
        stack = Stack(tmp=tmp, exits=exits)
        exits.callback(lambda: print(f"\ne2e timings (s): {stack.timings}"))
        yield stack


def test_the_dev_environment_runs_every_flow_in_docker_work_pools(stack: Stack, moto_endpoint: str) -> None:
    started = time.monotonic()
    t = time.monotonic()
    start_prefect_server(stack)
    docker_client = start_docker_engine(stack)
    stack.timed("services", t)

    # every container this test's runs start is removed at the end, by id
    stack.exits.callback(_remove_run_containers, docker_client)

    t = time.monotonic()
    # the wheels are fetched by the interpreter this environment was made from, which has pip and
    # uv (make setup-python installs uv there); the environment itself has neither
    base_python = str(Path(sys.base_prefix) / "bin" / "python3")
    build_env = {
        **os.environ,
        "DOCKER_HOST": stack.docker_host,
        "SKYVAULT_IMAGE": IMAGE,
        "PYTHON": base_python,
    }
    out = stack.run([str(ROOT / "scripts" / "build-runtime-image.sh")], env=build_env, timeout=1800)
    assert out.strip().splitlines()[-1] == IMAGE
    image = docker_client.images.get(IMAGE)
    assert image.attrs["Config"]["User"] == "skyvault"
    stack.timed("image", t)

    # --- the store, LTS and scratch folders, secret files -------------------------------------
    bucket = f"skyvault-e2e-{uuid.uuid4().hex[:8]}"
    s3 = s3_client(moto_endpoint)
    s3.create_bucket(Bucket=bucket)
    originals = put_samples(s3, bucket, stack.tmp / "samples")
    lts = stack.tmp / "lts"
    scratch = stack.tmp / "scratch"
    for folder in (lts, scratch):
        folder.mkdir()
        os.chown(folder, RUNTIME_UID, RUNTIME_UID)
    secrets = stack.tmp / "secrets"
    secrets.mkdir(mode=0o700)
    secret_env: dict[str, str] = {}
    for setting, value in {
        "STORE__ACCESS_KEY_ID": "e2e-key",
        "STORE__SECRET_ACCESS_KEY": "e2e-secret",
        "DATA_CATALOG__PASSWORD": "e2e-catalog",
    }.items():
        path = secrets / setting.lower()
        path.write_text(value + "\n")
        secret_env[f"SKYVAULT_{setting}_FILE"] = str(path)

    job_volumes = [f"{scratch}:/scratch"]
    lts_volumes = [*job_volumes, f"{lts}:{lts}"]
    overrides = {
        "SKYVAULT_PROVISION__SETTINGS__STORE__BUCKET": bucket,
        "SKYVAULT_PROVISION__SETTINGS__STORE__ENDPOINT_URL": moto_endpoint,
        "SKYVAULT_PROVISION__SETTINGS__LTS__ROOT": str(lts),
        "SKYVAULT_PROVISION__SETTINGS__LTS__DATABLOCK_BYTES": "150000",
        "SKYVAULT_PROVISION__SETTINGS__DATA_CATALOG__URL": "null",
        "SKYVAULT_PROVISION__SETTINGS__CONCURRENCY__TAG_LIMITS__LTS_WRITE": str(LTS_WRITE_LIMIT),
        "SKYVAULT_PROVISION__SETTINGS__COLLECTIONS": json.dumps(
            {
                COLLECTION: {
                    "title": "e2e scenes",
                    "min_zoom": 5,
                    "max_zoom": 7,
                    "render": {"bands": [1, 2, 3]},
                }
            }
        ),
        "SKYVAULT_PROVISION__WORK_POOLS__SKYVAULT_INGEST__JOB_VARIABLES__VOLUMES": json.dumps(job_volumes),
        "SKYVAULT_PROVISION__WORK_POOLS__SKYVAULT_ARCHIVAL__JOB_VARIABLES__VOLUMES": json.dumps(lts_volumes),
        "SKYVAULT_PROVISION__WORK_POOLS__SKYVAULT_RETRIEVAL__JOB_VARIABLES__VOLUMES": json.dumps(lts_volumes),
    }
    for pool in POOLS:  # keep the containers to check what ran in them; removed at the end
        key = pool.upper().replace("-", "_")
        overrides[f"SKYVAULT_PROVISION__WORK_POOLS__{key}__JOB_VARIABLES__AUTO_REMOVE"] = "false"
    stack.env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SKYVAULT_")},
        **overrides,
        **secret_env,
        "PREFECT_API_URL": stack.api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DOCKER_HOST": stack.docker_host,
    }

    # --- the config job, twice ----------------------------------------------------------------
    t = time.monotonic()
    provision = [str(VENV_BIN / "skyvault-provision"), "--env", "dev"]
    first = stack.run(provision)
    assert "create work pool skyvault-archival" in first
    assert "e2e-secret" not in first
    second = stack.run(provision)
    assert second.splitlines()[0] == "no changes", second
    stack.timed("provision", t)

    # --- deploy prefect.yaml --------------------------------------------------------------------
    t = time.monotonic()
    deploy_env = {**stack.env, "SKYVAULT_INGEST_INTERVAL_MINUTES": str(INTERVAL_MINUTES)}
    stack.run([str(VENV_BIN / "prefect"), "--no-prompt", "deploy", "--all"], env=deploy_env)
    _, deployments = api(stack, "POST", "/deployments/filter", {"limit": 50})
    by_name = {(d["name"], d["work_pool_name"]): d for d in deployments}
    assert len(deployments) == 13
    assert {pool for _, pool in by_name} == set(POOLS)
    for d in deployments:
        assert d["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/skyvault"}}
        ]
        assert "e2e-secret" not in json.dumps(d)
    stack.timed("deploy", t)

    # the deployment concurrency limit and the schedule of the landing-zone poll
    landing = by_name[("landing-zone", "skyvault-ingest")]
    assert landing["global_concurrency_limit"]["limit"] == 1
    assert landing["global_concurrency_limit"]["active"] is True
    assert landing["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    (schedule,) = landing["schedules"]
    assert schedule["schedule"]["rrule"].splitlines()[-1] == f"FREQ=MINUTELY;INTERVAL={INTERVAL_MINUTES}"
    assert schedule["active"] is True
    # the tag limits, with the configured values
    _, limits = api(stack, "POST", "/v2/concurrency_limits/filter", {"limit": 200})
    tag_limits = {gcl["name"]: gcl["limit"] for gcl in limits if gcl["name"].startswith("tag:")}
    assert {gcl["name"]: gcl["limit"] for gcl in limits}[f"deployment:{landing['id']}"] == 1
    assert tag_limits["tag:lts-write"] == LTS_WRITE_LIMIT
    assert tag_limits["tag:object-store-write"] == 8  # config/dev.yaml
    assert tag_limits["tag:lts-read"] == 4  # the default

    # --- one worker per pool ------------------------------------------------------------------
    worker_env = {**stack.env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    for pool in POOLS:
        stack.start(
            f"worker-{pool}",
            [str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "docker"],
            worker_env,
        )
    image_id = image.id

    # --- ingest through `prefect deployment run` ----------------------------------------------
    t = time.monotonic()
    out = stack.run(
        [
            str(VENV_BIN / "prefect"),
            "deployment",
            "run",
            "ingest/on-request",
            "--param",
            f"collection={COLLECTION}",
        ]
    )
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out
    ingest = wait_final(stack, match.group(1))
    assert_completed_in_runtime_container(stack, docker_client, ingest, image_id)
    assert ingest["state"]["name"] == "Completed", ingest["state"]  # not Partial
    stack.timed("ingest", t)

    cogs = [k for k in keys(s3, bucket, f"cogs/{COLLECTION}/") if k.endswith(".tif")]
    assert cogs == [f"cogs/{COLLECTION}/SCENE_0.tif", f"cogs/{COLLECTION}/SCENE_1.tif"]
    for key in cogs:
        local = stack.tmp / Path(key).name
        s3.download_file(bucket, key, str(local))
        from rio_cogeo.cogeo import cog_validate

        valid, errors, _ = cog_validate(str(local), strict=True)
        assert valid, f"{key}: {errors}"
    for product in ("SCENE_0", "SCENE_1"):
        item = json.loads(
            s3.get_object(Bucket=bucket, Key=f"catalog/{COLLECTION}/{product}/{product}.json")["Body"].read()
        )
        assert item["id"] == product
        assert item["collection"] == COLLECTION
        status = json.loads(
            s3.get_object(Bucket=bucket, Key=f"status/{COLLECTION}/{product}.json")["Body"].read()
        )
        assert status["state"] == "done", status
    tiles = [k for k in keys(s3, bucket, f"tiles/{COLLECTION}/") if k.endswith(".png")]
    zooms = {int(k.split("/")[-3]) for k in tiles}
    assert zooms == {5, 6, 7}, tiles
    assert any(k.endswith("tilejson.json") for k in keys(s3, bucket, f"tiles/{COLLECTION}/"))

    # --- archive through the REST API, with an idempotency key ---------------------------------
    t = time.monotonic()
    archive_deployment = deployment_id(stack, "archive", "on-request")
    body = {"parameters": {"dataset_id": DATASET}, "idempotency_key": f"archive/{DATASET}/e2e"}
    status, archive_run = api(stack, "POST", f"/deployments/{archive_deployment}/create_flow_run", body)
    assert status == 201
    status, again = api(stack, "POST", f"/deployments/{archive_deployment}/create_flow_run", body)
    assert status == 200
    assert again["id"] == archive_run["id"]
    archived = wait_final(stack, archive_run["id"])
    assert_completed_in_runtime_container(stack, docker_client, archived, image_id)
    stack.timed("archive", t)

    manifest = json.loads((lts / DATASET / "manifest.json").read_text())
    assert manifest["file_count"] == len(originals)
    assert len(manifest["datablocks"]) >= 2  # 150 kB datablocks
    for block in manifest["datablocks"]:
        tar = lts / DATASET / block["name"]
        assert hashlib.sha256(tar.read_bytes()).hexdigest() == block["sha256"]
        assert tar.stat().st_size == block["size"]
    assert keys(s3, bucket, f"landing/{DATASET}/") == []  # deleted once verified

    # --- retrieve, killed mid-run, retried from the API -----------------------------------------
    t = time.monotonic()
    retrieve_deployment = deployment_id(stack, "retrieve", "on-request")
    lock_file = lts / ".locks" / f"retrieve-{DATASET}.lock"
    lock_file.parent.mkdir(exist_ok=True)
    os.chown(lock_file.parent, RUNTIME_UID, RUNTIME_UID)
    with lock_file.open("a") as held:  # another retrieval of the dataset holds its lock
        os.chown(lock_file, RUNTIME_UID, RUNTIME_UID)
        fcntl.flock(held, fcntl.LOCK_EX)
        body = {"parameters": {"dataset_id": DATASET}, "idempotency_key": f"retrieve/{DATASET}/e2e"}
        _, retrieve_run = api(stack, "POST", f"/deployments/{retrieve_deployment}/create_flow_run", body)
        run_id = retrieve_run["id"]

        def running_container() -> Any:
            run = flow_run(stack, run_id)
            if run["state_type"] != "RUNNING" or not run["infrastructure_pid"]:
                return None
            return docker_client.containers.get(run["infrastructure_pid"].rsplit(":", 1)[1])

        container = _wait_for("the retrieval runs in its container", running_container, 300)
        time.sleep(3)  # inside the run, waiting for the dataset's lock
        container.kill()  # docker kill: SIGKILL
        crashed = wait_final(stack, run_id, 120)
        assert crashed["state_type"] == "CRASHED", crashed["state"]
        container.reload()
        assert container.attrs["State"]["ExitCode"] == 137
        fcntl.flock(held, fcntl.LOCK_UN)

    status, _ = api(
        stack,
        "POST",
        f"/flow_runs/{run_id}/set_state",
        {
            "state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "retried by the operator"},
            "force": True,
        },
    )
    assert status in (200, 201)
    retrieved = wait_final(stack, run_id)
    assert_completed_in_runtime_container(stack, docker_client, retrieved, image_id)
    assert retrieved["infrastructure_pid"].rsplit(":", 1)[1] != container.id
    assert retrieved["run_count"] >= 2
    stack.timed("retrieve", t)

    retrieval = keys(s3, bucket, f"retrieval/{DATASET}/")
    blocks = {b["name"]: b for b in manifest["datablocks"]}
    assert {Path(k).name for k in retrieval if k.endswith(".tar")} == set(blocks)
    restored: dict[str, bytes] = {}
    for name, block in blocks.items():
        body_bytes = s3.get_object(Bucket=bucket, Key=f"retrieval/{DATASET}/{name}")["Body"].read()
        assert hashlib.sha256(body_bytes).hexdigest() == block["sha256"]
        with tarfile.open(fileobj=io.BytesIO(body_bytes)) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    restored[member.name] = extracted.read()
    assert sorted(restored.values()) == sorted(originals.values())
    assert any(k.endswith("download.sh") for k in retrieval)

    # --- register into a STAC API that is unavailable once: the task retries in its container ----
    t = time.monotonic()
    catalog_dsn = stack.exits.enter_context(pgstac(stack.tmp / "pgstac"))
    stac_url = stack.exits.enter_context(stac_api(catalog_dsn, stack.tmp / "stac-api.log"))
    proxy = FlakyProxy(stac_url)
    proxy.fail_bulk = 1  # the first bulk write is answered 503
    proxy_url = stack.exits.enter_context(serve(proxy.handler()))
    _, pool = api(stack, "GET", "/work_pools/skyvault-ingest")
    pool_env = pool["base_job_template"]["variables"]["properties"]["env"]["default"]
    register_deployment = deployment_id(stack, "register", "on-request")
    body = {
        "parameters": {"collection": COLLECTION},
        "job_variables": {
            "env": {
                **pool_env,  # a run's env replaces the pool's default: keep it
                "SKYVAULT_CATALOG__BACKEND": "stac-api",
                "SKYVAULT_CATALOG__URL": proxy_url,
                "SKYVAULT_CATALOG__MAX_ATTEMPTS": "1",  # the client gives up at once: the task retries
            }
        },
    }
    _, register_run = api(stack, "POST", f"/deployments/{register_deployment}/create_flow_run", body)
    registered = wait_final(stack, register_run["id"])
    assert_completed_in_runtime_container(stack, docker_client, registered, image_id)
    assert proxy.unavailable == 1
    _, task_runs = api(
        stack, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [register_run["id"]]}}, "limit": 50}
    )
    (write,) = [r for r in task_runs if r["name"].startswith("register-cogs")]
    assert write["state_type"] == "COMPLETED"
    assert write["run_count"] == 2, write  # failed once (503), retried by the task policy, in the container
    found = pystac_client.Client.open(stac_url).search(collections=[COLLECTION], max_items=None)
    assert sorted(i.id for i in found.items()) == ["SCENE_0", "SCENE_1"]
    stack.timed("register", t)

    # the nightly catalog backup is deployed paused: the catalog of this environment is not pgstac
    (backup_schedule,) = by_name[("nightly", "skyvault-ingest")]["schedules"]
    assert backup_schedule["active"] is False

    # every flow run of the test, the product subflows included, ended Completed
    _, runs = api(stack, "POST", "/flow_runs/filter", {"limit": 200})
    ended = {r["name"]: r["state_type"] for r in runs if r["state_type"] != "SCHEDULED"}
    assert len(ended) == 6, ended  # ingest, its 2 process-product runs, archive, retrieve, register
    assert set(ended.values()) == {"COMPLETED"}, ended
    stack.timed("total", started)


def _remove_run_containers(docker_client: Any) -> None:
    """Remove the flow-run containers the workers started for this test (by their ids)."""
    for container in docker_client.containers.list(all=True, filters={"label": "io.prefect.flow-run-id"}):
        with contextlib.suppress(Exception):
            container.remove(force=True)

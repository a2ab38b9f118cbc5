"""Gateway throughput: skyvault-api's endpoints against Prefect's own API, at 50 concurrent clients.

    uv run --frozen python -m bench.gateway [--clients 50] [--requests 500] [--reps 3]
        [--database postgres|sqlite] [--api-url URL]

A Prefect server is started on 127.0.0.1 (a private PostgreSQL cluster by default, as in
production; ``--database sqlite`` for the embedded default, ``--api-url`` for a running one). A
setup child registers ``ingest/on-request`` and ``process-product/on-request`` against a work pool
no worker polls (so every run stays Scheduled), writes a few tiny GeoTIFFs into the landing folder
of a temporary local store, creates a ``process-product`` run per status product and writes the
products' status records. The gateway then runs as ``python -m skyvault.gateway.app`` (uvicorn,
its shipped settings) on a free loopback port.

Each repetition runs every side below in rotating order; each side sends ``--requests`` requests
from ``--clients`` concurrent clients (one httpx connection each, opened and kept alive before
the clock starts; the same client code for the gateway and for Prefect):

* gateway GET: ``GET /products/{collection}/{id}`` over the status products (status record read
  from the store plus the run lookup on the Prefect API);
* Prefect run lookup: ``POST /api/flow_runs/filter`` with the body the gateway's lookup sends;
* gateway newitem: ``POST /newitem``, every request distinct (sidecar, record, one new run each);
* Prefect create_flow_run: ``POST /api/deployments/{id}/create_flow_run`` of the same deployment,
  a distinct idempotency key per request (what the gateway calls last);
* gateway newitem resent / Prefect create_flow_run resent: the same requests as sent once before
  the repetitions, again (the idempotent path: every answer names the first run).

After every side the bench counts the ingest deployment's runs: a distinct side must add exactly
one run per request, a resent side none, and the answers must name distinct runs (resent: the
first ones); anything else fails the bench. Cells are medians over the repetitions with the range
(min-max); the table goes to ``bench/out/gateway.md`` and stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    Samples,
    add_server_arguments,
    cell,
    free_port,
    machine_line,
    markdown_table,
    prefect_server,
    ratio,
    rotation,
    run_child,
    server_label,
    stop_group,
    write_report,
)

COLLECTION = "bench-scenes"
POOL = "bench-gateway-unpolled"
USER, PASSWORD, TOKEN = "bench", "bench-password", "bench-token-0123456789"
#: Landing rasters (``L000.tif``...): the products with status records the GET side reads, and
#: the files the /newitem requests name.
PRODUCTS = LANDING_FILES = 8
INGEST = "ingest/on-request"
PROCESS_PRODUCT = "process-product/on-request"


# --- the setup child: the only process here that imports Prefect and skyvault ----------------------


def child_setup(root: str) -> None:
    """Register the deployments, write landing rasters, runs and status records; print the ids."""
    import datetime as dt
    import uuid

    import numpy as np
    import rasterio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import RunnerDeployment
    from rasterio.transform import from_origin

    from skyvault.config.settings import get_settings
    from skyvault.flows.ingest import ingest
    from skyvault.flows.process import process_product
    from skyvault.models import Product, ProductStatus
    from skyvault.status import write_status

    settings = get_settings()
    folder = Path(root) / "store" / "landing" / COLLECTION
    folder.mkdir(parents=True, exist_ok=True)
    data = np.arange(3 * 16 * 16, dtype=np.uint8).reshape(3, 16, 16)
    for i in range(LANDING_FILES):
        with rasterio.open(
            folder / f"L{i:03d}.tif",
            "w",
            driver="GTiff",
            width=16,
            height=16,
            count=3,
            dtype="uint8",
            crs="EPSG:4326",
            transform=from_origin(10 + i, 46, 0.01, 0.01),
        ) as dst:
            dst.write(data)

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
    deployments: dict[str, str] = {}
    for flow, name in ((ingest, "on-request"), (process_product, "on-request")):
        deployment = flow.to_deployment(name=name, work_pool_name=POOL)
        if not isinstance(deployment, RunnerDeployment):
            raise SystemExit(f"{flow.name}/{name}: not a runner deployment")
        deployments[f"{flow.name}/{name}"] = str(deployment.apply())

    states = ("running", "failed", "done")
    with get_client(sync_client=True) as client:
        for i in range(PRODUCTS):
            product_id = f"L{i:03d}"
            product = Product(
                collection=COLLECTION, id=product_id, source_key=f"landing/{COLLECTION}/{product_id}.tif"
            )
            run = client.create_flow_run_from_deployment(
                uuid.UUID(deployments[PROCESS_PRODUCT]),
                parameters={"product": product.model_dump(mode="json"), "replace": False},
                name=f"process-product/{COLLECTION}/{product_id}",
            )
            state = states[i % len(states)]
            write_status(
                ProductStatus(
                    collection=COLLECTION,
                    product_id=product_id,
                    state=state,
                    step="register" if state == "done" else "preprocess",
                    message="bench record",
                    flow_run_id=str(run.id),
                    cog_key=f"cogs/{COLLECTION}/{product_id}.tif",
                    updated_at=dt.datetime.now(dt.UTC),
                ),
                settings.store,
            )
    print(json.dumps({"deployments": deployments}))


# --- load generation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One HTTP request of a side."""

    method: str
    path: str
    body: dict[str, Any] | None = None


@dataclass
class Round:
    """One side's requests at one repetition: wall seconds, latencies and answers in request order."""

    wall: float
    latencies: list[float]
    answers: list[Any]

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall

    def quantile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))
        return ordered[index] * 1000


async def _drive(
    base_url: str, headers: dict[str, str], health: str, calls: list[Call], clients: int
) -> Round:
    """Send ``calls`` from ``clients`` concurrent clients, each on its own kept-alive connection."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    pool = [
        httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=300)
        for _ in range(clients)
    ]
    latencies = [0.0] * len(calls)
    answers: list[Any] = [None] * len(calls)
    work = iter(enumerate(calls))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for n, call in work:
            start = time.perf_counter()
            response = await client.request(call.method, call.path, json=call.body)
            latencies[n] = time.perf_counter() - start
            if response.status_code >= 300:
                raise SystemExit(
                    f"{call.method} {base_url}{call.path} answered {response.status_code}: "
                    f"{response.text[:500]}"
                )
            answers[n] = response.json()

    try:
        # connections open before the clock starts
        await asyncio.gather(*(c.get(health) for c in pool))
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in pool))
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.aclose() for c in pool))
    return Round(wall=wall, latencies=latencies, answers=answers)


# --- the parent -----------------------------------------------------------------------------------------


@dataclass
class Side:
    """One row: who is called, with what, and what it measured."""

    label: str
    rate: Samples = field(default_factory=Samples)
    p50: Samples = field(default_factory=Samples)
    p99: Samples = field(default_factory=Samples)
    cpu_ms: Samples = field(default_factory=Samples)


@dataclass
class Bench:
    """What the sides need: the two services, the deployments and the store."""

    gateway: str
    api: str
    deployments: dict[str, str]
    store: Path
    clients: int
    requests: int
    gateway_headers: dict[str, str]

    def drive(self, target: str, calls: list[Call]) -> Round:
        if target == "gateway":
            return asyncio.run(_drive(self.gateway, self.gateway_headers, "/health", calls, self.clients))
        return asyncio.run(_drive(self.api, {}, "health", calls, self.clients))

    def ingest_runs(self) -> int:
        """Flow runs of the ingest deployment on the Prefect server."""
        body = {"deployments": {"id": {"any_": [self.deployments[INGEST]]}}}
        response = httpx.post(f"{self.api}flow_runs/count", json=body, timeout=120)
        response.raise_for_status()
        return int(response.json())

    def record_run(self, request_id: str) -> str:
        """The run a ``/newitem`` request's record names (``gateway/newitem/<id>.json``)."""
        path = self.store / "gateway" / "newitem" / f"{request_id}.json"
        return str(json.loads(path.read_text(encoding="utf-8"))["flow_run_id"])


def newitem_calls(tag: str, count: int) -> list[Call]:
    """``count`` distinct ``/newitem`` requests (each its own product, so its own run)."""
    return [
        Call(
            "POST",
            "/newitem",
            {
                "collection_id": COLLECTION,
                "name": f"{tag}-{i:06d}",
                "filename": f"L{i % LANDING_FILES:03d}.tif",
                "date": "2026-01-15T10:00:00Z",
                "properties": {"platform": "bench", "sequence": i},
            },
        )
        for i in range(count)
    ]


def create_calls(deployment_id: str, tag: str, count: int) -> list[Call]:
    """``count`` create_flow_run requests with distinct idempotency keys, as the gateway sends them."""
    calls = []
    for i in range(count):
        report = f"landing/{COLLECTION}/{tag}-{i:06d}.json"
        body = {
            "parameters": {"report": report},
            "state": {"type": "SCHEDULED", "name": "Scheduled"},
            "tags": [],
            "name": f"ingest/{report}",
            "idempotency_key": f"bench-gateway/{INGEST}/{tag}-{i:06d}",
        }
        calls.append(Call("POST", f"deployments/{deployment_id}/create_flow_run", body))
    return calls


def product_calls(count: int) -> list[Call]:
    return [Call("GET", f"/products/{COLLECTION}/L{i % PRODUCTS:03d}") for i in range(count)]


def lookup_calls(count: int) -> list[Call]:
    """The run lookup the gateway's GET makes (``PrefectRuns.latest_named``), sent directly."""
    return [
        Call(
            "POST",
            "flow_runs/filter",
            {
                "flow_runs": {"name": {"any_": [f"process-product/{COLLECTION}/L{i % PRODUCTS:03d}"]}},
                "sort": "START_TIME_DESC",
                "limit": 20,
            },
        )
        for i in range(count)
    ]


def run_side(
    bench: Bench, name: str, rep: int, resend: dict[str, list[Call]], first: dict[str, list[str]]
) -> Round:
    """Send one side's requests and check what they did to the server's runs."""
    n = bench.requests
    before = bench.ingest_runs()
    if name == "gateway GET":
        result = bench.drive("gateway", product_calls(n))
        if any(a["collection"] != COLLECTION or not a["flow_run_id"] for a in result.answers):
            raise SystemExit("gateway GET: an answer without the product's run")
        expected_new = 0
    elif name == "Prefect run lookup":
        result = bench.drive("prefect", lookup_calls(n))
        if any(len(a) != 1 for a in result.answers):
            raise SystemExit("Prefect run lookup: an answer without exactly the product's run")
        expected_new = 0
    elif name == "gateway newitem":
        result = bench.drive("gateway", newitem_calls(f"g{rep}", n))
        runs = {bench.record_run(a["id"]) for a in result.answers}
        if len(runs) != n:
            raise SystemExit(f"gateway newitem: {n} distinct requests, {len(runs)} distinct runs")
        expected_new = n
    elif name == "Prefect create_flow_run":
        result = bench.drive("prefect", create_calls(bench.deployments[INGEST], f"p{rep}", n))
        if len({a["id"] for a in result.answers}) != n:
            raise SystemExit("Prefect create_flow_run: answers do not name distinct runs")
        expected_new = n
    elif name == "gateway newitem resent":
        result = bench.drive("gateway", resend["gateway"])
        if [bench.record_run(a["id"]) for a in result.answers] != first["gateway"]:
            raise SystemExit("gateway newitem resent: a resent request does not name its first run")
        expected_new = 0
    else:
        result = bench.drive("prefect", resend["prefect"])
        if [a["id"] for a in result.answers] != first["prefect"]:
            raise SystemExit("Prefect create_flow_run resent: an answer does not name the first run")
        expected_new = 0
    made = bench.ingest_runs() - before
    if made != expected_new:
        raise SystemExit(f"{name}: {made} ingest runs created for {expected_new} distinct requests")
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def gateway_process(root: Path, api_url: str, startup_seconds: float = 120) -> Iterator[tuple[str, int]]:
    """``python -m skyvault.gateway.app`` on a free loopback port, secrets from files.

    Yields its URL and its process id.
    """
    (root / "password").write_text(PASSWORD + "\n")
    (root / "token").write_text(TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYVAULT_", "PREFECT_"))}
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(root / "gateway-prefect-home"),
        SKYVAULT_CONFIG_FILE=str(root / "skyvault.yaml"),
        SKYVAULT_GATEWAY__PASSWORD_FILE=str(root / "password"),
        SKYVAULT_GATEWAY__TOKEN_FILE=str(root / "token"),
    )
    port = free_port()
    log_path = root / "gateway.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "skyvault.gateway.app", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + startup_seconds
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the gateway did not start:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.2)
            yield url, proc.pid
        finally:
            stop_group(proc)


def write_config(root: Path) -> Path:
    """The skyvault config the setup child and the gateway read."""
    path = root / "skyvault.yaml"
    body = {
        "scratch_dir": str(root / "scratch"),
        "store": {"kind": "local", "root": str(root / "store")},
        "collections": {COLLECTION: {"title": "Benchmark scenes", "render": {"bands": [1, 2, 3]}}},
        "gateway": {"username": USER},
    }
    path.write_text(json.dumps(body, indent=2))  # JSON is YAML
    return path


SIDES = (
    Side("gateway GET /products/{collection}/{id}"),
    Side("Prefect POST /api/flow_runs/filter (the GET's run lookup)"),
    Side("gateway POST /newitem, distinct requests"),
    Side("Prefect POST create_flow_run, distinct keys"),
    Side("gateway POST /newitem, resent requests"),
    Side("Prefect POST create_flow_run, resent keys"),
)
NAMES = (
    "gateway GET",
    "Prefect run lookup",
    "gateway newitem",
    "Prefect create_flow_run",
    "gateway newitem resent",
    "Prefect create_flow_run resent",
)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the markdown table and writes ``bench/out/gateway.md``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=500, help="requests per side and repetition")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (>= 3 for a range)")
    add_server_arguments(parser)
    parser.set_defaults(database="postgres")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_setup(*args.child[1:])
        return 0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a terminated run still stops its services
    sides = dict(zip(NAMES, SIDES, strict=True))
    machine = machine_line()
    with tempfile.TemporaryDirectory(prefix="skyvault-bench-gateway-") as tmp:
        root = Path(tmp)
        config = write_config(root)
        with prefect_server(args.api_url, args.database) as api_url:
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith(("SKYVAULT_", "PREFECT_"))},
                "PREFECT_API_URL": api_url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_HOME": str(root / "setup-prefect-home"),
                "SKYVAULT_CONFIG_FILE": str(config),
            }
            setup = run_child([sys.executable, "-m", "bench.gateway", "--child", "setup", str(root)], env=env)
            deployments: dict[str, str] = setup.report()["deployments"]
            with gateway_process(root, api_url) as (gateway_url, gateway_pid):
                token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                bench = Bench(
                    gateway=gateway_url,
                    api=api_url.rstrip("/") + "/",
                    deployments=deployments,
                    store=root / "store",
                    clients=args.clients,
                    requests=args.requests,
                    gateway_headers={"Authorization": f"Basic {token}"},
                )
                print(
                    f"gateway at {gateway_url}; {args.clients} clients, {args.requests} requests", flush=True
                )
                total_distinct = 0
                # untimed: the requests the resent sides send again, and a round of the reads
                resend = {
                    "gateway": newitem_calls("resend", args.requests),
                    "prefect": create_calls(deployments[INGEST], "resend", args.requests),
                }
                made = bench.drive("gateway", resend["gateway"])
                first = {
                    "gateway": [bench.record_run(a["id"]) for a in made.answers],
                    "prefect": [a["id"] for a in bench.drive("prefect", resend["prefect"]).answers],
                }
                total_distinct += 2 * args.requests
                bench.drive("gateway", product_calls(2 * args.clients))
                bench.drive("prefect", lookup_calls(2 * args.clients))
                for rep in range(args.reps):
                    for name in rotation(NAMES, rep):
                        side = sides[name]
                        cpu = cpu_seconds(gateway_pid)
                        result = run_side(bench, name, rep, resend, first)
                        if name.startswith("gateway"):
                            side.cpu_ms.add((cpu_seconds(gateway_pid) - cpu) * 1000 / args.requests)
                        if name in ("gateway newitem", "Prefect create_flow_run"):
                            total_distinct += args.requests
                        side.rate.add(result.rate)
                        side.p50.add(result.quantile_ms(0.50))
                        side.p99.add(result.quantile_ms(0.99))
                        print(
                            f"  rep {rep + 1} {name:32s} {result.rate:8.1f} req/s  "
                            f"p50 {result.quantile_ms(0.5):7.1f} ms  p99 {result.quantile_ms(0.99):7.1f} ms",
                            flush=True,
                        )
                found = bench.ingest_runs()
                if found != total_distinct:
                    raise SystemExit(
                        f"{found} ingest runs on the server, {total_distinct} distinct requests sent"
                    )
                print(f"{found} ingest runs for {total_distinct} distinct requests: none lost, none doubled")
    write_report("gateway", render(args, sides, machine))
    return 0


def render(args: argparse.Namespace, sides: dict[str, Side], machine: str) -> str:
    """The markdown table and the gateway/Prefect ratios."""
    rows = [
        [
            side.label,
            str(args.requests),
            cell(side.rate, 0),
            cell(side.p50, 1),
            cell(side.p99, 1),
            cell(side.cpu_ms, 2),
        ]
        for side in sides.values()
    ]

    pairs = (
        ("GET /products vs its run lookup", "gateway GET", "Prefect run lookup"),
        ("POST /newitem vs create_flow_run, distinct", "gateway newitem", "Prefect create_flow_run"),
        (
            "POST /newitem vs create_flow_run, resent",
            "gateway newitem resent",
            "Prefect create_flow_run resent",
        ),
    )
    lines = [
        "### Gateway: skyvault-api against Prefect's own API",
        "",
        f"`python -m bench.gateway --clients {args.clients} --requests {args.requests} --reps {args.reps} "
        f"--database {args.database}`; Prefect server on {server_label(args.api_url, args.database)}; "
        f"{machine} at the start",
        "",
        markdown_table(
            ["row", "requests", "req/s", "p50 ms", "p99 ms", "gateway CPU ms/request"], rows, numeric_from=1
        ),
        "",
    ]
    for label, gateway, prefect in pairs:
        lines.append(
            f"- {label}: gateway/Prefect req/s {ratio(sides[gateway].rate, sides[prefect].rate)}, "
            f"p50 latency {ratio(sides[gateway].p50, sides[prefect].p50)}"
        )
    end = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += ["", f"Load average at the end: {end}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

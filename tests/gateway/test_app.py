"""The gateway against a real Prefect server: each request starts the right run once, or nothing."""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.states import Crashed

from skyvault.config.settings import LimitSettings
from skyvault.discovery.landing import products_from_report
from skyvault.discovery.reports import parse_browse_report
from skyvault.models import ProductStatus, StatusState
from skyvault.samples import COLLECTIONS
from skyvault.status import write_status
from tests.discovery.test_reports import BILLION_LAUGHS, RECTIFIED, browse, report
from tests.gateway.conftest import BODY_LIMIT, COLLECTION, Gateway, landing_raster

MB = 1024 * 1024


def post(gw: Gateway, path: str, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    return httpx.post(
        f"{gw.url}{path}", headers=headers if headers is not None else gw.basic, timeout=30, **kw
    )


def get(gw: Gateway, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{gw.url}{path}", headers=gw.basic, params=params, timeout=30)


def landing_keys(gw: Gateway) -> set[str]:
    return {info.key for info in gw.store.list("landing/")}


# --- data-catalog jobs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "deployment"),
    [("archive", "archive-job/data-catalog"), ("retrieve", "retrieve-job/data-catalog")],
)
def test_a_job_starts_its_deployment_once_and_answers_with_the_run(
    gateway: Gateway, kind: str, deployment: str
) -> None:
    job_id = f"job-{kind}-{uuid.uuid4().hex[:8]}"
    datasets = ["20.500.12269/abc", {"pid": "20.500.12269/def", "files": [{"path": "a.dat"}]}]
    body = {"id": job_id, "type": kind, "datasetList": datasets, "jobParams": {"ignored": True}}

    first = post(gateway, "/jobs", json=body)
    assert first.status_code == 201, first.text
    answer = first.json()
    assert answer["jobId"] == job_id
    assert answer["name"] == f"{kind}-job/{job_id}"

    run = gateway.run(answer["uuid"])
    assert str(run.deployment_id) == gateway.deployments[deployment]
    assert run.parameters == {"job_id": job_id, "datasets": datasets}

    # the catalog resends the job (a timeout on its side): same run, no second one
    again = post(gateway, "/jobs", json=body, headers=gateway.bearer)
    assert again.status_code == 201, again.text
    assert again.json()["uuid"] == answer["uuid"]
    assert [str(r.id) for r in gateway.runs_of(deployment) if r.parameters.get("job_id") == job_id] == [
        answer["uuid"]
    ]


# --- credentials and malformed requests ----------------------------------------------------------


def test_no_or_wrong_credentials_are_refused_and_start_nothing(gateway: Gateway) -> None:
    landing_raster(gateway.store_settings.root, "NOAUTH_1.tif")
    before_runs, before_keys = gateway.total_runs(), landing_keys(gateway)
    job = {"id": "job-noauth", "type": "archive", "datasetList": ["p1"]}
    item = {"collection_id": COLLECTION, "name": "NOAUTH_1", "filename": "NOAUTH_1.tif"}
    wrong_basic = {"Authorization": "Basic " + "c2NpY2F0Ondyb25n"}  # scicat:wrong
    for headers in ({}, wrong_basic, {"Authorization": "Bearer not-the-token"}):
        for path, body in (("/jobs", job), ("/newitem", item)):
            answer = post(gateway, path, headers=headers, json=body)
            assert answer.status_code == 401, answer.text
            assert "Basic" in answer.headers["www-authenticate"]
        assert (
            httpx.get(
                f"{gateway.url}/products", params={"collection": COLLECTION}, headers=headers
            ).status_code
            == 401
        )
    assert gateway.total_runs() == before_runs
    assert landing_keys(gateway) == before_keys


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/jobs", {"id": "j1", "type": "delete", "datasetList": ["p"]}, "type"),
        ("/jobs", {"id": "j1", "type": "archive"}, "datasetList"),
        ("/jobs", {"id": 7, "type": "archive", "datasetList": ["p"]}, "id"),
        ("/jobs", {"id": "j1", "type": "archive", "datasetList": [{"files": []}]}, "datasetList"),
        ("/jobs", {"id": "j1", "type": "archive", "datasetList": []}, "datasetList"),
        ("/newitem", {"collection_id": "no-such-collection", "name": "X_1"}, "collection_id"),
        ("/newitem", {"name": "X_1"}, "collection_id"),
        ("/newitem", {"collection_id": COLLECTION, "name": 12}, "name"),
        ("/newitem", {"collection_id": COLLECTION, "name": "X_1", "date": "yesterday"}, "date"),
        ("/newitem", {"collection_id": COLLECTION, "filename": "../etc/passwd.tif"}, "filename"),
        ("/newitem", {"collection_id": COLLECTION, "filename": "MISSING_1.tif"}, "filename"),
        ("/newitem", {"collection_id": COLLECTION, "name": "X_1", "properties": [1]}, "properties"),
    ],
)
def test_malformed_requests_name_the_field_and_start_nothing(
    gateway: Gateway, path: str, body: dict[str, Any], field: str
) -> None:
    before_runs, before_keys = gateway.total_runs(), landing_keys(gateway)
    answer = post(gateway, path, json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
    assert field in answer.json()["detail"]
    assert gateway.total_runs() == before_runs
    assert landing_keys(gateway) == before_keys


def test_unknown_collection_and_missing_query_fields_are_named(gateway: Gateway) -> None:
    answer = get(gateway, "/products/no-such-collection/X_1")
    assert answer.status_code == 404
    assert answer.json()["field"] == "collection"
    assert "no-such-collection" in answer.json()["detail"]
    answer = get(gateway, "/products", collection="no-such-collection", state="failed")
    assert (answer.status_code, answer.json()["field"]) == (404, "collection")
    answer = get(gateway, "/products", collection=COLLECTION, state="lost")
    assert (answer.status_code, answer.json()["field"]) == (422, "state")
    answer = get(gateway, "/status")
    assert (answer.status_code, answer.json()["field"]) == (422, "id")
    answer = get(gateway, "/status", id=str(uuid.uuid4()))
    assert answer.status_code == 404


# --- the STAC pipeline API ---------------------------------------------------------------------


def record(
    gw: Gateway, product_id: str, state: StatusState, step: str, message: str = "", **fields: Any
) -> None:
    write_status(
        ProductStatus(
            collection=COLLECTION,
            product_id=product_id,
            state=state,
            step=step,
            message=message,
            updated_at=dt.datetime.now(dt.UTC),
            **fields,
        ),
        gw.store_settings,
    )


def test_newitem_writes_a_sidecar_ingest_reads_and_starts_ingest_once(gateway: Gateway) -> None:
    landing_raster(gateway.store_settings.root, "scenes/NEWITEM_1.tif")
    body = {
        "collection_id": COLLECTION,
        "date": "2026-06-01T10:00:00Z",
        "name": "NEWITEM_1",
        "filename": "scenes/NEWITEM_1.tif",
        "stac_api_server": "http://127.0.0.1:1/stac",
        "properties": {"platform": "demo-sat"},
    }
    first = post(gateway, "/newitem", json=body)
    assert first.status_code == 200, first.text
    assert first.json()["msg"] == "received"
    request_id = str(uuid.UUID(first.json()["id"]))

    # the discovery the ingest run uses finds exactly this product in the sidecar
    runs = [
        r for r in gateway.runs_of("ingest/on-request") if r.parameters["report"].endswith("/NEWITEM_1.json")
    ]
    assert len(runs) == 1
    report_key = runs[0].parameters["report"]
    assert runs[0].parameters == {"report": report_key}
    found = products_from_report(gateway.store_settings, {COLLECTION: _collection()}, report_key)
    assert not found.failures
    [product] = found.products
    assert (product.id, product.source_key) == ("NEWITEM_1", f"landing/{COLLECTION}/scenes/NEWITEM_1.tif")
    assert product.datetime == dt.datetime(2026, 6, 1, 10, tzinfo=dt.UTC)
    assert product.properties["platform"] == "demo-sat"

    again = post(gateway, "/newitem", json=body, headers=gateway.bearer)
    assert again.json() == {"id": request_id, "msg": "received"}
    assert len([r for r in gateway.runs_of("ingest/on-request") if r.parameters["report"] == report_key]) == 1


def _collection() -> Any:
    from skyvault.config.collections import CollectionConfig

    return CollectionConfig(id=COLLECTION, **COLLECTIONS[COLLECTION])


def test_status_and_products_follow_a_product_through_its_steps(gateway: Gateway) -> None:
    landing_raster(gateway.store_settings.root, "STEPS_1.tif")
    answer = post(gateway, "/newitem", json={"collection_id": COLLECTION, "filename": "STEPS_1.tif"})
    request_id = answer.json()["id"]

    def status() -> tuple[str, str, str]:
        words = get(gateway, "/status", id=request_id).json()
        assert words["_id"] == request_id
        assert words["_param"]["filename"] == "STEPS_1.tif"
        return words["_operation"], words["_status"], words["_description"]

    def product() -> dict[str, Any]:
        view = get(gateway, f"/products/{COLLECTION}/STEPS_1")
        assert view.status_code == 200, view.text
        answer: dict[str, Any] = view.json()
        return answer

    assert status()[:2] == ("GETCOLLECTION", "ok")  # the ingest run is scheduled
    assert get(gateway, f"/products/{COLLECTION}/STEPS_1").status_code == 404  # nothing known yet

    run_id = str(uuid.uuid4())
    record(gateway, "STEPS_1", "running", "preprocess", flow_run_id=run_id)
    assert status()[:2] == ("TRANF_COG", "ok")
    assert (product()["state"], product()["step"]) == ("running", "preprocess")

    record(
        gateway,
        "STEPS_1",
        "running",
        "register",
        flow_run_id=run_id,
        cog_key=f"cogs/{COLLECTION}/STEPS_1.tif",
    )
    assert status()[:2] == ("CREATEPYSTACITEM", "ok")

    why = f"product {COLLECTION}/STEPS_1: the catalog refused the item"
    record(gateway, "STEPS_1", "failed", "register", why, flow_run_id=run_id)
    assert status() == ("CREATEPYSTACITEM", "error", why)
    view = product()
    assert (view["state"], view["failed_step"], view["message"]) == ("failed", "register", why)
    assert view["links"]["run"].endswith(f"/runs/flow-run/{run_id}")
    failed = get(gateway, "/products", collection=COLLECTION, state="failed").json()
    assert "STEPS_1" in [v["id"] for v in failed]

    record(gateway, "STEPS_1", "running", "seed", flow_run_id=run_id)
    assert status()[:2] == ("UPLOAD_COG_TO_SERVER", "ok")
    cog_key = f"cogs/{COLLECTION}/STEPS_1.tif"
    record(
        gateway,
        "STEPS_1",
        "done",
        "register",
        "converted",
        flow_run_id=run_id,
        cog_key=cog_key,
        item_href="http://127.0.0.1:1/i.json",
    )
    assert status()[:2] == ("PROCESS FINISHED", "ok")
    view = product()
    assert (view["state"], view["failed_step"]) == ("done", None)
    assert view["links"]["cog"] == gateway.store.url(cog_key)
    assert view["links"]["item"] == "http://127.0.0.1:1/i.json"
    assert "STEPS_1" not in [
        v["id"] for v in get(gateway, "/products", collection=COLLECTION, state="failed").json()
    ]
    assert "STEPS_1" in [
        v["id"] for v in get(gateway, "/products", collection=COLLECTION, state="done").json()
    ]

    everything = get(gateway, "/status/all").json()
    mine = [w for w in everything if w["_id"] == request_id]
    assert [w["_operation"] for w in mine] == ["PROCESS FINISHED"]


def test_a_record_left_running_by_a_crashed_run_reads_as_failed(gateway: Gateway) -> None:
    landing_raster(gateway.store_settings.root, "CRASH_1.tif")
    retry = post(gateway, f"/products/{COLLECTION}/CRASH_1/retry")
    assert retry.status_code == 202, retry.text
    run_id = retry.json()["flow_run_id"]
    assert get(gateway, f"/products/{COLLECTION}/CRASH_1").json()["state"] == "queued"
    time.sleep(0.05)
    record(gateway, "CRASH_1", "running", "preprocess", flow_run_id=run_id)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(uuid.UUID(run_id), Crashed(message="process killed"), force=True)
    view = get(gateway, f"/products/{COLLECTION}/CRASH_1").json()
    assert (view["state"], view["failed_step"]) == ("failed", "preprocess")
    assert "Crashed" in view["message"]
    assert "process killed" in view["message"]


def test_retry_starts_process_product_once_for_a_failed_product(gateway: Gateway) -> None:
    landing_raster(gateway.store_settings.root, "RETRY_1.tif")
    landing_raster(gateway.store_settings.root, "RETRY_2.tif")
    record(gateway, "RETRY_1", "failed", "preprocess", "product demo-scenes/RETRY_1: broken")
    first = post(gateway, f"/products/{COLLECTION}/RETRY_1/retry")
    assert first.status_code == 202, first.text
    run = gateway.run(first.json()["flow_run_id"])
    assert str(run.deployment_id) == gateway.deployments["process-product/on-request"]
    assert run.parameters["product"]["id"] == "RETRY_1"
    assert run.parameters["product"]["source_key"] == f"landing/{COLLECTION}/RETRY_1.tif"
    assert run.parameters["replace"] is False
    again = post(gateway, f"/products/{COLLECTION}/RETRY_1/retry")
    assert again.json()["flow_run_id"] == first.json()["flow_run_id"]
    assert len([r for r in gateway.runs_of("process-product/on-request") if r.name.endswith("/RETRY_1")]) == 1
    queued = get(gateway, "/products", collection=COLLECTION, state="queued").json()
    assert "RETRY_1" in [v["id"] for v in queued]
    assert "RETRY_2" not in [v["id"] for v in queued]

    missing = post(gateway, f"/products/{COLLECTION}/NOT_THERE/retry")
    assert missing.status_code == 404
    assert "NOT_THERE" in missing.json()["detail"]


# --- browse reports ------------------------------------------------------------------------------


def test_a_browse_report_is_stored_ingested_once_and_answered_per_browse(gateway: Gateway) -> None:
    landing_raster(gateway.store_settings.root, "BROWSE_A.tif")
    xml = report(
        browse("BROWSE_A.tif", RECTIFIED, identifier="BROWSE_A"),
        browse("BROWSE_MISSING.tif", RECTIFIED, identifier="BROWSE_MISSING"),
        browse("BROWSE_A.tif", RECTIFIED, identifier="BROWSE_BAD", start="2026-06-02T00:00:00Z"),
    )
    answer = post(gateway, "/browse-reports", params={"collection": COLLECTION}, content=xml)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "partial"
    results = {r["identifier"]: r for r in body["ingestionResult"]}
    assert results["BROWSE_A"]["status"] == "success"
    assert results["BROWSE_MISSING"]["status"] == "failure"
    assert results["BROWSE_MISSING"]["error"]["exceptionCode"] == "FileNotFound"
    assert results["BROWSE_BAD"]["error"]["exceptionCode"] == "ValidationError"
    assert "endTime" in results["BROWSE_BAD"]["error"]["exceptionMessage"]

    key = body["reportKey"]
    assert gateway.store.get_bytes(key) == xml
    assert (
        parse_browse_report(gateway.store.get_bytes(key), key, limits=LimitSettings()).browse_type
        == "OPTICAL"
    )
    run = gateway.run(body["flowRunId"])
    assert str(run.deployment_id) == gateway.deployments["ingest/on-request"]
    assert run.parameters == {"report": key}

    again = post(gateway, "/browse-reports", params={"collection": COLLECTION}, content=xml).json()
    assert again["flowRunId"] == body["flowRunId"]
    assert len([r for r in gateway.runs_of("ingest/on-request") if r.parameters["report"] == key]) == 1

    good = report(browse("BROWSE_A.tif", RECTIFIED, identifier="BROWSE_A"), date_time="2026-06-03T00:00:00Z")
    assert (
        post(gateway, "/browse-reports", params={"collection": COLLECTION}, content=good).json()["status"]
        == "success"
    )


def test_a_report_nothing_can_come_from_and_an_unknown_collection_are_refused(gateway: Gateway) -> None:
    before_runs, before_keys = gateway.total_runs(), landing_keys(gateway)
    xml = report(browse("NOWHERE.tif", RECTIFIED, identifier="NOWHERE"))
    answer = post(gateway, "/browse-reports", params={"collection": COLLECTION}, content=xml)
    assert answer.status_code == 422
    assert answer.json()["ingestionResult"][0]["error"]["exceptionCode"] == "FileNotFound"
    answer = post(gateway, "/browse-reports", content=xml)  # browseType OPTICAL is no collection
    assert (answer.status_code, answer.json()["field"]) == (422, "collection")
    assert gateway.total_runs() == before_runs
    assert landing_keys(gateway) == before_keys


# --- hostile bodies -----------------------------------------------------------------------------


def test_an_entity_bomb_is_refused_without_expanding_it(gateway: Gateway) -> None:
    before_runs, before_keys, rss = gateway.total_runs(), landing_keys(gateway), gateway.rss_bytes()
    answer = post(gateway, "/browse-reports", params={"collection": COLLECTION}, content=BILLION_LAUGHS)
    assert answer.status_code == 422
    assert "DTD" in answer.json()["detail"]
    assert gateway.rss_bytes() - rss < 20 * MB
    assert gateway.total_runs() == before_runs
    assert landing_keys(gateway) == before_keys


def _send_raw(gw: Gateway, head: bytes, chunks: Any) -> tuple[bytes, int]:
    """Send a request head and then body chunks until the server answers or closes.

    Returns the answer and how many body bytes were sent before it came.
    """
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        answer = bytearray()
        done = threading.Event()

        def read() -> None:
            try:
                while chunk := sock.recv(65536):
                    answer.extend(chunk)
            except OSError:
                pass
            done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        sent = 0
        try:
            for chunk in chunks:
                if done.is_set() or b"\r\n\r\n" in answer:
                    break
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server closed the connection: it refused the rest
        deadline = time.monotonic() + 30
        while not done.is_set() and not _complete(bytes(answer)) and time.monotonic() < deadline:
            time.sleep(0.01)
        return bytes(answer), sent


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_100_mb_body_is_refused_fast_with_bounded_memory(gateway: Gateway, declared: bool) -> None:
    before_runs, before_keys, rss = gateway.total_runs(), landing_keys(gateway), gateway.rss_bytes()
    total, piece = 100 * MB, b"x" * (256 * 1024)
    auth = gateway.basic["Authorization"]
    if declared:
        head = (
            f"POST /newitem HTTP/1.1\r\nHost: gw\r\nAuthorization: {auth}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {total}\r\n\r\n"
        )
        chunks: Any = (piece for _ in range(total // len(piece)))
    else:
        head = (
            f"POST /browse-reports?collection={COLLECTION} HTTP/1.1\r\nHost: gw\r\n"
            f"Authorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunks = (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(total // len(piece)))
    answer, sent = _send_raw(gateway, head.encode(), chunks)
    assert sent < total // 2, "the gateway read the body on past its limit"
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"413", answer[:300]
    detail = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert detail["field"] == "body"
    assert str(BODY_LIMIT) in detail["detail"]
    assert gateway.rss_bytes() - rss < 20 * MB
    assert gateway.total_runs() == before_runs
    assert landing_keys(gateway) == before_keys
    assert gateway.process.poll() is None

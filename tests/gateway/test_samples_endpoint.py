"""``POST /series/{source}/samples`` on a real gateway process: the batch lands once, one run ingests it."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
)
from prefect.client.schemas.objects import State
from prefect.deployments.runner import RunnerDeployment
from prefect.flow_engine import run_flow
from prefect.states import Failed

from skyvault.config.settings import SeriesSettings, Settings, StoreSettings, get_settings
from skyvault.flows.series import ingest_samples
from skyvault.series.samples import SampleIngestReport
from skyvault.storage.store import ObjectStore, open_store
from tests.gateway.conftest import PASSWORD, POOL, TOKEN, USER, gateway_process
from tests.series.common import (
    SOURCE,
    csv_bytes,
    fixture_json,
    jsonl,
    make_samples,
    new_nodes,
    stored_rows,
    table_artifact,
)

OTHER_SOURCE = "lab"
BODY_LIMIT = 64 * 1024
FILE_LIMIT = 48 * 1024
START = dt.datetime(2026, 5, 4, tzinfo=dt.UTC)


@dataclass
class SamplesGateway:
    url: str
    deployment_id: str
    config: Path
    store_settings: StoreSettings
    series: SeriesSettings

    @property
    def store(self) -> ObjectStore:
        return open_store(self.store_settings)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def post(
        self,
        body: bytes,
        content_type: str | None,
        source: str = SOURCE,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        sent = dict(self.auth if headers is None else headers)
        if content_type is not None:
            sent["Content-Type"] = content_type
        return httpx.post(f"{self.url}/series/{source}/samples", content=body, headers=sent, timeout=60)

    def runs(self) -> list[Any]:
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.deployment_id])),
                limit=200,
            )

    def landed(self) -> dict[str, bytes]:
        return {o.key: self.store.get_bytes(o.key) for o in self.store.list("landing/samples/")}


@pytest.fixture(scope="module")
def gateway(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SamplesGateway]:
    """A gateway with series sources ``office`` and ``lab`` (SQLite sample store) and the
    ``ingest-samples/on-request`` deployment on a pool no worker polls."""
    folder = tmp_path_factory.mktemp("samples-gateway")
    store = StoreSettings(root=folder / "store")
    series = SeriesSettings(
        sqlite_path=folder / "samples.sqlite3",
        max_file_bytes=FILE_LIMIT,
        sources={SOURCE: {"cache_levels": ["60 s | daily"]}, OTHER_SOURCE: {}},
    )
    (folder / "password").write_text(PASSWORD + "\n")
    (folder / "token").write_text(TOKEN + "\n")
    config = {
        "scratch_dir": str(folder / "scratch"),
        "store": {"kind": "local", "root": str(store.root)},
        "gateway": {"username": USER, "max_body_bytes": BODY_LIMIT},
        "series": series.model_dump(mode="json"),
    }
    (folder / "skyvault.yaml").write_text(yaml.safe_dump(config))
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
    deployment = ingest_samples.to_deployment(name="on-request", work_pool_name=POOL)
    assert isinstance(deployment, RunnerDeployment)
    deployment_id = str(deployment.apply())
    secrets = {"PASSWORD": folder / "password", "TOKEN": folder / "token"}
    with gateway_process(
        folder / "skyvault.yaml", folder / "prefect-home", secrets, folder / "gateway.log"
    ) as (url, _):
        yield SamplesGateway(
            url=url,
            deployment_id=deployment_id,
            config=folder / "skyvault.yaml",
            store_settings=store,
            series=series,
        )


@pytest.fixture
def flow_settings(gateway: SamplesGateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """This process configured as the gateway is, so a flow run executed here sees its store and database."""
    monkeypatch.setenv("SKYVAULT_CONFIG_FILE", str(gateway.config))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def execute(run_id: str) -> tuple[State[Any], SampleIngestReport]:
    """Run the scheduled flow run ``run_id`` here, as a worker would; its final state and report."""
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(uuid.UUID(run_id))
    state = run_flow(ingest_samples, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
    assert isinstance(state, State), state
    report = state.result(raise_on_failure=False)
    assert isinstance(report, SampleIngestReport), report
    return state, report


BAD = {"co2_ppm": "lots"}


def _jsonl(samples: list[dict[str, Any]]) -> tuple[bytes, int]:
    """JSON lines with an invalid sample as the third line; that line's number."""
    return jsonl([*samples[:2], {**samples[2], **BAD}, *samples[3:]]), 3


def _csv(samples: list[dict[str, Any]]) -> tuple[bytes, int]:
    """CSV (header on line 1) with an invalid sample as the third row, on line 4."""
    return csv_bytes([*samples[:2], {**samples[2], **BAD}, *samples[3:]]), 4


def _fixture(samples: list[dict[str, Any]]) -> tuple[bytes, int]:
    """A fixture dump whose first entry (starting on line 2, after ``[``) is invalid."""
    body = fixture_json([{**samples[0], **BAD}, *samples[1:]])
    assert body.decode().splitlines()[1].strip() == "{"
    return body, 2


FORMATS: dict[str, tuple[str, str, Callable[[list[dict[str, Any]]], tuple[bytes, int]], int]] = {
    "ndjson": ("application/x-ndjson", ".jsonl", _jsonl, 2),
    "jsonl": ("application/jsonl; charset=utf-8", ".jsonl", _jsonl, 2),
    "csv": ("text/csv", ".csv", _csv, 2),
    "fixture": ("application/json", ".json", _fixture, 0),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_batch_lands_unchanged_starts_one_run_and_its_samples_are_stored(
    gateway: SamplesGateway, flow_settings: Settings, fmt: str
) -> None:
    content_type, extension, encode, bad_index = FORMATS[fmt]
    nodes = new_nodes(2)
    samples = make_samples(np.random.default_rng(7), nodes, START, 3600, step=300)
    body, bad_line = encode(samples)
    expected_key = f"landing/samples/{SOURCE}/gateway-{hashlib.sha256(body).hexdigest()}{extension}"

    first = gateway.post(body, content_type)
    assert first.status_code == 202, first.text
    answer = first.json()
    assert answer["source"] == SOURCE
    assert answer["key"] == expected_key
    assert gateway.store.get_bytes(expected_key) == body

    mine = [r for r in gateway.runs() if r.parameters.get("keys") == [expected_key]]
    assert len(mine) == 1
    assert mine[0].parameters == {"source": SOURCE, "keys": [expected_key]}
    assert answer["run"]["id"] == str(mine[0].id)
    assert answer["run"]["state"] == "Scheduled"
    assert answer["status_url"] == f"/series/{SOURCE}/samples/runs/{mine[0].id}"

    again = gateway.post(body, content_type)
    assert again.status_code == 202, again.text
    assert (again.json()["key"], again.json()["run"]["id"]) == (expected_key, answer["run"]["id"])
    assert len([r for r in gateway.runs() if r.parameters.get("keys") == [expected_key]]) == 1
    assert [k for k, data in gateway.landed().items() if data == body] == [expected_key]

    state, report = execute(answer["run"]["id"])
    assert state.is_completed(), state.message
    valid = [s for n, s in enumerate(samples) if n != bad_index]
    assert (report.inserted, report.duplicate, report.rejected) == (len(valid), 0, 1)
    rows = {(r[0], r[1]): r[2:] for r in stored_rows(gateway.series) if r[0] in nodes}
    assert rows == {
        (s["node"], s["timestamp_s"]): (
            s["co2_ppm"],
            s["temperature_celsius"],
            s["rel_humidity_percent"],
            s["status"],
        )
        for s in valid
    }
    rejected = table_artifact(answer["run"]["id"], "ingest-samples-rejections")
    assert [(r["file"], r["line"]) for r in rejected] == [(expected_key, bad_line)]
    assert "co2_ppm 'lots' is not a number" in rejected[0]["reason"]

    status = httpx.get(f"{gateway.url}{answer['status_url']}", headers=gateway.auth, timeout=30)
    assert status.status_code == 200, status.text
    seen = status.json()
    assert seen["keys"] == [expected_key]
    assert (seen["run"]["id"], seen["run"]["state_type"]) == (answer["run"]["id"], "COMPLETED")
    assert f"{len(valid)} inserted" in seen["run"]["message"]
    assert "1 rejected" in seen["run"]["message"]

    # posted once more after its run: the same run, and the database is unchanged
    late = gateway.post(body, content_type)
    assert late.json()["run"]["id"] == answer["run"]["id"]
    assert late.json()["run"]["state_type"] == "COMPLETED"
    assert {(r[0], r[1]): r[2:] for r in stored_rows(gateway.series) if r[0] in nodes} == rows


def test_a_batch_whose_run_failed_starts_a_new_run_when_posted_again(gateway: SamplesGateway) -> None:
    body = jsonl(make_samples(np.random.default_rng(11), new_nodes(1), START, 1800, step=300, keep=1.0))
    first = gateway.post(body, "application/x-ndjson").json()
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(uuid.UUID(first["run"]["id"]), Failed(message="database down"), force=True)

    second = gateway.post(body, "application/x-ndjson").json()
    assert second["key"] == first["key"]
    assert second["run"]["id"] != first["run"]["id"]
    third = gateway.post(body, "application/x-ndjson").json()
    assert third["run"]["id"] == second["run"]["id"]
    mine = [r for r in gateway.runs() if r.parameters.get("keys") == [first["key"]]]
    assert {str(r.id) for r in mine} == {first["run"]["id"], second["run"]["id"]}
    assert all(r.parameters == {"source": SOURCE, "keys": [first["key"]]} for r in mine)


def test_refused_batches_name_the_problem_and_store_and_start_nothing(gateway: SamplesGateway) -> None:
    good = jsonl(make_samples(np.random.default_rng(5), new_nodes(1), START, 600, step=60, keep=1.0))
    plain_array = json.dumps([json.loads(line) for line in good.splitlines()]).encode()
    big = good * (BODY_LIMIT // len(good) + 1)
    many = make_samples(np.random.default_rng(6), new_nodes(1), START, 60 * 400, step=60, keep=1.0)
    per_sample = len(fixture_json(many)) / len(many)
    over_file_limit = fixture_json(many[: int((FILE_LIMIT + BODY_LIMIT) / 2 / per_sample)])
    assert FILE_LIMIT < len(over_file_limit) <= BODY_LIMIT < len(big)
    before_runs, before_files = len(gateway.runs()), gateway.landed()
    cases: list[tuple[str, bytes, str | None, int, str, str]] = [
        ("nowhere", good, "application/x-ndjson", 404, "source", "unknown series source 'nowhere'"),
        (SOURCE, good, "text/plain", 415, "content-type", "'text/plain' is not a sample batch"),
        (SOURCE, good, None, 415, "content-type", "no Content-Type"),
        (SOURCE, good, "text/csv; charset=latin-1", 415, "content-type", "'latin-1'"),
        (SOURCE, b"", "application/x-ndjson", 400, "body", "empty"),
        (SOURCE, b"\n  \n", "application/x-ndjson", 400, "body", "empty"),
        (SOURCE, b"node,timestamp_s,co2_ppm\n", "text/csv", 400, "body", "header row and no sample"),
        (SOURCE, b"[]", "application/json", 400, "body", "empty array"),
        (SOURCE, b'{"node": "x"}', "application/json", 422, "body", "fixture dump"),
        (SOURCE, b'[{"model": "a.sample",', "application/json", 422, "body", "not valid JSON"),
        (SOURCE, plain_array, "application/json", 422, "body", "application/x-ndjson"),
        (SOURCE, b'{"node": "\xff"}\n', "application/x-ndjson", 422, "body", "not UTF-8"),
        (SOURCE, big, "application/x-ndjson", 413, "body", "gateway.max_body_bytes"),
        (SOURCE, over_file_limit, "application/json", 413, "body", "series.max_file_bytes"),
    ]
    for source, body, content_type, status, field, says in cases:
        answer = gateway.post(body, content_type, source=source)
        assert answer.status_code == status, (body[:40], content_type, answer.text)
        assert answer.json()["field"] == field, answer.text
        assert says in answer.json()["detail"], answer.text
    assert len(gateway.runs()) == before_runs
    assert gateway.landed() == before_files


def test_credentials_are_required_and_a_run_is_shown_only_under_its_source(gateway: SamplesGateway) -> None:
    body = jsonl(make_samples(np.random.default_rng(9), new_nodes(1), START, 900, step=300, keep=1.0))
    before_runs, before_files = len(gateway.runs()), gateway.landed()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic bm9ib2R5Om5vcGU="}):
        refused = gateway.post(body, "application/x-ndjson", headers=headers)
        assert refused.status_code == 401, refused.text
    assert len(gateway.runs()) == before_runs
    assert gateway.landed() == before_files

    basic = httpx.BasicAuth(USER, PASSWORD)
    answer = httpx.post(
        f"{gateway.url}/series/{OTHER_SOURCE}/samples",
        content=body,
        headers={"Content-Type": "application/x-ndjson"},
        auth=basic,
        timeout=60,
    )
    assert answer.status_code == 202, answer.text
    key = answer.json()["key"]
    assert key.startswith(f"landing/samples/{OTHER_SOURCE}/gateway-")
    assert gateway.store.get_bytes(key) == body

    status_url = f"{gateway.url}{answer.json()['status_url']}"
    assert httpx.get(status_url, timeout=30).status_code == 401
    shown = httpx.get(status_url, auth=basic, timeout=30)
    assert shown.status_code == 200, shown.text
    assert (shown.json()["source"], shown.json()["run"]["state"]) == (OTHER_SOURCE, "Scheduled")
    run_id = answer.json()["run"]["id"]
    elsewhere = httpx.get(f"{gateway.url}/series/{SOURCE}/samples/runs/{run_id}", auth=basic, timeout=30)
    assert elsewhere.status_code == 404
    unknown = httpx.get(f"{gateway.url}/series/{SOURCE}/samples/runs/{uuid.uuid4()}", auth=basic, timeout=30)
    assert unknown.status_code == 404

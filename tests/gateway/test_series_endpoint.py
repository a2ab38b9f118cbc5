"""``GET /series/{source}`` on a real gateway process: answers, one seeding run per miss, refusals."""

from __future__ import annotations

import csv
import datetime as dt
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.deployments.runner import RunnerDeployment

from skyvault.config.settings import SampleLimits, SeriesSettings
from skyvault.flows.series import seed_series
from skyvault.series.database import sample_database
from skyvault.series.samples import VARIABLES, validate_sample
from tests.gateway.conftest import PASSWORD, POOL, TOKEN, USER, gateway_process
from tests.series.common import DAY, SOURCE, make_samples, new_nodes, reference_reduction

DEPLOYMENT = "seed-series/on-request"
START = dt.datetime(2026, 3, 10, tzinfo=dt.UTC)
MAX_BINS = 2000


@dataclass
class SeriesGateway:
    url: str
    deployment_id: str
    samples: list[dict[str, Any]]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def runs(self) -> list[Any]:
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.deployment_id])),
                limit=200,
            )

    def get(self, **params: str) -> httpx.Response:
        return httpx.get(f"{self.url}/series/{SOURCE}", params=params, headers=self.auth, timeout=60)


@pytest.fixture(scope="module")
def gateway(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeriesGateway]:
    """A gateway whose source ``office`` has samples for 10..13 March 2026 in a SQLite sample store."""
    folder = tmp_path_factory.mktemp("series-gateway")
    series = SeriesSettings(
        sqlite_path=folder / "samples.sqlite3",
        max_read_bins=MAX_BINS,
        sources={SOURCE: {"cache_levels": ["60 s | daily", "1 h | monthly"]}},
    )
    samples = make_samples(np.random.default_rng(3), new_nodes(2), START, 4 * DAY, step=300, statuses="MRE")
    with sample_database(series) as db:
        parsed = [validate_sample(s, n + 1, SampleLimits()) for n, s in enumerate(samples)]
        db.ingest_chunks(SOURCE, "landing/samples/office/a.jsonl", "sha-a", [parsed], 0)
    (folder / "password").write_text(PASSWORD + "\n")
    (folder / "token").write_text(TOKEN + "\n")
    config = {
        "scratch_dir": str(folder / "scratch"),
        "store": {"kind": "local", "root": str(folder / "store")},
        "gateway": {"username": USER},
        "series": series.model_dump(mode="json"),
    }
    (folder / "skyvault.yaml").write_text(yaml.safe_dump(config))
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
    deployment = seed_series.to_deployment(name="on-request", work_pool_name=POOL)
    assert isinstance(deployment, RunnerDeployment)
    deployment_id = str(deployment.apply())
    secrets = {"PASSWORD": folder / "password", "TOKEN": folder / "token"}
    with gateway_process(
        folder / "skyvault.yaml", folder / "prefect-home", secrets, folder / "gateway.log"
    ) as (
        url,
        _,
    ):
        yield SeriesGateway(url=url, deployment_id=deployment_id, samples=samples)


def _reference(
    samples: list[dict[str, Any]], resolution: int, lo: int, hi: int
) -> dict[tuple[str, str], Any]:
    """The reference reduction keyed by (node, bin start as ISO text), as the endpoint answers."""
    return {
        (node, dt.datetime.fromtimestamp(start, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")): stats
        for (node, start), stats in reference_reduction(samples, resolution, lo, hi).items()
    }


def _check_rows(columns: list[str], rows: list[list[Any]], reference: dict[tuple[str, str], Any]) -> None:
    assert columns[:2] == ["node", "bin_start"]
    got = {(r[0], r[1]): dict(zip(columns, r, strict=True)) for r in rows}
    assert set(got) == set(reference)
    for key, stats in reference.items():
        for v in VARIABLES:
            row = got[key]
            assert (float(row[f"{v}_min"]), float(row[f"{v}_max"]), int(row[f"{v}_count"])) == (
                stats[v][0],
                stats[v][2],
                stats[v][3],
            )
            assert float(row[f"{v}_mean"]) == pytest.approx(stats[v][1], rel=1e-12)


def test_a_miss_is_answered_live_and_starts_one_seeding_run_for_concurrent_requests(
    gateway: SeriesGateway,
) -> None:
    params = {"start": "2026-03-10T06:00:00Z", "end": "2026-03-12T18:00:00Z", "resolution": "15 min"}
    barrier = threading.Barrier(2)
    answers: list[httpx.Response] = []

    def ask() -> None:
        barrier.wait()
        answers.append(gateway.get(**params))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    bodies = [a.json() for a in answers]
    days = ["2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z", "2026-03-12T00:00:00Z"]
    for body in bodies:
        assert body["level"] == "60 s | daily"
        assert body["missing_periods"] == days
        lo, hi = (
            int(dt.datetime(2026, 3, 10, 6, tzinfo=dt.UTC).timestamp()),
            int(dt.datetime(2026, 3, 12, 18, tzinfo=dt.UTC).timestamp()),
        )
        _check_rows(body["columns"], body["rows"], _reference(gateway.samples, 900, lo, hi))
    assert bodies[0]["rows"] == bodies[1]["rows"]

    runs = [r for r in gateway.runs() if r.parameters.get("blocks") == {"60s": days}]
    assert len(runs) == 1
    assert runs[0].parameters["source"] == SOURCE
    assert {b["seeding"]["run_id"] for b in bodies} == {str(runs[0].id)}

    # the same miss again, as CSV: the same rows, and still one run
    again = gateway.get(**params, format="csv")
    assert again.status_code == 200
    assert again.headers["content-type"].startswith("text/csv")
    assert again.headers["x-skyvault-seed-run"] == str(runs[0].id)
    table = list(csv.reader(io.StringIO(again.text)))
    assert table[0] == bodies[0]["columns"]
    assert [[r[0], r[1]] for r in table[1:]] == [r[:2] for r in bodies[0]["rows"]]
    assert [float(x) for r in table[1:] for x in r[2:]] == [
        float(x) for r in bodies[0]["rows"] for x in r[2:]
    ]
    assert len([r for r in gateway.runs() if r.parameters.get("blocks") == {"60s": days}]) == 1


def test_bad_requests_are_refused_naming_the_field_and_start_nothing(gateway: SeriesGateway) -> None:
    before = len(gateway.runs())
    good = {"start": "2026-03-10T00:00:00Z", "end": "2026-03-11T00:00:00Z", "resolution": "1 h"}
    cases: list[tuple[str, dict[str, str], int, str, str]] = [
        ("nowhere", good, 404, "source", "unknown series source 'nowhere'"),
        (SOURCE, {**good, "start": "2026-03-12T00:00:00Z"}, 422, "start", "is not before end"),
        (SOURCE, {**good, "start": "yesterday"}, 422, "start", "'yesterday' is not an ISO 8601 time"),
        (SOURCE, {**good, "resolution": "90 s"}, 422, "resolution", "60 s or 3600 s"),
        (SOURCE, {**good, "resolution": "fast"}, 422, "resolution", "'fast'"),
        (SOURCE, {**good, "resolution": "60", "end": "2026-03-13T00:00:00Z"}, 422, "end", "max_read_bins"),
        (SOURCE, {**good, "format": "xml"}, 422, "format", "'xml' is not one of json, csv"),
        (SOURCE, {"end": good["end"], "resolution": "1 h"}, 422, "start", "start"),
    ]
    for source, params, status, field, says in cases:
        answer = httpx.get(f"{gateway.url}/series/{source}", params=params, headers=gateway.auth, timeout=30)
        assert answer.status_code == status, (params, answer.text)
        assert answer.json()["field"] == field, (params, answer.text)
        assert says in answer.json()["detail"], (params, answer.text)
    refused = httpx.get(f"{gateway.url}/series/{SOURCE}", params=good, timeout=30)
    assert refused.status_code == 401
    wrong = httpx.get(f"{gateway.url}/series/{SOURCE}", params=good, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert len(gateway.runs()) == before

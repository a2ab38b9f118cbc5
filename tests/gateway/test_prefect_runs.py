"""PrefectRuns against a real Prefect server: starts follow a deployment registered again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import RunnerDeployment

from skyvault.errors import OrchestratorError
from skyvault.flows.ingest import ingest
from skyvault.gateway.prefect_runs import PrefectRuns

POOL = "gateway-runs-test-unpolled"


def _register(name: str) -> str:
    deployment = ingest.to_deployment(name=name, work_pool_name=POOL)
    assert isinstance(deployment, RunnerDeployment)
    return str(deployment.apply())


def _delete(deployment_id: str) -> None:
    with get_client(sync_client=True) as client:
        client.delete_deployment(uuid.UUID(deployment_id))


def _deployment_of(run_id: str) -> str:
    with get_client(sync_client=True) as client:
        return str(client.read_flow_run(uuid.UUID(run_id)).deployment_id)


@pytest.fixture
def runs(prefect_harness: None) -> Iterator[PrefectRuns]:
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
    runs = PrefectRuns()
    runs.open()
    try:
        yield runs
    finally:
        runs.close()


def test_starts_follow_a_deployment_registered_again_under_a_new_id(runs: PrefectRuns) -> None:
    name = f"again-{uuid.uuid4().hex[:8]}"
    first_id = _register(name)
    first = runs.start(f"ingest/{name}", {"report": "landing/a.json"}, f"key-{name}-1", name="ingest/a")
    assert _deployment_of(first.id) == first_id

    _delete(first_id)
    second_id = _register(name)
    assert second_id != first_id
    second = runs.start(f"ingest/{name}", {"report": "landing/b.json"}, f"key-{name}-2", name="ingest/b")

    assert _deployment_of(second.id) == second_id
    assert second.parameters == {"report": "landing/b.json"}
    again = runs.start(f"ingest/{name}", {"report": "landing/b.json"}, f"key-{name}-2", name="ingest/b")
    assert again.id == second.id


def test_a_start_after_the_deployment_was_deleted_names_it(runs: PrefectRuns) -> None:
    name = f"gone-{uuid.uuid4().hex[:8]}"
    deployment_id = _register(name)
    runs.start(f"ingest/{name}", {"report": "landing/a.json"}, f"key-{name}-1", name="ingest/a")

    _delete(deployment_id)
    with pytest.raises(OrchestratorError, match=f"ingest/{name}.*not registered"):
        runs.start(f"ingest/{name}", {"report": "landing/c.json"}, f"key-{name}-3", name="ingest/c")

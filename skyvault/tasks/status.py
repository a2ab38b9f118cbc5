"""Per-product status read from Prefect: the latest ``process-product/<collection>/<id>`` run."""

from __future__ import annotations

from collections.abc import Iterable

from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort

from skyvault.tasks.policy import TASK_POLICY

PROCESS_PRODUCT = "process-product"
_FAILED = {StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


def run_name(step: str, collection_id: str, product_id: str) -> str:
    """The predictable run name of one step for one product, e.g. ``preprocess/<c>/<id>``."""
    return f"{step}/{collection_id}/{product_id}"


def latest_states(names: Iterable[str], batch: int = 200) -> dict[str, StateType]:
    """The state type of the newest flow run with each of ``names`` (names with no run are absent)."""
    wanted = sorted(set(names))
    found: dict[str, StateType] = {}
    with get_client(sync_client=True) as client:
        for i in range(0, len(wanted), batch):
            chunk = wanted[i : i + batch]
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=chunk)),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            )
            for run in runs:
                if run.name not in found and run.state_type is not None:
                    found[run.name] = run.state_type
    return found


def last_run_failed(state: StateType | None) -> bool:
    """Whether a product's newest process-product run ended badly (so a re-run must redo it)."""
    return state in _FAILED


@task(name="read-product-states", **TASK_POLICY)
def read_product_states(collection_products: list[tuple[str, str]]) -> dict[str, StateType]:
    """Newest process-product state per ``(collection, product)`` pair, keyed by run name."""
    return latest_states(run_name(PROCESS_PRODUCT, c, p) for c, p in collection_products)

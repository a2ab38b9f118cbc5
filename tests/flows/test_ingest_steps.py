"""Every failed product of an ingest names itself and the step that failed, in the summary, its
status record and its process-product run."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.client.schemas.objects import State
from prefect.states import Crashed, Failed

from skyvault.config.settings import Settings, StoreSettings
from skyvault.flows.ingest import ingest, outcome_of
from skyvault.models import IngestSummary, Product, ProductOutcome, ProductStatus
from skyvault.status import read_status
from skyvault.storage.store import open_store
from tests.conftest import write_raster

pytestmark = pytest.mark.usefixtures("prefect_harness")

COLLECTIONS: dict[str, Any] = {"step-scenes": {"render": {"bands": [1]}, "min_zoom": 5, "max_zoom": 6}}


def _raster(path: Path, *, crs: str = "EPSG:4326", when: str | None = "2026:04:01 10:00:00") -> Path:
    data = (np.arange(32 * 32, dtype="uint16").reshape(1, 32, 32) % 200 + 1).astype("uint8")
    origin = (12.0, 47.0) if crs == "EPSG:4326" else (100_000.0, 200_000.0)
    size = 0.01 if crs == "EPSG:4326" else 1000.0
    return write_raster(
        path,
        data,
        crs=crs,
        transform=rasterio.transform.from_origin(*origin, size, size),
        tags={"TIFFTAG_DATETIME": when} if when else None,
    )


def _run_message(collection: str, product_id: str) -> str:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[f"process-product/{collection}/{product_id}"])
            )
        )
    assert len(runs) == 1
    assert runs[0].state is not None
    assert runs[0].state.is_failed()
    return runs[0].state.message or ""


@pytest.fixture
def settings(configure: Callable[..., Settings], tmp_path: Path) -> Settings:
    return configure(StoreSettings(root=tmp_path / "store"), collections=COLLECTIONS)


def test_each_failure_names_the_product_and_the_step_it_failed_in(settings: Settings, tmp_path: Path) -> None:
    store = open_store(settings.store)
    store.put_file("landing/step-scenes/GOOD_1.tif", _raster(tmp_path / "good.tif"))
    # no datetime in a sidecar, no start/end, no TIFFTAG_DATETIME: converts, cannot be registered
    store.put_file("landing/step-scenes/UNDATED_1.tif", _raster(tmp_path / "undated.tif", when=None))
    # a Mars raster: converts, but has no footprint on the Earth
    mars = "+proj=eqc +a=3396190 +b=3396190 +units=m +no_defs"
    store.put_file("landing/step-scenes/MARS_1.tif", _raster(tmp_path / "mars.tif", crs=mars))
    store.put_bytes("landing/step-scenes/BROKEN_1.tif", b"II*\x00 not a raster")

    state = ingest(collection="step-scenes", seed_tiles=False, return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, IngestSummary)
    outcomes: dict[str, ProductOutcome] = {o.product_id: o for o in summary.outcomes}

    assert outcomes["GOOD_1"].state == "done"
    expected = {"UNDATED_1": "register", "MARS_1": "register", "BROKEN_1": "preprocess"}
    for product_id, step in expected.items():
        outcome = outcomes[product_id]
        assert (outcome.state, outcome.step) == ("failed", step), outcome
        assert product_id in outcome.message

        record = read_status("step-scenes", product_id, settings.store)
        assert record is not None
        assert (record.state, record.step) == ("failed", step)
        assert product_id in record.message

        message = _run_message("step-scenes", product_id)
        assert message.startswith(f"{step}: ")
        assert product_id in message

    assert "datetime" in outcomes["UNDATED_1"].message
    assert "not on the Earth" in outcomes["MARS_1"].message
    # a failed registration leaves its COG (preprocess was done); the broken product has none
    assert store.head("cogs/step-scenes/MARS_1.tif") is not None
    assert store.head("cogs/step-scenes/BROKEN_1.tif") is None


def _crashed_state(run_id: uuid.UUID, message: str) -> State[Any]:
    state: State[Any] = Crashed(message=message)
    state.state_details.flow_run_id = run_id
    return state


def test_a_run_that_ended_without_its_outcome_takes_the_step_from_its_status_record() -> None:
    product = Product(collection="c", id="P_7", source_key="landing/c/P_7.tif")
    run_id = uuid.uuid4()
    record = ProductStatus(
        collection="c",
        product_id="P_7",
        state="running",
        step="seed",
        flow_run_id=str(run_id),
        updated_at=dt.datetime.now(dt.UTC),
    )

    outcome = outcome_of(product, _crashed_state(run_id, "Execution was aborted"), record)
    assert (outcome.state, outcome.step) == ("failed", "seed")
    assert outcome.message == "product c/P_7: seed: Execution was aborted"

    # a record of another (earlier) run says nothing about this one
    other = record.model_copy(update={"flow_run_id": str(uuid.uuid4())})
    outcome = outcome_of(product, _crashed_state(run_id, "Execution was aborted"), other)
    assert (outcome.state, outcome.step) == ("failed", None)
    assert "P_7" in outcome.message

    # a run that returned its own outcome keeps it
    own = ProductOutcome(collection="c", product_id="P_7", state="failed", step="register", message="x")
    assert outcome_of(product, Failed(data=own), record) == own

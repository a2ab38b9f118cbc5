"""The gateway's :class:`~skyvault.gateway.runs.Runs` on the Prefect API (one client per process)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings

from skyvault.errors import OrchestratorError
from skyvault.gateway.runs import RunInfo

T = TypeVar("T")


def _info(run: FlowRun) -> RunInfo:
    state = run.state
    return RunInfo(
        id=str(run.id),
        name=run.name,
        state_type=state.type.value if state else "SCHEDULED",
        state_name=(state.name if state else None) or "Scheduled",
        message=(state.message if state else None) or "",
        created=run.created,
        parameters=dict(run.parameters or {}),
    )


class PrefectRuns:
    """One Prefect API client for the process, shared by every request."""

    def __init__(self, client: SyncPrefectClient | None = None) -> None:
        self._client = client or get_client(sync_client=True)
        self._entered = False

    def open(self) -> None:
        """Start the client (once)."""
        if not self._entered:
            self._client.__enter__()
            self._entered = True

    def close(self) -> None:
        """Close the client."""
        if self._entered:
            self._client.__exit__(None, None, None)
            self._entered = False

    def start(self, deployment: str, parameters: dict[str, Any], key: str, name: str) -> RunInfo:
        """Create a run of ``deployment`` (``<flow>/<deployment>``), or find the one ``key`` made.

        Raises:
            OrchestratorError: the deployment is not registered or the API failed.

        """
        try:
            found = self._client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise OrchestratorError(
                f"deployment {deployment!r} is not registered on the Prefect server "
                "(prefect --no-prompt deploy --all)"
            ) from None
        except Exception as e:  # httpx errors, API errors: the server cannot be used
            raise OrchestratorError(f"cannot read deployment {deployment!r}: {e}") from e
        try:
            run = self._client.create_flow_run_from_deployment(
                found.id, parameters=parameters, idempotency_key=key, name=name
            )
        except Exception as e:  # the API refused or is down
            raise OrchestratorError(f"cannot start a run of {deployment!r}: {e}") from e
        return _info(run)

    def read(self, run_id: str) -> RunInfo | None:
        """The run with this id, or None."""
        found = self.read_many([run_id])
        return found.get(run_id)

    def read_many(self, run_ids: list[str]) -> dict[str, RunInfo]:
        """The runs with these ids that exist, by id."""
        ids = []
        for run_id in run_ids:
            try:
                ids.append(uuid.UUID(run_id))
            except ValueError:
                continue
        if not ids:
            return {}
        runs = self._call(
            lambda: self._client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids)
            ),
            "read flow runs",
        )
        return {str(r.id): _info(r) for r in runs}

    def latest_named(self, name: str) -> RunInfo | None:
        """The most recently created run named ``name``, or None."""
        runs = self._call(
            lambda: self._client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
                sort=FlowRunSort.START_TIME_DESC,
                limit=20,
            ),
            f"read the runs named {name!r}",
        )
        if not runs:
            return None
        return _info(max(runs, key=lambda r: r.created or dt.datetime.min.replace(tzinfo=dt.UTC)))

    def named_like(self, prefix: str, limit: int = 200) -> list[RunInfo]:
        """Runs whose name starts with ``prefix`` that have not started yet (newest first)."""
        runs = self._call(
            lambda: self._client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=prefix)),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=limit,
            ),
            f"read the runs named {prefix}*",
        )
        return [_info(r) for r in runs if r.name.startswith(prefix)]

    def ui_url(self, run_id: str) -> str | None:
        """The run's page in the Prefect UI, when the UI's address is known."""
        base = get_current_settings().ui_url
        return f"{base.rstrip('/')}/runs/flow-run/{run_id}" if base else None

    @staticmethod
    def _call(fn: Callable[[], T], what: str) -> T:
        try:
            return fn()
        except Exception as e:  # the API refused or is down
            raise OrchestratorError(f"cannot {what}: {e}") from e

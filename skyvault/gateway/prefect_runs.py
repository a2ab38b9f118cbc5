"""The gateway's :class:`~skyvault.gateway.runs.Runs` on the Prefect API (one client per process)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import get_current_settings

from skyvault.errors import OrchestratorError
from skyvault.gateway.runs import RunInfo

T = TypeVar("T")

#: Connections kept to the Prefect API: one per thread of the server's pool for blocking handlers
#: (Starlette's, 40 by default), so no request waits for a connection (Prefect's client allows 16)
#: and none is opened and closed per call (Prefect's keeps 8 alive).
API_CONNECTIONS = 40


def _not_found(error: Exception) -> bool:
    """Whether the API answered 404 (the object the call named does not exist)."""
    if isinstance(error, ObjectNotFound):
        return True
    return isinstance(error, PrefectHTTPStatusError) and error.response.status_code == 404


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
        limits = httpx.Limits(
            max_connections=API_CONNECTIONS, max_keepalive_connections=API_CONNECTIONS, keepalive_expiry=25
        )
        self._client = client or get_client(httpx_settings={"limits": limits}, sync_client=True)
        self._entered = False
        #: Deployment ids by ``<flow>/<deployment>``, looked up once (again when a start gets 404).
        self._deployment_ids: dict[str, uuid.UUID] = {}

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

        The deployment's id is looked up on the first start only; a start that finds it gone
        (deleted, or registered again under a new id) looks it up again once.

        Raises:
            OrchestratorError: the deployment is not registered or the API failed.

        """
        deployment_id = self._deployment_id(deployment)
        what = f"start a run of {deployment!r}"
        try:
            run = self._client.create_flow_run_from_deployment(
                deployment_id, parameters=parameters, idempotency_key=key, name=name
            )
        except Exception as e:  # the API refused or is down
            if not _not_found(e):
                raise OrchestratorError(f"cannot {what}: {e}") from e
            self._deployment_ids.pop(deployment, None)
            fresh = self._deployment_id(deployment)
            run = self._call(
                lambda: self._client.create_flow_run_from_deployment(
                    fresh, parameters=parameters, idempotency_key=key, name=name
                ),
                what,
            )
        return _info(run)

    def _deployment_id(self, deployment: str) -> uuid.UUID:
        known = self._deployment_ids.get(deployment)
        if known is not None:
            return known
        try:
            found = self._client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise OrchestratorError(
                f"deployment {deployment!r} is not registered on the Prefect server "
                "(prefect --no-prompt deploy --all)"
            ) from None
        except Exception as e:  # httpx errors, API errors: the server cannot be used
            raise OrchestratorError(f"cannot read deployment {deployment!r}: {e}") from e
        self._deployment_ids[deployment] = found.id
        return found.id

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

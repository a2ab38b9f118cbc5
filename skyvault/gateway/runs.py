"""What the gateway needs of deployment runs: :class:`Runs`, the run ids and idempotency keys.

The Prefect implementation is :class:`skyvault.gateway.prefect_runs.PrefectRuns`. Every start
passes an idempotency key derived from the request (:func:`idempotency_key`), so a request sent
twice finds the run the first one started. Prefect keeps such keys per flow, so the key also names
the deployment.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

#: The deployments the gateway starts (``<flow>/<deployment>``, see prefect.yaml).
INGEST = "ingest/on-request"
PROCESS_PRODUCT = "process-product/on-request"
ARCHIVE_JOB = "archive-job/data-catalog"
RETRIEVE_JOB = "retrieve-job/data-catalog"

#: Prefect state types of a run that has not started yet.
NOT_STARTED = frozenset({"SCHEDULED", "PENDING"})
#: Prefect state types of a run that ended.
FINAL = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


@dataclass(frozen=True)
class RunInfo:
    """What the gateway needs of one flow run."""

    id: str
    name: str
    state_type: str
    state_name: str
    message: str
    created: dt.datetime | None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def started(self) -> bool:
        """Whether the run has left Scheduled/Pending."""
        return self.state_type not in NOT_STARTED

    @property
    def ended(self) -> bool:
        """Whether the run reached a final state."""
        return self.state_type in FINAL


def digest(payload: Any) -> str:
    """SHA-256 (hex) of ``payload`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def idempotency_key(deployment: str, payload: Any) -> str:
    """The key of a run of ``deployment`` for a request: ``skyvault-gateway/<deployment>/<digest>``."""
    return f"skyvault-gateway/{deployment}/{digest(payload)}"


def request_uuid(kind: str, payload: Any) -> str:
    """A deterministic UUID for a request of ``kind`` (the same payload gives the same id)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"skyvault-gateway:{kind}:{digest(payload)}"))


class Runs(Protocol):
    """Starting and reading deployment runs (the Prefect API)."""

    def open(self) -> None:
        """Connect (once, when the app starts)."""
        ...

    def close(self) -> None:
        """Disconnect (when the app stops)."""
        ...

    def start(self, deployment: str, parameters: dict[str, Any], key: str, name: str) -> RunInfo:
        """Create a run of ``deployment`` (``<flow>/<deployment>``), or find the one ``key`` made.

        Raises:
            OrchestratorError: the deployment is not registered or the API failed.

        """
        ...

    def read(self, run_id: str) -> RunInfo | None:
        """The run with this id, or None."""
        ...

    def read_many(self, run_ids: list[str]) -> dict[str, RunInfo]:
        """The runs with these ids that exist, by id."""
        ...

    def latest_named(self, name: str) -> RunInfo | None:
        """The most recently created run named ``name``, or None."""
        ...

    def named_like(self, prefix: str, limit: int = 200) -> list[RunInfo]:
        """Runs whose name starts with ``prefix``, newest first."""
        ...

    def ui_url(self, run_id: str) -> str | None:
        """The run's page in the Prefect UI, when the UI's address is known."""
        ...

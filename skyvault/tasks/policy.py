"""The one retry policy: retry a task only when it failed with a :class:`TransientError`."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

from skyvault.errors import TransientError


def failed_transiently(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: true only if the failure is a :class:`TransientError`."""
    exc = state.data
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - an unreadable result is not a reason to retry
            return False
    return isinstance(exc, TransientError)


RETRY_DELAYS: list[float] = [1.0, 5.0, 15.0]

#: Keyword arguments for ``@task`` shared by every I/O task: retries for transient errors only and
#: no result caching (idempotency comes from deterministic keys, not from Prefect's cache).
TASK_POLICY: dict[str, Any] = {
    "retries": len(RETRY_DELAYS),
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_condition_fn": failed_transiently,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


#: For tasks whose client already retries transient errors itself (the data-catalog client, whose
#: status reports are also sent from flow hooks outside any task): one retry layer per boundary.
CLIENT_RETRIED_POLICY: dict[str, Any] = {**TASK_POLICY, "retries": 0, "retry_delay_seconds": 0}

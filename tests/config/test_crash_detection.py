"""Crash detection on a Prefect server that runs its services: a flow run whose process dies ends Crashed.

The config job provisions a work pool and the crash automation on a full ``prefect server start``
(the session's test server runs no triggers). Two flow processes run with the environment the pool
gives its flow containers: one is killed and must end Crashed within the configured silence; the
other keeps sending heartbeats and must outlive that silence and end Completed.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.common import prefect_server
from skyvault.config.environment import CRASH_AUTOMATION, HEARTBEAT_ENV
from skyvault.config.provision_cli import provision

TEMPLATE = Path(__file__).resolve().parents[2] / "deployment" / "work-pools" / "docker.json"
POOL = "crash-probe"
HEARTBEAT_SECONDS = 30
MISSING_AFTER_SECONDS = 40

FLOW = """
import sys, time
from prefect import flow
from prefect.runtime import flow_run

@flow
def silent_or_beating(seconds: float) -> None:
    print(flow_run.id, flush=True)
    time.sleep(seconds)

silent_or_beating(float(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def full_server() -> Iterator[str]:
    """A ``prefect server start`` on 127.0.0.1 with its services (triggers, actions) running."""
    with prefect_server(startup_seconds=120) as url:
        yield url


def _environment_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    body: dict[str, Any] = {
        "crash_detection": {
            "heartbeat_seconds": HEARTBEAT_SECONDS,
            "missing_after_seconds": MISSING_AFTER_SECONDS,
        },
        "work_pools": {POOL: {"base_job_template": str(TEMPLATE), "job_variables": {"image": "probe:1"}}},
    }
    (folder / "crash.yaml").write_text(yaml.safe_dump(body), encoding="utf-8")
    return folder


def _start_flow(api_url: str, pool_env: dict[str, str], seconds: float) -> tuple[subprocess.Popen[str], str]:
    """A flow process with the pool's container environment; it and the id of its flow run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SKYVAULT_"))}
    env.update(pool_env)
    env.update(PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOW, str(seconds)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, "the flow process ended before its flow run started"
    return proc, str(uuid.UUID(line))


def _state(flow_run_id: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(flow_run_id)).state


def _state_types(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [s.type.value for s in client.read_flow_run_states(uuid.UUID(flow_run_id))]


def test_a_killed_flow_run_ends_crashed_and_a_live_one_does_not(full_server: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config_dir = _environment_file(tmp_path / "config")
    out, err = io.StringIO(), io.StringIO()
    with temporary_settings(updates={PREFECT_API_URL: full_server}):
        code = provision("crash", config_dir, environ={}, out=out, err=err)
        assert code == 0, err.getvalue()
        assert f"create automation {CRASH_AUTOMATION}" in out.getvalue()
        with get_client(sync_client=True) as client:
            template = client.read_work_pool(POOL).base_job_template
        pool_env = template["variables"]["properties"]["env"]["default"]
        assert pool_env[HEARTBEAT_ENV] == str(HEARTBEAT_SECONDS)

        # the live run outlasts one silence window, sending heartbeats all along
        live, live_id = _start_flow(full_server, pool_env, MISSING_AFTER_SECONDS + 20)
        killed, killed_id = _start_flow(full_server, pool_env, 600)
        try:
            deadline = time.monotonic() + 30
            while _state(killed_id).type.value != "RUNNING":
                assert time.monotonic() < deadline, "the flow run never started running"
                time.sleep(0.5)
            time.sleep(2)  # its first heartbeat is on its way
            os.kill(killed.pid, signal.SIGKILL)
            killed.wait(timeout=30)
            killed_at = time.monotonic()

            deadline = killed_at + MISSING_AFTER_SECONDS + 45
            while (state := _state(killed_id)).type.value != "CRASHED":
                assert state.type.value == "RUNNING", f"the killed run went {state.type.value}"
                assert time.monotonic() < deadline, (
                    f"the killed run is still Running {time.monotonic() - killed_at:.0f} s after its "
                    f"process died (configured: Crashed after {MISSING_AFTER_SECONDS} s without a heartbeat)"
                )
                time.sleep(1)
            silent_for = time.monotonic() - killed_at
            assert CRASH_AUTOMATION in (state.message or "")
            assert silent_for >= MISSING_AFTER_SECONDS - HEARTBEAT_SECONDS, silent_for

            assert live.wait(timeout=MISSING_AFTER_SECONDS + 90) == 0
            assert _state(live_id).type.value == "COMPLETED"
            types = _state_types(live_id)
            assert "CRASHED" not in types, json.dumps(types)
        finally:
            for proc in (live, killed):
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)

"""Archive and retrieve jobs end to end: real archive/retrieve runs, a recording data catalog."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

from skyvault.archive import lts as lts_tasks
from skyvault.config.settings import Settings, StoreSettings
from skyvault.flows.jobs import DATASET_ERRORS, archive_job, retrieve_job
from skyvault.models import JobDatasetResult, PlannedDatablock
from skyvault.scicat.jobs import dataset_id_for_pid
from skyvault.storage.store import ObjectStore, open_store
from tests.scicat.test_jobs import API, PASSWORD, CatalogServer, catalog_server

pytestmark = pytest.mark.usefixtures("prefect_harness")

__all__ = ["catalog_server"]

GOOD_PID = "20.500.12269/good-1"


def _catalog(server: CatalogServer) -> dict[str, Any]:
    return {"url": server.url, "username": "archiver", "password": PASSWORD, "backoff_seconds": 0.01}


def _landing(store: ObjectStore, pid: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        store.put_bytes(f"landing/{pid}/{name}", data)


ORIGINAL_WRITE = lts_tasks.write_datablock


def _flip_byte_after_write(monkeypatch: pytest.MonkeyPatch, dataset_id: str) -> None:
    """Corrupt ``dataset_id``'s datablocks on LTS right after they are written, before verification."""
    original = ORIGINAL_WRITE

    def corrupting(block: PlannedDatablock, *args: Any) -> Any:
        written = original(block, *args)
        if block.dataset_id == dataset_id:
            path = lts_tasks.dataset_dir(args[-1], dataset_id) / block.name
            data = bytearray(path.read_bytes())
            data[600] ^= 0xFF
            path.write_bytes(bytes(data))
        return written

    monkeypatch.setattr(lts_tasks, "write_datablock", corrupting)


def _artifact(key: str) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key]))
        )
    assert found, f"no artifact {key!r}"
    return str(found[0].data)


def _results(state: Any) -> list[JobDatasetResult]:
    results = state.result(raise_on_failure=False)
    assert isinstance(results, list), f"job ended {state.type}: {state.message}"
    return results


def test_archive_job_reports_every_outcome_and_reruns_clean(
    configure: Callable[..., Settings],
    catalog_server: CatalogServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    settings = configure(data_catalog=_catalog(catalog_server))
    store = open_store(settings.store)
    _landing(store, GOOD_PID, {"a.txt": b"alpha\n", "sub/b.bin": bytes(range(256)) * 40})
    _landing(store, "ds-corrupt", {"x.bin": b"x" * 5000, "y/z.txt": b""})
    corrupt_before = {o.key: store.get_bytes(o.key) for o in store.list("landing/ds-corrupt/")}
    _flip_byte_after_write(monkeypatch, "ds-corrupt")

    state = archive_job(
        "job-a1", [{"pid": GOOD_PID, "files": []}, "ds-missing", "ds-corrupt"], return_state=True
    )

    good_id = dataset_id_for_pid(GOOD_PID)
    assert catalog_server.patches() == [
        ("/jobs/job-a1", {"jobStatusMessage": "inProgress"}),
        ("/datasets/20.500.12269%2Fgood-1", {"datasetlifecycle": {"archiveStatusMessage": "started"}}),
        (
            "/datasets/20.500.12269%2Fgood-1",
            {
                "datasetlifecycle": {
                    "archiveStatusMessage": "datasetOnArchiveDisk",
                    "retrievable": True,
                    "isOnCentralDisk": False,
                }
            },
        ),
        ("/datasets/ds-missing", {"datasetlifecycle": {"archiveStatusMessage": "started"}}),
        ("/datasets/ds-missing", {"datasetlifecycle": {"archiveStatusMessage": "missingFilesError"}}),
        ("/datasets/ds-corrupt", {"datasetlifecycle": {"archiveStatusMessage": "started"}}),
        (
            "/datasets/ds-corrupt",
            {"datasetlifecycle": {"archiveStatusMessage": "scheduleArchiveJobFailed", "archivable": True}},
        ),
        ("/jobs/job-a1", catalog_server.patches()[-1][1]),
    ]
    final = catalog_server.patches()[-1][1]
    assert final["jobStatusMessage"] == "finishedWithDatasetErrors"
    entries = {e["pid"]: e for e in final["jobResultObject"]["result"]}
    assert entries[GOOD_PID]["status"] == "datasetOnArchiveDisk"
    assert entries[GOOD_PID]["datasetId"] == good_id
    assert entries["ds-missing"]["status"] == "missingFilesError"
    assert "VerificationError" in entries["ds-corrupt"]["message"]
    assert {c.method for c in catalog_server.calls()} == {"POST", "PATCH"}
    assert all(c.headers["Authorization"].startswith("Bearer ") for c in catalog_server.calls("PATCH"))

    assert state.is_failed()
    assert state.name == DATASET_ERRORS
    assert "2 of 3 datasets failed" in str(state.message)
    assert "ds-missing" in str(state.message)
    assert "ds-corrupt" in str(state.message)
    assert (settings.lts.root / good_id / "manifest.json").is_file()
    assert list(store.list(f"landing/{GOOD_PID}/")) == []
    assert {o.key: store.get_bytes(o.key) for o in store.list("landing/ds-corrupt/")} == corrupt_before
    assert not (settings.lts.root / "ds-corrupt").exists() or not any(
        (settings.lts.root / "ds-corrupt").iterdir()
    )
    summary = _artifact("archive-job-job-a1")
    assert "finishedWithDatasetErrors" in summary
    assert "missingFilesError" in summary

    monkeypatch.setattr(lts_tasks, "write_datablock", ORIGINAL_WRITE)
    catalog_server.requests.clear()
    rerun = archive_job("job-a2", ["ds-corrupt"], return_state=True)

    assert rerun.is_completed(), rerun.message
    assert [p for p, _ in catalog_server.patches()] == [
        "/jobs/job-a2",
        "/datasets/ds-corrupt",
        "/datasets/ds-corrupt",
        "/jobs/job-a2",
    ]
    assert (
        catalog_server.patches()[2][1]["datasetlifecycle"]["archiveStatusMessage"] == "datasetOnArchiveDisk"
    )
    assert catalog_server.patches()[3][1]["jobStatusMessage"] == "finishedSuccessful"
    assert (settings.lts.root / "ds-corrupt" / "manifest.json").is_file()


def test_retrieve_job_hands_out_working_urls_and_reports_failures(
    configure: Callable[..., Settings],
    catalog_server: CatalogServer,
    s3_store_settings: StoreSettings,
) -> None:
    settings = configure(s3_store_settings, data_catalog=_catalog(catalog_server))
    store = open_store(settings.store)
    payload = {"scan/001.raw": b"\x01" * 70000, "notes.txt": "ü-notes\n".encode()}
    _landing(store, "ds-r", payload)
    assert archive_job("job-r0", ["ds-r"], return_state=True).is_completed()
    catalog_server.requests.clear()

    state = retrieve_job("job-r1", ["ds-r", "ds-never"], return_state=True)

    assert catalog_server.patches()[:-1] == [
        ("/jobs/job-r1", {"jobStatusMessage": "inProgress"}),
        ("/datasets/ds-r", {"datasetlifecycle": {"retrieveStatusMessage": "started"}}),
        (
            "/datasets/ds-r",
            {
                "datasetlifecycle": {
                    "retrieveStatusMessage": "datasetRetrieved",
                    "retrieveIntegrityCheck": True,
                }
            },
        ),
        ("/datasets/ds-never", {"datasetlifecycle": {"retrieveStatusMessage": "started"}}),
        ("/datasets/ds-never", {"datasetlifecycle": {"retrieveStatusMessage": "datasetRetrievalFailed"}}),
    ]
    final = catalog_server.patches()[-1][1]
    assert final["jobStatusMessage"] == "finishedWithDatasetErrors"
    entry = final["jobResultObject"]["result"][0]
    assert entry["pid"] == "ds-r"
    assert entry["urls"]
    manifest = lts_tasks.read_manifest(settings.lts, "ds-r")
    assert manifest is not None
    for url, block in zip(entry["urls"], manifest.datablocks, strict=True):
        data = httpx.get(url).content
        assert hashlib.sha256(data).hexdigest() == block.sha256
    assert httpx.get(entry["downloadScript"]).text.startswith("#!/usr/bin/env bash")
    assert "not archived" in final["jobResultObject"]["result"][1]["message"]
    assert state.is_failed()
    assert "ds-never" in str(state.message)
    assert "ds-r " not in str(state.message)
    assert [r.ok for r in _results(state)] == [True, False]

    for o in list(store.list("retrieval/ds-r/")):
        store.delete(o.key)
    block_path = lts_tasks.dataset_dir(settings.lts, "ds-r") / manifest.datablocks[0].name
    flipped = bytearray(block_path.read_bytes())
    flipped[1000] ^= 0x01
    block_path.write_bytes(bytes(flipped))
    catalog_server.requests.clear()

    state = retrieve_job("job-r2", ["ds-r"], return_state=True)

    assert catalog_server.patches()[1:3] == [
        ("/datasets/ds-r", {"datasetlifecycle": {"retrieveStatusMessage": "started"}}),
        (
            "/datasets/ds-r",
            {
                "datasetlifecycle": {
                    "retrieveStatusMessage": "datasetRetrievalFailed",
                    "retrieveIntegrityCheck": False,
                }
            },
        ),
    ]
    assert catalog_server.patches()[-1][1]["jobStatusMessage"] == "finishedUnsuccessful"
    assert state.is_failed()
    assert "VerificationError" in str(state.message)


def test_jobs_without_a_catalog_and_jobs_that_fail_themselves(
    configure: Callable[..., Settings],
    catalog_server: CatalogServer,
    tmp_path: Path,
) -> None:
    settings = configure()
    source = tmp_path / "folder-ds"
    (source / "deep" / "er").mkdir(parents=True)
    (source / "deep" / "er" / "f.dat").write_bytes(b"folder data")

    state = archive_job("job-n1", [{"pid": "ds-folder", "source_dir": str(source)}], return_state=True)

    assert state.is_completed(), state.message
    assert [r.status for r in _results(state)] == ["datasetOnArchiveDisk"]
    assert (settings.lts.root / "ds-folder" / "manifest.json").is_file()
    assert "finishedSuccessful" in _artifact("archive-job-job-n1")
    assert "ds-folder" in _artifact("archive-job-job-n1-datasets")
    assert catalog_server.calls() == []

    settings = configure(data_catalog=_catalog(catalog_server))
    store = open_store(settings.store)
    _landing(store, "ds-kept", {"k.txt": b"keep me"})
    catalog_server.fail_next(1, None)  # the login
    catalog_server.fail_next(1, 400)  # the inProgress update

    refused = archive_job("job-f1", ["ds-kept"], return_state=True)
    empty = archive_job("job-f2", [], return_state=True)

    assert refused.is_failed()
    assert refused.name != DATASET_ERRORS
    assert empty.is_failed()
    assert [(r.method, r.path.removeprefix(API)) for r in catalog_server.calls()] == [
        ("POST", "/auth/login"),
        ("PATCH", "/jobs/job-f1"),
        ("PATCH", "/jobs/job-f1"),
        ("PATCH", "/jobs/job-f2"),
    ]
    for _path, body in catalog_server.patches()[1:]:
        assert body["jobStatusMessage"] == "finishedUnsuccessful"
        assert body["jobResultObject"]["message"]
    assert "HTTP 400" in catalog_server.patches()[1][1]["jobResultObject"]["message"]
    assert [o.key for o in store.list("landing/ds-kept/")] == ["landing/ds-kept/k.txt"]

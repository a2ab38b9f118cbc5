"""The data-catalog client against a local recording HTTP server."""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from skyvault.config.settings import DataCatalogSettings
from skyvault.errors import (
    ConfigError,
    DataCatalogError,
    DatasetError,
    InvalidIdentifierError,
    MissingFilesError,
    TransientDataCatalogError,
    VerificationError,
)
from skyvault.ids import check_id
from skyvault.models import ArchiveResult, DatablockInfo, JobDataset, RetrievedBlock, RetrieveResult
from skyvault.scicat import jobs
from skyvault.scicat.jobs import DatasetLifecycle, JobStatus

PASSWORD = "pw-Xq7!secret"
TOKEN = "tok-9f8e7d6c5b4a"
API = "/api/v3"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class CatalogServer:
    """A SciCat-like catalog on 127.0.0.1 that records requests and fails on demand."""

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    tokens: set[str] = field(default_factory=lambda: {TOKEN})
    login_token: str = TOKEN
    failures: list[int | str | None] = field(default_factory=list)  # status, "drop", None: answer
    echo_auth_on_error: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_next(self, times: int, status: int | str | None = 503) -> None:
        with self.lock:
            self.failures.extend([status] * times)

    def calls(self, method: str | None = None) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if method is None or r.method == method]

    def patches(self) -> list[tuple[str, Any]]:
        """``(path without the API prefix, body)`` of every PATCH, in order."""
        return [(r.path.removeprefix(API), r.body) for r in self.calls("PATCH")]


def _handler(server: CatalogServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            with server.lock:
                server.requests.append(Recorded(self.command, self.path, dict(self.headers.items()), body))
                failure = server.failures.pop(0) if server.failures else None
            if failure == "drop":
                self.close_connection = True
                return
            if isinstance(failure, int):
                self._reply(failure, {"error": "busy"})
                return
            if self.command == "POST" and self.path == f"{API}/auth/login":
                if body == {"username": "archiver", "password": PASSWORD}:
                    self._reply(201, {"access_token": server.login_token, "id": server.login_token})
                else:
                    self._reply(401, {"error": "bad credentials"})
                return
            auth = self.headers.get("Authorization", "")
            if auth.removeprefix("Bearer ") not in server.tokens:
                self._reply(401, {"error": "unauthorized"})
                return
            if self.command == "PATCH" and self.path.startswith((f"{API}/jobs/", f"{API}/datasets/")):
                if self.path.endswith("/unknown"):
                    detail = f"no such record (auth was {auth})" if server.echo_auth_on_error else "no such"
                    self._reply(404, {"error": detail})
                    return
                if body is None or not isinstance(body, dict):
                    self._reply(400, {"error": "no body"})
                    return
                self._reply(200, body)
                return
            self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            self._handle()

        def do_PATCH(self) -> None:
            self._handle()

    return Handler


@pytest.fixture
def catalog_server() -> Iterator[CatalogServer]:
    """A recording catalog server on a free loopback port for one test."""
    state = CatalogServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}{API}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    jobs.clear_token_cache()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
        jobs.clear_token_cache()


def _settings(server: CatalogServer, **extra: Any) -> DataCatalogSettings:
    values: dict[str, Any] = {
        "url": server.url,
        "username": "archiver",
        "password": PASSWORD,
        "retries": 3,
        "backoff_seconds": 0.25,
        "timeout_seconds": 5,
    }
    values.update(extra)
    return DataCatalogSettings(**values)


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_login_then_bearer_patches(catalog_server: CatalogServer) -> None:
    settings = _settings(catalog_server)
    jobs.update_job(settings, "job-1", JobStatus.IN_PROGRESS)
    jobs.update_dataset(settings, "20.500.12269/abc-1", jobs.archive_started())

    calls = catalog_server.calls()
    assert [(c.method, c.path) for c in calls] == [
        ("POST", f"{API}/auth/login"),
        ("PATCH", f"{API}/jobs/job-1"),
        ("PATCH", f"{API}/datasets/20.500.12269%2Fabc-1"),
    ]
    assert calls[0].body == {"username": "archiver", "password": PASSWORD}
    assert all(c.headers["Authorization"] == f"Bearer {TOKEN}" for c in calls[1:])
    assert calls[1].body == {"jobStatusMessage": "inProgress"}
    assert calls[2].body == {"datasetlifecycle": {"archiveStatusMessage": "started"}}


def test_configured_token_needs_no_login(catalog_server: CatalogServer) -> None:
    settings = _settings(catalog_server, username=None, password=None, token=TOKEN)
    jobs.update_job(settings, "job-2", JobStatus.FINISHED_SUCCESSFUL, {"result": []})
    assert [(c.method, c.path) for c in catalog_server.calls()] == [("PATCH", f"{API}/jobs/job-2")]
    assert catalog_server.calls()[0].body == {
        "jobStatusMessage": "finishedSuccessful",
        "jobResultObject": {"result": []},
    }


def test_expired_token_is_renewed_once(catalog_server: CatalogServer) -> None:
    settings = _settings(catalog_server)
    jobs.update_job(settings, "job-3", JobStatus.IN_PROGRESS)
    catalog_server.tokens = {"tok-renewed"}
    catalog_server.login_token = "tok-renewed"
    jobs.update_job(settings, "job-3", JobStatus.FINISHED_SUCCESSFUL)

    assert [(c.method, c.path.removeprefix(API)) for c in catalog_server.calls()] == [
        ("POST", "/auth/login"),
        ("PATCH", "/jobs/job-3"),
        ("PATCH", "/jobs/job-3"),
        ("POST", "/auth/login"),
        ("PATCH", "/jobs/job-3"),
    ]
    assert catalog_server.calls()[-1].headers["Authorization"] == "Bearer tok-renewed"


@pytest.mark.parametrize(
    ("lifecycle", "expected"),
    [
        (jobs.archive_started(), {"archiveStatusMessage": "started"}),
        (
            jobs.archive_succeeded(landing_removed=True),
            {"archiveStatusMessage": "datasetOnArchiveDisk", "retrievable": True, "isOnCentralDisk": False},
        ),
        (
            jobs.archive_succeeded(landing_removed=False),
            {"archiveStatusMessage": "datasetOnArchiveDisk", "retrievable": True},
        ),
        (
            jobs.archive_failed(MissingFilesError("dataset d1 has no files")),
            {"archiveStatusMessage": "missingFilesError"},
        ),
        (
            jobs.archive_failed(VerificationError("block d1_00000.tar differs")),
            {"archiveStatusMessage": "scheduleArchiveJobFailed", "archivable": True},
        ),
        (jobs.retrieve_started(), {"retrieveStatusMessage": "started"}),
        (
            jobs.retrieve_succeeded(),
            {"retrieveStatusMessage": "datasetRetrieved", "retrieveIntegrityCheck": True},
        ),
        (
            jobs.retrieve_failed(VerificationError("block d1_00000.tar differs")),
            {"retrieveStatusMessage": "datasetRetrievalFailed", "retrieveIntegrityCheck": False},
        ),
        (
            jobs.retrieve_failed(DatasetError("no manifest for d1")),
            {"retrieveStatusMessage": "datasetRetrievalFailed"},
        ),
    ],
)
def test_lifecycle_patch_carries_only_changed_fields(
    catalog_server: CatalogServer, lifecycle: DatasetLifecycle, expected: dict[str, Any]
) -> None:
    jobs.update_dataset(_settings(catalog_server), "ds-1", lifecycle)
    assert catalog_server.patches() == [("/datasets/ds-1", {"datasetlifecycle": expected})]


def test_final_job_word_follows_dataset_outcomes() -> None:
    assert jobs.job_status(3, 0) is JobStatus.FINISHED_SUCCESSFUL
    assert jobs.job_status(2, 1) is JobStatus.FINISHED_WITH_DATASET_ERRORS
    assert jobs.job_status(0, 3) is JobStatus.FINISHED_UNSUCCESSFUL


def test_retries_503_with_exponential_backoff(catalog_server: CatalogServer) -> None:
    catalog_server.fail_next(1, 503)  # the login
    catalog_server.fail_next(1, None)
    catalog_server.fail_next(2, 503)
    sleeps = Sleeps()
    jobs.update_job(_settings(catalog_server), "job-4", JobStatus.IN_PROGRESS, sleep=sleeps)

    assert [c.method for c in catalog_server.calls()] == ["POST", "POST", "PATCH", "PATCH", "PATCH"]
    assert catalog_server.patches()[-1] == ("/jobs/job-4", {"jobStatusMessage": "inProgress"})
    assert sleeps == [0.25, 0.25, 0.5]


def test_gives_up_after_the_last_try_with_a_transient_error(catalog_server: CatalogServer) -> None:
    settings = _settings(catalog_server, token=TOKEN)
    catalog_server.fail_next(10, 502)
    sleeps = Sleeps()
    with pytest.raises(TransientDataCatalogError, match=r"502.*job 'job-5'|job 'job-5'.*502") as info:
        jobs.update_job(settings, "job-5", JobStatus.IN_PROGRESS, sleep=sleeps)
    assert len(catalog_server.calls()) == settings.retries + 1
    assert sleeps == [0.25, 0.5, 1.0]
    assert "after 4 tries" in str(info.value)


def test_backoff_is_bounded(catalog_server: CatalogServer) -> None:
    catalog_server.fail_next(8, 504)
    sleeps = Sleeps()
    settings = _settings(catalog_server, token=TOKEN, retries=8, backoff_seconds=10)
    jobs.update_job(settings, "job-6", JobStatus.IN_PROGRESS, sleep=sleeps)
    assert max(sleeps) == jobs.MAX_BACKOFF_SECONDS
    assert sleeps[:3] == [10, 20, jobs.MAX_BACKOFF_SECONDS]


def test_client_errors_are_not_retried_and_name_the_dataset(catalog_server: CatalogServer) -> None:
    catalog_server.fail_next(1, 400)
    sleeps = Sleeps()
    with pytest.raises(DataCatalogError) as info:
        jobs.update_dataset(
            _settings(catalog_server, token=TOKEN), "20.500/x", jobs.retrieve_started(), sleep=sleeps
        )
    assert not isinstance(info.value, TransientDataCatalogError)
    assert "'20.500/x'" in str(info.value)
    assert "HTTP 400" in str(info.value)
    assert len(catalog_server.calls()) == 1
    assert sleeps == []


def test_dropped_connections_are_retried(catalog_server: CatalogServer) -> None:
    catalog_server.fail_next(2, "drop")
    sleeps = Sleeps()
    jobs.update_dataset(
        _settings(catalog_server, token=TOKEN), "ds-7", jobs.retrieve_succeeded(), sleep=sleeps
    )
    assert [c.method for c in catalog_server.calls()] == ["PATCH"] * 3
    assert len(sleeps) == 2


def test_unreachable_catalog_is_a_transient_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = DataCatalogSettings(url=f"http://127.0.0.1:{port}/api/v3", token=TOKEN, retries=2)
    sleeps = Sleeps()
    with pytest.raises(TransientDataCatalogError, match=r"job 'job-8'.*3 tries"):
        jobs.update_job(settings, "job-8", JobStatus.IN_PROGRESS, sleep=sleeps)
    assert len(sleeps) == 2


def test_misconfiguration_and_unsafe_ids_fail_before_any_request(catalog_server: CatalogServer) -> None:
    with pytest.raises(ConfigError, match="url"):
        jobs.update_job(DataCatalogSettings(), "job-9", JobStatus.IN_PROGRESS)
    with pytest.raises(ConfigError, match="token"):
        jobs.update_job(
            DataCatalogSettings(url=catalog_server.url, username="archiver"), "job-9", JobStatus.IN_PROGRESS
        )
    for pid in ("", "..", "a\nb"):
        with pytest.raises(InvalidIdentifierError):
            jobs.update_dataset(_settings(catalog_server), pid, jobs.archive_started())
    assert catalog_server.calls() == []
    assert not jobs.is_configured(DataCatalogSettings())


def test_secrets_never_reach_logs_exceptions_or_reprs(
    catalog_server: CatalogServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[Exception] = []

    bad_login = _settings(catalog_server, password="wrong-" + PASSWORD)
    with pytest.raises(DataCatalogError) as info:
        jobs.update_job(bad_login, "job-10", JobStatus.IN_PROGRESS)
    errors.append(info.value)

    settings = _settings(catalog_server)
    catalog_server.fail_next(2, 503)
    jobs.update_job(settings, "job-10", JobStatus.IN_PROGRESS, sleep=Sleeps())
    catalog_server.echo_auth_on_error = True
    with pytest.raises(DataCatalogError) as info:
        jobs.update_dataset(settings, "unknown", jobs.archive_started())
    errors.append(info.value)
    with pytest.raises(DataCatalogError) as info:
        jobs.update_dataset(_settings(catalog_server, token=TOKEN), "unknown", jobs.archive_started())
    errors.append(info.value)
    catalog_server.fail_next(10, "drop")
    with pytest.raises(TransientDataCatalogError) as info:
        jobs.update_job(settings, "job-10", JobStatus.FINISHED_SUCCESSFUL, sleep=Sleeps())
    errors.append(info.value)

    assert "HTTP 404" in str(errors[1])
    assert "'unknown'" in str(errors[1])
    texts = [caplog.text, *(str(e) for e in errors), *(repr(e) for e in errors)]
    texts += [repr(settings), str(settings), repr(_settings(catalog_server, token=TOKEN))]
    for text in texts:
        assert PASSWORD not in text
        assert TOKEN not in text
    assert "job-10" in caplog.text


def test_pids_become_safe_distinct_archive_ids() -> None:
    assert jobs.dataset_id_for_pid("ds-2026.01_a") == "ds-2026.01_a"
    scicat = jobs.dataset_id_for_pid("20.500.12269/abc-1")
    assert scicat.startswith("20.500.12269_abc-1-")
    assert check_id(scicat) == scicat
    assert jobs.dataset_id_for_pid("20.500.12269/abc-1") == scicat
    assert jobs.dataset_id_for_pid("a/b") != jobs.dataset_id_for_pid("a_b")
    with pytest.raises(InvalidIdentifierError):
        check_id(jobs.dataset_id_for_pid("../etc"))


def test_job_dataset_lists_accept_pids_and_scicat_objects() -> None:
    parsed = jobs.parse_job_datasets(
        "job-11",
        [
            "plain-1",
            {"pid": "20.500.12269/abc", "files": []},
            {"pid": "local-1", "source_dir": "/data/local-1", "dataset_id": "local-one"},
        ],
    )
    assert parsed == [
        JobDataset(pid="plain-1", dataset_id="plain-1", source_prefix="landing/plain-1/"),
        JobDataset(
            pid="20.500.12269/abc",
            dataset_id=jobs.dataset_id_for_pid("20.500.12269/abc"),
            source_prefix="landing/20.500.12269/abc/",
        ),
        JobDataset(pid="local-1", dataset_id="local-one", source_dir="/data/local-1"),
    ]
    bad_lists: list[list[str | dict[str, Any]]] = [[], [{"files": []}], ["a", "a"], [".."]]
    for bad in bad_lists:
        with pytest.raises(InvalidIdentifierError, match=r"job-11|'\.\.'"):
            jobs.parse_job_datasets("job-11", bad)


def _archive_result(landing_deleted: int) -> ArchiveResult:
    block = DatablockInfo(name="d1_00001.tar", size=10240, sha256="ab" * 32, files=3)
    return ArchiveResult(
        dataset_id="d1",
        source="store:landing/d1/",
        manifest_path="/lts/d1/manifest.json",
        file_count=3,
        total_bytes=300,
        archived_bytes=10240,
        datablocks=(block,),
        landing_deleted=landing_deleted,
    )


def test_outcomes_map_to_catalog_words_and_result_entries() -> None:
    ds = JobDataset(pid="20.500.1/d1", dataset_id="d1", source_prefix="landing/20.500.1/d1/")
    ok, lifecycle = jobs.archive_outcome(ds, _archive_result(landing_deleted=3))
    assert lifecycle == jobs.archive_succeeded(landing_removed=True)
    _, kept = jobs.archive_outcome(ds, _archive_result(landing_deleted=0))
    assert "isOnCentralDisk" not in kept.fields()
    missing, lifecycle = jobs.archive_outcome(
        ds, MissingFilesError("dataset 'd1': no files under landing/d1/")
    )
    assert lifecycle.fields() == {"archiveStatusMessage": "missingFilesError"}
    corrupt, lifecycle = jobs.archive_outcome(ds, VerificationError("d1_00001.tar: checksum differs"))
    assert lifecycle.fields() == {"archiveStatusMessage": "scheduleArchiveJobFailed", "archivable": True}

    expires = dt.datetime(2026, 1, 8, tzinfo=dt.UTC)
    retrieved = RetrieveResult(
        dataset_id="d1",
        prefix="retrieval/d1/",
        datablocks=(
            RetrievedBlock(
                name="d1_00001.tar",
                key="retrieval/d1/d1_00001.tar",
                size=10240,
                sha256="ab" * 32,
                url="http://127.0.0.1/retrieval/d1/d1_00001.tar?sig=1",
                copied=True,
            ),
        ),
        script_key="retrieval/d1/download.sh",
        script_url="http://127.0.0.1/retrieval/d1/download.sh?sig=2",
        expires_at=expires,
    )
    got, lifecycle = jobs.retrieve_outcome(ds, retrieved)
    assert lifecycle == jobs.retrieve_succeeded()

    body = jobs.job_result_object([ok, missing, corrupt, got])
    assert body["result"][0] == {
        "pid": "20.500.1/d1",
        "datasetId": "d1",
        "status": "datasetOnArchiveDisk",
        "success": True,
        "message": "3 files in 1 datablocks on LTS",
        "datablocks": 1,
        "size": 10240,
    }
    assert body["result"][1]["status"] == "missingFilesError"
    assert body["result"][1]["success"] is False
    assert "no files under landing/d1/" in body["result"][1]["message"]
    assert body["result"][2]["status"] == "scheduleArchiveJobFailed"
    assert body["result"][3]["urls"] == ["http://127.0.0.1/retrieval/d1/d1_00001.tar?sig=1"]
    assert body["result"][3]["downloadScript"] == retrieved.script_url
    assert body["result"][3]["expiresAt"] == expires.isoformat()
    message = jobs.job_state_message("archive", "job-12", [ok, missing, corrupt])
    assert "2 of 3 datasets failed" in message
    assert "missingFilesError" in message
    assert "scheduleArchiveJobFailed" in message


def test_status_reports_are_retried_by_the_client_alone() -> None:
    from skyvault.tasks.scicat import update_dataset, update_job

    # the client retries transient failures itself; a task retry on top would multiply the attempts
    assert update_job.retries == 0
    assert update_dataset.retries == 0

"""``ingest-samples`` as production runs it: killed while a large file goes in, then re-run."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from skyvault.config.settings import SeriesSettings, Settings, StoreSettings
from skyvault.series.database import sample_database
from skyvault.series.samples import SampleIngestReport
from skyvault.storage.store import open_store
from tests.conftest import release_tag_slots
from tests.flows.test_ingest import REPO, _ingest_env
from tests.series.common import SOURCE, database_settings, many_samples_jsonl, recorded_files, stored_rows

pytestmark = pytest.mark.usefixtures("prefect_harness")

SAMPLES = 150_000
CHUNK = 500
KEY = f"landing/samples/{SOURCE}/big.jsonl"
INGEST_SCRIPT = """
import sys
from pathlib import Path
from skyvault.flows.series import ingest_samples
state = ingest_samples(source=sys.argv[1], seed=False, return_state=True)
if state.is_completed():
    Path(sys.argv[2]).write_text(state.result().model_dump_json())
sys.exit(0 if state.is_completed() and state.name == "Completed" else 1)
"""


def _inserting(series: SeriesSettings) -> Callable[[], bool]:
    """A probe: true while another process's transaction is storing a file's samples."""
    if series.database == "sqlite":
        path = series.sqlite_path
        wal = path.with_name(path.name + "-wal")

        def sqlite_inserting() -> bool:
            # rows written and not committed spill into the WAL while the writer holds the lock
            if not wal.exists() or wal.stat().st_size < 1024**2:
                return False
            probe = sqlite3.connect(path, timeout=0, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
                return False
            except sqlite3.OperationalError as e:
                return "locked" in str(e)
            finally:
                probe.close()

        return sqlite_inserting
    assert series.dsn is not None
    dsn = series.dsn

    def postgres_inserting() -> bool:
        # a second chunk's statements run inside an open write transaction
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL"
                " AND (query LIKE 'TRUNCATE series_incoming%%' OR query LIKE 'WITH fresh AS%%')"
            ).fetchone()
        return row is not None and int(row[0]) > 0

    return postgres_inserting


def _start(env: dict[str, str], log: Path, report: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", INGEST_SCRIPT, SOURCE, str(report)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_ingest_killed_inside_a_file_stores_nothing_and_a_rerun_stores_it_once(
    kind: str, configure: Callable[..., Settings], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from prefect.settings import PREFECT_API_URL

    series = database_settings(kind, tmp_path, request)
    s = configure(StoreSettings(root=tmp_path / "store"), series=series.model_dump(mode="json"))
    with sample_database(s.series):  # the schema exists before the runs, as after a first ingest
        pass
    data, valid, bad = many_samples_jsonl(SAMPLES, seed=31, bad_every=997)
    open_store(s.store).put_bytes(KEY, data)
    env = _ingest_env(s, tmp_path, api_url=PREFECT_API_URL.value())
    env["SKYVAULT_SERIES__INGEST_CHUNK_SAMPLES"] = str(CHUNK)
    inserting = _inserting(s.series)

    log = tmp_path / "killed.log"
    proc = _start(env, log, tmp_path / "killed.json")
    try:
        deadline = time.monotonic() + 300
        while not inserting():
            assert proc.poll() is None, f"ingest ended before the kill point:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no samples were being stored:\n{log.read_text()[-3000:]}"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # nothing of the file is stored or recorded; its copy is left in the scratch folder
    assert stored_rows(s.series) == []
    assert recorded_files(s.series) == []
    assert any(p.is_file() for p in s.scratch_dir.rglob("*"))
    release_tag_slots()  # as a server's lease service frees the killed run's slots

    log = tmp_path / "rerun.log"
    rerun = _start(env, log, tmp_path / "rerun.json")
    assert rerun.wait(timeout=600) == 0, log.read_text()[-3000:]
    report = SampleIngestReport.model_validate_json((tmp_path / "rerun.json").read_text())
    (result,) = report.files
    assert (result.key, result.skipped) == (KEY, False)
    assert (result.inserted, result.duplicate, result.rejected) == (len(valid), 0, bad)
    rows = stored_rows(s.series)
    assert len(rows) == len(valid)
    assert {(r[0], r[1]) for r in rows} == valid
    assert [f[1:] for f in recorded_files(s.series)] == [(KEY, result.sha256, len(valid), 0, bad)]
    # the killed run's copy was swept by the re-run, which removed its own
    assert list(s.scratch_dir.rglob("*")) == []

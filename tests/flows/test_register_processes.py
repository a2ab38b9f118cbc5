"""``register`` into pgstac as production runs it: killed mid-run then re-run, and two at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from skyvault.cog.convert import cog_key, list_cogs, read_cog_record, write_cog_record
from skyvault.config.provision import provision_tag_limits
from skyvault.config.settings import Settings, StoreSettings
from skyvault.samples import write_samples
from skyvault.storage.store import open_store
from tests.conftest import release_tag_slots
from tests.flows.test_ingest import REPO, _ingest_env, run_ingest

pytestmark = pytest.mark.usefixtures("prefect_harness")

COLLECTION = "demo-dem"
COPIES = 120
REGISTER_SCRIPT = """
import sys
from skyvault.flows.register import register
state = register(collection=sys.argv[1], return_state=True)
sys.exit(0 if state.is_completed() and state.name == "Completed" else 1)
"""


def _many_cogs(s: Settings) -> list[str]:
    """``COPIES`` products of one collection, each with its own COG and record (copies of one)."""
    store = open_store(s.store)
    (template_id, *_) = list_cogs(COLLECTION, s.store)
    record = read_cog_record(COLLECTION, template_id, s.store)
    assert record is not None
    data = store.get_bytes(record.cog.key)
    ids = []
    for n in range(COPIES):
        product_id = f"copy-{n:04d}"
        key = cog_key(COLLECTION, product_id)
        store.put_bytes(key, data)
        product = record.product.model_copy(update={"id": product_id})
        write_cog_record(product, record.cog.model_copy(update={"product_id": product_id, "key": key}), store)
        ids.append(product_id)
    return ids


def _stored(dsn: str) -> list[tuple[str, int]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, count(*) FROM pgstac.items WHERE collection = %s GROUP BY id ORDER BY id",
            (COLLECTION,),
        ).fetchall()
    return [(str(r[0]), int(r[1])) for r in rows]


def _setup(configure: Callable[..., Settings], tmp_path: Path, pgstac_dsn: str) -> tuple[Settings, list[str]]:
    store = StoreSettings(root=tmp_path / "store")
    s = configure(store)
    write_samples(open_store(s.store))
    run_ingest(seed_tiles=False)
    copies = _many_cogs(s)
    everything = list_cogs(COLLECTION, s.store)
    assert set(copies) <= set(everything)
    s = configure(
        store, catalog={"backend": "pgstac", "dsn": pgstac_dsn, "batch_size": 10, "build_workers": 1}
    )
    provision_tag_limits(s)  # as production has them: one catalog writer per collection
    return s, everything


def _register(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", REGISTER_SCRIPT, COLLECTION],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_register_killed_between_batches_converges_on_a_rerun(
    configure: Callable[..., Settings], tmp_path: Path, pgstac_dsn: str
) -> None:
    from prefect.settings import PREFECT_API_URL

    s, ids = _setup(configure, tmp_path, pgstac_dsn)
    env = _ingest_env(s, tmp_path, api_url=PREFECT_API_URL.value())

    proc = _register(env, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 300
        while not _stored(pgstac_dsn):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no batch was written"
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = _stored(pgstac_dsn)
    assert 0 < len(partial) < len(ids), "the kill came after the last batch"
    assert all(n == 1 for _, n in partial)
    # the killed run's catalog-write slot comes back as a server's repossessor returns it
    release_tag_slots()

    rerun = _register(env, tmp_path / "rerun.log")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert _stored(pgstac_dsn) == [(i, 1) for i in ids]


def test_two_register_runs_on_one_collection_store_every_item_once(
    configure: Callable[..., Settings], tmp_path: Path, pgstac_dsn: str
) -> None:
    from prefect.settings import PREFECT_API_URL

    s, ids = _setup(configure, tmp_path, pgstac_dsn)
    env = _ingest_env(s, tmp_path, api_url=PREFECT_API_URL.value())

    runs = [_register(env, tmp_path / f"run-{n}.log") for n in range(2)]
    codes = [p.wait(timeout=600) for p in runs]

    assert codes == [0, 0], [(tmp_path / f"run-{n}.log").read_text()[-3000:] for n in range(2)]
    assert _stored(pgstac_dsn) == [(i, 1) for i in ids]

"""The catalog backup and restore flows under a real Prefect server, on PostgreSQL with pgstac."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from bench.common import create_database
from skyvault.catalog.backup import BackupInfo, RestoreInfo
from skyvault.config.settings import Settings, StoreSettings
from skyvault.errors import ConfigError
from skyvault.flows.backup import backup_catalog, restore_catalog
from skyvault.storage.store import open_store
from tests.catalog.test_backup import COUNTS, db_counts, load_catalog
from tests.conftest import PgstacServer

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _markdown(flow_run_id: UUID | None) -> str:
    assert flow_run_id is not None
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert len(artifacts) == 1
    return str(artifacts[0].data)


@pytest.fixture
def pgstac_settings(
    configure: Callable[..., Settings], pgstac_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings whose catalog is a pgstac database holding three items in alpha and two in beta."""
    load_catalog(pgstac_dsn, COUNTS)
    monkeypatch.setenv("SKYVAULT_CATALOG__BACKEND", "pgstac")
    monkeypatch.setenv("SKYVAULT_CATALOG__DSN", pgstac_dsn)
    return configure(StoreSettings(root=tmp_path / "store"))


def test_the_backup_flow_writes_a_dump_that_the_restore_flow_restores(
    pgstac_settings: Settings, pgstac_server: PgstacServer
) -> None:
    state = backup_catalog(return_state=True)
    assert state.is_completed()
    info: BackupInfo = state.result()
    assert info.counts == COUNTS
    objects = open_store(pgstac_settings.store)
    assert objects.exists(info.key)
    assert objects.exists(info.sidecar_key)
    assert info.key.startswith("backups/catalog/")
    summary = _markdown(state.state_details.flow_run_id)
    assert info.key in summary
    assert "| `alpha` | 3 |" in summary
    assert "| `beta` | 2 |" in summary

    target = create_database(pgstac_server.port, "r_" + os.urandom(6).hex())
    restore_state = restore_catalog(target, return_state=True)
    assert restore_state.is_completed()
    restored: RestoreInfo = restore_state.result()
    assert restored.key == info.key
    assert restored.counts == COUNTS
    assert db_counts(target) == COUNTS
    assert "| **total** | **5** |" in _markdown(restore_state.state_details.flow_run_id)


def test_the_backup_flow_fails_at_once_on_a_catalog_that_is_not_pgstac(
    configure: Callable[..., Settings], tmp_path: Path
) -> None:
    configure(StoreSettings(root=tmp_path / "store"))
    state = backup_catalog(return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match="pgstac"):
        state.result()
    assert not (tmp_path / "store").exists()

"""Task adapters for :mod:`skyvault.catalog.backup`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from prefect import task
from pydantic import SecretStr

from skyvault.catalog import backup
from skyvault.catalog.backup import BackupInfo, RestoreInfo
from skyvault.config.settings import CatalogSettings, StoreSettings
from skyvault.tasks.policy import TASK_POLICY


@task(name="backup-catalog", tags=["catalog-backup"], **TASK_POLICY)
def backup_catalog(
    catalog: CatalogSettings,
    store: StoreSettings,
    *,
    now: dt.datetime | None = None,
    scratch_dir: Path | None = None,
    stale_scratch_seconds: float = 24 * 3600.0,
) -> BackupInfo:
    """Task: :func:`skyvault.catalog.backup.backup_catalog`."""
    return backup.backup_catalog(
        catalog, store, now=now, scratch_dir=scratch_dir, stale_scratch_seconds=stale_scratch_seconds
    )


@task(name="restore-catalog", **TASK_POLICY)
def restore_catalog(
    dump_key: str | None,
    target_dsn: str,
    catalog: CatalogSettings,
    store: StoreSettings,
    *,
    target_password: SecretStr | None = None,
    scratch_dir: Path | None = None,
    stale_scratch_seconds: float = 24 * 3600.0,
) -> RestoreInfo:
    """Task: :func:`skyvault.catalog.backup.restore_catalog`."""
    return backup.restore_catalog(
        dump_key,
        target_dsn,
        catalog,
        store,
        target_password=target_password,
        scratch_dir=scratch_dir,
        stale_scratch_seconds=stale_scratch_seconds,
    )

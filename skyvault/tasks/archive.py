"""Task adapters for :mod:`skyvault.archive`."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from skyvault.archive import lts, packing
from skyvault.config.settings import LtsSettings, StoreSettings
from skyvault.models import (
    Datablock,
    DatasetFile,
    DatasetSource,
    Manifest,
    PlannedDatablock,
    RetrieveResult,
)
from skyvault.tasks.policy import TASK_POLICY


@task(name="list-dataset", **TASK_POLICY)
def list_dataset(source: DatasetSource, store: StoreSettings) -> list[DatasetFile]:
    """Task: :func:`skyvault.archive.packing.list_dataset`."""
    return packing.list_dataset(source, store)


@task(name="plan-datablocks", **TASK_POLICY)
def plan_datablocks(dataset_id: str, files: list[DatasetFile], target_bytes: int) -> list[PlannedDatablock]:
    """Task: :func:`skyvault.archive.packing.plan_datablocks`."""
    return packing.plan_datablocks(dataset_id, files, target_bytes)


@task(name="changed-files", tags=["object-store-read"], **TASK_POLICY)
def changed_files(
    source: DatasetSource,
    files: list[DatasetFile],
    store: StoreSettings,
    expected: dict[str, tuple[int, str]],
) -> list[str]:
    """Task: :func:`skyvault.archive.packing.changed_files`."""
    return packing.changed_files(source, files, store, expected)


@task(name="delete-files", tags=["object-store-write"], **TASK_POLICY)
def delete_files(source: DatasetSource, files: list[DatasetFile], store: StoreSettings) -> int:
    """Task: :func:`skyvault.archive.packing.delete_files`."""
    return packing.delete_files(source, files, store)


@task(name="ensure-free-space", **TASK_POLICY)
def ensure_free_space(lts_settings: LtsSettings, dataset_id: str, needed: int) -> int:
    """Task: :func:`skyvault.archive.lts.ensure_free_space`."""
    return lts.ensure_free_space(lts_settings, dataset_id, needed)


@task(name="remove-partial", **TASK_POLICY)
def remove_partial(lts_settings: LtsSettings, dataset_id: str) -> list[str]:
    """Task: :func:`skyvault.archive.lts.remove_partial`."""
    return lts.remove_partial(lts_settings, dataset_id)


@task(name="write-datablock", task_run_name="write/{block.name}", tags=["lts-write"], **TASK_POLICY)
def write_datablock(
    block: PlannedDatablock, source: DatasetSource, store: StoreSettings, lts_settings: LtsSettings
) -> Datablock:
    """Task: :func:`skyvault.archive.lts.write_datablock`."""
    return lts.write_datablock(block, source, store, lts_settings)


@task(name="verify-datablock", task_run_name="verify/{block.name}", tags=["lts-read"], **TASK_POLICY)
def verify_datablock(lts_settings: LtsSettings, dataset_id: str, block: Datablock) -> Datablock:
    """Task: :func:`skyvault.archive.lts.verify_datablock`."""
    return lts.verify_datablock(lts_settings, dataset_id, block)


@task(name="write-manifest", **TASK_POLICY)
def write_manifest(lts_settings: LtsSettings, manifest: Manifest) -> Path:
    """Task: :func:`skyvault.archive.lts.write_manifest`."""
    return lts.write_manifest(lts_settings, manifest)


@task(name="read-manifest", **TASK_POLICY)
def read_manifest(lts_settings: LtsSettings, dataset_id: str) -> Manifest | None:
    """Task: :func:`skyvault.archive.lts.read_manifest`."""
    return lts.read_manifest(lts_settings, dataset_id)


@task(
    name="retrieved-copy-ok",
    task_run_name="check-retrieved/{block.name}",
    tags=["object-store-read"],
    **TASK_POLICY,
)
def retrieved_copy_ok(
    lts_settings: LtsSettings, store: StoreSettings, dataset_id: str, block: Datablock
) -> bool:
    """Task: :func:`skyvault.archive.lts.retrieved_copy_ok`."""
    return lts.retrieved_copy_ok(lts_settings, store, dataset_id, block)


@task(
    name="upload-datablock",
    task_run_name="upload/{block.name}",
    tags=["lts-read", "object-store-write"],
    **TASK_POLICY,
)
def upload_datablock(
    lts_settings: LtsSettings, store: StoreSettings, dataset_id: str, block: Datablock
) -> str:
    """Task: :func:`skyvault.archive.lts.upload_datablock`."""
    return lts.upload_datablock(lts_settings, store, dataset_id, block)


@task(name="publish-retrieval", **TASK_POLICY)
def publish_retrieval(
    lts_settings: LtsSettings, store: StoreSettings, manifest: Manifest, copied: set[str]
) -> RetrieveResult:
    """Task: :func:`skyvault.archive.lts.publish_retrieval`."""
    return lts.publish_retrieval(lts_settings, store, manifest, copied)

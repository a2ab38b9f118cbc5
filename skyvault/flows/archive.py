"""The archive flow: a dataset from its landing prefix (or a local folder) to verified LTS datablocks.

Steps: list the files, plan the datablocks, clear what a crashed run may have left, check LTS has
room, write every datablock (checksummed while streamed), read each back uncached and verify it,
write the manifest, and only then delete the landing data. One archive run per dataset at a time
(a ``flock`` on LTS, which the kernel frees when its holder is killed); a failed or cancelled run
removes its partial datablocks and leaves the landing data as it was, and the next run removes
whatever a killed one left, so a re-run converges.
"""

from __future__ import annotations

import re
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture, wait

from skyvault.archive import lts as lts_store
from skyvault.archive.lts import build_manifest, dataset_lock, manifest_path
from skyvault.archive.packing import dataset_source
from skyvault.config.settings import StoreSettings, get_settings
from skyvault.errors import DatasetError, InvalidIdentifierError, LockTimeoutError
from skyvault.ids import check_id
from skyvault.models import ArchiveResult, Datablock, DatablockInfo, DatasetFile, DatasetSource, Manifest
from skyvault.tasks.archive import (
    changed_files,
    delete_files,
    ensure_free_space,
    list_dataset,
    plan_datablocks,
    read_manifest,
    remove_partial,
    verify_datablock,
    write_datablock,
    write_manifest,
)

#: The failure hook only tries the lock: a run holding it removes partial files itself when it starts.
CLEANUP_LOCK_TIMEOUT_SECONDS = 0.0


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) made from ids."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def _clean_up(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_failure`` / ``on_cancellation``: remove ``.part`` files and unmanifested datablocks."""
    logger = get_run_logger()
    dataset_id = flow_run.parameters.get("dataset_id")
    try:
        check_id(dataset_id, "dataset id")
    except InvalidIdentifierError:
        return
    settings = get_settings()
    try:
        with dataset_lock(settings.lts, "archive", dataset_id, timeout_seconds=CLEANUP_LOCK_TIMEOUT_SECONDS):
            removed = lts_store.remove_partial(settings.lts, dataset_id)
    except LockTimeoutError:
        logger.warning(
            "dataset %r: another archive run holds the dataset; it cleans up after itself", dataset_id
        )
        return
    if removed:
        logger.info("dataset %r: removed %d partial file(s) from LTS: %s", dataset_id, len(removed), removed)


def _summary(result: ArchiveResult, keep: bool) -> str:
    landing = "kept" if keep or not result.created else f"{result.landing_deleted} file(s) deleted"
    rows = "\n".join(f"| {b.name} | {b.files} | {b.size} | `{b.sha256}` |" for b in result.datablocks)
    state = "archived" if result.created else "already archived; nothing written"
    return (
        f"# Archive of dataset `{result.dataset_id}`\n\n"
        f"{state.capitalize()}: {result.file_count} files, {result.total_bytes} bytes, "
        f"in {len(result.datablocks)} datablock(s) of {result.archived_bytes} bytes, each read back "
        f"and verified.\n\n"
        f"- source: `{result.source}`\n- manifest: `{result.manifest_path}`\n- landing data: {landing}\n\n"
        f"| datablock | files | bytes | sha256 |\n|---|---:|---:|---|\n{rows}\n"
    )


def _result(
    source: DatasetSource, manifest: Manifest, path: str, deleted: int, *, created: bool
) -> ArchiveResult:
    return ArchiveResult(
        dataset_id=source.dataset_id,
        source=manifest.source,
        manifest_path=path,
        file_count=manifest.file_count,
        total_bytes=manifest.total_bytes,
        archived_bytes=sum(b.size for b in manifest.datablocks),
        datablocks=tuple(DatablockInfo.of(b) for b in manifest.datablocks),
        landing_deleted=deleted,
        created=created,
    )


def _results(futures: list[PrefectFuture[Datablock]]) -> list[Datablock]:
    return [f.result() for f in futures]


@flow(
    name="archive",
    flow_run_name="archive/{dataset_id}",
    on_failure=[_clean_up],
    on_cancellation=[_clean_up],
)
def archive(
    dataset_id: str,
    source_prefix: str | None = None,
    source_dir: str | None = None,
    keep_landing: bool | None = None,
) -> ArchiveResult:
    """Archive a dataset to LTS: tar datablocks, checksummed, verified by reading back, then a manifest.

    The source is the object-store prefix ``landing/<dataset_id>/`` unless ``source_prefix`` (another
    prefix) or ``source_dir`` (a local folder) is given. The landing data is deleted once the
    manifest is written, unless ``keep_landing`` (default: ``settings.lts.keep_landing``). A dataset
    that already has a manifest is not written again; its landing files are deleted only if they
    match the archive byte for byte.

    Raises:
        InvalidIdentifierError: the dataset id is unsafe (checked before any I/O).
        UnsafePathError: a member path or link would leave the dataset.
        MissingFilesError: the dataset has no files.
        InsufficientSpaceError: LTS lacks room for the datablocks plus the margin.
        VerificationError: a datablock read back from LTS does not match what was written.

    """
    source = dataset_source(dataset_id, source_prefix=source_prefix, source_dir=source_dir)
    settings = get_settings()
    lts, store = settings.lts, settings.store
    keep = lts.keep_landing if keep_landing is None else keep_landing
    with dataset_lock(lts, "archive", dataset_id, timeout_seconds=settings.locks.wait_seconds):
        files: list[DatasetFile] = list_dataset(source, store)
        manifest = read_manifest(lts, dataset_id)
        if manifest is not None:
            deleted = _finish_archived(source, files, manifest, keep, store)
            result = _result(source, manifest, str(manifest_path(lts, dataset_id)), deleted, created=False)
        else:
            planned = plan_datablocks(dataset_id, files, lts.datablock_bytes)
            remove_partial(lts, dataset_id)
            ensure_free_space(lts, dataset_id, sum(b.size for b in planned))
            tags = ["lts-write", "object-store-read"] if source.kind == "store" else ["lts-write"]
            writer = write_datablock.with_options(tags=tags)
            written = [writer.submit(b, source, store, lts) for b in planned]
            verified = [verify_datablock.submit(lts, dataset_id, w, return_state=False) for w in written]
            wait([*written, *verified])
            _results(written)
            manifest = build_manifest(source, lts, _results(verified))
            path = write_manifest(lts, manifest)
            deleted = 0 if keep else delete_files(source, files, store)
            result = _result(source, manifest, str(path), deleted, created=True)
    create_markdown_artifact(
        key=artifact_key("archive", dataset_id),
        markdown=_summary(result, keep),
        description="archive summary",
    )
    create_table_artifact(
        key=artifact_key("archive", dataset_id, "datablocks"),
        table=[b.model_dump(mode="json") for b in result.datablocks],
        description=f"datablocks of dataset {dataset_id}",
    )
    return result


def _finish_archived(
    source: DatasetSource, files: list[DatasetFile], manifest: Manifest, keep: bool, store: StoreSettings
) -> int:
    """A dataset already archived: landing files left over must match the archive; then they go."""
    if not files:
        return 0
    expected = {m.path: (m.size, m.sha256) for b in manifest.datablocks for m in b.members}
    changed = changed_files(source, files, store, expected)
    if changed:
        shown = ", ".join(repr(p) for p in changed[:5])
        raise DatasetError(
            f"dataset {source.dataset_id!r} is already archived, but {len(changed)} landing file(s) differ "
            f"from the archive ({shown}); archive them under a new dataset id"
        )
    if keep:
        return 0
    deleted: int = delete_files(source, files, store)
    return deleted

"""The catalog database flows: a scheduled dump of the pgstac database, and its checked restore."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from skyvault.catalog.backup import BackupInfo, RestoreInfo, target_password
from skyvault.config.settings import get_settings
from skyvault.tasks import backup as backup_tasks


def _counts_table(counts: dict[str, int]) -> str:
    rows = "\n".join(f"| `{name}` | {n} |" for name, n in sorted(counts.items()))
    total = sum(counts.values())
    return f"| collection | items |\n|---|---:|\n{rows}\n| **total** | **{total}** |\n"


def backup_summary(info: BackupInfo) -> str:
    """The markdown artifact of a backup: the dump, its item counts and what retention deleted."""
    deleted = "".join(f"- `{key}`\n" for key in info.deleted) or "- nothing\n"
    failed = "".join(f"- `{key}`: {why}\n" for key, why in info.not_deleted.items())
    return (
        f"# Catalog backup `{info.key}`\n\n"
        f"Database `{info.database}` (pgstac {info.pgstac_version or 'unknown'}), "
        f"{info.size} bytes, sha256 `{info.sha256}`.\n\n"
        f"{_counts_table(info.counts)}\n"
        f"Expired backups deleted:\n\n{deleted}"
        + (f"\nExpired backups that could not be deleted (retried next time):\n\n{failed}" if failed else "")
    )


def restore_summary(info: RestoreInfo) -> str:
    """The markdown artifact of a restore: the dump, the database and the item counts checked."""
    return (
        f"# Catalog restore of `{info.key}`\n\n"
        f"Restored into database `{info.database}`; every collection holds as many items as "
        f"when the dump was taken.\n\n{_counts_table(info.counts)}"
    )


@flow(name="backup-catalog")
def backup_catalog() -> BackupInfo:
    """Dump the pgstac catalog database to the object store; then delete dumps past their retention.

    The dump goes to ``catalog.backup_prefix`` with a sidecar holding the item count per
    collection; dumps older than ``catalog.backup_keep_days`` are deleted once it is complete.
    """
    settings = get_settings()
    info = backup_tasks.backup_catalog(
        settings.catalog,
        settings.store,
        scratch_dir=settings.scratch_dir,
        stale_scratch_seconds=settings.limits.stale_scratch_seconds,
    )
    create_markdown_artifact(
        key="backup-catalog", markdown=backup_summary(info), description="catalog database backup"
    )
    return info


@flow(name="restore-catalog")
def restore_catalog(target_dsn: str, dump_key: str | None = None) -> RestoreInfo:
    """Restore a catalog dump into the new, empty database ``target_dsn`` and check its item counts.

    ``dump_key`` names the dump (its key, ``<stamp>.dump`` or ``<stamp>``); None restores the
    newest complete one. Give ``target_dsn`` without a password (flow parameters are stored in
    plain text): on the catalog's own server, as its user, the catalog's password is used.
    """
    settings = get_settings()
    info = backup_tasks.restore_catalog(
        dump_key,
        target_dsn,
        settings.catalog,
        settings.store,
        target_password=target_password(target_dsn, settings.catalog),
        scratch_dir=settings.scratch_dir,
        stale_scratch_seconds=settings.limits.stale_scratch_seconds,
    )
    create_markdown_artifact(
        key="restore-catalog", markdown=restore_summary(info), description="catalog database restore"
    )
    return info

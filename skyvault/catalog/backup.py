"""Dumps of the pgstac catalog database on the object store, their retention, and a checked restore.

A backup is ``<backup_prefix>/<UTC stamp>.dump`` (``pg_dump --format=custom``) and, written after
it, the sidecar ``<backup_prefix>/<UTC stamp>.json`` that marks the dump complete: when it was made,
the database, the pgstac version, the item count per collection, and the dump's size and sha256.
The counts are read in the snapshot the dump is taken from (``pg_export_snapshot`` shared with
``pg_dump --snapshot``), so a restore can be checked against them exactly. Dumps older than
``backup_keep_days`` are deleted only once a new backup is complete.

A restore downloads a complete dump, checks its sha256, and replays it into a new, empty database
in one transaction (``pg_restore --single-transaction`` as a script, run by ``psql`` with
``ON_ERROR_STOP``): a replay that fails leaves the target as it was; one whose item counts differ
from the sidecar's is reported and left in place for inspection. The script's
``search_path`` is set to ``pgstac, public`` instead of pg_dump's empty one, because pgstac's SQL
functions name PostGIS functions without their schema. The target must be able to create the
extensions the dump creates (postgis, btree_gist, unaccent) and hold the pgstac roles the dump
grants to (``pgstac_admin``, ``pgstac_ingest``, ``pgstac_read``); ``pypgstac migrate`` creates them.

Passwords reach the PostgreSQL tools only through the ``PGPASSWORD`` variable of the child process,
never on a command line, and never appear in messages.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from skyvault.checksum import sha256_file
from skyvault.cog.scratch import scratch_folder
from skyvault.config.settings import CatalogSettings, StoreSettings
from skyvault.errors import (
    BackupError,
    ConfigError,
    ObjectNotFoundError,
    SkyvaultError,
    StorageError,
    TransientCatalogError,
)
from skyvault.storage.store import ObjectStore, open_store

logger = logging.getLogger(__name__)

#: How a dump is named: its creation time in UTC, to the second.
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
DUMP_SUFFIX, SIDECAR_SUFFIX = ".dump", ".json"
_NAME = re.compile(r"^(\d{8}T\d{6}Z)\.(dump|json)$")

#: Item count per collection, read in the snapshot the dump is taken from.
COUNTS_SQL = "SELECT collection, count(*) FROM pgstac.items GROUP BY collection"

#: The search path the restore script runs with (pg_dump empties it; pgstac needs PostGIS in public).
RESTORE_SEARCH_PATH = "pgstac, public"
_EMPTY_SEARCH_PATH = b"SELECT pg_catalog.set_config('search_path', '', false);\n"
_PINNED_SEARCH_PATH = (
    f"SELECT pg_catalog.set_config('search_path', '{RESTORE_SEARCH_PATH}', false);\n".encode()
)
#: Lines of the restore script's header searched for pg_dump's search path setting.
_HEADER_LINES = 200

#: Where Debian and Ubuntu install the PostgreSQL client of each major version.
PG_LIB_DIRS = "/usr/lib/postgresql"

#: Connection failures that a retry cannot mend: the server answered and refused.
_REFUSED = re.compile(
    r"does not exist|authentication failed|no pg_hba\.conf entry|no password supplied|"
    r"not permitted to log in|permission denied|password is required|"
    r"(?:SSL|GSSAPI) .*(?:required|not supported)",
    re.IGNORECASE,
)

#: Characters of a tool's stderr kept in an error message (its end: where the reason is).
STDERR_TAIL = 2000


class BackupInfo(BaseModel):
    """One complete dump of the catalog database on the object store."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: The dump's key; its sidecar is the same key with ``.json`` in place of ``.dump``.
    key: str
    created: dt.datetime
    database: str
    pgstac_version: str | None = None
    #: Items per collection when the dump was taken (collections without items are not listed).
    counts: dict[str, int] = Field(default_factory=dict)
    size: int
    sha256: str
    #: Keys of the expired dumps and sidecars that this backup deleted.
    deleted: tuple[str, ...] = ()
    #: Expired keys that could not be deleted, with the reason; the next backup tries again.
    not_deleted: dict[str, str] = Field(default_factory=dict)

    @property
    def sidecar_key(self) -> str:
        """The sidecar's key."""
        return sidecar_key(self.key)


class RestoreInfo(BaseModel):
    """A dump restored into a database, its item counts checked against the dump's sidecar."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    database: str
    counts: dict[str, int] = Field(default_factory=dict)


class _Sidecar(BaseModel):
    """The sidecar document of a dump (``<stamp>.json``)."""

    model_config = ConfigDict(extra="ignore")

    created: dt.datetime
    dsn_database: str
    pgstac_version: str | None = None
    counts: dict[str, int]
    size: int
    sha256: str
    pg_dump_version: str | None = None


# --- names ----------------------------------------------------------------------------------------


def _prefix(catalog: CatalogSettings) -> str:
    return catalog.backup_prefix.strip("/")


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def dump_key(catalog: CatalogSettings, created: dt.datetime) -> str:
    """The key of the dump made at ``created``: ``<backup_prefix>/20261201T020000Z.dump``."""
    return f"{_prefix(catalog)}/{_utc(created).strftime(STAMP_FORMAT)}{DUMP_SUFFIX}"


def sidecar_key(key: str) -> str:
    """The sidecar key of the dump ``key``."""
    return key.removesuffix(DUMP_SUFFIX) + SIDECAR_SUFFIX


def _chosen_key(catalog: CatalogSettings, given: str) -> str:
    """A dump key from a full key, a file name (``<stamp>.dump``) or a bare stamp."""
    key = given.strip()
    if "/" not in key:
        key = f"{_prefix(catalog)}/{key}"
    if not key.endswith(DUMP_SUFFIX):
        key += DUMP_SUFFIX
    return key


def _stamp_time(stamp: str) -> dt.datetime:
    return dt.datetime.strptime(stamp, STAMP_FORMAT).replace(tzinfo=dt.UTC)


def _stored_stamps(store: ObjectStore, catalog: CatalogSettings) -> dict[str, set[str]]:
    """The stamps of the files directly under the backup prefix, with the suffixes found for each."""
    prefix = _prefix(catalog) + "/"
    found: dict[str, set[str]] = {}
    for info in store.list(prefix):
        match = _NAME.match(info.key[len(prefix) :])
        if match is not None:
            found.setdefault(match.group(1), set()).add(match.group(2))
    return found


# --- databases and tools --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Database:
    """A database to connect to: a libpq conninfo without password, and the password apart."""

    conninfo: str
    password: SecretStr | None
    name: str
    where: str

    @property
    def label(self) -> str:
        """How messages name the database: ``'catalog' on 127.0.0.1:5432``."""
        return f"{self.name!r} on {self.where}"

    def env(self) -> dict[str, str]:
        """The environment of a PostgreSQL tool that connects to this database."""
        env = dict(os.environ)
        if self.password is not None:
            env["PGPASSWORD"] = self.password.get_secret_value()
        return env

    def redact(self, text: str) -> str:
        """``text`` without the password."""
        secret = self.password.get_secret_value() if self.password is not None else ""
        return text.replace(secret, "***") if secret else text


def _database(dsn: str, password: SecretStr | None, timeout_seconds: float, what: str) -> _Database:
    """Split ``dsn`` into a conninfo without password and the password (``password`` wins).

    Raises:
        ConfigError: ``dsn`` is not a PostgreSQL connection string.

    """
    try:
        params: dict[str, Any] = conninfo_to_dict(dsn)
    except psycopg.Error:
        raise ConfigError(f"{what} is not a valid PostgreSQL connection string") from None
    embedded = params.pop("password", None)
    if password is None and embedded:
        password = SecretStr(str(embedded))
    params.setdefault("connect_timeout", str(max(1, round(timeout_seconds))))
    params.setdefault("application_name", "skyvault-catalog-backup")
    host = str(params.get("host") or "local socket")
    name = str(params.get("dbname") or params.get("user") or "(default)")
    return _Database(
        conninfo=make_conninfo("", **params),
        password=password,
        name=name,
        where=f"{host}:{params.get('port') or 5432}",
    )


def _server_of(dsn: str) -> tuple[str, str, str] | None:
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return None
    return str(params.get("host") or ""), str(params.get("port") or "5432"), str(params.get("user") or "")


def target_password(target_dsn: str, catalog: CatalogSettings) -> SecretStr | None:
    """The password for a restore target: the catalog's when the target is on its server, as its user.

    Returns None when the target names another server or user, or holds a password of its own.
    """
    if catalog.dsn is None:
        return None
    try:
        if conninfo_to_dict(target_dsn).get("password"):
            return None
    except psycopg.Error:
        return None
    if _server_of(target_dsn) != _server_of(catalog.dsn):
        return None
    return _database(catalog.dsn, catalog.password, catalog.timeout_seconds, "catalog.dsn").password


def _tool_version(path: Path) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\)\s*(\d+(?:\.\d+)*)", out)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


@functools.lru_cache(maxsize=1)
def _client() -> tuple[Path, tuple[int, ...]]:
    """The folder and version of the newest ``pg_dump``: under ``/usr/lib/postgresql/*/bin`` or on ``PATH``.

    ``pg_restore`` and ``psql`` are taken from the same folder, so the three are of one version.

    Raises:
        BackupError: no ``pg_dump`` is installed.

    """
    candidates = [p.parent for p in sorted(Path(PG_LIB_DIRS).glob("*/bin/pg_dump"))]
    on_path = shutil.which("pg_dump")
    if on_path is not None:
        candidates.append(Path(on_path).parent)
    best: tuple[Path, tuple[int, ...]] | None = None
    for folder in candidates:
        version = _tool_version(folder / "pg_dump")
        if version is not None and (best is None or version > best[1]):
            best = (folder, version)
    if best is None:
        raise BackupError(
            "pg_dump is not installed (looked on PATH and under "
            f"{PG_LIB_DIRS}/*/bin): install the PostgreSQL client of the server's version or newer"
        )
    return best


def _tool(name: str) -> str:
    """The path of the PostgreSQL client tool ``name`` (``pg_dump``, ``pg_restore``, ``psql``)."""
    folder = _client()[0]
    path = folder / name
    if not path.exists():
        raise BackupError(f"{name} is missing beside pg_dump in {folder}")
    return str(path)


def _tail(path: Path, db: _Database) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return db.redact(text.strip()[-STDERR_TAIL:])


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _db_error(e: psycopg.Error, db: _Database, doing: str) -> SkyvaultError:
    """A psycopg error as a skyvault one: unreachable or dropped connections are transient."""
    reason = db.redact(_one_line(str(e)))
    if isinstance(e, psycopg.OperationalError) and not _REFUSED.search(reason):
        return TransientCatalogError(f"{doing}: database {db.label} is unreachable: {reason}")
    if isinstance(e, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
        return BackupError(f"{doing}: database {db.label} holds no pgstac catalog: {reason}")
    return BackupError(f"{doing}: database {db.label}: {reason}")


@contextlib.contextmanager
def _connect(db: _Database, doing: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to ``db``; psycopg errors inside become skyvault errors."""
    password = db.password.get_secret_value() if db.password is not None else None
    try:
        conn = psycopg.connect(db.conninfo, password=password, autocommit=True)
    except psycopg.Error as e:
        raise _db_error(e, db, doing) from e
    try:
        with conn:
            yield conn
    except psycopg.Error as e:
        raise _db_error(e, db, doing) from e


def _counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return {str(collection): int(n) for collection, n in conn.execute(COUNTS_SQL).fetchall()}


@contextlib.contextmanager
def _work_folder(scratch_dir: Path | None, stale_seconds: float, doing: str) -> Iterator[Path]:
    """A scratch folder for one dump, removed afterwards (and swept if its process dies)."""
    base = scratch_dir if scratch_dir is not None else Path(tempfile.gettempdir())
    with contextlib.ExitStack() as stack:
        try:
            work = stack.enter_context(scratch_folder(base, "catalog-backup", doing, stale_seconds))
        except SkyvaultError as e:
            raise BackupError(f"{doing}: cannot create a scratch folder in {base}: {e}") from e
        yield work


# --- backup ---------------------------------------------------------------------------------------


def backup_catalog(
    catalog: CatalogSettings,
    store: StoreSettings,
    *,
    now: dt.datetime | None = None,
    scratch_dir: Path | None = None,
    stale_scratch_seconds: float = 24 * 3600.0,
) -> BackupInfo:
    """Dump the pgstac database to the object store, then delete the dumps past their retention.

    Args:
        catalog: The catalog settings (``backend`` must be ``pgstac``).
        store: The object store that receives the dump.
        now: When the backup is made (default: now); names the dump and dates the retention.
        scratch_dir: Where the dump is written before its upload (default: the system temp dir).
        stale_scratch_seconds: Age after which a scratch folder of another host is swept.

    Returns:
        The new dump, with the keys of the expired ones deleted.

    Raises:
        ConfigError: the catalog backend is not pgstac.
        TransientCatalogError: the database cannot be reached.
        BackupError: the database refused, holds no pgstac catalog, or pg_dump failed; no existing
            dump is touched then.

    """
    if catalog.backend != "pgstac" or not catalog.dsn:
        raise ConfigError(
            f"catalog backups need catalog.backend 'pgstac' with a catalog.dsn; this catalog is "
            f"{catalog.backend!r}"
        )
    created = _utc(now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    db = _database(catalog.dsn, catalog.password, catalog.timeout_seconds, "catalog.dsn")
    key = dump_key(catalog, created)
    objects = open_store(store)
    doing = f"backup of database {db.label}"
    if objects.exists(key) or objects.exists(sidecar_key(key)):
        raise BackupError(f"{doing}: a backup named {key!r} already exists; run it again in a second")
    with _work_folder(scratch_dir, stale_scratch_seconds, doing) as work:
        path = work / "catalog.dump"
        version, counts = _dump(db, path, work, doing)
        sha256, size = sha256_file(path)
        objects.put_file(key, path, content_type="application/octet-stream")
    sidecar = _Sidecar(
        created=created,
        dsn_database=db.name,
        pgstac_version=version,
        counts=counts,
        size=size,
        sha256=sha256,
        pg_dump_version=".".join(map(str, _client()[1])),
    )
    objects.put_bytes(sidecar_key(key), _sidecar_bytes(sidecar), content_type="application/json")
    logger.info("catalog database %s dumped to %s (%d bytes)", db.label, key, size)
    deleted, not_deleted = _prune(objects, catalog, keep=created.strftime(STAMP_FORMAT), now=created)
    return BackupInfo(
        key=key,
        created=created,
        database=db.name,
        pgstac_version=version,
        counts=counts,
        size=size,
        sha256=sha256,
        deleted=tuple(deleted),
        not_deleted=not_deleted,
    )


def _sidecar_bytes(sidecar: _Sidecar) -> bytes:
    body = sidecar.model_dump(mode="json")
    body["created"] = sidecar.created.strftime("%Y-%m-%dT%H:%M:%SZ")
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def _dump(db: _Database, path: Path, work: Path, doing: str) -> tuple[str | None, dict[str, int]]:
    """Run pg_dump into ``path`` in the snapshot the counts are read from; pgstac version and counts.

    One transaction exports the snapshot and stays open, touching no table, until pg_dump is done;
    the counts are read by a second, short transaction in that snapshot. No lock of ours outlives
    the count, so writers that wait for it never wait for pg_dump through it.
    """
    with _connect(db, doing) as holder:
        _snapshot_transaction(holder)
        with holder.transaction():
            row = holder.execute("SELECT pg_export_snapshot()").fetchone()
            snapshot = str(row[0]) if row else ""
            with _connect(db, doing) as reader:
                version, counts = _read_in_snapshot(reader, snapshot)
            _run_pg_dump(db, path, snapshot, work / "pg_dump.err", doing)
    return version, counts


def _snapshot_transaction(conn: psycopg.Connection[Any]) -> None:
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True


def _read_in_snapshot(conn: psycopg.Connection[Any], snapshot: str) -> tuple[str | None, dict[str, int]]:
    """The pgstac version and the item count per collection, in the exported ``snapshot``."""
    _snapshot_transaction(conn)
    with conn.transaction():
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        counts = _counts(conn)
        row = conn.execute("SELECT pgstac.get_version()").fetchone()
    return (str(row[0]) if row and row[0] is not None else None), counts


def _run_pg_dump(db: _Database, path: Path, snapshot: str, errors: Path, doing: str) -> None:
    cmd = [
        _tool("pg_dump"),
        "--format=custom",
        "--compress=6",
        f"--snapshot={snapshot}",
        f"--file={path}",
        "--no-password",
        f"--dbname={db.conninfo}",
    ]
    try:
        with errors.open("wb") as err:
            result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=db.env())
    except OSError as e:
        raise BackupError(f"{doing}: cannot run pg_dump: {e}") from e
    if result.returncode != 0:
        raise BackupError(
            f"{doing}: pg_dump failed (exit status {result.returncode}): {_tail(errors, db) or 'no output'}"
        )


def _prune(
    store: ObjectStore, catalog: CatalogSettings, *, keep: str, now: dt.datetime
) -> tuple[list[str], dict[str, str]]:
    """Delete dumps and sidecars older than the retention (sidecar first), except ``keep``."""
    cutoff = now - dt.timedelta(days=catalog.backup_keep_days)
    deleted: list[str] = []
    failed: dict[str, str] = {}
    for stamp, suffixes in sorted(_stored_stamps(store, catalog).items()):
        if stamp == keep or _stamp_time(stamp) >= cutoff:
            continue
        # the sidecar first: a dump whose deletion fails is an orphan, never a complete backup
        for suffix in ("json", "dump"):
            if suffix not in suffixes:
                continue
            key = f"{_prefix(catalog)}/{stamp}.{suffix}"
            try:
                store.delete(key)
            except StorageError as e:
                failed[key] = str(e)
                logger.warning("expired catalog backup %s could not be deleted: %s", key, e)
                break
            deleted.append(key)
    return deleted, failed


# --- listing --------------------------------------------------------------------------------------


def _read_sidecar(store: ObjectStore, key: str) -> _Sidecar:
    """The sidecar of the dump ``key``.

    Raises:
        BackupError: the sidecar is missing or is not a sidecar document.

    """
    try:
        return _Sidecar.model_validate_json(store.get_bytes(sidecar_key(key)))
    except ObjectNotFoundError as e:
        raise BackupError(
            f"backup {key!r} is not complete: its sidecar {sidecar_key(key)!r} is missing"
        ) from e
    except ValidationError as e:
        raise BackupError(f"backup {key!r}: its sidecar {sidecar_key(key)!r} is invalid: {e}") from e


def _info(key: str, sidecar: _Sidecar) -> BackupInfo:
    return BackupInfo(
        key=key,
        created=_utc(sidecar.created),
        database=sidecar.dsn_database,
        pgstac_version=sidecar.pgstac_version,
        counts=sidecar.counts,
        size=sidecar.size,
        sha256=sidecar.sha256,
    )


def list_backups(catalog: CatalogSettings, store: StoreSettings) -> list[BackupInfo]:
    """The complete dumps (a dump and its sidecar) under ``backup_prefix``, newest first.

    A sidecar that cannot be read as one is skipped with a warning.
    """
    objects = open_store(store)
    found: list[BackupInfo] = []
    for stamp, suffixes in sorted(_stored_stamps(objects, catalog).items(), reverse=True):
        if suffixes != {"dump", "json"}:
            continue
        key = f"{_prefix(catalog)}/{stamp}{DUMP_SUFFIX}"
        try:
            found.append(_info(key, _read_sidecar(objects, key)))
        except BackupError as e:
            logger.warning("skipping catalog backup %s: %s", key, e)
    return found


# --- restore --------------------------------------------------------------------------------------


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
    """Restore a dump into a new, empty database and check its item counts against the sidecar.

    Args:
        dump_key: The dump (its key, ``<stamp>.dump`` or ``<stamp>``); None: the newest complete one.
        target_dsn: The database to restore into: it must exist and hold no pgstac schema.
        catalog: The catalog settings (``backup_prefix``, ``timeout_seconds``).
        store: The object store holding the dumps.
        target_password: The target's password (default: the one in ``target_dsn``, if any).
        scratch_dir: Where the dump is downloaded (default: the system temp dir).
        stale_scratch_seconds: Age after which a scratch folder of another host is swept.

    Returns:
        The dump restored and the item count per collection found in the target.

    Raises:
        TransientCatalogError: the target database cannot be reached.
        BackupError: no complete dump, a checksum that differs from the sidecar, a target that
            already holds a pgstac catalog, a failed restore (rolled back), or counts that differ.

    """
    objects = open_store(store)
    if dump_key is None:
        backups = list_backups(catalog, store)
        if not backups:
            raise BackupError(f"no complete catalog backup under {_prefix(catalog)!r} to restore")
        key = backups[0].key
    else:
        key = _chosen_key(catalog, dump_key)
    sidecar = _read_sidecar(objects, key)
    target = _database(target_dsn, target_password, catalog.timeout_seconds, "the restore target DSN")
    doing = f"restore of {key!r} into database {target.label}"
    _check_empty(target, doing)
    with _work_folder(scratch_dir, stale_scratch_seconds, doing) as work:
        path = work / "catalog.dump"
        try:
            objects.get_file(key, path)
        except ObjectNotFoundError as e:
            raise BackupError(f"{doing}: the dump is missing, only its sidecar is there") from e
        sha256, size = sha256_file(path)
        if (sha256, size) != (sidecar.sha256, sidecar.size):
            raise BackupError(
                f"{doing}: the dump does not match its sidecar: sha256 {sha256} ({size} bytes), "
                f"expected {sidecar.sha256} ({sidecar.size} bytes); the dump is damaged"
            )
        _run_restore(target, path, work, doing)
    with _connect(target, doing) as conn:
        found = _counts(conn)
    _check_counts(sidecar.counts, found, doing)
    logger.info("catalog backup %s restored into database %s", key, target.label)
    return RestoreInfo(key=key, database=target.name, counts=found)


def _check_empty(target: _Database, doing: str) -> None:
    """Refuse a target that already has a pgstac schema (naming how many items it holds)."""
    with _connect(target, doing) as conn:
        row = conn.execute("SELECT to_regnamespace('pgstac') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return
        items = conn.execute("SELECT to_regclass('pgstac.items') IS NOT NULL").fetchone()
        count = conn.execute("SELECT count(*) FROM pgstac.items").fetchone() if items and items[0] else None
    held = f"holding {count[0]} item(s)" if count else "without an items table"
    raise BackupError(
        f"{doing}: database {target.label} already has a pgstac schema ({held}); restore into a new, "
        "empty database (createdb)"
    )


def _check_counts(expected: Mapping[str, int], found: Mapping[str, int], doing: str) -> None:
    differ = [
        f"collection {name!r}: expected {expected.get(name, 0)}, found {found.get(name, 0)}"
        for name in sorted(set(expected) | set(found))
        if expected.get(name, 0) != found.get(name, 0)
    ]
    if differ:
        raise BackupError(
            f"{doing}: the restored item counts differ from the dump's (the database is left as "
            "restored, for inspection): " + "; ".join(differ)
        )


def _copy_script(src: IO[bytes], dst: IO[bytes]) -> None:
    """Copy the restore script, its empty search path replaced by :data:`RESTORE_SEARCH_PATH`."""
    for _ in range(_HEADER_LINES):
        line = src.readline()
        if not line:
            return
        if line == _EMPTY_SEARCH_PATH:
            dst.write(_PINNED_SEARCH_PATH)
            break
        dst.write(line)
    shutil.copyfileobj(src, dst, 1024 * 1024)


def _run_restore(target: _Database, dump: Path, work: Path, doing: str) -> None:
    """``pg_restore --single-transaction`` as a script into ``psql``: all or nothing.

    A script cut short (pg_restore failed) ends without COMMIT, so psql's session rolls it back.
    """
    restore_errors, psql_errors = work / "pg_restore.err", work / "psql.err"
    restore_cmd = [
        _tool("pg_restore"),
        "--no-owner",
        "--exit-on-error",
        "--single-transaction",
        "--file=-",
        str(dump),
    ]
    psql_cmd = [
        _tool("psql"),
        "--no-psqlrc",
        "--quiet",
        "--no-password",
        "--set=ON_ERROR_STOP=1",
        f"--dbname={target.conninfo}",
    ]
    with restore_errors.open("wb") as err1, psql_errors.open("wb") as err2, contextlib.ExitStack() as stack:
        try:
            reader = stack.enter_context(
                subprocess.Popen(restore_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err1)
            )
            writer = stack.enter_context(
                subprocess.Popen(
                    psql_cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=err2,
                    env=target.env(),
                )
            )
        except OSError as e:
            raise BackupError(f"{doing}: cannot run pg_restore and psql: {e}") from e
        assert reader.stdout is not None
        assert writer.stdin is not None
        try:
            _copy_script(reader.stdout, writer.stdin)
        except BrokenPipeError:
            pass  # psql stopped; its stderr says why
        except BaseException:
            reader.kill()
            writer.kill()
            raise
        finally:
            reader.stdout.close()
            with contextlib.suppress(BrokenPipeError):
                writer.stdin.close()
        writer.wait()
        reader.wait()
    failed = [
        f"{name} failed (exit status {code}): {_tail(errors, target) or 'no output'}"
        for name, code, errors in (
            ("pg_restore", reader.returncode, restore_errors),
            ("psql", writer.returncode, psql_errors),
        )
        if code != 0
    ]
    if failed:
        raise BackupError(f"{doing}: nothing was restored: " + "; ".join(failed))

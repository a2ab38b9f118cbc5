"""Catalog database backups on a real PostgreSQL with pgstac: dump, retention, checked restore."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr
from pypgstac.db import PgstacDB
from pypgstac.load import Loader, Methods

from bench.common import create_database, free_port
from skyvault.catalog import backup
from skyvault.catalog.backup import (
    BackupInfo,
    backup_catalog,
    list_backups,
    restore_catalog,
    sidecar_key,
    target_password,
)
from skyvault.config.settings import CatalogSettings, StoreSettings
from skyvault.errors import BackupError, CatalogError, ConfigError, TransientCatalogError
from skyvault.storage.store import open_store
from tests.conftest import PgstacServer

COUNTS = {"alpha": 3, "beta": 2}
NOW = dt.datetime(2026, 12, 1, 2, 0, tzinfo=dt.UTC)
PASSWORD = "pw-7f3a-not-in-messages"


def _collection(collection_id: str) -> dict[str, Any]:
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": collection_id,
        "description": f"test collection {collection_id}",
        "license": "proprietary",
        "extent": {
            "spatial": {"bbox": [[10.0, 45.0, 11.0, 46.0]]},
            "temporal": {"interval": [["2026-01-01T00:00:00Z", None]]},
        },
        "links": [],
    }


def _item(collection_id: str, n: int) -> dict[str, Any]:
    w, s, e, n_ = 10.0 + n / 10, 45.0, 10.1 + n / 10, 45.1
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": f"{collection_id}-{n}",
        "collection": collection_id,
        "bbox": [w, s, e, n_],
        "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n_], [w, n_], [w, s]]]},
        "properties": {"datetime": f"2026-01-{n + 1:02d}T00:00:00Z"},
        "assets": {},
        "links": [],
    }


def load_catalog(dsn: str, counts: dict[str, int], first: int = 0) -> None:
    """Load ``counts[c]`` items (numbered from ``first``) into each collection ``c`` of ``dsn``."""
    with PgstacDB(dsn=dsn) as db:
        loader = Loader(db)
        loader.load_collections(iter([_collection(c) for c in counts]), insert_mode=Methods.ignore)
        items = [_item(c, n) for c, count in counts.items() for n in range(first, first + count)]
        loader.load_items(iter(items), insert_mode=Methods.insert)


def db_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT collection, count(*) FROM pgstac.items GROUP BY collection").fetchall()
    return {c: int(n) for c, n in rows}


def has_pgstac(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT to_regnamespace('pgstac') IS NOT NULL").fetchone()
    return bool(row and row[0])


@pytest.fixture
def source_dsn(pgstac_dsn: str) -> str:
    """A pgstac database with three items in ``alpha`` and two in ``beta``."""
    load_catalog(pgstac_dsn, COUNTS)
    return pgstac_dsn


@pytest.fixture
def empty_dsn(pgstac_server: PgstacServer) -> Callable[[], str]:
    """Makes plain databases (``createdb``, no extension) in the test cluster."""
    return lambda: create_database(pgstac_server.port, "r_" + os.urandom(6).hex())


@pytest.fixture
def store(tmp_path: Path) -> StoreSettings:
    return StoreSettings(root=tmp_path / "store")


def settings_for(dsn: str, **overrides: Any) -> CatalogSettings:
    return CatalogSettings(backend="pgstac", dsn=dsn, **overrides)


def stored_keys(store: StoreSettings, prefix: str = "backups/catalog/") -> list[str]:
    return [o.key for o in open_store(store).list(prefix)]


def _backup_and_restore(source_dsn: str, target_dsn: str, store: StoreSettings, tmp_path: Path) -> BackupInfo:
    catalog = settings_for(source_dsn)
    info = backup_catalog(catalog, store, now=NOW, scratch_dir=tmp_path / "scratch")

    assert info.key == "backups/catalog/20261201T020000Z.dump"
    assert info.counts == COUNTS
    assert info.database == source_dsn.rsplit("/", 1)[1]
    assert info.pgstac_version
    assert stored_keys(store) == [info.key, "backups/catalog/20261201T020000Z.json"]
    sidecar = json.loads(open_store(store).get_bytes(info.sidecar_key))
    assert sidecar["created"] == "2026-12-01T02:00:00Z"
    assert sidecar["counts"] == COUNTS
    assert sidecar["dsn_database"] == info.database
    assert sidecar["pgstac_version"] == info.pgstac_version
    assert (sidecar["size"], sidecar["sha256"]) == (info.size, info.sha256)
    assert list_backups(catalog, store) == [info.model_copy(update={"deleted": ()})]

    restored = restore_catalog(None, target_dsn, catalog, store, scratch_dir=tmp_path / "scratch")

    assert restored.key == info.key
    assert restored.counts == COUNTS
    assert restored.database == target_dsn.rsplit("/", 1)[1]
    assert db_counts(target_dsn) == COUNTS
    assert list((tmp_path / "scratch").iterdir()) == []  # scratch folders are removed
    return info


def test_backup_then_restore_into_a_fresh_database_gives_the_same_items(
    source_dsn: str, empty_dsn: Callable[[], str], store: StoreSettings, tmp_path: Path
) -> None:
    target = empty_dsn()
    _backup_and_restore(source_dsn, target, store, tmp_path)

    # the restored catalog works: pgstac searches and loads into it
    with psycopg.connect(target, options="-c search_path=pgstac,public") as conn:
        row = conn.execute('SELECT pgstac.search(\'{"collections": ["alpha"]}\'::jsonb)').fetchone()
    assert row is not None
    assert sorted(f["id"] for f in row[0]["features"]) == ["alpha-0", "alpha-1", "alpha-2"]
    load_catalog(target, {"beta": 2, "gamma": 2}, first=2)
    assert db_counts(target) == {"alpha": 3, "beta": 4, "gamma": 2}


def test_backup_and_restore_on_s3(
    source_dsn: str, empty_dsn: Callable[[], str], s3_store_settings: StoreSettings, tmp_path: Path
) -> None:
    _backup_and_restore(source_dsn, empty_dsn(), s3_store_settings, tmp_path)


def test_an_expired_dump_is_deleted_only_once_a_new_dump_succeeded(
    source_dsn: str, pgstac_server: PgstacServer, store: StoreSettings
) -> None:
    catalog = settings_for(source_dsn)
    old = backup_catalog(catalog, store, now=NOW - dt.timedelta(days=31))
    recent = backup_catalog(catalog, store, now=NOW - dt.timedelta(days=29))
    assert old.deleted == recent.deleted == ()
    objects = open_store(store)
    objects.put_bytes("backups/catalog/20261020T000000Z.dump", b"orphan, expired")  # no sidecar
    objects.put_bytes("backups/catalog/20261130T000000Z.dump", b"orphan, recent")  # maybe in progress
    objects.put_bytes("backups/catalog/notes.txt", b"not a backup")
    before = stored_keys(store)

    missing = settings_for(
        f"postgresql://postgres@127.0.0.1:{pgstac_server.port}/no_such_db", password=SecretStr(PASSWORD)
    )
    with pytest.raises(BackupError) as failed:
        backup_catalog(missing, store, now=NOW)
    assert not isinstance(failed.value, TransientCatalogError)
    message = str(failed.value)
    assert "'no_such_db'" in message
    assert "does not exist" in message
    assert PASSWORD not in message
    assert stored_keys(store) == before  # nothing written, nothing deleted

    new = backup_catalog(catalog, store, now=NOW)
    assert set(new.deleted) == {old.key, old.sidecar_key, "backups/catalog/20261020T000000Z.dump"}
    assert new.not_deleted == {}
    assert stored_keys(store) == sorted(
        [
            "backups/catalog/20261130T000000Z.dump",
            recent.key,
            recent.sidecar_key,
            new.key,
            new.sidecar_key,
            "backups/catalog/notes.txt",
        ]
    )
    assert [b.key for b in list_backups(catalog, store)] == [new.key, recent.key]


def test_a_retention_shorter_than_the_backup_never_deletes_the_one_just_written(
    source_dsn: str, store: StoreSettings
) -> None:
    catalog = settings_for(source_dsn, backup_keep_days=0.0001)
    first = backup_catalog(catalog, store, now=NOW - dt.timedelta(hours=1))
    second = backup_catalog(catalog, store, now=NOW)
    assert set(second.deleted) == {first.key, first.sidecar_key}
    assert stored_keys(store) == [second.key, second.sidecar_key]


@pytest.fixture
def fake_pg_dump(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], Path]:
    """Installs a pg_dump that records its arguments and PGPASSWORD, then fails; gives the record."""
    folder = tmp_path / "fake-bin"
    folder.mkdir()
    record = tmp_path / "pg_dump.record"
    script = folder / "pg_dump"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {record}\n'
        f'printf "PGPASSWORD=%s\\n" "$PGPASSWORD" >> {record}\n'
        'echo "pg_dump: error: query failed: ERROR:  out of shared memory" >&2\n'
        "exit 1\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)

    def install() -> Path:
        monkeypatch.setattr(backup, "_client", lambda: (folder, (99, 0)))
        return record

    return install


def test_a_failing_pg_dump_names_the_database_and_its_reason_and_keeps_the_password_out(
    source_dsn: str, store: StoreSettings, fake_pg_dump: Callable[[], Path]
) -> None:
    kept = backup_catalog(settings_for(source_dsn), store, now=NOW - dt.timedelta(days=40))
    before = stored_keys(store)
    record = fake_pg_dump()
    catalog = settings_for(source_dsn, password=SecretStr(PASSWORD))

    with pytest.raises(BackupError) as failed:
        backup_catalog(catalog, store, now=NOW)

    message = str(failed.value)
    assert repr(kept.database) in message
    assert "pg_dump failed (exit status 1)" in message
    assert "out of shared memory" in message
    assert PASSWORD not in message
    assert stored_keys(store) == before
    lines = record.read_text().splitlines()
    assert f"PGPASSWORD={PASSWORD}" in lines
    assert not any(PASSWORD in line for line in lines if not line.startswith("PGPASSWORD="))
    assert "--format=custom" in lines
    assert "--compress=6" in lines
    assert any(line.startswith("--snapshot=") and len(line) > len("--snapshot=") for line in lines)


def test_an_unreachable_database_is_a_transient_error(store: StoreSettings) -> None:
    catalog = settings_for(f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/catalog")
    with pytest.raises(TransientCatalogError) as failed:
        backup_catalog(catalog, store, now=NOW)
    assert "'catalog'" in str(failed.value)
    assert PASSWORD not in str(failed.value)
    assert stored_keys(store) == []


def test_a_database_without_pgstac_is_refused(empty_dsn: Callable[[], str], store: StoreSettings) -> None:
    with pytest.raises(BackupError, match="holds no pgstac catalog"):
        backup_catalog(settings_for(empty_dsn()), store, now=NOW)
    assert stored_keys(store) == []


def test_backups_need_the_pgstac_backend(store: StoreSettings) -> None:
    with pytest.raises(ConfigError, match=r"catalog\.backend 'pgstac'"):
        backup_catalog(CatalogSettings(), store)


def test_a_restore_of_a_dump_whose_bytes_changed_fails_on_the_checksum(
    source_dsn: str, empty_dsn: Callable[[], str], store: StoreSettings
) -> None:
    catalog = settings_for(source_dsn)
    info = backup_catalog(catalog, store, now=NOW)
    objects = open_store(store)
    data = bytearray(objects.get_bytes(info.key))
    data[len(data) // 2] ^= 0xFF
    objects.put_bytes(info.key, bytes(data))
    target = empty_dsn()

    with pytest.raises(BackupError, match="does not match its sidecar") as failed:
        restore_catalog(info.key, target, catalog, store)

    assert info.sha256 in str(failed.value)
    assert not has_pgstac(target)


def test_a_restore_into_a_database_that_holds_items_is_refused(
    source_dsn: str, pgstac_server: PgstacServer, store: StoreSettings
) -> None:
    catalog = settings_for(source_dsn)
    backup_catalog(catalog, store, now=NOW)
    other = pgstac_server.new_database("t_" + os.urandom(6).hex())
    load_catalog(other, {"gamma": 1})

    with pytest.raises(BackupError, match="already has a pgstac schema") as failed:
        restore_catalog(None, other, catalog, store)

    assert f"'{other.rsplit('/', 1)[1]}'" in str(failed.value)
    assert "holding 1 item(s)" in str(failed.value)
    assert db_counts(other) == {"gamma": 1}


def test_a_restore_whose_counts_differ_from_the_sidecar_fails_naming_them(
    source_dsn: str, empty_dsn: Callable[[], str], store: StoreSettings
) -> None:
    catalog = settings_for(source_dsn)
    info = backup_catalog(catalog, store, now=NOW)
    objects = open_store(store)
    sidecar = json.loads(objects.get_bytes(info.sidecar_key))
    sidecar["counts"] = {"alpha": 4, "beta": 2, "gone": 1}
    objects.put_bytes(info.sidecar_key, json.dumps(sidecar).encode())

    with pytest.raises(BackupError) as failed:
        restore_catalog("20261201T020000Z", empty_dsn(), catalog, store)

    message = str(failed.value)
    assert "collection 'alpha': expected 4, found 3" in message
    assert "collection 'gone': expected 1, found 0" in message
    assert "'beta'" not in message


def test_a_restore_picks_the_newest_complete_dump_or_the_one_named(
    source_dsn: str, empty_dsn: Callable[[], str], store: StoreSettings
) -> None:
    catalog = settings_for(source_dsn)
    older = backup_catalog(catalog, store, now=NOW - dt.timedelta(days=2))
    load_catalog(source_dsn, {"beta": 3}, first=2)
    newer = backup_catalog(catalog, store, now=NOW - dt.timedelta(days=1))
    open_store(store).put_bytes("backups/catalog/20261201T000000Z.dump", b"no sidecar yet")

    assert [b.key for b in list_backups(catalog, store)] == [newer.key, older.key]
    assert restore_catalog(None, empty_dsn(), catalog, store).counts == {"alpha": 3, "beta": 5}
    assert restore_catalog(older.key, empty_dsn(), catalog, store).counts == COUNTS
    with pytest.raises(BackupError, match="is not complete"):
        restore_catalog("20261201T000000Z.dump", empty_dsn(), catalog, store)
    assert sidecar_key(older.key) == older.sidecar_key


def test_a_restore_with_no_backup_fails_clearly(
    source_dsn: str, empty_dsn: Callable[[], str], store: StoreSettings
) -> None:
    with pytest.raises(BackupError, match="no complete catalog backup under 'backups/catalog'"):
        restore_catalog(None, empty_dsn(), settings_for(source_dsn), store)


def test_the_restore_target_gets_the_catalog_password_only_on_the_catalog_server() -> None:
    catalog = settings_for("postgresql://skyvault@db.internal:5432/catalog", password=SecretStr("pw"))
    same = target_password("postgresql://skyvault@db.internal:5432/restored", catalog)
    assert same is not None
    assert same.get_secret_value() == "pw"
    assert target_password("postgresql://skyvault@db.internal/restored", catalog) == catalog.password
    assert target_password("postgresql://skyvault@db.other:5432/restored", catalog) is None
    assert target_password("postgresql://someone@db.internal:5432/restored", catalog) is None
    assert target_password("postgresql://skyvault:own@db.internal:5432/restored", catalog) is None
    assert issubclass(BackupError, CatalogError)


def test_the_counts_and_the_dump_come_from_one_snapshot(
    source_dsn: str, empty_dsn: Callable[[], str], store: StoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    dump = backup._run_pg_dump

    def items_arrive_before_the_dump(*args: Any, **kwargs: Any) -> None:
        load_catalog(source_dsn, {"alpha": 2}, first=3)  # committed after the counts were read
        dump(*args, **kwargs)

    monkeypatch.setattr(backup, "_run_pg_dump", items_arrive_before_the_dump)
    catalog = settings_for(source_dsn)
    info = backup_catalog(catalog, store, now=NOW)

    assert info.counts == COUNTS
    assert db_counts(source_dsn) == {"alpha": 5, "beta": 2}
    assert restore_catalog(None, empty_dsn(), catalog, store).counts == COUNTS

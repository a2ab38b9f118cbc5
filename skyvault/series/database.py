"""The sample database: one row per (node, timestamp), in SQLite (default) or PostgreSQL.

Both keep two tables. ``series_samples`` holds the samples, keyed by (node, ts) with ts in UTC
epoch seconds, and the source that first delivered each. ``series_files`` records every file
ingested by (source, key, sha256) with its counts; it is written in the same transaction as the
file's samples, so a file is either recorded with all its new samples or not at all, and a second
run (or a concurrent one) of the same file finds it recorded and skips it.

A file's samples arrive as chunks (lists of samples, in file order) and go in chunk by chunk inside
the file's one transaction, so memory holds one chunk, never the file; the first occurrence of a
(node, ts) in the file wins. PostgreSQL copies each chunk into a temporary table (``COPY``), then
inserts it in (node, ts) order with ``ON CONFLICT DO NOTHING``: concurrent writers of overlapping
files wait for each other's rows instead of failing. Rows of a file written in several chunks are
not in one global order, so such a file holds a transaction-scoped advisory lock exclusively while
single-chunk files hold it shared: writers never deadlock. SQLite takes the write lock at the start
of the transaction (``BEGIN IMMEDIATE``, waiting up to ``series.busy_timeout_seconds``) and uses
``INSERT OR IGNORE`` per chunk. Counts are exact on both: inserted rows are counted by the database.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import psycopg

from skyvault.config.settings import SeriesSettings
from skyvault.errors import SeriesDatabaseError, TransientSeriesDatabaseError
from skyvault.series.samples import VARIABLES, Sample

HOUR = 3600


@dataclass(frozen=True)
class InsertOutcome:
    """What one file's transaction did: None from :meth:`SampleDatabase.ingest_chunks` means skipped."""

    inserted: int
    duplicate: int
    #: Newly filled UTC hours (epoch seconds of the hour's start) -> samples inserted in each.
    hours: dict[int, int]


@dataclass(frozen=True)
class SampleArrays:
    """Samples as columns: ``node`` (UUID text), ``ts`` (epoch seconds), one float array per variable."""

    node: np.ndarray[Any, Any]
    ts: np.ndarray[Any, Any]
    values: dict[str, np.ndarray[Any, Any]]

    def __len__(self) -> int:
        return int(self.ts.shape[0])


def _arrays(rows: Sequence[Sequence[Any]]) -> SampleArrays:
    if not rows:
        return SampleArrays(
            node=np.array([], dtype="U36"),
            ts=np.array([], dtype=np.int64),
            values={v: np.array([], dtype=np.float64) for v in VARIABLES},
        )
    columns = list(zip(*rows, strict=True))
    return SampleArrays(
        node=np.array([str(n) for n in columns[0]], dtype="U36"),
        ts=np.array(columns[1], dtype=np.int64),
        values={v: np.array(columns[2 + i], dtype=np.float64) for i, v in enumerate(VARIABLES)},
    )


class SampleDatabase(Protocol):
    """What ingest and seeding need from the sample store."""

    #: Names the database in messages (a file path or a DSN without password).
    name: str

    def ingest_chunks(
        self,
        source: str,
        key: str,
        sha256: str,
        chunks: Iterable[Sequence[Sample]],
        rejected: int | Callable[[], int],
    ) -> InsertOutcome | None:
        """Store a file's samples, given as chunks in file order, and record the file, in one transaction.

        ``rejected`` is the file's count of rejected samples, or a function giving it once the
        chunks are consumed. Returns None (nothing changed) when the file (source, key, sha256)
        was ingested before. A failure, or the process dying, leaves nothing of the file stored.
        """
        ...

    def file_ingested(self, source: str, key: str, sha256: str) -> bool:
        """True when this file (key and content) was ingested before."""
        ...

    def read_samples(self, source: str, start_s: int, end_s: int, statuses: Sequence[str]) -> SampleArrays:
        """A source's samples with ``start_s <= ts < end_s`` and one of ``statuses``, by node and time."""
        ...

    def close(self) -> None: ...


class SqliteSampleDatabase:
    """Samples in one SQLite file (WAL journal, so readers never wait for the writer)."""

    def __init__(self, path: Path, busy_timeout_seconds: float) -> None:
        self.name = f"SQLite database {path}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, timeout=busy_timeout_seconds, isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}")
            deadline = time.monotonic() + busy_timeout_seconds
            while True:  # switching to WAL does not wait on the busy handler: retry while locked
                try:
                    self._conn.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self._conn.executescript(
                """
                CREATE TABLE IF NOT EXISTS series_samples (
                    node TEXT NOT NULL, ts INTEGER NOT NULL, source TEXT NOT NULL,
                    co2_ppm REAL NOT NULL, temperature_celsius REAL NOT NULL,
                    rel_humidity_percent REAL NOT NULL, status TEXT NOT NULL,
                    PRIMARY KEY (node, ts)
                ) WITHOUT ROWID;
                CREATE INDEX IF NOT EXISTS series_samples_source_ts ON series_samples (source, ts);
                CREATE TABLE IF NOT EXISTS series_files (
                    source TEXT NOT NULL, key TEXT NOT NULL, sha256 TEXT NOT NULL,
                    ingested_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
                    inserted INTEGER, duplicate INTEGER, rejected INTEGER,
                    PRIMARY KEY (source, key, sha256)
                );
                """
            )
        except (OSError, sqlite3.Error) as e:
            raise _sqlite_error(e, f"cannot open the {self.name}") from e

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise _sqlite_error(e, f"{self.name}: {what}") from e

    def ingest_chunks(
        self,
        source: str,
        key: str,
        sha256: str,
        chunks: Iterable[Sequence[Sample]],
        rejected: int | Callable[[], int],
    ) -> InsertOutcome | None:
        conn = self._conn
        with self._errors(f"cannot ingest file {key!r} of source {source!r}"):
            conn.execute("BEGIN IMMEDIATE")
            try:
                before = conn.total_changes
                conn.execute(
                    "INSERT OR IGNORE INTO series_files (source, key, sha256) VALUES (?, ?, ?)",
                    (source, key, sha256),
                )
                if conn.total_changes == before:
                    conn.execute("ROLLBACK")
                    return None
                conn.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS series_incoming ("
                    " node TEXT NOT NULL, ts INTEGER NOT NULL, co2_ppm REAL,"
                    " temperature_celsius REAL, rel_humidity_percent REAL, status TEXT,"
                    " PRIMARY KEY (node, ts))"
                )
                valid = 0
                hours: dict[int, int] = {}
                for chunk in chunks:
                    valid += len(chunk)
                    for hour, n in self._insert_chunk(source, key, chunk).items():
                        hours[hour] = hours.get(hour, 0) + n
                inserted = sum(hours.values())
                duplicate = valid - inserted
                conn.execute(
                    "UPDATE series_files SET inserted = ?, duplicate = ?, rejected = ?"
                    " WHERE source = ? AND key = ? AND sha256 = ?",
                    (
                        inserted,
                        duplicate,
                        rejected() if callable(rejected) else rejected,
                        source,
                        key,
                        sha256,
                    ),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return InsertOutcome(inserted=inserted, duplicate=duplicate, hours=hours)

    def _insert_chunk(self, source: str, key: str, chunk: Sequence[Sample]) -> dict[int, int]:
        """Insert one chunk's new samples (the first of a repeated (node, ts) wins); new per hour."""
        conn = self._conn
        conn.execute("DELETE FROM series_incoming")
        conn.executemany(
            "INSERT OR IGNORE INTO series_incoming VALUES (?, ?, ?, ?, ?, ?)",
            (
                (
                    str(s.node),
                    s.timestamp_s,
                    s.co2_ppm,
                    s.temperature_celsius,
                    s.rel_humidity_percent,
                    s.status,
                )
                for s in chunk
            ),
        )
        hours = {
            int(h): int(n)
            for h, n in conn.execute(
                "SELECT ts - ts % 3600, count(*) FROM series_incoming AS i WHERE NOT EXISTS ("
                " SELECT 1 FROM series_samples AS s WHERE s.node = i.node AND s.ts = i.ts"
                ") GROUP BY 1"
            ).fetchall()
        }
        before = conn.total_changes
        conn.execute(
            "INSERT OR IGNORE INTO series_samples (node, ts, source, co2_ppm, temperature_celsius,"
            " rel_humidity_percent, status) SELECT node, ts, ?, co2_ppm, temperature_celsius,"
            " rel_humidity_percent, status FROM series_incoming ORDER BY node, ts",
            (source,),
        )
        inserted = conn.total_changes - before
        if inserted != sum(hours.values()):
            raise SeriesDatabaseError(
                f"{self.name}: file {key!r}: {inserted} rows inserted but {sum(hours.values())} "
                "were new; another writer changed the table inside this transaction"
            )
        conn.execute("DELETE FROM series_incoming")
        return hours

    def file_ingested(self, source: str, key: str, sha256: str) -> bool:
        with self._errors(f"cannot look up file {key!r} of source {source!r}"):
            row = self._conn.execute(
                "SELECT 1 FROM series_files WHERE source = ? AND key = ? AND sha256 = ?",
                (source, key, sha256),
            ).fetchone()
        return row is not None

    def read_samples(self, source: str, start_s: int, end_s: int, statuses: Sequence[str]) -> SampleArrays:
        marks = ", ".join("?" for _ in statuses)
        with self._errors(f"cannot read samples of source {source!r}"):
            rows = self._conn.execute(
                f"SELECT node, ts, {', '.join(VARIABLES)} FROM series_samples"
                f" WHERE source = ? AND ts >= ? AND ts < ? AND status IN ({marks}) ORDER BY node, ts",
                (source, start_s, end_s, *statuses),
            ).fetchall()
        return _arrays(rows)

    def close(self) -> None:
        self._conn.close()


def _sqlite_error(e: BaseException, message: str) -> SeriesDatabaseError:
    if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
        return TransientSeriesDatabaseError(f"{message}: {e}")
    return SeriesDatabaseError(f"{message}: {e}")


_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS series_samples (
    node uuid NOT NULL, ts bigint NOT NULL, source text NOT NULL,
    co2_ppm double precision NOT NULL, temperature_celsius double precision NOT NULL,
    rel_humidity_percent double precision NOT NULL, status text NOT NULL,
    PRIMARY KEY (node, ts)
);
CREATE INDEX IF NOT EXISTS series_samples_source_ts ON series_samples (source, ts);
CREATE TABLE IF NOT EXISTS series_files (
    source text NOT NULL, key text NOT NULL, sha256 text NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    inserted bigint, duplicate bigint, rejected bigint,
    PRIMARY KEY (source, key, sha256)
);
"""


class PostgresSampleDatabase:
    """Samples in PostgreSQL (psycopg 3), one connection per instance."""

    def __init__(self, dsn: str, password: str | None, connect_timeout_seconds: float) -> None:
        shown = {k: v for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items() if k != "password"}
        self.name = f"PostgreSQL database {psycopg.conninfo.make_conninfo('', **shown)}"
        extra: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout_seconds))}
        if password is not None:
            extra["password"] = password
        with self._errors("cannot open it"):
            self._conn = psycopg.connect(dsn, autocommit=True, **extra)
            with self._conn.transaction():
                # One creator at a time: concurrent CREATE ... IF NOT EXISTS may collide.
                self._conn.execute("SELECT pg_advisory_xact_lock(hashtext('skyvault-series-schema'))")
                self._conn.execute(_PG_SCHEMA)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except psycopg.OperationalError as e:  # connection lost, deadlock or serialization abort
            raise TransientSeriesDatabaseError(f"{self.name}: {what}: {e}") from e
        except psycopg.Error as e:
            raise SeriesDatabaseError(f"{self.name}: {what}: {e}") from e

    def ingest_chunks(
        self,
        source: str,
        key: str,
        sha256: str,
        chunks: Iterable[Sequence[Sample]],
        rejected: int | Callable[[], int],
    ) -> InsertOutcome | None:
        pending = iter(chunks)
        ahead = list(itertools.islice(pending, 2))  # one chunk or more: decides the lock's mode
        lock = "pg_advisory_xact_lock" if len(ahead) > 1 else "pg_advisory_xact_lock_shared"
        with self._errors(f"cannot ingest file {key!r} of source {source!r}"), self._conn.transaction():
            cur = self._conn.cursor()
            cur.execute(f"SELECT {lock}(hashtext('skyvault-series-ingest'))")
            cur.execute(
                "INSERT INTO series_files (source, key, sha256) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                (source, key, sha256),
            )
            if cur.fetchone() is None:
                return None  # leaving the block commits nothing: no row was written
            cur.execute(
                "CREATE TEMP TABLE series_incoming (line integer, node uuid, ts bigint,"
                " co2_ppm double precision, temperature_celsius double precision,"
                " rel_humidity_percent double precision, status text) ON COMMIT DROP"
            )
            valid = 0
            hours: dict[int, int] = {}
            for number, chunk in enumerate(itertools.chain(ahead, pending)):
                valid += len(chunk)
                if number:
                    cur.execute("TRUNCATE series_incoming")
                for hour, n in self._insert_chunk(cur, source, chunk).items():
                    hours[hour] = hours.get(hour, 0) + n
            inserted = sum(hours.values())
            duplicate = valid - inserted
            cur.execute(
                "UPDATE series_files SET inserted = %s, duplicate = %s, rejected = %s"
                " WHERE source = %s AND key = %s AND sha256 = %s",
                (inserted, duplicate, rejected() if callable(rejected) else rejected, source, key, sha256),
            )
        return InsertOutcome(inserted=inserted, duplicate=duplicate, hours=hours)

    @staticmethod
    def _insert_chunk(cur: psycopg.Cursor[Any], source: str, chunk: Sequence[Sample]) -> dict[int, int]:
        """Insert one chunk's new samples (the first of a repeated (node, ts) wins); new per hour."""
        with cur.copy(
            "COPY series_incoming (line, node, ts, co2_ppm, temperature_celsius, rel_humidity_percent,"
            " status) FROM STDIN"
        ) as copy:
            for s in chunk:
                copy.write_row(
                    (
                        s.line,
                        s.node,
                        s.timestamp_s,
                        s.co2_ppm,
                        s.temperature_celsius,
                        s.rel_humidity_percent,
                        s.status,
                    )
                )
        cur.execute(
            "WITH fresh AS ("
            " INSERT INTO series_samples (node, ts, source, co2_ppm, temperature_celsius,"
            "  rel_humidity_percent, status)"
            " SELECT DISTINCT ON (node, ts) node, ts, %s, co2_ppm, temperature_celsius,"
            "  rel_humidity_percent, status FROM series_incoming ORDER BY node, ts, line"
            " ON CONFLICT (node, ts) DO NOTHING RETURNING ts)"
            " SELECT ts - ts %% 3600, count(*) FROM fresh GROUP BY 1",
            (source,),
        )
        return {int(h): int(n) for h, n in cur.fetchall()}

    def file_ingested(self, source: str, key: str, sha256: str) -> bool:
        with self._errors(f"cannot look up file {key!r} of source {source!r}"):
            row = self._conn.execute(
                "SELECT 1 FROM series_files WHERE source = %s AND key = %s AND sha256 = %s",
                (source, key, sha256),
            ).fetchone()
        return row is not None

    def read_samples(self, source: str, start_s: int, end_s: int, statuses: Sequence[str]) -> SampleArrays:
        # one row per node holding its columns as arrays, in binary: far fewer Python objects
        # than a row per sample (a month of 100 nodes at 1 min is 4 million samples)
        columns = ", ".join(f"array_agg({c} ORDER BY ts)" for c in ("ts", *VARIABLES))
        with self._errors(f"cannot read samples of source {source!r}"):
            rows = self._conn.execute(
                f"SELECT node::text, {columns} FROM series_samples"
                " WHERE source = %s AND ts >= %s AND ts < %s AND status = ANY(%s)"
                " GROUP BY node ORDER BY node",
                (source, start_s, end_s, list(statuses)),
                binary=True,
            ).fetchall()
        if not rows:
            return _arrays([])
        return SampleArrays(
            node=np.repeat(np.array([r[0] for r in rows], dtype="U36"), [len(r[1]) for r in rows]),
            ts=np.concatenate([np.array(r[1], dtype=np.int64) for r in rows]),
            values={
                v: np.concatenate([np.array(r[2 + i], dtype=np.float64) for r in rows])
                for i, v in enumerate(VARIABLES)
            },
        )

    def close(self) -> None:
        self._conn.close()


def open_database(settings: SeriesSettings) -> SampleDatabase:
    """The sample database the settings name (created on first use)."""
    if settings.database == "postgresql":
        assert settings.dsn is not None  # the settings refuse postgresql without a dsn
        password = settings.password.get_secret_value() if settings.password else None
        return PostgresSampleDatabase(settings.dsn, password, settings.busy_timeout_seconds)
    return SqliteSampleDatabase(settings.sqlite_path, settings.busy_timeout_seconds)


@contextlib.contextmanager
def sample_database(settings: SeriesSettings) -> Iterator[SampleDatabase]:
    """:func:`open_database`, closed on leaving."""
    db = open_database(settings)
    try:
        yield db
    finally:
        db.close()

"""The catalog: an embedded SQLite database (WAL mode) holding ids, payloads, tombstones and config.

Its transaction commit is the commit point of every write. Rows are slots in the dense vector
file: row ``r`` of the catalog is row ``r`` of ``vectors.<generation>``. ``meta.n_rows`` is the
number of rows committed; the dense file may hold more (an interrupted batch), never fewer.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from index.errors import CorruptIndex

PointId = str | int

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- `key` has no declared type, so SQLite keeps ints as ints and strings as strings: 7 != '7'.
CREATE TABLE IF NOT EXISTS points (
    row INTEGER PRIMARY KEY,
    key NOT NULL,
    payload TEXT,
    live INTEGER NOT NULL DEFAULT 1,
    n_vectors INTEGER,  -- multi-vector collections: the size of the point's vector set
    text TEXT  -- the text a point was made from (the sparse stage indexes it); NULL: a vector only
);
CREATE UNIQUE INDEX IF NOT EXISTS points_live_key ON points(key) WHERE live = 1;
"""

_CHUNK = 900  # stays under SQLite's default limit of bound parameters per statement


def _chunks(seq: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


class Catalog:
    """SQLite side of a collection. Not thread-safe on its own: the collection serialises writers."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a returned commit survives power loss and SIGKILL, not only the process.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(points)")}
            if "text" not in columns:  # a collection made before points kept their text
                self._db.execute("ALTER TABLE points ADD COLUMN text TEXT")
        except BaseException:
            self._db.close()
            raise
        # Searches run in many threads at once: each read borrows a connection of its own (WAL
        # readers block neither each other nor the writer) and gives it back, so there are as many
        # as reads ever ran at once. One per thread instead grew without bound: thread pools
        # retire idle threads and start new ones, and each dead thread's connection kept its
        # page cache (~2 MB a connection once the catalog is large; tests/test_collection.py).
        self._idle: list[sqlite3.Connection] = []
        self._opened: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._readers_lock:
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            with self._readers_lock:
                self._opened.append(db)
        try:
            yield db
        finally:
            with self._readers_lock:
                self._idle.append(db)

    @property
    def read_connections(self) -> int:
        """Read connections opened so far (at most the reads that ever ran at once)."""
        return len(self._opened)

    def backup(self, path: Path) -> None:
        """A consistent copy of the catalog at ``path`` (SQLite's online backup)."""
        target = sqlite3.connect(path)
        try:
            self._db.backup(target)
        finally:
            target.close()

    def close(self) -> None:
        with self._readers_lock:
            for db in self._opened:
                db.close()
            self._opened.clear()
            self._idle.clear()
        self._db.close()

    # -- meta ---------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, items: dict[str, str]) -> None:
        with self._transaction():
            self._set_meta(items)

    def _set_meta(self, items: dict[str, str]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", items.items())

    @property
    def n_rows(self) -> int:
        value = self.get_meta("n_rows")
        return 0 if value is None else int(value)

    def _transaction(self) -> sqlite3.Connection:
        return _Transaction(self._db)  # type: ignore[return-value]  # context manager only

    # -- writes -------------------------------------------------------------------------------
    def commit_upsert(
        self,
        keys: Sequence[PointId],
        payloads: Sequence[str | None],
        first_row: int,
        *,
        set_sizes: Sequence[int] | None = None,
        texts: Sequence[str | None] | None = None,
        meta: dict[str, str] | None = None,
    ) -> np.ndarray:
        """Insert ``keys`` at rows ``first_row...``; tombstone the rows they replace. One transaction.

        ``set_sizes``: for multi-vector points, how many vectors each has. Returns the replaced
        rows, ``(r,) int64``.
        """
        sizes = set_sizes if set_sizes is not None else [None] * len(keys)
        texts = texts if texts is not None else [None] * len(keys)
        with self._transaction():
            replaced = self._live_rows(keys)
            if len(replaced):
                self._tombstone(replaced)
            rows = range(first_row, first_row + len(keys))
            self._db.executemany(
                "INSERT INTO points(row, key, payload, live, n_vectors, text) VALUES (?, ?, ?, 1, ?, ?)",
                zip(rows, keys, payloads, sizes, texts, strict=True),
            )
            self._set_meta({"n_rows": str(first_row + len(keys)), **(meta or {})})
        return replaced

    def commit_delete(self, keys: Sequence[PointId]) -> np.ndarray:
        """Tombstone the live points with these keys; returns their rows."""
        with self._transaction():
            rows = self._live_rows(keys)
            if len(rows):
                self._tombstone(rows)
        return rows

    def commit_compaction(self, meta: dict[str, str]) -> None:
        """Renumber the live rows 0..n-1 in row order and drop the dead ones, with ``meta``."""
        with self._transaction():
            self._db.execute("DELETE FROM points WHERE live = 0")
            # Two steps so that the primary key never collides mid-update: shift out, then in.
            self._db.execute("UPDATE points SET row = -1 - row")
            self._db.execute(
                "UPDATE points SET row = r.n FROM (SELECT row AS old, "
                "ROW_NUMBER() OVER (ORDER BY row DESC) - 1 AS n FROM points) AS r "
                "WHERE points.row = r.old"
            )
            self._set_meta(meta)

    def _live_rows(self, keys: Sequence[PointId], db: sqlite3.Connection | None = None) -> np.ndarray:
        """Rows of the live points with these ids (any order), ``(m,) int64``; on the writer's
        connection unless given another."""
        found: list[int] = []
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            found.extend(
                r[0]
                for r in (db or self._db).execute(
                    f"SELECT row FROM points WHERE live = 1 AND key IN ({marks})", tuple(chunk)
                )
            )
        return np.asarray(found, dtype=np.int64)

    def _tombstone(self, rows: np.ndarray) -> None:
        for chunk in _chunks(rows.tolist()):
            marks = ",".join("?" * len(chunk))
            self._db.execute(f"UPDATE points SET live = 0 WHERE row IN ({marks})", tuple(chunk))

    # -- reads --------------------------------------------------------------------------------
    def dead_rows(self) -> np.ndarray:
        with self._reading() as db:
            rows = db.execute("SELECT row FROM points WHERE live = 0").fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    def set_sizes(self) -> np.ndarray:
        """Vector-set size of every row, dead ones included, in row order: ``(n_rows,) int64``."""
        with self._reading() as db:
            rows = db.execute("SELECT COALESCE(n_vectors, 0) FROM points ORDER BY row").fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    def max_row(self) -> int:
        value = self._db.execute("SELECT MAX(row) FROM points").fetchone()[0]
        return -1 if value is None else int(value)

    def find(self, key: PointId) -> tuple[int, dict[str, Any] | None, str | None] | None:
        """``(row, payload, text)`` of the live point ``key``."""
        with self._reading() as db:
            row = db.execute("SELECT row, payload, text FROM points WHERE live = 1 AND key = ?", (key,)).fetchone()
        return None if row is None else (int(row[0]), _load(row[1]), row[2])

    def texts(self, *, after_row: int = -1) -> Iterator[tuple[int, str]]:
        """``(row, text)`` of every live row above ``after_row`` that has a text, in row order."""
        with self._reading() as db:
            cursor = db.execute(
                "SELECT row, text FROM points WHERE row > ? AND live = 1 AND text IS NOT NULL ORDER BY row",
                (after_row,))
            while chunk := cursor.fetchmany(65536):
                yield from chunk

    def has_text(self) -> bool:
        """Whether any row has a text."""
        with self._reading() as db:
            return db.execute("SELECT 1 FROM points WHERE text IS NOT NULL LIMIT 1").fetchone() is not None

    def describe(
        self, rows: Iterable[int], *, with_payload: bool = True
    ) -> dict[int, tuple[PointId, dict[str, Any] | None]]:
        """``row -> (id, payload)`` for the given rows."""
        rows = list(rows)
        column = "payload" if with_payload else "NULL"
        out: dict[int, tuple[PointId, dict[str, Any] | None]] = {}
        with self._reading() as db:
            for chunk in _chunks(rows):
                marks = ",".join("?" * len(chunk))
                for row, key, payload in db.execute(
                    f"SELECT row, key, {column} FROM points WHERE row IN ({marks})", tuple(chunk)
                ):
                    out[int(row)] = (key, _load(payload))
        return out

    def rows_of_ids(self, keys: Sequence[PointId]) -> np.ndarray:
        """``_live_rows`` for a reader: on a read connection, beside the writer."""
        with self._reading() as db:
            return self._live_rows(keys, db)

    def payloads(self, *, live_only: bool) -> Iterator[tuple[list[int], list[str]]]:
        """``(rows, payloads as JSON text)`` in chunks, in row order, rows with a payload only."""
        live = "AND live = 1" if live_only else ""
        with self._reading() as db:
            cursor = db.execute(f"SELECT row, payload FROM points WHERE payload IS NOT NULL {live} ORDER BY row")
            while chunk := cursor.fetchmany(65536):
                yield [row for row, _ in chunk], [text for _, text in chunk]

    def key_values(self, key: str, *, live_only: bool) -> Iterator[tuple[int, Any]]:
        """``(row, value)`` for every row whose payload has ``key`` (dotted: nested objects), in
        row order; values decoded from JSON (null is None). Dead rows too unless ``live_only``."""
        path = "$" + "".join(f'."{part}"' for part in key.split("."))
        live = "AND live = 1" if live_only else ""
        with self._reading() as db:
            # `->` gives the value as JSON text (NULL when the key is absent): one parse of the
            # payload, and true, 1 and "1" stay distinct. Decoded in one json.loads per chunk.
            cursor = db.execute(
                f"SELECT row, payload -> ? FROM points WHERE payload IS NOT NULL {live} ORDER BY row", (path,)
            )
            while chunk := cursor.fetchmany(65536):
                found = [(row, text) for row, text in chunk if text is not None]
                if found:
                    values = json.loads("[" + ",".join(text for _, text in found) + "]")
                    yield from zip((row for row, _ in found), values, strict=True)

    def check(self, n_rows: int) -> None:
        top = self.max_row()
        if top >= n_rows:
            raise CorruptIndex(
                f"catalog holds row {top} but records only {n_rows} committed rows; "
                "the catalog was modified outside tandem: restore the collection from a backup"
            )


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            if self._db.in_transaction:  # SQLite may have rolled back already (a full disk, say)
                self._db.execute("ROLLBACK")
            return
        try:
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # leave no transaction open for the next writer
                self._db.execute("ROLLBACK")
            raise


def _load(payload: str | None) -> dict[str, Any] | None:
    return None if payload is None else json.loads(payload)

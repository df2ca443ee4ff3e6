"""Ingestion jobs' state, persisted in SQLite (``data_dir/jobs.sqlite``).

A job is written when it is accepted (after its spooled body is on disk) and after every
committed chunk, with ``lines_read`` = the lines accounted for so far (committed or recorded as
bad). A job still ``running`` when the process stopped or crashed is resumed by the next
process from that line (``Ingestor.recover``); upserts replace points by id, so a chunk
committed but not yet recorded here is simply written again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_ERRORS = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    state TEXT NOT NULL,
    lines_read INTEGER NOT NULL DEFAULT 0,
    points_committed INTEGER NOT NULL DEFAULT 0,
    error_count INTEGER NOT NULL DEFAULT 0,
    errors TEXT NOT NULL DEFAULT '[]',
    message TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
)
"""


@dataclass
class Job:
    job_id: str
    collection: str
    state: str = "running"
    lines_read: int = 0
    points_committed: int = 0
    error_count: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    message: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    def add_error(self, line: int, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"line": line, "message": message[:500]})

    @property
    def rate_per_s(self) -> float:
        if self.started_at is None:
            return 0.0
        end = self.finished_at if self.finished_at is not None else time.time()
        return self.points_committed / max(end - self.started_at, 1e-6)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "collection": self.collection, "state": self.state,
            "lines_read": self.lines_read, "points_committed": self.points_committed,
            "rate_per_s": round(self.rate_per_s, 1), "errors": sorted(self.errors, key=lambda e: e["line"]),
            "error_count": self.error_count, "message": self.message,
            "created_at": self.created_at, "finished_at": self.finished_at,
        }


class JobStore:
    """Thread-safe: one connection, one lock (writes are small and rare: one per chunk)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> JobStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a 202 promises the job survives a power cut
        conn.execute(_SCHEMA)
        return cls(conn)

    def unfinished(self) -> list[Job]:
        """Jobs a previous process accepted and did not finish, oldest first."""
        return self._select("WHERE state='running' ORDER BY created_at", [])

    def recent(self, *, state: str | None, limit: int) -> list[Job]:
        """The newest ``limit`` jobs, newest first, of one state or any."""
        where, params = ("WHERE state=?", [state]) if state else ("", [])
        return self._select(f"{where} ORDER BY created_at DESC LIMIT ?", [*params, limit])

    def get(self, job_id: str) -> Job | None:
        found = self._select("WHERE job_id=?", [job_id])
        return found[0] if found else None

    def save(self, job: Job) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (job.job_id, job.collection, job.state, job.lines_read, job.points_committed,
                 job.error_count, json.dumps(job.errors), job.message, job.created_at,
                 job.started_at, job.finished_at),
            )

    def _select(self, clauses: str, params: list[Any]) -> list[Job]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT job_id, collection, state, lines_read, points_committed, error_count, errors, "
                f"message, created_at, started_at, finished_at FROM jobs {clauses}", params,
            ).fetchall()
        return [Job(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8], r[9], r[10]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

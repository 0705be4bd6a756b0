"""The job store: an SQLite database (WAL) plus one image folder per job under the data directory.

Every state change is a committed transaction before anyone is told of it, so a job the API accepted (202) is on
disk, and a job shown as succeeded has its images in place. Seeds are fixed in the stored request, so a job run
again after a crash makes the images its first run would have made.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running", *TERMINAL)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    expired INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS inputs (
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, name)
);
"""


class DataDirBusy(RuntimeError):
    """Another server holds the data directory: two would run the same queued jobs."""


class IdempotencyConflict(ValueError):
    """An Idempotency-Key seen before with another request."""


@dataclass
class Job:
    id: str
    kind: str
    status: str
    request: dict[str, Any]
    created: float
    started: float | None
    finished: float | None
    attempts: int
    images: int
    error: str | None
    expired: bool
    seq: int

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    """Thread-safe (one connection behind a lock; every call is short: no sampling happens under it)."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "images").mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._flock = open(self.data_dir / "lock", "a+b")  # held, locked, for the store's lifetime
        try:
            fcntl.flock(self._flock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._flock.close()
            message = f"another ldm-serve is using --data_dir {self.data_dir} (one process per data directory)"
            raise DataDirBusy(message) from None
        self._db = sqlite3.connect(self.data_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the answer goes out
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._flock.close()

    def images_dir(self, job_id: str) -> Path:
        return self.data_dir / "images" / job_id

    def _row(self, row) -> Job | None:
        if row is None:
            return None
        seq, id_, kind, status, request, _key, created, started, finished, attempts, images, error, expired = row
        return Job(id_, kind, status, json.loads(request), created, started, finished, attempts, images, error,
                   bool(expired), seq)  # fmt: skip

    def add(
        self, kind: str, request: dict[str, Any], inputs: dict[str, bytes], idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        """Store a new queued job with its input images; (job, True). With a key seen before: (that job, False)."""
        text = json.dumps(request, sort_keys=True)
        with self._lock:
            if idempotency_key is not None:
                old = self._row(
                    self._db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                )
                if old is not None:
                    if json.dumps(old.request, sort_keys=True) != text or old.kind != kind:
                        raise IdempotencyConflict("Idempotency-Key was used before with another request")
                    return old, False
            job_id = new_job_id()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO jobs (id, kind, status, request, idempotency_key, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (job_id, kind, "queued", text, idempotency_key, time.time()),
                )
                for name, data in inputs.items():
                    self._db.execute("INSERT INTO inputs VALUES (?, ?, ?)", (job_id, name, data))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._get(job_id), True

    def _get(self, job_id: str) -> Job | None:
        return self._row(self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._get(job_id)

    def by_key(self, idempotency_key: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return self._row(row)

    def recent(self, limit: int = 50) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [self._row(r) for r in rows]

    def position(self, job: Job) -> int:
        """Jobs ahead of a queued job (the running one included); 0 = next to run."""
        with self._lock:
            (ahead,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE (status = 'queued' AND seq < ?) OR status = 'running'", (job.seq,)
            ).fetchone()
        return ahead

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: dict(rows).get(status, 0) for status in STATUSES}

    def queued(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]

    def inputs(self, job_id: str) -> dict[str, bytes]:
        with self._lock:
            rows = self._db.execute("SELECT name, data FROM inputs WHERE job_id = ?", (job_id,)).fetchall()
        return {name: bytes(data) for name, data in rows}

    def claim_next(self) -> Job | None:
        """The oldest queued job, now marked running (committed)."""
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            self._db.execute(
                "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1 WHERE id = ? "
                "AND status = 'queued'",
                (time.time(), row[0]),
            )
            return self._get(row[0])

    def finish(self, job_id: str, status: str, error: str | None = None, images: int = 0) -> bool:
        """Mark a queued or running job `status` (terminal); False if it had already ended."""
        assert status in TERMINAL
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, images = ?, finished = ? "
                "WHERE id = ? AND status IN ('queued', 'running')",
                (status, error, images, time.time(), job_id),
            )
            if cur.rowcount:
                self._db.execute("DELETE FROM inputs WHERE job_id = ?", (job_id,))
            return bool(cur.rowcount)

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job that has not started; False if it is not queued (any more)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ? AND status = 'queued'",
                (time.time(), job_id),
            )
            return bool(cur.rowcount)

    def requeue(self, job_id: str) -> None:
        """A running job back to the queue (a drain that ran out of time): the next start runs it again."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'queued', started = NULL WHERE id = ? AND status = 'running'",
                             (job_id,))  # fmt: skip

    def requeue_interrupted(self) -> list[str]:
        """At start: jobs left running by a crash go back to the queue, in their order."""
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE status = 'running'").fetchall()]
            self._db.execute("UPDATE jobs SET status = 'queued', started = NULL WHERE status = 'running'")
        return ids

    def expire(self, keep_seconds: float, now: float | None = None) -> list[str]:
        """Finished jobs older than `keep_seconds`: images deleted, the job marked expired (its endpoints: 410)."""
        cutoff = (time.time() if now is None else now) - keep_seconds
        with self._lock:
            ids = [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM jobs WHERE expired = 0 AND finished IS NOT NULL AND finished < ?", (cutoff,)
                ).fetchall()
            ]
            for job_id in ids:
                self._db.execute("UPDATE jobs SET expired = 1 WHERE id = ?", (job_id,))
        for job_id in ids:
            shutil.rmtree(self.images_dir(job_id), ignore_errors=True)
        return ids

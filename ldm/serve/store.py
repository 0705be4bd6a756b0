"""The job store: an SQLite database (WAL) plus one image folder per job under the data directory.

Every state change is a committed transaction before anyone is told of it, so a job the API accepted (202) is on
disk, and a job shown as succeeded has its images in place. Seeds are fixed in the stored request, so a job run
again after a crash makes the images its first run would have made.

One server owns a data directory (an exclusive lock). Several replicas may share one (Ray Serve, on one node) with
leases instead (`use_leases`, before the store is opened): a replica claims a job with its name and a lease expiry
that a heartbeat renews; a job whose lease ran out (its replica died) is claimed again by another replica.
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


@dataclass(frozen=True)
class Leases:
    """Shared-store mode: this process's name (`owner`, recorded on the jobs it runs) and the lease length."""

    owner: str
    seconds: float = 30.0


LEASES: Leases | None = None  # set by `use_leases`; None: the data directory is this process's alone


def use_leases(owner: str, seconds: float = 30.0) -> None:
    """Open every later store of this process in shared mode (a Ray Serve replica calls it before building its app)."""
    global LEASES
    LEASES = Leases(owner, seconds)


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
    owner: str | None = None  # the replica that runs (or ran) it, in shared mode

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    """Thread-safe (one connection behind a lock; every call is short: no sampling happens under it)."""

    def __init__(self, data_dir: str | Path):
        self.leases = LEASES
        self.owner = None if self.leases is None else self.leases.owner
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "images").mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._flock = open(self.data_dir / "lock", "a+b")  # held, locked, for the store's lifetime
        try:
            # Shared mode shares the lock with the other replicas (and still keeps a lone server out).
            fcntl.flock(self._flock, (fcntl.LOCK_EX if self.leases is None else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError:
            self._flock.close()
            message = f"another ldm-serve is using --data_dir {self.data_dir} (one process per data directory)"
            raise DataDirBusy(message) from None
        self._db = sqlite3.connect(self.data_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=30000")  # replicas sharing the file wait for each other's commits
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the answer goes out
        self._db.executescript(SCHEMA)
        self._add_lease_columns()
        self._closed = threading.Event()
        if self.leases is not None:
            threading.Thread(target=self._heartbeat, name="ldm-serve-leases", daemon=True).start()

    def _add_lease_columns(self) -> None:
        """Older databases gain the owner, lease and cancel columns (NULL for jobs run without leases)."""
        self._db.execute("BEGIN IMMEDIATE")
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)").fetchall()}
        for name, kind in (("owner", "TEXT"), ("lease", "REAL"), ("cancel", "INTEGER")):
            if name not in columns:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        self._db.execute("COMMIT")

    def _heartbeat(self) -> None:
        """Renew the leases of this replica's running jobs while the process lives; when it dies, they run out."""
        assert self.leases is not None
        while not self._closed.wait(self.leases.seconds / 3):
            with self._lock:
                if self._closed.is_set():
                    return
                self._db.execute("UPDATE jobs SET lease = ? WHERE status = 'running' AND owner = ?",
                                 (time.time() + self.leases.seconds, self.owner))  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            self._db.close()
            self._flock.close()

    def images_dir(self, job_id: str) -> Path:
        return self.data_dir / "images" / job_id

    def _row(self, row) -> Job | None:
        if row is None:
            return None
        seq, id_, kind, status, request, _key, created, started, finished, attempts, images, error, expired, owner = (
            row[:14]
        )  # then lease and cancel (the columns every store adds when it opens the database)
        return Job(id_, kind, status, json.loads(request), created, started, finished, attempts, images, error,
                   bool(expired), seq, owner)  # fmt: skip

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
        """The oldest queued job (in shared mode also a running one whose lease ran out), now marked running by this
        process (committed; in shared mode in one write transaction, so two replicas never claim the same job)."""
        now = time.time()
        expired = "" if self.leases is None else " OR (status = 'running' AND lease < ?)"
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(f"SELECT id FROM jobs WHERE status = 'queued'{expired} ORDER BY seq LIMIT 1",
                                       () if self.leases is None else (now,)).fetchone()  # fmt: skip
                if row is not None:
                    lease = None if self.leases is None else now + self.leases.seconds
                    self._db.execute("UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1, "
                                     "owner = ?, lease = ? WHERE id = ?", (now, self.owner, lease, row[0]))  # fmt: skip
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return None if row is None else self._get(row[0])

    def finish(self, job_id: str, status: str, error: str | None = None, images: int = 0) -> bool:
        """Mark a queued or running job `status` (terminal); False if it had already ended."""
        assert status in TERMINAL
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, images = ?, finished = ? "
                "WHERE id = ? AND (status = 'queued' OR (status = 'running' AND owner IS ?))",
                (status, error, images, time.time(), job_id, self.owner),
            )  # a job another replica took over (this one's lease ran out) is that replica's to finish
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

    def request_cancel(self, job_id: str) -> bool:
        """Flag a running job for cancelling, for whichever replica runs it (it stops at its next step); False if
        it is not running."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET cancel = 1 WHERE id = ? AND status = 'running'", (job_id,))
            return bool(cur.rowcount)

    def cancel_requests(self) -> list[str]:
        """This process's running jobs that some replica was asked to cancel."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE status = 'running' AND cancel = 1 AND owner IS ?",
                                    (self.owner,)).fetchall()  # fmt: skip
        return [r[0] for r in rows]

    def requeue(self, job_id: str) -> None:
        """A running job back to the queue (a drain that ran out of time): the next start runs it again."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'queued', started = NULL, owner = NULL, lease = NULL "
                             "WHERE id = ? AND status = 'running' AND owner IS ?", (job_id, self.owner))  # fmt: skip

    def requeue_interrupted(self) -> list[str]:
        """At start: jobs left running by a crash go back to the queue, in their order (in shared mode only those
        whose lease ran out: the others' replicas are alive)."""
        where = "status = 'running'" + ("" if self.leases is None else f" AND lease < {time.time()!r}")
        with self._lock:
            ids = [r[0] for r in self._db.execute(f"SELECT id FROM jobs WHERE {where}").fetchall()]
            self._db.execute(f"UPDATE jobs SET status = 'queued', started = NULL, owner = NULL, lease = NULL "
                             f"WHERE {where}")  # fmt: skip
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

"""The sidecar's persistent state in one sqlite file (WAL): the job queue and the layer map.

* **jobs** — one row per (repository, manifest digest): ``queued`` → ``running`` → ``done`` | ``failed``, with
  attempts, the time of the next try and the last error.  The unique key is what makes "never convert the same
  manifest twice" hold across restarts and duplicate notifications (distribution delivers at least once).  A
  job left ``running`` by a crash is queued again on start.
* **layers** / **layer_repos** — original layer digest → its EROFS blob (descriptor + chunk digests) and the
  repositories known to hold the blob, so a layer converted for one repository is mounted, not converted,
  for the next (:class:`registry_sidecar.convert.LayerMap`).

One connection shared by threads under a lock: the sidecar's write rate is a few rows per image.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bootseer.index import BadIndex, LayerBlob
from registry_sidecar.convert import ConvertedLayer

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    repo TEXT NOT NULL,
    digest TEXT NOT NULL,
    tag TEXT NOT NULL DEFAULT '',
    media_type TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    crashes INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (repo, digest)
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, next_at);
CREATE TABLE IF NOT EXISTS layers (
    layer_digest TEXT PRIMARY KEY,
    blob TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS layer_repos (
    layer_digest TEXT NOT NULL,
    repo TEXT NOT NULL,
    PRIMARY KEY (layer_digest, repo)
);
"""


class QueueFull(RuntimeError):
    """The job table holds its maximum of queued jobs: the event is not persisted (the registry retries it)."""


@dataclass
class Job:
    id: int
    repo: str
    digest: str
    tag: str
    media_type: str
    state: str
    attempts: int
    next_at: float
    last_error: str
    result: str


class State:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
        if "crashes" not in cols:  # a state file from before crash counting
            self._db.execute("ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --------------------------------------------------------------------------------------------- jobs
    def enqueue(self, repo: str, digest: str, tag: str = "", media_type: str = "",
                max_queued: int | None = None) -> bool:
        """Queue (repo, digest) unless it is known; a ``failed`` job is given a fresh start by a new push.
        Returns True if something was queued; raises :class:`QueueFull` past ``max_queued`` queued jobs (anyone
        who may push could otherwise grow the table without bound)."""
        now = time.time()
        with self._lock:
            row = self._db.execute("SELECT state FROM jobs WHERE repo=? AND digest=?", (repo, digest)).fetchone()
            if (row is None or row[0] == "failed") and max_queued is not None:
                (queued,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state='queued'").fetchone()
                if queued >= max_queued:
                    raise QueueFull(f"{queued} conversion jobs queued already (max_queued): {repo}@{digest} "
                                    "not queued")
            if row is None:
                self._db.execute("INSERT INTO jobs (repo, digest, tag, media_type, created, updated) "
                                 "VALUES (?,?,?,?,?,?)", (repo, digest, tag, media_type, now, now))
                return True
            if row[0] == "failed":
                self._db.execute("UPDATE jobs SET state='queued', attempts=0, crashes=0, next_at=0, updated=? "
                                 "WHERE repo=? AND digest=?", (now, repo, digest))
                return True
            return False

    def claim(self, now: float | None = None) -> Job | None:
        """Take the oldest due job and mark it running."""
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT id FROM jobs WHERE state='queued' AND next_at<=? "
                                       "ORDER BY next_at, id LIMIT 1", (now,)).fetchone()
                if row is None:
                    self._db.execute("COMMIT")
                    return None
                self._db.execute("UPDATE jobs SET state='running', attempts=attempts+1, updated=? WHERE id=?",
                                 (now, row[0]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.job(row[0])

    def job(self, job_id: int) -> Job:
        with self._lock:
            row = self._db.execute("SELECT id, repo, digest, tag, media_type, state, attempts, next_at, last_error, "
                                   "result FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job(*row)

    def find(self, repo: str, digest: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE repo=? AND digest=?", (repo, digest)).fetchone()
        return self.job(row[0]) if row else None

    def complete(self, job_id: int, result: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET state='done', result=?, last_error='', updated=? WHERE id=?",
                             (result, time.time(), job_id))

    def retry(self, job_id: int, error: str, at: float) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET state='queued', next_at=?, last_error=?, updated=? WHERE id=?",
                             (at, error[:2000], time.time(), job_id))

    def fail(self, job_id: int, error: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET state='failed', last_error=?, updated=? WHERE id=?",
                             (error[:2000], time.time(), job_id))

    def requeue_running(self, max_crashes: int | None = None, next_at: float = 0.0) -> tuple[int, list[Job]]:
        """After a crash: jobs that were running go back to the queue at ``next_at`` (behind the jobs already
        due: the one that was running may be what killed the process), their attempt counted as a crash.  A job
        that was running at ``max_crashes`` deaths fails instead: a layer that gets the converter OOM-killed
        must not take the sidecar down forever.  Returns the number requeued and the jobs failed."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("UPDATE jobs SET crashes=crashes+1, updated=? WHERE state='running'", (now,))
                failed: list[int] = []
                if max_crashes is not None:
                    failed = [r[0] for r in self._db.execute(
                        "SELECT id FROM jobs WHERE state='running' AND crashes>=?", (max_crashes,))]
                    self._db.execute("UPDATE jobs SET state='failed', last_error=? WHERE state='running' AND "
                                     "crashes>=?", (f"running when the sidecar died {max_crashes} times", max_crashes))
                n = self._db.execute("UPDATE jobs SET state='queued', next_at=? WHERE state='running'",
                                     (next_at,)).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return n, [self.job(i) for i in failed]

    def next_due(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(next_at) FROM jobs WHERE state='queued'").fetchone()
        return row[0] if row and row[0] is not None else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = {"queued": 0, "running": 0, "done": 0, "failed": 0}
        out.update({s: n for s, n in rows})
        return out

    def jobs(self, limit: int | None = None) -> list[Job]:
        """Every job in id order, or the newest ``limit`` of them."""
        with self._lock:
            if limit is None:
                ids = [r[0] for r in self._db.execute("SELECT id FROM jobs ORDER BY id").fetchall()]
            else:
                ids = [r[0] for r in self._db.execute("SELECT id FROM (SELECT id FROM jobs ORDER BY id DESC LIMIT ?) "
                                                      "ORDER BY id", (limit,)).fetchall()]
        return [self.job(i) for i in ids]

    # ------------------------------------------------------------------------------------------ layer map
    def get_layer(self, layer_digest: str) -> ConvertedLayer | None:
        with self._lock:
            row = self._db.execute("SELECT blob FROM layers WHERE layer_digest=?", (layer_digest,)).fetchone()
            if row is None:
                return None
            repos = [r[0] for r in self._db.execute("SELECT repo FROM layer_repos WHERE layer_digest=? ORDER BY repo",
                                                     (layer_digest,))]
        try:
            return ConvertedLayer(LayerBlob.from_dict(json.loads(row[0])), repos)
        except (KeyError, ValueError, TypeError, BadIndex):  # recorded by an older format: convert again
            return None

    def put_layer(self, blob: LayerBlob, repo: str) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT INTO layers (layer_digest, blob, updated) VALUES (?,?,?) "
                             "ON CONFLICT(layer_digest) DO UPDATE SET blob=excluded.blob, updated=excluded.updated",
                             (blob.layer_digest, json.dumps(blob.to_dict(), sort_keys=True), time.time()))
            self._db.execute("INSERT OR IGNORE INTO layer_repos (layer_digest, repo) VALUES (?,?)",
                             (blob.layer_digest, repo))
            self._db.execute("COMMIT")

    def forget_layer(self, layer_digest: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM layers WHERE layer_digest=?", (layer_digest,))
            self._db.execute("DELETE FROM layer_repos WHERE layer_digest=?", (layer_digest,))

    def layer_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM layers").fetchone()[0])

"""Snapshot metadata in sqlite, modelled on containerd's ``snapshots/storage``: keys, numeric ids, parents,
kinds, labels, timestamps and committed usage.  No filesystem work happens here.

Why sqlite and not a JSON file or bolt: one file, real transactions, and WAL journaling, so a ``kill -9``
mid-write loses at most the transaction in flight and never corrupts what was committed.  Every mutating
RPC is exactly one transaction (``with store.tx() as tx:``); the caller does its directory work inside
or around that block in an order that makes a crash at any point repairable (see :mod:`snapshotter.overlay`).

Semantics copied from containerd's storage layer, because containerd's metadata layer relies on them:

* ids are never reused (``AUTOINCREMENT``), so a directory named after a removed snapshot's id can never be
  mistaken for a live one;
* Commit moves the record to its new name, keeps its id (and so its directory), resets created/updated,
  *replaces* the labels with the commit's labels, and checks "name taken" before "key is not active";
* only committed snapshots can be parents (INVALID_ARGUMENT otherwise) and a snapshot with children cannot
  be removed (FAILED_PRECONDITION);
* Update with ``labels.<k>`` paths sets or (value absent/empty) deletes single labels, ``labels`` or no
  path replaces the whole map, any other path is INVALID_ARGUMENT;
* labels with an empty value are not stored.

Namespaces: containerd's own metadata layer already makes backend keys unique (``<ns>/<n>/<key>``), but a
direct client (``ctr snapshot`` against our socket, tests, other tools) relies on the ``containerd-namespace``
header.  So records carry the namespace they were created in and lookups are scoped to it; a call without
a namespace (``ns=None``) sees every namespace, as containerd's garbage collector expects.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

KIND_VIEW, KIND_ACTIVE, KIND_COMMITTED = "view", "active", "committed"
MAX_LABEL_SIZE = 4096  # containerd's labels.Validate: len(key) + len(value) per label
MAX_LABELS_BYTES = 1 << 20  # ours: a sanity bound on a whole map, far above anything containerd sends

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    ns         TEXT NOT NULL,
    key        TEXT NOT NULL,
    kind       TEXT NOT NULL,
    parent     TEXT NOT NULL DEFAULT '',
    parent_id  INTEGER REFERENCES snapshots(id),
    labels     TEXT NOT NULL DEFAULT '{}',
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0,
    inodes     INTEGER NOT NULL DEFAULT 0,
    lower      TEXT,
    UNIQUE (ns, key)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE INDEX IF NOT EXISTS snapshots_key ON snapshots(key);
"""


@dataclass
class Record:
    """One snapshot.  ``lower`` is set for a remote snapshot: the directory (mounted by a remote handler,
    outside our tree) that stands for this layer in lowerdir chains instead of ``snapshots/<id>/fs``."""

    id: int
    ns: str
    key: str
    kind: str
    parent: str
    parent_id: int | None
    labels: dict[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0
    size: int = 0
    inodes: int = 0
    lower: str | None = None


def validate_labels(labels: dict[str, str]) -> None:
    """containerd's ``labels.Validate`` (per label: key + value ≤ 4096 bytes) plus a whole-map bound."""
    total = 0
    for k, v in labels.items():
        n = len(k.encode()) + len(v.encode())
        total += n
        if n > MAX_LABEL_SIZE:
            raise InvalidArgument(f"label key and value length ({n} bytes) greater than maximum size "
                                  f"({MAX_LABEL_SIZE} bytes), key: {k[:64]}")
    if total > MAX_LABELS_BYTES:
        raise InvalidArgument(f"labels total {total} bytes, more than {MAX_LABELS_BYTES}")


def _clean(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if v != ""}


def now_ns() -> int:
    return time.time_ns()


def _row(r: sqlite3.Row) -> Record:
    return Record(r["id"], r["ns"], r["key"], r["kind"], r["parent"], r["parent_id"], json.loads(r["labels"]),
                  r["created_ns"], r["updated_ns"], r["size"], r["inodes"], r["lower"])


class Tx:
    """Operations inside one transaction (or one consistent read).  ``ns=None`` means "any namespace"."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def find(self, ns: str | None, key: str) -> Record | None:
        if ns is None:  # no namespace: prefer the un-namespaced record, else the oldest one with this key
            r = self.db.execute("SELECT * FROM snapshots WHERE key=? ORDER BY ns != '', id LIMIT 1",
                                (key,)).fetchone()
        else:
            r = self.db.execute("SELECT * FROM snapshots WHERE ns=? AND key=?", (ns, key)).fetchone()
        return _row(r) if r else None

    def get(self, ns: str | None, key: str) -> Record:
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        rec = self.find(ns, key)
        if rec is None:
            raise NotFound(f"snapshot {key} does not exist")
        return rec

    def by_id(self, sid: int) -> Record:
        r = self.db.execute("SELECT * FROM snapshots WHERE id=?", (sid,)).fetchone()
        if r is None:
            raise NotFound(f"snapshot id {sid} does not exist")
        return _row(r)

    def chain(self, rec: Record) -> list[Record]:
        """``rec``'s ancestors, nearest first (the overlay lowerdir order)."""
        out = []
        pid = rec.parent_id
        while pid is not None:
            p = self.by_id(pid)
            out.append(p)
            pid = p.parent_id
        return out

    def create(self, ns: str, key: str, parent: str, kind: str, labels: dict[str, str], *,
               lower: str | None = None, size: int = 0, inodes: int = 0) -> Record:
        """Insert a snapshot.  ``kind`` committed is only used for remote layers (created already done)."""
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        validate_labels(labels)
        parent_id = None
        if parent:
            p = self.find(ns, parent)
            if p is None:
                raise NotFound(f"missing parent {parent!r}")
            if p.kind != KIND_COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not committed snapshot")
            parent_id = p.id
        if self.find(ns, key) is not None:
            raise AlreadyExists(f"snapshot {key}: already exists")
        t = now_ns()
        cur = self.db.execute(
            "INSERT INTO snapshots (ns, key, kind, parent, parent_id, labels, created_ns, updated_ns, size, inodes,"
            " lower) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (ns, key, kind, parent, parent_id, json.dumps(_clean(labels)), t, t, size, inodes, lower))
        return self.by_id(int(cur.lastrowid or 0))

    def commit(self, ns: str | None, key: str, name: str, labels: dict[str, str], size: int, inodes: int) -> Record:
        if not name:
            raise InvalidArgument("commit name must not be empty")
        validate_labels(labels)
        rec = self.get(ns, key)
        if self.find(rec.ns, name) is not None:
            raise AlreadyExists(f"committed snapshot {name}: already exists")
        if rec.kind != KIND_ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        t = now_ns()
        self.db.execute("UPDATE snapshots SET key=?, kind=?, labels=?, created_ns=?, updated_ns=?, size=?, inodes=?"
                        " WHERE id=?", (name, KIND_COMMITTED, json.dumps(_clean(labels)), t, t, size, inodes, rec.id))
        return self.by_id(rec.id)

    def remove(self, ns: str | None, key: str) -> Record:
        rec = self.get(ns, key)
        if self.db.execute("SELECT 1 FROM snapshots WHERE parent_id=? LIMIT 1", (rec.id,)).fetchone():
            raise FailedPrecondition(f"cannot remove snapshot {key!r} with child")
        self.db.execute("DELETE FROM snapshots WHERE id=?", (rec.id,))
        return rec

    def update_labels(self, ns: str | None, key: str, labels: dict[str, str], paths: list[str]) -> Record:
        rec = self.get(ns, key)
        new = dict(rec.labels)
        if not paths:
            new = dict(labels)
        for path in paths:
            if path.startswith("labels."):
                k = path[len("labels."):]
                new[k] = labels.get(k, "")
            elif path == "labels":
                new = dict(labels)
            else:
                raise InvalidArgument(f'cannot update "{path}" field on snapshot "{key}"')
        new = _clean(new)
        validate_labels(new)
        self.db.execute("UPDATE snapshots SET labels=?, updated_ns=? WHERE id=?", (json.dumps(new), now_ns(), rec.id))
        return self.by_id(rec.id)

    def all(self, ns: str | None) -> list[Record]:
        if ns is None:
            rows = self.db.execute("SELECT * FROM snapshots ORDER BY key, ns").fetchall()
        else:
            rows = self.db.execute("SELECT * FROM snapshots WHERE ns=? ORDER BY key", (ns,)).fetchall()
        return [_row(r) for r in rows]

    def ids(self) -> set[int]:
        return {int(r[0]) for r in self.db.execute("SELECT id FROM snapshots")}


class MetaStore:
    """The sqlite file.  One connection behind a lock: the daemon serialises metadata work (each statement
    is microseconds) and does its slow filesystem work outside the lock where it safely can."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed RPC survives power loss, not just kill -9
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self.lock = threading.RLock()
        self._closed = False

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """One write transaction; rolled back if the block raises."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self.db)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A consistent read (one deferred transaction, so a multi-statement read sees one state)."""
        with self.lock:
            self.db.execute("BEGIN")
            try:
                yield Tx(self.db)
            finally:
                self.db.execute("COMMIT")

    def close(self) -> None:
        with self.lock:
            if not self._closed:
                self._closed = True
                self.db.close()

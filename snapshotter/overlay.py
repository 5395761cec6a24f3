"""The snapshotter core: containerd's overlayfs semantics over :class:`MetaStore` plus plain directories.

Plain Python, no gRPC: :mod:`snapshotter.service` is a thin adapter over this, and unit tests drive it
directly.  Layout under ``root`` (the same as containerd's overlay snapshotter, so operators find their way)::

    metadata.db              sqlite (WAL)
    snapshots/<id>/fs        the snapshot's upper dir (empty for a remote layer: its files are at ``lower``)
    snapshots/<id>/work      overlay workdir (active snapshots only)
    snapshots/new-*          being created; only ever exists while the metadata lock is held
    snapshots/rm-*           being deleted

Crash ordering — a ``kill -9`` anywhere must leave either the old or the new state after a restart:

* Prepare/View: inside one transaction (and the metadata lock): make ``new-*`` with ``fs``/``work`` →
  insert the record → rename the dir to ``<id>`` → commit.  A crash before the commit rolls the record back
  and leaves a dir without a record.
* Commit: measure usage → move the record to its name (one transaction).  Nothing on disk moves.
* Remove: delete the record (transaction) → rename ``<id>`` to ``rm-*`` → delete it.  A crash in between
  leaves a dir without a record.
* Cleanup (also run at every start, before serving): every entry of ``snapshots/`` that is not the id of
  a record is moved to ``rm-*`` under the lock and deleted.  Removing a dir first unmounts anything below
  it: nothing is ever deleted *through* a mount.

sqlite ids can be reused only when an insert rolls back, i.e. exactly in the crash case above, and the
startup cleanup removes such a dir before any new Prepare could pick its id; a Prepare that still finds its
target name taken discards the stale dir first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from snapshotter import faults
from snapshotter.errors import AlreadyExists, FailedPrecondition, SnapshotError
from snapshotter.filters import Adaptor, parse_all
from snapshotter.metastore import KIND_ACTIVE, KIND_COMMITTED, KIND_VIEW, MetaStore, Record, Tx, validate_labels
from snapshotter.remote import LABEL_REMOTE, LABEL_SNAPSHOT_REF, RemoteHandler, RemoteLayer, RemoteRequest

log = logging.getLogger("bootseer.snapshotter")


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes, inodes) exactly as containerd's ``fs.DiskUsage`` counts them: allocated blocks × 512, every
    inode once (hardlinks once), the root directory included."""
    seen: set[tuple[int, int]] = set()
    size = 0
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0, 0
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    stack = [str(path)]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                ident = (st.st_dev, st.st_ino)
                if ident not in seen:
                    seen.add(ident)
                    size += st.st_blocks * 512
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return size, len(seen)


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = str(path).rstrip("/") + "/"
    out = set()
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == str(path) or mp.startswith(prefix):
                out.add(mp)
    return sorted(out, key=lambda m: m.count("/"), reverse=True)


def unmount_below(path: Path) -> None:
    """Unmount everything at or below ``path`` (lazily if busy); raise if something stays mounted."""
    for mp in mounts_below(path):
        if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True)
    left = mounts_below(path)
    if left:
        raise OSError(f"cannot clear {path}: still mounted: {', '.join(left)}")


def _overlay_supports_index() -> bool:
    return Path("/sys/module/overlay/parameters/index").exists()


class Snapshotter:
    """containerd's overlay snapshotter, with an optional :class:`RemoteHandler` consulted on Prepare."""

    def __init__(self, root: Path, remote: RemoteHandler | None = None,
                 mount_options: tuple[str, ...] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.snapshots = self.root / "snapshots"
        self.snapshots.mkdir(exist_ok=True, mode=0o700)
        self.store = MetaStore(self.root / "metadata.db")
        self.remote = remote
        if mount_options is None:
            # containerd: index=off unless configured otherwise, so a lower dir shared by several overlays
            # (or reused after a crash) never trips the kernel's "upper/lower already in use" index check
            mount_options = ("index=off",) if _overlay_supports_index() else ()
        self.options = tuple(mount_options)

    def close(self) -> None:
        self.store.close()

    # --------------------------------------------------------------------------------------------- paths
    def _dir(self, sid: int) -> Path:
        return self.snapshots / str(sid)

    def upper(self, sid: int) -> Path:
        return self._dir(sid) / "fs"

    def layer_path(self, rec: Record) -> Path:
        """Where ``rec``'s files are when it is a lower layer: its ``fs`` dir, or a remote layer's mount."""
        return Path(rec.lower) if rec.lower else self.upper(rec.id)

    # --------------------------------------------------------------------------------------------- start
    def recover(self) -> list[str]:
        """At daemon start: remove crash leftovers, then let the remote handler re-attach its layers."""
        removed = self._remove_orphans()
        if self.remote is not None:
            with self.store.read() as tx:
                remote = [r for r in tx.all(None) if r.lower]
            try:
                self.remote.restore(remote)
            except Exception:
                log.exception("remote handler failed to restore %d remote snapshots", len(remote))
        return removed

    # ----------------------------------------------------------------------------------------- mutations
    def prepare(self, ns: str, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        target = labels.get(LABEL_SNAPSHOT_REF, "")
        if self.remote is not None and target and key:
            self._try_remote(ns, key, parent, target, labels)  # raises AlreadyExists when it took the layer
        mounts = self._create(ns, key, parent, KIND_ACTIVE, labels)
        assert isinstance(mounts, list)
        return mounts

    def view(self, ns: str, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        mounts = self._create(ns, key, parent, KIND_VIEW, labels)
        assert isinstance(mounts, list)
        return mounts

    def _try_remote(self, ns: str, key: str, parent: str, target: str, labels: dict[str, str]) -> None:
        assert self.remote is not None
        validate_labels(labels)
        with self.store.read() as tx:
            existing = tx.find(ns, target)
            if existing is not None:
                # answer "already exists" only for what containerd's follow-up List will find; anything else
                # holding the name goes the ordinary way and gets the ordinary answer
                if (existing.kind == KIND_COMMITTED and existing.parent == parent
                        and existing.labels.get(LABEL_SNAPSHOT_REF) == target):
                    raise AlreadyExists(f"target snapshot {target!r}: already exists")
                return
            if parent:
                p = tx.find(ns, parent)
                if p is None or p.kind != KIND_COMMITTED:
                    return  # let the ordinary path produce the NOT_FOUND / INVALID_ARGUMENT
                lowers = tuple(self.layer_path(r) for r in [p, *tx.chain(p)])
            else:
                lowers = ()
        req = RemoteRequest(ns, key, parent, target, dict(labels), lowers)
        try:
            layer = self.remote.prepare(req)
        except Exception:
            log.exception("remote handler failed on %s (target %s); falling back to a full pull", key, target)
            return
        if layer is None:
            return
        try:
            self.create_remote(ns, target, parent, labels, layer)
        except SnapshotError as e:
            with contextlib.suppress(Exception):
                self.remote.discard(req, layer)
            if isinstance(e, AlreadyExists):
                raise
            log.warning("could not record remote snapshot %s: %s; falling back", target, e)
            return
        raise AlreadyExists(f"target snapshot {target!r}: already exists")

    def create_remote(self, ns: str, name: str, parent: str, labels: dict[str, str], layer: RemoteLayer) -> Record:
        """Record a committed snapshot whose files are at ``layer.lower`` (one transaction, like Prepare)."""
        all_labels = {**labels, **layer.labels, LABEL_REMOTE: layer.name}
        rec = self._create(ns, name, parent, KIND_COMMITTED, all_labels, lower=str(layer.lower), size=layer.size,
                           inodes=layer.inodes)
        assert isinstance(rec, Record)
        return rec

    def _create(self, ns: str, key: str, parent: str, kind: str, labels: dict[str, str], *,
                lower: str | None = None, size: int = 0, inodes: int = 0) -> list[Mount] | Record:
        td: Path | None = None
        final: Path | None = None
        try:
            with self.store.tx() as tx:
                # made inside the lock, so Cleanup (which takes it too) never sees a new-* dir in flight
                td = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots))
                faults.crashpoint("prepare.tempdir")
                (td / "fs").mkdir(mode=0o755)
                if kind == KIND_ACTIVE:
                    (td / "work").mkdir(mode=0o711)
                rec = tx.create(ns, key, parent, kind, labels, lower=lower, size=size, inodes=inodes)
                faults.crashpoint("prepare.recorded")
                if rec.parent_id is not None:  # as containerd: the new upper takes the parent's root owner
                    st = os.stat(self.layer_path(tx.by_id(rec.parent_id)))
                    os.lchown(td / "fs", st.st_uid, st.st_gid)
                target = self._dir(rec.id)
                if os.path.lexists(target):  # a crash leftover whose (rolled back) id was handed out again
                    log.warning("discarding stale directory %s", target)
                    self._discard(target)
                os.rename(td, target)
                td, final = None, target
                faults.crashpoint("prepare.renamed")
                result: list[Mount] | Record = rec if kind == KIND_COMMITTED else self._mounts(tx, rec)
            faults.crashpoint("prepare.committed")
            return result
        except BaseException:
            for d in (td, final):
                if d is not None:
                    try:
                        self._discard(d)
                    except OSError:
                        log.exception("failed to remove %s; Cleanup will retry", d)
            raise

    def commit(self, ns: str | None, name: str, key: str, labels: dict[str, str]) -> Record:
        with self.store.read() as tx:
            rec = tx.get(ns, key)
        # measured outside the lock (it walks the whole layer); the transaction re-checks the record
        size, inodes = disk_usage(self.upper(rec.id))
        faults.crashpoint("commit.usage")
        with self.store.tx() as tx:
            out = tx.commit(ns, key, name, labels, size, inodes)
            if out.id != rec.id:
                raise FailedPrecondition(f"snapshot {key!r} changed while committing")
            faults.crashpoint("commit.recorded")
        faults.crashpoint("commit.committed")
        return out

    def remove(self, ns: str | None, key: str) -> None:
        with self.store.lock:
            with self.store.tx() as tx:
                rec = tx.remove(ns, key)
                faults.crashpoint("remove.recorded")
            faults.crashpoint("remove.committed")
            doomed = self._move_aside(self._dir(rec.id), rec)
        faults.crashpoint("remove.renamed")
        if doomed is not None:
            self._delete(doomed)

    def update(self, ns: str | None, key: str, labels: dict[str, str], paths: list[str]) -> Record:
        with self.store.tx() as tx:
            return tx.update_labels(ns, key, labels, paths)

    def cleanup(self) -> list[str]:
        """containerd's Cleanup: remove every directory no record refers to (crash leftovers) and let the remote
        handler release the lazy layers no snapshot uses; return the directory names removed."""
        removed = self._remove_orphans()
        if self.remote is not None:
            with self.store.read() as tx:
                remote = [r for r in tx.all(None) if r.lower]
            try:
                released = self.remote.collect(remote)
            except Exception:
                log.exception("remote handler failed to collect unused lazy layers")
            else:
                if released:
                    log.info("cleanup released %d lazy layers no snapshot uses", len(released))
        return removed

    def _remove_orphans(self) -> list[str]:
        """Remove every directory no record refers to (crash leftovers); return the names removed."""
        doomed: list[Path] = []
        names: list[str] = []
        with self.store.lock:
            with self.store.read() as tx:
                ids = tx.ids()
            orphans = [e for e in sorted(os.listdir(self.snapshots)) if not (e.isdigit() and int(e) in ids)]
            faults.crashpoint("cleanup.listed")
            for name in orphans:
                path = self.snapshots / name
                moved = path if name.startswith("rm-") else self._move_aside(path, None)
                if moved is not None:
                    doomed.append(moved)
                    names.append(name)
        for path in doomed:
            self._delete(path)
        return names

    # --------------------------------------------------------------------------------------------- reads
    def stat(self, ns: str | None, key: str) -> Record:
        with self.store.read() as tx:
            return tx.get(ns, key)

    def mounts(self, ns: str | None, key: str) -> list[Mount]:
        with self.store.read() as tx:
            rec = tx.get(ns, key)
            if rec.kind not in (KIND_ACTIVE, KIND_VIEW):
                raise FailedPrecondition(f"requested snapshot {key} not active or view")
            return self._mounts(tx, rec)

    def usage(self, ns: str | None, key: str) -> tuple[int, int]:
        with self.store.read() as tx:
            rec = tx.get(ns, key)
        if rec.kind == KIND_ACTIVE:
            return disk_usage(self.upper(rec.id))
        return rec.size, rec.inodes

    def walk(self, ns: str | None, filters: list[str]) -> list[Record]:
        fs = parse_all(filters)  # a syntax error is INVALID_ARGUMENT before any work
        with self.store.read() as tx:
            recs = tx.all(ns)
        return [r for r in recs if fs.match(_adaptor(r))]

    # ------------------------------------------------------------------------------------------- helpers
    def _mounts(self, tx: Tx, rec: Record) -> list[Mount]:
        """The mount shapes (and option order) of containerd's overlay snapshotter."""
        parents = tx.chain(rec)
        if not parents:
            flag = "ro" if rec.kind == KIND_VIEW else "rw"
            return [Mount("bind", str(self.upper(rec.id)), (flag, "rbind"))]
        opts: list[str] = []
        if rec.kind == KIND_ACTIVE:
            opts += [f"workdir={self._dir(rec.id) / 'work'}", f"upperdir={self.upper(rec.id)}"]
        elif len(parents) == 1:
            return [Mount("bind", str(self.layer_path(parents[0])), ("ro", "rbind"))]
        opts.append("lowerdir=" + ":".join(str(self.layer_path(p)) for p in parents))
        opts += self.options
        return [Mount("overlay", "overlay", tuple(opts))]

    def _move_aside(self, path: Path, rec: Record | None) -> Path | None:
        """Take ``path`` out of the id namespace (caller holds the lock): release a remote layer, unmount
        below, rename to ``rm-*``.  Returns the new path, or None if there was nothing there."""
        if rec is not None and rec.lower and self.remote is not None:
            try:
                self.remote.release(rec)
            except Exception:
                log.exception("remote handler failed to release %s", rec.lower)
        if not os.path.lexists(path):
            return None
        unmount_below(path)
        doomed = self.snapshots / f"rm-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, doomed)
        return doomed

    def _delete(self, path: Path) -> None:
        try:
            unmount_below(path)
            if faults.armed("remove.partial"):  # leave a half-deleted tree behind, then die
                _delete_one_entry(path / "fs")
                faults.crashpoint("remove.partial")
            shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError:
            log.exception("failed to remove %s; Cleanup will retry", path)

    def _discard(self, path: Path) -> None:
        if os.path.lexists(path):
            unmount_below(path)
            shutil.rmtree(path)


def _delete_one_entry(d: Path) -> None:
    for entry in d.iterdir() if d.is_dir() else ():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        return


def _adaptor(rec: Record) -> Adaptor:
    """containerd's ``adaptSnapshot``: name, parent, kind, labels.<key> (absent when there are no labels)."""

    def get(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "kind":
            return rec.kind, True
        if head == "name":
            return rec.key, True
        if head == "parent":
            return rec.parent, True
        if head == "labels":
            if not rec.labels:
                return "", False
            k = ".".join(fieldpath[1:])
            return (rec.labels[k], True) if k in rec.labels else ("", False)
        return "", False

    return get


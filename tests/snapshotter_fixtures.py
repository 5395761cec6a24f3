"""Helpers for the snapshotter tests: the daemon as a real process, a namespaced gRPC client, mounting what
the daemon returns the way containerd does, and a file-by-file description of a tree to compare trees.

The daemon always runs as a subprocess on a unix socket (not in the test process): that is what containerd
talks to, it lets the crash tests kill it, and it keeps the tests' own mounts out of the daemon's view.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from integration.stack import wait_for
from protos.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from protos.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pbg
from protos.containerd.types import mount_pb2


@dataclass
class Daemon:
    root: Path
    sock: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def records(self) -> list[tuple[int, str, str]]:
        """(id, key, kind) of every record, read straight from the metadata file (WAL: safe beside the daemon)."""
        db = sqlite3.connect(f"file:{self.root / 'metadata.db'}?mode=ro", uri=True)
        try:
            return [(int(r[0]), str(r[1]), str(r[2])) for r in db.execute("SELECT id, key, kind FROM snapshots")]
        finally:
            db.close()

    def dirs(self) -> list[str]:
        return sorted(os.listdir(self.root / "snapshots"))


def spawn_daemon(base: Path, crash_at: str = "") -> tuple[subprocess.Popen[bytes], Path, Path, Path]:
    root, sock, log = base / "root", base / "run" / "snap.sock", base / "daemon.log"
    env = dict(os.environ)
    env.pop("BOOTSEER_CRASH_AT", None)
    if crash_at:
        env["BOOTSEER_CRASH_AT"] = crash_at
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "snapshotter", "serve", "--root", str(root), "--address",
                                 str(sock)], stdout=fh, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    return proc, root, sock, log


def start_daemon(base: Path, crash_at: str = "") -> Daemon:
    """Start the daemon and wait (polling, with a deadline) until it answers on its socket."""
    proc, root, sock, log = spawn_daemon(base, crash_at)

    def ready() -> bool:  # a plain connect: a gRPC channel would back off for a second after one refusal
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
        return True

    try:
        wait_for("snapshotter", ready, 30, proc, log)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    return Daemon(root, sock, proc, log)


class Client:
    """A Snapshots client; ``namespace=None`` sends no namespace header (as containerd 1.6's proxy does)."""

    def __init__(self, sock: Path, namespace: str | None = "testsuite") -> None:
        self.channel = grpc.insecure_channel(f"unix://{sock}")
        self.stub = pbg.SnapshotsStub(self.channel)
        self.md = [("containerd-namespace", namespace)] if namespace else []

    def close(self) -> None:
        self.channel.close()

    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[mount_pb2.Mount]:
        req = pb.PrepareSnapshotRequest(snapshotter="bootseer", key=key, parent=parent, labels=labels or {})
        return list(self.stub.Prepare(req, metadata=self.md, timeout=60).mounts)

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[mount_pb2.Mount]:
        req = pb.ViewSnapshotRequest(snapshotter="bootseer", key=key, parent=parent, labels=labels or {})
        return list(self.stub.View(req, metadata=self.md, timeout=60).mounts)

    def mounts(self, key: str) -> list[mount_pb2.Mount]:
        return list(self.stub.Mounts(pb.MountsRequest(snapshotter="bootseer", key=key), metadata=self.md,
                                     timeout=60).mounts)

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        self.stub.Commit(pb.CommitSnapshotRequest(snapshotter="bootseer", name=name, key=key, labels=labels or {}),
                         metadata=self.md, timeout=60)

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter="bootseer", key=key), metadata=self.md, timeout=60)

    def stat(self, key: str) -> pb.Info:
        return self.stub.Stat(pb.StatSnapshotRequest(snapshotter="bootseer", key=key), metadata=self.md,
                              timeout=60).info

    def update(self, key: str, labels: dict[str, str], paths: list[str] | None = None) -> pb.Info:
        req = pb.UpdateSnapshotRequest(snapshotter="bootseer", info=pb.Info(name=key, labels=labels))
        if paths is not None:
            req.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
        return self.stub.Update(req, metadata=self.md, timeout=60).info

    def list(self, *filters: str) -> list[pb.Info]:
        out: list[pb.Info] = []
        for resp in self.stub.List(pb.ListSnapshotsRequest(snapshotter="bootseer", filters=list(filters)),
                                   metadata=self.md, timeout=60):
            out.extend(resp.info)
        return out

    def usage(self, key: str) -> tuple[int, int]:
        r = self.stub.Usage(pb.UsageRequest(snapshotter="bootseer", key=key), metadata=self.md, timeout=60)
        return r.size, r.inodes

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(snapshotter="bootseer"), metadata=self.md, timeout=60)


def code_of(fn: Callable[..., object], *args: object, **kw: object) -> grpc.StatusCode:
    """The status code ``fn`` fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args, **kw)
    return ei.value.code()  # type: ignore[no-any-return,attr-defined]


# ------------------------------------------------------------------------------------------------ mounting
def _compact_lowerdir(options: list[str]) -> tuple[list[str], str | None]:
    """Make lowerdir paths relative to their common parent when the mount data would not fit in a page,
    as containerd's mount code does for long (128-layer) chains; returns the options and the cwd to use."""
    lower = next((o for o in options if o.startswith("lowerdir=")), None)
    if lower is None or len(",".join(options)) < 4000:
        return options, None
    dirs = lower[len("lowerdir="):].split(":")
    common = os.path.commonpath([os.path.dirname(d) for d in dirs])
    rel = ":".join(os.path.relpath(d, common) for d in dirs)
    return [f"lowerdir={rel}" if o is lower else o for o in options], common


def mount_all(mounts: list[mount_pb2.Mount], target: Path) -> None:
    assert len(mounts) == 1, mounts
    m = mounts[0]
    target.mkdir(parents=True, exist_ok=True)
    options, cwd = _compact_lowerdir(list(m.options))
    typ = m.type if m.type != "bind" else "none"
    subprocess.run(["mount", "-t", typ, "-o", ",".join(options), m.source, str(target)], check=True, cwd=cwd,
                   capture_output=True)


@contextlib.contextmanager
def mounted(mounts: list[mount_pb2.Mount], target: Path) -> Iterator[Path]:
    """Mount what Prepare/View/Mounts returned at ``target`` with real kernel mounts; unmount on exit."""
    mount_all(mounts, target)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


# ------------------------------------------------------------------------------------------------- trees
Entry = tuple[str, int, int, int, object, tuple[tuple[str, bytes], ...], str | None]


def tree(root: Path) -> dict[str, Entry]:
    """Every entry below ``root`` (and root itself as ``.``): type, mode, owner, content digest / link
    target / device, xattrs (overlay's own ``trusted.overlay.*`` excluded) and hardlink group."""
    out: dict[str, Entry] = {}
    first_path: dict[tuple[int, int], str] = {}

    def add(path: str, rel: str) -> None:
        st = os.lstat(path)
        fmt = stat.S_IFMT(st.st_mode)
        data: object = None
        kind = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
                stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}[fmt]
        if kind == "f":
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            data = h.hexdigest()
        elif kind == "l":
            data = os.readlink(path)
        elif kind in "cb":
            data = (os.major(st.st_rdev), os.minor(st.st_rdev))
        names = sorted(n for n in os.listxattr(path, follow_symlinks=False) if not n.startswith("trusted.overlay."))
        xattrs = tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
        link = None
        if kind != "d" and st.st_nlink > 1:
            link = first_path.setdefault((st.st_dev, st.st_ino), rel)
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, data, xattrs, link)

    add(str(root), ".")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            add(p, os.path.relpath(p, root))
    return out


def tree_diff(a: dict[str, Entry], b: dict[str, Entry]) -> list[str]:
    """Human-readable differences between two :func:`tree` results (empty: equal)."""
    out = [f"only in first: {k}" for k in sorted(a.keys() - b.keys())]
    out += [f"only in second: {k}" for k in sorted(b.keys() - a.keys())]
    out += [f"{k}: {a[k]} != {b[k]}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    return out

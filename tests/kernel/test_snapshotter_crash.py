"""Crash consistency: the daemon killed (``os._exit``, as abrupt as ``kill -9``) at every named step of
Prepare/Commit/Remove/Cleanup, then restarted — the restart must leave either the old or the new state,
never a half snapshot and never a directory without a record (or a record without its directory)."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from protos.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter import faults
from tests.snapshotter_fixtures import Client, Daemon, mounted, spawn_daemon, start_daemon


def consistent(d: Daemon) -> list[str]:
    """Problems with the on-disk state: every record has its dirs, every dir has its record."""
    problems = []
    recs = d.records()
    ids = {str(i) for i, _, _ in recs}
    for name in d.dirs():
        if name not in ids:
            problems.append(f"directory without record: {name}")
    for sid, key, kind in recs:
        base = d.root / "snapshots" / str(sid)
        if not (base / "fs").is_dir():
            problems.append(f"{key}: no fs dir")
        if kind == "active" and not (base / "work").is_dir():
            problems.append(f"{key}: no work dir")
    return problems


def baseline(c: Client, scratch: Path) -> None:
    """base (committed, with a file) ← victim-c (committed leaf, files) and victim-active (active, files)."""
    with mounted(c.prepare("base-a"), scratch / "m") as mp:
        (mp / "base.txt").write_text("base\n")
    c.commit("base", "base-a")
    for key in ("victim-c-a", "victim-active"):
        with mounted(c.prepare(key, "base"), scratch / "m") as mp:
            (mp / "dir").mkdir()
            for i in range(20):
                (mp / "dir" / f"f{i}").write_text(f"{key} {i}\n")
    c.commit("victim-c", "victim-c-a")


OPS: dict[str, Callable[[Client], object]] = {
    "prepare": lambda c: c.prepare("new", "base", {"l": "v"}),
    "commit": lambda c: c.commit("victim", "victim-active"),
    "remove": lambda c: c.remove("victim-c"),
}
# (crash point, whether the interrupted operation's effect is visible after the restart)
CASES = [
    ("prepare.tempdir", False), ("prepare.recorded", False), ("prepare.renamed", False),
    ("prepare.committed", True),
    ("commit.usage", False), ("commit.recorded", False), ("commit.committed", True),
    ("remove.recorded", False), ("remove.committed", True), ("remove.renamed", True), ("remove.partial", True),
]


def happened(c: Client, op: str) -> bool:
    names = {i.name: i for i in c.list()}
    if op == "prepare":
        return "new" in names
    if op == "commit":
        assert ("victim" in names) != ("victim-active" in names), names.keys()
        return "victim" in names
    return "victim-c" not in names


def redo_and_check(c: Client, op: str, scratch: Path) -> None:
    """Finish the interrupted operation and check the result is usable."""
    if op == "prepare":
        if "new" not in {i.name for i in c.list()}:
            c.prepare("new", "base", {"l": "v"})
        assert c.stat("new").kind == pb.ACTIVE and dict(c.stat("new").labels) == {"l": "v"}
        with mounted(c.mounts("new"), scratch / "m") as mp:
            assert (mp / "base.txt").read_text() == "base\n"
    elif op == "commit":
        if "victim" not in {i.name for i in c.list()}:
            c.commit("victim", "victim-active")
        size, inodes = c.usage("victim")
        assert inodes == 22 and size > 0  # fs, dir, 20 files
        with mounted(c.view("check", "victim"), scratch / "m") as mp:
            assert (mp / "dir" / "f7").read_text() == "victim-active 7\n"
            assert (mp / "base.txt").read_text() == "base\n"
    else:
        if "victim-c" in {i.name for i in c.list()}:
            c.remove("victim-c")
        assert "victim-c" not in {i.name for i in c.list()}
    # and the daemon keeps working
    c.prepare("after", "base")
    c.commit("after-c", "after")
    c.remove("after-c")


@pytest.mark.parametrize(("point", "visible"), CASES, ids=[p for p, _ in CASES])
def test_crash_at_point_is_repaired_on_restart(scratch: Path, point: str, visible: bool) -> None:
    d = start_daemon(scratch)
    c = Client(d.sock)
    try:
        baseline(c, scratch)
    finally:
        c.close()
        d.stop()
    d = start_daemon(scratch, crash_at=point)
    c = Client(d.sock)
    op = point.split(".")[0]
    try:
        with pytest.raises(grpc.RpcError) as ei:
            OPS[op](c)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE  # the daemon died mid-call
        assert d.proc.wait(timeout=30) == faults.EXIT_CODE
    finally:
        c.close()
        d.stop()
    d = start_daemon(scratch)
    c = Client(d.sock)
    try:
        assert consistent(d) == []
        assert happened(c, op) is visible
        assert {i.name for i in c.list()} >= {"base", "victim-c"} - ({"victim-c"} if op == "remove" else set())
        redo_and_check(c, op, scratch)
        assert consistent(d) == []
    finally:
        c.close()
        d.stop()


def test_crash_during_startup_cleanup_is_repaired(scratch: Path) -> None:
    d = start_daemon(scratch)
    c = Client(d.sock)
    c.prepare("kept")
    c.close()
    d.stop()
    snaps = d.root / "snapshots"
    for orphan in ("999", "new-123", "rm-5-abcd"):  # an unrecorded id, a temp dir, a half-deleted dir
        (snaps / orphan / "fs" / "sub").mkdir(parents=True)
        (snaps / orphan / "fs" / "sub" / "junk").write_text("x")
    proc, *_ = spawn_daemon(scratch, crash_at="cleanup.listed")
    assert proc.wait(timeout=30) == faults.EXIT_CODE  # died in its start-up repair
    d = start_daemon(scratch)
    c = Client(d.sock)
    try:
        assert consistent(d) == []
        assert [i.name for i in c.list()] == ["kept"]
    finally:
        c.close()
        d.stop()


def test_unknown_crash_point_is_refused(scratch: Path) -> None:
    proc, _, _, log = spawn_daemon(scratch, crash_at="prepare.typo")
    assert proc.wait(timeout=30) != 0
    assert "unknown crash point" in log.read_text()


def test_sigkill_at_random_moments_under_load(scratch: Path) -> None:
    """Real SIGKILLs while a client loops Prepare/Commit/View/Remove: every restart finds a consistent state."""
    rnd = random.Random(7)
    for round_ in range(4):
        d = start_daemon(scratch)
        c = Client(d.sock)
        stop = threading.Event()
        first = threading.Event()  # one whole Prepare/Commit/View/Remove round went through
        errors: list[grpc.RpcError] = []

        def churn(c: Client = c, r: int = round_, stop: threading.Event = stop, first: threading.Event = first,
                  errors: list[grpc.RpcError] = errors) -> None:
            i = 0
            try:
                while not stop.is_set():
                    k = f"r{r}-{i}"
                    c.prepare(k, "")
                    c.commit(f"{k}-c", k)
                    c.view(f"{k}-v", f"{k}-c")
                    c.remove(f"{k}-v")
                    if i % 2:
                        c.remove(f"{k}-c")
                    i += 1
                    first.set()
            except grpc.RpcError as err:
                errors.append(err)

        t = threading.Thread(target=churn)
        t.start()
        assert first.wait(60), f"round {round_}: no work ran before the kill ({errors})"
        stop.wait(rnd.random() * 0.4)  # then a random moment, not a synchronisation
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        stop.set()
        t.join(timeout=30)
        assert not t.is_alive()
        # the only failure a client may see is the daemon going away (or none, if it was between calls)
        assert [e.code() for e in errors] in ([], [grpc.StatusCode.UNAVAILABLE]), errors
        c.close()
        d = start_daemon(scratch)
        try:
            assert consistent(d) == [], f"round {round_}"
        finally:
            d.stop()

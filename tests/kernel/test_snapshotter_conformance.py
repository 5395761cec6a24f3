"""containerd's snapshotter conformance suite (``core/snapshots/testsuite``), case by case, run against the
daemon as a real process over its unix socket, mounting what it returns with real kernel mounts.

Each case is an independent port (Python appliers instead of fstest, a file-by-file tree comparison instead
of fstest.CheckDirectoryEqual); the case names follow the suite's.  Extra cases at the end cover what the
suite leaves to containerd's metadata layer but a proxy snapshotter must still get right (input validation,
namespaces, mount shapes, socket permissions).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from protos.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.snapshotter_fixtures import Client, Daemon, code_of, mounted, start_daemon, tree, tree_diff

OPT = {"containerd.io/gc.root": "conformance"}  # the suite passes a label with every call

Op = Callable[[Path], None]


@pytest.fixture
def daemon(scratch: Path) -> Iterator[Daemon]:
    d = start_daemon(scratch)
    yield d
    d.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    c = Client(daemon.sock)
    yield c
    c.close()


# -------------------------------------------------------------------------------------- fstest-like appliers
def create_file(rel: str, content: bytes, mode: int) -> Op:
    def op(root: Path) -> None:
        (root / rel).write_bytes(content)
        os.chmod(root / rel, mode)

    return op


def create_dir(rel: str, mode: int) -> Op:
    def op(root: Path) -> None:
        (root / rel).mkdir()
        os.chmod(root / rel, mode)

    return op


def remove_all(rel: str) -> Op:
    def op(root: Path) -> None:
        p = root / rel
        if p.is_dir() and not p.is_symlink():
            import shutil

            shutil.rmtree(p)
        elif os.path.lexists(p):
            p.unlink()

    return op


def chown(rel: str, uid: int, gid: int) -> Op:
    return lambda root: os.lchown(root / rel, uid, gid)


def link(old: str, new: str) -> Op:
    return lambda root: os.link(root / old, root / new)


def rename(old: str, new: str) -> Op:
    return lambda root: os.rename(root / old, root / new)


def apply(ops: list[Op], root: Path) -> None:
    for op in ops:
        op(root)


def same_tree(a: Path, b: Path, with_root: bool = False) -> list[str]:
    ta, tb = tree(a), tree(b)
    if not with_root:
        ta.pop("."), tb.pop(".")
    return tree_diff(ta, tb)


def check_snapshots(c: Client, work: Path, *layers: list[Op]) -> None:
    """The suite's checkSnapshots: each layer applied to a fresh snapshot and to a flat directory; a view
    of every committed layer must equal the flat directory."""
    flat = work / "flat"
    flat.mkdir(parents=True)
    parent = ""
    for i, ops in enumerate(layers):
        name = f"layer-{i}"
        with mounted(c.prepare(f"{name}-prepare", parent, OPT), work / f"prepare-{i}") as mp:
            apply(ops, mp)
        c.commit(name, f"{name}-prepare", OPT)
        apply(ops, flat)
        with mounted(c.view(f"{name}-view", name, OPT), work / f"check-{i}") as mp:
            assert same_tree(flat, mp) == [], f"layer {i}"
        c.remove(f"{name}-view")
        parent = name


# ----------------------------------------------------------------------------------------------- the suite
def test_basic(client: Client, scratch: Path) -> None:
    initial = [create_file("foo", b"foo\n", 0o777), create_dir("a", 0o755), create_dir("a/b", 0o755),
               create_dir("a/b/c", 0o755)]
    diff = [create_file("bar", b"bar\n", 0o777), create_file("foo", b"bar\n", 0o777), remove_all("a/b")]
    flat = scratch / "flat"
    flat.mkdir()
    with mounted(client.prepare("preparing", "", OPT), scratch / "m1") as mp:
        apply(initial, mp)
    client.commit("committed", "preparing", OPT)
    si = client.stat("committed")
    assert (si.parent, si.kind) == ("", pb.COMMITTED)
    assert code_of(client.stat, "preparing") == grpc.StatusCode.NOT_FOUND
    apply(initial, flat)
    with mounted(client.prepare("nextlayer", "committed", OPT), scratch / "m2") as mp:
        assert same_tree(flat, mp) == []
        apply(diff, mp)
    ni = client.stat("nextlayer")
    assert (ni.parent, ni.kind) == ("committed", pb.ACTIVE)
    client.commit("committed-next", "nextlayer", OPT)
    si2 = client.stat("committed-next")
    assert (si2.parent, si2.kind) == ("committed", pb.COMMITTED)
    assert code_of(client.stat, "nextlayer") == grpc.StatusCode.NOT_FOUND
    walked = {i.name: i for i in client.list()}
    assert walked["committed"] == si and walked["committed-next"] == si2
    apply(diff, flat)
    with mounted(client.view("nextnextlayer", "committed-next", OPT), scratch / "m3") as mp:
        assert same_tree(flat, mp) == []
    client.remove("nextnextlayer")
    assert code_of(client.remove, "committed") == grpc.StatusCode.FAILED_PRECONDITION  # it has a child
    client.remove("committed-next")
    client.remove("committed")
    assert client.list() == []


def test_stat_active(client: Client, scratch: Path) -> None:
    with mounted(client.prepare("preparing", "", OPT), scratch / "m") as mp:
        (mp / "foo").write_text("foo\n")
    si = client.stat("preparing")
    assert (si.name, si.parent, si.kind, dict(si.labels)) == ("preparing", "", pb.ACTIVE, OPT)


def test_stat_committed(client: Client, scratch: Path) -> None:
    with mounted(client.prepare("preparing", "", OPT), scratch / "m") as mp:
        (mp / "foo").write_text("foo\n")
    client.commit("committed", "preparing", OPT)
    si = client.stat("committed")
    assert (si.name, si.parent, si.kind) == ("committed", "", pb.COMMITTED)


def test_transitivity(client: Client, scratch: Path) -> None:
    with mounted(client.prepare("preparing", "", OPT), scratch / "m1") as mp:
        (mp / "foo").write_text("hello")
    client.commit("snapA", "preparing", OPT)
    with mounted(client.prepare("next", "snapA", OPT), scratch / "m2") as mp:
        (mp / "foo").write_text("hello again")
    client.commit("snapB", "next", OPT)
    si_a, si_b = client.stat("snapA"), client.stat("snapB")
    assert si_a.parent == "" and si_b.parent == "snapA"
    with mounted(client.view("v", "snapB", OPT), scratch / "m3") as mp:
        assert (mp / "foo").read_text() == "hello again"


def test_prepare_view_failing(client: Client, scratch: Path) -> None:
    client.prepare("preparing", "", OPT)
    client.commit("snapA", "preparing", OPT)
    client.prepare("newlayer", "snapA", OPT)
    assert code_of(client.view, "newlayer", "snapA", OPT) == grpc.StatusCode.ALREADY_EXISTS
    client.prepare("prepLayer", "snapA", OPT)
    assert code_of(client.prepare, "prepLayer", "snapA", OPT) == grpc.StatusCode.ALREADY_EXISTS
    client.view("viewLayer", "snapA", OPT)
    assert code_of(client.view, "viewLayer", "snapA", OPT) == grpc.StatusCode.ALREADY_EXISTS


def test_update(client: Client) -> None:
    t1 = time.time_ns()
    client.prepare("c1-a", "", OPT)
    client.commit("c1", "c1-a", OPT)
    client.prepare("c2-a", "c1", OPT)
    client.commit("c2", "c2-a", OPT)
    client.prepare("a1", "c2", OPT)
    client.prepare("a2", "", OPT)
    client.view("v1", "c2", OPT)
    client.view("v2", "", OPT)
    t2 = time.time_ns()
    cases = [("c1", pb.COMMITTED, ""), ("c2", pb.COMMITTED, "c1"), ("a1", pb.ACTIVE, "c2"), ("a2", pb.ACTIVE, ""),
             ("v1", pb.VIEW, "c2"), ("v2", pb.VIEW, "")]
    for name, kind, parent in cases:
        st = client.stat(name)
        created = st.created_at.ToNanoseconds()
        assert t1 <= created <= t2, name
        assert st.updated_at == st.created_at
        assert (st.kind, st.parent, st.name) == (kind, parent, name)
        root_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        expected = {"l1": "v1", "l2": "v2", "l3": "v3", "containerd.io/gc.root": root_time}
        u1 = time.time_ns()
        st = client.update(name, expected)  # no mask: replace (the suite also sends a bogus parent)
        u2 = time.time_ns()
        assert st.created_at.ToNanoseconds() == created
        assert u1 <= st.updated_at.ToNanoseconds() <= u2
        assert (st.kind, st.parent, st.name, dict(st.labels)) == (kind, parent, name, expected)
        st = client.update(name, {"l1": "updated", "l4": "v4"}, ["labels.l1", "labels.l2"])
        assert dict(st.labels) == {"l1": "updated", "l3": "v3", "containerd.io/gc.root": root_time}
        expected = {"l4": "v4", "containerd.io/gc.root": root_time}
        assert dict(client.update(name, expected, ["labels"]).labels) == expected
        assert code_of(client.update, name, expected, ["parent"]) == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(client.stat(name).labels) == expected


def test_remove(client: Client) -> None:
    client.prepare("committed-a", "", OPT)
    client.commit("committed-1", "committed-a", OPT)
    client.prepare("reuse-1", "committed-1", OPT)
    client.remove("reuse-1")
    client.view("reuse-1", "committed-1", OPT)
    client.remove("reuse-1")
    client.prepare("reuse-1", "", OPT)
    client.remove("committed-1")
    client.commit("committed-1", "reuse-1", OPT)


WALK_CASES = [
    (["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"], ['labels."containerd.io/gc.root"==check-walk']),
    (["a-np", "a", "a-wl", "a-np-wl"], ['kind==active,labels."containerd.io/gc.root"==check-walk']),
    (["v", "v-wl"], ['kind==view,labels."containerd.io/gc.root"==check-walk']),
    (["p", "p-wl"], ['kind==committed,labels."containerd.io/gc.root"==check-walk']),
    (["p", "a-np-wl"], ["name==p", "name==a-np-wl"]),
    (["a-wl"], ["name==a-wl,labels.l"]),
    (["a", "v"], ["parent==p"]),
    (["a", "v", "a-wl", "v-wl"], ['parent!="",labels."containerd.io/gc.root"==check-walk']),
    (["p-wl", "a-wl", "v-wl", "a-np-wl"], ["labels.l"]),
    (["a-wl", "a-np-wl"], ["labels.l==2"]),
]


def test_walk(client: Client) -> None:
    root = {"containerd.io/gc.root": "check-walk"}
    client.prepare("a-np", "", root)
    client.prepare("p-tmp", "", root)
    client.commit("p", "p-tmp", root)
    client.prepare("a", "p", root)
    client.view("v", "p", root)
    client.prepare("p-wl-tmp", "", root)
    client.commit("p-wl", "p-wl-tmp", {"l": "1", **root})
    client.prepare("a-wl", "p-wl", {"l": "2", **root})
    client.view("v-wl", "p-wl", {"l": "3", **root})
    client.prepare("a-np-wl", "", {"l": "2", **root})
    for matches, filters in WALK_CASES:
        assert sorted(i.name for i in client.list(*filters)) == sorted(matches), filters


def test_layer_file_update(client: Client, scratch: Path) -> None:
    l1 = [create_dir("etc", 0o700), create_file("etc/hosts", b"mydomain 10.0.0.1", 0o644),
          create_file("etc/profile", b"PATH=/usr/bin", 0o644)]
    l2 = [create_file("etc/hosts", b"mydomain 10.0.0.2", 0o644), create_file("etc/profile", b"PATH=/usr/bin", 0o666),
          create_dir("root", 0o700), create_file("root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644)]
    check_snapshots(client, scratch / "w", l1, l2)


def test_remove_directory_in_lower_layer(client: Client, scratch: Path) -> None:
    l1 = [create_dir("lib", 0o700), create_file("lib/hidden", b"", 0o644)]
    l2 = [remove_all("lib"), create_dir("lib", 0o700), create_file("lib/not-hidden", b"", 0o644)]
    l3 = [create_file("lib/newfile", b"", 0o644)]
    check_snapshots(client, scratch / "w", l1, l2, l3)


def test_chown(client: Client, scratch: Path) -> None:
    l1 = [create_dir("opt", 0o700), create_dir("opt/a", 0o700), create_dir("opt/a/b", 0o700),
          create_file("opt/a/b/file.txt", b"hello", 0o644)]
    l2 = [chown("opt", 1, 1), chown("opt/a", 1, 1), chown("opt/a/b", 1, 1), chown("opt/a/b/file.txt", 1, 1)]
    check_snapshots(client, scratch / "w", l1, l2)


def test_directory_permission_on_commit(client: Client, scratch: Path) -> None:
    l1 = [create_dir("dir1", 0o700), create_dir("dir2", 0o700), create_dir("dir3", 0o700), create_dir("dir4", 0o700),
          create_file("dir4/f1", b"...", 0o644), create_dir("dir5", 0o700), create_file("dir5/f1", b"...", 0o644),
          chown("dir1", 1, 1), chown("dir2", 1, 1), chown("dir3", 1, 1), chown("dir5", 1, 1), chown("dir5/f1", 1, 1)]
    l2 = [chown("dir2", 0, 0), remove_all("dir3"), chown("dir4", 1, 1), chown("dir4/f1", 1, 1)]
    l3 = [create_dir("dir3", 0o700), chown("dir3", 1, 1), remove_all("dir5"), create_dir("dir5", 0o700),
          chown("dir5", 1, 1)]
    check_snapshots(client, scratch / "w", l1, l2, l3)


def test_remove_intermediate_snapshot(client: Client, scratch: Path) -> None:
    with mounted(client.prepare("base-prepare", "", OPT), scratch / "m1") as mp:
        (mp / "foo").write_text("foo")
    client.commit("base", "base-prepare", OPT)
    client.prepare("intermediate", "base", OPT)
    client.commit("intermediate-c", "intermediate", OPT)
    client.prepare("top", "intermediate-c", OPT)
    assert code_of(client.remove, "intermediate-c") == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(client.remove, "base") == grpc.StatusCode.FAILED_PRECONDITION
    client.remove("top")
    client.remove("intermediate-c")
    client.remove("base")
    assert client.list() == []


def test_deleted_files_in_child_snapshot(client: Client, scratch: Path) -> None:
    l1 = [create_file("foo", b"foo\n", 0o777), create_dir("somedir", 0o755), create_file("somedir/bar", b"bar", 0o644)]
    l2 = [remove_all("foo"), remove_all("somedir")]
    check_snapshots(client, scratch / "w", l1, l2)


def test_move_file_from_lower_layer(client: Client, scratch: Path) -> None:
    l1 = [create_dir("dir1", 0o700), create_file("dir1/f1", b"Hello", 0o644), create_dir("dir2", 0o700),
          create_file("dir2/f2", b"...", 0o644)]
    l2 = [create_dir("dir3", 0o700), create_file("dir3/f1", b"Hello", 0o644), remove_all("dir1"),
          link("dir2/f2", "dir3/f2"), remove_all("dir2/f2")]
    check_snapshots(client, scratch / "w", l1, l2)


def test_view_readonly(client: Client, scratch: Path) -> None:
    client.prepare("preparing", "", OPT)
    client.commit("committed", "preparing", OPT)
    with mounted(client.view("view", "committed", OPT), scratch / "view-mount") as mp:
        with pytest.raises(OSError) as ei:
            (mp / "testfile").write_text("testcontent")
        assert ei.value.errno == 30  # EROFS
    client.remove("view")
    client.remove("committed")


def test_stat_in_walk(client: Client) -> None:
    p = "stats-in-walk-"
    client.prepare(f"{p}c1-a", "", OPT)
    client.commit(f"{p}c1", f"{p}c1-a", OPT)
    client.prepare(f"{p}c2-a", f"{p}c1", OPT)
    client.commit(f"{p}c2", f"{p}c2-a", OPT)
    client.prepare(f"{p}a1", f"{p}c2", OPT)
    client.view(f"{p}v1", f"{p}c2", OPT)
    infos = client.list()
    assert len(infos) == 4
    for info in infos:
        assert client.stat(info.name) == info


def test_root_permission(client: Client, scratch: Path) -> None:
    with mounted(client.prepare("preparing", "", OPT), scratch / "m") as mp:
        assert stat.S_IMODE(os.stat(mp).st_mode) == 0o755


def test_rename(client: Client, scratch: Path) -> None:
    l1 = [create_dir("dir1", 0o700), create_dir("somefiles", 0o700),
          create_file("somefiles/f1", b"was here first!", 0o644),
          create_file("somefiles/f2", b"nothing interesting", 0o644)]
    # as for containerd's overlayfs: no directory rename (overlay without redirect_dir answers EXDEV)
    l2 = [create_file("somefiles/f1-overwrite", b"new content 1", 0o644), rename("somefiles/f1-overwrite",
                                                                                 "somefiles/f1"),
          rename("somefiles/f2", "somefiles/f3")]
    check_snapshots(client, scratch / "w", l1, l2)


def test_128_layers_mount(client: Client, scratch: Path) -> None:
    lowest = [create_file("bottom", b"way at the bottom\n", 0o777), create_file("overwriteme", b"FIRST!\n", 0o777),
              create_dir("addhere", 0o755), create_dir("onlyme", 0o755),
              create_file("onlyme/bottom", b"bye!\n", 0o777)]
    layers = [lowest] + [[create_file("overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
                          create_file(f"addhere/file-{i}", b"same\n", 0o755), remove_all("onlyme"),
                          create_dir("onlyme", 0o755), create_file(f"onlyme/file-{i}", b"only me!\n", 0o777)]
                         for i in range(1, 128)]
    flat = scratch / "flat"
    flat.mkdir()
    parent = ""
    for i, ops in enumerate(layers):
        with mounted(client.prepare(f"prepare-layer-{i}", parent, OPT), scratch / "prep") as mp:
            assert same_tree(flat, mp) == [], f"layer {i} before apply"
            apply(ops, flat)
            apply(ops, mp)
            assert same_tree(flat, mp) == [], f"layer {i} after apply"
        parent = f"committed-{i}"
        client.commit(parent, f"prepare-layer-{i}", OPT)
    [m] = client.view("fullview", parent, OPT)
    assert len(next(o for o in m.options if o.startswith("lowerdir=")).split(":")) == 128
    with mounted([m], scratch / "fullview") as mp:
        assert same_tree(flat, mp) == []


# ------------------------------------------------- beyond the suite: what a proxy snapshotter must also do
def test_socket_is_root_only(daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.sock.parent).st_mode) == 0o700


def test_mount_shapes_match_containerd_overlay(client: Client, daemon: Daemon) -> None:
    snaps = daemon.root / "snapshots"
    [m] = client.prepare("p")
    assert (m.type, m.source, list(m.options)) == ("bind", f"{snaps}/1/fs", ["rw", "rbind"])
    client.commit("c1", "p")
    [m] = client.view("v1", "c1")  # a view of a single committed layer: its dir, read-only
    assert (m.type, m.source, list(m.options)) == ("bind", f"{snaps}/1/fs", ["ro", "rbind"])
    [m] = client.view("v0")  # a parentless view: its own (empty) dir, read-only
    assert (m.type, list(m.options)) == ("bind", ["ro", "rbind"])
    [m] = client.prepare("p2", "c1")
    index = ["index=off"] if Path("/sys/module/overlay/parameters/index").exists() else []
    assert (m.type, m.source) == ("overlay", "overlay")
    assert list(m.options) == [f"workdir={snaps}/4/work", f"upperdir={snaps}/4/fs", f"lowerdir={snaps}/1/fs", *index]
    assert client.mounts("p2") == [m]
    client.commit("c2", "p2")
    [m] = client.view("v2", "c2")
    assert list(m.options) == [f"lowerdir={snaps}/4/fs:{snaps}/1/fs", *index]
    assert code_of(client.mounts, "c2") == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(client.mounts, "nope") == grpc.StatusCode.NOT_FOUND


def test_same_key(client: Client) -> None:
    client.prepare("k")
    assert code_of(client.prepare, "k") == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(client.view, "k") == grpc.StatusCode.ALREADY_EXISTS
    client.commit("c", "k")
    assert code_of(client.prepare, "c") == grpc.StatusCode.ALREADY_EXISTS  # committed names share the keyspace
    client.prepare("k2")
    assert code_of(client.commit, "c", "k2") == grpc.StatusCode.ALREADY_EXISTS
    assert client.stat("k2").kind == pb.ACTIVE


def test_usage(client: Client, scratch: Path, daemon: Daemon) -> None:
    with mounted(client.prepare("k"), scratch / "m") as mp:
        (mp / "d").mkdir()
        (mp / "d" / "big").write_bytes(os.urandom(1 << 20))
        os.link(mp / "d" / "big", mp / "d" / "again")  # a hardlink counts once
    size, inodes = client.usage("k")
    fs = daemon.root / "snapshots" / "1" / "fs"
    blocks = sum(os.lstat(p).st_blocks * 512 for p in (fs, fs / "d", fs / "d" / "big"))
    assert (size, inodes) == (blocks, 3)  # fs.DiskUsage: the root dir counts too
    client.commit("c", "k")
    assert client.usage("c") == (size, inodes)  # measured at commit, stored
    client.view("v", "c")
    assert client.usage("v") == (0, 0)
    assert code_of(client.usage, "missing") == grpc.StatusCode.NOT_FOUND


def test_list_filter_syntax(client: Client) -> None:
    client.prepare("a", "", {"role": "x", "containerd.io/snapshot.ref": "sha256:1"})
    client.commit("a-c", "a", {"role": "base", "containerd.io/snapshot.ref": "sha256:1"})
    client.prepare("b", "a-c", {"role": "x"})
    client.view("v", "a-c")

    def names(*f: str) -> list[str]:
        return sorted(i.name for i in client.list(*f))

    assert names() == ["a-c", "b", "v"]
    assert names('labels."containerd.io/snapshot.ref"==sha256:1,parent==""') == ["a-c"]
    assert names('labels."containerd.io/snapshot.ref"=="sha256:1",parent=="a-c"') == []
    assert names("parent==a-c,kind==view") == ["v"]
    assert names('labels."role"==base', "name==v") == ["a-c", "v"]
    assert names("name!=b,kind!=committed") == ["v"]
    assert names("labels.role") == ["a-c", "b"]
    assert names("name~=^a") == ["a-c"]
    assert names("labels.nothere!=x") == ["a-c", "b", "v"]  # != is true when absent
    assert names("unknownfield==x") == []
    for bad in ("==oops", "name==", 'name=="unterminated', "name==a,", "labels.'x'==y"):
        assert code_of(client.list, bad) == grpc.StatusCode.INVALID_ARGUMENT, bad


def test_namespaces_are_separate(daemon: Daemon) -> None:
    a, b, none = Client(daemon.sock, "ns-a"), Client(daemon.sock, "ns-b"), Client(daemon.sock, None)
    try:
        a.prepare("same")
        b.prepare("same")  # the same key in another namespace is another snapshot
        a.commit("c", "same")
        assert b.stat("same").kind == pb.ACTIVE
        assert [i.name for i in a.list()] == ["c"]
        assert code_of(b.stat, "c") == grpc.StatusCode.NOT_FOUND
        assert code_of(b.prepare, "child", "c") == grpc.StatusCode.NOT_FOUND  # parents don't cross namespaces
        # no namespace header (containerd 1.6's proxy, its garbage collector): every namespace is visible
        assert sorted(i.name for i in none.list()) == ["c", "same"]
        none.remove("c")
        assert a.list() == [] and [i.name for i in b.list()] == ["same"]
    finally:
        for c in (a, b, none):
            c.close()


def test_bad_input_changes_nothing(client: Client, daemon: Daemon) -> None:
    client.prepare("active", "", {"keep": "me"})
    client.commit("base", "active")
    client.view("view", "base")
    client.prepare("child", "base", {"keep": "me"})

    def state() -> tuple[object, ...]:  # what the API shows, the directories, the records
        infos = sorted((i.name, i.kind, i.parent, tuple(sorted(i.labels.items()))) for i in client.list())
        return infos, daemon.dirs(), daemon.records()

    before = state()
    C = grpc.StatusCode
    huge = {"k": "v" * 4096}  # containerd's labels.Validate: key + value ≤ 4096 bytes
    many = {f"label-{i}": "x" * 4000 for i in range(300)}  # each label fine, 1.2 MB in all
    cases: list[tuple[Callable[..., object], tuple[object, ...], grpc.StatusCode]] = [
        (client.prepare, ("",), C.INVALID_ARGUMENT),
        (client.view, ("",), C.INVALID_ARGUMENT),
        (client.prepare, ("x", "unknown-parent"), C.NOT_FOUND),
        (client.view, ("x", "unknown-parent"), C.NOT_FOUND),
        (client.prepare, ("x", "child"), C.INVALID_ARGUMENT),  # parent must be committed
        (client.prepare, ("x", "view"), C.INVALID_ARGUMENT),
        (client.prepare, ("active-again", "", huge), C.INVALID_ARGUMENT),
        (client.prepare, ("many", "", many), C.INVALID_ARGUMENT),
        (client.commit, ("c-view", "view"), C.FAILED_PRECONDITION),  # committing a view
        (client.commit, ("c-base", "base"), C.FAILED_PRECONDITION),  # committing a committed snapshot
        (client.commit, ("c-missing", "missing"), C.NOT_FOUND),
        (client.commit, ("", "child"), C.INVALID_ARGUMENT),
        (client.commit, ("base", "child"), C.ALREADY_EXISTS),
        (client.commit, ("c-huge", "child", huge), C.INVALID_ARGUMENT),
        (client.remove, ("base",), C.FAILED_PRECONDITION),  # has children
        (client.remove, ("missing",), C.NOT_FOUND),
        (client.remove, ("",), C.INVALID_ARGUMENT),
        (client.stat, ("",), C.INVALID_ARGUMENT),
        (client.stat, ("missing",), C.NOT_FOUND),
        (client.mounts, ("base",), C.FAILED_PRECONDITION),
        (client.update, ("child", huge, ["labels.k"]), C.INVALID_ARGUMENT),
        (client.update, ("child", {"a": "b"}, ["kind"]), C.INVALID_ARGUMENT),
        (client.update, ("child", {"a": "b"}, ["labels.a", "parent"]), C.INVALID_ARGUMENT),
        (client.update, ("missing", {"a": "b"}), C.NOT_FOUND),
        (client.usage, ("missing",), C.NOT_FOUND),
    ]
    for fn, args, code in cases:
        assert code_of(fn, *args) == code, (fn.__name__, args)
    assert state() == before


def test_list_streams_past_one_batch(client: Client) -> None:
    """List answers in batches of LIST_BATCH records per message (a gRPC message has a size limit): a node with
    hundreds of snapshots must get every one, across several messages."""
    from snapshotter.service import LIST_BATCH

    n = LIST_BATCH * 2 + 7
    for i in range(n):
        client.prepare(f"a{i}")
    messages = list(client.stub.List(pb.ListSnapshotsRequest(snapshotter="bootseer"), metadata=client.md, timeout=60))
    assert len(messages) >= 3
    assert sorted(info.name for m in messages for info in m.info) == sorted(f"a{i}" for i in range(n))


def test_cleanup_removes_crash_leftovers_and_nothing_else(client: Client, scratch: Path, daemon: Daemon) -> None:
    """containerd calls Cleanup after its garbage collection: directories no record refers to (a crash between
    creating a snapshot's directory and recording it, or during a removal) go; live snapshots stay."""
    with mounted(client.prepare("live"), scratch / "m") as mp:
        (mp / "kept").write_text("kept")
    client.commit("c", "live")
    snaps = daemon.root / "snapshots"
    (snaps / "9999" / "fs").mkdir(parents=True)  # created, never recorded
    (snaps / "9999" / "fs" / "junk").write_bytes(b"x" * 4096)
    (snaps / "rm-7-deadbeef" / "fs").mkdir(parents=True)  # a removal that did not finish
    before = set(daemon.dirs())
    client.cleanup()
    after = set(daemon.dirs())
    assert before - after == {"9999", "rm-7-deadbeef"}
    client.view("v", "c")
    with mounted(client.stub.Mounts(pb.MountsRequest(snapshotter="bootseer", key="v"), metadata=client.md,
                                    timeout=60).mounts, scratch / "v") as vp:
        assert (vp / "kept").read_text() == "kept"


def test_an_unexpected_failure_is_unknown_and_the_daemon_goes_on(client: Client, daemon: Daemon) -> None:
    """A failure the core does not expect (here: a file squatting where the next snapshot's directory goes)
    answers UNKNOWN naming the call — not a hung call or a dead daemon — records nothing, and other calls
    still work."""
    client.prepare("k")
    next_id = max(i for i, _, _ in daemon.records()) + 1
    squat = daemon.root / "snapshots" / str(next_id)
    squat.write_text("not a directory")
    try:
        with pytest.raises(grpc.RpcError) as ei:
            client.prepare("k2", "")
        assert ei.value.code() == grpc.StatusCode.UNKNOWN, ei.value.details()  # type: ignore[attr-defined]
        assert "Prepare" in ei.value.details()  # type: ignore[attr-defined]
        assert code_of(client.stat, "k2") == grpc.StatusCode.NOT_FOUND  # nothing half-recorded
    finally:
        squat.unlink()
    client.prepare("k3")
    assert client.stat("k3").name == "k3" and client.stat("k").name == "k"

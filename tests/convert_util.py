"""Helpers for the conversion tests: mount an image's EROFS blobs as containerd would stack its layers, and
compare two trees file by file (content, type, mode, owner, xattrs, symlink targets, devices, hardlinks)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

from bootseer.index import fetch_node_blob
from bootseer.reference import Reference
from bootseer.registry import Manifest, RegistryClient
from integration.stack import Stack
from snapshotter.lazy.index_reader import IndexReader


def tree_snapshot(root: Path, mtimes: bool = True) -> tuple[dict[str, tuple], list[list[str]]]:
    """path → attributes for everything below ``root`` (not ``root`` itself), and the hardlink groups."""
    out: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            s = os.lstat(p)
            fmt = stat.S_IFMT(s.st_mode)
            try:
                names = sorted(os.listxattr(p, follow_symlinks=False))
                xattrs = tuple((n, os.getxattr(p, n, follow_symlinks=False)) for n in names)
            except OSError:
                xattrs = ()
            extra: object = None
            if fmt == stat.S_IFREG:
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        h.update(chunk)
                extra = h.hexdigest()
                if s.st_nlink > 1:
                    inodes.setdefault((s.st_dev, s.st_ino), []).append(rel)
            elif fmt == stat.S_IFLNK:
                extra = os.readlink(p)
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                extra = (os.major(s.st_rdev), os.minor(s.st_rdev))
            mtime = s.st_mtime_ns if mtimes and fmt != stat.S_IFDIR else None
            mode = stat.S_IMODE(s.st_mode) if fmt != stat.S_IFLNK else None
            out[rel] = (fmt, mode, s.st_uid, s.st_gid, extra, xattrs, mtime)
    groups = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    return out, groups


def compare_trees(expected: Path, actual: Path, mtimes: bool = True, limit: int = 30) -> list[str]:
    """Differences between two trees, as readable lines (empty: identical)."""
    a, ga = tree_snapshot(expected, mtimes)
    b, gb = tree_snapshot(actual, mtimes)
    problems: list[str] = []
    for rel in sorted(set(a) | set(b)):
        if rel not in b:
            problems.append(f"{rel}: missing")
        elif rel not in a:
            problems.append(f"{rel}: unexpected")
        elif a[rel] != b[rel]:
            fields = ("type", "mode", "uid", "gid", "content/target", "xattrs", "mtime")
            diffs = [f"{f} {x!r} != {y!r}" for f, x, y in zip(fields, a[rel], b[rel], strict=True) if x != y]
            problems.append(f"{rel}: " + ", ".join(diffs))
    if ga != gb:
        problems.append(f"hardlink groups differ: {ga} != {gb}")
    if len(problems) > limit:
        problems = [*problems[:limit], f"... and {len(problems) - limit} more"]
    return problems


@contextlib.contextmanager
def mounted_index(client: RegistryClient, image: str, manifest_digest: str, layer_digests: list[str],
                  work: Path) -> Iterator[Path]:
    """Fetch each layer's EROFS blob through the index (as a node would), loop-mount them, stack them with
    overlayfs (top layer first, as containerd's overlay snapshotter orders lowerdirs); yield the merged dir."""
    reader = IndexReader(client)
    ref = Reference.parse(image)
    mounts: list[Path] = []
    work.mkdir(parents=True, exist_ok=True)
    try:
        for i, ld in enumerate(layer_digests):
            lb = reader.lookup(image, manifest_digest, ld)
            assert lb is not None, f"layer {ld} has no EROFS blob in the index"
            blob = work / f"layer{i}.erofs"
            with open(blob, "wb") as fh:  # chunk by chunk, each verified (from its wire frame for index v3)
                fetch_node_blob(client, ref, lb, fh)
            assert blob.stat().st_size == lb.blob.size
            mp = work / f"l{i}"
            mp.mkdir()
            subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(blob), str(mp)], check=True,
                           capture_output=True)
            mounts.append(mp)
        merged = work / "merged"
        merged.mkdir()
        if len(mounts) == 1:
            subprocess.run(["mount", "--bind", "-o", "ro", str(mounts[0]), str(merged)], check=True)
        else:
            lower = ":".join(str(m) for m in reversed(mounts))
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", str(merged)],
                           check=True, capture_output=True)
        mounts.append(merged)
        yield merged
    finally:
        for mp in reversed(mounts):
            if subprocess.run(["umount", str(mp)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mp)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def containerd_tree(stack: Stack, image: str, work: Path) -> Iterator[Path]:
    """Pull ``image`` with containerd's overlayfs snapshotter (in a namespace of its own, removed afterwards)
    and mount its rootfs read-only: the tree a converted image must reproduce."""
    ns = f"bs-conv-{secrets.token_hex(3)}"
    mp = work / "ctr"
    mp.mkdir(parents=True, exist_ok=True)
    try:
        stack.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", image, namespace=ns, timeout=600)
        stack.ctr("image", "mount", "--snapshotter", "overlayfs", image, str(mp), namespace=ns)
        yield mp
    finally:
        stack.ctr("image", "unmount", "--rm", str(mp), namespace=ns, check=False)
        if subprocess.run(["mountpoint", "-q", str(mp)]).returncode == 0:
            subprocess.run(["umount", "-l", str(mp)], capture_output=True)
        shutil.rmtree(mp, ignore_errors=True)
        stack.ctr("image", "rm", "--sync", image, namespace=ns, check=False)  # GC takes its snapshots, content
        stack.ctr("namespaces", "rm", ns, check=False)


def push_layout(client: RegistryClient, layout: Path, repo: str, tag: str | None = None,
                mount_from: tuple[str, ...] = ()) -> tuple[str, Manifest]:
    """Push the (single) image of an OCI layout to ``repo`` (``host:port/name``); by digest unless ``tag``.

    By digest the session stack's sidecar, which converts pushed *tags*, leaves the image to the test.
    Returns (``repo@digest``, manifest)."""
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    blobs = layout / "blobs" / "sha256"
    raw = (blobs / desc["digest"].split(":", 1)[1]).read_bytes()
    man = Manifest.from_bytes(raw, desc["mediaType"])
    for d in [man.config, *man.layers]:
        assert d is not None
        client.push_blob(repo, blobs / d.digest.split(":", 1)[1], d.digest, chunk_size=32 << 20,
                         mount_from=mount_from)
    client.put_manifest(f"{repo}:{tag}" if tag else f"{repo}@{man.digest}", raw, man.media_type)
    return f"{repo}@{man.digest}", man

"""Test images built here, offline, and pushed to the local registry.

* ``small``: busybox-static based, three layers that exercise what unpackers get wrong — a deleted file
  (whiteout), a replaced directory, an opaque directory, symlinks (relative and absolute), a hardlink, an
  xattr, a setuid file, a char device, non-root ownership, and a large mostly-zero file.
  :data:`SMALL_EXPECTED` is the tree a correct unpacker must produce; tests check it after a pull.
* ``pause``: busybox sleeping forever, the CRI sandbox image of the local stack.
* ``realistic``: Debian bookworm minbase + python3 + numpy (mmdebstrap), the pure-Python dependencies of
  torch, and torch 2.13 CPU — the benchmark image (about 300 MB compressed, 1 GB unpacked).  It takes
  minutes to build, so it is cached by the hash of everything that goes into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from integration.oci import Layout, entry, push

BUSYBOX = Path("/bin/busybox")
APPLETS = ["sh", "cat", "echo", "ls", "sleep", "stat", "test", "sha256sum", "find", "wc", "head", "true"]
DEFAULT_CACHE = Path(os.environ.get("BOOTSEER_IMAGE_CACHE", "/var/cache/bootseer/images"))

SMALL_CMD = ["/bin/sh", "-c", "cat /data/keep.txt /data/dir-replaced; ls /data/opaque"]
SMALL_OUTPUT = "kept\nnow a file\nnew1\n"
BIG_SIZE = 32 << 20


def _big_file() -> bytes:
    """32 MiB, mostly zeros with a pseudo-random 64 KiB block every 4 MiB: large, sparse-ish, reproducible."""
    rnd = random.Random(20261123)
    buf = bytearray(BIG_SIZE)
    for off in range(0, BIG_SIZE, 4 << 20):
        buf[off : off + (64 << 10)] = rnd.randbytes(64 << 10)
    return bytes(buf)


def _busybox_entries() -> list:
    out = [entry("bin/", kind=tarfile.DIRTYPE, mode=0o755), entry("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)]
    out += [entry(f"bin/{a}", kind=tarfile.SYMTYPE, linkname="busybox", mode=0o777) for a in APPLETS]
    return out


# path -> (type, mode, uid, gid, content-or-target, xattrs)  — what a correct unpack of `small` yields
# (types: f file, d dir, l symlink, c char device; content of files by sha256 for the big one).
SMALL_EXPECTED: dict[str, tuple] = {
    "data/keep.txt": ("f", 0o644, 0, 0, b"kept\n", {}),
    "data/owned.txt": ("f", 0o640, 1000, 1000, b"owned by 1000\n", {}),
    "data/dir-replaced": ("f", 0o644, 0, 0, b"now a file\n", {}),
    "data/opaque": ("d", 0o755, 0, 0, None, {}),
    "data/opaque/new1": ("f", 0o644, 0, 0, b"new\n", {}),
    "data/link": ("l", 0o777, 0, 0, "keep.txt", {}),
    "data/abs-link": ("l", 0o777, 0, 0, "/data/keep.txt", {}),
    "data/hard-a": ("f", 0o644, 0, 0, b"hardlinked\n", {}),
    "data/hard-b": ("f", 0o644, 0, 0, b"hardlinked\n", {}),
    "data/xattr.txt": ("f", 0o644, 0, 0, b"with xattr\n", {"user.bootseer": b"hello"}),
    "data/chardev": ("c", 0o600, 0, 0, (1, 3), {}),
    "data/sub/a.txt": ("f", 0o644, 0, 0, b"a\n", {}),
    "data/sub/b.txt": ("f", 0o644, 0, 0, b"b\n", {}),
    "bin/suid": ("f", 0o4755, 0, 0, b"#!/bin/sh\necho suid\n", {}),
    "tmp": ("d", 0o1777, 0, 0, None, {}),
}
SMALL_ABSENT = ["data/gone.txt", "data/opaque/old1", "data/opaque/old2", "data/dir-replaced/inner.txt"]
SMALL_HARDLINKS = [("data/hard-a", "data/hard-b")]
SMALL_BIG = ("data/big.bin", BIG_SIZE)


def build_small(dest: Path, tag: str = "v1") -> str:
    """Write the small test image as an OCI layout at ``dest``; return the manifest digest."""
    D, L, H, C = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE
    lay = Layout(dest)
    lay.add_entries(
        [
            *_busybox_entries(),
            entry("etc/", kind=D, mode=0o755),
            entry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n"),
            entry("etc/group", b"root:x:0:\nuser:x:1000:\n"),
            entry("tmp/", kind=D, mode=0o1777),
            entry("dev/", kind=D, mode=0o755),
            entry("data/", kind=D, mode=0o755),
            entry("data/keep.txt", b"kept\n"),
            entry("data/owned.txt", b"owned by 1000\n", mode=0o640, uid=1000, gid=1000),
            entry("data/gone.txt", b"will be deleted\n"),
            entry("data/dir-replaced/", kind=D, mode=0o755),
            entry("data/dir-replaced/inner.txt", b"inner\n"),
            entry("data/opaque/", kind=D, mode=0o755),
            entry("data/opaque/old1", b"old1\n"),
            entry("data/opaque/old2", b"old2\n"),
            entry("data/sub/", kind=D, mode=0o755),
            entry("data/sub/a.txt", b"a\n"),
            entry("data/chardev", kind=C, mode=0o600, devmajor=1, devminor=3),
        ],
        "base: busybox, files to delete and replace",
    )
    lay.add_entries(
        [
            entry("data/", kind=D, mode=0o755),
            entry("data/.wh.gone.txt", b""),
            entry("data/.wh.dir-replaced", b""),
            entry("data/dir-replaced", b"now a file\n"),
            entry("data/opaque/", kind=D, mode=0o755),
            entry("data/opaque/.wh..wh..opq", b""),
            entry("data/opaque/new1", b"new\n"),
            entry("data/link", kind=L, linkname="keep.txt", mode=0o777),
            entry("data/abs-link", kind=L, linkname="/data/keep.txt", mode=0o777),
            entry("data/hard-a", b"hardlinked\n"),
            entry("data/hard-b", kind=H, linkname="data/hard-a"),
            entry("data/xattr.txt", b"with xattr\n", xattrs={"user.bootseer": "hello"}),
            entry("bin/", kind=D, mode=0o755),
            entry("bin/suid", b"#!/bin/sh\necho suid\n", mode=0o4755),
        ],
        "whiteouts, opaque dir, links, xattr, setuid",
    )
    lay.add_entries(
        [
            entry("data/", kind=D, mode=0o755),
            entry("data/sub/", kind=D, mode=0o755),
            entry("data/sub/b.txt", b"b\n"),
            entry("data/big.bin", _big_file()),
        ],
        "a large, mostly-zero file",
    )
    return lay.finish(tag, {"Cmd": SMALL_CMD, "Env": ["PATH=/bin"], "WorkingDir": "/"})


def build_pause(dest: Path, tag: str = "v1") -> str:
    """The CRI sandbox image: busybox sleeping (as long as a signed 32-bit sleep allows)."""
    lay = Layout(dest)
    lay.add_entries([*_busybox_entries(), entry("dev/", kind=tarfile.DIRTYPE, mode=0o755)], "pause")
    return lay.finish(tag, {"Entrypoint": ["/bin/sleep", "2147483647"], "Env": ["PATH=/bin"]})


def push_small(registry: str, repo: str = "bootseer/small", tag: str = "v1") -> str:
    """Build and push the small image; return ``registry/repo:tag``."""
    with tempfile.TemporaryDirectory(prefix="bs-small-") as tmp:
        build_small(Path(tmp), tag)
        push(Path(tmp), tag, f"{registry}/{repo}:{tag}")
    return f"{registry}/{repo}:{tag}"


TINY_CMD = ["/bin/sh", "-c", "cat /data/keep.txt"]


def push_tiny(registry: str, repo: str, tag: str = "v1") -> str:
    """A one-layer image of busybox and ``/data/keep.txt`` ("kept"), with bytes of its own (``/data/repo``
    holds ``repo``): no other test's signature, index or lazy layer can stand for it — content-addressed, they
    would, rightly.  ``TINY_CMD`` prints "kept"."""
    ref = f"{registry}/{repo}:{tag}"
    with tempfile.TemporaryDirectory(prefix="bs-tiny-") as tmp:
        lay = Layout(Path(tmp))
        lay.add_entries([*_busybox_entries(), entry("data/", kind=tarfile.DIRTYPE, mode=0o755),
                         entry("data/keep.txt", b"kept\n"), entry("data/repo", repo.encode())], repo)
        lay.finish(tag, {"Cmd": TINY_CMD, "Env": ["PATH=/bin"]})
        push(Path(tmp), tag, ref)
    return ref


def push_pause(registry: str, repo: str = "bootseer/pause", tag: str = "v1", workdir: Path | None = None) -> str:
    """Build and push the sandbox image; its layout is built in ``workdir`` (a stack's root, so that a killed
    ``stack up`` leaves it where ``stack down`` removes it) or in the system's temp dir."""
    with tempfile.TemporaryDirectory(prefix="bs-pause-", dir=workdir) as tmp:
        build_pause(Path(tmp), tag)
        push(Path(tmp), tag, f"{registry}/{repo}:{tag}")
    return f"{registry}/{repo}:{tag}"


# ---------------------------------------------------------------------------------------------- realistic

REALISTIC_VERSION = 2
REALISTIC_DEBIAN_PACKAGES = ["python3", "python3-numpy"]
REALISTIC_TORCH = "torch==2.13.0"
REALISTIC_CMD = ["python3", "-c", "import torch; print(torch.ones(2).sum())"]
REALISTIC_OUTPUT = "tensor(2.)\n"
SITE = "usr/local/lib/python3.11/dist-packages"


@dataclass
class CachedImage:
    layout: Path
    tag: str
    manifest_digest: str
    layers: list[dict]


def realistic_key() -> str:
    spec = {"v": REALISTIC_VERSION, "deb": REALISTIC_DEBIAN_PACKAGES, "torch": REALISTIC_TORCH, "suite": "bookworm"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _tar_dir(dst: IO[bytes], src: Path, prefix: str, include: set[str] | None = None) -> None:
    """Tar ``src`` under ``prefix`` (owner root, reproducible order and times); only top entries in include."""
    with tarfile.open(fileobj=dst, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        parts = prefix.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            info = tarfile.TarInfo("/".join(parts[:i]) + "/")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tf.addfile(info)
        for top in sorted(os.listdir(src)):
            if include is not None and top not in include:
                continue
            walk = os.walk(src / top) if (src / top).is_dir() else [(str(src), [], [top])]
            for root, dirs, files in walk:
                dirs.sort()
                for name in [None, *sorted(files)]:
                    path = Path(root) if name is None else Path(root) / name
                    if path == src:
                        continue
                    rel = path.relative_to(src)
                    info = tf.gettarinfo(str(path), f"{prefix}/{rel}")
                    info.uid = info.gid = 0
                    info.uname = info.gname = "root"
                    info.mtime = 1_700_000_000
                    if info.isreg():
                        with open(path, "rb") as fh:
                            tf.addfile(info, fh)
                    else:
                        tf.addfile(info)


def build_realistic(cache: Path = DEFAULT_CACHE, log: IO[str] = sys.stderr) -> CachedImage:
    """Build (or reuse from ``cache``) the realistic benchmark image as an OCI layout."""
    key = realistic_key()
    out = cache / f"realistic-{key}"
    done = out / "bootseer-image.json"
    if done.exists():
        meta = json.loads(done.read_text())
        return CachedImage(out, meta["tag"], meta["manifest_digest"], meta["layers"])
    work = Path(tempfile.mkdtemp(prefix="bs-realistic-", dir=cache.parent if cache.parent.exists() else None))
    try:
        lay = Layout(work / "layout")
        root_tar = work / "root.tar"
        print("realistic image: mmdebstrap bookworm minbase + python3 + numpy ...", file=log, flush=True)
        subprocess.run(
            ["mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(REALISTIC_DEBIAN_PACKAGES),
             "--aptopt=Acquire::Retries=3", "bookworm", str(root_tar)],
            check=True,
        )
        lay.add_tar_file(root_tar, "debian bookworm minbase + python3 + numpy (mmdebstrap)")
        root_tar.unlink()
        print(f"realistic image: pip install {REALISTIC_TORCH} ...", file=log, flush=True)
        site = work / "site"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(site),
             REALISTIC_TORCH],
            check=True,
        )
        shutil.rmtree(site / "bin", ignore_errors=True)
        entries = set(os.listdir(site))
        torch_parts = {e for e in entries if e.split("-")[0] in ("torch", "torchgen", "functorch")}
        print("realistic image: writing layers ...", file=log, flush=True)
        lay.add_layer(lambda d: _tar_dir(d, site, SITE, entries - torch_parts), "pip: torch's dependencies")
        lay.add_layer(lambda d: _tar_dir(d, site, SITE, torch_parts), "pip: torch 2.13 CPU")
        tag = "v1"
        digest = lay.finish(tag, {"Cmd": REALISTIC_CMD, "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]})
        meta = {"tag": tag, "manifest_digest": digest,
                "layers": [{"digest": ly.digest, "size": ly.size, "comment": ly.comment} for ly in lay.layers]}
        (work / "layout" / "bootseer-image.json").write_text(json.dumps(meta, indent=1))
        cache.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(work / "layout", out)
        return CachedImage(out, tag, digest, meta["layers"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def push_realistic(registry: str, repo: str = "bootseer/realistic", cache: Path = DEFAULT_CACHE) -> str:
    img = build_realistic(cache)
    push(img.layout, img.tag, f"{registry}/{repo}:{img.tag}")
    return f"{registry}/{repo}:{img.tag}"


def check_small_tree(root: Path) -> list[str]:
    """Compare an unpacked ``small`` image at ``root`` with :data:`SMALL_EXPECTED`; return the differences.

    Shared by every test that claims to produce the small image's filesystem (containerd's overlayfs, the
    BootSeer snapshotter, EROFS conversion), so all of them are held to the same tree.
    """
    import stat as st

    problems: list[str] = []
    for rel, (kind, mode, uid, gid, content, xattrs) in SMALL_EXPECTED.items():
        p = root / rel
        try:
            s = os.lstat(p)
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        kinds = {st.S_IFREG: "f", st.S_IFDIR: "d", st.S_IFLNK: "l", st.S_IFCHR: "c"}
        actual_kind = kinds.get(st.S_IFMT(s.st_mode), "?")
        if actual_kind != kind:
            problems.append(f"{rel}: type {actual_kind} != {kind}")
            continue
        if kind != "l" and st.S_IMODE(s.st_mode) != mode:
            problems.append(f"{rel}: mode {oct(st.S_IMODE(s.st_mode))} != {oct(mode)}")
        if (s.st_uid, s.st_gid) != (uid, gid):
            problems.append(f"{rel}: owner {s.st_uid}:{s.st_gid} != {uid}:{gid}")
        if kind == "f" and p.read_bytes() != content:
            problems.append(f"{rel}: content differs")
        if kind == "l" and os.readlink(p) != content:
            problems.append(f"{rel}: target {os.readlink(p)!r} != {content!r}")
        if kind == "c" and (os.major(s.st_rdev), os.minor(s.st_rdev)) != content:
            problems.append(f"{rel}: device {os.major(s.st_rdev)},{os.minor(s.st_rdev)} != {content}")
        for name, value in xattrs.items():
            try:
                got = os.getxattr(p, name, follow_symlinks=False)
            except OSError as e:
                problems.append(f"{rel}: xattr {name} missing ({e.strerror})")
                continue
            if got != value:
                problems.append(f"{rel}: xattr {name}={got!r} != {value!r}")
    for rel in SMALL_ABSENT:
        if os.path.lexists(root / rel):
            problems.append(f"{rel}: should have been deleted (whiteout/opaque not applied)")
    for a, b in SMALL_HARDLINKS:
        pa, pb = root / a, root / b
        if pa.exists() and pb.exists() and pa.stat().st_ino != pb.stat().st_ino:
            problems.append(f"{a} and {b}: not hardlinked")
    big, size = SMALL_BIG
    if not (root / big).exists() or (root / big).read_bytes() != _big_file():
        problems.append(f"{big}: missing or content differs (expected {size} bytes)")
    return problems

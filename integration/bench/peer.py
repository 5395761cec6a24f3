"""The stargz-snapshotter peer of the start-up benchmark: build it, run it beside the local stack's
containerd, convert images for it.

Debian ships the peer in two halves: ``ctr-remote`` (package ``stargz-snapshotter``: eStargz conversion,
``image optimize``, ``image rpull``) and the snapshotter's library sources (``golang-github-containerd-
stargz-snapshotter-dev`` 0.12), without the daemon's ``main``.  ``stargz/main.go`` is that ``main``: the
library's filesystem and snapshotter served over containerd's proxy snapshot API.  It is built here on
demand (``go build`` in GOPATH mode over ``/usr/share/gocode``, about a minute), keyed by the hash of its
sources and the Go version, so the benchmark builds it once per machine and tests never do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from integration.stack import Stack, detach_loops_below, unmount_below, wait_for

SOURCE_DIR = Path(__file__).resolve().parent / "stargz"
GO_SOURCES = Path("/usr/share/gocode/src/github.com/containerd/stargz-snapshotter")
DEFAULT_CACHE = Path(os.environ.get("BOOTSEER_PEER_CACHE", "/var/cache/bootseer/stargz-peer"))
SNAPSHOTTER = "stargz"  # the proxy plugin's name in containerd's config, and ctr-remote's default
PACKAGES = "stargz-snapshotter golang-github-containerd-stargz-snapshotter-dev golang-go"


class PeerUnavailable(RuntimeError):
    """The peer cannot run on this machine (a package is missing); the message says which."""


def missing() -> str | None:
    """Why the peer cannot be built and run here, or None when it can."""
    needs = []
    if shutil.which("ctr-remote") is None:
        needs.append("ctr-remote (package stargz-snapshotter)")
    if shutil.which("go") is None:
        needs.append("go (package golang-go)")
    if not (GO_SOURCES / "snapshot").is_dir():
        needs.append(f"{GO_SOURCES} (package golang-github-containerd-stargz-snapshotter-dev)")
    if not needs:
        return None
    return "missing " + ", ".join(needs) + f"; install with: apt-get install {PACKAGES}"


def source_key(go_version: str) -> str:
    """Cache key of a build: the peer's sources, its build script and the compiler."""
    h = hashlib.sha256(go_version.encode())
    for name in ("main.go", "build.sh"):
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def build(cache: Path = DEFAULT_CACHE) -> Path:
    """The peer's binary, built now if this version of the sources has not been built on this machine."""
    why = missing()
    if why:
        raise PeerUnavailable(why)
    go_version = subprocess.run(["go", "version"], capture_output=True, text=True, check=True).stdout.strip()
    out = cache / f"bootseer-stargz-peer-{source_key(go_version)}"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(SOURCE_DIR / "build.sh"), str(out)], capture_output=True, text=True,
                          env={**os.environ, "GOCACHE": str(cache / "go-build")})
    if proc.returncode != 0:
        raise PeerUnavailable(f"building the stargz peer failed:\n{proc.stderr.strip()[-3000:]}")
    return out


@dataclass
class Peer:
    """One running stargz peer: its state under ``root``, serving on ``socket``."""

    binary: Path
    root: Path
    socket: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([str(self.binary), "-root", str(self.root), "-address", str(self.socket)],
                                         stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_for("stargz peer", lambda: self.socket.exists(), timeout, self.proc, self.log)

    def stop(self, wipe: bool = False) -> None:
        """Stop it (its own shutdown unmounts its FUSE layers); ``wipe`` also deletes its state: a cold peer."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        unmount_below(self.root)
        detach_loops_below(self.root)
        if wipe:
            shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


def ctr_remote(st: Stack, *args: str, namespace: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """``ctr-remote`` against the stack's containerd."""
    proc = subprocess.run(["ctr-remote", "-a", st.info.containerd_socket, "-n", namespace, *args],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"ctr-remote {' '.join(args)}: {proc.stderr.strip()[-2000:]}")
    return proc


def convert_estargz(st: Stack, src: str, dst: str, namespace: str, optimize_cmd: list[str] | None = None) -> None:
    """Push ``src`` converted to eStargz as ``dst``; with ``optimize_cmd``, run that command in the image
    (``ctr-remote image optimize``) so the files it reads are marked for stargz's prefetch."""
    st.ctr("image", "pull", "--plain-http", src, namespace=namespace, timeout=1800)
    if optimize_cmd is None:
        ctr_remote(st, "image", "convert", "--oci", "--estargz", src, dst, namespace=namespace)
    else:
        ctr_remote(st, "image", "optimize", "--oci", "--entrypoint", json.dumps(optimize_cmd[:1]),
                   "--args", json.dumps(optimize_cmd[1:]), src, dst, namespace=namespace)
    st.ctr("image", "push", "--plain-http", dst, namespace=namespace, timeout=1800)
    st.ctr("image", "rm", "--sync", dst, namespace=namespace, check=False)

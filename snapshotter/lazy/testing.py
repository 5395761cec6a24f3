"""Real parts for tests and benchmarks of the lazy data path: a docker-registry, EROFS blobs, a counting and
misbehaving HTTP proxy, the data-path daemon in a child process, and cleanup that leaves nothing mounted.

Nothing here is used by the daemon itself."""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, TypeVar

import requests

from bootseer.control import Control
from bootseer.index import chunk_digests
from bootseer.testkit import free_port, wait_until
from snapshotter.lazy import loop
from snapshotter.lazy import mount as mnt
from snapshotter.lazy.spec import BlobSpec

T = TypeVar("T")


def make_tree(root: Path, *, seed: int = 1, random_mib: int = 4, b64_mib: int = 9, small_files: int = 120) -> Path:
    """A directory tree with a raw random file (stored uncompressed by erofs), a large base64 file
    (compressible, random content), a numbers file, many small files, an empty file and a symlink."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "rand.bin").write_bytes(rng.randbytes(random_mib << 20))
    (root / "b64.txt").write_bytes(base64.encodebytes(rng.randbytes(b64_mib << 20)))
    (root / "seq.txt").write_text("".join(f"{i}\n" for i in range(300_000)))
    for i in range(small_files):
        d = root / "dir" / f"sub{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i}.txt").write_bytes(rng.randbytes(rng.randint(10, 6000)).hex().encode())
    (root / "empty").touch()
    (root / "link").symlink_to("seq.txt")
    return root


def build_erofs(src: Path, out: Path, compressor: str = "lz4hc") -> Path:
    """``mkfs.erofs -z<compressor>`` with fixed timestamp and UUID (reproducible, like the converter)."""
    cmd = ["mkfs.erofs", f"-z{compressor}", "-T0", "-U6b5f6d3c-6e1a-4c36-9f3e-0b6f5b1c2d3e", "--all-root",
           "--quiet", str(out), str(src)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256 (files) | '-> target' (symlinks) | 'dir'} of a tree."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------- registry
class Registry:
    """Debian's docker-registry (distribution 2.8) on a loopback port, storage in ``root``."""

    def __init__(self, root: Path, port: int | None = None, *, tls: tuple[Path, Path, Path] | None = None,
                 htpasswd: Path | None = None, config: dict[str, Any] | None = None) -> None:
        """``tls``: (server certificate, its key, the CA that signed it): serve HTTPS, as a registry with a
        private CA does.  ``htpasswd``: require basic auth against that file (bcrypt entries).  ``config``:
        more top-level sections of distribution's configuration (``auth`` for a token server,
        ``notifications``), as an operator's registry has them."""
        self.root = Path(root)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls = tls
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "storage").mkdir(exist_ok=True)
        http: dict[str, object] = {"addr": f"127.0.0.1:{self.port}", "secret": secrets.token_hex(16)}
        if tls is not None:
            http["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
        cfg: dict[str, object] = {"version": 0.1, "log": {"level": "warn", "accesslog": {"disabled": True}},
                                  "storage": {"filesystem": {"rootdirectory": str(self.root / "storage")},
                                              "maintenance": {"uploadpurging": {"enabled": False}}},
                                  "http": http}
        if htpasswd is not None:
            cfg["auth"] = {"htpasswd": {"realm": "bootseer-test", "path": str(htpasswd)}}
        cfg.update(config or {})
        self.auth = "auth" in cfg
        (self.root / "config.yml").write_text(json.dumps(cfg))

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Registry:
        log = open(self.root / "registry.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.root / "config.yml")], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(self.root / 'registry.log').read_text()[-2000:]}")
            try:
                verify = str(self.tls[2]) if self.tls else True
                code = requests.get(self.url + "/v2/", timeout=1, verify=verify).status_code
                return code == (401 if self.auth else 200)
            except requests.RequestException:
                return False

        wait_until(up, timeout, "registry up")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def blob_data(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.root / "storage/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def push_blob(registry_url: str, repo: str, data: bytes) -> str:
    """Monolithic upload: POST /v2/<repo>/blobs/uploads/ then PUT <location>?digest=…  Returns the digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = requests.post(f"{registry_url}/v2/{repo}/blobs/uploads/", timeout=30)
    r.raise_for_status()
    loc = r.headers["Location"]
    if loc.startswith("/"):
        loc = registry_url + loc
    sep = "&" if "?" in loc else "?"
    r = requests.put(f"{loc}{sep}digest={digest}", data=data,
                     headers={"Content-Type": "application/octet-stream"}, timeout=120)
    if r.status_code != 201:
        raise RuntimeError(f"blob upload failed: HTTP {r.status_code} {r.text[:200]}")
    return digest


def spec_for(registry_url: str, repo: str, data: bytes, chunk_size: int) -> BlobSpec:
    return BlobSpec(registry=registry_url, repository=repo, digest="sha256:" + hashlib.sha256(data).hexdigest(),
                    size=len(data), chunk_size=chunk_size, chunks=chunk_digests(data, chunk_size))


# ------------------------------------------------------------------------------------------ daemon
class LazyDaemon:
    """``python -m snapshotter.lazy.serve`` as a child process (see that module for why)."""

    def __init__(self, root: Path, config: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.config = config or {}
        self.control_path = self.root / "control.sock"
        self.control = Control(self.control_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.root / "daemon.log"

    def start(self, timeout: float = 30) -> LazyDaemon:
        self.root.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "snapshotter.lazy.serve", "--root", str(self.root), "--control",
             str(self.control_path), "--config", json.dumps(self.config), "--log-level", "info"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=str(Path(__file__).resolve().parents[2]))
        out.close()

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"lazy daemon exited {self.proc.returncode}: {self.tail()}")
            if not self.control_path.exists():
                return False
            try:
                self.control.call("ping", timeout=5)
                return True
            except (OSError, RuntimeError):
                return False

        wait_until(ready, timeout, "lazy daemon ready")
        return self

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def call(self, op: str, **args: Any) -> Any:
        return self.control.call(op, **args)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind — what a crash looks like to the kernel."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def stop(self, teardown: bool = True, timeout: float = 30) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.control.call("shutdown", teardown=teardown, timeout=timeout)
                self.proc.wait(timeout)
            except (OSError, RuntimeError, subprocess.TimeoutExpired):
                self.kill()
        self.proc = None

    def status(self, digest: str) -> dict[str, Any]:
        for layer in self.call("status")["layers"]:
            if layer["digest"] == digest:
                return dict(layer)
        raise KeyError(digest)


def cleanup_root(root: Path) -> list[str]:
    """Remove every trace of a data-path root: mounts below it (erofs first, then FUSE), loop devices backed
    by files below it.  Returns what it had to clean (so tests can assert a clean teardown left nothing)."""
    root = Path(root).resolve()
    prefix = str(root) + "/"
    leftovers: list[str] = []
    for m in reversed(mnt.mountinfo()):
        if m.mountpoint.startswith(prefix):
            leftovers.append(f"mount {m.fstype} {m.mountpoint}")
            with contextlib.suppress(OSError):
                mnt.umount(m.mountpoint, detach=True)
    for n in loops_below(root):
        leftovers.append(f"loop{n}")
        with contextlib.suppress(OSError):
            loop.detach(n)
    return leftovers


def loops_below(root: Path) -> list[int]:
    """Loop devices whose backing file lies below ``root`` (including dead FUSE files and deleted caches)."""
    prefix = str(Path(root).resolve()) + "/"
    out: list[int] = []
    for d in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (d / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(prefix) or f"/{Path(root).name}/" in backing:
            out.append(int(d.name[4:]))
    return out


def read_eio(path: Path) -> bool:
    """True if reading ``path`` fails with EIO (the data path's answer to unverifiable bytes)."""
    try:
        path.read_bytes()
    except OSError as e:
        if e.errno == errno.EIO:
            return True
        raise
    return False

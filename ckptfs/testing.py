"""Helpers shared by the ckptfs tests and the benchmark: a mount in a subprocess, a moto S3 server.

Both wait for a condition with a deadline (never a fixed sleep) and always clean up: the mount is
unmounted (lazily, as a last resort) and the server process is ended, whatever happened inside.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bootseer.testkit import free_port, wait_until


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def mounted(uri: str, mnt: Path, extra: list[str] | None = None,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m ckptfs.cli mount URI MNT`` in a subprocess; yields once ``MNT`` is a mount point."""
    mnt.mkdir(parents=True, exist_ok=True)
    log = mnt.parent / f".{mnt.name}.mount.log"
    with open(log, "wb") as errlog:
        proc = subprocess.Popen([sys.executable, "-m", "ckptfs.cli", "mount", uri, str(mnt), *(extra or [])],
                                stdout=subprocess.DEVNULL, stderr=errlog, env=env)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"ckptfs mount exited with {proc.returncode}: {log.read_text()}")
            return os.path.ismount(mnt)

        wait_until(up, 60, f"ckptfs mount at {mnt}")
        yield proc
    finally:
        _stop(proc)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        log.unlink(missing_ok=True)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port (real HTTP); yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(url + "/", timeout=1):
                    return True
            except OSError:
                return False

        wait_until(up, 60, "the moto server")
        yield url
    finally:
        _stop(proc, signal.SIGTERM, 10)

"""Root-only unix sockets and state directories, without touching the process umask.

The snapshotter's sockets (the Snapshots API, the lazy layers' control socket) let whoever can connect mount
and read any layer, so they must be born 0600; its state root holds erofs mounts with setuid files and device
nodes (the CVE-2021-41091 class), so it must be 0700 before anything is created below it.  ``os.umask`` is
process-wide: changing it while the lazy data path's threads create files and directories races with them.
So a socket is bound inside a fresh 0700 directory next to its final path (nobody else can reach it there),
made 0600, then renamed into place; and the root is created, or re-moded, 0700 first of all.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path


def private_root(path: Path) -> None:
    """Make ``path`` a directory only root can enter (0700), creating it and its parents if needed; refuse a
    symlink (it would redirect the whole state elsewhere) or a directory another user owns."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise SystemExit(f"state root {path} is not a directory (a symlink?): refusing it")
    if st.st_uid != os.geteuid():
        raise SystemExit(f"state root {path} belongs to uid {st.st_uid}, not to this daemon: refusing it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def bind_private(path: Path, bind: Callable[[str], None]) -> None:
    """Create the unix socket ``path`` mode 0600: ``bind`` binds a socket at the path it is given (a
    temporary one), which is then renamed to ``path`` (replacing a stale socket)."""
    tmp = Path(tempfile.mkdtemp(prefix=".s", dir=path.parent))  # mkdtemp: mode 0700
    try:
        inner = tmp / "s"
        bind(str(inner))
        os.chmod(inner, 0o600)
        os.replace(inner, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

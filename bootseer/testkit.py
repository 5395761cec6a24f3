"""What tests and benchmarks of every package share: a free port, a polling wait with a deadline, a call
that must not hang, and dropping the page cache.  In the core so that ``snapshotter.lazy.testing``,
``ckptfs.testing``, ``integration`` and the recorder use one copy (the recorder drops the page cache before
a recording for real: a cold start is what it must see)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the caller binds it soon after; tests use unique ports)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy (returned); TimeoutError after ``timeout`` seconds.
    Polling a condition under a deadline, never sleeping in place of synchronisation."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.1f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def run_with_deadline(fn: Callable[[], T], timeout: float, what: str = "call") -> T:
    """Run ``fn`` in a thread; TimeoutError if it has not returned in ``timeout`` s (a hung read must fail
    the test, not hang the suite; the thread is left to the cleanup that kills what it waits on)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["v"] = fn()
        except BaseException as e:
            box["e"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{what} still blocked after {timeout:.1f}s")
    if "e" in box:
        raise box["e"]
    return box["v"]  # type: ignore[no-any-return]


def drop_caches() -> bool:
    """Write dirty pages back, then drop clean pages, dentries and inodes: what a cold start sees.  Root
    only; returns False where it is not allowed (an unprivileged run measures warm and must say so)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True

"""Event lines from inside the job's container, in the format of :mod:`bootseer.events` (version 1), for an
image that does not carry BootSeer: the standard library only.  Where BootSeer is importable its own
``events.emit`` is used instead.

    python3 jobevents.py span dependency_install -- pip install -r requirements.txt

runs the command and appends one line for it (status ``error`` and the command's exit status when it fails).
Lines go to ``$BOOTSEER_EVENTS`` tagged with ``$BOOTSEER_JOB_ID``; without ``$BOOTSEER_EVENTS`` nothing is
written.  ``host`` is ``$BOOTSEER_NODE`` when set: a container has its own hostname, and the profile places
the lines of one (host, boot) by their monotonic stamps, which a container shares with its node.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

Stamp = tuple[float, float]  # (wall, monotonic)


def now() -> Stamp:
    return time.time(), time.monotonic()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def emit(phase: str, start: Stamp, end: Stamp, component: str = "trainer", status: str = "ok",
         **attrs: Any) -> None:
    target = os.environ.get("BOOTSEER_EVENTS", "")
    if not target or target == "off":
        return
    doc = {"v": 1, "phase": phase, "job": os.environ.get("BOOTSEER_JOB_ID") or None, "component": component,
           "status": status, "start": round(start[0], 6), "end": round(end[0], 6),
           "start_mono": round(start[1], 6), "end_mono": round(end[1], 6),
           "host": os.environ.get("BOOTSEER_NODE") or socket.gethostname(), "boot_id": _boot_id(),
           "pid": os.getpid(), "attrs": attrs}
    line = (json.dumps(doc, default=str, separators=(",", ":")) + "\n").encode()
    try:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line)  # one write on O_APPEND: lines of concurrent processes do not interleave
        finally:
            os.close(fd)
    except OSError as e:  # the profile loses a line; the job goes on
        print(f"jobevents: {target} not written: {e}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "span" or argv[2] != "--":
        print("usage: jobevents.py span PHASE -- COMMAND...", file=sys.stderr)
        return 2
    start = now()
    rc = subprocess.call(argv[3:])
    emit(argv[1], start, now(), component="job", status="ok" if rc == 0 else "error",
         exit_code=rc)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

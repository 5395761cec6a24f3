"""The snapshotter's control protocol, and its one client (:class:`Control`).

The snapshotter daemon serves it on a root-only unix socket (``control_address``, default
``<gRPC socket>.ctl``; the local stack's is ``StackInfo.snapshotter_control``); so does
``python -m snapshotter.lazy.serve`` (the data path in a child process, for tests and debugging).  The
server side lives in :mod:`snapshotter.lazy.serve`; ``bootseer status``, ``bootseer pull``'s pull hint, the
recorder, the tests and the benchmarks all talk to it through :class:`Control`.

Protocol: one JSON object per connection, ``{"op": NAME, ...args}``, answered with one JSON line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "...", "errno": N}``.  Ops: ``ping``, ``acquire``
(spec, owner), ``release`` (owner, digest?, force?), ``retain`` (owners), ``status``, ``wait_swapped``
(digest, timeout), ``prefetch`` (digest, ranges, concurrency?, wait?), ``record_start`` (path, digests?,
hold_swap?) / ``record_stop`` (id), ``set_fill`` (enabled), ``evict`` (need_bytes?, cap?: 0 drops every
unused cache), ``housekeeping``, ``metrics``; only the daemon: ``pull_hint`` (image, platform?); only the
child process: ``shutdown`` (teardown?).  See :mod:`snapshotter.lazy` for what each op means.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

DEFAULT_CONTROL = "/run/bootseer/snapshotter.sock.ctl"


class ControlError(RuntimeError):
    """The daemon answered with an error (``errno`` set when it was an OSError there), or not at all."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


class Control:
    """Client of the control socket: :meth:`call` sends one request and returns its ``result``."""

    def __init__(self, path: Path | str, timeout: float = 60.0) -> None:
        self.path = str(path)
        self.timeout = timeout

    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout or self.timeout)
            s.connect(self.path)
            s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                piece = s.recv(1 << 16)
                if not piece:
                    break
                buf += piece
        if not buf:
            raise ControlError(f"{op}: no answer (daemon gone?)")
        doc = json.loads(buf)
        if not doc.get("ok"):
            raise ControlError(f"{op}: {doc.get('error')}", doc.get("errno"))
        return doc.get("result")


def default_control() -> str:
    """The local stack's snapshotter control socket if `bootseer stack up` runs one, else the system one."""
    from bootseer.localstack import local_stack_value

    ctl = local_stack_value("snapshotter_control")
    return ctl if ctl and os.path.exists(ctl) else DEFAULT_CONTROL


def send_pull_hint(control: str, image: str, platform: str | None) -> bool:
    """Tell the snapshotter (its control socket) that ``image`` is about to be pulled: it resolves the image and
    sets its lazy layers up, prefetch started, while this process is still importing its gRPC and HTTP stacks
    and before containerd sends the first Prepare.  Best effort and quick (half a second at most): no daemon,
    no permission or an old daemon just means no head start (False)."""
    try:
        Control(control, timeout=0.5).call("pull_hint", image=image, platform=platform)
        return True
    except (OSError, ValueError, ControlError):
        return False

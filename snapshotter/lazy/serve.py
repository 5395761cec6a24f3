"""``python -m snapshotter.lazy.serve``: a LayerManager in its own process, driven over a unix socket.

Why it exists: pyfuse3 allows one FUSE mount per process and the interesting failures (a daemon killed
with SIGKILL, restarted, its registry gone) are process-level events.  The tests and the benchmark therefore
run the data path here, in a child process they can kill, and drive it with
:class:`bootseer.control.Control`.  It is also a handy debugging tool (``status`` shows every layer).  The
snapshotter daemon does not use it: it embeds a :class:`~snapshotter.lazy.manager.LayerManager` directly.

This module is the server side of the control protocol (the protocol and its one client:
:mod:`bootseer.control`).  Control socket handlers run in their own threads — never on the FUSE thread — so
they may mount.  The snapshotter daemon serves the same protocol (:class:`ControlServer`, without
``shutdown``) on its control socket, which is how ``bootseer status`` and the recorder reach its layers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socketserver
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from snapshotter.lazy.manager import LayerManager, LazyConfig
from snapshotter.lazy.spec import BlobSpec
from snapshotter.sockets import bind_private, private_root

log = logging.getLogger("bootseer.lazy.serve")


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        line = self.rfile.readline()
        try:
            req = json.loads(line)
            result = self.server.dispatch(req)
            out: dict[str, Any] = {"ok": True, "result": result}
        except OSError as e:
            out = {"ok": False, "error": str(e), "errno": e.errno}
        except Exception as e:
            log.exception("control request failed")
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        self.wfile.write(json.dumps(out).encode() + b"\n")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    # set by the owner: more to say in ``ping`` (the snapshotter daemon: its start-up reconciliation's state)
    ping_info: Callable[[], dict[str, Any]] | None = None

    def __init__(self, path: str, manager: LayerManager, stop: threading.Event, *, bind: bool = True) -> None:
        self.manager = manager
        self.stop = stop
        self.teardown = False
        super().__init__(path, _Handler, bind_and_activate=bind)

    def _bind_at(self, path: str) -> None:
        self.socket.bind(path)

    def dispatch(self, req: dict[str, Any]) -> Any:
        m = self.manager
        op = req.get("op")
        if op == "ping":
            return {"pid": os.getpid(), "fuse": str(m.fuse_dir), **(self.ping_info() if self.ping_info else {})}
        if op == "acquire":
            return {"mountpoint": str(m.acquire(BlobSpec.from_json(req["spec"]), req["owner"],
                                                replaces=req.get("replaces")))}
        if op == "release":
            return {"gone": m.release(req["owner"], req.get("digest"), force=bool(req.get("force")))}
        if op == "retain":
            return {"gone": m.retain(req["owners"])}
        if op == "status":
            return {"layers": m.status()}
        if op == "wait_swapped":
            return {"swapped": m.wait_swapped(req["digest"], float(req.get("timeout", 60)))}
        if op == "prefetch":
            job = m.prefetch(req["digest"], [tuple(r) for r in req["ranges"]], req.get("concurrency"),
                             req.get("start"))  # a time.monotonic() value: the clock is system-wide
            if req.get("wait") is not None:
                job.done.wait(float(req["wait"]))
            return {"total": job.total, "fetched": job.fetched, "failed": job.failed, "done": job.done.is_set(),
                    "page_cache_bytes": job.warmed}
        if op == "record_start":
            rec = m.record(req["path"], req.get("digests"), hold_swap=bool(req.get("hold_swap", True)))
            return {"id": rec.id, "path": str(rec.path)}
        if op == "record_stop":
            return m.stop_recording(req["id"])
        if op == "set_fill":
            m.set_fill(bool(req["enabled"]))
            return {}
        if op == "evict":
            return {"evicted": m.evict(int(req.get("need_bytes", 0)), req.get("cap"), req.get("digests"))}
        if op == "housekeeping":
            m.housekeeping()
            return {}
        if op == "metrics":
            return generate_latest(m.metrics.registry).decode()
        if op == "shutdown":
            self.teardown = bool(req.get("teardown"))
            self.stop.set()
            return {}
        raise ValueError(f"unknown op {op!r}")


class ControlServer(_Server):
    """The control protocol for a :class:`LayerManager` owned by someone else (the snapshotter daemon):
    a root-only unix socket, served from its own threads; ``shutdown`` is refused."""

    def __init__(self, path: Path | str, manager: LayerManager) -> None:
        path = Path(path)
        if path.exists() or path.is_symlink():
            path.unlink()
        super().__init__(str(path), manager, threading.Event(), bind=False)
        # born 0600 (whoever talks to it can mount and read any layer), without a process-wide umask change
        bind_private(path, self._bind_at)
        self.server_activate()
        self.path = path
        self._thread = threading.Thread(target=self.serve_forever, name="lazy-control", daemon=True)
        self._thread.start()

    # set by the daemon: (image ref, platform or None) → start setting the image's layers up (returns at once)
    on_pull_hint: Callable[[str, str | None], None] | None = None

    def dispatch(self, req: dict[str, Any]) -> Any:
        if req.get("op") == "shutdown":
            raise ValueError("shutdown is not available on the snapshotter's control socket")
        if req.get("op") == "pull_hint":
            if self.on_pull_hint is None:
                raise ValueError("this snapshotter takes no pull hints (remote snapshots off)")
            self.on_pull_hint(str(req["image"]), req.get("platform"))
            return {}
        return super().dispatch(req)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m snapshotter.lazy.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, type=Path, help="state directory (fuse/, cache/, mnt/, layers/)")
    p.add_argument("--control", required=True, help="unix socket path for the control protocol")
    p.add_argument("--config", default="{}", help="LazyConfig as JSON (e.g. '{\"fill\": {\"enabled\": false}}')")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")
    config = LazyConfig.from_dict(json.loads(args.config))
    private_root(args.root)
    manager = LayerManager(args.root, config, registry=CollectorRegistry())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    outcomes = manager.start()
    server = _Server(args.control, manager, stop, bind=False)
    bind_private(Path(args.control), server._bind_at)
    server.server_activate()
    threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
    log.info("lazy layer daemon ready (pid %d, root %s, restored %s)", os.getpid(), args.root, outcomes)
    stop.wait()
    server.shutdown()
    server.server_close()
    manager.close(teardown=server.teardown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

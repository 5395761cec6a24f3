"""Run the snapshotter: open the core, repair crash leftovers, serve gRPC on a root-only unix socket.

Order at start matters: the crash repair (:meth:`Snapshotter.recover`) runs before the socket exists, so
containerd can never observe a half-created snapshot; the state root is made 0700 before anything is created
below it; and the socket is born 0600 (bound in a private directory, then renamed into place:
:mod:`snapshotter.sockets`), so there is no window in which anyone but root could connect (whoever can talk to
this socket can make the daemon mount and delete directories as root).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from bootseer import log as bslog
from protos.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pbg
from snapshotter import faults
from snapshotter.config import Config
from snapshotter.overlay import Snapshotter
from snapshotter.remote import RemoteHandler
from snapshotter.service import SnapshotsService
from snapshotter.sockets import bind_private, private_root

if TYPE_CHECKING:
    from bootseer.pullsecrets import PullCredentials

log = logging.getLogger("bootseer.snapshotter")


def _socket_dir(path: Path) -> None:
    """Create the socket's directory root-only (0700).  A directory that already exists is not ours to
    re-mode (it may be /run or a stack root); we only refuse one that others could write to."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)
        return
    mode = path.stat().st_mode
    if mode & 0o022 and not mode & 0o1000:
        raise SystemExit(f"socket directory {path} is writable by others (mode {oct(mode & 0o7777)})")


def _start_metrics(address: str) -> None:
    from prometheus_client import start_http_server

    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
    log.info("metrics on http://%s/metrics", address)


def build(cfg: Config, remote: RemoteHandler | None = None) -> tuple[grpc.Server, Snapshotter]:
    """The core (crash-repaired) and a started gRPC server on ``cfg.address``."""
    core = Snapshotter(cfg.root, remote)
    removed = core.recover()
    if removed:
        log.info("removed %d directories left by an earlier crash: %s", len(removed), ", ".join(removed))
    _socket_dir(cfg.address.parent)
    if cfg.address.exists() or cfg.address.is_symlink():
        cfg.address.unlink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="snapshots"),
                         options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.so_reuseport", 0)])
    pbg.add_SnapshotsServicer_to_server(SnapshotsService(core), server)

    def bind(path: str) -> None:
        if server.add_insecure_port(f"unix://{path}") == 0:
            raise SystemExit(f"cannot listen on {cfg.address}")

    bind_private(cfg.address, bind)  # born 0600 (whoever connects can mount any layer), no umask change
    server.start()
    return server, core


def _recorded(core: Snapshotter, ns: str, name: str) -> bool:
    with core.store.read() as tx:
        return tx.find(ns, name) is not None


def _pull_secrets(cfg: Config) -> PullCredentials | None:
    """The store of kubelet's pull secrets when the CRI image-service proxy is configured, with what an earlier
    run kept (``<root>/cri-credentials.json``); the node's docker config is asked for anything else."""
    if not cfg.cri.image_service_socket:
        return None
    from bootseer.auth import DockerConfig
    from bootseer.pullsecrets import PullCredentials

    store = PullCredentials(cfg.root / "cri-credentials.json", DockerConfig(cfg.docker_config or None))
    store.load()
    return store


def serve(cfg: Config, remote: RemoteHandler | None = None) -> None:
    """Serve until SIGTERM/SIGINT."""
    bslog.setup(cfg.log_level, cfg.log_format)
    private_root(cfg.root)  # 0700 before the lazy path creates its caches and mounts below it
    faults.arm_from_env()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    lazy = None
    pull_secrets = _pull_secrets(cfg)
    if remote is None and cfg.remote_snapshots:
        from snapshotter.lazy.daemon import LazyService  # FUSE and the registry client only when used

        try:  # before the core's recovery, which hands its remote snapshots back
            lazy = LazyService.start(cfg, credentials=pull_secrets)
            remote = lazy.handler
        except Exception:  # no FUSE, a bad registry config…: serve plain overlay layers rather than nothing
            log.exception("lazy layers are unavailable; every image is pulled the ordinary way")
    proxy = None
    try:
        server, core = build(cfg, remote)
        if pull_secrets is not None:  # serving now: a pull it forwards can reach us; lazy layers or not
            from snapshotter.criproxy import ImageServiceProxy

            proxy = ImageServiceProxy(Path(cfg.cri.image_service_socket), cfg.cri.containerd_cri_socket,
                                      pull_secrets).start()
        if lazy is not None:
            lazy.handler.bind(lambda ns, name: _recorded(core, ns, name))
        reconciler = None
        if cfg.containerd_address:  # serving now: containerd's collection can reach us (snapshotter.reconcile)
            from snapshotter.reconcile import Reconciler

            reconciler = rec = Reconciler(core, cfg.containerd_address, cfg.containerd_snapshotter).start()
            if lazy is not None:
                lazy.control.ping_info = lambda: {"reconcile": rec.state}
        if cfg.metrics_address:
            _start_metrics(cfg.metrics_address)
        log.info("serving containerd snapshots API on %s (root %s)", cfg.address, cfg.root)
        stop.wait()
        log.info("stopping")
        if reconciler is not None:
            reconciler.stop()
        server.stop(grace=5).wait()
        core.close()
    finally:
        if proxy is not None:
            proxy.stop()
        if lazy is not None:
            lazy.close()
    with contextlib.suppress(FileNotFoundError):
        cfg.address.unlink()

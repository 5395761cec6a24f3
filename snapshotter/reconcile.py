"""At start, have containerd collect the snapshots it removed while the daemon was down.

containerd removes a snapshot in two steps.  Its garbage collector deletes the snapshot from its own metadata
and marks the snapshotter dirty; then, for each dirty snapshotter, it walks the snapshotter's snapshots,
removes those its metadata no longer names, and calls Cleanup.  While this daemon is down the second step
fails (containerd logs "snapshot garbage collection failed … connection refused") and is not retried: the
dirty mark is dropped with the failure.  The removed snapshots then stay in the metastore — their
directories on disk, their lazy layers mounted, held and cached — until something else of this snapshotter
is removed and collected, which on a quiet node may be never.  Only containerd knows what it removed.

So once the daemon serves, :class:`Reconciler` has containerd run that second step again: it prepares a
probe snapshot on this snapshotter through containerd, under a lease, and deletes the lease synchronously.
The collector removes the probe, which marks the snapshotter dirty, then walks it and removes whatever its
metadata does not name — containerd's own rule, under containerd's own lock, so a Prepare in flight is never
mistaken for garbage — and calls Cleanup, which releases the lazy layers no snapshot uses and brings their
caches under the budget (:meth:`Snapshotter.cleanup`).

The probe is how the daemon knows it worked: it must reach this daemon's metastore through containerd (else
containerd's plugin of that name is another daemon: given up, loudly), and be gone from it once the lease
is deleted (else the walk did not reach the daemon — containerd's proxy connection is still backing off
after the downtime — and it tries again).  containerd not up yet (the daemon starts first on a node) is
waited for, backing off.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time

import grpc

from bootseer.containerd import Containerd
from protos.containerd.services.leases.v1 import leases_pb2 as lpb
from protos.containerd.services.namespaces.v1 import namespace_pb2 as npb
from protos.containerd.services.namespaces.v1 import namespace_pb2_grpc as ngrpc
from snapshotter.overlay import Snapshotter

log = logging.getLogger("bootseer.snapshotter")

NAMESPACE = "bootseer-reconcile"  # the probe's lease and snapshot; deleted again when empty
# what a containerd that is not (yet) answering, or a proxy connection still backing off, looks like
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
              grpc.StatusCode.RESOURCE_EXHAUSTED}


class NotThisDaemon(Exception):
    """containerd's plugin of the configured name is not served by this daemon."""


class Reconciler:
    """Runs the start-up reconciliation in a thread of its own; :attr:`state` says where it is:
    ``pending``, ``done``, or ``failed: <why>`` (nothing more is tried)."""

    def __init__(self, core: Snapshotter, address: str, snapshotter: str, *, timeout: float = 300.0,
                 max_backoff: float = 30.0, attempts: int = 5) -> None:
        self.core = core
        self.address = address
        self.snapshotter = snapshotter
        self.timeout = timeout  # one containerd call; the synchronous collection walks every snapshot
        self.max_backoff = max_backoff
        self.attempts = attempts  # errors other than containerd being unreachable: tries before giving up
        self.state = "pending"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Reconciler:
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        delay, errors, quiet = 1.0, 0, False
        while not self._stop.is_set():
            try:
                if self.run_once():
                    self.state = "done"
                    return
                why = "containerd's collection did not reach this daemon"
            except NotThisDaemon as e:
                self.state = f"failed: {e}"
                log.warning("start-up reconciliation with containerd: %s", e)
                return
            except grpc.RpcError as e:
                code = e.code()
                why = f"{code.name}: {e.details()}"
                if code not in _TRANSIENT:
                    errors += 1
                    if errors >= self.attempts:
                        self.state = f"failed: {why}"
                        log.warning("start-up reconciliation with containerd at %s failed: %s", self.address, why)
                        return
            except Exception as e:  # never take the daemon down; containerd's next collection still comes
                self.state = f"failed: {e}"
                log.exception("start-up reconciliation with containerd failed")
                return
            # the first wait is worth a line (containerd not up yet, or still reconnecting); the rest is noise
            (log.debug if quiet else log.info)("start-up reconciliation with containerd at %s: %s; trying again "
                                               "in %.0f s", self.address, why, delay)
            quiet = True
            self._stop.wait(delay)
            delay = min(delay * 2, self.max_backoff)

    def run_once(self) -> bool:
        """One probe and synchronous collection; True when containerd's walk of this daemon went through."""
        probe = f"probe-{secrets.token_hex(6)}"
        before = self._ids()
        with Containerd(self.address, NAMESPACE, timeout=self.timeout) as c:
            expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 600))
            # expiring: should this daemon die half-way, containerd collects the lease and the probe anyway
            c.leases.Create(lpb.CreateRequest(id=probe, labels={"containerd.io/gc.expire": expire}),
                            metadata=c.md(), timeout=self.timeout)
            try:
                c.lease = probe
                c.prepare(self.snapshotter, probe, "", {})
                c.lease = None
                arrived = self._recorded(probe)
            finally:
                c.lease = None
                # synchronous: returns once the collector removed the probe, walked this snapshotter and called
                # its Cleanup
                c.leases.Delete(lpb.DeleteRequest(id=probe, sync=True), metadata=c.md(), timeout=self.timeout)
                with contextlib.suppress(grpc.RpcError):  # empty now, unless another daemon's probe is in it
                    ngrpc.NamespacesStub(c.channel).Delete(npb.DeleteNamespaceRequest(name=NAMESPACE),
                                                           timeout=self.timeout)
        if not arrived:
            raise NotThisDaemon(f"containerd's snapshotter {self.snapshotter!r} is not this daemon (a probe "
                                f"prepared through it did not arrive here); check containerd_snapshotter")
        if self._recorded(probe):
            return False
        gone = len(before - self._ids())
        log.info("start-up reconciliation with containerd: it collected %d snapshots of this daemon%s", gone,
                 " (removed while the daemon was down, or left by a crash)" if gone else "")
        return True

    def _recorded(self, probe: str) -> bool:
        # containerd names the backend snapshot <namespace>/<sequence>/<key>
        with self.core.store.read() as tx:
            return any(r.key.startswith(f"{NAMESPACE}/") and r.key.endswith(f"/{probe}") for r in tx.all(None))

    def _ids(self) -> set[int]:
        with self.core.store.read() as tx:
            return tx.ids()

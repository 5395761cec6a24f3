"""The gRPC adapter: ``containerd.services.snapshots.v1.Snapshots`` over :class:`snapshotter.overlay.Snapshotter`.

Translation only — request fields to core calls, core errors to the status codes containerd's proxy
expects (errdefs: NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT), records to ``Info``.
The namespace comes from the ``containerd-namespace`` metadata; a call without one (containerd's garbage
collector) sees every namespace.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2
from prometheus_client import Counter, Histogram

from protos.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from protos.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pbg
from protos.containerd.types import mount_pb2
from snapshotter import errors
from snapshotter.metastore import KIND_ACTIVE, KIND_COMMITTED, KIND_VIEW, Record
from snapshotter.overlay import Mount, Snapshotter

log = logging.getLogger("bootseer.snapshotter")
T = TypeVar("T")

RPC_CALLS = Counter("bootseer_snapshotter_grpc_calls_total", "Snapshots API calls", ["method", "code"])
RPC_SECONDS = Histogram("bootseer_snapshotter_grpc_seconds", "Snapshots API call latency", ["method"])

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
]
_KINDS = {KIND_VIEW: pb.VIEW, KIND_ACTIVE: pb.ACTIVE, KIND_COMMITTED: pb.COMMITTED}
LIST_BATCH = 100


def _ts(t_ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(t_ns)
    return ts


def to_info(rec: Record) -> pb.Info:
    return pb.Info(name=rec.key, parent=rec.parent, kind=_KINDS[rec.kind], created_at=_ts(rec.created_ns),
                   updated_at=_ts(rec.updated_ns), labels=rec.labels)


def to_mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def namespace(context: grpc.ServicerContext) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == "containerd-namespace":
            return str(v)
    return None


class SnapshotsService(pbg.SnapshotsServicer):
    def __init__(self, core: Snapshotter) -> None:
        self.core = core

    def _call(self, method: str, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        t0 = time.monotonic()
        code = "OK"
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s (namespace %r)", method, namespace(context))
        try:
            return fn()
        except errors.SnapshotError as e:
            status = next(c for cls, c in _CODES if isinstance(e, cls))
            code = status.name
            context.abort(status, str(e))
        except Exception as e:
            code = "UNKNOWN"
            log.exception("%s failed", method)
            context.abort(grpc.StatusCode.UNKNOWN, f"{method}: {e}")
        finally:
            RPC_CALLS.labels(method, code).inc()
            RPC_SECONDS.labels(method).observe(time.monotonic() - t0)
        raise AssertionError("unreachable")  # context.abort raises

    def _ns_write(self, context: grpc.ServicerContext) -> str:
        return namespace(context) or ""

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        ns = self._ns_write(context)
        mounts = self._call("Prepare", context, lambda: self.core.prepare(ns, request.key, request.parent,
                                                                          dict(request.labels)))
        return pb.PrepareSnapshotResponse(mounts=to_mounts(mounts))

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        ns = self._ns_write(context)
        mounts = self._call("View", context, lambda: self.core.view(ns, request.key, request.parent,
                                                                    dict(request.labels)))
        return pb.ViewSnapshotResponse(mounts=to_mounts(mounts))

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call("Mounts", context, lambda: self.core.mounts(namespace(context), request.key))
        return pb.MountsResponse(mounts=to_mounts(mounts))

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call("Commit", context, lambda: self.core.commit(namespace(context), request.name, request.key,
                                                               dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call("Remove", context, lambda: self.core.remove(namespace(context), request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        rec = self._call("Stat", context, lambda: self.core.stat(namespace(context), request.key))
        return pb.StatSnapshotResponse(info=to_info(rec))

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        rec = self._call("Update", context, lambda: self.core.update(
            namespace(context), request.info.name, dict(request.info.labels), paths))
        return pb.UpdateSnapshotResponse(info=to_info(rec))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        recs = self._call("List", context, lambda: self.core.walk(namespace(context), list(request.filters)))
        for i in range(0, len(recs), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[to_info(r) for r in recs[i : i + LIST_BATCH]])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        size, inodes = self._call("Usage", context, lambda: self.core.usage(namespace(context), request.key))
        return pb.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call("Cleanup", context, self.core.cleanup)
        return empty_pb2.Empty()

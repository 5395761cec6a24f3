"""A small typed client for the containerd services BootSeer drives directly: content, images, leases,
snapshots and diff.  ``bootseer pull`` and depsnap's containerd engine use it; the tests use it to look at
what containerd sees.

Namespaces and leases travel as gRPC metadata (``containerd-namespace``, ``containerd-lease``), exactly as
containerd's Go client sends them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from protos.containerd.services.content.v1 import content_pb2 as cpb
from protos.containerd.services.content.v1 import content_pb2_grpc as cgrpc
from protos.containerd.services.diff.v1 import diff_pb2 as dpb
from protos.containerd.services.diff.v1 import diff_pb2_grpc as dgrpc
from protos.containerd.services.images.v1 import images_pb2 as ipb
from protos.containerd.services.images.v1 import images_pb2_grpc as igrpc
from protos.containerd.services.leases.v1 import leases_pb2 as lpb
from protos.containerd.services.leases.v1 import leases_pb2_grpc as lgrpc
from protos.containerd.services.snapshots.v1 import snapshots_pb2 as spb
from protos.containerd.services.snapshots.v1 import snapshots_pb2_grpc as sgrpc
from protos.containerd.types import descriptor_pb2, mount_pb2

WRITE_CHUNK = 1 << 20
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"


def default_address() -> str:
    """containerd's socket (also its CRI endpoint) when ``--address`` is not given: env
    ``CONTAINER_RUNTIME_ENDPOINT`` (as for crictl), else the local stack's if ``bootseer stack up`` runs one,
    else :data:`DEFAULT_ADDRESS`.

    The local stack comes before the system socket because on a development machine the commands are mostly
    used against the stack, and a system containerd (if any) would silently answer instead.
    """
    env = os.environ.get("CONTAINER_RUNTIME_ENDPOINT")
    if env:
        return env
    from bootseer.localstack import local_stack_value

    sock = local_stack_value("containerd_socket")
    return sock if sock and os.path.exists(sock.removeprefix("unix://")) else DEFAULT_ADDRESS


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def proto(self) -> descriptor_pb2.Descriptor:
        return descriptor_pb2.Descriptor(media_type=self.media_type, digest=self.digest, size=self.size)


class Containerd:
    """Connection to one containerd (``address`` is its unix socket path) in one namespace."""

    def __init__(self, address: str, namespace: str = "default", timeout: float = 60.0) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}", options=[
            ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
        self.namespace = namespace
        self.timeout = timeout
        self.lease: str | None = None
        self.content = cgrpc.ContentStub(self.channel)
        self.images = igrpc.ImagesStub(self.channel)
        self.leases = lgrpc.LeasesStub(self.channel)
        self.snapshots = sgrpc.SnapshotsStub(self.channel)
        self.diff = dgrpc.DiffStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def md(self) -> list[tuple[str, str]]:
        out = [("containerd-namespace", self.namespace)]
        if self.lease:
            out.append(("containerd-lease", self.lease))
        return out

    # ------------------------------------------------------------------------------------------ leases
    @contextlib.contextmanager
    def leased(self, expire_s: int = 3600) -> Iterator[str]:
        """Hold a lease for the block so garbage collection leaves half-pulled content alone."""
        lid = f"bootseer-{secrets.token_hex(6)}"
        expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expire_s))
        self.leases.Create(lpb.CreateRequest(id=lid, labels={"containerd.io/gc.expire": expire}),
                           metadata=self.md(), timeout=self.timeout)
        prev, self.lease = self.lease, lid
        try:
            yield lid
        finally:
            self.lease = prev
            with contextlib.suppress(grpc.RpcError):
                self.leases.Delete(lpb.DeleteRequest(id=lid), metadata=self.md(), timeout=self.timeout)

    # ----------------------------------------------------------------------------------------- content
    def content_exists(self, digest: str) -> bool:
        try:
            self.content.Info(cpb.InfoRequest(digest=digest), metadata=self.md(), timeout=self.timeout)
            return True
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise

    def write_content(self, ref: str, chunks: Iterator[bytes] | Sequence[bytes], total: int, expected: str,
                      labels: dict[str, str] | None = None) -> None:
        """Stream a blob into the content store; containerd verifies size and digest on commit."""

        def requests() -> Iterator[cpb.WriteContentRequest]:
            offset = 0
            for data in chunks:
                yield cpb.WriteContentRequest(action=cpb.WRITE, ref=ref, total=total, expected=expected,
                                              offset=offset, data=data)
                offset += len(data)
            yield cpb.WriteContentRequest(action=cpb.COMMIT, ref=ref, total=total, expected=expected,
                                          offset=offset, labels=labels or {})

        try:
            for _ in self.content.Write(requests(), metadata=self.md(), timeout=max(self.timeout, 600)):
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    def put_bytes(self, data: bytes, digest: str, labels: dict[str, str] | None = None) -> None:
        chunks = [data[i : i + WRITE_CHUNK] for i in range(0, len(data), WRITE_CHUNK)] or [b""]
        self.write_content(f"bootseer-{digest}", chunks, len(data), digest, labels)

    def set_content_labels(self, digest: str, labels: dict[str, str]) -> None:
        from google.protobuf import field_mask_pb2

        info = cpb.Info(digest=digest, labels=labels)
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        self.content.Update(cpb.UpdateRequest(info=info, update_mask=mask), metadata=self.md(), timeout=self.timeout)

    def read_content(self, digest: str) -> bytes:
        out = bytearray()
        for r in self.content.Read(cpb.ReadContentRequest(digest=digest), metadata=self.md(), timeout=self.timeout):
            out += r.data
        return bytes(out)

    # ------------------------------------------------------------------------------------------ images
    def put_image(self, name: str, target: Descriptor, labels: dict[str, str] | None = None) -> None:
        """Create the image record, or point an existing one at ``target``."""
        img = ipb.Image(name=name, target=target.proto(), labels=labels or {})
        try:
            self.images.Create(ipb.CreateImageRequest(image=img), metadata=self.md(), timeout=self.timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            self.images.Update(ipb.UpdateImageRequest(image=img), metadata=self.md(), timeout=self.timeout)

    def get_image(self, name: str) -> ipb.Image | None:
        try:
            image: ipb.Image = self.images.Get(ipb.GetImageRequest(name=name), metadata=self.md(),
                                               timeout=self.timeout).image
            return image
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def delete_image(self, name: str) -> None:
        with contextlib.suppress(grpc.RpcError):
            self.images.Delete(ipb.DeleteImageRequest(name=name, sync=True), metadata=self.md(), timeout=self.timeout)

    # --------------------------------------------------------------------------------------- snapshots
    def prepare(self, snapshotter: str, key: str, parent: str, labels: dict[str, str]) -> list[mount_pb2.Mount]:
        r = self.snapshots.Prepare(spb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent,
                                                              labels=labels), metadata=self.md(), timeout=self.timeout)
        return list(r.mounts)

    def commit(self, snapshotter: str, name: str, key: str, labels: dict[str, str]) -> None:
        self.snapshots.Commit(spb.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=labels),
                              metadata=self.md(), timeout=self.timeout)

    def stat(self, snapshotter: str, key: str) -> spb.Info | None:
        try:
            info: spb.Info = self.snapshots.Stat(spb.StatSnapshotRequest(snapshotter=snapshotter, key=key),
                                                 metadata=self.md(), timeout=self.timeout).info
            return info
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def remove(self, snapshotter: str, key: str) -> None:
        with contextlib.suppress(grpc.RpcError):
            self.snapshots.Remove(spb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key), metadata=self.md(),
                                  timeout=self.timeout)

    # -------------------------------------------------------------------------------------------- diff
    def apply(self, layer: Descriptor, mounts: list[mount_pb2.Mount]) -> Descriptor:
        """Apply a layer blob (already in the content store) onto ``mounts``; returns the diff descriptor."""
        r = self.diff.Apply(dpb.ApplyRequest(diff=layer.proto(), mounts=mounts), metadata=self.md(),
                            timeout=max(self.timeout, 1800))
        return Descriptor(r.applied.media_type, r.applied.digest, r.applied.size)

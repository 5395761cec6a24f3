"""The CRI image-service proxy: where kubelet's pull secrets reach the lazy data path.

kubelet sends its image calls to ``--image-service-endpoint`` (``imageServiceEndpoint`` in its configuration
file) and its container calls to ``--container-runtime-endpoint``; pointing the first at this socket puts
BootSeer between kubelet and containerd for images only.  Every ``runtime.v1.ImageService`` call is forwarded
to containerd's CRI socket unchanged — the request's bytes as received, the answer's as containerd gave it,
status codes, metadata, deadline and cancellation included — so containerd still does every pull.  Only
``PullImage`` is also read: its ``AuthConfig`` goes to :class:`bootseer.pullsecrets.PullCredentials` before
the call is forwarded (containerd prepares the layers during the pull, and the snapshotter needs the
credentials for the index lookups and the first lazy reads right then) and is kept if containerd's pull
succeeds.  The store holds everything that matters; this module is only the gRPC adapter over it.

**Why inside the snapshotter daemon** (a ``[cri]`` table of its config), as stargz-snapshotter's CRI keychain
and nydus-snapshotter's CRI auth are, rather than a daemon of its own: the credentials are needed by that
process's registry client, so in-process they never cross another socket, file or process boundary but the
0600 file that keeps them across restarts; it is one unit to install, one state directory and one lifetime
(credentials cannot outlive or lag the daemon that uses them).  The cost: while the snapshotter restarts,
kubelet's image calls fail (``UNAVAILABLE``); kubelet retries pulls with back-off, and running containers are
not affected (their calls go to containerd directly).

Only the image service is proxied: kubelet sends nothing else here, and forwarding the runtime service too would
put every container start behind this daemon's lifetime.  Other methods answer ``UNIMPLEMENTED``.
"""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from bootseer.pullsecrets import PullAuth, PullCredentials
from protos.cri.runtime.v1 import api_pb2 as pb
from snapshotter.sockets import bind_private

log = logging.getLogger("bootseer.criproxy")

IMAGE_SERVICE = "/runtime.v1.ImageService/"
PULL_IMAGE = IMAGE_SERVICE + "PullImage"
MAX_MESSAGE = 64 << 20  # above kubelet's own CRI limit (16 MiB): a node's ListImages must never stop here
_HOP_HEADERS = ("user-agent", "grpc-")  # set by each gRPC hop itself
NO_DEADLINE = 10.0**8  # seconds: a remaining time beyond this means the caller set none


def _target(address: str) -> str:
    return address if address.startswith("unix:") else f"unix://{address}"


class ImageServiceProxy:
    """Serves ``runtime.v1.ImageService`` on ``socket`` (born 0600: kubelet runs as root), forwarding to
    containerd at ``upstream`` and feeding ``store`` from each ``PullImage``."""

    def __init__(self, socket: Path | str, upstream: str, store: PullCredentials, *, workers: int = 32) -> None:
        self.socket = Path(str(socket).removeprefix("unix://"))
        self.upstream = upstream
        self.store = store
        self._channel = grpc.insecure_channel(_target(upstream), options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)])
        # a pull holds its worker for as long as containerd pulls: kubelet may pull several images at once
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cri-proxy"),
                                   handlers=[_Handler(self)],
                                   options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                            ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.so_reuseport", 0)])

    def start(self) -> ImageServiceProxy:
        self.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)

        def bind(path: str) -> None:
            if self._server.add_insecure_port(f"unix://{path}") == 0:
                raise RuntimeError(f"cannot listen on {self.socket}")

        bind_private(self.socket, bind)
        self._server.start()
        log.info("CRI image service on %s, forwarded to %s", self.socket, self.upstream)
        return self

    def stop(self, grace: float = 5.0) -> None:
        self._server.stop(grace).wait()
        self._channel.close()
        if self.socket.is_socket():
            self.socket.unlink()

    # --------------------------------------------------------------------------------------- forwarding
    def forward(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Call ``method`` on containerd with the request's own bytes; its answer or its error, unchanged."""
        call = self._channel.unary_unary(method)  # no (de)serializers: bytes in, bytes out
        metadata = [(k, v) for k, v in context.invocation_metadata()
                    if not k.startswith(":") and not k.startswith(_HOP_HEADERS)]
        left = context.time_remaining()  # no deadline: a huge number, which as a timeout would wrap round
        future = call.future(request, timeout=left if left is not None and left < NO_DEADLINE else None,
                             metadata=metadata)
        context.add_callback(future.cancel)  # kubelet gave up: so does containerd's pull
        try:
            response: bytes = future.result()
        except grpc.FutureCancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "cancelled by the client")
        except grpc.RpcError as e:
            call_error: Any = e  # a grpc.Call too
            context.set_trailing_metadata(call_error.trailing_metadata() or ())
            context.abort(call_error.code(), call_error.details() or "")
        trailing = future.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(trailing)
        return response

    def pull(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """``PullImage``: its credentials are used from now on for the image, kept if containerd's pull works."""
        grant = None
        try:
            req = pb.PullImageRequest.FromString(request)
        except Exception:  # not ours to judge: containerd answers it
            req = None
        if req is not None and req.HasField("auth"):
            auth = PullAuth(**{f: getattr(req.auth, f) for f in PullAuth.FIELDS})
            grant = self.store.pull_started(req.image.image, auth)
        try:
            response = self.forward(PULL_IMAGE, request, context)
        except BaseException:
            self.store.pull_failed(grant)
            raise
        self.store.pull_succeeded(grant)
        return response


class _Handler(grpc.GenericRpcHandler):
    """Every ``runtime.v1.ImageService`` method, known to our protos or not (a newer kubelet's), as raw bytes."""

    def __init__(self, proxy: ImageServiceProxy) -> None:
        self.proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if not method.startswith(IMAGE_SERVICE):
            return None
        if method == PULL_IMAGE:
            return grpc.unary_unary_rpc_method_handler(self.proxy.pull)
        proxy = self.proxy
        return grpc.unary_unary_rpc_method_handler(lambda request, context: proxy.forward(method, request, context))

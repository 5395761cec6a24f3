"""A small typed client for the Kubernetes CRI (``runtime.v1``) over containerd's unix socket.

BootSeer has to start containers the way the kubelet does, because that is the path it accelerates: the
CRI plugin pulls with the CRI snapshotter labels that trigger lazy layers, and the recorder and the
benchmarks must measure exactly that start-up.  So instead of ``ctr`` (containerd's own client, another
code path) this module speaks CRI, like the kubelet and ``crictl``, with stubs generated from the
``runtime.v1`` subset in ``protos/cri``.

The high-level entry point is :func:`run_once` / :meth:`CRIClient.run`: pull if needed, run a host-network
pod sandbox with one container, wait for it to exit (polling ``ContainerStatus`` with a deadline, as the
kubelet's status loop does), read its log file, and always remove the container and the sandbox.

Container output is read from the file CRI writes (``PodSandboxConfig.log_directory`` +
``ContainerConfig.log_path``), one record per line: ``<RFC3339Nano> <stdout|stderr> <P|F> <content>``, where
``P`` marks a partial line (the container wrote no newline yet, or the line was longer than the runtime's
limit) to be joined with the following records of the same stream.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from bootseer.containerd import DEFAULT_ADDRESS
from protos.cri.runtime.v1 import api_pb2 as pb
from protos.cri.runtime.v1 import api_pb2_grpc as pb_grpc

CRI_API_VERSION = "v1"
POD_NAMESPACE = "bootseer"  # Kubernetes namespace in the pod metadata: tells our pods apart in `crictl pods`
LABEL = "io.bootseer.cri"  # label on every sandbox and container this module creates

_Resp = TypeVar("_Resp", bound=Message)


# ------------------------------------------------------------------------------------------------ errors
class CRIError(RuntimeError):
    """A CRI call failed.  Carries the RPC, the gRPC status code and the runtime's own message, because
    containerd's message (e.g. which registry answered what) is usually the only useful diagnosis."""

    def __init__(self, method: str, code: grpc.StatusCode | None, details: str, subject: str = "") -> None:
        self.method = method
        self.code = code
        self.details = details
        self.subject = subject
        what = f"{method}({subject})" if subject else method
        super().__init__(f"CRI {what} failed: {code.name if code else 'ERROR'}: {details}")


class ImagePullError(CRIError):
    """PullImage failed (unreachable registry, auth, bad reference...)."""


class ImageNotFound(ImagePullError):
    """The registry has no such repository, tag or digest."""


class ContainerTimeout(CRIError, TimeoutError):
    """The container did not exit within the deadline (it has been stopped by the time this is raised)."""


# ------------------------------------------------------------------------------------------------ values
@dataclass(frozen=True)
class RuntimeVersion:
    version: str  # CRI API version the runtime speaks for the kubelet ("0.1.0" for containerd)
    runtime_name: str  # "containerd"
    runtime_version: str  # e.g. "1.6.20~ds1"
    runtime_api_version: str  # "v1"


@dataclass(frozen=True)
class RegistryAuth:
    """Credentials for one pull, passed to the runtime as CRI ``AuthConfig`` (it never reaches a log here)."""

    username: str = ""
    password: str = ""
    auth: str = ""  # base64("user:password"), docker config.json style
    server_address: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def proto(self) -> pb.AuthConfig:
        return pb.AuthConfig(username=self.username, password=self.password, auth=self.auth,
                             server_address=self.server_address, identity_token=self.identity_token,
                             registry_token=self.registry_token)

    def __repr__(self) -> str:  # keep secrets out of tracebacks and logs
        return f"RegistryAuth(username={self.username!r}, server_address={self.server_address!r}, ...)"


@dataclass(frozen=True)
class ImageInfo:
    id: str  # the image config digest ("sha256:...")
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int

    @classmethod
    def of(cls, img: pb.Image) -> ImageInfo:
        return cls(img.id, tuple(img.repo_tags), tuple(img.repo_digests), img.size)


@dataclass(frozen=True)
class Sandbox:
    """A running pod sandbox; ``config`` is kept because CRI wants it again on every CreateContainer."""

    id: str
    config: pb.PodSandboxConfig

    @property
    def log_directory(self) -> str:
        return self.config.log_directory


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    state: str  # CONTAINER_CREATED | CONTAINER_RUNNING | CONTAINER_EXITED | CONTAINER_UNKNOWN
    exit_code: int
    reason: str  # "Completed", "Error", "OOMKilled"... once exited
    message: str
    log_path: str  # absolute path of the CRI log file ("" if the sandbox has no log directory)
    image_ref: str
    created_at_ns: int
    started_at_ns: int
    finished_at_ns: int

    @property
    def exited(self) -> bool:
        return self.state == "CONTAINER_EXITED"

    @classmethod
    def of(cls, st: pb.ContainerStatus) -> ContainerInfo:
        return cls(st.id, st.metadata.name, pb.ContainerState.Name(st.state), st.exit_code, st.reason,
                   st.message, st.log_path, st.image_ref, st.created_at, st.started_at, st.finished_at)


@dataclass(frozen=True)
class LogRecord:
    """One line of a CRI log file."""

    time: str  # RFC 3339 with nanoseconds, as the runtime wrote it
    stream: str  # "stdout" | "stderr"
    partial: bool  # True for "P": the content continues in the next record of the same stream
    content: bytes


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    reason: str
    container: ContainerInfo
    sandbox_id: str  # already removed when the result is returned; for logs and leak checks
    seconds: float  # from CreateContainer to the container's exit being seen

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode(errors="replace")


# --------------------------------------------------------------------------------------------- log files
def parse_cri_log(data: bytes) -> list[LogRecord]:
    """Parse the CRI log format (``<time> <stream> <P|F> <content>`` per line).

    A final line without a newline (the runtime was still writing it) is ignored rather than guessed at.
    Lines that don't match the format are kept as full stdout records, so nothing a container printed is lost.
    """
    out: list[LogRecord] = []
    lines = data.split(b"\n")
    for line in lines[:-1]:  # the last element is "" or an unterminated line
        parts = line.split(b" ", 3)
        if len(parts) >= 3 and parts[1] in (b"stdout", b"stderr") and parts[2] in (b"P", b"F"):
            content = parts[3] if len(parts) == 4 else b""
            out.append(LogRecord(parts[0].decode(), parts[1].decode(), parts[2] == b"P", content))
        else:
            out.append(LogRecord("", "stdout", False, line))
    return out


def join_stream(records: Iterable[LogRecord], stream: str = "stdout") -> bytes:
    """The bytes a container wrote to ``stream``: full records end with a newline, partial ones don't."""
    buf = bytearray()
    for r in records:
        if r.stream == stream:
            buf += r.content
            if not r.partial:
                buf += b"\n"
    return bytes(buf)


# ------------------------------------------------------------------------------------------------ client
class CRIClient:
    """Connection to one CRI endpoint (containerd's socket; the CRI plugin serves on the same socket)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = 60.0, pull_timeout: float = 1800.0) -> None:
        target = address if address.startswith("unix:") else f"unix://{address}"
        self.address = address
        self.timeout = timeout
        self.pull_timeout = pull_timeout
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 16 << 20)])
        self.runtime = pb_grpc.RuntimeServiceStub(self.channel)
        self.images = pb_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CRIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, rpc: Callable[..., _Resp], req: Message, *, timeout: float | None = None,
              subject: str = "", error: type[CRIError] = CRIError) -> _Resp:
        """Invoke one unary RPC; turn gRPC failures into :class:`CRIError` naming the call and its subject."""
        method = type(req).__name__.removesuffix("Request")
        try:
            return rpc(req, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
            raise error(method, code, details, subject) from None

    # ------------------------------------------------------------------------------------------ runtime
    def version(self) -> RuntimeVersion:
        r = self._call(self.runtime.Version, pb.VersionRequest(version=CRI_API_VERSION))
        return RuntimeVersion(r.version, r.runtime_name, r.runtime_version, r.runtime_api_version)

    def status(self) -> dict[str, bool]:
        """Runtime conditions, e.g. ``{"RuntimeReady": True, "NetworkReady": False}`` (no CNI is fine for
        host-network pods, which is all this module runs)."""
        r = self._call(self.runtime.Status, pb.StatusRequest())
        return {c.type: c.status for c in r.status.conditions}

    # ------------------------------------------------------------------------------------------- images
    def pull_image(self, image: str, auth: RegistryAuth | None = None, timeout: float | None = None) -> str:
        """Pull ``image`` through CRI (so the CRI snapshotter labels reach the snapshotter); return its image ref
        (the config digest).  Raises :class:`ImageNotFound` when the registry has no such image."""
        req = pb.PullImageRequest(image=pb.ImageSpec(image=image), auth=auth.proto() if auth else None)
        try:
            r = self._call(self.images.PullImage, req, timeout=timeout or self.pull_timeout, subject=image,
                           error=ImagePullError)
        except ImagePullError as e:
            if e.code == grpc.StatusCode.NOT_FOUND or "not found" in e.details.lower():
                raise ImageNotFound(e.method, e.code, e.details, image) from None
            raise
        return str(r.image_ref)

    def image_status(self, image: str) -> ImageInfo | None:
        """The image if the runtime has it, else None (CRI answers an absent image with an empty status)."""
        r = self._call(self.images.ImageStatus, pb.ImageStatusRequest(image=pb.ImageSpec(image=image)),
                       subject=image)
        return ImageInfo.of(r.image) if r.HasField("image") and r.image.id else None

    def list_images(self) -> list[ImageInfo]:
        r = self._call(self.images.ListImages, pb.ListImagesRequest())
        return [ImageInfo.of(i) for i in r.images]

    def remove_image(self, image: str) -> None:
        """Remove ``image`` (idempotent in CRI: an absent image is not an error)."""
        self._call(self.images.RemoveImage, pb.RemoveImageRequest(image=pb.ImageSpec(image=image)), subject=image)

    def image_fs_info(self) -> dict[str, int]:
        """Bytes used per image filesystem mount point (containerd: the snapshotter's root)."""
        r = self._call(self.images.ImageFsInfo, pb.ImageFsInfoRequest())
        return {f.fs_id.mountpoint: f.used_bytes.value for f in r.image_filesystems}

    # ------------------------------------------------------------------------------------------ sandboxes
    def run_pod_sandbox(self, name: str, log_directory: str | Path, *, labels: Mapping[str, str] | None = None,
                        annotations: Mapping[str, str] | None = None, runtime_handler: str = "",
                        timeout: float | None = None) -> Sandbox:
        """Start a pod sandbox in the node's network namespace.

        Host networking means the runtime needs no CNI plugin (the local stack has none) and the
        container reaches loopback services such as the local registry.  The log directory is created
        here, because CRI runtimes expect the kubelet to have made it.
        """
        Path(log_directory).mkdir(parents=True, exist_ok=True)
        ns = pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD)
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=secrets.token_hex(16), namespace=POD_NAMESPACE),
            log_directory=str(log_directory),
            labels={LABEL: "1", **(labels or {})},
            annotations=dict(annotations or {}),
            linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(namespace_options=ns)),
        )
        r = self._call(self.runtime.RunPodSandbox,
                       pb.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler),
                       timeout=timeout or self.pull_timeout, subject=name)  # may pull the sandbox image
        return Sandbox(r.pod_sandbox_id, config)

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self._call(self.runtime.StopPodSandbox, pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id),
                   subject=sandbox_id)

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self._call(self.runtime.RemovePodSandbox, pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                   subject=sandbox_id)

    def pod_sandbox_state(self, sandbox_id: str) -> str:
        """``SANDBOX_READY`` or ``SANDBOX_NOTREADY``."""
        r = self._call(self.runtime.PodSandboxStatus, pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id),
                       subject=sandbox_id)
        return str(pb.PodSandboxState.Name(r.status.state))

    def list_pod_sandboxes(self, labels: Mapping[str, str] | None = None) -> list[str]:
        """IDs of the sandboxes carrying all of ``labels`` (all sandboxes when None)."""
        flt = pb.PodSandboxFilter(label_selector=dict(labels)) if labels else None
        r = self._call(self.runtime.ListPodSandbox, pb.ListPodSandboxRequest(filter=flt))
        return [s.id for s in r.items]

    # ----------------------------------------------------------------------------------------- containers
    def create_container(self, sandbox: Sandbox, name: str, image: str, command: Sequence[str] = (),
                         args: Sequence[str] = (), *, env: Mapping[str, str] | None = None, working_dir: str = "",
                         labels: Mapping[str, str] | None = None, log_path: str | None = None) -> str:
        """Create (not start) a container from an image the runtime already has; return its ID.

        ``command`` replaces the image's entrypoint and ``args`` its cmd, as in a pod spec.  Its output goes
        to ``<sandbox log directory>/<log_path>`` (default ``<name>.log``).
        """
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name),
            image=pb.ImageSpec(image=image),
            command=list(command),
            args=list(args),
            working_dir=working_dir,
            envs=[pb.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            labels={LABEL: "1", **(labels or {})},
            log_path=log_path if log_path is not None else f"{name}.log",
            linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD))),
        )
        r = self._call(self.runtime.CreateContainer, pb.CreateContainerRequest(
            pod_sandbox_id=sandbox.id, config=config, sandbox_config=sandbox.config), subject=f"{name} {image}")
        return str(r.container_id)

    def start_container(self, container_id: str) -> None:
        self._call(self.runtime.StartContainer, pb.StartContainerRequest(container_id=container_id),
                   subject=container_id)

    def stop_container(self, container_id: str, grace_s: int = 0) -> None:
        """Stop with SIGTERM, SIGKILL after ``grace_s`` seconds (0: kill at once).  Idempotent."""
        self._call(self.runtime.StopContainer, pb.StopContainerRequest(container_id=container_id, timeout=grace_s),
                   timeout=self.timeout + grace_s, subject=container_id)

    def remove_container(self, container_id: str) -> None:
        """Remove (killing it if it runs).  Idempotent."""
        self._call(self.runtime.RemoveContainer, pb.RemoveContainerRequest(container_id=container_id),
                   subject=container_id)

    def container_status(self, container_id: str) -> ContainerInfo:
        r = self._call(self.runtime.ContainerStatus, pb.ContainerStatusRequest(container_id=container_id),
                       subject=container_id)
        return ContainerInfo.of(r.status)

    def list_containers(self, sandbox_id: str = "", labels: Mapping[str, str] | None = None) -> list[ContainerInfo]:
        flt = pb.ContainerFilter(pod_sandbox_id=sandbox_id, label_selector=dict(labels or {}))
        r = self._call(self.runtime.ListContainers, pb.ListContainersRequest(filter=flt))
        return [ContainerInfo(c.id, c.metadata.name, pb.ContainerState.Name(c.state), 0, "", "", "", c.image_ref,
                              c.created_at, 0, 0) for c in r.containers]

    def wait_container(self, container_id: str, timeout: float,
                       until: Callable[[ContainerInfo], bool] | None = None) -> ContainerInfo:
        """Poll ContainerStatus until the container has exited (or ``until(status)`` holds); return the status.

        CRI has no "wait" RPC: the kubelet polls too.  The interval grows from 10 ms to 200 ms, so a short
        container is seen exiting within milliseconds and a long one costs a few calls a second.  On the
        deadline the container is stopped and :class:`ContainerTimeout` raised.
        """
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            st = self.container_status(container_id)
            if st.exited or (until is not None and until(st)):
                return st
            if st.state == "CONTAINER_UNKNOWN" and st.finished_at_ns:
                return st
            if time.monotonic() >= deadline:
                with contextlib.suppress(CRIError):
                    self.stop_container(container_id)
                raise ContainerTimeout("wait", grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"container still {st.state} after {timeout:g}s; stopped it", container_id)
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))  # polling with a deadline
            delay = min(delay * 2, 0.2)

    def container_logs(self, container_id: str) -> list[LogRecord]:
        """The records of the container's CRI log file so far (empty if it wrote nothing yet)."""
        path = self.container_status(container_id).log_path
        return read_log(path)

    def exec_sync(self, container_id: str, cmd: Sequence[str], timeout_s: int = 60) -> tuple[int, bytes, bytes]:
        """Run ``cmd`` in a running container; return (exit code, stdout, stderr)."""
        r = self._call(self.runtime.ExecSync, pb.ExecSyncRequest(container_id=container_id, cmd=list(cmd),
                                                                  timeout=timeout_s),
                       timeout=self.timeout + timeout_s, subject=container_id)
        return r.exit_code, r.stdout, r.stderr

    # ---------------------------------------------------------------------------------------- high level
    def ensure_image(self, image: str, auth: RegistryAuth | None = None, always: bool = False) -> str:
        """Pull ``image`` unless the runtime has it already (``always``: pull anyway); return its image ID."""
        if not always:
            have = self.image_status(image)
            if have is not None:
                return have.id
        return self.pull_image(image, auth)

    @contextlib.contextmanager
    def sandbox(self, name: str = "", log_root: str | Path | None = None) -> Iterator[Sandbox]:
        """A host-network sandbox with its own log directory for the block; both removed afterwards even if
        the block fails, so repeated runs leave no pods, shims or log files behind."""
        name = name or f"bootseer-{secrets.token_hex(4)}"
        logdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=log_root))
        sb: Sandbox | None = None
        try:
            sb = self.run_pod_sandbox(name, logdir)
            yield sb
        finally:
            try:
                if sb is not None:
                    self.cleanup_sandbox(sb.id)
            finally:
                shutil.rmtree(logdir, ignore_errors=True)

    def cleanup_sandbox(self, sandbox_id: str) -> None:
        """Remove every container of the sandbox, then stop and remove it; tolerates pieces already gone."""
        errors: list[CRIError] = []
        with contextlib.suppress(CRIError):
            for c in self.list_containers(sandbox_id=sandbox_id):
                try:
                    self.stop_container(c.id)
                    self.remove_container(c.id)
                except CRIError as e:
                    errors.append(e)
        for step in (self.stop_pod_sandbox, self.remove_pod_sandbox):
            try:
                step(sandbox_id)
            except CRIError as e:
                if e.code != grpc.StatusCode.NOT_FOUND:
                    errors.append(e)
        if errors:
            raise errors[0]

    def run(self, image: str, command: Sequence[str], timeout: float = 60.0, *, args: Sequence[str] = (),
            env: Mapping[str, str] | None = None, auth: RegistryAuth | None = None, pull: bool = True,
            log_root: str | Path | None = None) -> RunResult:
        """Run ``command`` in ``image`` once, as a pod would, and return its exit code and output.

        Pulls the image if the runtime lacks it (``pull=False``: fail instead), runs it in a fresh host-network
        sandbox, waits up to ``timeout`` seconds for it to exit, reads its log, and removes the container, the
        sandbox and the log directory whatever happens.
        """
        if pull:
            self.ensure_image(image, auth)
        with self.sandbox(log_root=log_root) as sb:
            t0 = time.monotonic()
            cid = self.create_container(sb, "main", image, command, args, env=env)
            self.start_container(cid)
            st = self.wait_container(cid, timeout)
            seconds = time.monotonic() - t0
            records = read_log(st.log_path)
            return RunResult(st.exit_code, join_stream(records, "stdout"), join_stream(records, "stderr"),
                             st.reason, st, sb.id, seconds)


def read_log(path: str | os.PathLike[str]) -> list[LogRecord]:
    """Parse the CRI log file at ``path`` (no file yet: no records)."""
    if not path:
        return []
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return parse_cri_log(data)


def run_once(image: str, command: Sequence[str], timeout: float = 60.0, *, address: str = DEFAULT_ADDRESS,
             **kwargs: Any) -> tuple[int, str]:
    """Run ``command`` in ``image`` through the CRI at ``address``; return (exit code, stdout text).

    The one-call form of :meth:`CRIClient.run` for scripts and tests; everything it creates is removed.
    """
    with CRIClient(address) as cri:
        r = cri.run(image, command, timeout, **kwargs)
        return r.exit_code, r.stdout_text

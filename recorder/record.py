"""``bootseer record``: run an image once on the lazy path and keep what its start-up read.

The steps, and why each is there:

1. **Resolve** the image (the platform manifest — the digest containerd's ``Prepare`` labels carry) and its
   BootSeer index: only layers with an EROFS blob are served through FUSE, so only those can be recorded.
2. **Check the node.**  The snapshotter's control socket must answer; a layer of the image that another
   container keeps mounted *and already swapped* to its local file no longer sends reads through FUSE,
   so a recording would miss them: refused, naming the snapshots that hold them and how to release them
   (usually the image's own committed snapshots from an earlier pull: ``ctr -n NS image rm IMAGE``).
3. **Record.**  ``record_start`` on the snapshotter (a JSON-lines log of every FUSE read of the image's blobs;
   while it runs no layer leaves FUSE).  FUSE serves the blob files with direct I/O, so the only cache
   that could hide a read is the erofs mounts' page cache: fresh mounts start empty, and if a layer was
   already mounted the page cache is dropped.
4. **Pull** the image with lazy layers into a private containerd namespace (``bootseer pull``: the
   ``Prepare`` of each layer mounts it — its superblock reads are the first recorded accesses) and **run**
   the command with ``ctr run``, watching its output for the ready line, until it exits, prints the ready
   line, or the time limit passes; then kill it.
5. **Clean up** the container, the image and the namespace (containerd's GC removes the snapshots, which
   releases the layers), stop the recording, **build** the manifest (:func:`bootseer.hotblocks.build`).
   With ``--runs N`` steps 2–5 repeat and the union is kept: the first run reads every chunk from the
   registry, later ones — like every prefetched start — from local chunks, and the kernel's read-ahead
   then reaches a few chunks further (docs/bench/design-measurements.md).
6. ``--merge`` it with the newest manifest in the registry, and **push** it as a referrer of the image
   manifest.

Exit codes (:class:`RecordError.code`) are meant for CI pipelines: see :data:`EXIT_CODES`.
"""

from __future__ import annotations

import contextlib
import queue
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootseer import hotblocks
from bootseer.accesslog import read_access_log
from bootseer.hotblocks import BadManifest, BlobInfo, HotBlockManifest, build, merge
from bootseer.testkit import drop_caches

EXIT_OK = 0
EXIT_ERROR = 1  # unexpected failure
EXIT_USAGE = 2  # bad arguments (typer's own code)
EXIT_IMAGE = 3  # the image cannot be resolved, or has no BootSeer index / no lazy layer
EXIT_NODE = 4  # containerd, the snapshotter's control socket or its lazy layers are not usable for a recording
EXIT_COMMAND = 5  # the command failed: exited non-zero, or the ready line never came
EXIT_EMPTY = 6  # no read of the image's lazy layers reached FUSE
EXIT_PUSH = 7  # the manifest could not be pushed
EXIT_CODES = {EXIT_OK: "recorded and pushed", EXIT_ERROR: "unexpected error", EXIT_USAGE: "bad arguments",
              EXIT_IMAGE: "image not found, or without a BootSeer index / lazy layers",
              EXIT_NODE: "containerd or the snapshotter not usable for a recording",
              EXIT_COMMAND: "the command failed (non-zero exit, or no ready line before the time limit)",
              EXIT_EMPTY: "nothing recorded", EXIT_PUSH: "pushing the manifest failed"}

Progress = Callable[[str], None]


class RecordError(RuntimeError):
    def __init__(self, code: int, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.result = result or {}


@dataclass
class RecordOptions:
    image: str
    command: list[str] = field(default_factory=list)  # empty: the image's own entrypoint/cmd
    ready_line: str | None = None
    timeout: float = 300.0
    env: list[str] = field(default_factory=list)
    merge: bool = False
    push: bool = True
    output: Path | None = None  # also write the Parquet file here
    address: str = "/run/containerd/containerd.sock"
    control: str = "/run/bootseer/snapshotter.sock.ctl"
    snapshotter: str = "bootseer"
    hosts_dir: str | None = None
    plain_http: bool = False
    platform: str | None = None
    drop_caches: bool = True
    runs: int = 1  # record this many runs and push their union (later runs read from local chunks)
    echo: bool = True  # forward the command's output to the progress sink


@dataclass
class RunOutcome:
    stop: str  # "exit", "ready" or "timeout"
    exit_code: int | None
    seconds: float
    lines: int


def drop_page_cache() -> None:
    """Write back, then drop clean pages, dentries and inodes (what a cold start sees); a recording that
    cannot start cold must not pretend to."""
    if not drop_caches():
        raise PermissionError("cannot drop the page cache (/proc/sys/vm/drop_caches): record as root")


def run_until(argv: Sequence[str], *, ready: re.Pattern[str] | None, timeout: float,
              on_line: Callable[[str, str], None] | None = None, stop: Callable[[], None] | None = None) -> RunOutcome:
    """Run ``argv``; return when it exits, prints a line matching ``ready`` (stdout or stderr), or after
    ``timeout`` seconds — then ``stop()`` is called (it should make the process exit) and the process is
    waited for (killed if ``stop`` did not end it)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", bufsize=1)
    events: queue.Queue[tuple[str, str]] = queue.Queue()
    counted = [0]

    def pump(stream: Any, name: str) -> None:
        for line in stream:
            counted[0] += 1
            events.put((name, line.rstrip("\n")))
        events.put(("eof", name))

    threads = [threading.Thread(target=pump, args=(proc.stdout, "stdout"), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True)]
    for t in threads:
        t.start()
    eofs = 0
    stop_reason = "exit"
    deadline = t0 + timeout
    while eofs < 2:
        left = deadline - time.monotonic()
        if left <= 0:
            stop_reason = "timeout"
            break
        try:
            name, line = events.get(timeout=left)
        except queue.Empty:
            continue
        if name == "eof":
            eofs += 1
            continue
        if on_line is not None and line:
            on_line(name, line)
        if ready is not None and line and ready.search(line):
            stop_reason = "ready"
            break
    code: int | None = None
    if stop_reason != "exit":
        if stop is not None:
            with contextlib.suppress(Exception):
                stop()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    else:
        code = proc.wait()
    for t in threads:
        t.join(5)
    return RunOutcome(stop_reason, code, time.monotonic() - t0, counted[0])


def swapped_message(image: str, layers: list[dict[str, Any]], namespaces: list[str]) -> str:
    """Why a recording is refused when layers of the image are held and already local, and how to clear it.

    What holds a layer is a snapshot: a running container's, or — the usual case after an ordinary
    ``bootseer pull`` and ``ctr run`` — the image's own committed layer snapshots, which stay until the image
    is removed.  ``namespaces``: the containerd namespaces that have ``image`` (where to remove it)."""
    owners = sorted({o.split("/", 1)[-1] for x in layers for o in x.get("owners", [])})
    shown = ", ".join(o[:19] for o in owners[:4]) + (f" and {len(owners) - 4} more" if len(owners) > 4 else "")
    where = "; ".join(f"ctr -n {ns} image rm {image}" for ns in namespaces) or f"ctr -n NAMESPACE image rm {image}"
    pulled = (f"{image} is pulled in namespace(s) {', '.join(namespaces)}: its committed snapshots hold them"
              if namespaces else "they are held by an image with these layers or a container using them")
    return ("layer blob(s) " + ", ".join(x["digest"][:19] for x in layers) + " are already local (swapped off "
            f"FUSE), so their reads would not be seen; {pulled} (snapshot(s) {shown or 'unknown'}). Release them: "
            f"{where} (containerd then deletes the snapshots), after stopping any container of it; then record "
            "again. Or record on another node")


def namespaces_with_image(address: str, image: str) -> list[str]:
    """The containerd namespaces that have ``image`` (best effort: [] when ctr cannot tell)."""
    def ctr(*args: str) -> list[str]:
        try:
            proc = subprocess.run(["ctr", "-a", address, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return []
        return proc.stdout.split() if proc.returncode == 0 else []

    return [ns for ns in ctr("namespaces", "ls", "-q") if image in ctr("-n", ns, "images", "ls", "-q")]


class Recorder:
    """One recording (see the module doc); :meth:`run` returns the result document or raises RecordError."""

    def __init__(self, opts: RecordOptions, progress: Progress | None = None) -> None:
        self.opts = opts
        self.progress = progress or (lambda msg: None)
        self.ready = re.compile(opts.ready_line) if opts.ready_line else None

    # ------------------------------------------------------------------------------------------ steps
    def resolve(self) -> tuple[Any, Any, Any, dict[str, BlobInfo]]:
        from bootseer.index import BadIndex, find_index
        from bootseer.reference import Reference
        from bootseer.registry import Platform, RegistryClient, RegistryError

        o = self.opts
        client = RegistryClient(hosts_dir=o.hosts_dir, plain_http=o.plain_http)
        try:
            ref = Reference.parse(o.image)
            manifest, _ = client.resolve_image(ref, Platform.parse(o.platform) if o.platform else None)
            found = find_index(client, ref, manifest.digest)
        except (ValueError, BadIndex, RegistryError) as e:
            raise RecordError(EXIT_IMAGE, f"{o.image}: {e}") from e
        if found is None:
            raise RecordError(EXIT_IMAGE, f"{o.image} ({manifest.digest}) has no BootSeer index: nothing is lazy "
                              "to record (is the registry sidecar converting it? `bootseer convert` does it by hand)")
        index = found[1]
        blobs: dict[str, BlobInfo] = {}
        for desc in manifest.layers:  # image order
            lb = index.layers.get(desc.digest)
            if lb is not None:
                blobs.setdefault(lb.blob.digest, BlobInfo(desc.digest, lb.blob.size, lb.chunk_size))
        if not blobs:
            raise RecordError(EXIT_IMAGE, f"{o.image}: its index has no EROFS blob for any layer")
        return client, ref, manifest, blobs

    def check_node(self, blobs: dict[str, BlobInfo]) -> tuple[Any, bool]:
        """The control client, and whether any of the blobs is already mounted (page cache to drop)."""
        from bootseer.control import Control, ControlError

        o = self.opts
        if not Path(o.control).exists():
            raise RecordError(EXIT_NODE, f"no snapshotter control socket at {o.control} (is the snapshotter "
                              "running with remote_snapshots = true?)")
        ctl = Control(o.control, timeout=60)
        try:
            layers = ctl.call("status")["layers"]
        except (OSError, ControlError) as e:
            raise RecordError(EXIT_NODE, f"snapshotter control socket {o.control}: {e}") from e
        swapped = [x for x in layers if x["digest"] in blobs and x.get("mounted") and x.get("swapped")]
        if swapped:
            raise RecordError(EXIT_NODE, swapped_message(o.image, swapped, namespaces_with_image(o.address, o.image)))
        mounted = any(x["digest"] in blobs and x.get("mounted") for x in layers)
        return ctl, mounted

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        o = self.opts
        self.progress(f"resolving {o.image}")
        client, ref, manifest, blobs = self.resolve()
        self.progress(f"{manifest.digest[:19]}: {len(blobs)} lazy layer(s), "
                      f"{sum(b.size for b in blobs.values()) / 2**20:.1f} MiB of EROFS blobs")
        result: dict[str, Any] = {"image": o.image, "manifest": manifest.digest, "artifact": None, "merged": False,
                                  "runs": []}
        recordings: list[HotBlockManifest] = []
        for k in range(o.runs):
            if o.runs > 1:
                self.progress(f"recording {k + 1}/{o.runs}")
            outcome, accesses, logged = self._record_once(client, blobs)
            run = {"stop": outcome.stop, "exit_code": outcome.exit_code, "run_seconds": round(outcome.seconds, 3),
                   "reads": len(accesses), "logged": logged}
            result["runs"].append(run)
            result.update(run)  # the last run's, at the top level
            failed = (outcome.stop == "exit" and outcome.exit_code != 0) or \
                (outcome.stop == "timeout" and self.ready is not None)
            if failed:
                why = (f"the command exited with code {outcome.exit_code}" if outcome.stop == "exit" else
                       f"no line matched {o.ready_line!r} within {o.timeout:g}s")
                raise RecordError(EXIT_COMMAND, f"{why}; nothing pushed", result)
            if not accesses:
                raise RecordError(EXIT_EMPTY, "no read of the image's lazy layers reached FUSE; nothing pushed",
                                  result)
            recordings.append(build(manifest.digest, blobs, accesses, command=o.command or ["<image default>"]))
        hb = merge(*recordings) if len(recordings) > 1 else recordings[0]
        if o.merge:
            hb, merged = self._merge(client, ref, manifest, blobs, hb)
            result["merged"] = merged
        result["summary"] = hb.summary()
        if o.output is not None:
            o.output.write_bytes(hb.to_parquet())
            result["output"] = str(o.output)
        if o.push:
            from bootseer.registry import Descriptor, RegistryError

            subject = Descriptor(manifest.media_type, manifest.digest, len(manifest.raw))
            try:
                result["artifact"] = hotblocks.push(client, ref, subject, hb)
            except (RegistryError, OSError) as e:
                raise RecordError(EXIT_PUSH, f"pushing the hot-block manifest: {e}", result) from e
            self.progress(f"pushed hot-block manifest {result['artifact'][:19]} (referrer of {manifest.digest[:19]})")
        return result

    def _record_once(self, client: Any, blobs: dict[str, BlobInfo]) -> tuple[RunOutcome, list[Any], int]:
        """One run under a FUSE recording: (how it ended, the image's accesses, records the daemon logged)."""
        o = self.opts
        ctl, mounted = self.check_node(blobs)
        tmp = Path(tempfile.mkdtemp(prefix="bootseer-record-"))
        ns = f"bootseer-record-{secrets.token_hex(4)}"
        name = f"rec-{secrets.token_hex(4)}"
        rec_id: str | None = None
        try:
            log_path = tmp / "access.jsonl"
            rec_id = str(ctl.call("record_start", path=str(log_path), digests=sorted(blobs), hold_swap=True)["id"])
            if mounted and o.drop_caches:
                self.progress("a layer is already mounted: dropping the page cache for a cold run")
                drop_page_cache()
            self.progress(f"pulling {o.image} lazily into namespace {ns}")
            res = self._pull(client, ns)
            self.progress(f"pulled in {res.seconds:.2f}s")
            outcome = self._run(res.image, ns, name)
            self.progress(f"stopped at {outcome.stop} after {outcome.seconds:.1f}s"
                          + (f" (exit code {outcome.exit_code})" if outcome.exit_code is not None else ""))
            stopped = ctl.call("record_stop", id=rec_id)
            rec_id = None
            return outcome, read_access_log(str(log_path), blobs), int(stopped.get("records", 0))
        finally:
            if rec_id is not None:
                with contextlib.suppress(Exception):
                    ctl.call("record_stop", id=rec_id)
            self._cleanup(ns, name)
            shutil.rmtree(tmp, ignore_errors=True)

    def _merge(self, client: Any, ref: Any, manifest: Any, blobs: dict[str, BlobInfo],
               hb: HotBlockManifest) -> tuple[HotBlockManifest, bool]:
        index_blobs = {b.layer: d for d, b in blobs.items()}
        found = hotblocks.fetch(client, ref, manifest.digest, image_layers=[d.digest for d in manifest.layers],
                               index_blobs=index_blobs, index_sizes={d: b.size for d, b in blobs.items()})
        if found is None:
            self.progress("--merge: no usable hot-block manifest yet; pushing this recording alone")
            return hb, False
        try:
            out = merge(found.manifest, hb)
        except BadManifest as e:
            self.progress(f"--merge: the existing manifest {found.digest[:19]} cannot be merged ({e}); replaced")
            return hb, False
        self.progress(f"--merge: folded into {found.digest[:19]} ({found.manifest.recordings} recording(s))")
        return out, True

    def _pull(self, client: Any, ns: str) -> Any:
        from bootseer.pull import PullError, pull
        from bootseer.registry import RegistryError

        o = self.opts
        try:
            res = pull(o.image, address=o.address, namespace=ns, snapshotter=o.snapshotter, client=client,
                       platform=o.platform)
        except (PullError, RegistryError) as e:
            raise RecordError(EXIT_NODE, f"bootseer pull of {o.image}: {e}") from e
        except Exception as e:  # grpc errors: containerd unreachable, snapshotter not configured
            raise RecordError(EXIT_NODE, f"bootseer pull of {o.image} into {o.address}: {type(e).__name__}: "
                              f"{e}") from e
        if not any(lo.mode == "lazy" for lo in res.layers):
            modes = ", ".join(f"{lo.digest[:19]}={lo.mode}" for lo in res.layers)
            raise RecordError(EXIT_NODE, f"no layer of {o.image} was served lazily ({modes}): is containerd's "
                              f"snapshotter {o.snapshotter!r} BootSeer's, with remote snapshots on?")
        return res

    def _ctr(self, ns: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "-a", self.opts.address, "-n", ns, *args], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def _run(self, image: str, ns: str, name: str) -> RunOutcome:
        o = self.opts
        argv = ["ctr", "-a", o.address, "-n", ns, "run", "--snapshotter", o.snapshotter]
        for kv in o.env:
            argv += ["--env", kv]
        argv += [image, name, *o.command]
        self.progress("running " + (" ".join(o.command) if o.command else "the image's default command")
                      + (f" until a line matches {o.ready_line!r}" if o.ready_line else "")
                      + f" (time limit {o.timeout:g}s)")

        def on_line(stream: str, line: str) -> None:
            if o.echo:
                self.progress(f"  {stream[3:]}| {line}")

        def stop() -> None:
            self._ctr(ns, "tasks", "kill", "-s", "SIGKILL", name, timeout=30)

        try:
            return run_until(argv, ready=self.ready, timeout=o.timeout, on_line=on_line, stop=stop)
        except FileNotFoundError as e:
            raise RecordError(EXIT_NODE, "ctr (containerd's client) is not installed") from e

    def _cleanup(self, ns: str, name: str) -> None:
        """Container, image record, namespace; removing the image lets containerd's GC remove the snapshots,
        which releases the lazy layers (their caches stay, evictable)."""
        with contextlib.suppress(Exception):
            self._ctr(ns, "tasks", "kill", "-s", "SIGKILL", name, timeout=30)
            self._ctr(ns, "tasks", "delete", "-f", name, timeout=60)
            self._ctr(ns, "containers", "rm", name, timeout=60)
        with contextlib.suppress(Exception):
            for img in self._ctr(ns, "images", "ls", "-q").stdout.split():
                self._ctr(ns, "images", "rm", "--sync", img, timeout=120)
            self._ctr(ns, "namespaces", "rm", ns, timeout=30)

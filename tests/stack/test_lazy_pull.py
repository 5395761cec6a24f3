"""Lazy pull on the local stack, end to end: containerd 1.6 with BootSeer's snapshotter as the CRI snapshotter
(``disable_snapshot_annotations = false``), the registry, and the sidecar converting each pushed image to
EROFS blobs + an index.  The realistic image (Debian + python3 + numpy + torch) runs
``python3 -c "import torch; print(torch.ones(2).sum())"``:

* through the CRI path (PullImage, sandbox, container — what the kubelet does), and through
  ``bootseer pull`` + ``ctr run --snapshotter bootseer``, each from a cold cache with background fill paused,
  so the bytes the registry served are the container's own demand (the figure is printed);
* with one chunk of the torch layer's blob corrupted in the registry's storage: reading that file is EIO,
  everything else works;
* with the snapshotter SIGKILLed after its layers were swapped to local files (the container finishes), and
  before the swap, then restarted (the container's reads resume);
* with the registry stopped after the pull (the start fails within the configured timeout, with EIO) and
  working again once it is back;
* and ``stack down`` leaves no mount, loop device or FUSE session behind.

One stack for the module (converting the realistic image takes ~40 s); each test starts from a cold cache
(its images removed, containerd's GC releasing the remote snapshots, the caches evicted) and its own
containerd namespace.  Containers wait on a file the test creates before they read the image, so the
daemon is killed at a known point without sleeping."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from bootseer.control import Control
from bootseer.cri import CRIClient
from bootseer.index import DEFAULT_CHUNK_SIZE, LayerBlob
from integration import images
from integration.stack import Stack, StackConfig, loops_below, mounts_below, running, wait_for
from tests.conftest import scratch_root

READ_TIMEOUT = 8.0
TORCH_LIB = f"{images.SITE}/torch/lib/libtorch_cpu.so"
WAIT_GO = "while [ ! -e /sig/go ]; do sleep 0.05; done"  # the container's side of the handshake


@dataclass
class Lazy:
    st: Stack
    cfg: StackConfig
    ref: str  # the realistic image
    layers: list[dict[str, Any]]  # its layers as pushed (digest, size)

    @property
    def control(self) -> Control:
        assert self.st.info.snapshotter_control
        return Control(self.st.info.snapshotter_control, timeout=120)

    @property
    def image_bytes(self) -> int:
        return sum(int(ly["size"]) for ly in self.layers)

    def status(self) -> list[dict[str, Any]]:
        return list(self.control.call("status")["layers"])

    def index_layers(self) -> list[LayerBlob]:
        """The realistic image's layer entries in the registry's index."""
        from bootseer.registry import RegistryClient
        from snapshotter.lazy.index_reader import IndexReader

        client = RegistryClient(hosts_dir=self.certs, plain_http=True)
        man, _ = client.resolve_image(self.ref)
        idx = IndexReader(client).image_index(self.ref, man.digest)
        assert idx is not None, "the sidecar did not index the image"
        return [idx.layers[ly["digest"]] for ly in self.layers]

    def blobs(self) -> list[str]:
        """Digests of the realistic image's EROFS blobs (what the snapshotter's status names)."""
        return [lb.blob.digest for lb in self.index_layers()]

    @property
    def certs(self) -> str:
        return str(Path(self.st.info.containerd_config).parent / "certs.d")

    def registry_log_size(self) -> int:
        return os.path.getsize(self.st.info.logs["registry"])

    def served_since(self, offset: int) -> int:
        """Bytes the registry sent since ``offset`` of its access log, to anyone but the converter (and
        the image push)."""
        with open(self.st.info.logs["registry"], "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        total = 0
        for m in re.finditer(r'"GET /v2/\S+ HTTP/[\d.]+" (\d{3}) (\d+) "[^"]*" "([^"]*)"', text):
            if m.group(1) in ("200", "206") and not m.group(3).startswith(("bootseer-sidecar", "skopeo")):
                total += int(m.group(2))
        return total

    def snapshotter_pid(self) -> int:
        return int(self.control.call("ping")["pid"])

    def restart_snapshotter(self) -> None:
        self.st.restart_snapshotter()

    def cold(self, *namespaces: str) -> None:
        """Forget the image everywhere: images removed (containerd's GC removes the remote snapshots, which
        releases the layers), then every unused cache evicted.  Background fill paused."""
        with CRIClient(self.st.info.containerd_socket) as cri:  # all its records (tag, digest, image id)
            cri.remove_image(self.ref)
        for ns in namespaces:
            for name in self.st.ctr("images", "ls", "-q", namespace=ns, check=False).stdout.split():
                self.st.ctr("images", "rm", "--sync", name, namespace=ns, check=False)
        self.control.call("set_fill", enabled=False)
        mine = set(self.blobs())
        still = [x["digest"] for x in self.status() if x["digest"] in mine and x.get("mounted")]
        log = Path(self.st.info.logs["snapshotter"]).read_text().splitlines()[-30:]
        assert still == [], f"layers still mounted after their images were removed: {still}\n" + "\n".join(log)
        self.control.call("evict", cap=0)  # (the unmounted erofs took its page cache with it: reads start cold)
        assert not mine & {x["digest"] for x in self.status()}


@pytest.fixture(scope="module")
def lazy() -> Iterator[Lazy]:
    cfg = StackConfig(root=scratch_root("lz"), cri_snapshotter="bootseer",
                      lazy_config={"fill": {"enabled": False},
                                   "fetch": {"read_timeout": READ_TIMEOUT, "io_timeout": 4.0,
                                             "connect_timeout": 2.0, "retries": 2}})
    with running(cfg) as st:
        ref = images.push_realistic(st.info.registry)
        img = images.build_realistic()
        assert st.info.sidecar_url, "the stack runs without the registry sidecar"

        def indexed() -> bool:
            jobs = requests.get(st.info.sidecar_url + "/jobs", timeout=5).json()
            done = [j for j in jobs if j["repo"] == "bootseer/realistic" and j["state"] == "done"]
            failed = [j for j in jobs if j["repo"] == "bootseer/realistic" and j["state"] == "failed"]
            assert not failed, failed
            return bool(done)

        t0 = time.monotonic()
        wait_for("conversion of the realistic image", indexed, 900)
        print(f"sidecar converted the realistic image in {time.monotonic() - t0:.1f}s")
        yield Lazy(st, cfg, ref, img.layers)


@pytest.fixture
def ns(lazy: Lazy) -> Iterator[str]:
    name = "bs-lz-" + secrets.token_hex(3)
    yield name
    for kind in ("tasks", "containers"):
        for item in lazy.st.ctr(kind, "ls", "-q", namespace=name, check=False).stdout.split():
            if kind == "tasks":
                lazy.st.ctr("tasks", "kill", "-s", "SIGKILL", item, namespace=name, check=False)
                lazy.st.ctr("tasks", "delete", "-f", item, namespace=name, check=False)
            else:
                lazy.st.ctr("containers", "rm", item, namespace=name, check=False)
    for item in lazy.st.ctr("images", "ls", "-q", namespace=name, check=False).stdout.split():
        lazy.st.ctr("images", "rm", "--sync", item, namespace=name, check=False)
    lazy.st.ctr("namespaces", "rm", name, check=False)


def bootseer_pull(lazy: Lazy, ns: str, ref: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bootseer.cli", "pull", "--json", "-a",
                          lazy.st.info.containerd_socket, "-n", ns, "--hosts-dir", lazy.certs, ref],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


class Container:
    """``ctr run --snapshotter bootseer`` in the background, with a host directory at /sig for the handshake
    (the container writes /sig/ready, then waits for /sig/go) and its output in /sig/out."""

    def __init__(self, lazy: Lazy, ns: str, script: str) -> None:
        self.sig = Path(tempfile.mkdtemp(prefix="bs-lz-sig-"))
        os.chmod(self.sig, 0o777)
        self.name = "c-" + secrets.token_hex(3)
        self.lazy, self.ns = lazy, ns
        argv = ["ctr", "-a", lazy.st.info.containerd_socket, "-n", ns, "run", "--snapshotter", "bootseer",
                "--mount", f"type=bind,src={self.sig},dst=/sig,options=rbind:rw", lazy.ref, self.name,
                "/bin/sh", "-c", f"touch /sig/ready; {WAIT_GO}; {script}"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_ready(self) -> None:
        wait_for("container ready", lambda: (self.sig / "ready").exists(), 120, None, None)

    def go(self) -> None:
        (self.sig / "go").touch()

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.lazy.st.ctr("tasks", "delete", "-f", self.name, namespace=self.ns, check=False)
        self.lazy.st.ctr("containers", "rm", self.name, namespace=self.ns, check=False)
        subprocess.run(["rm", "-rf", str(self.sig)], check=False)


@contextlib.contextmanager
def container(lazy: Lazy, ns: str, script: str) -> Iterator[Container]:
    c = Container(lazy, ns, script)
    try:
        yield c
    finally:
        c.close()


TORCH = 'python3 -c "import torch; print(torch.ones(2).sum())"'


# ---------------------------------------------------------------------------------------------------
def test_cri_path_runs_torch_reading_a_fraction_of_the_image(lazy: Lazy) -> None:
    lazy.cold()
    offset = lazy.registry_log_size()
    with CRIClient(lazy.st.info.containerd_socket) as cri:
        r = cri.run(lazy.ref, images.REALISTIC_CMD, timeout=300)
    assert (r.exit_code, r.stdout_text) == (0, images.REALISTIC_OUTPUT), r
    served = lazy.served_since(offset)
    blobs = lazy.blobs()
    layers = {x["digest"]: x for x in lazy.status()}
    assert all(layers[b]["mounted"] and not layers[b]["swapped"] for b in blobs)
    demand = sum(layers[b]["fetched"]["bytes"]["demand"] for b in blobs)
    assert sum(layers[b]["fetched"]["bytes"]["background"] for b in blobs) == 0
    erofs = sum(layers[b]["size"] for b in blobs)
    print(f"CRI path: registry served {served / 1e6:.1f} MB (lazy demand reads {demand / 1e6:.1f} MB) for an image "
          f"of {lazy.image_bytes / 1e6:.1f} MB as gzip layers, {erofs / 1e6:.1f} MB as EROFS blobs; "
          f"run took {r.seconds:.1f}s")
    # importing torch reads about a third of the unpacked image; what is not read is not fetched
    assert 0 < demand <= served < min(lazy.image_bytes, erofs // 2)


def test_bootseer_pull_then_ctr_run(lazy: Lazy, ns: str) -> None:
    lazy.cold(ns)
    offset = lazy.registry_log_size()
    res = bootseer_pull(lazy, ns, lazy.ref)
    assert res["lazy_layers"] == 3 and res["downloaded_bytes"] == 0, res
    out = lazy.st.ctr("run", "--rm", "--snapshotter", "bootseer", lazy.ref, "r-" + secrets.token_hex(3),
                      *images.REALISTIC_CMD, namespace=ns)
    assert out.stdout == images.REALISTIC_OUTPUT
    served = lazy.served_since(offset)
    erofs = sum(x["size"] for x in lazy.status() if x["digest"] in lazy.blobs())
    print(f"bootseer pull + ctr run: registry served {served / 1e6:.1f} MB for an image of "
          f"{lazy.image_bytes / 1e6:.1f} MB as gzip layers, {erofs / 1e6:.1f} MB as EROFS blobs; "
          f"pull took {res['seconds']:.2f}s")
    assert served < min(lazy.image_bytes, erofs // 2)
    st = subprocess.run([sys.executable, "-m", "bootseer.cli", "status", "--json", "--control",
                         str(lazy.st.info.snapshotter_control)], capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    rows = {r["digest"]: r for r in json.loads(st.stdout)["layers"]}
    for b in lazy.blobs():
        r = rows[b]
        assert r["mounted"] and not r["swapped"] and r["fetched"]["background"] == 0
        assert 0 < r["fetched"]["demand"] <= r["bytes_local"] <= r["size"]
    metrics = requests.get(f"http://{lazy.st.info.snapshotter_metrics}/metrics", timeout=10).text
    assert re.search(r'^bootseer_lazy_fetched_bytes_total\{kind="demand"\} [1-9]', metrics, re.M)
    assert "bootseer_lazy_fetch_seconds_bucket" in metrics and "bootseer_lazy_cache_hits_total" in metrics
    # containerd's metadata knows the snapshots (they are what kept the layers mounted for the run)
    info = lazy.st.ctr("snapshots", "--snapshotter", "bootseer", "ls", namespace=ns).stdout
    assert len([ln for ln in info.splitlines()[1:] if ln.strip()]) >= 3


def test_a_pull_hint_sets_the_layers_up_first_and_the_pull_takes_them_over(lazy: Lazy, ns: str) -> None:
    """`bootseer pull --control …` tells the snapshotter first: it resolves the image and sets every lazy layer
    up (held provisionally, prefetch started) before the pull's own Prepares come; they take the layers over,
    so no provisional hold is left.  A missing control socket only means no head start."""
    from bootseer.control import send_pull_hint

    lazy.cold(ns)
    assert not send_pull_hint("/nonexistent/snapshotter.sock.ctl", lazy.ref, None)
    ctl = str(lazy.st.info.snapshotter_control)
    assert send_pull_hint(ctl, lazy.ref, None)
    mine = set(lazy.blobs())

    def held_ahead() -> bool:
        rows = {x["digest"]: x for x in lazy.status()}
        return all(b in rows and rows[b]["mounted"] and any(o.startswith("ahead/") for o in rows[b]["owners"])
                   for b in mine)

    wait_for("the hinted layers to be set up ahead", held_ahead, 120)
    out = subprocess.run([sys.executable, "-m", "bootseer.cli", "pull", "--json", "-a",
                          lazy.st.info.containerd_socket, "-n", ns, "--hosts-dir", lazy.certs, "--control", ctl,
                          lazy.ref], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["lazy_layers"] == 3
    rows = {x["digest"]: x for x in lazy.status()}
    for b in mine:
        assert rows[b]["mounted"] and rows[b]["owners"], rows[b]
        assert not any(o.startswith("ahead/") for o in rows[b]["owners"]), rows[b]["owners"]


def _chunk_inside(blob: Path, rel: str, chunk_size: int) -> int:
    """A chunk of ``blob`` (an EROFS image) made only of bytes of file ``rel`` (FIEMAP through a local mount)."""
    mnt = Path(tempfile.mkdtemp(prefix="bs-lz-fiemap-"))
    try:
        subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(blob), str(mnt)], check=True)
        try:
            out = subprocess.run(["filefrag", "-e", "-b1", str(mnt / rel)], check=True, capture_output=True,
                                 text=True).stdout
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        mnt.rmdir()
    spans = sorted((int(a), int(b)) for a, b in re.findall(r"^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):", out,
                                                           re.M))
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    inside = [c for a, b in merged for c in range(-(-a // chunk_size), (b + 1) // chunk_size)]
    assert inside, f"no whole chunk inside {rel}"
    return inside[len(inside) // 2]


def test_corrupt_chunk_is_eio_for_that_file_only(lazy: Lazy, ns: str) -> None:
    """A chunk of torch's library damaged in the registry's storage (its zstd frame, index v3: the sidecar's
    default) is EIO for that file only."""
    from bootseer.index import fetch_node_blob
    from bootseer.registry import RegistryClient

    lazy.cold(ns)
    lb = lazy.index_layers()[2]  # torch's layer
    assert lb.chunk_size == DEFAULT_CHUNK_SIZE and lb.wire is not None
    node = Path(tempfile.mkdtemp(prefix="bs-lz-node-")) / "torch.erofs"
    try:  # the EROFS image itself is not in the registry: rebuilt from its frames, to find a chunk of the file
        with open(node, "wb") as fh:
            fetch_node_blob(RegistryClient(hosts_dir=lazy.certs, plain_http=True), lazy.ref, lb, fh)
        k = _chunk_inside(node, TORCH_LIB, lb.chunk_size)
    finally:
        subprocess.run(["rm", "-rf", str(node.parent)], check=False)
    digest = lb.fetched.digest
    data = Path(lazy.st.info.registry_storage) / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / \
        "data"
    at = lb.wire.offsets()[k] + lb.wire.frames[k] // 2  # inside frame k
    with open(data, "r+b") as f:
        f.seek(at)
        original = f.read(8)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in original))
    try:
        res = bootseer_pull(lazy, ns, lazy.ref)
        assert res["lazy_layers"] == 3
        script = (f"cat /{TORCH_LIB} > /dev/null; echo torch=$?; "
                  "python3 -c 'import numpy; print(numpy.ones(3).sum())'; sha256sum /usr/bin/python3.11")
        out = lazy.st.ctr("run", "--rm", "--snapshotter", "bootseer", lazy.ref, "x-" + secrets.token_hex(3),
                          "/bin/sh", "-c", script, namespace=ns, check=False)
        assert "torch=1" in out.stdout, out
        assert "Input/output error" in out.stderr, out.stderr
        assert "3.0" in out.stdout and "/usr/bin/python3.11" in out.stdout, out
        metrics = lazy.control.call("metrics")
        assert re.search(r"^bootseer_lazy_corrupt_chunks_total [1-9]", metrics, re.M), "corruption not counted"
        assert "failed verification" in Path(lazy.st.info.logs["snapshotter"]).read_text()
    finally:
        with open(data, "r+b") as f:
            f.seek(at)
            f.write(original)


def test_sigkill_after_swap_container_finishes(lazy: Lazy, ns: str) -> None:
    lazy.cold(ns)
    bootseer_pull(lazy, ns, lazy.ref)
    lazy.control.call("set_fill", enabled=True)
    for b in lazy.blobs():
        assert lazy.control.call("wait_swapped", digest=b, timeout=300)["swapped"], b
    with container(lazy, ns, f"{TORCH} > /sig/out") as c:
        c.wait_ready()
        pid = lazy.snapshotter_pid()
        os.kill(pid, signal.SIGKILL)
        try:
            c.go()
            code, _, err = c.finish()
            assert code == 0, err
            assert (c.sig / "out").read_text() == images.REALISTIC_OUTPUT
        finally:
            lazy.restart_snapshotter()
    outcomes = Path(lazy.st.info.logs["snapshotter"]).read_text()
    assert "swapped" in outcomes.split("restored lazy layers:")[-1]


def test_restart_before_swap_resumes_reads(lazy: Lazy, ns: str) -> None:
    lazy.cold(ns)
    bootseer_pull(lazy, ns, lazy.ref)
    with container(lazy, ns, f"{TORCH} > /sig/out") as c:
        c.wait_ready()
        os.kill(lazy.snapshotter_pid(), signal.SIGKILL)
        lazy.restart_snapshotter()
        layers = {x["digest"]: x for x in lazy.status()}
        assert all(layers[b]["mounted"] and not layers[b]["swapped"] for b in lazy.blobs())
        c.go()
        code, _, err = c.finish()
        assert code == 0, err
        assert (c.sig / "out").read_text() == images.REALISTIC_OUTPUT
    assert "re-attached" in Path(lazy.st.info.logs["snapshotter"]).read_text()


def test_registry_down_fails_within_the_timeout_then_works(lazy: Lazy, ns: str) -> None:
    lazy.cold(ns)
    bootseer_pull(lazy, ns, lazy.ref)
    registry = lazy.st.info.pids["registry"]
    os.kill(registry, signal.SIGSTOP)  # accepts connections (the kernel does) but never answers: the worst case
    try:
        t0 = time.monotonic()
        out = lazy.st.ctr("run", "--rm", "--snapshotter", "bootseer", lazy.ref, "d-" + secrets.token_hex(3),
                          "/usr/bin/python3", *images.REALISTIC_CMD[1:], namespace=ns, check=False)
        took = time.monotonic() - t0
    finally:
        os.kill(registry, signal.SIGCONT)
    print(f"registry down: the start failed after {took:.1f}s (read_timeout {READ_TIMEOUT}s): "
          f"{out.stderr.strip().splitlines()[-1:]}")
    assert out.returncode != 0 and "input/output error" in out.stderr.lower(), out
    assert took < 6 * READ_TIMEOUT  # one deadline per outage, not one per read (the slack is for a loaded machine)
    assert "failed (demand)" in Path(lazy.st.info.logs["snapshotter"]).read_text()

    def works() -> bool:
        r = lazy.st.ctr("run", "--rm", "--snapshotter", "bootseer", lazy.ref, "u-" + secrets.token_hex(3),
                        *images.REALISTIC_CMD, namespace=ns, check=False)
        return r.returncode == 0 and r.stdout == images.REALISTIC_OUTPUT

    wait_for("a start after the registry is back", works, 120, None, None)


def test_stack_down_leaves_no_mounts_loops_or_fuse(lazy: Lazy) -> None:
    with CRIClient(lazy.st.info.containerd_socket) as cri:  # something mounted lazily, in use until down
        assert cri.run(lazy.ref, images.REALISTIC_CMD, timeout=300).exit_code == 0
    assert any("/lazy/" in m for m in mounts_below(lazy.st.root))
    lazy.st.down()
    assert mounts_below(lazy.st.root) == [] and loops_below(lazy.st.root) == []
    fuse = [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
            if "fuse" in ln and str(lazy.st.root) in ln]
    assert fuse == []  # (the module fixture's own down afterwards is a no-op)

"""Build a dependency snapshot with containerd — what a GPU node has — through its API and BootSeer's snapshotter.

Steps, each on containerd's own services (:mod:`bootseer.containerd`), all under one lease so containerd's
garbage collector leaves half-done work alone:

1. **Base into containerd.**  The base image's blobs go into the content store (with the ``gc.ref`` labels
   containerd's own pull writes, so the image record keeps them alive) and its layers are unpacked into the
   snapshotter exactly as containerd's unpacker does: ``Prepare`` with ``containerd.io/snapshot.ref`` = the
   layer's chain ID plus the CRI image/layer labels, ``Diff.Apply``, ``Commit`` under the chain ID.  A layer
   the snapshotter can serve lazily answers ``ALREADY_EXISTS`` and is not downloaded; a layer already there
   (a node keeps its base images) costs one ``Stat``.
2. **An active snapshot** is ``Prepare``\\ d on top of the base's chain — the same overlay a job's container
   would get — and mounted on a scratch dir.
3. **The install runs in a container over it**, through containerd's runtime (runc under a v2 shim) with
   ``ctr run --rootfs``: containerd's tasks API is not among the services this project generates stubs for,
   and ``ctr run`` with an image would prepare its own snapshot, out of our hands.  ``ctr run`` without
   ``--net-host`` gives the container a fresh network namespace with nothing in it: the install has no
   network.  The base image's ``Env`` is applied; inputs are bind-mounted read-only.
4. The snapshot's **upper dir is the diff** (:mod:`depsnap.difftar`, deterministic), appended to the base
   (:mod:`depsnap.image`) and pushed under the key's tag — unless another builder pushed that tag meanwhile,
   in which case its image is the answer and nothing is pushed.

The active snapshot is removed whatever happens; a failed install pushes nothing and reports its log tail.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import grpc

from bootseer.containerd import Containerd, Descriptor
from depsnap import difftar, image
from depsnap.build import CONTEXT_MOUNT, WHEELS_MOUNT, BuildError, Result, install_env, resolve, snapshot_ref
from depsnap.key import DepSpec

log = logging.getLogger("bootseer.depsnap")
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
SNAPSHOT_REF = "containerd.io/snapshot.ref"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER = "containerd.io/snapshot/cri.layer-digest"


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: ``chain(0) = diff(0)``, ``chain(n) = sha256(chain(n-1) + " " + diff(n))``."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def _put_file(cd: Containerd, path: Path, desc: Descriptor, labels: dict[str, str]) -> None:
    if cd.content_exists(desc.digest):
        if labels:
            cd.set_content_labels(desc.digest, labels)
        return

    def chunks():  # type: ignore[no-untyped-def]
        with open(path, "rb") as fh:
            yield from iter(lambda: fh.read(1 << 20), b"")

    # a unique ref: two builders writing the same blob at once must not collide on containerd's ref lock
    cd.write_content(f"depsnap-{desc.digest}-{secrets.token_hex(4)}", chunks(), desc.size, desc.digest, labels)


def import_base(cd: Containerd, layout: image.Layout, name: str, snapshotter: str) -> tuple[str, dict[str, Any]]:
    """Put the ``base`` image of ``layout`` into containerd as ``name`` and unpack it into ``snapshotter``.

    Returns the chain ID of its top layer and its config."""
    manifest = layout.manifest_for("base")
    raw_manifest = json.dumps(manifest).encode()
    m_digest = "sha256:" + hashlib.sha256(raw_manifest).hexdigest()
    config = json.loads(layout.blob(manifest["config"]["digest"]).read_bytes())
    diff_ids = list(config["rootfs"]["diff_ids"])
    layers = [Descriptor(x["mediaType"], x["digest"], int(x["size"])) for x in manifest["layers"]]
    if len(diff_ids) != len(layers) or not layers:
        raise BuildError(f"base image {name}: {len(layers)} layers but {len(diff_ids)} diff_ids")
    chains = chain_ids(diff_ids)
    for desc, diff_id in zip(layers, diff_ids, strict=True):
        _put_file(cd, layout.blob(desc.digest), desc, {"containerd.io/uncompressed": diff_id})
    cfg = manifest["config"]
    _put_file(cd, layout.blob(cfg["digest"]), Descriptor(cfg["mediaType"], cfg["digest"], int(cfg["size"])),
              {f"containerd.io/gc.ref.snapshot.{snapshotter}": chains[-1]})
    refs = {"containerd.io/gc.ref.content.config": cfg["digest"]}
    refs.update({f"containerd.io/gc.ref.content.l.{i}": d.digest for i, d in enumerate(layers)})
    cd.put_bytes(raw_manifest, m_digest, refs)
    cd.put_image(name, Descriptor(image.MT_OCI_MANIFEST, m_digest, len(raw_manifest)))
    parent = ""
    for desc, chain in zip(layers, chains, strict=True):
        if cd.stat(snapshotter, chain) is None:
            _unpack_layer(cd, snapshotter, desc, chain, parent,
                          {CRI_IMAGE_REF: name, CRI_MANIFEST: m_digest, CRI_LAYER: desc.digest})
        parent = chain
    return chains[-1], config


def _unpack_layer(cd: Containerd, snapshotter: str, desc: Descriptor, chain: str, parent: str,
                  labels: dict[str, str]) -> None:
    """Prepare/Apply/Commit one layer the way containerd's unpacker does (including its remote-snapshot answer)."""
    key = f"extract-{secrets.token_hex(6)} {chain}"
    try:
        mounts = cd.prepare(snapshotter, key, parent, {SNAPSHOT_REF: chain, **labels})
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.ALREADY_EXISTS:  # the snapshotter made it (lazily) or a racer did
            return
        raise
    try:
        cd.apply(desc, mounts)
        cd.commit(snapshotter, chain, key, {SNAPSHOT_REF: chain})
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    finally:
        cd.remove(snapshotter, key)  # NOT_FOUND after a successful commit: ignored


def _mount(mounts: list[Any], target: Path) -> Path:
    """Mount the snapshot's mounts on ``target``; returns its upper dir (where the install's changes land)."""
    if len(mounts) != 1:
        raise BuildError(f"snapshotter returned {len(mounts)} mounts; expected one overlay")
    m = mounts[0]
    opts = list(m.options)
    if m.type == "bind":  # a parentless snapshot: the dir itself is the diff
        subprocess.run(["mount", "--bind", m.source, str(target)], check=True, capture_output=True)
        return Path(m.source)
    if m.type != "overlay":
        raise BuildError(f"snapshotter returned a {m.type} mount; depsnap needs overlay to take the diff")
    upper = next((o.split("=", 1)[1] for o in opts if o.startswith("upperdir=")), None)
    if upper is None:
        raise BuildError("overlay mount without upperdir (a read-only view?)")
    # a renamed directory must be copied up whole (a tar diff cannot say "renamed"), and no metadata-only copy-up
    for opt in ("redirect_dir=off", "metacopy=off"):
        if not any(o.split("=", 1)[0] == opt.split("=", 1)[0] for o in opts):
            opts.append(opt)
    proc = subprocess.run(["mount", "-t", "overlay", "-o", ",".join(opts), m.source or "overlay", str(target)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"mounting the snapshot failed: {proc.stderr.strip()}")
    return Path(upper)


def _ctr(address: str, namespace: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ctr", "-a", address, "-n", namespace, *args], capture_output=True, text=True,
                          timeout=timeout)


def run_install(address: str, namespace: str, rootfs: Path, spec: DepSpec, env: dict[str, str], context: Path,
                wheels: Path | None, timeout: float) -> tuple[int, str]:
    """Run ``spec.command`` in a container (containerd's runtime, no network) on ``rootfs``; (exit code, log)."""
    cid = f"depsnap-{spec.key()[:12]}-{secrets.token_hex(3)}"
    argv = ["ctr", "-a", address, "-n", namespace, "run", "--rm", "--rootfs", "--cwd", CONTEXT_MOUNT,
            "--mount", f"type=bind,src={context.resolve()},dst={CONTEXT_MOUNT},options=rbind:ro"]
    if wheels is not None:
        argv += ["--mount", f"type=bind,src={wheels.resolve()},dst={WHEELS_MOUNT},options=rbind:ro"]
    for k, v in env.items():
        argv += ["--env", f"{k}={v}"]
    argv += [str(rootfs), cid, "/bin/sh", "-c", spec.command]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _ctr(address, namespace, "task", "kill", "-s", "SIGKILL", cid)
        out, _ = proc.communicate()
        _ctr(address, namespace, "task", "delete", "-f", cid)
        _ctr(address, namespace, "container", "rm", cid)
        return 124, out.decode(errors="replace") + f"\n(install killed after {timeout:.0f} s)"
    return proc.returncode, out.decode(errors="replace")


def build_containerd(
    address: str,
    base: str,
    spec: DepSpec,
    repo: str,
    context: Path,
    wheels: Path | None = None,
    plain_http: bool = False,
    namespace: str = "default",
    snapshotter: str = "bootseer",
    timeout: float = 1800,
) -> Result:
    """Run ``spec.command`` on ``base`` in the containerd at ``address``; push the snapshot to ``repo``."""
    found = resolve(repo, spec, plain_http)
    if found:
        return found
    if not spec.command:
        raise BuildError("no install command")
    ref = snapshot_ref(repo, spec)
    work = Path(tempfile.mkdtemp(prefix="bs-depsnap-"))
    try:
        layout = image.fetch_base(base, work / "layout", plain_http)
        epoch = image.base_epoch(layout)
        with Containerd(address, namespace) as cd, cd.leased():
            top, config = import_base(cd, layout, base, snapshotter)
            key = f"depsnap-{spec.key()[:16]}-{secrets.token_hex(4)}"
            mounts = cd.prepare(snapshotter, key, top, {"bootseer.depsnap/key": spec.key()})
            try:
                rootfs = work / "rootfs"
                rootfs.mkdir()
                upper = _mount(mounts, rootfs)
                try:
                    env = dict(e.split("=", 1) for e in config.get("config", {}).get("Env") or [] if "=" in e)
                    env.update(install_env(epoch))
                    code, output = run_install(address, namespace, rootfs, spec, env, context, wheels, timeout)
                finally:
                    subprocess.run(["umount", str(rootfs)], capture_output=True)
                if code != 0:
                    tail = "\n".join(output.splitlines()[-30:])
                    raise BuildError(f"install command exited with {code}; nothing was pushed", tail)
                excludes = (*difftar.DEFAULT_EXCLUDES, CONTEXT_MOUNT.strip("/"), WHEELS_MOUNT.strip("/"))
                stats: dict[str, int] = {}
                digest = image.append_layer(
                    layout, lambda dst: stats.update(difftar.write_layer(upper, dst, excludes, epoch)),
                    f"depsnap: {spec.command}", spec.tag(), epoch)
            finally:
                cd.remove(snapshotter, key)
        raced = resolve(repo, spec, plain_http)
        if raced:  # another builder finished first: its image is the answer (the same one if installs reproduce)
            log.info("%s appeared while building; using it (ours: %s, theirs: %s)", ref, digest, raced.digest)
            return raced
        image.push(layout, spec.tag(), ref, plain_http)
        log.info("pushed %s (%s): %s", ref, digest, stats)
        return Result(ref, image.exists(ref, plain_http) or digest, spec.key(), True)
    finally:
        with contextlib.suppress(OSError):
            if not os.path.ismount(work / "rootfs"):
                shutil.rmtree(work, ignore_errors=True)

"""Build a dependency snapshot with containerd — what a GPU node has — through its API and BootSeer's snapshotter.

Steps, each on containerd's own services (:mod:`bootseer.containerd`), under leases so containerd's garbage
collector leaves half-done work alone:

1. **Base into containerd** with ``bootseer pull`` (:mod:`bootseer.pull`), pinned to the manifest digest the
   key was computed from: a layer already on the node costs one ``Stat``, an indexed layer is mounted lazily
   by the snapshotter (``ALREADY_EXISTS`` on ``Prepare``) and never downloaded, any other is downloaded and
   applied as containerd's unpacker does.  The base's layer tars are not needed for the push either
   (:mod:`depsnap.image` mounts them across repositories), so a node with the base pays nothing for it.
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

import logging
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import grpc

from bootseer.containerd import Containerd
from bootseer.pull import pull
from depsnap import image
from depsnap.build import (
    CONTEXT_MOUNT,
    DIFF_EXCLUDES,
    WHEELS_MOUNT,
    BuildError,
    Result,
    base_ref,
    check_network,
    install_env,
    publish_diff,
    resolve,
)
from depsnap.key import DepSpec

log = logging.getLogger("bootseer.depsnap")


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
                wheels: Path | None, timeout: float, network: str = "none") -> tuple[int, str]:
    """Run ``spec.command`` in a container (containerd's runtime) on ``rootfs``; (exit code, log).

    ``network``: ``none`` (a network namespace of its own with nothing in it) or ``host``."""
    cid = f"depsnap-{spec.key()[:12]}-{secrets.token_hex(3)}"
    argv = ["ctr", "-a", address, "-n", namespace, "run", "--rm", "--rootfs", "--cwd", CONTEXT_MOUNT,
            "--mount", f"type=bind,src={context.resolve()},dst={CONTEXT_MOUNT},options=rbind:ro"]
    if network == "host":
        argv.append("--net-host")
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
    network: str = "none",
) -> Result:
    """Run ``spec.command`` on ``base`` in the containerd at ``address``; push the snapshot to ``repo``.

    ``network="host"`` lets the install reach a package index; the default keeps it hermetic."""
    check_network(network)
    found = resolve(repo, spec, plain_http)
    if found:
        return found
    if not spec.command:
        raise BuildError("no install command")
    if not os.path.exists(address):
        raise BuildError(f"no containerd socket at {address} (--address)")
    try:
        return _build(address, base, spec, repo, context, wheels, plain_http, namespace, snapshotter, timeout,
                      network)
    except grpc.RpcError as e:
        code = e.code().name if isinstance(e, grpc.Call) else "error"
        detail = e.details() if isinstance(e, grpc.Call) else str(e)
        raise BuildError(f"containerd: {code}: {detail}; nothing was pushed") from e


def _build(address: str, base: str, spec: DepSpec, repo: str, context: Path, wheels: Path | None,
           plain_http: bool, namespace: str, snapshotter: str, timeout: float, network: str) -> Result:
    pinned = base_ref(base, spec)
    base_img = image.load_base(pinned, plain_http)
    work = Path(tempfile.mkdtemp(prefix="bs-depsnap-"))
    rootfs = work / "rootfs"
    try:
        pulled = pull(pinned, address=address, namespace=namespace, snapshotter=snapshotter,
                      client=image.client(plain_http))
        log.info("base %s on the node in %.1f s: %s", pinned, pulled.seconds,
                 ", ".join(lo.mode for lo in pulled.layers))
        with Containerd(address, namespace) as cd, cd.leased():
            key = f"depsnap-{spec.key()[:16]}-{secrets.token_hex(4)}"
            parent = pulled.layers[-1].chain_id if pulled.layers else ""
            mounts = cd.prepare(snapshotter, key, parent, {"bootseer.depsnap/key": spec.key()})
            try:
                rootfs.mkdir()
                upper = _mount(mounts, rootfs)
                try:
                    env = dict(e.split("=", 1) for e in base_img.config.get("config", {}).get("Env") or [] if "=" in e)
                    env.update(install_env(base_img.epoch()))
                    code, output = run_install(address, namespace, rootfs, spec, env, context, wheels, timeout,
                                               network)
                finally:
                    subprocess.run(["umount", str(rootfs)], capture_output=True)
                if code != 0:
                    tail = "\n".join(output.splitlines()[-30:])
                    raise BuildError(f"install command exited with {code}; nothing was pushed", tail)
                return publish_diff(base_img, upper, spec, repo, work, DIFF_EXCLUDES, plain_http)
            finally:
                cd.remove(snapshotter, key)
    finally:
        if not os.path.ismount(rootfs):
            shutil.rmtree(work, ignore_errors=True)

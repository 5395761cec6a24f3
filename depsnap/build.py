"""Resolve a dependency snapshot, publish a build's diff, and build with the Docker Engine (what CI
pipelines have) through the ``docker`` SDK; the containerd engine is :mod:`depsnap.engine_containerd`.

The install runs once in a container on top of the base image, with no network (``--network none``; ``host``
for installs that need a package index):
inputs — the requirements files' directory and, optionally, a directory of wheels serving as the package
index — are bind-mounted read-only.  The container's overlay upper dir is the diff; it becomes one OCI layer
(:mod:`depsnap.difftar`) appended to the base (:mod:`depsnap.image`) and pushed under the key's tag.  A
failed install pushes nothing and reports the tail of its log.

Two builders racing on one key end with one image: each checks the tag before building and again before
pushing (the later one then takes the earlier one's image and pushes nothing), and when both get to push,
they push the same bytes — the layer tar, config and manifest are deterministic (mtimes clamped to the
base's creation time, which the install also gets as ``SOURCE_DATE_EPOCH``), so an install that writes the
same files gives the same image digest.  The registry has no compare-and-set on tags, so this — not a lock
that could go stale when a node dies — is what keeps racers consistent.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depsnap import difftar, image
from depsnap.key import DepSpec

log = logging.getLogger("bootseer.depsnap")
CONTEXT_MOUNT = "/depsnap"
WHEELS_MOUNT = "/wheels"


class BuildError(RuntimeError):
    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message + (f"\n--- install log (tail) ---\n{log_tail}" if log_tail else ""))
        self.log_tail = log_tail


@dataclass
class Result:
    image: str  # repo:tag
    digest: str  # manifest digest
    key: str
    built: bool  # False: the snapshot existed already
    index: str | None = None  # digest of its BootSeer index (lazily loadable), when known


def install_env(epoch: int) -> dict[str, str]:
    """Environment of the install: no pip cache or version check (nothing to leave in the layer, no network),
    and ``SOURCE_DATE_EPOCH`` so pip compiles hash-checked ``.pyc`` files, which do not depend on the mtimes
    the layer clamps."""
    return {"PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "SOURCE_DATE_EPOCH": str(epoch)}


def snapshot_ref(repo: str, spec: DepSpec) -> str:
    return f"{repo}:{spec.tag()}"


def resolve(repo: str, spec: DepSpec, plain_http: bool = False) -> Result | None:
    ref = snapshot_ref(repo, spec)
    digest = image.exists(ref, plain_http)
    return Result(ref, digest, spec.key(), False) if digest else None


NETWORKS = ("none", "host")


def check_network(network: str) -> None:
    if network not in NETWORKS:
        raise BuildError(f"network {network!r}: one of {', '.join(NETWORKS)}")


def base_ref(base: str, spec: DepSpec) -> str:
    """``base`` pinned to the manifest digest the key was computed from: the build uses exactly that base even
    if the tag has moved since."""
    return f"{base.split('@', 1)[0]}@{spec.base_digest}"


def publish_diff(base: image.BaseImage, upper: Path, spec: DepSpec, repo: str, work: Path,
                 excludes: tuple[str, ...], plain_http: bool) -> Result:
    """The install's upper dir → the snapshot image, pushed under the key's tag — unless another builder
    pushed it meanwhile, in which case that image is the answer and nothing is pushed."""
    epoch = base.epoch()
    stats: dict[str, int] = {}
    layer = image.write_layer_blob(work, lambda dst: stats.update(difftar.write_layer(upper, dst, excludes, epoch)))
    manifest, config, media_type = image.compose(base, layer, f"depsnap: {spec.command}", epoch)
    ref = snapshot_ref(repo, spec)
    raced = resolve(repo, spec, plain_http)
    if raced:
        log.info("%s appeared while building; using it", ref)
        return raced
    digest = image.publish(base, layer, manifest, config, media_type, ref, plain_http)
    log.info("pushed %s (%s): %s", ref, digest, stats)
    return Result(ref, digest, spec.key(), True)


DIFF_EXCLUDES = (*difftar.DEFAULT_EXCLUDES, CONTEXT_MOUNT.strip("/"), WHEELS_MOUNT.strip("/"))


def build_docker(
    client: Any,
    base: str,
    spec: DepSpec,
    repo: str,
    context: Path,
    wheels: Path | None = None,
    plain_http: bool = False,
    timeout: float = 1800,
    network: str = "none",
) -> Result:
    """Run ``spec.command`` on ``base`` in the Docker engine behind ``client``; push the snapshot to ``repo``."""
    check_network(network)
    found = resolve(repo, spec, plain_http)
    if found:
        return found
    if not spec.command:
        raise BuildError("no install command")
    pinned = base_ref(base, spec)
    base_img = image.load_base(pinned, plain_http)
    client.images.pull(pinned)
    volumes = {str(context.resolve()): {"bind": CONTEXT_MOUNT, "mode": "ro"}}
    if wheels is not None:
        volumes[str(wheels.resolve())] = {"bind": WHEELS_MOUNT, "mode": "ro"}
    container = client.containers.create(pinned, command=["/bin/sh", "-c", spec.command], network_mode=network,
                                         volumes=volumes, working_dir=CONTEXT_MOUNT, user="0",
                                         environment=install_env(base_img.epoch()))
    work = Path(tempfile.mkdtemp(prefix="bs-depsnap-"))
    try:
        container.start()
        status = container.wait(timeout=timeout)
        output = container.logs().decode(errors="replace")
        if status.get("StatusCode") != 0:
            tail = "\n".join(output.splitlines()[-30:])
            raise BuildError(f"install command exited with {status.get('StatusCode')}; nothing was pushed", tail)
        container.reload()
        upper = Path(container.attrs["GraphDriver"]["Data"]["UpperDir"])
        return publish_diff(base_img, upper, spec, repo, work, DIFF_EXCLUDES, plain_http)
    finally:
        container.remove(force=True)
        shutil.rmtree(work, ignore_errors=True)

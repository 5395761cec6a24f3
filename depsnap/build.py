"""Build a dependency snapshot with the Docker Engine (what CI pipelines have), through the ``docker`` SDK.

The install runs once in a container on top of the base image, with no network (``--network none``):
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


def build_docker(
    client: Any,
    base: str,
    spec: DepSpec,
    repo: str,
    context: Path,
    wheels: Path | None = None,
    plain_http: bool = False,
    timeout: float = 1800,
) -> Result:
    """Run ``spec.command`` on ``base`` in the Docker engine behind ``client``; push the snapshot to ``repo``."""
    found = resolve(repo, spec, plain_http)
    if found:
        return found
    if not spec.command:
        raise BuildError("no install command")
    client.images.pull(base)
    work = Path(tempfile.mkdtemp(prefix="bs-depsnap-"))
    try:
        layout = image.fetch_base(base, work / "layout", plain_http)
        epoch = image.base_epoch(layout)
        return _build_docker(client, base, spec, repo, context, wheels, plain_http, timeout, layout, epoch)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_docker(client: Any, base: str, spec: DepSpec, repo: str, context: Path, wheels: Path | None,
                  plain_http: bool, timeout: float, layout: image.Layout, epoch: int) -> Result:
    volumes = {str(context.resolve()): {"bind": CONTEXT_MOUNT, "mode": "ro"}}
    if wheels is not None:
        volumes[str(wheels.resolve())] = {"bind": WHEELS_MOUNT, "mode": "ro"}
    container = client.containers.create(base, command=["/bin/sh", "-c", spec.command], network_mode="none",
                                         volumes=volumes, working_dir=CONTEXT_MOUNT, user="0",
                                         environment=install_env(epoch))
    try:
        container.start()
        status = container.wait(timeout=timeout)
        output = container.logs().decode(errors="replace")
        if status.get("StatusCode") != 0:
            tail = "\n".join(output.splitlines()[-30:])
            raise BuildError(f"install command exited with {status.get('StatusCode')}; nothing was pushed", tail)
        container.reload()
        upper = Path(container.attrs["GraphDriver"]["Data"]["UpperDir"])
        excludes = (*difftar.DEFAULT_EXCLUDES, CONTEXT_MOUNT.strip("/"), WHEELS_MOUNT.strip("/"))
        stats: dict[str, int] = {}
        ref = snapshot_ref(repo, spec)
        digest = image.append_layer(layout, lambda dst: stats.update(difftar.write_layer(upper, dst, excludes, epoch)),
                                    f"depsnap: {spec.command}", spec.tag(), epoch)
        raced = resolve(repo, spec, plain_http)
        if raced:  # another builder finished first: its image is the answer
            return raced
        image.push(layout, spec.tag(), ref, plain_http)
        digest = image.exists(ref, plain_http) or digest
        log.info("pushed %s (%s): %s", ref, digest, stats)
        return Result(ref, digest, spec.key(), True)
    finally:
        container.remove(force=True)

"""Which image the start-up benchmark starts: the realistic image, its split twin, or one the operator brings.

``--image`` takes

* ``realistic`` (the default): Debian bookworm + python3 + numpy + torch CPU in three layers
  (:func:`integration.images.build_realistic`);
* ``realistic-split``: the same files cut into about eight layers (:func:`build_split`) — an image of a different
  shape (more, smaller layers) built offline from the realistic image's cached layers, so a result can be checked
  against a second shape without a network;
* ``oci-archive:PATH[:REF]`` or ``oci:DIR[:TAG]``: an image on this machine, in skopeo's syntax;
* ``docker://REF`` or a bare ``REF``: an image in a registry (over plain HTTP when the host is loopback).

Anything other than the two built-in images is copied with ``skopeo copy`` into the benchmark's own registry
first, so every mode pulls it over the same shaped link; an image built for several platforms is copied for this
machine's.  Such an image has no known command: ``--command`` and ``--expect`` are required with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

BUILTIN = ("realistic", "realistic-split")
REALISTIC_EXPECT = "tensor(2.)"  # the line the realistic image's command prints
# the largest file of the realistic image (~400 MB): the sequential-read figure reads it
REALISTIC_SEQ_READ_FILE = "/usr/local/lib/python3.11/dist-packages/torch/lib/libtorch_cpu.so"
USER_REPO = "bench/image"  # where an imported image lands in the benchmark's registry
SPLIT_LAYERS = 8
SPLIT_VERSION = 3  # bump when build_split's output changes: the cache key follows it

Kind = Literal["builtin", "docker", "oci-archive", "oci"]


@dataclass(frozen=True)
class ImageSource:
    kind: Kind
    value: str  # the built-in image's name, the registry reference, or skopeo's PATH[:REF] of a local image

    @property
    def builtin(self) -> bool:
        return self.kind == "builtin"

    def skopeo(self) -> str:
        """The source in skopeo's transport syntax."""
        if self.kind == "docker":
            return f"docker://{self.value}"
        if self.kind in ("oci-archive", "oci"):
            return f"{self.kind}:{self.value}"
        raise ValueError(f"the built-in image {self.value} is built here, not copied")

    def label(self) -> str:
        return self.value if self.kind in ("builtin", "docker") else f"{self.kind}:{self.value}"


def parse_image(text: str) -> ImageSource:
    """``--image``'s value (see the module doc); ValueError says what is wrong with it."""
    from bootseer.reference import Reference

    s = text.strip()
    if not s:
        raise ValueError("--image is empty")
    if s in BUILTIN:
        return ImageSource("builtin", s)
    for kind in ("oci-archive", "oci"):
        if s.startswith(kind + ":"):
            rest = s[len(kind) + 1:]
            path = Path(rest.split(":", 1)[0])
            if not rest or not path.exists():
                raise ValueError(f"--image {s}: no such {'file' if kind == 'oci-archive' else 'directory'}: "
                                 f"{path}")
            if kind == "oci-archive" and not path.is_file():
                raise ValueError(f"--image {s}: {path} is not a file (an oci-archive is a tar of an OCI layout)")
            if kind == "oci" and not (path / "index.json").is_file():
                raise ValueError(f"--image {s}: {path} is not an OCI layout (no index.json)")
            return ImageSource(kind, rest)  # type: ignore[arg-type]
    if s.startswith("docker://"):
        s = s[len("docker://"):]
    elif "://" in s or s.split(":", 1)[0] in ("docker-archive", "containers-storage", "dir", "docker-daemon"):
        raise ValueError(f"--image {text}: give a registry reference, docker://REF, oci-archive:PATH or oci:DIR "
                         f"(or one of {', '.join(BUILTIN)})")
    Reference.parse(s)  # ReferenceError (a ValueError) names the bad part
    return ImageSource("docker", s)


@dataclass(frozen=True)
class Workload:
    """What the benchmark runs in the image and what ends the clock."""

    command: list[str]
    expect: str  # the start is over when a line of the command's stdout contains this
    seq_read_file: str | None  # the file of the sequential-read figure (None: that figure is skipped)


def workload(src: ImageSource, command: str | None, expect: str | None, seq_read_file: str | None) -> Workload:
    """``--command`` (one shell-quoted string), ``--expect`` and ``--seq-read-file`` for ``src``: the built-in
    images default to the realistic command; an image brought by the operator needs both of the first two."""
    from integration import images

    if command is not None and not shlex.split(command):
        raise ValueError("--command is empty")
    if expect is not None and not expect.strip():
        raise ValueError("--expect is empty (a line containing it ends the start; give text the command prints)")
    if src.builtin:
        return Workload(shlex.split(command) if command else list(images.REALISTIC_CMD),
                        expect if expect is not None else REALISTIC_EXPECT,
                        seq_read_file if seq_read_file is not None else REALISTIC_SEQ_READ_FILE)
    missing = [opt for opt, v in (("--command", command), ("--expect", expect)) if v is None]
    if missing:
        raise ValueError(f"--image {src.label()} needs {' and '.join(missing)}: the command to run in it and text "
                         "of the line whose arrival ends the start")
    assert command is not None and expect is not None
    return Workload(shlex.split(command), expect, seq_read_file)


# ------------------------------------------------------------------------------------ into the registry
def push_image(src: ImageSource, registry: str, cache: Path) -> str:
    """Put ``src`` into the benchmark's registry and return its reference there."""
    from integration import images
    from integration.oci import push

    if src.value == "realistic":
        return images.push_realistic(registry, cache=cache)
    if src.value == "realistic-split":
        layout, tag = build_split(cache)
        ref = f"{registry}/bootseer/realistic-split:{tag}"
        push(layout, tag, ref)
        return ref
    ref = f"{registry}/{USER_REPO}:v1"
    skopeo_copy(src, ref)
    return ref


def skopeo_copy(src: ImageSource, dest: str) -> None:
    """``skopeo copy`` of ``src`` (this machine's platform) to ``dest`` in a plain-HTTP registry."""
    from bootseer.reference import Reference, is_loopback

    args = ["skopeo", "copy", "--quiet", "--retry-times", "3", "--dest-tls-verify=false"]
    if src.kind == "docker" and is_loopback(Reference.parse(src.value).registry):
        args.append("--src-tls-verify=false")
    with tempfile.TemporaryDirectory() as tmp:  # skopeo's own state in scratch, not in ~/.config
        env = dict(os.environ, XDG_RUNTIME_DIR=tmp)
        proc = subprocess.run([*args, src.skopeo(), f"docker://{dest}"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo copy {src.skopeo()} → {dest} failed: {proc.stderr.strip()[-2000:]}")


@dataclass(frozen=True)
class ImageFacts:
    manifest_digest: str
    layer_sizes: list[int]  # compressed, in manifest order


def image_facts(ref: str) -> ImageFacts:
    """The manifest digest and layer sizes of ``ref`` in the benchmark's (plain-HTTP) registry."""
    from bootseer.registry import RegistryClient

    manifest, _ = RegistryClient(plain_http=True).resolve_image(ref)
    return ImageFacts(manifest.digest, [d.size for d in manifest.layers])


# ------------------------------------------------------------------------------- the split image
@dataclass(frozen=True)
class Entry:
    name: str
    size: int
    hardlink_to: str | None


Member = tuple[tarfile.TarInfo, IO[bytes] | None]


def _members(gz_layer: Path) -> Iterator[Member]:
    with tarfile.open(gz_layer, mode="r|gz") as tf:
        for info in tf:
            yield info, (tf.extractfile(info) if info.isreg() else None)


def plan_cuts(entries: list[Entry], pieces: int) -> list[int]:
    """Indexes where the entries of one layer are cut into at most ``pieces`` runs of about equal bytes.

    A cut never falls between a hard link and its target: a layer's hard link must name a file of that layer
    (unpackers apply each layer into its own directory), so both stay in one piece.  A file larger than a
    piece is a piece of its own rather than split."""
    if pieces <= 1 or not entries:
        return []
    left = sum(e.size for e in entries)
    where = {e.name.rstrip("/"): i for i, e in enumerate(entries)}
    blocked: set[int] = set()  # a cut *before* index i is blocked
    for i, e in enumerate(entries):
        if e.hardlink_to is not None:
            j = where.get(e.hardlink_to.rstrip("/"))
            if j is not None and j < i:
                blocked.update(range(j + 1, i + 1))
    cuts: list[int] = []
    acc = 0
    target = left / pieces
    for i, e in enumerate(entries):
        if acc and acc + e.size / 2 > target and i not in blocked and len(cuts) < pieces - 1:
            cuts.append(i)
            acc = 0
            # what is left, over the pieces left: a file larger than a piece does not starve the others
            target = left / (pieces - len(cuts))
        acc += e.size
        left -= e.size
    return cuts


def parents_to_add(info: tarfile.TarInfo, dirs: dict[str, tarfile.TarInfo], held: set[str]) -> list[tarfile.TarInfo]:
    """The directory entries a piece must hold before ``info``: its ancestors seen earlier in the layer
    (``dirs``) that this piece does not hold yet (``held``, updated).

    A layer built by Docker or BuildKit carries the entry of every parent directory of what it holds, and tools
    rely on it: stargz-snapshotter's optimizer refuses a layer whose file's parent is missing ("failed to sort
    tar entries").  A cut in tar order would leave a piece's files without their parents, so each piece repeats
    them, with the original's owner, mode and times — as Docker does for a directory a later step writes into."""
    out: list[tarfile.TarInfo] = []
    parts = info.name.rstrip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d in held or d not in dirs:
            continue
        held.add(d)
        out.append(dirs[d])
    return out


def split_key() -> str:
    from integration import images

    spec = {"realistic": images.realistic_key(), "layers": SPLIT_LAYERS, "v": SPLIT_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_split(cache: Path, pieces: int = SPLIT_LAYERS, log: IO[str] = sys.stderr) -> tuple[Path, str]:
    """(layout, tag) of the realistic image's files in about ``pieces`` layers, built once and cached.

    Each of the realistic image's layers is cut in tar order into runs of about (image bytes / ``pieces``)
    — the torch layer into several, the small pip layer not at all — so the files, their order, owners, modes
    and times are the realistic image's; only the layer boundaries move (each piece repeats the entries of its
    files' parent directories, as a Docker layer holds them: :func:`parents_to_add`).  The realistic image has no
    whiteouts (refused if it had: a cut could separate a whiteout from what it hides)."""
    from integration import images
    from integration.oci import Layout

    out = cache / f"realistic-split-{split_key()}"
    done = out / "bootseer-image.json"
    if done.exists():
        return out, json.loads(done.read_text())["tag"]
    img = images.build_realistic(cache, log)
    blobs = [img.layout / "blobs" / "sha256" / ly["digest"].split(":", 1)[1] for ly in img.layers]
    listing: list[list[Entry]] = []
    for blob in blobs:
        entries = []
        for info, _ in _members(blob):
            base = info.name.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith(".wh."):
                raise ValueError(f"{blob.name}: whiteout {info.name}: the split image cannot move layer boundaries "
                                 "across whiteouts")
            entries.append(Entry(info.name, info.size if info.isreg() else 0,
                                 info.linkname if info.islnk() else None))
        listing.append(entries)
    total = sum(e.size for es in listing for e in es)
    work = Path(tempfile.mkdtemp(prefix="bs-split-", dir=cache if cache.exists() else None))
    try:
        lay = Layout(work / "layout")
        for n, (blob, entries) in enumerate(zip(blobs, listing, strict=True)):
            size = sum(e.size for e in entries)
            k = max(1, round(pieces * size / total))
            bounds = [0, *plan_cuts(entries, k), len(entries)]
            members = _members(blob)
            dirs: dict[str, tarfile.TarInfo] = {}  # the layer's directory entries so far, by name
            for p in range(len(bounds) - 1):
                count = bounds[p + 1] - bounds[p]

                def write(dst: IO[bytes], count: int = count, members: Iterator[Member] = members,
                          dirs: dict[str, tarfile.TarInfo] = dirs) -> None:
                    held: set[str] = set()
                    with tarfile.open(fileobj=dst, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                        for _ in range(count):
                            info, data = next(members)
                            for parent in parents_to_add(info, dirs, held):
                                tf.addfile(parent)
                            if info.isdir():
                                dirs[info.name.rstrip("/")] = info
                                held.add(info.name.rstrip("/"))
                            tf.addfile(info, data)

                print(f"realistic-split: layer {n + 1} piece {p + 1}/{len(bounds) - 1} ({count} entries)",
                      file=log, flush=True)
                lay.add_layer(write, f"{img.layers[n].get('comment', '')} (part {p + 1}/{len(bounds) - 1})")
            with contextlib.suppress(StopIteration):
                next(members)
                raise RuntimeError(f"{blob.name}: entries left over after the split (the layer changed under it)")
        tag = "v1"
        digest = lay.finish(tag, {"Cmd": list(images.REALISTIC_CMD),
                                  "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]})
        meta = {"tag": tag, "manifest_digest": digest,
                "layers": [{"digest": ly.digest, "size": ly.size, "comment": ly.comment} for ly in lay.layers]}
        (work / "layout" / "bootseer-image.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(work / "layout", out)
        return out, tag
    finally:
        shutil.rmtree(work, ignore_errors=True)

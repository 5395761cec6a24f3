"""The checkpoint manifest: which files exist, how big, and where each of their chunks lives.

The manifest is the only thing that makes a checkpoint visible.  ``put`` writes every data object
first and the manifest last, in one atomic write, so a reader either sees a complete checkpoint or
none at all.  Everything a reader needs to serve a byte range is in here (chunk → object/offset/length
and the chunk's sha256), so a mount does no listing or ``stat`` calls against the store.

Layout under a checkpoint URI::

    MANIFEST.json                      written last; its presence == the checkpoint exists
    data/<plan-id>/s<stripe>/<segment> stripe objects, cut into segments (resume granularity)
    data/<plan-id>/s<stripe>/<segment>.done   digests of a finished segment (lets a rerun skip it)

Chunk ``g`` (counting every file's chunks in path order) goes to stripe ``g % stripes``, so a sequential
read of any file touches the stripes round-robin and read-ahead fans out over all of them.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ckptfs.errors import ManifestError

FORMAT = "ckptfs/1"
MANIFEST_NAME = "MANIFEST.json"
DATA_DIR = "data"


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of one file: ``length`` bytes at ``offset`` inside data object ``obj``."""

    digest: str  # sha256 hex of the chunk's bytes
    obj: int  # index into Manifest.objects
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class DataObject:
    """A segment of one stripe: the unit of upload, resume and (for the store) placement."""

    path: str  # relative to the checkpoint root
    stripe: int
    size: int


@dataclass(slots=True)
class FileEntry:
    path: str  # relative, POSIX separators, no leading "/"
    size: int
    mode: int  # permission bits only
    mtime_ns: int
    chunks: list[ChunkRef] = field(default_factory=list)


@dataclass(slots=True)
class DirEntry:
    path: str
    mode: int
    mtime_ns: int


@dataclass(slots=True)
class Manifest:
    chunk_size: int
    stripes: int
    plan_id: str
    objects: list[DataObject]
    files: list[FileEntry]
    dirs: list[DirEntry]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        """The entry for ``path`` (normalised); ``FileNotFoundError`` names the path when absent."""
        key = normalise_path(path)
        for f in self.files:
            if f.path == key:
                return f
        raise FileNotFoundError(f"no file {key!r} in this checkpoint")

    def iter_chunks(self) -> Iterator[tuple[FileEntry, int, ChunkRef]]:
        """Every (file, file offset, chunk) in manifest order."""
        for f in self.files:
            for i, c in enumerate(f.chunks):
                yield f, i * self.chunk_size, c

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "chunk_size": self.chunk_size,
            "stripes": self.stripes,
            "plan_id": self.plan_id,
            "objects": [[o.path, o.stripe, o.size] for o in self.objects],
            "dirs": [[d.path, d.mode, d.mtime_ns] for d in self.dirs],
            "files": [
                {
                    "path": f.path,
                    "size": f.size,
                    "mode": f.mode,
                    "mtime_ns": f.mtime_ns,
                    "chunks": [[c.digest, c.obj, c.offset, c.length] for c in f.chunks],
                }
                for f in self.files
            ],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse and check a manifest: a damaged one must fail here, not as a wrong byte later."""
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT:
                raise ManifestError(f"unsupported manifest format {doc.get('format')!r} (want {FORMAT})")
            objects = [DataObject(str(p), int(s), int(n)) for p, s, n in doc["objects"]]
            files = [
                FileEntry(
                    path=str(f["path"]),
                    size=int(f["size"]),
                    mode=int(f["mode"]),
                    mtime_ns=int(f["mtime_ns"]),
                    chunks=[ChunkRef(str(d), int(o), int(off), int(n)) for d, o, off, n in f["chunks"]],
                )
                for f in doc["files"]
            ]
            dirs = [DirEntry(str(p), int(m), int(t)) for p, m, t in doc["dirs"]]
            m = cls(
                chunk_size=int(doc["chunk_size"]),
                stripes=int(doc["stripes"]),
                plan_id=str(doc["plan_id"]),
                objects=objects,
                files=files,
                dirs=dirs,
            )
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"corrupt manifest: {e}") from e
        m.validate()
        return m

    def validate(self) -> None:
        """Structural checks: chunk lengths add up to file sizes and stay inside their objects."""
        if self.chunk_size <= 0 or self.stripes <= 0:
            raise ManifestError("corrupt manifest: chunk_size and stripes must be positive")
        # A manifest comes from the store, and whoever can write the store must not reach outside it:
        # every path is checked as stored, not normalised into something acceptable.
        for o in self.objects:
            check_rel_path(o.path, "object")
            if not o.path.startswith(DATA_DIR + "/"):
                raise ManifestError(f"corrupt manifest: object {o.path!r} is not under {DATA_DIR}/")
        for d in self.dirs:
            check_rel_path(d.path, "directory")
        seen: set[str] = set()
        for f in self.files:
            check_rel_path(f.path, "file")
            if f.path in seen:
                raise ManifestError(f"corrupt manifest: duplicate path {f.path!r}")
            seen.add(f.path)
            if sum(c.length for c in f.chunks) != f.size:
                raise ManifestError(f"corrupt manifest: chunks of {f.path!r} do not add up to its size")
            for i, c in enumerate(f.chunks):
                if not 0 <= c.obj < len(self.objects):
                    raise ManifestError(f"corrupt manifest: {f.path!r} chunk {i} names a missing object")
                if c.offset < 0 or c.offset + c.length > self.objects[c.obj].size:
                    raise ManifestError(f"corrupt manifest: {f.path!r} chunk {i} lies outside its object")
                if c.length > self.chunk_size or (i < len(f.chunks) - 1 and c.length != self.chunk_size):
                    raise ManifestError(f"corrupt manifest: {f.path!r} chunk {i} has a bad length")


def check_rel_path(path: str, what: str) -> None:
    """Refuse a manifest path that is not plain and relative: absolute, ``..``, ``.``, empty parts,
    backslashes or NUL.  Such a path names something outside the checkpoint (``../../etc/shadow`` on a
    local or NFS store, ``/etc/cron.d/x`` for ``get``), so it is an error, never rewritten."""
    if (
        not isinstance(path, str)
        or not path
        or path.startswith("/")
        or "\\" in path
        or "\0" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise ManifestError(f"corrupt manifest: {what} path {path!r} is not a plain relative path")


def normalise_path(path: str) -> str:
    """``/a//b/`` → ``a/b``; refuses ``..`` so a manifest can never name a file outside its tree."""
    p = posixpath.normpath("/" + path.replace("\\", "/")).lstrip("/")
    if p in ("", "."):
        return ""
    if any(part == ".." for part in p.split("/")):
        raise ValueError(f"path escapes the checkpoint: {path!r}")
    return p

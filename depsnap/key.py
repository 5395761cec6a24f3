"""The depsnap key: what an install's result depends on, reduced to one digest.

Same inputs give the same key on any machine; any change that could change the installed result gives a
new key.  Formatting that cannot change the result does not: comments, blank lines, line order, the case
and ``-``/``_``/``.`` spelling of project names, whitespace around operators.

Inputs (all recorded in :meth:`DepSpec.inputs`, which ``bootseer depsnap key`` prints):

* the base image's *manifest digest* (a tag is resolved first: a moved tag is a new base);
* the platform (``linux/amd64``);
* requirements files with everything they include through ``-r``/``-c`` (content, not file names);
  unpinned lines are kept as written and flagged, since the index can move under them;
* apt package names;
* files the install command reads that the user names: content digests keyed by their path relative to the
  build context (the directory mounted at ``/depsnap``), so two files of one name in different
  directories are two inputs;
* the install command itself, as its argument list (``echo 'a b'`` and ``echo a b`` differ).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEY_VERSION = 2  # 2: files keyed by their path in the context, the command by its argv
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")
_INCLUDE = re.compile(r"^(-r|--requirement|-c|--constraint)\s*=?\s*(\S+)$")


class SpecError(ValueError):
    """A dependency spec that cannot be read (missing include, include cycle, unreadable line)."""


def canonical_name(name: str) -> str:
    """PEP 503 normalization: ``Foo_Bar.baz`` → ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _logical_lines(text: str) -> list[str]:
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        # a comment starts at '#' at line start or after whitespace (pip's rule; URLs keep their fragments)
        cur = re.sub(r"(^|\s)#.*$", "", cur).strip()
        if cur:
            out.append(cur)
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


def normalize_requirement(line: str) -> str:
    """One requirement line in canonical form; options (``--index-url …``) are kept with single spaces."""
    if line.startswith("-"):
        return " ".join(line.split())
    m = _NAME.match(line)
    if not m or "://" in line or line.startswith((".", "/")):
        return " ".join(line.split())  # URLs and paths: as written
    name, extras, rest = m.groups()
    extras_n = ""
    if extras:
        extras_n = "[" + ",".join(sorted(canonical_name(e.strip()) for e in extras[1:-1].split(",") if e.strip())) + "]"
    marker = ""
    if ";" in rest:
        rest, marker = rest.split(";", 1)
        marker = "; " + " ".join(marker.split())
    spec = ",".join(sorted(re.sub(r"\s+", "", s) for s in rest.split(",") if s.strip()))
    return f"{canonical_name(name)}{extras_n}{spec}{marker}"


def is_pinned(req: str) -> bool:
    return "==" in req or "===" in req or "@" in req.split(";")[0]


def read_requirements(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, list[str]]:
    """``{"requirements": [...], "constraints": [...]}`` from ``path`` and everything it includes."""
    path = path.resolve()
    if path in _seen:
        raise SpecError(f"requirements include cycle: {' -> '.join(map(str, (*_seen, path)))}")
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"cannot read requirements file {path}: {e.strerror}") from e
    out: dict[str, list[str]] = {"requirements": [], "constraints": []}
    for line in _logical_lines(text):
        m = _INCLUDE.match(line)
        if m:
            flag, target = m.groups()
            inc = read_requirements(path.parent / target, (*_seen, path))
            if flag in ("-c", "--constraint"):
                out["constraints"] += inc["requirements"] + inc["constraints"]
            else:
                out["requirements"] += inc["requirements"]
                out["constraints"] += inc["constraints"]
            continue
        out["requirements"].append(normalize_requirement(line))
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


@dataclass
class DepSpec:
    """Everything an install depends on; ``base_digest`` must be a resolved manifest digest."""

    base_digest: str
    platform: str = "linux/amd64"
    requirements: list[Path] = field(default_factory=list)
    apt: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    command: str = ""
    context: Path | None = None  # the build context; default: the first requirements file's dir, else cwd

    def __post_init__(self) -> None:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", self.base_digest):
            raise SpecError(f"base must be a resolved manifest digest (sha256:…), not {self.base_digest!r}")

    def context_dir(self) -> Path:
        """The directory mounted at ``/depsnap`` for the install (what ``--context`` defaults to)."""
        if self.context is not None:
            return Path(self.context)
        return Path(self.requirements[0]).parent if self.requirements else Path.cwd()

    def _file_name(self, f: Path) -> str:
        """``f``'s key name: its path relative to the context, else its absolute path (a file outside the
        context is still told apart from another of the same basename)."""
        path, ctx = Path(f).resolve(), self.context_dir().resolve()
        return path.relative_to(ctx).as_posix() if path.is_relative_to(ctx) else path.as_posix()

    def _argv(self) -> list[str]:
        try:
            return shlex.split(self.command)
        except ValueError as e:
            raise SpecError(f"cannot parse the install command {self.command!r}: {e}") from e

    def inputs(self) -> dict[str, Any]:
        reqs: list[str] = []
        cons: list[str] = []
        for p in self.requirements:
            r = read_requirements(Path(p))
            reqs += r["requirements"]
            cons += r["constraints"]
        files = {}
        for f in self.files:
            try:
                files[self._file_name(Path(f))] = _sha256_file(Path(f))
            except OSError as e:
                raise SpecError(f"cannot read input file {f}: {e.strerror}") from e
        return {
            "version": KEY_VERSION,
            "base": self.base_digest,
            "platform": self.platform,
            "requirements": sorted(set(reqs)),
            "constraints": sorted(set(cons)),
            "unpinned": sorted({r for r in reqs if not r.startswith("-") and not is_pinned(r)}),
            "apt": sorted({a.strip() for a in self.apt if a.strip()}),
            "files": dict(sorted(files.items())),
            "command": self._argv(),
        }

    def key(self) -> str:
        doc = self.inputs()
        doc.pop("unpinned")  # derived from requirements: informative only
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def tag(self) -> str:
        """The image tag a snapshot with this key is pushed under."""
        return f"depsnap-{self.key()[:32]}"

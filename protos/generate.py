"""Regenerate the Python gRPC stubs under ``protos/`` from containerd's own ``.proto`` files.

Run ``python -m protos.generate`` (or ``bootseer dev gen-protos``).  Sources:

* containerd's API protos as Debian's ``golang-github-containerd-containerd-dev`` installs them
  (``/usr/share/gocode/src/github.com/containerd/containerd/api``), or ``--containerd-api DIR``;
* the Kubernetes CRI ``runtime.v1`` subset kept in this repository (``protos/cri/runtime/v1/api.proto``),
  because Debian does not package the CRI API.

The containerd files are copied to ``protos/containerd/...`` with their import paths rewritten to that tree
and the gogoproto annotations removed.  gogoproto options only steer Go code generation; dropping them
changes nothing on the wire, and it spares Python a dependency on gogo.proto.  ``--check`` regenerates into
a scratch directory and fails if the result differs from what is committed.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_API = Path("/usr/share/gocode/src/github.com/containerd/containerd/api")
GO_PREFIX = "github.com/containerd/containerd/api/"

# The services BootSeer's clients and server speak, plus the types they import.
CONTAINERD_FILES = [
    "types/descriptor.proto",
    "types/mount.proto",
    "types/platform.proto",
    "services/snapshots/v1/snapshots.proto",
    "services/content/v1/content.proto",
    "services/images/v1/images.proto",
    "services/leases/v1/leases.proto",
    "services/namespaces/v1/namespace.proto",
    "services/containers/v1/containers.proto",
    "services/diff/v1/diff.proto",
    "services/version/v1/version.proto",
]
CRI_FILES = ["cri/runtime/v1/api.proto"]

_GOGO_IMPORT = re.compile(r'^import\s+(weak\s+)?"gogoproto/gogo.proto";\s*\n', re.M)
_GOGO_FILE_OPTION = re.compile(r"^[ \t]*option\s+\(gogoproto\.[a-z_]+\)\s*=\s*[^;]+;\s*\n", re.M)
_GOGO_FIELD_OPTION = re.compile(r"\(gogoproto\.[a-z_]+\)\s*=\s*(\"[^\"]*\"|[A-Za-z0-9_.]+)")
_EMPTY_BRACKETS = re.compile(r"\s*\[\s*(,\s*)*\]")


def _strip_gogo(text: str) -> str:
    text = _GOGO_IMPORT.sub("", text)
    text = _GOGO_FILE_OPTION.sub("", text)
    text = _GOGO_FIELD_OPTION.sub("", text)
    # "[a, , b]" left by removals: drop dangling commas, then brackets emptied entirely.
    text = re.sub(r"\[\s*,\s*", "[", text)
    text = re.sub(r",\s*(,\s*)+", ", ", text)
    text = re.sub(r",\s*\]", "]", text)
    return _EMPTY_BRACKETS.sub("", text)


def _rewrite_imports(text: str) -> str:
    return text.replace(f'import "{GO_PREFIX}', 'import "protos/containerd/')


def stage_sources(api: Path, dest: Path) -> list[Path]:
    """Copy the proto sources (rewritten) under ``dest/protos`` and return their paths relative to ``dest``."""
    out: list[Path] = []
    for rel in CONTAINERD_FILES:
        text = (api / rel).read_text()
        target = dest / "protos" / "containerd" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_rewrite_imports(_strip_gogo(text)))
        out.append(target.relative_to(dest))
    for rel in CRI_FILES:
        if not (ROOT / "protos" / rel).exists():
            continue
        target = dest / "protos" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / "protos" / rel, target)
        out.append(target.relative_to(dest))
    return out


def generate(api: Path, out_root: Path) -> None:
    """Generate ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` for every source into ``out_root/protos``."""
    from grpc_tools import protoc  # dev dependency, imported only here

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        files = stage_sources(api, src)
        builtin = Path(protoc.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{src}",
            f"-I{builtin}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            *[str(f) for f in files],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed: " + " ".join(args))
        for f in files:  # keep the (rewritten) sources next to the stubs they made
            if not str(f).startswith("protos/cri/"):
                (out_root / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / f, out_root / f)
    for d in (out_root / "protos").rglob("*"):
        if d.is_dir() and not (d / "__init__.py").exists():
            (d / "__init__.py").write_text("")


def _generated_files(root: Path) -> set[Path]:
    return {
        p.relative_to(root)
        for sub in ("containerd", "cri")
        for p in (root / "protos" / sub).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
        and not (sub == "cri" and p.suffix == ".proto")  # the CRI .proto is the source, not an output
    }


def check(api: Path) -> list[str]:
    """Return the files that differ between the committed stubs and a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(api, fresh)
        new, old = _generated_files(fresh), _generated_files(ROOT)
        diffs = sorted(str(p) for p in new ^ old)
        diffs += sorted(
            str(p) for p in new & old if not filecmp.cmp(fresh / p, ROOT / p, shallow=False)
        )
        return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--containerd-api", type=Path, default=DEFAULT_API)
    ap.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    ns = ap.parse_args(argv)
    if not (ns.containerd_api / "services").is_dir():
        print(f"containerd API protos not found at {ns.containerd_api} "
              "(apt install golang-github-containerd-containerd-dev)", file=sys.stderr)
        return 2
    if ns.check:
        diffs = check(ns.containerd_api)
        for d in diffs:
            print(f"stale: {d}", file=sys.stderr)
        return 1 if diffs else 0
    shutil.rmtree(ROOT / "protos" / "containerd", ignore_errors=True)
    generate(ns.containerd_api, ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())

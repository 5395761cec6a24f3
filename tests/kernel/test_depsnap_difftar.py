"""An overlay upper dir made by real changes in a real overlay mount becomes the right OCI layer."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from depsnap.difftar import DiffError, write_layer


@pytest.fixture
def overlay(scratch: Path):  # type: ignore[no-untyped-def]
    lower, upper, work, merged = (scratch / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "keep").write_text("keep")
    (lower / "gone").write_text("gone")
    (lower / "replaced").mkdir()
    (lower / "replaced" / "old").write_text("old")
    (lower / "usr").mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=off", str(merged)], check=True)
    try:
        yield merged, upper
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def layer_entries(upper: Path) -> dict[str, tarfile.TarInfo]:
    buf = io.BytesIO()
    write_layer(upper, buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        return {m.name: m for m in tf.getmembers()}


def test_changes_become_oci_entries(overlay) -> None:  # type: ignore[no-untyped-def]
    merged, upper = overlay
    (merged / "gone").unlink()
    subprocess.run(["rm", "-rf", str(merged / "replaced")], check=True)
    (merged / "replaced").mkdir()
    (merged / "replaced" / "new").write_text("new")
    (merged / "usr" / "lib.so").write_text("lib")
    os.link(merged / "usr" / "lib.so", merged / "usr" / "lib2.so")
    os.symlink("lib.so", merged / "usr" / "link")
    os.setxattr(merged / "usr" / "lib.so", "user.k", b"v")
    (merged / "root" / ".cache" / "pip").mkdir(parents=True)
    (merged / "root" / ".cache" / "pip" / "wheel").write_text("cache")
    (merged / "tmp").mkdir()
    (merged / "tmp" / "build").write_text("x")
    e = layer_entries(upper)
    assert ".wh.gone" in e and e[".wh.gone"].size == 0
    assert "replaced/.wh..wh..opq" in e and "replaced/new" in e
    assert "keep" not in e  # unchanged lower files are not in the diff
    assert e["usr/lib2.so"].islnk() and e["usr/lib2.so"].linkname == "usr/lib.so"
    assert e["usr/link"].issym() and e["usr/link"].linkname == "lib.so"
    assert e["usr/lib.so"].pax_headers.get("SCHILY.xattr.user.k") == "v"
    assert not any(n.startswith(("root/.cache", "tmp")) for n in e)
    assert not any("trusted.overlay" in k for m in e.values() for k in m.pax_headers)


def test_redirected_directory_is_refused(scratch: Path) -> None:
    upper = scratch / "u"
    (upper / "d").mkdir(parents=True)
    os.setxattr(upper / "d", "trusted.overlay.redirect", b"/old")
    with pytest.raises(DiffError, match="redirect_dir"):
        write_layer(upper, io.BytesIO())


def test_same_files_written_at_other_times_give_the_same_bytes(scratch: Path) -> None:
    """Two builders installing the same files push the same layer: mtimes clamp to the epoch, no host names."""
    tars = []
    for i, when in enumerate((1_700_000_000, 1_800_000_123.5)):
        upper = scratch / f"u{i}"
        (upper / "pkg").mkdir(parents=True)
        (upper / "pkg" / "mod.py").write_text("X = 1\n")
        os.mknod(upper / "gone", 0o600 | 0o020000, 0)  # a whiteout
        for p in (upper / "pkg" / "mod.py", upper / "pkg", upper / "gone"):
            os.utime(p, (when, when), follow_symlinks=False)
        buf = io.BytesIO()
        write_layer(upper, buf, epoch=1_600_000_000)
        tars.append(buf.getvalue())
    assert tars[0] == tars[1]
    with tarfile.open(fileobj=io.BytesIO(tars[0])) as tf:
        assert {m.name: (m.mtime, m.uname) for m in tf.getmembers()} == {
            ".wh.gone": (1_600_000_000, ""), "pkg": (1_600_000_000, ""), "pkg/mod.py": (1_600_000_000, "")}

"""``bootseer bench startup --image oci-archive:… --command … --expect …`` end to end on a tiny image (issue 20):
the operator's image is copied into the benchmark's registry, every mode starts it, the clock stops at the
expected line of a command that keeps running (its task is killed), and the BootSeer modes report per layer the
blob, the bytes fetched and the disk its cache takes."""

from __future__ import annotations

import json
import secrets
import subprocess
import tarfile
from pathlib import Path

from integration import images
from integration.bench import startup
from integration.oci import Layout, entry
from integration.stack import loops_below, mounts_below


def _tiny_archive(tmp: Path) -> Path:
    """A one-layer busybox image with bytes of its own, as an oci-archive (a tar of an OCI layout)."""
    lay = Layout(tmp / "layout")
    lay.add_entries([*images._busybox_entries(), entry("data/", kind=tarfile.DIRTYPE, mode=0o755),
                     entry("data/keep.txt", b"kept\n"), entry("data/token", secrets.token_bytes(64))], "tiny")
    lay.finish("v1", {"Env": ["PATH=/bin"]})
    archive = tmp / "tiny.tar"
    subprocess.run(["tar", "-C", str(lay.root), "-cf", str(archive), "."], check=True)
    return archive


def test_startup_of_an_image_brought_as_an_oci_archive(tmp_path: Path) -> None:
    archive = _tiny_archive(tmp_path)
    out, root = tmp_path / "startup.json", tmp_path / "root"
    # prints the line, then runs on like a server: the start ends at the line, the task is killed after
    rc = startup.main(["--image", f"oci-archive:{archive}", "--command", "/bin/sh -c 'cat /data/keep.txt; "
                       "exec sleep 600'", "--expect", "kept", "--exit-timeout", "1", "--runs", "1", "--rates",
                       "1gbit", "--modes", "overlayfs,floor,lazy,prefetch", "--json", str(out), "--md",
                       str(tmp_path / "startup.md"), "--root", str(root), "--cache", str(tmp_path / "cache")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert not res["partial"] and res["image"] == f"oci-archive:{archive}"
    assert res["command"] == ["/bin/sh", "-c", "cat /data/keep.txt; exec sleep 600"]
    assert len(res["image_layers"]) == 1 and res["image_layers"][0] > 0
    assert set(res["median_seconds"]["1g"]) == {"overlayfs", "floor", "lazy", "prefetch"}
    assert res["seq_read_mb_s"] == {"overlayfs_local": [], "swapped_lazy": []}  # no file named: not measured
    wire = res["bytes"]["1g"]
    assert wire["overlayfs"]["link_to_output"] >= res["image_layers"][0]  # the whole layer crossed the link
    for mode in ("lazy", "prefetch"):
        (row,) = res["layers"]["1g"][mode]
        assert row["position"] == 1 and row["blob"].startswith("sha256:")
        assert 0 < row["fetched_to_output"] <= row["blob_size"] + (128 << 10), (mode, row)
        assert row["disk_at_output"] > 0, (mode, row)
    assert res["hot_set"].get("manifest_bytes")  # the recording stopped at the line and found reads
    md = (tmp_path / "startup.md").read_text()
    assert "Per lazy layer at the output" in md and "| 1g | BootSeer lazy + prefetch | 1 |" in md
    assert not mounts_below(root) and not loops_below(root)

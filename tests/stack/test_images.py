"""The image builders produce what they claim, checked after a real pull through containerd."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from integration import images
from integration.stack import Stack


def test_small_image_unpacks_to_the_expected_tree(stack: Stack, small_image: str, scratch: Path) -> None:
    stack.ctr("image", "pull", "--plain-http", small_image)
    target = scratch / "mnt"
    target.mkdir()
    stack.ctr("image", "mount", small_image, str(target))
    try:
        assert images.check_small_tree(target) == []
    finally:
        stack.ctr("image", "unmount", "--rm", str(target))


def test_check_small_tree_notices_a_wrong_tree(scratch: Path) -> None:
    """The checker itself must fail on a tree where the whiteouts were not applied."""
    layout = scratch / "layout"
    images.build_small(layout)
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    naive = scratch / "naive"
    naive.mkdir()
    for layer in manifest["layers"]:  # extract layers naively: no whiteout processing
        with tarfile.open(layout / "blobs" / "sha256" / layer["digest"][7:]) as tf:
            keep = [m for m in tf if m.name != "data/dir-replaced"]  # a file over a dir: skip it
            tf.extractall(naive, members=keep, filter="fully_trusted")
    problems = images.check_small_tree(naive)
    assert any("should have been deleted" in p for p in problems)


def test_small_image_is_reproducible(scratch: Path) -> None:
    assert images.build_small(scratch / "a") == images.build_small(scratch / "b")


@pytest.mark.slow
def test_realistic_image_runs_torch(stack: Stack, realistic_image: str) -> None:
    stack.ctr("image", "pull", "--plain-http", realistic_image, timeout=900)
    out = stack.ctr("run", "--rm", realistic_image, "t-torch-" + os.urandom(3).hex(), *images.REALISTIC_CMD)
    assert out.stdout == images.REALISTIC_OUTPUT
    layers = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                                        f"docker://{realistic_image}"], capture_output=True, text=True,
                                       check=True).stdout)["layers"]
    assert len(layers) == 3

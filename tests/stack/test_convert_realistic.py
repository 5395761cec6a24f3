"""Round trip of the realistic image (Debian + python3 + numpy + torch, ~290 MB in 3 layers): pushing it to the
local stack's registry gets it indexed by the sidecar with no manual step, and its EROFS blobs, verified chunk
by chunk, loop-mounted and stacked with overlayfs, give the same tree as containerd's overlayfs snapshotter
(content, mode, owner, xattrs, symlinks, hardlinks, mtimes of files)."""

from __future__ import annotations

from pathlib import Path

from bootseer.index import find_index
from bootseer.registry import RegistryClient
from integration.stack import Stack, wait_for
from tests.convert_util import compare_trees, containerd_tree, mounted_index


def test_realistic_image_indexed_by_the_sidecar_equals_containerd(stack: Stack, realistic_image: str,
                                                                  tmp_path: Path) -> None:
    client = RegistryClient(plain_http=True, read_timeout=120)
    man, _ = client.resolve_image(realistic_image)
    repo = realistic_image.rsplit(":", 1)[0]
    # the sidecar converts it niced, beside whatever else runs here: a generous deadline, not a timing claim
    wait_for("the sidecar's index of the realistic image",
             lambda: find_index(client, repo, man.digest) is not None, 1800,
             log=Path(stack.info.logs["sidecar"]) if "sidecar" in stack.info.logs else None)
    found = find_index(client, repo, man.digest)
    assert found is not None
    idx = found[1]
    layers = [d.digest for d in man.layers]
    assert list(idx.layers) == layers and idx.skipped == []
    with mounted_index(client, realistic_image, man.digest, layers, tmp_path / "erofs") as merged, \
            containerd_tree(stack, realistic_image, tmp_path / "ctr") as expected:
        assert compare_trees(expected, merged) == []
        assert (merged / "usr/bin/python3").exists()

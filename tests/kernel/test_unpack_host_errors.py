"""A full scratch disk while unpacking is the host's failure, not the layer's: the converter raises the OSError
(the sidecar retries the job later) instead of a LayerError (which would list the layer as skipped in the
pushed index for good).  A real 1 MiB tmpfs fills up."""

from __future__ import annotations

import errno
import io
import os
import subprocess
from pathlib import Path

import pytest

from integration.oci import entry, tar_of
from registry_sidecar.unpack import LayerError, Unpacker


def test_enospc_while_unpacking_is_not_a_bad_layer(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "bs-enospc", str(mnt)], check=True)
    try:
        (mnt / "root").mkdir()
        layer = tar_of([entry("big", os.urandom(4 << 20))])
        with pytest.raises(OSError) as ei:
            Unpacker(str(mnt / "root")).unpack(io.BytesIO(layer))
        assert not isinstance(ei.value, LayerError) and ei.value.errno == errno.ENOSPC
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

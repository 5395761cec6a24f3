"""The ckptfs FUSE mount's start-up events: one checkpoint_load line from open to release."""

from __future__ import annotations

import os
from pathlib import Path

from bootseer import events
from tests.unit.test_profile import _lines


def test_ckptfs_mount_logs_each_open_to_release(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    from bootseer.testkit import wait_until
    from ckptfs.put import put
    from ckptfs.testing import mounted

    src = tmp_path / "ckpt"
    src.mkdir()
    data = os.urandom(2 << 20)
    (src / "model.pt").write_bytes(data)
    put(str(src), f"file://{tmp_path / 'store'}")
    env = {**os.environ, events.ENV_PATH: str(log), events.ENV_JOB: "job-m"}
    with mounted(f"file://{tmp_path / 'store'}", tmp_path / "mnt", env=env):
        assert (tmp_path / "mnt" / "model.pt").read_bytes() == data
        # the kernel sends RELEASE after close() returns: the line follows shortly
        wait_until(lambda: log.exists() and log.read_text().endswith("\n"), 30, "the checkpoint_load line")
    (line,) = _lines(log)
    assert (line["phase"], line["job"], line["component"]) == ("checkpoint_load", "job-m", "ckptfs mount")
    assert line["attrs"]["path"] == "model.pt" and line["attrs"]["size"] == 2 << 20
    assert 0 < line["attrs"]["bytes"] <= 2 << 20

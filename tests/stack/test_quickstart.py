"""The README's first command: `bootseer quickstart` starts a stack, pulls the small image lazily, runs it."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

from integration import images


def _mounts_under(root: Path) -> list[str]:
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(root))]


def test_quickstart_pulls_lazily_runs_and_leaves_nothing() -> None:
    root = Path("/tmp") / f"bs-qs-{secrets.token_hex(3)}"
    proc = subprocess.run(["bootseer", "quickstart", "--root", str(root)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == images.SMALL_OUTPUT
    assert "quickstart ok (lazily pulled)" in proc.stderr
    assert "the container's output (ctr run --rm --snapshotter bootseer" in proc.stderr  # labelled
    assert "3 lazy" in proc.stderr.replace("\n", " ")
    assert _mounts_under(root) == []
    leftover = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()
    assert leftover == []

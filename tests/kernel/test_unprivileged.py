"""tests/unit needs no privilege: it passes with every capability dropped (no mounts, no loop devices, no FUSE
mount through the setuid fusermount3, no network namespaces).  Run here, as a child of the root suite, so CI
checks the claim on every run; the child keeps uid 0 for file access (the interpreter may live under 0700
/root), which still lets it write /proc/sys/vm/drop_caches — the one privilege this check cannot remove."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NO_CAPS = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]


def _unprivileged(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    assert shutil.which("setpriv"), "setpriv (util-linux) is installed by integration/install.sh"
    return subprocess.run([*NO_CAPS, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)  # type: ignore[call-overload]


def test_the_child_really_has_no_capabilities(tmp_path: Path) -> None:
    """Guards the check itself: a child that could still mount would prove nothing."""
    status = _unprivileged("cat", "/proc/self/status").stdout
    caps = {k: v.strip() for k, v in (ln.split(":", 1) for ln in status.splitlines() if ln.startswith("Cap"))}
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == "0000000000000000", caps
    (tmp_path / "m").mkdir()
    proc = _unprivileged("mount", "-t", "tmpfs", "none", str(tmp_path / "m"))
    assert proc.returncode != 0
    assert not os.path.ismount(tmp_path / "m")


def test_unit_tests_pass_without_capabilities(tmp_path: Path) -> None:
    proc = _unprivileged(sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                         "--basetemp", str(tmp_path / "t"), "tests/unit", timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout

"""Repository invariants: generated stubs are fresh, the README's commands are the ones CI runs, lint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md must start with a sh block holding the two commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_committed_stubs_match_a_fresh_generation() -> None:
    proc = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ci_runs_the_readme_test_command() -> None:
    quickstart, tests = readme_commands()[:2]
    assert "quickstart" in quickstart
    assert "pytest" in tests
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_stub_services_are_importable() -> None:
    from protos.containerd.services.content.v1 import content_pb2_grpc
    from protos.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc

    assert snapshots_pb2.DESCRIPTOR.package == "containerd.services.snapshots.v1"
    assert hasattr(snapshots_pb2_grpc, "SnapshotsServicer")
    assert hasattr(content_pb2_grpc, "ContentStub")


def test_ruff_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_clean(tmp_path: Path) -> None:
    """The project's own mypy configuration (pyproject.toml: strict on the cores), from a cold cache so a stale
    cache in the checkout cannot hide an error."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success" in proc.stdout

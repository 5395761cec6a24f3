"""What a new user meets first, without a stack: refusals that say what to do, options that are accepted where
the guide uses them, an unreachable registry named as such."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["BOOTSEER_EVENTS"] = "off"
    return subprocess.run([sys.executable, "-m", "bootseer.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_ckptfs_mount_refuses_a_non_empty_mountpoint(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(os.urandom(4096))
    assert _cli("ckptfs", "put", str(tmp_path / "ckpt"), str(tmp_path / "store")).returncode == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "precious.txt").write_text("mine")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.Popen([sys.executable, "-m", "bootseer.cli", "ckptfs", "mount", str(tmp_path / "store"),
                             str(mnt)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # it mounted (and serves in the foreground): stop it, it unmounts
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        pytest.fail("ckptfs mount mounted over a non-empty directory")
    assert proc.returncode == 2, stderr
    assert "is not empty" in stderr and "--nonempty" in stderr
    assert not os.path.ismount(mnt) and (mnt / "precious.txt").read_text() == "mine"


def test_depsnap_key_takes_the_options_of_run(tmp_path: Path) -> None:
    """`depsnap key` with `run`'s --wheels/--context (a digest base needs no registry); the key ignores wheels."""
    (tmp_path / "wheels").mkdir()
    (tmp_path / "requirements.txt").write_text("six==1.16.0\n")
    base = "registry.invalid/team/train@sha256:" + "a" * 64
    args = ("depsnap", "key", "--base", base, "-r", "requirements.txt", "--run", "pip install -r requirements.txt")
    with_wheels = _cli(*args, "--wheels", "wheels", "--context", ".", cwd=tmp_path)
    assert with_wheels.returncode == 0, with_wheels.stderr
    plain = _cli(*args, cwd=tmp_path)
    assert plain.returncode == 0 and plain.stdout == with_wheels.stdout and len(plain.stdout.strip()) == 64


@pytest.mark.parametrize("argv", [["pull", "127.0.0.1:1/team/train:v3", "--plain-http", "--control", "/nonexistent"],
                                  ["convert", "127.0.0.1:1/team/train:v3", "--plain-http"],
                                  ["hotblocks", "show", "127.0.0.1:1/team/train:v3", "--plain-http"]])
def test_an_unreachable_registry_is_named_not_dumped(argv: list[str]) -> None:
    res = _cli(*argv)
    assert res.returncode != 0
    assert "cannot reach 127.0.0.1:1: connection refused" in res.stderr, res.stderr
    assert "HTTPConnectionPool" not in res.stderr and "Max retries" not in res.stderr, res.stderr


def test_the_operator_guide_lists_every_config_key_and_a_typo_is_named(tmp_path: Path) -> None:
    import dataclasses
    import re

    from snapshotter.config import Config

    guide = (Path(__file__).resolve().parents[2] / "docs" / "operator-guide.md").read_text()
    block = next(b for b in re.findall(r"```toml\n(.*?)```", guide, re.S) if "remote_snapshots" in b)
    from bootseer.trust import generate_keypair

    # the documented file is a valid one, given the key files it names (made here: keys are read at load)
    paths = set(re.findall(r'"(/etc/bootseer/[^"]+\.pub)"', block))
    assert paths, "the documented [trust] section names its key files"
    for i, p in enumerate(sorted(paths)):
        generate_keypair(tmp_path / f"k{i}.key", tmp_path / f"k{i}.pub")
        block = block.replace(f'"{p}"', f'"{tmp_path / f"k{i}.pub"}"')
    (tmp_path / "config.toml").write_text(block)
    Config.load(tmp_path / "config.toml")
    documented = set(re.findall(r"^(\w+) =", block, re.M)) | set(re.findall(r"^\[(\w+)", block, re.M))
    missing = {f.name for f in dataclasses.fields(Config)} - documented
    assert not missing, f"keys the snapshotter reads but the operator guide does not list: {sorted(missing)}"
    (tmp_path / "typo.toml").write_text("remote_snapshot = true\n")
    with pytest.raises(ValueError, match=r"unknown keys remote_snapshot \(did you mean remote_snapshots\?\)"):
        Config.load(tmp_path / "typo.toml")


def test_config_containerd_follows_the_installed_containerd() -> None:
    import re

    installed = subprocess.run(["containerd", "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = re.search(r"\sv?(\d+)\.(\d+)\.\d+", installed).groups()  # type: ignore[union-attr]
    res = _cli("config", "containerd")
    assert res.returncode == 0, res.stderr
    assert f"for the installed containerd {major}.{minor}" in res.stderr
    chosen = _cli("config", "containerd", "--containerd-version", f"{major}.{minor}")
    assert chosen.stdout == res.stdout

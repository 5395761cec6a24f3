"""A private registry as an operator runs one (issue 22): docker-registry with its own basic auth (an htpasswd
file), the credentials in a docker config — the snapshotter's ``docker_config``, ``$DOCKER_CONFIG`` for the
commands — and no other way in.  Over it the image is pushed, converted (blob uploads, the index and its
signature: push scope), pulled lazily and run (the snapshotter's index lookups and lazy range reads with the
node's credentials); without credentials every command fails with a clear 401, and the password never appears
in any output or log."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from integration import images
from integration.oci import push
from integration.stack import Stack, StackConfig, running
from snapshotter.lazy.testing import Registry
from tests.conftest import scratch_root

USER = "ci-pusher"
PASSWORD = "pw-" + secrets.token_hex(8)


@dataclass
class World:
    st: Stack
    host: str  # the private registry
    docker_config: Path  # a $DOCKER_CONFIG directory with its credentials

    def cli(self, *args: str, creds: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "DOCKER_CONFIG"}
        env["DOCKER_CONFIG"] = str(self.docker_config if creds else self.docker_config.parent / "none")
        env["BOOTSEER_SIGNING_KEY"] = str(self.st.info.signing_key)
        env["BOOTSEER_HOSTS_DIR"] = str(Path(self.st.info.containerd_config).parent / "certs.d")
        return subprocess.run([sys.executable, "-m", "bootseer.cli", *args], capture_output=True, text=True,
                              timeout=600, env=env)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("htpasswd")
    (root / "htpasswd").write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    reg = Registry(root / "registry", htpasswd=root / "htpasswd").start()
    host = f"127.0.0.1:{reg.port}"
    dcfg = root / "docker"
    dcfg.mkdir(mode=0o700)
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (dcfg / "config.json").write_text(json.dumps({"auths": {host: {"auth": token}}}))
    (dcfg / "config.json").chmod(0o600)
    (root / "none").mkdir()
    try:
        cfg = StackConfig(root=scratch_root("hp"), cri_snapshotter="bootseer", sidecar=False,
                          snapshotter_config={"docker_config": str(dcfg / "config.json")})
        with running(cfg) as st:
            st.index_signer()  # the stack's key pair: convert signs with it, the snapshotter trusts it
            yield World(st, host, dcfg)
    finally:
        reg.stop()


def test_push_convert_pull_and_run_with_the_registrys_own_basic_auth(world: World) -> None:
    ref = f"{world.host}/team/small:v1"
    with tempfile.TemporaryDirectory(prefix="bs-hp-") as tmp:
        images.build_small(Path(tmp), "v1")
        with pytest.raises(RuntimeError, match=r"(?i)unauthorized|authentication required"):
            push(Path(tmp), "v1", ref)  # the registry really wants credentials
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"--dest-creds={USER}:{PASSWORD}",
                        f"oci:{tmp}:v1", f"docker://{ref}"], check=True, capture_output=True)

    anonymous = world.cli("convert", "--json", ref, creds=False)
    assert anonymous.returncode == 1, anonymous.stderr
    assert f"{world.host} asks for basic auth and no credentials are configured for it" in anonymous.stderr
    conv = world.cli("convert", "--json", ref)
    assert conv.returncode == 0, conv.stderr
    assert json.loads(conv.stdout)["index"]

    ns = "bs-hp-" + secrets.token_hex(3)
    try:
        denied = world.cli("pull", "--json", "-a", world.st.info.containerd_socket, "-n", ns, ref, creds=False)
        assert denied.returncode != 0 and "no credentials are configured" in denied.stderr, denied.stderr
        pulled = world.cli("pull", "--json", "-a", world.st.info.containerd_socket, "-n", ns, "--control",
                           str(world.st.info.snapshotter_control), ref)
        assert pulled.returncode == 0, pulled.stderr
        assert {lo["mode"] for lo in json.loads(pulled.stdout)["layers"]} == {"lazy"}, pulled.stdout
        out = world.st.ctr("run", "--rm", "--snapshotter", "bootseer", ref, "t-" + secrets.token_hex(3),
                           *images.SMALL_CMD, namespace=ns).stdout
        assert out == images.SMALL_OUTPUT  # read lazily, with the snapshotter's own docker_config
    finally:
        for item in world.st.ctr("images", "ls", "-q", namespace=ns, check=False).stdout.split():
            world.st.ctr("images", "rm", "--sync", item, namespace=ns, check=False)
        world.st.ctr("namespaces", "rm", ns, check=False)
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for text in (anonymous.stdout + anonymous.stderr, conv.stdout + conv.stderr, denied.stderr, pulled.stderr,
                 *(Path(p).read_text(errors="replace") for p in world.st.info.logs.values() if Path(p).is_file())):
        assert PASSWORD not in text and token not in text

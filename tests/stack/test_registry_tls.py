"""A registry behind TLS with a private CA, wired as an operator wires it (issue 22): docker-registry serving
HTTPS with a certificate from the test's own CA, the CA given in the registry's ``hosts.toml`` — on its own
``[host."https://REG"]`` entry (the usual containerd pattern) or as the file's top-level ``ca`` — and nothing
else: no ``--plain-http``, no system trust.  Over that link the image is pushed (skopeo), converted and signed
(``bootseer convert``: referrers, blob uploads, the index and its signature), pulled lazily (``bootseer pull``
and containerd itself), run (the lazy blob reads of the snapshotter), recorded (``bootseer record``: its
hot-block manifest pushed) and started again with the recorded hot blocks prefetched.

Before the fix, the host-entry form failed at conversion (CERTIFICATE_VERIFY_FAILED: the referrers request fell
through to a server endpoint without the CA), and with the top-level form the snapshotter's lazy reads ignored
the CA (they had one global TLS setting), so the layers could not be read lazily."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration import images
from integration.oci import push
from integration.stack import Stack, StackConfig, running
from integration.tls import private_ca
from snapshotter.lazy.testing import Registry
from tests.conftest import scratch_root


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running(StackConfig(root=scratch_root("tls"), cri_snapshotter="bootseer", sidecar=False)) as st:
        yield st


@pytest.fixture(params=["host-entry", "top-level"])
def tls_registry(request: pytest.FixtureRequest, stack: Stack, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A TLS registry, its hosts.toml in the stack's certs.d (containerd and the snapshotter read it), and a
    directory with only its CA (skopeo's --dest-cert-dir)."""
    cert, key, ca = private_ca(tmp_path / "pki", ["127.0.0.1"])
    (tmp_path / "skopeo-ca").mkdir()
    (tmp_path / "skopeo-ca" / "ca.crt").write_bytes(ca.read_bytes())
    reg = Registry(tmp_path / "registry", tls=(cert, key, ca)).start()
    host = f"127.0.0.1:{reg.port}"
    certs = Path(stack.info.containerd_config).parent / "certs.d"
    hdir = certs / host
    hdir.mkdir(parents=True)
    (hdir / "ca.crt").write_bytes(ca.read_bytes())
    if request.param == "host-entry":
        text = (f'server = "https://{host}"\n\n[host."https://{host}"]\n'
                'capabilities = ["pull", "resolve", "push"]\nca = "ca.crt"\n')
    else:
        text = f'server = "https://{host}"\nca = "ca.crt"\n'
    # not read as docker-style *.crt: the CA must come from what hosts.toml says
    (hdir / "hosts.toml").write_text(text)
    (hdir / "ca.crt").rename(hdir / "ca.pem")
    (hdir / "hosts.toml").write_text(text.replace("ca.crt", "ca.pem"))
    try:
        yield host, certs, tmp_path / "skopeo-ca"
    finally:
        reg.stop()
        for p in hdir.iterdir():
            p.unlink()
        hdir.rmdir()


def _cli(stack: Stack, certs: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")}
    env.update(BOOTSEER_HOSTS_DIR=str(certs), BOOTSEER_SIGNING_KEY=str(stack.info.signing_key))
    return subprocess.run([sys.executable, "-m", "bootseer.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_push_convert_pull_run_and_record_over_tls_with_a_private_ca(stack: Stack,
                                                                      tls_registry: tuple[str, Path, Path]) -> None:
    host, certs, ca_dir = tls_registry
    stack.index_signer()  # the stack's key pair exists: convert signs with it, the snapshotter trusts it
    ref = f"{host}/team/small:v1"
    with tempfile.TemporaryDirectory(prefix="bs-tls-") as tmp:
        images.build_small(Path(tmp), "v1")
        push(Path(tmp), "v1", ref, plain_http=False, cert_dir=ca_dir)
    conv = _cli(stack, certs, "convert", "--json", ref)
    assert conv.returncode == 0, conv.stderr
    assert json.loads(conv.stdout)["index"]
    # recorded first, on fresh mounts (a layer already swapped to local would not show its reads)
    rec = _cli(stack, certs, "record", "--json", "-a", stack.info.containerd_socket, "--control",
               str(stack.info.snapshotter_control), ref, "--", *images.SMALL_CMD)
    assert rec.returncode == 0, rec.stderr
    shown = _cli(stack, certs, "hotblocks", "show", "--json", ref)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["ranges"], shown.stdout
    ns = "bs-tls-" + secrets.token_hex(3)
    try:
        pulled = _cli(stack, certs, "pull", "--json", "-a", stack.info.containerd_socket, "-n", ns, "--control",
                      str(stack.info.snapshotter_control), ref)
        assert pulled.returncode == 0, pulled.stderr
        modes = {lo["mode"] for lo in json.loads(pulled.stdout)["layers"]}
        assert modes == {"lazy"}, pulled.stdout
        out = stack.ctr("run", "--rm", "--snapshotter", "bootseer", ref, "t-" + secrets.token_hex(3),
                        *images.SMALL_CMD, namespace=ns).stdout
        assert out == images.SMALL_OUTPUT
    finally:
        for item in stack.ctr("images", "ls", "-q", namespace=ns, check=False).stdout.split():
            stack.ctr("images", "rm", "--sync", item, namespace=ns, check=False)
        stack.ctr("namespaces", "rm", ns, check=False)

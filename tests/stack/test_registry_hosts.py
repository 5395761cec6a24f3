"""containerd-style ``hosts.toml``: parsing, and mirrors in front of the real registry — a mirror serves pulls
(with ``?ns=``), a failing mirror hands over to the next endpoint, pushes only go where ``push`` is allowed."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from bootseer.hosts import HostsConfigError, HostsResolver
from bootseer.registry import RegistryClient, sha256_digest
from bootseer.testkit import free_port
from integration.faultproxy import FaultProxy
from integration.stack import Stack


def test_parse_hosts_toml(tmp_path: Path) -> None:
    d = tmp_path / "r.example:5000"
    d.mkdir()
    (d / "hosts.toml").write_text(
        'server = "https://r.example:5000"\n'
        'ca = "root.pem"\n'
        '[host."https://mirror-a.example"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        '  skip_verify = true\n'
        '  [host."https://mirror-a.example".header]\n'
        '    x-custom = ["1", "2"]\n'
        '[host."http://mirror-b.example:8080/prefix/v2"]\n'
        '  capabilities = ["pull"]\n'
        '  override_path = true\n'
        '  client = [["/etc/c.pem", "/etc/c.key"]]\n')
    res = HostsResolver(tmp_path)
    a, b, server = res.endpoints("r.example:5000")
    assert a.base == "https://mirror-a.example/v2" and a.mirror and a.verify is False
    assert a.capabilities == {"pull", "resolve"} and a.headers == (("x-custom", "1"), ("x-custom", "2"))
    assert a.url("/x/manifests/v1", "r.example:5000") == "https://mirror-a.example/v2/x/manifests/v1?ns=r.example:5000"
    assert b.base == "http://mirror-b.example:8080/prefix/v2" and b.client_cert == ("/etc/c.pem", "/etc/c.key")
    assert server.base == "https://r.example:5000/v2" and not server.mirror and server.verify == str(d / "root.pem")
    assert [e.base for e in res.endpoints("r.example:5000", "resolve")] == [a.base, server.base]
    assert [e.base for e in res.endpoints("r.example:5000", "push")] == [server.base]
    # no hosts.toml: https, except loopback and --plain-http; Docker Hub's API host
    assert res.endpoints("ghcr.io")[0].base == "https://ghcr.io/v2"
    assert res.endpoints("docker.io")[0].base == "https://registry-1.docker.io/v2"
    assert res.endpoints("127.0.0.1:5000")[0].base == "http://127.0.0.1:5000/v2"
    assert HostsResolver(None, plain_http=True).endpoints("10.1.2.3:5000")[0].base == "http://10.1.2.3:5000/v2"
    (tmp_path / "bad.example").mkdir()
    (tmp_path / "bad.example" / "hosts.toml").write_text('[host."https://m"]\ncapabilities = ["fly"]\n')
    with pytest.raises(HostsConfigError, match="fly"):
        res.endpoints("bad.example")
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text('[host."https://everything.example"]\n')
    assert res.endpoints("q.example")[0].base == "https://everything.example/v2"


def test_mirror_serves_and_failing_mirror_hands_over(stack: Stack, tmp_path: Path) -> None:
    reg = stack.info.registry
    name = f"test/mirror-{secrets.token_hex(4)}"
    data = os.urandom(10_000)
    RegistryClient().push_blob(f"{reg}/{name}", data)
    digest = sha256_digest(data)
    with FaultProxy(reg) as mirror:
        # a registry name that does not resolve: everything must go through the mirror
        host = "upstream.invalid:5000"
        (tmp_path / host).mkdir()
        (tmp_path / host / "hosts.toml").write_text(
            f'server = "http://127.0.0.1:{free_port()}"\n'
            f'[host."http://{mirror.address}"]\n  capabilities = ["pull", "resolve"]\n')
        client = RegistryClient(hosts_dir=tmp_path, retries=1, backoff=0.01)
        assert client.get_blob(f"{host}/{name}", digest) == data
        assert mirror.hits[-1][1] == f"/v2/{name}/blobs/{digest}?ns={host}"
        # the mirror fails: the client moves on to the server (here unreachable → clear error naming it)
        mirror.add("status", status=503, times=100)
        with pytest.raises(Exception, match=r"ConnectionError|Connection refused"):
            client.get_blob(f"{host}/{name}", digest)
    with FaultProxy(reg) as mirror:
        host2 = "upstream2.invalid:5000"
        (tmp_path / host2).mkdir()
        (tmp_path / host2 / "hosts.toml").write_text(
            f'server = "http://{reg}"\n[host."http://{mirror.address}"]\n  capabilities = ["pull"]\n')
        client = RegistryClient(hosts_dir=tmp_path, retries=1, backoff=0.01)
        mirror.add("drop", times=100)
        assert client.get_blob(f"{host2}/{name}", digest) == data  # mirror down → upstream
        missing = f"{host2}/test/absent-{secrets.token_hex(3)}"
        mirror.clear()
        assert client.blob_exists(missing, digest) is None  # 404 on the mirror, then 404 upstream
        assert len(mirror.hits) == 1

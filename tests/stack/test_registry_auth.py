"""Registry auth: docker config parsing (base64 ``auth``, identity tokens, helpers), ``WWW-Authenticate``
parsing, and the 401 → token flow against the fault proxy in front of the real registry — with a check that
neither the password nor the token ever reaches a log line or an error message."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootseer.auth import Credentials, DockerConfig, parse_www_authenticate
from bootseer.log import setup
from bootseer.registry import RegistryClient, Unauthorized, sha256_digest
from integration.faultproxy import FaultProxy
from integration.stack import Stack

PASSWORD = "s3cr3t-" + secrets.token_hex(6)


def test_parse_www_authenticate() -> None:
    (ch,) = parse_www_authenticate(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push repository:c:pull"')
    assert ch.scheme == "bearer"
    assert ch.params == {"realm": "https://auth.example/token", "service": "registry.example",
                         "scope": "repository:a/b:pull,push repository:c:pull"}
    chs = parse_www_authenticate('Basic realm="x, y", Bearer realm=https://t/tok, error="invalid_token"')
    assert [c.scheme for c in chs] == ["basic", "bearer"]
    assert chs[0].params == {"realm": "x, y"} and chs[1].params["error"] == "invalid_token"
    assert parse_www_authenticate("") == []


def test_docker_config(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hub:pass").decode()},
        "r.example:5000": {"username": "u", "password": "p"},
        "http://other.example/v2/": {"identitytoken": "refresh-me"},
        "broken.example": {"auth": "bm9jb2xvbg=="},  # "nocolon"
    }}))
    dc = DockerConfig(cfg)
    assert dc.get("docker.io") == Credentials("hubuser", "hub:pass")
    assert dc.get("registry-1.docker.io") == Credentials("hubuser", "hub:pass")
    assert dc.get("r.example:5000") == Credentials("u", "p")
    assert dc.get("other.example") == Credentials("", "", "refresh-me")
    assert dc.get("nobody.example") is None
    with pytest.raises(Exception, match="no ':'"):
        dc.get("broken.example")
    assert "hub:pass" not in repr(dc.get("docker.io"))
    assert DockerConfig(tmp_path / "missing.json").get("docker.io") is None


def test_credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    helper = tmp_path / "docker-credential-fake"
    helper.write_text('#!/bin/sh\nread host\n[ "$host" = "h.example" ] && '
                      'echo \'{"Username":"hu","Secret":"hs"}\' && exit 0\necho "credentials not found"; exit 1\n')
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"credHelpers": {"h.example": "fake"}, "credsStore": "fake"}))
    assert DockerConfig(cfg).get("h.example") == Credentials("hu", "hs")
    assert DockerConfig(cfg).get("other.example") is None


@pytest.fixture
def image_repo(stack: Stack) -> Iterator[tuple[str, str]]:
    """(repo on the real registry, a blob digest in it)."""
    c = RegistryClient()
    r = f"{stack.info.registry}/test/auth-{secrets.token_hex(4)}"
    data = os.urandom(4096)
    c.push_blob(r, data)
    yield r, sha256_digest(data)


def _docker_config(tmp_path: Path, host: str, user: str, password: str) -> Path:
    cfg = tmp_path / "config.json"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    cfg.write_text(json.dumps({"auths": {f"http://{host}": {"auth": token}}}))
    return cfg


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """Every log line of the test, formatted by bootseer.log at DEBUG."""

    class Capture(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(self.format(record))

    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    setup("debug", "json")
    cap = Capture()
    cap.setFormatter(root.handlers[0].formatter)
    root.handlers.append(cap)
    logging.getLogger("urllib3").setLevel(logging.DEBUG)
    try:
        yield cap.lines
    finally:
        root.handlers[:] = old_handlers
        root.setLevel(old_level)


def test_bearer_token_flow_with_docker_config(stack: Stack, image_repo: tuple[str, str], tmp_path: Path,
                                               logs: list[str]) -> None:
    r, digest = image_repo
    with FaultProxy(stack.info.registry, auth="bearer", username="alice", password=PASSWORD) as proxy:
        via = r.replace(stack.info.registry, proxy.address)
        client = RegistryClient(credentials=_docker_config(tmp_path, proxy.address, "alice", PASSWORD))
        assert len(client.get_blob(via, digest)) == 4096
        assert client.blob_exists(via, digest) == 4096
        whats = [w for _, _, w in proxy.hits]
        assert whats[:3] == ["401 bearer", "token", "200"], whats
        assert proxy.tokens_issued == 1  # the second request reused the cached token
        issued = next(iter(proxy._tokens))
        # wrong password: a clear error naming the host, without the secret
        bad = RegistryClient(credentials=_docker_config(tmp_path, proxy.address, "alice", "wrong-" + PASSWORD))
        with pytest.raises(Unauthorized, match="refused the credentials") as exc:
            bad.get_blob(via, digest)
        assert PASSWORD not in str(exc.value)
    text = "\n".join(logs)
    assert logs, "expected debug logging from the client"
    assert PASSWORD not in text and issued not in text
    assert base64.b64encode(f"alice:{PASSWORD}".encode()).decode() not in text


def test_anonymous_bearer_and_basic(stack: Stack, image_repo: tuple[str, str], tmp_path: Path) -> None:
    r, digest = image_repo
    with FaultProxy(stack.info.registry, auth="bearer") as proxy:  # token realm hands out anonymous tokens
        via = r.replace(stack.info.registry, proxy.address)
        assert len(RegistryClient(credentials={}).get_blob(via, digest)) == 4096
    with FaultProxy(stack.info.registry, auth="basic", username="bob", password=PASSWORD) as proxy:
        via = r.replace(stack.info.registry, proxy.address)
        client = RegistryClient(credentials={proxy.address: Credentials("bob", PASSWORD)})
        assert len(client.get_blob(via, digest)) == 4096
        assert len(client.get_blob(via, digest)) == 4096
        assert [w for _, _, w in proxy.hits].count("401 basic") == 1  # basic is then sent up front
        with pytest.raises(Unauthorized, match="no credentials are configured"):
            RegistryClient(credentials={}).get_blob(via, digest)

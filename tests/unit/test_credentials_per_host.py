"""Credentials go only to the host they belong to (issue 18): a mirror from hosts.toml never receives the
upstream registry's token, neither from the registry client nor from the lazy fetcher, and neither reads proxies
or ~/.netrc from the environment.  Real docker-registry behind a real bearer-token front; the mirror is a real
HTTP server that records what it is sent and has nothing (404), so every read ends at the upstream."""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bootseer.auth import Credentials
from bootseer.index import chunk_digests
from bootseer.reference import Reference
from bootseer.registry import RegistryClient
from integration.faultproxy import FaultProxy
from snapshotter.lazy.cache import ChunkCache
from snapshotter.lazy.fetcher import Fetcher
from snapshotter.lazy.handler import RegistryAuthHook
from snapshotter.lazy.scheduling import Scheduler
from snapshotter.lazy.spec import BlobSpec
from snapshotter.lazy.testing import Registry
from snapshotter.lazy.transport import HttpClient

PASSWORD = "s3cret-" + secrets.token_hex(8)
CS = 64 << 10


class _Mirror(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[str, str, list[tuple[str, str | None]], bytes, str]]:
    """(upstream host, mirror base URL, what the mirror saw, blob, repository)."""
    reg = Registry(tmp_path / "reg").start()
    seen: list[tuple[str, str | None]] = []
    mirror = ThreadingHTTPServer(("127.0.0.1", 0), type("M", (_Mirror,), {"seen": seen}))
    t = threading.Thread(target=mirror.serve_forever, daemon=True)
    t.start()
    try:
        with FaultProxy(reg.url.removeprefix("http://"), auth="bearer", username="alice",
                        password=PASSWORD) as up:
            data = os.urandom(5 * CS + 123)
            repo = f"cred/blob{secrets.token_hex(3)}"
            RegistryClient().push_blob(f"{reg.url.removeprefix('http://')}/{repo}", data)
            yield up.address, f"http://127.0.0.1:{mirror.server_address[1]}", seen, data, repo
    finally:
        mirror.shutdown()
        mirror.server_close()
        t.join(10)
        reg.stop()


def _client(tmp_path: Path, up: str, mirror: str) -> RegistryClient:
    hosts = tmp_path / "certs.d" / up
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(f'server = "http://{up}"\n\n[host."{mirror}"]\n'
                                      'capabilities = ["pull", "resolve"]\n')
    return RegistryClient(hosts_dir=tmp_path / "certs.d", credentials={up: Credentials("alice", PASSWORD)})


def test_the_mirror_never_gets_the_upstream_token(world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    up, mirror, seen, data, repo = world
    # an environment that would reroute or add credentials if it were read
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".netrc").write_text(f"machine 127.0.0.1 login mallory password {PASSWORD}-netrc\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "")

    client = _client(tmp_path, up, mirror)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert client.blob_exists(Reference.parse(f"{up}/{repo}"), digest) == len(data)  # mirror 404, upstream 200
    assert seen and all(auth is None for _, auth in seen), seen

    hook = RegistryAuthHook(client, {f"http://{up}": up})
    spec = BlobSpec(registry=f"http://{up}", mirrors=(mirror,), repository=repo, digest=digest, size=len(data),
                    chunk_size=CS, chunks=chunk_digests(data, CS))
    assert str(hook(spec, f"http://{up}", refresh=False).get("Authorization", "")).startswith("Bearer ")
    assert "Authorization" not in hook(spec, mirror, refresh=False)

    seen.clear()
    f = Fetcher(spec, ChunkCache(tmp_path / "cache", spec), scheduler=Scheduler(8, 2), client=HttpClient(hook))
    assert f.read(0, len(data)) == data
    assert seen and all(auth is None for _, auth in seen), seen  # the fetcher asked the mirror first, bare

"""The sidecar's HTTP side against hostile peers (issue 18): off loopback nobody queues conversions (which
spend the push credentials) or lists jobs (which name private repositories) without the token; a bad
Content-Length cannot hang a thread; the job table is bounded; a job that keeps killing the converter fails.
Real HTTP: the sidecar listens on every address and the test reaches it over this host's non-loopback one."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from registry_sidecar.sidecar import SidecarConfig, SidecarServer
from registry_sidecar.state import QueueFull, State

TOKEN = "t0ps3cret-t0ps3cret-t0ps3cret"


def _external_ip() -> str:
    """An address of this host that is not loopback (connections to it come from it, too)."""
    out = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout)
    for link in out:
        for a in link.get("addr_info", []):
            if not a["local"].startswith("127."):
                return str(a["local"])
    pytest.fail("this host has no non-loopback IPv4 address to reach the sidecar from off loopback")


def _events(repo: str, n: int = 1) -> bytes:
    return json.dumps({"events": [{
        "action": "push", "request": {"useragent": "docker/24.0"},
        "target": {"repository": repo, "digest": f"sha256:{i:064x}", "tag": f"v{i}",
                   "mediaType": "application/vnd.oci.image.manifest.v1+json"}} for i in range(n)]}).encode()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    """Start a sidecar's HTTP side (no conversion workers: nothing here needs a registry)."""
    servers: list[tuple[SidecarServer, threading.Thread]] = []

    def start(**cfg: object) -> SidecarServer:
        s = SidecarServer(SidecarConfig(listen="0.0.0.0:0", state_dir=str(tmp_path / f"st{len(servers)}"),
                                        **cfg))  # type: ignore[arg-type]
        t = threading.Thread(target=s.httpd.serve_forever, daemon=True)
        t.start()
        servers.append((s, t))
        return s

    yield start
    for s, t in servers:
        s.httpd.shutdown()
        s.httpd.server_close()
        t.join(10)
        s.sidecar.state.close()


def _urls(s: SidecarServer) -> tuple[str, str]:
    port = s.httpd.server_address[1]
    return f"http://127.0.0.1:{port}", f"http://{_external_ip()}:{port}"


def test_off_loopback_needs_the_token_and_loopback_does_not(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = serve()  # no token configured: only loopback peers
    local, remote = _urls(s)
    r = requests.post(remote + "/events", data=_events("private/a"), timeout=10)
    assert r.status_code == 403
    assert requests.get(remote + "/jobs", timeout=10).status_code == 403
    assert s.sidecar.state.counts()["queued"] == 0
    assert requests.post(local + "/events", data=_events("private/a"), timeout=10).json() == {"queued": 1}
    assert requests.get(remote + "/healthz", timeout=10).status_code in (200, 503)  # not secret

    (tmp_path / "token").write_text(TOKEN + "\n")
    s2 = serve(token_file=str(tmp_path / "token"))
    _, remote2 = _urls(s2)
    bad = requests.post(remote2 + "/events", data=_events("private/b"), timeout=10,
                        headers={"Authorization": "Bearer wrong-wrong-wrong-wrong"})
    assert bad.status_code == 401
    good = requests.post(remote2 + "/events", data=_events("private/b"), timeout=10,
                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert good.json() == {"queued": 1}
    listed = requests.get(remote2 + "/jobs", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
    assert [j["repo"] for j in listed] == ["private/b"]


def test_a_short_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("short")
    with pytest.raises(ValueError, match="at least 16"):
        SidecarConfig(token_file=str(tmp_path / "token")).token()


@pytest.mark.parametrize("header", ["Content-Length: -1", "Content-Length: abc", ""])
def test_a_bad_content_length_is_answered_at_once(serve, header: str) -> None:  # type: ignore[no-untyped-def]
    s = serve()
    port = s.httpd.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(f"POST /events HTTP/1.1\r\nHost: x\r\n{header + chr(13) + chr(10) if header else ''}\r\n".encode())
        status = c.recv(1024).split(b"\r\n", 1)[0]  # a socket timeout here (10 s) fails the test
    assert status in (b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 411 Length Required"), status


def test_the_job_table_is_bounded(serve) -> None:  # type: ignore[no-untyped-def]
    s = serve(max_queued=3)
    local, _ = _urls(s)
    assert requests.post(local + "/events", data=_events("r/x", 3), timeout=10).json() == {"queued": 3}
    r = requests.post(local + "/events", data=_events("r/y", 1), timeout=10)
    assert r.status_code == 503  # not persisted: the registry retries the delivery later
    assert s.sidecar.state.counts()["queued"] == 3


def test_a_job_that_keeps_killing_the_converter_fails(tmp_path: Path) -> None:
    st = State(tmp_path / "s.sqlite")
    try:
        assert st.enqueue("r/oom", "sha256:" + "1" * 64) and st.enqueue("r/ok", "sha256:" + "2" * 64)
        for crash in (1, 2):
            job = st.claim(now=1e12)
            assert job is not None and job.repo == "r/oom"  # requeued with next_at 0 after the first crash: first again
            n, failed = st.requeue_running(max_crashes=2, next_at=0.0 if crash == 1 else 5.0)
            assert (n, [j.repo for j in failed]) == ((1, []) if crash == 1 else (0, ["r/oom"]))
        assert st.find("r/oom", "sha256:" + "1" * 64).state == "failed"  # type: ignore[union-attr]
        assert "died 2 times" in st.find("r/oom", "sha256:" + "1" * 64).last_error  # type: ignore[union-attr]
        nxt = st.claim(now=1e12)
        assert nxt is not None and nxt.repo == "r/ok"
        with pytest.raises(QueueFull):
            st.enqueue("r/more", "sha256:" + "3" * 64, max_queued=0)
    finally:
        st.close()

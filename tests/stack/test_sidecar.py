"""The registry sidecar: a tag pushed to the local stack's registry gets its index with no manual step (the
registry's notifications → the sidecar → converter); and a sidecar of the test's own (same code, own state
dir) that keeps its queue and layer map across restarts, requeues a job a crash interrupted, retries transient
registry failures, never converts a manifest twice, and serves /healthz and /metrics."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from bootseer.index import find_index
from bootseer.registry import RegistryClient
from integration import images
from integration.faultproxy import FaultProxy
from integration.stack import Stack, wait_for
from registry_sidecar.sidecar import SidecarConfig, SidecarServer, parse_events
from registry_sidecar.state import State
from tests.convert_util import push_layout


@pytest.fixture
def client() -> RegistryClient:
    return RegistryClient(plain_http=True, retries=3, backoff=0.01, read_timeout=30)


@pytest.fixture(scope="module")
def small_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("small") / "layout"
    images.build_small(d)
    return d


def envelope(repo: str, digest: str, tag: str, *, action: str = "push", agent: str = "docker/24.0",
             media_type: str = "application/vnd.oci.image.manifest.v1+json") -> bytes:
    """A notification envelope as distribution 2.8 sends it."""
    return json.dumps({"events": [{
        "id": str(uuid.uuid4()), "timestamp": "2026-11-23T09:00:00Z", "action": action,
        "target": {"mediaType": media_type, "size": 1234, "digest": digest, "length": 1234, "repository": repo,
                   "url": f"http://registry/v2/{repo}/manifests/{digest}", "tag": tag},
        "request": {"id": str(uuid.uuid4()), "addr": "127.0.0.1:4000", "host": "registry", "method": "PUT",
                    "useragent": agent},
        "actor": {}, "source": {"addr": "registry:5000", "instanceID": str(uuid.uuid4())}}]}).encode()


def jobs(url: str) -> list[dict[str, Any]]:
    return list(requests.get(f"{url}/jobs", timeout=5).json())


def post(url: str, body: bytes) -> dict[str, Any]:
    r = requests.post(f"{url}/events", data=body, timeout=10,
                      headers={"Content-Type": "application/vnd.docker.distribution.events.v1+json"})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_push_to_the_stack_registry_gets_an_index(stack: Stack, client: RegistryClient, small_layout: Path) -> None:
    assert stack.info.sidecar_url, "the local stack starts the sidecar when registry_sidecar is present"
    repo = f"{stack.info.registry}/test/pushed-{secrets.token_hex(4)}"
    ref, man = push_layout(client, small_layout, repo, tag="v1")
    wait_for("index of the pushed image", lambda: find_index(client, repo, man.digest) is not None, 300,
             log=Path(stack.info.logs["sidecar"]))
    found = find_index(client, ref, man.digest)
    assert found is not None and list(found[1].layers) == [d.digest for d in man.layers]
    health = requests.get(f"{stack.info.sidecar_url}/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = requests.get(f"{stack.info.sidecar_url}/metrics", timeout=5).text
    assert 'bootseer_sidecar_jobs{state="done"}' in metrics


def test_parse_events_keeps_image_tag_pushes_only() -> None:
    d = "sha256:" + "a" * 64
    assert [p.repo for p in parse_events(envelope("t/x", d, "v1"))[0]] == ["t/x"]
    assert parse_events(envelope("t/x", d, "v1", action="pull")) == ([], 1)
    assert parse_events(envelope("t/x", d, ""))[0] == []  # untagged: a child of an index, or an artifact
    assert parse_events(envelope("t/x", d, "sha256-" + "b" * 64))[0] == []  # the referrers tag schema
    assert parse_events(envelope("t/x", d, "v1", agent="bootseer-sidecar/0.1"))[0] == []  # our own pushes
    assert parse_events(envelope("t/x", d, "v1", media_type="application/octet-stream"))[0] == []
    with pytest.raises(ValueError, match="no 'events' list"):
        parse_events(b'{"nope": 1}')


@pytest.fixture
def sidecar_cfg(stack: Stack, tmp_path: Path) -> SidecarConfig:
    return SidecarConfig(listen="127.0.0.1:0", registry=stack.info.registry, state_dir=str(tmp_path / "state"),
                         plain_http=True, retry_base=0.05, retry_max=0.5, max_attempts=5)


@pytest.fixture
def own_repo(stack: Stack) -> str:
    return f"test/side-{secrets.token_hex(4)}"


@pytest.fixture
def server(sidecar_cfg: SidecarConfig) -> Iterator[SidecarServer]:
    with SidecarServer(sidecar_cfg) as s:
        yield s


def test_restart_keeps_state_and_never_converts_twice(stack: Stack, client: RegistryClient, small_layout: Path,
                                                      sidecar_cfg: SidecarConfig, own_repo: str) -> None:
    reg = stack.info.registry
    # pushed by digest, so the stack's own sidecar leaves it to ours (the envelope names a tag)
    ref, man = push_layout(client, small_layout, f"{reg}/{own_repo}")
    body = envelope(own_repo, man.digest, "v1")
    with SidecarServer(sidecar_cfg) as s:
        assert post(s.url, body) == {"queued": 1}
        wait_for("job done", lambda: jobs(s.url)[0]["state"] == "done", 300)
        assert post(s.url, body) == {"queued": 0}  # distribution delivers at least once
        first = json.loads(jobs(s.url)[0]["result"])
        assert first[0]["converted"] == 3 and first[0]["index"]
        metrics = requests.get(f"{s.url}/metrics", timeout=5).text
        assert 'bootseer_sidecar_job_runs_total{outcome="done"} 1.0' in metrics
        assert "bootseer_sidecar_known_layers 3.0" in metrics
    assert find_index(client, ref, man.digest) is not None

    # a crash with a job in flight: the same image in a second repository, claimed but never finished
    other = f"test/side-copy-{secrets.token_hex(4)}"
    push_layout(client, small_layout, f"{reg}/{other}", mount_from=(own_repo,))
    st = State(Path(sidecar_cfg.state_dir) / "sidecar.sqlite")
    assert st.enqueue(other, man.digest, "v2")
    claimed = st.claim()
    assert claimed is not None and claimed.state == "running"
    st.close()
    with SidecarServer(sidecar_cfg) as s:  # restarted on the same state
        assert post(s.url, body) == {"queued": 0}  # the first job is remembered as done
        wait_for("requeued job done", lambda: all(j["state"] == "done" for j in jobs(s.url)), 300)
        by_repo = {j["repo"]: j for j in jobs(s.url)}
        assert len(by_repo) == 2 and by_repo[other]["attempts"] == 2
        second = json.loads(by_repo[other]["result"])
        # the layer map survived: the layers were mounted from the first repository, not converted again
        assert second[0]["reused"] == 3 and second[0]["converted"] == 0
        health = requests.get(f"{s.url}/healthz", timeout=5).json()
        assert health["status"] == "ok" and health["jobs"]["done"] == 2
    assert find_index(client, f"{reg}/{other}", man.digest) is not None


def test_transient_failures_are_retried_and_permanent_ones_fail(stack: Stack, client: RegistryClient,
                                                                small_layout: Path, sidecar_cfg: SidecarConfig,
                                                                own_repo: str) -> None:
    reg = stack.info.registry
    _, man = push_layout(client, small_layout, f"{reg}/{own_repo}")
    with FaultProxy(reg) as proxy:
        sidecar_cfg.registry = proxy.address
        # the whole registry answers 503 for a while: more than the client's own retries
        proxy.add("status", path=f"/manifests/{man.digest}", method="GET", status=503, times=12)
        missing = "sha256:" + "0" * 64
        with SidecarServer(sidecar_cfg) as s:
            post(s.url, envelope(own_repo, man.digest, "v1"))
            post(s.url, envelope(own_repo, missing, "gone"))
            wait_for("jobs settled", lambda: {j["state"] for j in jobs(s.url)} <= {"done", "failed"}, 300)
            by_digest = {j["digest"]: j for j in jobs(s.url)}
            assert by_digest[man.digest]["state"] == "done" and by_digest[man.digest]["attempts"] > 1
            assert by_digest[missing]["state"] == "failed" and "404" in by_digest[missing]["last_error"]
            assert by_digest[missing]["attempts"] == 1  # a missing manifest is not retried
            # a new push of a failed manifest gives it a fresh start
            assert post(s.url, envelope(own_repo, missing, "gone")) == {"queued": 1}
    assert find_index(client, f"{reg}/{own_repo}", man.digest) is not None


def test_healthz_reports_a_dead_worker(server: SidecarServer) -> None:
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    server.sidecar._stop.set()
    with server.sidecar._wake:
        server.sidecar._wake.notify_all()
    for t in server.sidecar._workers:
        t.join(10)
    r = requests.get(f"{server.url}/healthz", timeout=5)
    assert r.status_code == 503 and r.json()["status"] == "degraded"
    assert requests.post(f"{server.url}/events", data=b"not json", timeout=5).status_code == 400


def test_an_index_push_converts_each_platform_manifest(stack: Stack, client: RegistryClient, small_layout: Path,
                                                       sidecar_cfg: SidecarConfig, own_repo: str) -> None:
    from bootseer.registry import MT_OCI_INDEX, MT_OCI_MANIFEST, Manifest

    reg = stack.info.registry
    _, amd = push_layout(client, small_layout, f"{reg}/{own_repo}")
    # an "arm64" image: the same layers under another config (so another manifest digest)
    cfg = json.dumps({"architecture": "arm64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    cdesc = client.push_blob(f"{reg}/{own_repo}", cfg)
    doc = dict(amd.doc, config={"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdesc.digest,
                                "size": cdesc.size})
    arm = Manifest.from_bytes(json.dumps(doc).encode(), MT_OCI_MANIFEST)
    client.put_manifest(f"{reg}/{own_repo}@{arm.digest}", arm.raw, MT_OCI_MANIFEST)
    index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": [
        {"mediaType": MT_OCI_MANIFEST, "digest": amd.digest, "size": len(amd.raw),
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": MT_OCI_MANIFEST, "digest": arm.digest, "size": len(arm.raw),
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": MT_OCI_MANIFEST, "digest": amd.digest, "size": len(amd.raw),  # an attestation's slot
         "platform": {"os": "unknown", "architecture": "unknown"}}]}
    raw = json.dumps(index).encode()
    idigest = client.put_manifest(f"{reg}/{own_repo}@{Manifest.from_bytes(raw).digest}", raw, MT_OCI_INDEX)
    with SidecarServer(sidecar_cfg) as s:
        assert post(s.url, envelope(own_repo, idigest, "multi", media_type=MT_OCI_INDEX)) == {"queued": 1}
        wait_for("index job done", lambda: jobs(s.url)[0]["state"] == "done", 300)
        result = json.loads(jobs(s.url)[0]["result"])
    assert sorted(r["manifest"] for r in result) == sorted([amd.digest, arm.digest])
    assert sorted(r["converted"] + r["reused"] for r in result) == [3, 3]
    for m in (amd, arm):
        assert find_index(client, f"{reg}/{own_repo}", m.digest) is not None

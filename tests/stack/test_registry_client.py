"""The registry client against the session stack's real docker-registry (distribution 2.8), directly and through
the fault-injecting proxy: blobs (range, monolithic/chunked upload, cross-repo mount), manifests and platform
selection, the referrers tag-schema fallback, digest verification, retries and resumption."""

from __future__ import annotations

import io
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootseer.registry import (
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    DigestMismatch,
    Manifest,
    NotFound,
    Platform,
    RegistryClient,
    RegistryError,
    TransientError,
    referrers_tag,
    sha256_digest,
)
from integration.faultproxy import FaultProxy
from integration.stack import Stack


@pytest.fixture
def registry(stack: Stack) -> str:
    return stack.info.registry


@pytest.fixture
def client() -> RegistryClient:
    return RegistryClient(retries=3, backoff=0.01, read_timeout=10)


@pytest.fixture
def proxy(registry: str) -> Iterator[FaultProxy]:
    with FaultProxy(registry) as p:
        yield p


def repo(registry: str, name: str = "t") -> str:
    return f"{registry}/test/{name}-{secrets.token_hex(4)}"


def push_image(client: RegistryClient, ref: str, arch: str = "amd64", media_type: str = MT_OCI_MANIFEST,
               tag: str | None = None) -> Manifest:
    """A tiny image (random layer) pushed by digest (or ``tag``); returns its manifest."""
    layer = os.urandom(2048)
    config = json.dumps({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    ld, cd = client.push_blob(ref, layer), client.push_blob(ref, config)
    doc = {"schemaVersion": 2, "mediaType": media_type,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.digest, "size": cd.size},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld.digest, "size": ld.size}]}
    raw = json.dumps(doc).encode()
    client.put_manifest(ref if tag else f"{ref}@{sha256_digest(raw)}", raw, media_type, tag)  # no tag: by digest
    return Manifest.from_bytes(raw, media_type)


def test_blobs_monolithic_chunked_range_and_mount(client: RegistryClient, registry: str, tmp_path: Path) -> None:
    a, b, c = repo(registry, "a"), repo(registry, "b"), repo(registry, "c")
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = sha256_digest(data)
    assert client.blob_exists(a, digest) is None
    client.push_blob(a, data)  # one PUT
    f = tmp_path / "blob"
    f.write_bytes(data)
    sent: list[int] = []
    client.push_blob(b, f, chunk_size=1 << 20, progress=sent.append)  # PATCH x4 + PUT
    assert sum(sent) == len(data)
    for r in (a, b):
        assert client.blob_exists(r, digest) == len(data)
        buf = io.BytesIO()
        assert client.fetch_blob(r, digest, buf, len(data)) == len(data)
        assert buf.getvalue() == data
    assert client.get_blob_range(b, digest, 1_000_000, 123_456) == data[1_000_000:1_123_456]
    assert client.get_blob_range(b, digest, len(data) - 5, 5) == data[-5:]
    assert client.mount_blob(c, digest, a.split("/", 1)[1]) is True
    assert client.blob_exists(c, digest) == len(data)
    assert client.mount_blob(c, sha256_digest(b"nowhere"), a.split("/", 1)[1]) is False
    with pytest.raises(NotFound):
        client.get_blob(a, sha256_digest(b"nowhere"))


def test_manifests_and_platform_selection(client: RegistryClient, registry: str) -> None:
    for index_type, manifest_type in ((MT_OCI_INDEX, MT_OCI_MANIFEST), (MT_DOCKER_LIST, MT_DOCKER_MANIFEST)):
        r = repo(registry, "multi")
        amd, arm = push_image(client, r, "amd64", manifest_type), push_image(client, r, "arm64", manifest_type)
        index = {"schemaVersion": 2, "mediaType": index_type, "manifests": [
            {"mediaType": manifest_type, "digest": amd.digest, "size": len(amd.raw),
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": manifest_type, "digest": arm.digest, "size": len(arm.raw),
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": manifest_type, "digest": amd.digest, "size": len(amd.raw),
             "platform": {"os": "unknown", "architecture": "unknown"}},
        ]}
        raw = json.dumps(index).encode()
        client.put_manifest(f"{r}:v1", raw, index_type)
        top = client.get_manifest(f"{r}:v1")
        assert top.is_index and top.digest == sha256_digest(raw) and top.media_type == index_type
        m, idx = client.resolve_image(f"{r}:v1", "linux/arm64")
        assert m.digest == arm.digest and idx is not None and idx.digest == top.digest
        m, _ = client.resolve_image(f"{r}:v1", Platform("linux", "amd64"))
        assert m.digest == amd.digest and m.media_type == manifest_type
        assert [d.digest for d in m.layers] == [d.digest for d in amd.layers]
        with pytest.raises(NotFound, match=r"linux/s390x.*has: .*linux/amd64"):
            client.resolve_image(f"{r}:v1", "linux/s390x")
        head = client.head_manifest(f"{r}:v1")
        assert head is not None and head.digest == top.digest
        assert client.head_manifest(f"{r}:nope") is None
        assert "v1" in client.list_tags(r)


def test_referrers_tag_schema_fallback(client: RegistryClient, registry: str) -> None:
    r = repo(registry, "subj")
    # by digest, not by tag: the session stack's sidecar converts every pushed *tag* and would attach its own
    # index referrer to this subject, updating the same tag index from another process meanwhile
    subject = push_image(client, r)
    client.push_blob(r, b"{}")
    arts = []
    for at in ("application/vnd.example.a", "application/vnd.example.b"):
        doc = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "artifactType": at,
               "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(b"{}"),
                          "size": 2},
               "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(b"{}"),
                           "size": 2}],
               "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": len(subject.raw)},
               "annotations": {"n": at}}
        arts.append(client.push_referrer(r, json.dumps(doc).encode()))
    arts.append(client.push_referrer(r, json.dumps(doc).encode()))  # same again: no duplicate entry
    found = client.referrers(r, subject.digest)
    assert [d.digest for d in found] == arts[:2]
    assert [d.artifact_type for d in found] == ["application/vnd.example.a", "application/vnd.example.b"]
    only_b = client.referrers(r, subject.digest, "application/vnd.example.b")
    assert [d.digest for d in only_b] == [arts[1]] and only_b[0].annotations == {"n": "application/vnd.example.b"}
    assert referrers_tag(subject.digest) in client.list_tags(r)  # distribution 2.8: the tag schema was used
    assert client.referrers(r, sha256_digest(b"no such subject")) == []


def test_registry_without_referrers_api_is_asked_through_the_tag_schema_only(registry: str,
                                                                             proxy: FaultProxy) -> None:
    """distribution 2.8 has no referrers route (a bare 404): after the first lookup the client goes straight
    to the tag schema, one round trip less on every image pull."""
    client = RegistryClient(retries=0, read_timeout=10)
    r = repo(proxy.address, "noapi")
    subject = push_image(client, r)
    proxy.clear()
    for _ in range(3):
        assert client.referrers(r, subject.digest) == []
    api = [h for h in proxy.hits if "/referrers/" in h[1]]
    tags = [h for h in proxy.hits if "/manifests/" + referrers_tag(subject.digest) in h[1]]
    assert len(api) == 1 and len(tags) == 3, proxy.hits


def test_digest_verification(client: RegistryClient, registry: str, proxy: FaultProxy) -> None:
    r = repo(registry, "verify")
    m = push_image(client, r, tag="v1")
    data = os.urandom(100_000)
    client.push_blob(r, data)
    via = r.replace(registry, proxy.address)
    proxy.add("corrupt", path=r"/blobs/sha256:", method="GET", times=10)
    with pytest.raises(DigestMismatch, match=sha256_digest(data)):
        client.fetch_blob(via, sha256_digest(data), io.BytesIO(), len(data))
    with pytest.raises(DigestMismatch):
        client.get_blob(via, sha256_digest(data))
    proxy.clear()
    proxy.add("corrupt", path=r"/manifests/", method="GET", times=10)
    with pytest.raises(DigestMismatch):
        client.get_manifest(f"{via}@{m.digest}")
    with pytest.raises(DigestMismatch):  # by tag: checked against the Docker-Content-Digest the registry announces
        client.get_manifest(f"{via}:v1")


@pytest.mark.parametrize("action", ["status", "drop", "delay"])
def test_retries_on_transient_faults(registry: str, proxy: FaultProxy, action: str) -> None:
    client = RegistryClient(retries=3, backoff=0.01, read_timeout=1.0)
    r = repo(registry, "retry")
    m = push_image(client, r, tag="v1")
    via = r.replace(registry, proxy.address)
    proxy.add(action, path=r"/manifests/v1", times=2, status=503, delay=2.5)
    got = client.get_manifest(f"{via}:v1")
    assert got.digest == m.digest
    whats = [w for meth, p, w in proxy.hits if p.endswith("/manifests/v1")]
    assert len(whats) == 3 and whats[-1] == "200", whats


def test_retries_exhausted_reported_clearly(registry: str, proxy: FaultProxy) -> None:
    client = RegistryClient(retries=2, backoff=0.01)
    r = repo(registry, "down")
    push_image(client, r, tag="v1")
    via = r.replace(registry, proxy.address)
    proxy.add("status", path=r"/manifests/v1", times=100, status=503)
    with pytest.raises(TransientError, match=r"manifests/v1 on 127\.0\.0\.1:\d+: HTTP 503 \(UNAVAILABLE"):
        client.get_manifest(f"{via}:v1")
    assert len(proxy.hits) == 3
    proxy.clear()
    proxy.add("drop", path=r"/manifests/v1", times=100)
    with pytest.raises(TransientError, match="ConnectionError"):
        client.get_manifest(f"{via}:v1")


def test_download_resumes_after_cut_and_upload_restarts(client: RegistryClient, registry: str,
                                                        proxy: FaultProxy) -> None:
    r = repo(registry, "resume")
    via = r.replace(registry, proxy.address)
    data = os.urandom(2_000_000)
    proxy.add("cut", path=r"/blobs/sha256:", method="GET")
    client.push_blob(r, data)
    buf = io.BytesIO()
    assert client.fetch_blob(via, sha256_digest(data), buf, len(data)) == len(data)
    assert buf.getvalue() == data
    gets = [w for meth, p, w in proxy.hits if meth == "GET"]
    assert gets[0].endswith("cut") and len(gets) == 2
    # an upload whose PATCH fails is restarted from scratch (a PATCH is not idempotent)
    proxy.clear()
    proxy.add("status", method="PATCH", status=500)
    other = os.urandom(3_000_000)
    client.push_blob(via, other, chunk_size=1 << 20)
    assert client.blob_exists(r, sha256_digest(other)) == len(other)
    assert sum(1 for meth, _, _ in proxy.hits if meth == "POST") == 2


def test_an_upload_that_lost_a_commit_race_is_looked_up_then_retried(registry: str, proxy: FaultProxy) -> None:
    """Builders on several nodes push the same blob at once (two `depsnap run` racing on one key, seen in CI):
    docker-registry may answer the loser's commit DIGEST_INVALID.  The push looks for the blob, then uploads
    again — and gives up with that error only when it persists."""
    data = os.urandom(1 << 20)
    client = RegistryClient(retries=2, backoff=0.01, read_timeout=10)
    ref = f"{proxy.address}/race/blob{secrets.token_hex(3)}:v1"
    proxy.add("status", method="PUT", path=r".*/blobs/uploads/.*", status=400, code="DIGEST_INVALID")
    client.push_blob(ref, data)
    assert client.get_blob(ref, sha256_digest(data)) == data
    proxy.add("status", method="PUT", path=r".*/blobs/uploads/.*", status=400, code="DIGEST_INVALID", times=10)
    with pytest.raises(RegistryError, match="DIGEST_INVALID"):
        client.push_blob(ref.replace(":v1", "-2:v1"), os.urandom(1 << 20))


def test_a_manifest_put_that_met_a_link_being_rewritten_is_sent_again(proxy: FaultProxy) -> None:
    """The manifest's side of that race: docker-registry reads a blob's link while another push of the blob
    rewrites it and answers the manifest PUT 400 DIGEST_INVALID beside MANIFEST_BLOB_UNKNOWN (seen in CI).  The
    PUT is sent again after a pause; a DIGEST_INVALID that persists is raised, and no other refusal is retried."""
    client = RegistryClient(retries=2, backoff=0.01, read_timeout=10)
    ref = f"{proxy.address}/race/man{secrets.token_hex(3)}:v0"
    raw = push_image(client, ref).raw
    proxy.clear()  # (the faults and the record of hits)

    def manifest_puts() -> int:
        return sum(1 for meth, path, _ in proxy.hits if meth == "PUT" and "/manifests/" in path)

    proxy.add("status", method="PUT", path=r".*/manifests/.*", status=400, code="DIGEST_INVALID")
    assert client.put_manifest(ref.replace(":v0", ":v1"), raw, MT_OCI_MANIFEST) == sha256_digest(raw)
    assert client.get_manifest(ref.replace(":v0", ":v1")).digest == sha256_digest(raw)
    assert manifest_puts() == 2
    proxy.add("status", method="PUT", path=r".*/manifests/.*", status=400, code="DIGEST_INVALID", times=10)
    with pytest.raises(RegistryError, match="DIGEST_INVALID"):
        client.put_manifest(ref.replace(":v0", ":v2"), raw, MT_OCI_MANIFEST)
    assert manifest_puts() == 2 + 3
    proxy.clear()  # (the faults and the record of hits)
    proxy.add("status", method="PUT", path=r".*/manifests/.*", status=400, code="MANIFEST_INVALID", times=10)
    with pytest.raises(RegistryError, match="MANIFEST_INVALID"):
        client.put_manifest(ref.replace(":v0", ":v3"), raw, MT_OCI_MANIFEST)
    assert manifest_puts() == 1

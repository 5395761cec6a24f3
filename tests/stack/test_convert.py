"""The layer converter against the session stack's real registry and containerd: the EROFS blobs of an image,
loop-mounted and stacked with overlayfs, give exactly the tree containerd's overlayfs snapshotter unpacks;
converting twice gives the same bytes; hostile or corrupt layers are refused with a clear reason and leave
nothing behind, while the rest of the image is still indexed; registry faults are retried or reported."""

from __future__ import annotations

import base64
import gzip
import json
import os
import secrets
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from bootseer.index import find_index
from bootseer.registry import (
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_LAYER_ZSTD,
    MT_OCI_MANIFEST,
    RegistryClient,
    TransientError,
    sha256_digest,
)
from integration import images
from integration.faultproxy import FaultProxy
from integration.oci import entry, tar_of
from integration.stack import Stack
from registry_sidecar.convert import ConvertOptions, ImageConverter, MemoryLayerMap, convert_layer_file
from registry_sidecar.unpack import LayerError
from tests.convert_util import compare_trees, containerd_tree, mounted_index, push_layout

D, L, H, C = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE


@pytest.fixture
def client() -> RegistryClient:
    return RegistryClient(plain_http=True, retries=3, backoff=0.01, read_timeout=30)


def unique_repo(stack: Stack, name: str) -> str:
    return f"{stack.info.registry}/test/{name}-{secrets.token_hex(4)}"


@pytest.fixture
def small_layout(tmp_path: Path) -> Path:
    images.build_small(tmp_path / "small")
    return tmp_path / "small"


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def push_image(client: RegistryClient, repo: str, layers: list[tuple[str, bytes]]) -> tuple[str, str]:
    """Push an image of raw ``(media type, blob)`` layers by digest; returns (``repo@digest``, manifest digest)."""
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    client.push_blob(repo, cfg)
    descs = []
    for mt, blob in layers:
        client.push_blob(repo, blob)
        descs.append({"mediaType": mt, "digest": sha256_digest(blob), "size": len(blob)})
    raw = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": sha256_digest(cfg), "size": len(cfg)},
                      "layers": descs}).encode()
    digest = client.put_manifest(f"{repo}@{sha256_digest(raw)}", raw, MT_OCI_MANIFEST)  # by digest: no tag
    return f"{repo}@{digest}", digest


# ------------------------------------------------------------------------------------------- round trip
def test_small_image_round_trip_equals_containerd_and_is_deterministic(stack: Stack, client: RegistryClient,
                                                                       small_layout: Path, tmp_path: Path) -> None:
    ref, man = push_layout(client, small_layout, unique_repo(stack, "small"))
    layer_digests = [d.digest for d in man.layers]
    work = tmp_path / "scratch"
    conv = ImageConverter(client, ConvertOptions(workdir=work))
    first = conv.convert(ref)
    assert [lr.status for lr in first.layers] == ["converted"] * 3 and first.index_digest
    assert list(work.iterdir()) == []  # scratch cleaned
    with mounted_index(client, ref, man.digest, layer_digests, tmp_path / "erofs") as merged, \
            containerd_tree(stack, ref, tmp_path / "ctr") as expected:
        assert compare_trees(expected, merged) == []
        assert images.check_small_tree(merged) == []
    # the same layers converted again from scratch (no layer map): the same blobs, the same index artifact
    again = ImageConverter(client, ConvertOptions(workdir=work), MemoryLayerMap()).convert(ref, force=True)
    assert [lr.blob.blob.digest for lr in again.layers if lr.blob] == \
        [lr.blob.blob.digest for lr in first.layers if lr.blob]
    assert again.index_digest == first.index_digest
    # an indexed image is left alone; a layer known to the map is reused, not converted
    assert conv.convert(ref).already_indexed
    other = unique_repo(stack, "small-copy")
    ref2, _ = push_layout(client, small_layout, other, mount_from=(ref.split("/", 1)[1].split("@")[0],))
    copy = conv.convert(ref2)
    assert [lr.status for lr in copy.layers] == ["reused"] * 3
    found = find_index(client, ref2, man.digest)
    assert found is not None and set(found[1].layers) == set(layer_digests)


def test_layer_conversion_is_byte_identical_across_runs(tmp_path: Path) -> None:
    data = gz(tar_of([entry("d/", kind=D, mode=0o750, uid=7, gid=8), entry("d/f", os.urandom(300_000)),
                      entry("d/l", kind=L, linkname="f"), entry("d/h", kind=H, linkname="d/f"),
                      entry("d/x", b"x", xattrs={"user.k": "v"}), entry("d/.wh.gone", b"")]))
    blob = tmp_path / "layer"
    blob.write_bytes(data)
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        out.mkdir()
        outs.append(convert_layer_file(blob, MT_OCI_LAYER_GZIP, sha256_digest(data), out))
    assert outs[0].blob == outs[1].blob
    assert outs[0].path.read_bytes() == outs[1].path.read_bytes()


# ---------------------------------------------------------------------------------------------- hostile
def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def _corrupt_middle(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0x5A for b in data[mid : mid + 64]) + data[mid + 64 :]


BIG = os.urandom(200_000)
HOSTILE: dict[str, tuple[str, Callable[[], bytes], str]] = {
    "dotdot": (MT_OCI_LAYER, lambda: tar_of([entry("a/../../evil", b"x")]), r"contains '\.\.'"),
    "absolute": (MT_OCI_LAYER, lambda: tar_of([entry("/etc/evil", b"x")]), "absolute path"),
    "symlink-escape": (MT_OCI_LAYER, lambda: tar_of([entry("a", kind=L, linkname="../../.."),
                                                     entry("a/evil", b"x")]), "leads out of the layer"),
    "symlink-chain-escape": (MT_OCI_LAYER, lambda: tar_of([entry("d/", kind=D), entry("d/up", kind=L, linkname=".."),
                                                           entry("d/esc", kind=L, linkname="up/.."),
                                                           entry("d/esc/evil", b"x")]), "leads out of the layer"),
    "hardlink-escape": (MT_OCI_LAYER, lambda: tar_of([entry("h", kind=H, linkname="../etc/shadow")]),
                        r"contains '\.\.'"),
    "hardlink-via-symlink": (MT_OCI_LAYER, lambda: tar_of([entry("s", kind=L, linkname="/"),
                                                           entry("h", kind=H, linkname="s/etc/shadow")]),
                             "does not exist in this layer|not in this layer"),
    "duplicate": (MT_OCI_LAYER, lambda: tar_of([entry("f", b"first"), entry("f", b"second")]), "duplicate"),
    "duplicate-over-implied-dir": (MT_OCI_LAYER, lambda: tar_of([entry("d/f", b"x"), entry("d", b"file now")]),
                                   "duplicate"),
    "whiteout-of-own-entry": (MT_OCI_LAYER, lambda: tar_of([entry("f", b"x"), entry(".wh.f", b"")]),
                              "which this layer also creates"),
    "overlay-xattr": (MT_OCI_LAYER, lambda: tar_of([entry("d/", kind=D, xattrs={"trusted.overlay.opaque": "y"})]),
                      "overlay metadata xattr"),
    "truncated-gzip": (MT_OCI_LAYER_GZIP, lambda: gz(tar_of([entry("f", BIG)]))[:-5000], "truncated"),
    "corrupt-gzip": (MT_OCI_LAYER_GZIP, lambda: _corrupt_middle(gz(tar_of([entry("f", BIG)]))), "corrupt"),
    "not-gzip": (MT_OCI_LAYER_GZIP, lambda: tar_of([entry("f", b"x")]), "not a gzip stream"),
    "truncated-zstd": (MT_OCI_LAYER_ZSTD, lambda: _zstd(tar_of([entry("f", BIG)]))[:-5000], "truncated"),
    "truncated-tar": (MT_OCI_LAYER, lambda: tar_of([entry("f", BIG)])[:100_000], "truncated"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layer_refused_and_nothing_left(case: str, tmp_path: Path) -> None:
    mt, build, message = HOSTILE[case]
    data = build()
    blob = tmp_path / "layer"
    blob.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LayerError, match=message):
        convert_layer_file(blob, mt, sha256_digest(data), out)
    assert list(out.iterdir()) == []


def test_device_nodes_follow_policy(tmp_path: Path) -> None:
    data = tar_of([entry("dev/", kind=D), entry("dev/null", kind=C, devmajor=1, devminor=3, mode=0o666)])
    blob = tmp_path / "layer"
    blob.write_bytes(data)
    for allow in (False, True):
        out = tmp_path / f"out-{allow}"
        out.mkdir()
        opts = ConvertOptions(allow_devices=allow)
        if allow:
            assert convert_layer_file(blob, MT_OCI_LAYER, sha256_digest(data), out, opts).stats.devices == 1
        else:
            with pytest.raises(LayerError, match="device nodes are not allowed"):
                convert_layer_file(blob, MT_OCI_LAYER, sha256_digest(data), out, opts)
            assert list(out.iterdir()) == []


def test_image_with_bad_layers_is_indexed_for_the_rest(stack: Stack, client: RegistryClient, tmp_path: Path) -> None:
    """Unknown media type, hostile and wrong-digest layers are skipped with their reason; the CLI says so
    (exit 3, JSON summary) and the good layers are indexed and mountable."""
    good1 = gz(tar_of([entry("a/", kind=D), entry("a/one", b"one\n")]))
    good2 = _zstd(tar_of([entry("b/", kind=D), entry("b/two", b"two\n", mode=0o600, uid=5, gid=6)]))
    hostile = gz(tar_of([entry("../x", b"x")]))
    mismatched = gz(tar_of([entry("c", b"corrupted on the way, every time\n")]))
    repo = unique_repo(stack, "bad")
    layers = [(MT_OCI_LAYER_GZIP, good1), ("application/vnd.example.unknown", b"whatever"),
              (MT_OCI_LAYER_GZIP, hostile), (MT_OCI_LAYER_GZIP, mismatched), (MT_OCI_LAYER_ZSTD, good2)]
    ref, mdigest = push_image(client, repo, layers)
    with FaultProxy(stack.info.registry) as proxy:
        # the registry's bytes for this one layer never match its digest (both downloads are damaged)
        proxy.add("corrupt", path=f"/blobs/{sha256_digest(mismatched)}", method="GET", times=100)
        via = ref.replace(stack.info.registry, proxy.address)
        proc = subprocess.run([sys.executable, "-m", "bootseer.cli", "convert", "--plain-http", "--json", via],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    reasons = {s["digest"]: s["reason"] for s in summary["skipped"]}
    assert "unsupported layer media type 'application/vnd.example.unknown'" in reasons[sha256_digest(b"whatever")]
    assert "refused" in reasons[sha256_digest(hostile)] and "'..'" in reasons[sha256_digest(hostile)]
    assert "does not match the manifest" in reasons[sha256_digest(mismatched)]
    assert summary["converted"] == 2 and summary["index"]
    for r in reasons:
        assert r in proc.stderr  # the reasons are printed for people too
    found = find_index(client, repo, mdigest)
    assert found is not None
    idx = found[1]
    assert list(idx.layers) == [sha256_digest(good1), sha256_digest(good2)]
    assert {s["digest"] for s in idx.skipped} == set(reasons)
    with mounted_index(client, ref, mdigest, list(idx.layers), tmp_path / "m") as merged:
        assert (merged / "a/one").read_text() == "one\n" and (merged / "b/two").read_text() == "two\n"
        st = os.lstat(merged / "b/two")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (5, 6, 0o600)


def test_an_image_with_nothing_convertible_gets_no_index(stack: Stack, client: RegistryClient) -> None:
    repo = unique_repo(stack, "none")
    ref, mdigest = push_image(client, repo, [(MT_OCI_LAYER, os.urandom(4096))])  # not a tar
    res = ImageConverter(client).convert(ref)
    assert res.index_digest is None and res.layers[0].status == "skipped"
    assert "not a tar stream" in res.layers[0].reason or "truncated" in res.layers[0].reason
    assert find_index(client, repo, mdigest) is None


# ------------------------------------------------------------------------------------------ registry faults
@pytest.fixture
def proxy(stack: Stack) -> Iterator[FaultProxy]:
    with FaultProxy(stack.info.registry) as p:
        yield p


def test_registry_faults_are_retried(stack: Stack, proxy: FaultProxy, small_layout: Path, tmp_path: Path) -> None:
    client = RegistryClient(plain_http=True, retries=3, backoff=0.01, read_timeout=2.0)
    ref, man = push_layout(client, small_layout, unique_repo(stack, "faults"))
    via = ref.replace(stack.info.registry, proxy.address)
    proxy.add("status", path="/manifests/", method="GET", times=2, status=503)
    proxy.add("drop", path=f"/blobs/{man.layers[0].digest}", method="GET")
    proxy.add("cut", path=f"/blobs/{man.layers[2].digest}", method="GET")
    proxy.add("delay", path=f"/blobs/{man.layers[1].digest}", method="GET", delay=3.0)
    proxy.add("status", path="/blobs/uploads/", method="PUT", status=500)
    proxy.add("status", path="/manifests/sha256-", method="PUT", status=502)  # the referrers tag index
    res = ImageConverter(client, ConvertOptions(workdir=tmp_path / "w")).convert(via)
    assert [lr.status for lr in res.layers] == ["converted"] * 3
    whats = {w.split()[0] for _, _, w in proxy.hits}
    assert {"status", "drop", "delay"} <= whats and any(w.endswith("cut") for _, _, w in proxy.hits)
    assert find_index(client, ref, man.digest) is not None
    assert list((tmp_path / "w").iterdir()) == []


def test_registry_outage_is_reported_clearly_and_leaves_nothing(stack: Stack, proxy: FaultProxy,
                                                                small_layout: Path, tmp_path: Path) -> None:
    client = RegistryClient(plain_http=True, retries=2, backoff=0.01, read_timeout=10)
    ref, man = push_layout(client, small_layout, unique_repo(stack, "outage"))
    via = ref.replace(stack.info.registry, proxy.address)
    proxy.add("status", path="/blobs/uploads/", status=503, times=10_000)
    with pytest.raises(TransientError, match=r"blobs/uploads.* HTTP 503"):
        ImageConverter(client, ConvertOptions(workdir=tmp_path / "w")).convert(via)
    assert list((tmp_path / "w").iterdir()) == []
    assert find_index(client, ref, man.digest) is None


def test_convert_through_a_token_registry_with_docker_credentials(stack: Stack, small_layout: Path,
                                                                  tmp_path: Path) -> None:
    """401 then the bearer-token flow, with the credentials from a docker config; none of them in the output."""
    client = RegistryClient(plain_http=True)
    ref, man = push_layout(client, small_layout, unique_repo(stack, "auth"))
    secret = "s3cret-" + secrets.token_hex(4)
    with FaultProxy(stack.info.registry, auth="bearer", username="ci", password=secret) as proxy:
        cfg = tmp_path / "config.json"
        cfg.write_text(json.dumps({"auths": {proxy.address: {
            "auth": base64.b64encode(f"ci:{secret}".encode()).decode()}}}))
        via = ref.replace(stack.info.registry, proxy.address)
        proc = subprocess.run([sys.executable, "-m", "bootseer.cli", "convert", "--plain-http", "--json",
                               "--docker-config", str(cfg), "--log-level", "debug", via],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["converted"] == 3
        assert proxy.tokens_issued >= 1 and any(w == "401 bearer" for _, _, w in proxy.hits)
        assert secret not in proc.stdout + proc.stderr
        # without credentials: a clear refusal, not a hang or a traceback
        bad = subprocess.run([sys.executable, "-m", "bootseer.cli", "convert", "--plain-http", "--force",
                              "--docker-config", str(tmp_path / "none.json"), via],
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    assert find_index(client, ref, man.digest) is not None

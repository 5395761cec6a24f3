"""``bootseer pull`` and the CRI path with a *mixed* image: the small test image converted, then indexed with
one of its three layers left out, so two layers are lazy (remote snapshots over FUSE → loop → erofs) and one is
downloaded and applied the ordinary way — on top of, and below, lazy ones.  The container's filesystem must
be exactly the small image's (whiteouts and opaque directories across the layer boundaries included).  An
image without any index is pulled the ordinary way.  Also the pure parts: chain IDs and the CRI labels.

The stack runs without the sidecar (this test writes the index itself) and with BootSeer as CRI snapshotter."""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bootseer.containerd import Containerd
from bootseer.control import Control
from bootseer.cri import CRIClient
from bootseer.pull import chain_ids, layer_labels
from bootseer.registry import RegistryClient
from integration import images
from integration.stack import Stack, StackConfig, running
from protos.containerd.services.snapshots.v1 import snapshots_pb2 as spb
from tests.conftest import scratch_root


def test_chain_ids_and_cri_labels() -> None:
    a, b, c = ("sha256:" + hashlib.sha256(x).hexdigest() for x in (b"a", b"b", b"c"))
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert chain_ids([a, b, c]) == [a, ab, "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()]
    labels = layer_labels("r/x:1", "sha256:m", ["sha256:l0", "sha256:l1", "sha256:l2"], 1, "sha256:ch")
    assert labels == {"containerd.io/snapshot.ref": "sha256:ch",
                      "containerd.io/snapshot/cri.image-ref": "r/x:1",
                      "containerd.io/snapshot/cri.manifest-digest": "sha256:m",
                      "containerd.io/snapshot/cri.layer-digest": "sha256:l1",
                      "containerd.io/snapshot/cri.image-layers": "sha256:l1,sha256:l2"}
    many = [f"sha256:{i:064x}" for i in range(100)]  # the following-layers label stays under containerd's 4 KiB
    lab = layer_labels("r/x:1", "sha256:m", many, 0, "sha256:ch")["containerd.io/snapshot/cri.image-layers"]
    assert 0 < len(lab) + len("containerd.io/snapshot/cri.image-layers") <= 4096 and lab.startswith(many[0])


@pytest.fixture(scope="module")
def mixed() -> Iterator[tuple[Stack, str, str, list[str]]]:
    """(stack, mixed image ref, plain image ref, layer digests left lazy)."""
    from bootseer.index import ImageIndex, manifest_descriptor, push_index
    from registry_sidecar.convert import convert_image

    with running(StackConfig(root=scratch_root("pl"), cri_snapshotter="bootseer", sidecar=False)) as st:
        ref = images.push_small(st.info.registry, repo="bootseer/small-mixed")
        plain = st.info.sandbox_image  # busybox, pushed by the stack, never indexed (no sidecar)
        client = RegistryClient(hosts_dir=str(Path(st.info.containerd_config).parent / "certs.d"), plain_http=True)
        signer = st.index_signer()  # the stack's snapshotter uses signed indexes only
        res = convert_image(client, ref, signer=signer)
        man, _ = client.resolve_image(ref)
        full = ImageIndex.from_json(client.get_blob(ref, _index_blob(client, ref, res.index_digest)))
        # index v3 by default: the registry holds each layer's zstd frames, and the lazy layers read them
        assert full.version == 3 and all(lb.wire is not None for lb in full.layers.values())
        left_out = man.layers[1].digest
        part = ImageIndex(man.digest, {d: lb for d, lb in full.layers.items() if d != left_out})
        push_index(client, ref, part, manifest_descriptor(man), signer=signer)
        assert res.index_digest is not None
        client.delete_manifest(ref, res.index_digest)  # only the partial index is left
        yield st, ref, plain, [d for d in part.layers]


def _index_blob(client: RegistryClient, ref: str, artifact: str | None) -> str:
    from bootseer.index import INDEX_MEDIA_TYPE
    from bootseer.reference import Reference

    assert artifact is not None
    man = client.get_manifest(Reference.parse(ref).with_digest(artifact))
    return next(d.digest for d in man.layers if d.media_type == INDEX_MEDIA_TYPE)


def _pull(st: Stack, ns: str, ref: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bootseer.cli", "pull", "--json", "-a", st.info.containerd_socket,
                          "-n", ns, "--hosts-dir", str(Path(st.info.containerd_config).parent / "certs.d"), ref],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


@pytest.fixture
def ns(mixed: tuple[Stack, str, str, list[str]]) -> Iterator[str]:
    st = mixed[0]
    name = "bs-pl-" + secrets.token_hex(3)
    yield name
    for item in st.ctr("images", "ls", "-q", namespace=name, check=False).stdout.split():
        st.ctr("images", "rm", "--sync", item, namespace=name, check=False)
    st.ctr("namespaces", "rm", name, check=False)


def _tree_problems(st: Stack, ns: str, top_chain: str) -> list[str]:
    """Mount a view of ``top_chain`` as containerd hands it out and compare with the small image."""
    key = "view-" + secrets.token_hex(3)
    target = Path(tempfile.mkdtemp(prefix="bs-pl-view-"))
    with Containerd(st.info.containerd_socket, ns) as cd:
        r = cd.snapshots.View(spb.ViewSnapshotRequest(snapshotter="bootseer", key=key, parent=top_chain),
                              metadata=cd.md(), timeout=60)
        try:
            [m] = r.mounts
            subprocess.run(["mount", "-t", "none" if m.type == "bind" else m.type, "-o", ",".join(m.options),
                            m.source, str(target)], check=True)
            try:
                return images.check_small_tree(target)
            finally:
                subprocess.run(["umount", str(target)], check=True)
        finally:
            cd.remove("bootseer", key)
            target.rmdir()


def test_mixed_image_bootseer_pull_and_ctr_run(mixed: tuple[Stack, str, str, list[str]], ns: str) -> None:
    st, ref, _, lazy_layers = mixed
    res = _pull(st, ns, ref)
    modes = {lo["digest"]: lo["mode"] for lo in res["layers"]}
    assert [modes[d] for d in lazy_layers] == ["lazy", "lazy"] and list(modes.values()).count("pulled") == 1, res
    out = st.ctr("run", "--rm", "--snapshotter", "bootseer", ref, "m-" + secrets.token_hex(3), *images.SMALL_CMD,
                 namespace=ns)
    assert out.stdout == images.SMALL_OUTPUT
    assert _tree_problems(st, ns, res["layers"][-1]["chain_id"]) == []
    assert _pull(st, ns, ref)["downloaded_bytes"] == 0  # pulling again: everything is there


def test_mixed_image_cri_path(mixed: tuple[Stack, str, str, list[str]]) -> None:
    st, ref, _, _ = mixed
    with CRIClient(st.info.containerd_socket) as cri:
        r = cri.run(ref, images.SMALL_CMD, timeout=120)
        try:
            assert (r.exit_code, r.stdout_text) == (0, images.SMALL_OUTPUT)
            remote = []  # what containerd's CRI namespace holds as remote snapshots of ours
            listing = st.ctr("snapshots", "--snapshotter", "bootseer", "ls", namespace="k8s.io").stdout
            for line in listing.splitlines()[1:]:
                key = line.split()[0]
                info = json.loads(st.ctr("snapshots", "--snapshotter", "bootseer", "info", key,
                                         namespace="k8s.io").stdout)
                if (info.get("Labels") or {}).get("containerd.io/snapshot/remote") == "bootseer":
                    remote.append(key)
            assert len(remote) == 2, remote
        finally:
            cri.remove_image(ref)
    assert st.info.snapshotter_control
    layers = Control(st.info.snapshotter_control).call("status")["layers"]
    # both lazy blobs known; with every image gone, containerd's GC removed the snapshots and so released them
    assert len(layers) == 2 and not any(x["mounted"] for x in layers), layers


def test_image_without_index_is_pulled_the_ordinary_way(mixed: tuple[Stack, str, str, list[str]], ns: str) -> None:
    st, _, plain, _ = mixed
    res = _pull(st, ns, plain)
    assert [lo["mode"] for lo in res["layers"]] == ["pulled"]
    assert res["downloaded_bytes"] == res["layers"][0]["size"]
    out = st.ctr("run", "--rm", "--snapshotter", "bootseer", plain, "p-" + secrets.token_hex(3), "/bin/sh", "-c",
                 "echo ordinary", namespace=ns)
    assert out.stdout == "ordinary\n"


def test_racing_remote_prepares_of_one_layer_keep_it_held(mixed: tuple[Stack, str, str, list[str]]) -> None:
    """Two Prepares naming the same target at once (two pulls of one image): both answered ALREADY_EXISTS,
    one snapshot recorded, and the loser's clean-up does not drop the winner's hold on the layer."""
    import threading

    from bootseer.pull import LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_CRI_MANIFEST_DIGEST, LABEL_SNAPSHOT_REF
    from tests.snapshotter_fixtures import Client, code_of

    st, ref, _, lazy_layers = mixed
    assert st.info.snapshotter_socket and st.info.snapshotter_control
    client = RegistryClient(hosts_dir=str(Path(st.info.containerd_config).parent / "certs.d"), plain_http=True)
    man, _ = client.resolve_image(ref)
    layer = man.layers[0].digest
    assert layer in lazy_layers
    # The name the layer is committed under must be the chain ID the image's config gives it (the snapshotter
    # refuses a lazy layer under any other: issue 18).  Unprefixed by a namespace, as containerd 1.6's proxy
    # sends it, it is a name no other test uses (theirs carry "<namespace>/<n>/"): the handler is asked.
    from bootseer.reference import Reference
    from snapshotter.lazy.index_reader import image_layers

    target = image_layers(client, Reference.parse(ref), man.digest).chain_id(0)
    labels = {LABEL_SNAPSHOT_REF: target, LABEL_CRI_IMAGE_REF: ref, LABEL_CRI_MANIFEST_DIGEST: man.digest,
              LABEL_CRI_LAYER_DIGEST: layer}
    c = Client(Path(st.info.snapshotter_socket), namespace=None)  # as containerd 1.6's proxy calls
    codes: list[object] = []
    gate = threading.Barrier(4)

    def prepare(i: int) -> None:
        gate.wait()
        codes.append(code_of(c.prepare, f"extract-{i} {target}", "", labels))

    threads = [threading.Thread(target=prepare, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert codes == [grpc.StatusCode.ALREADY_EXISTS] * 4
        assert [i.name for i in c.list()].count(target) == 1
        held = [x for x in Control(st.info.snapshotter_control).call("status")["layers"] if f"/{target}" in x["owners"]]
        assert len(held) == 1 and held[0]["mounted"], held
    finally:
        c.remove(target)
        c.close()
    after = Control(st.info.snapshotter_control).call("status")["layers"]
    assert not [x for x in after if f"/{target}" in x["owners"]]


def test_pull_command_failures_keep_their_exit_codes_and_reasons() -> None:
    """`bootseer pull` ends without the interpreter's teardown (cli.FAST_EXIT): a script still sees why and how
    it failed — 1 with the reason for a bad reference, 2 with click's message for a bad option."""
    bad = subprocess.run([sys.executable, "-m", "bootseer.cli", "pull", "-a", "/nonexistent/containerd.sock",
                          "Not A Reference"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1, bad
    assert "error:" in bad.stderr and "Not A Reference" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "bootseer.cli", "pull", "--no-such-option", "x"],
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2, usage
    assert "No such option" in usage.stderr


def test_pull_of_a_multi_platform_index_takes_the_platform_asked_for(mixed: tuple[Stack, str, str, list[str]],
                                                                      ns: str) -> None:
    """``bootseer pull --platform``: an OCI index with linux/amd64 (the small image, its layers lazy) and no
    arm64: asking for linux/amd64 pulls that manifest lazily; linux/arm64 is a clear error naming what the
    index has."""
    from bootseer.registry import MT_OCI_INDEX

    st, ref, _, lazy = mixed
    client = RegistryClient(hosts_dir=str(Path(st.info.containerd_config).parent / "certs.d"), plain_http=True)
    man, _ = client.resolve_image(ref)
    doc = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
           "manifests": [{"mediaType": man.media_type, "digest": man.digest, "size": len(man.raw),
                          "platform": {"os": "linux", "architecture": "amd64"}}]}
    multi = f"{st.info.registry}/bootseer/small-mixed:multi"
    client.put_manifest(multi, json.dumps(doc).encode(), MT_OCI_INDEX)

    def pull(platform: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bootseer.cli", "pull", "--json", "-a", st.info.containerd_socket,
                               "-n", ns, "--hosts-dir", str(Path(st.info.containerd_config).parent / "certs.d"),
                               "--platform", platform, multi], capture_output=True, text=True, timeout=300)

    missing = pull("linux/arm64")
    assert missing.returncode != 0 and "linux/arm64" in missing.stderr and "linux/amd64" in missing.stderr, \
        missing.stderr
    got = pull("linux/amd64")
    assert got.returncode == 0, got.stderr
    res = json.loads(got.stdout)
    assert res["manifest"] == man.digest
    assert [lo["mode"] == "lazy" for lo in res["layers"]] == [d.digest in lazy for d in man.layers]


@pytest.mark.parametrize("variant", ["index-v2", "unknown-codec"])
def test_small_image_from_a_v2_index_and_a_layer_of_an_unknown_wire_codec(
        mixed: tuple[Stack, str, str, list[str]], ns: str, variant: str) -> None:
    """A v2 index (``bootseer convert --index-version 2``: the EROFS blobs fetched as stored) is still lazy on a
    v3 node; a v3 layer whose chunks travel in a codec this node does not read is pulled the ordinary way, the
    others stay lazy.  The container sees the small image either way."""
    from dataclasses import replace

    from bootseer.index import ImageIndex, manifest_descriptor, push_index
    from registry_sidecar.convert import ConvertOptions, convert_image

    st = mixed[0]
    ref = images.push_small(st.info.registry, repo=f"bootseer/small-{variant}-{secrets.token_hex(3)}")
    client = RegistryClient(hosts_dir=str(Path(st.info.containerd_config).parent / "certs.d"), plain_http=True)
    signer = st.index_signer()
    res = convert_image(client, ref, signer=signer,
                        opts=ConvertOptions(index_version=2 if variant == "index-v2" else 3))
    man, _ = client.resolve_image(ref)
    full = ImageIndex.from_json(client.get_blob(ref, _index_blob(client, ref, res.index_digest)))
    odd = man.layers[1].digest
    if variant == "index-v2":
        assert full.version == 2 and not any(lb.wire for lb in full.layers.values())
    else:
        lb = full.layers[odd]
        assert lb.wire is not None
        layers = {**full.layers, odd: replace(lb, wire=replace(lb.wire, codec="x-newer-codec", frames=()))}
        push_index(client, ref, ImageIndex(man.digest, layers), manifest_descriptor(man), signer=signer)
        assert res.index_digest is not None
        client.delete_manifest(ref, res.index_digest)  # only the one naming the unknown codec is left
    out = _pull(st, ns, ref)
    modes = [lo["mode"] for lo in out["layers"]]
    want = ["lazy"] * len(man.layers)
    if variant == "unknown-codec":
        want[1] = "pulled"
        log = Path(st.info.logs["snapshotter"]).read_text()
        assert "codec 'x-newer-codec'" in log and "ordinary pull of that layer" in log
    assert modes == want, out
    run = st.ctr("run", "--rm", "--snapshotter", "bootseer", ref, "v-" + secrets.token_hex(3), *images.SMALL_CMD,
                 namespace=ns)
    assert run.stdout == images.SMALL_OUTPUT
    assert _tree_problems(st, ns, out["layers"][-1]["chain_id"]) == []

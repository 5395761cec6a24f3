"""Hostile tenants and registry writers against a node (issue 18, items 1 and 2), on the local stack: containerd
1.6 with BootSeer's snapshotter, the registry, indexes signed with the stack's key (trust mode "require").

* **Chain-ID poisoning.**  A tenant's image whose config claims the small image's first diffID over its own
  layer (contents differ: ``/data/keep.txt`` says "poisoned"), converted and signed like any pushed image, is
  pulled first into a shared namespace; a later pull of the real image in that namespace must read the real
  bytes.  Before the diffID binding its layer went lazy and was committed under the real layer's chain ID.
* **Index substitution.**  A newer referrer for the real image whose entry points the first layer at the
  tenant's EROFS blob — unsigned, or signed by a key the node does not trust — is ignored: the node still
  serves the real bytes.  Before signatures, the newest referrer won.
* **Hostile hot-block manifests** (item 4).  A recording whose blob claims 2^63-1 bytes and asks to prefetch
  2^62 of them, and a Parquet file whose footer hides pages that unpack to 512 MiB, are refused as they are
  read (a warning names each); the containers start, nothing is prefetched, the daemon stays up and its peak
  memory grows by far less than the bomb.
* **Pinned indexes** (``bootseer convert --bind``).  The bound image's manifest names its index: the node uses
  that one even when a newer referrer signed by a trusted key (a converter's key in the wrong hands) is attached
  to the bound digest, and a bound index without a trusted signature is not used (ordinary pull).
* **Tarpit** (item 4).  A registry front that drips its index answers one byte a second: its image's Prepares
  give up the lookup at ``lookup_timeout`` and pull the ordinary way, while an image of a healthy registry,
  pulled meanwhile, goes lazy.  Before, each lookup read the dripping body to its end (minutes per request).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from bootseer.index import INDEX_MEDIA_TYPE, ImageIndex, manifest_descriptor, push_index
from bootseer.reference import Reference
from bootseer.registry import Descriptor, RegistryClient
from bootseer.testkit import wait_until
from bootseer.trust import Signer, generate_keypair
from integration import images
from integration.faultproxy import FaultProxy
from integration.oci import Layout, entry, push
from integration.stack import Stack, StackConfig, running
from registry_sidecar.convert import convert_image
from snapshotter.lazy.index_reader import image_layers
from tests.conftest import scratch_root

READ_KEEP = ["/bin/sh", "-c", "cat /data/keep.txt"]


@dataclass
class World:
    st: Stack
    client: RegistryClient
    signer: Signer
    evil: str  # the tenant's image (its config lies about its diffID)

    @property
    def certs(self) -> str:
        return str(Path(self.st.info.containerd_config).parent / "certs.d")


def _push_evil(st: Stack, claimed_diff_id: str) -> str:
    """A one-layer image of busybox and a poisoned /data/keep.txt whose config claims ``claimed_diff_id``."""
    ref = f"{st.info.registry}/tenant/evil:v1"
    with tempfile.TemporaryDirectory(prefix="bs-evil-") as tmp:
        lay = Layout(Path(tmp))
        lay.add_entries([*images._busybox_entries(), entry("data/", kind=tarfile.DIRTYPE, mode=0o755),
                         entry("data/keep.txt", b"poisoned\n")], "the tenant's own layer")
        lay.layers[0] = replace(lay.layers[0], diff_id=claimed_diff_id)  # the lie
        lay.finish("v1", {"Cmd": READ_KEEP, "Env": ["PATH=/bin"]})
        push(Path(tmp), "v1", ref)
    return ref


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with running(StackConfig(root=scratch_root("tr"), cri_snapshotter="bootseer", sidecar=False,
                             snapshotter_config={"lookup_timeout": 4.0})) as st:
        client = RegistryClient(hosts_dir=str(Path(st.info.containerd_config).parent / "certs.d"), plain_http=True)
        real = images.push_small(st.info.registry, repo="bootseer/base")
        man, _ = client.resolve_image(real)
        first = image_layers(client, Reference.parse(real), man.digest).diff_ids[0]
        evil = _push_evil(st, first)
        signer = st.index_signer()
        for ref in (real, evil):  # what the sidecar does for every push: convert, sign
            convert_image(client, ref, signer=signer)
        yield World(st, client, signer, evil)


@pytest.fixture
def ns(world: World) -> Iterator[str]:
    name = "bs-tr-" + secrets.token_hex(3)
    yield name
    for item in world.st.ctr("images", "ls", "-q", namespace=name, check=False).stdout.split():
        world.st.ctr("images", "rm", "--sync", item, namespace=name, check=False)
    world.st.ctr("namespaces", "rm", name, check=False)


def _pull(w: World, ns: str, ref: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bootseer.cli", "pull", "--json", "-a", w.st.info.containerd_socket,
                           "-n", ns, "--hosts-dir", w.certs, ref], capture_output=True, text=True, timeout=300)


def _run(w: World, ns: str, ref: str) -> str:
    return w.st.ctr("run", "--rm", "--snapshotter", "bootseer", ref, "t-" + secrets.token_hex(3), *READ_KEEP,
                    namespace=ns).stdout


def _modes(out: subprocess.CompletedProcess[str]) -> list[str]:
    assert out.returncode == 0, out.stderr
    return [lo["mode"] for lo in json.loads(out.stdout)["layers"]]


def test_an_image_lying_about_diff_ids_cannot_poison_a_later_pull(world: World, ns: str) -> None:
    bad = _pull(world, ns, world.evil)
    # its layer is not served lazily: containerd's ordinary pull checks the diffID and refuses the image
    assert bad.returncode != 0 or _modes(bad) == ["pulled"], bad.stdout
    real = f"{world.st.info.registry}/bootseer/base:v1"
    modes = _modes(_pull(world, ns, real))
    assert modes[0] == "lazy", modes  # the real image's own layers are still lazy
    assert _run(world, ns, real) == "kept\n"


def _forge(world: World, repo: str, signer: Signer | None) -> None:
    """Attach a newer index to ``repo``'s image whose first layer is the tenant's EROFS blob."""
    ref = f"{world.st.info.registry}/{repo}:v1"
    man, _ = world.client.resolve_image(ref)
    real = _index_of(world.client, ref, man.digest)
    evil_man, _ = world.client.resolve_image(world.evil)
    evil_blob = next(iter(_index_of(world.client, world.evil, evil_man.digest).layers.values()))
    first = man.layers[0].digest
    layers = dict(real.layers)
    layers[first] = replace(evil_blob, layer_digest=first, diff_id=real.layers[first].diff_id, source="")
    # the EROFS blob must be in the repository the index is read from (a registry writer can mount it there)
    world.client.push_blob(Reference.parse(ref), world.client.get_blob(Reference.parse(world.evil),
                                                                        evil_blob.fetched.digest))
    push_index(world.client, ref, ImageIndex(man.digest, layers), manifest_descriptor(man), signer=signer)


def _index_of(client: RegistryClient, ref: str, manifest_digest: str) -> ImageIndex:
    r = Reference.parse(ref)
    descs = client.referrers(r, manifest_digest)
    art = client.get_manifest(r.with_digest(descs[-1].digest))
    blob = next(d for d in art.layers if d.media_type == INDEX_MEDIA_TYPE)
    return ImageIndex.from_json(client.get_blob(r, blob.digest))


@pytest.mark.parametrize("forger", ["unsigned", "untrusted-key"])
def test_a_newer_forged_index_is_ignored(world: World, ns: str, forger: str, tmp_path: Path) -> None:
    repo = f"bootseer/pinned-{forger}"
    real = images.push_small(world.st.info.registry, repo=repo)
    convert_image(world.client, real, signer=world.signer)
    signer: Signer | None = None
    if forger == "untrusted-key":
        generate_keypair(tmp_path / "k", tmp_path / "k.pub")
        signer = Signer(tmp_path / "k")
    _forge(world, repo, signer)
    modes = _modes(_pull(world, ns, real))
    assert modes[0] == "lazy", modes
    assert _run(world, ns, real) == "kept\n"  # the signed index's blob, not the forged one's


def test_an_unprivileged_user_cannot_reach_lazy_mounts_or_the_state(world: World, ns: str) -> None:
    """Lazy mounts are erofs with setuid files and device nodes; the root's 0700 must hold from the start
    (before the fix the lazy path created the root 0755 and `lazy/mnt/*` was listable by anyone)."""
    real = f"{world.st.info.registry}/bootseer/base:v1"
    assert _modes(_pull(world, ns, real))[0] == "lazy"
    sroot = Path(world.st.info.snapshotter_root or "")
    mounts = [Path(line.split()[1]) for line in Path("/proc/self/mounts").read_text().splitlines()
              if line.split()[2] == "erofs" and line.split()[1].startswith(str(sroot))]
    assert mounts, "no lazy mount below the snapshotter root"
    assert oct(sroot.stat().st_mode & 0o777) == oct(0o700)
    for sock in (world.st.info.snapshotter_socket, world.st.info.snapshotter_control):
        assert sock and oct(Path(sock).stat().st_mode & 0o777) == oct(0o600), sock
    for path in (sroot, sroot / "lazy", mounts[0], mounts[0] / "data"):
        r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "ls", str(path)],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (path, r.stdout, r.stderr)


def test_a_tarpit_registry_delays_only_its_own_images(world: World, ns: str) -> None:
    real = f"{world.st.info.registry}/bootseer/base:v1"
    with FaultProxy(world.st.info.registry) as proxy:
        # the index lookup's requests (referrers, the tag-schema fallback, signatures): one byte a second,
        # so no socket read ever times out; blobs and the image's own manifests pass
        drip = proxy.add("drip", method="GET", path=r"/referrers/|/manifests/sha256-", delay=1.0, times=10**6)
        via = real.replace(world.st.info.registry, proxy.address, 1)
        slow = subprocess.Popen([sys.executable, "-m", "bootseer.cli", "pull", "--json", "-a",
                                 world.st.info.containerd_socket, "-n", ns + "-tarpit", "--hosts-dir", world.certs,
                                 via], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert drip.fired.wait(120), "the tarpit was never asked"
            # while the tarpit's lookups drip, an image of the healthy registry pulls lazily
            assert _modes(_pull(world, ns, real))[0] == "lazy"
            out, err = slow.communicate(timeout=180)  # each of its Prepares waits at most lookup_timeout
        finally:
            if slow.poll() is None:
                slow.kill()
                slow.wait()
            for item in world.st.ctr("images", "ls", "-q", namespace=ns + "-tarpit", check=False).stdout.split():
                world.st.ctr("images", "rm", "--sync", item, namespace=ns + "-tarpit", check=False)
            world.st.ctr("namespaces", "rm", ns + "-tarpit", check=False)
    assert slow.returncode == 0, err
    assert {lo["mode"] for lo in json.loads(out)["layers"]} == {"pulled"}  # the ordinary pull, and it works
    assert _run(world, ns, real) == "kept\n"


def _bound(world: World, repo: str, signed: bool, tmp: Path) -> str:
    """`bootseer convert --bind` of a fresh image, signed with the stack's key or not signed at all."""
    real = images.push_tiny(world.st.info.registry, repo)
    env = {k: v for k, v in os.environ.items() if k != "BOOTSEER_SIGNING_KEY"}
    env["BOOTSEER_STACK_DIR"] = str(tmp / "no-stack")  # no default key from a local stack either
    if signed:
        env["BOOTSEER_SIGNING_KEY"] = str(world.st.info.signing_key)
    out = subprocess.run([sys.executable, "-m", "bootseer.cli", "convert", "--json", "--plain-http", "--hosts-dir",
                          world.certs, "--bind", "v1-bound", real], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    bound = json.loads(out.stdout)["bound"]
    assert bound.startswith(f"{world.st.info.registry}/{repo}@sha256:")
    assert world.client.resolve_image(f"{world.st.info.registry}/{repo}:v1-bound")[0].digest == bound.split("@")[1]
    return str(bound)


def test_a_bound_image_keeps_its_own_index(world: World, ns: str, tmp_path: Path) -> None:
    bound = _bound(world, "bootseer/bound", True, tmp_path)
    man = world.client.get_manifest(bound)
    # a newer index attached to the bound digest, signed with the trusted key, pointing at the tenant's blob
    evil_man, _ = world.client.resolve_image(world.evil)
    evil_blob = next(iter(_index_of(world.client, world.evil, evil_man.digest).layers.values()))
    first = man.layers[0].digest
    pinned = _index_of_bound(world, bound)
    layers = dict(pinned.layers)
    layers[first] = replace(evil_blob, layer_digest=first, diff_id=pinned.layers[first].diff_id, source="")
    repo = Reference.parse(bound)
    world.client.push_blob(repo, world.client.get_blob(Reference.parse(world.evil), evil_blob.fetched.digest))
    push_index(world.client, repo, ImageIndex(man.digest, layers), manifest_descriptor(man), signer=world.signer)
    modes = _modes(_pull(world, ns, bound))
    assert modes[0] == "lazy", modes
    assert _run(world, ns, bound) == "kept\n"  # the pinned index's blob, not the newer referrer's


def _index_of_bound(world: World, bound: str) -> ImageIndex:
    from bootseer.index import bound_index

    found = bound_index(world.client, Reference.parse(bound), world.client.get_manifest(bound))
    assert found is not None
    return found[1]


def test_a_bound_index_still_needs_a_trusted_signature(world: World, ns: str, tmp_path: Path) -> None:
    bound = _bound(world, "bootseer/bound-unsigned", False, tmp_path)
    assert set(_modes(_pull(world, ns, bound))) == {"pulled"}
    assert _run(world, ns, bound) == "kept\n"


def test_a_hostile_hot_block_manifest_is_ignored_and_the_daemon_stays_up(world: World, ns: str) -> None:
    from bootseer import hotblocks
    from bootseer.hotblocks import BlobInfo, HotBlockManifest, HotRange
    from tests.unit.test_artifact_bounds import lying_footer

    pid = world.st.info.pids["snapshotter"]
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the daemon's peak RSS starts again from its RSS now
    rss = _vm(pid, "VmRSS")
    log = Path(world.st.info.logs["snapshotter"])
    for repo in ("bootseer/hot-hostile", "bootseer/hot-bomb"):
        real = images.push_tiny(world.st.info.registry, repo)
        convert_image(world.client, real, signer=world.signer)
        man, _ = world.client.resolve_image(real)
        layer = man.layers[0].digest
        blob = _index_of(world.client, real, man.digest).layers[layer].blob.digest
        if repo.endswith("hostile"):
            hb = HotBlockManifest(man.digest, {blob: BlobInfo(layer, (1 << 63) - 1, 1 << 17)},
                                  [HotRange(layer, blob, 0, 1 << 62, 0, 0)])
            artifact = hotblocks.push(world.client, real, manifest_descriptor(man), hb)
        else:
            bomb = lying_footer(4, 128 << 20)  # pages that unpack to 512 MiB, in a ~40 KB file
            artifact = _push_parquet(world.client, real, man.digest, manifest_descriptor(man), bomb)
        assert _modes(_pull(world, ns, real)) == ["lazy"]
        assert _run(world, ns, real) == "kept\n"
        # the layer's prefetch found the manifest, read it and refused it
        wait_until(lambda a=artifact, m=man.digest: any(f"hot-block manifest {a} of {m} ignored" in line
                                                        for line in log.read_text(errors="replace").splitlines()),
                   60, f"the refusal of {repo}'s hot-block manifest in the snapshotter's log")
        status = subprocess.run([sys.executable, "-m", "bootseer.cli", "status", "--json", "--control",
                                 str(world.st.info.snapshotter_control)], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr  # the daemon answers: it is up
        mine = [lo for lo in json.loads(status.stdout)["layers"] if lo["digest"] == blob]
        assert mine and mine[0]["fetched"]["prefetch"] == 0, mine
    grown = _vm(pid, "VmHWM") - rss
    assert grown < 256 << 20, f"the daemon's peak memory grew by {grown >> 20} MiB"


def _vm(pid: int, field: str) -> int:
    """A /proc/<pid>/status memory figure, in bytes."""
    m = re.search(rf"^{field}:\s+(\d+) kB$", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert m, field
    return int(m.group(1)) * 1024


def _push_parquet(client: RegistryClient, image: str, digest: str, subject: Descriptor, data: bytes) -> str:
    """Push ``data`` as the image's hot-block manifest, as :func:`bootseer.hotblocks.push` would (it writes
    its own Parquet: a hostile one has to be pushed by hand)."""
    from bootseer.hotblocks import PARQUET_MEDIA_TYPE, HotBlockManifest, artifact_manifest
    from bootseer.registry import EMPTY_JSON, MT_OCI_MANIFEST

    ref = Reference.parse(image)
    ref = ref.in_repository(ref.repository)
    desc = client.push_blob(ref, data)
    client.push_blob(ref, EMPTY_JSON)
    raw = artifact_manifest(Descriptor(PARQUET_MEDIA_TYPE, desc.digest, desc.size), subject,
                            HotBlockManifest(digest, {}, created="2999-01-01T00:00:00Z"))
    return client.push_referrer(ref, raw, MT_OCI_MANIFEST)

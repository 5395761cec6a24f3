"""depsnap through the session stack's real containerd and BootSeer's snapshotter: the install runs once in a
container over a snapshot of the base, its diff (deletions and replaced directories included) becomes the
snapshot image, which runs in containerd without installing; a fresh node state resolves the same key to the
same image without building; two builders at once end with one image; a failed install pushes nothing."""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bootseer.index import find_index
from bootseer.registry import RegistryClient
from bootseer.trust import TrustPolicy
from depsnap import engine_containerd as ec
from depsnap import image
from depsnap.build import BuildError, resolve
from depsnap.key import DepSpec
from integration.stack import Stack, mounts_below
from tests.stack.test_depsnap_docker import pip_cmd, wheels  # noqa: F401  (fixture: the local package index)

BUSYBOX_CHANGES = ("busybox rm /data/keep.txt && busybox rm -r /data/sub && busybox mkdir /data/sub && "
                   "echo fresh > /data/sub/n2 && busybox mkdir -p /opt/x && echo y > /opt/x/f")
PROBE = "ls /data/sub; test -e /data/keep.txt || echo keep-gone; cat /opt/x/f"


@pytest.fixture
def ns(stack: Stack) -> Iterator[str]:
    """A containerd namespace of this test's own (a node state of its own), emptied afterwards (containerd's
    garbage collector removes the snapshots in the background; the stack's teardown removes the rest)."""
    name = "bs-depsnap-" + secrets.token_hex(3)
    yield name
    for item in stack.ctr("containers", "ls", "-q", namespace=name, check=False).stdout.split():
        stack.ctr("containers", "rm", item, namespace=name, check=False)
    for item in stack.ctr("images", "ls", "-q", namespace=name, check=False).stdout.split():
        stack.ctr("images", "rm", item, namespace=name, check=False)
    stack.ctr("namespaces", "rm", name, check=False)


def repo_of(stack: Stack, what: str) -> str:
    return f"{stack.info.registry}/bootseer/depsnap-{what}-{secrets.token_hex(3)}"


def layer_names(stack: Stack, ref: str) -> list[str]:
    """Entry names of the snapshot image's last layer, read from the registry."""
    repo, tag = ref.split("/", 1)[1].rsplit(":", 1)
    accept = {"Accept": image.MT_OCI_MANIFEST}
    man = requests.get(f"{stack.info.registry_url}/v2/{repo}/manifests/{tag}", headers=accept, timeout=30).json()
    blob = requests.get(f"{stack.info.registry_url}/v2/{repo}/blobs/{man['layers'][-1]['digest']}", timeout=60)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob.content))) as tf:
        return tf.getnames()


def depsnap_snapshots(stack: Stack, ns: str) -> list[str]:
    out = stack.ctr("snapshots", "--snapshotter", "bootseer", "ls", namespace=ns, check=False).stdout
    return [line.split()[0] for line in out.splitlines()[1:] if line.startswith("depsnap-")]


def test_build_whiteouts_reuse_and_fresh_node(stack: Stack, small_image: str, ns: str, scratch: Path) -> None:
    spec = DepSpec(image.exists(small_image, plain_http=True) or "", command=BUSYBOX_CHANGES)
    repo = repo_of(stack, "ctrd")
    res = ec.build_containerd(stack.info.containerd_socket, small_image, spec, repo, scratch, plain_http=True,
                              namespace=ns)
    assert res.built and res.image == f"{repo}:{spec.tag()}"
    names = layer_names(stack, res.image)
    assert "data/.wh.keep.txt" in names and "data/sub/.wh..wh..opq" in names and "opt/x/f" in names
    assert "depsnap" not in names  # the inputs' mount point is not part of the result
    assert depsnap_snapshots(stack, ns) == [] and mounts_below(scratch) == []

    # the base — exactly the manifest the key names — is now a containerd image of this node, unpacked into
    # BootSeer's snapshotter
    assert f"{small_image}@{spec.base_digest}" in stack.ctr("images", "ls", "-q", namespace=ns).stdout.split()

    # the snapshot image runs in plain containerd: deletions and the replaced directory are applied
    stack.ctr("image", "pull", "--plain-http", res.image, namespace=ns)
    out = stack.ctr("run", "--rm", res.image, "t-ds-" + secrets.token_hex(3), "sh", "-c", PROBE, namespace=ns)
    assert out.stdout == "n2\nkeep-gone\ny\n"

    # a fresh node state (another namespace: no base, no snapshots) resolves the key to the same image and
    # `depsnap run` builds nothing
    fresh = ns + "-fresh"
    cli = [sys.executable, "-m", "bootseer.cli", "depsnap", "run", "--base", small_image, "--repo", repo,
           "--run", BUSYBOX_CHANGES, "--engine", "containerd", "--address", stack.info.containerd_socket,
           "--namespace", fresh, "--context", str(scratch), "--plain-http", "--json"]
    log = scratch / "events.jsonl"
    env = {**os.environ, "BOOTSEER_EVENTS": str(log), "BOOTSEER_JOB_ID": "job-ds"}
    doc = json.loads(subprocess.run(cli, capture_output=True, text=True, check=True, env=env).stdout)
    assert (doc["image"], doc["digest"], doc["built"]) == (res.image, res.digest, False)
    assert stack.ctr("images", "ls", "-q", namespace=fresh, check=False).stdout.split() == []
    # the launcher's call is a "dependency_resolve" phase of the job's start-up profile
    (line,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert (line["phase"], line["job"], line["status"]) == ("dependency_resolve", "job-ds", "ok")
    assert line["attrs"]["hit"] is True and line["attrs"]["image"] == res.image and line["attrs"]["built"] is False


def test_two_builders_one_key_one_image(stack: Stack, small_image: str, scratch: Path) -> None:
    """Two `depsnap run` processes (two nodes: two containerd namespaces) race on one key."""
    repo = repo_of(stack, "race")
    nss = [f"bs-depsnap-race-{secrets.token_hex(3)}" for _ in range(2)]
    cli = [sys.executable, "-m", "bootseer.cli", "depsnap", "run", "--base", small_image, "--repo", repo,
           "--run", BUSYBOX_CHANGES + " && echo $RANDOM$$ > /tmp/differs-per-run", "--engine", "containerd",
           "--address", stack.info.containerd_socket, "--context", str(scratch), "--plain-http", "--json"]
    try:
        procs = [subprocess.Popen([*cli, "--namespace", n], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for n in nss]
        outs = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
        docs = [json.loads(o[0]) for o in outs]
        assert docs[0]["digest"] == docs[1]["digest"] and docs[0]["image"] == docs[1]["image"]
        tags = requests.get(f"{stack.info.registry_url}/v2/{repo.split('/', 1)[1]}/tags/list", timeout=30).json()
        # one image tag (the index, when converted, adds its referrers-schema tag `sha256-…` beside it)
        assert [t for t in tags["tags"] if not t.startswith("sha256-")] == [docs[0]["image"].rsplit(":", 1)[1]]
        assert image.exists(docs[0]["image"], plain_http=True) == docs[0]["digest"]
        # whatever the timing was, the two builds could only have pushed the same bytes: a third build of the
        # key, later and elsewhere (another repository), gives the same image digest
        again = subprocess.run([*cli[:cli.index("--repo") + 1], repo + "-again", *cli[cli.index("--repo") + 2:],
                                "--namespace", nss[0]], capture_output=True, text=True, check=True)
        assert (json.loads(again.stdout)["digest"], json.loads(again.stdout)["built"]) == (docs[0]["digest"], True)
    finally:
        for n in nss:
            for item in stack.ctr("images", "ls", "-q", namespace=n, check=False).stdout.split():
                stack.ctr("images", "rm", "--sync", item, namespace=n, check=False)
            stack.ctr("namespaces", "rm", n, check=False)


def test_run_makes_the_snapshot_lazily_loadable(stack: Stack, small_image: str, scratch: Path) -> None:
    """`depsnap run` answers with an image that has a BootSeer index covering its new layer; with a signing
    key, one signed by it (an unsigned index left by an earlier run does not count: nodes that require
    signatures would ignore it)."""
    repo = repo_of(stack, "idx")
    n = f"bs-depsnap-idx-{secrets.token_hex(3)}"
    cli = [sys.executable, "-m", "bootseer.cli", "depsnap", "run", "--base", small_image, "--repo", repo,
           "--run", BUSYBOX_CHANGES, "--address", stack.info.containerd_socket, "--namespace", n,
           "--context", str(scratch), "--plain-http", "--index", "auto", "--json"]
    signer = stack.index_signer()
    # no key: no env key, no local stack at the default root to take one from
    env = {k: v for k, v in os.environ.items() if k != "BOOTSEER_SIGNING_KEY"}
    unsigned_env = {**env, "BOOTSEER_STACK_DIR": str(scratch / "no-stack")}
    client = RegistryClient(plain_http=True)
    try:
        doc = json.loads(subprocess.run(cli, capture_output=True, text=True, check=True, env=unsigned_env).stdout)
        assert find_index(client, repo, doc["digest"], TrustPolicy.for_signer(signer)) is None
        # asking again finds the image; nothing is built twice, the index is signed this time
        again = json.loads(subprocess.run(cli, capture_output=True, text=True, check=True,
                                          env={**env, "BOOTSEER_SIGNING_KEY": str(stack.info.signing_key)}).stdout)
    finally:
        for item in stack.ctr("images", "ls", "-q", namespace=n, check=False).stdout.split():
            stack.ctr("images", "rm", "--sync", item, namespace=n, check=False)
        stack.ctr("namespaces", "rm", n, check=False)
    assert doc["built"] and doc["index"]
    found = find_index(client, repo, doc["digest"])
    assert found is not None and found[0] == doc["index"]
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{doc['image']}"],
                         capture_output=True, check=True).stdout
    new_layer = json.loads(raw)["layers"][-1]["digest"]
    assert new_layer in found[1].layers
    # it names its base (OCI's annotations): nodes prefetch the base's recorded hot blocks until it has its own
    base_digest = client.resolve_image(small_image)[0].digest
    assert json.loads(raw)["annotations"] == {"org.opencontainers.image.base.name": small_image,
                                             "org.opencontainers.image.base.digest": base_digest}
    assert (again["built"], again["index"]) == (False, doc["index"])  # conversion is deterministic
    signed = find_index(client, repo, doc["digest"], TrustPolicy.for_signer(signer))
    assert signed is not None and signed[0] == doc["index"]


def test_failed_install_pushes_nothing(stack: Stack, small_image: str, ns: str, scratch: Path) -> None:
    spec = DepSpec(image.exists(small_image, plain_http=True) or "",
                   command="echo installing; echo 'E: no such package: bs-missing' >&2; exit 3")
    repo = repo_of(stack, "fail")
    with pytest.raises(BuildError, match="exited with 3") as ei:
        ec.build_containerd(stack.info.containerd_socket, small_image, spec, repo, scratch, plain_http=True,
                            namespace=ns)
    assert "no such package: bs-missing" in ei.value.log_tail
    assert resolve(repo, spec, plain_http=True) is None
    assert depsnap_snapshots(stack, ns) == []
    assert stack.ctr("containers", "ls", "-q", namespace=ns).stdout.split() == []


def test_pip_snapshot_is_importable_without_install(stack: Stack, realistic_image: str, wheels: Path,  # noqa: F811
                                                    ns: str, scratch: Path) -> None:
    (scratch / "requirements.txt").write_text("bs-hello==1.0\n")
    spec = DepSpec(image.exists(realistic_image, plain_http=True) or "", requirements=[scratch / "requirements.txt"],
                   command=pip_cmd(wheels, " && rm -r /usr/share/doc/python3"))
    res = ec.build_containerd(stack.info.containerd_socket, realistic_image, spec, repo_of(stack, "pip"), scratch,
                              wheels, plain_http=True, namespace=ns)
    assert res.built
    names = layer_names(stack, res.image)
    assert any(n.endswith("bs_hello/__init__.py") for n in names) and "usr/share/doc/.wh.python3" in names
    assert not any(n.startswith(("root/.cache", "wheels")) for n in names)
    # the job: no install, no inputs mounted, no network; the package imports from hash-checked bytecode
    stack.ctr("image", "pull", "--plain-http", res.image, namespace=ns, timeout=600)
    probe = ("import bs_hello, importlib.util as u, os; print(bs_hello.GREETING); "
             "print(open(u.cache_from_source(bs_hello.__file__), 'rb').read()[4] & 1); "
             "print(os.path.exists('/usr/share/doc/python3'))")
    out = stack.ctr("run", "--rm", res.image, "t-dsp-" + secrets.token_hex(3), "python3", "-c", probe,
                    namespace=ns, timeout=300)
    assert out.stdout == "hello from a dependency snapshot\n1\nFalse\n"


def test_install_past_its_deadline_is_killed_and_cleaned_up(stack: Stack, small_image: str, ns: str,
                                                             scratch: Path) -> None:
    spec = DepSpec(image.exists(small_image, plain_http=True) or "", command="echo started; exec sleep 600")
    repo = repo_of(stack, "slow")
    with pytest.raises(BuildError, match="exited with 124") as ei:
        ec.build_containerd(stack.info.containerd_socket, small_image, spec, repo, scratch, plain_http=True,
                            namespace=ns, timeout=3)
    assert "started" in ei.value.log_tail and "killed after 3 s" in ei.value.log_tail
    assert resolve(repo, spec, plain_http=True) is None
    assert depsnap_snapshots(stack, ns) == []
    assert stack.ctr("containers", "ls", "-q", namespace=ns).stdout.split() == []
    assert stack.ctr("tasks", "ls", "-q", namespace=ns).stdout.split() == []


def test_cli_without_containerd_says_so(stack: Stack, small_image: str, scratch: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bootseer.cli", "depsnap", "run", "--base", small_image, "--repo",
                        repo_of(stack, "nocd"), "--run", "true", "--address", str(scratch / "none.sock"),
                        "--plain-http"], capture_output=True, text=True)
    assert r.returncode == 1 and f"no containerd socket at {scratch / 'none.sock'}" in r.stderr


def test_cli_refuses_a_bad_index_mode_before_building(stack: Stack, small_image: str, scratch: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bootseer.cli", "depsnap", "run", "--base", small_image, "--repo",
                        repo_of(stack, "bad"), "--run", "true", "--index", "sometimes", "--plain-http"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "sometimes" in r.stderr and "auto, wait, none" in r.stderr


@pytest.fixture
def loopback_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A package index on loopback: a directory served over HTTP by a server of the test's own."""
    root = tmp_path_factory.mktemp("index")
    (root / "pkg-1.0.txt").write_text("package payload\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_network_is_none_unless_asked_for(stack: Stack, small_image: str, ns: str, scratch: Path,
                                          loopback_index: str) -> None:
    cmd = f"busybox mkdir -p /opt/pkg && busybox wget -q -O /opt/pkg/payload {loopback_index}/pkg-1.0.txt"
    spec = DepSpec(image.exists(small_image, plain_http=True) or "", command=cmd)
    repo = repo_of(stack, "net")
    with pytest.raises(BuildError, match="exited with") as ei:  # hermetic by default: loopback is not the host's
        ec.build_containerd(stack.info.containerd_socket, small_image, spec, repo, scratch, plain_http=True,
                            namespace=ns)
    assert "wget" in ei.value.log_tail
    res = ec.build_containerd(stack.info.containerd_socket, small_image, spec, repo, scratch, plain_http=True,
                              namespace=ns, network="host")
    assert "opt/pkg/payload" in layer_names(stack, res.image)
    with pytest.raises(BuildError, match="network 'bridge'"):
        ec.build_containerd(stack.info.containerd_socket, small_image, spec, repo, scratch, plain_http=True,
                            namespace=ns, network="bridge")

"""Kubernetes pull secrets kept for lazy reads (issue 23, item 3), the core without root: the store of
:mod:`bootseer.pullsecrets` (whose credentials, newest pull wins, a failed pull hands back the old, the 0600
file), the registry client asking it per repository against a real docker-registry with htpasswd and behind a
real bearer-token front, and the gRPC adapter (:mod:`snapshotter.criproxy`) forwarding to a CRI image service
on a unix socket.  The stack test (tests/stack/test_cri_pull_secrets.py) runs it all with containerd."""

from __future__ import annotations

import base64
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import bcrypt
import grpc
import pytest
import requests

from bootseer.auth import Credentials
from bootseer.pullsecrets import PullAuth, PullCredentials
from bootseer.reference import Reference
from bootseer.registry import RegistryClient, Unauthorized
from integration.faultproxy import FaultProxy
from protos.cri.runtime.v1 import api_pb2 as pb
from protos.cri.runtime.v1 import api_pb2_grpc as pb_grpc
from snapshotter.criproxy import ImageServiceProxy
from snapshotter.lazy.testing import Registry, push_blob

USER = "kube-puller"
PW1 = "pw1-" + secrets.token_hex(8)
PW2 = "pw2-" + secrets.token_hex(8)
HOST = "reg.example:5000"


class _Fallback:
    """A node's docker config: one host, any repository."""

    def __init__(self, host: str, creds: Credentials) -> None:
        self.host, self.creds = host, creds

    def get(self, host: str, repository: str = "") -> Credentials | None:
        return self.creds if host == self.host else None


# ----------------------------------------------------------------------------------------------- the store
def test_credentials_belong_to_the_registry_and_repository_they_were_given_for() -> None:
    fallback = Credentials("node", "node-pw")
    store = PullCredentials(None, _Fallback("other.example", fallback))
    grant = store.pull_started(f"{HOST}/team/a:v1", PullAuth(username=USER, password=PW1))
    assert grant is not None
    assert store.get(HOST, "team/a") == Credentials(USER, PW1)  # used while the pull runs
    assert store.get(HOST, "team/b") is None  # another repository of the same registry
    assert store.get("mirror.example", "team/a") is None  # a mirror, another registry
    assert store.get(HOST) is None  # a request without a repository scope
    assert store.get("other.example", "x/y") == fallback  # the node's docker config for the rest
    store.pull_succeeded(grant)
    assert store.get(HOST, "team/a") == Credentials(USER, PW1) and store.keys() == [(HOST, "team/a")]
    # docker.io spelled any way is one registry; an official image is library/<name>
    hub = store.pull_started("busybox", PullAuth(auth=base64.b64encode(f"{USER}:{PW2}".encode()).decode()))
    store.pull_succeeded(hub)
    assert store.get("registry-1.docker.io", "library/busybox") == Credentials(USER, PW2)


def test_what_is_not_kept() -> None:
    store = PullCredentials(None)
    assert store.pull_started(f"{HOST}/a:v1", None) is None
    assert store.pull_started(f"{HOST}/a:v1", PullAuth()) is None  # anonymous
    assert store.pull_started(f"{HOST}/a:v1", PullAuth(server_address="https://elsewhere.example",
                                                        username=USER, password=PW1)) is None
    assert store.pull_started("Not A Reference!", PullAuth(username=USER, password=PW1)) is None
    assert store.pull_started(f"{HOST}/a:v1", PullAuth(auth=base64.b64encode(b"no-colon").decode())) is None
    given = store.pull_started(f"{HOST}/a:v1", PullAuth(server_address=f"https://{HOST}", username=USER,
                                                        password=PW1))
    assert given is not None  # its own registry, with a scheme
    assert store.keys() == [] and store.get(HOST, "a") == Credentials(USER, PW1)  # used, kept if it works


def test_the_newest_pull_wins_and_a_failed_one_hands_back_the_old() -> None:
    store = PullCredentials(None)
    changed: list[tuple[str, str]] = []
    store.subscribe(lambda host, repo: changed.append((host, repo)))
    store.pull_succeeded(store.pull_started(f"{HOST}/a:v1", PullAuth(username=USER, password=PW1)))
    bad = store.pull_started(f"{HOST}/a:v1", PullAuth(username=USER, password="wrong"))
    assert store.get(HOST, "a") == Credentials(USER, "wrong")  # the running pull's, for its Prepares
    store.pull_failed(bad)
    assert store.get(HOST, "a") == Credentials(USER, PW1)
    older = store.pull_started(f"{HOST}/a:v1", PullAuth(username=USER, password="older"))
    newer = store.pull_started(f"{HOST}/a:v2", PullAuth(registry_token="tok-2"))
    store.pull_succeeded(newer)
    store.pull_succeeded(older)  # finished last, started first: the newer credentials stay
    assert store.get(HOST, "a") == Credentials(registry_token="tok-2")
    assert changed == [(HOST, "a")] * 5  # each start and each failure changes what a lookup answers


def test_kept_in_a_root_only_file_across_restarts_and_never_shown(tmp_path: Path) -> None:
    path = tmp_path / "cri-credentials.json"
    store = PullCredentials(path)
    old = os.umask(0)  # the most permissive umask: the file is 0600 all the same
    try:
        store.pull_succeeded(store.pull_started(f"{HOST}/a:v1", PullAuth(username=USER, password=PW1,
                                                                        identity_token="id-tok-" + PW2)))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    again = PullCredentials(path)
    assert again.load() == 1 and again.get(HOST, "a") == Credentials(USER, PW1, "id-tok-" + PW2)
    for shown in (repr(store), repr(again), repr(again.get(HOST, "a")),
                  repr(store.pull_started(f"{HOST}/a:v1", PullAuth(username=USER, password=PW1, auth="eA==",
                                                                   registry_token=PW2))),
                  repr(PullAuth(username=USER, password=PW1, identity_token=PW2, registry_token=PW2))):
        assert PW1 not in shown and PW2 not in shown, shown
    path.chmod(0o644)  # readable by others: may have been read, or planted
    assert PullCredentials(path).load() == 0
    path.chmod(0o600)
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["entries"][0]["host"] == HOST


def test_bounded_least_recently_given_go_first() -> None:
    store = PullCredentials(None, max_entries=2)
    for repo in ("a", "b", "c"):
        store.pull_succeeded(store.pull_started(f"{HOST}/{repo}:v1", PullAuth(username=USER, password=PW1)))
    assert store.keys() == [(HOST, "b"), (HOST, "c")]


# ---------------------------------------------------------------------------- the registry client asks it
@pytest.fixture
def htpasswd_registry(tmp_path: Path) -> Iterator[tuple[Registry, Path]]:
    ht = tmp_path / "htpasswd"
    ht.write_text(f"{USER}:{bcrypt.hashpw(PW1.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    reg = Registry(tmp_path / "reg", htpasswd=ht).start()
    try:
        yield reg, ht
    finally:
        reg.stop()


def test_registry_client_uses_the_newest_credentials_of_the_repository(
        htpasswd_registry: tuple[Registry, Path], tmp_path: Path) -> None:
    reg, ht = htpasswd_registry
    host = reg.url.removeprefix("http://")
    data = os.urandom(4096)
    pusher = RegistryClient(credentials={host: Credentials(USER, PW1)})  # CI's, not the node's
    digests = {repo: pusher.push_blob(f"{host}/{repo}", data).digest for repo in ("team/a", "team/b")}
    assert digests["team/a"] == digests["team/b"]
    store = PullCredentials(tmp_path / "creds.json")
    client = RegistryClient(credentials=store)
    with pytest.raises(Unauthorized, match="no credentials are configured"):
        client.blob_exists(Reference(host, "team/a"), digests["team/a"])
    store.pull_succeeded(store.pull_started(f"{host}/team/a:v1", PullAuth(username=USER, password=PW1)))
    assert client.blob_exists(Reference(host, "team/a"), digests["team/a"]) == len(data)
    with pytest.raises(Unauthorized):  # the same registry, another repository: not given for it
        client.blob_exists(Reference(host, "team/b"), digests["team/b"])
    # the password changes; kubelet pulls again with the new one, which replaces the old at once
    ht.write_text(f"{USER}:{bcrypt.hashpw(PW2.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    store.pull_succeeded(store.pull_started(f"{host}/team/a:v1", PullAuth(
        auth=base64.b64encode(f"{USER}:{PW2}".encode()).decode())))
    restarted = PullCredentials(tmp_path / "creds.json")
    restarted.load()
    assert RegistryClient(credentials=restarted).blob_exists(Reference(host, "team/a"), digests["team/a"]) == 4096
    assert client.blob_exists(Reference(host, "team/a"), digests["team/a"]) == len(data)


def test_bearer_tokens_rotate_with_the_credentials_and_registry_tokens_are_sent_as_given(
        tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg").start()
    try:
        data = os.urandom(4096)
        digest = push_blob(reg.url, "team/a", data)
        with FaultProxy(reg.url.removeprefix("http://"), auth="bearer", username=USER, password=PW1) as front:
            ref = Reference(front.address, "team/a")
            store = PullCredentials(None)
            client = RegistryClient(credentials=store)
            store.subscribe(client.auth.forget_repository)
            store.pull_succeeded(store.pull_started(f"{front.address}/team/a:v1",
                                                    PullAuth(username=USER, password=PW1)))
            scopes = ("repository:team/a:pull",)
            assert client.blob_exists(ref, digest) == len(data)
            first = client.auth.cached_header(front.address, scopes)
            assert client.blob_exists(ref, digest) == len(data)
            assert front.tokens_issued == 1 and first  # the token is kept while the credentials are
            # a registry token, as kubelet's credential provider may give: sent as is, no realm asked
            tok = requests.get(f"http://{front.address}/token", params={"service": "faultproxy"}, auth=(USER, PW1),
                               timeout=10).json()["token"]
            store.pull_succeeded(store.pull_started(f"{front.address}/team/a:v2", PullAuth(registry_token=tok)))
            assert client.blob_exists(ref, digest) == len(data)
            # the token of the old credentials was dropped (it is still valid: it would have been sent on)
            assert client.auth.cached_header(front.address, scopes) == f"Bearer {tok}" != first
            assert front.tokens_issued == 2  # the one fetched above by hand: the client asked no realm
    finally:
        reg.stop()


# -------------------------------------------------------------------------------------- the gRPC adapter
class _Upstream(pb_grpc.ImageServiceServicer):
    """A CRI image service (containerd's part of it): a pull succeeds only with the right password."""

    def __init__(self) -> None:
        self.pulls: list[pb.PullImageRequest] = []

    def PullImage(self, request: pb.PullImageRequest, context: grpc.ServicerContext) -> pb.PullImageResponse:
        self.pulls.append(request)
        if request.auth.password != PW1:
            context.abort(grpc.StatusCode.UNKNOWN, f"failed to pull {request.image.image}: 401 Unauthorized")
        return pb.PullImageResponse(image_ref="sha256:" + "a" * 64)

    def ListImages(self, request: pb.ListImagesRequest, context: grpc.ServicerContext) -> pb.ListImagesResponse:
        return pb.ListImagesResponse(images=[pb.Image(id="sha256:" + "b" * 64, size=7)])


class _Newer(grpc.GenericRpcHandler):
    """A method a newer CRI has and our protos do not: bytes in, bytes out."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method == "/runtime.v1.ImageService/NotYetInvented":
            return grpc.unary_unary_rpc_method_handler(lambda request, context: request[::-1])
        return None


@pytest.fixture()
def sock_dir() -> Iterator[Path]:
    """Sockets live in a short directory of their own: pytest's tmp_path, nested under another test's (as
    tests/kernel/test_unprivileged.py runs this suite), passes the 107-byte limit of a unix socket path."""
    with tempfile.TemporaryDirectory(prefix="bs-cri-", dir="/tmp") as d:
        yield Path(d)


def test_the_proxy_forwards_every_image_call_and_keeps_only_pulls_that_worked(tmp_path: Path,
                                                                               sock_dir: Path) -> None:
    upstream = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[_Newer()])
    fake = _Upstream()
    pb_grpc.add_ImageServiceServicer_to_server(fake, upstream)
    up_sock = sock_dir / "containerd.sock"
    upstream.add_insecure_port(f"unix://{up_sock}")
    upstream.start()
    store = PullCredentials(tmp_path / "creds.json")
    proxy = ImageServiceProxy(sock_dir / "run" / "cri-image.sock", str(up_sock), store).start()
    try:
        assert proxy.socket.stat().st_mode & 0o777 == 0o600
        with grpc.insecure_channel(f"unix://{proxy.socket}") as ch:
            images = pb_grpc.ImageServiceStub(ch)
            assert images.ListImages(pb.ListImagesRequest()).images[0].size == 7
            image = f"{HOST}/team/a:v1"
            with pytest.raises(grpc.RpcError) as err:
                images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image),
                                                     auth=pb.AuthConfig(username=USER, password="wrong")))
            assert err.value.code() == grpc.StatusCode.UNKNOWN and "401 Unauthorized" in err.value.details()
            assert store.get(HOST, "team/a") is None and not (tmp_path / "creds.json").exists()
            r = images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image),
                                                     auth=pb.AuthConfig(username=USER, password=PW1)))
            assert r.image_ref == "sha256:" + "a" * 64
            assert store.get(HOST, "team/a") == Credentials(USER, PW1)
            assert [p.auth.password for p in fake.pulls] == ["wrong", PW1]  # forwarded as given
            runtime = pb_grpc.RuntimeServiceStub(ch)  # not proxied: kubelet sends it to containerd
            with pytest.raises(grpc.RpcError) as err:
                runtime.Version(pb.VersionRequest())
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert ch.unary_unary("/runtime.v1.ImageService/NotYetInvented")(b"\x01\x02abc") == b"cba\x02\x01"
    finally:
        proxy.stop()
        upstream.stop(None)
    assert not proxy.socket.exists()


def test_the_cri_table_of_the_snapshotter_config(tmp_path: Path) -> None:
    from snapshotter.config import Config

    conf = tmp_path / "config.toml"
    assert Config.load(None).cri.image_service_socket == ""  # off unless configured
    conf.write_text('[cri]\nimage_service_socket = "/run/bootseer/cri-image.sock"\n')
    cfg = Config.load(conf)
    assert (cfg.cri.image_service_socket, cfg.cri.containerd_cri_socket) == (
        "/run/bootseer/cri-image.sock", "/run/containerd/containerd.sock")
    conf.write_text('[snapshotter.cri]\nimage_service_socket = "/run/b.sock"\ncontainerd_cri_socket = "/c.sock"\n')
    assert Config.load(conf).cri.containerd_cri_socket == "/c.sock"
    for bad, why in (('image_service_sock = "/x"', "did you mean image_service_socket"),
                     ('image_service_socket = "/x"\ncontainerd_cri_socket = "unix:///x"', "not be containerd's own"),
                     ("image_service_socket = 1", "must be a socket path")):
        conf.write_text(f"[cri]\n{bad}\n")
        with pytest.raises(ValueError, match=why):
            Config.load(conf)

"""docker-registry with token authentication (issue 22), as registries behind Harbor, GitLab or Docker Hub's auth
service run: ``auth: token:`` pointing at a token server of the test's own (:mod:`integration.tokenserver`:
ES256 JWTs with an ``x5c`` header, checked by the registry against its ``rootcertbundle``), which checks basic
credentials from its user table and grants only the scopes a user has.  No fault proxy, no emulation: the
registry itself decides what each token allows.

* push (skopeo), convert (``bootseer convert``: blob uploads, the index and its signature need ``push``), lazy
  pull and run (the snapshotter's lookups and lazy range reads with the node's read-only credentials);
* a read-only user gets a pull-only token and cannot push; the sidecar pushes with a token for its own user;
* a token that expires mid-session: the lazy read after the registry started refusing it gets a new token
  and succeeds;
* a realm on another host: the registry's credentials go to its realm — over HTTPS, checked with the CA
  ``hosts.toml`` gives the registry, as containerd's per-host client does — and to no other host (not the
  realm host's own docker-config entry, and never in clear text to a realm off this machine).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
import requests

from bootseer.auth import Credentials
from bootseer.index import find_index
from bootseer.registry import RegistryClient, Unauthorized
from bootseer.testkit import free_port, wait_until
from integration import images
from integration.oci import push
from integration.stack import Stack, StackConfig, running, wait_for
from integration.tls import private_ca
from integration.tokenserver import TokenServer, User
from registry_sidecar.sidecar import SidecarConfig, SidecarServer, notifications_config
from snapshotter.lazy.testing import Registry
from tests.conftest import scratch_root

PASSWORDS = {name: f"pw-{name}-" + secrets.token_hex(6) for name in ("pusher", "reader", "sidecar", "decoy")}
USERS = {"pusher": User(PASSWORDS["pusher"], {"team/*": ("pull", "push")}),
         "reader": User(PASSWORDS["reader"], {"team/*": ("pull",)}),
         "sidecar": User(PASSWORDS["sidecar"], {"*": ("pull", "push")})}


@contextlib.contextmanager
def other_host_address() -> Iterator[str]:
    """An address of this machine that is not loopback (a /32 on ``lo`` from the benchmarking range): "another
    host" to the client, which treats 127.0.0.0/8 as this one."""
    addr = f"198.18.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
    subprocess.run(["ip", "addr", "add", f"{addr}/32", "dev", "lo"], check=True, capture_output=True)
    try:
        yield addr
    finally:
        subprocess.run(["ip", "addr", "del", f"{addr}/32", "dev", "lo"], capture_output=True)


def _docker_config(dest: Path, entries: dict[str, str]) -> Path:
    """A $DOCKER_CONFIG directory whose config.json has ``host → user`` credentials."""
    dest.mkdir(parents=True, mode=0o700)
    auths = {h: {"auth": base64.b64encode(f"{u}:{PASSWORDS[u]}".encode()).decode()} for h, u in entries.items()}
    (dest / "config.json").write_text(json.dumps({"auths": auths}))
    (dest / "config.json").chmod(0o600)
    return dest


@dataclass
class World:
    st: Stack
    ts: TokenServer  # the realm of `host`: plain HTTP on the registry's own host (loopback)
    host: str  # a plain-HTTP registry with token auth
    remote: TokenServer  # the realm of `tls_host`: HTTPS on another host, its certificate from the private CA
    tls_host: str  # a TLS registry (the same private CA) with token auth
    ca_dir: Path  # only the CA (skopeo's --dest-cert-dir)
    configs: dict[str, Path]  # user → $DOCKER_CONFIG with that user's credentials for both registries

    @property
    def certs(self) -> Path:
        return Path(self.st.info.containerd_config).parent / "certs.d"

    def cli(self, user: str | None, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_CONFIG", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")}
        env["DOCKER_CONFIG"] = str(self.configs[user] if user else self.configs["reader"].parent / "none")
        env["BOOTSEER_SIGNING_KEY"] = str(self.st.info.signing_key)
        env["BOOTSEER_HOSTS_DIR"] = str(self.certs)
        return subprocess.run([sys.executable, "-m", "bootseer.cli", *args], capture_output=True, text=True,
                              timeout=600, env=env)

    def skopeo_push(self, layout: Path, ref: str, user: str, tls: bool = False) -> subprocess.CompletedProcess[str]:
        dest = [f"--dest-cert-dir={self.ca_dir}"] if tls else ["--dest-tls-verify=false"]
        return subprocess.run(["skopeo", "copy", "--quiet", *dest, f"--dest-creds={user}:{PASSWORDS[user]}",
                               f"oci:{layout}:v1", f"docker://{ref}"], capture_output=True, text=True, timeout=300)

    def pull_and_run(self, user: str, ref: str, *cmd: str) -> str:
        """``bootseer pull`` (every layer lazy) and ``ctr run`` on BootSeer's snapshotter; the container's stdout."""
        ns = "bs-tok-" + secrets.token_hex(3)
        try:
            pulled = self.cli(user, "pull", "--json", "-a", self.st.info.containerd_socket, "-n", ns, "--control",
                              str(self.st.info.snapshotter_control), ref)
            assert pulled.returncode == 0, pulled.stderr
            assert {lo["mode"] for lo in json.loads(pulled.stdout)["layers"]} == {"lazy"}, pulled.stdout
            return self.st.ctr("run", "--rm", "--snapshotter", "bootseer", ref, "t-" + secrets.token_hex(3),
                               *(cmd or images.SMALL_CMD), namespace=ns).stdout
        finally:
            for item in self.st.ctr("images", "ls", "-q", namespace=ns, check=False).stdout.split():
                self.st.ctr("images", "rm", "--sync", item, namespace=ns, check=False)
            self.st.ctr("namespaces", "rm", ns, check=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = tmp_path_factory.mktemp("tok-small") / "layout"
    images.build_small(layout, "v1")
    return layout


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("token")
    with contextlib.ExitStack() as stack:
        other = stack.enter_context(other_host_address())
        cert, key, ca = private_ca(root / "pki", ["127.0.0.1", other])
        (root / "ca").mkdir()
        (root / "ca" / "ca.crt").write_bytes(ca.read_bytes())
        ts = stack.enter_context(TokenServer(root / "ts", USERS))
        remote = stack.enter_context(TokenServer(root / "remote", USERS, host=other, tls=(cert, key)))
        reg = Registry(root / "registry", config={"auth": ts.registry_auth()}).start()
        stack.callback(reg.stop)
        treg = Registry(root / "tls-registry", tls=(cert, key, ca), config={"auth": remote.registry_auth()}).start()
        stack.callback(treg.stop)
        host, tls_host = f"127.0.0.1:{reg.port}", f"127.0.0.1:{treg.port}"
        # every user's config also holds a decoy entry for the remote realm's own host: the realm must only ever
        # see the registry's credentials, as with Docker and containerd
        configs = {u: _docker_config(root / "docker" / u, {host: u, tls_host: u, remote.address: "decoy"})
                   for u in ("pusher", "reader", "sidecar")}
        (root / "docker" / "none").mkdir()
        # the node pulls with read-only credentials; no background fill: what a start reads is what is fetched
        cfg = StackConfig(root=scratch_root("tk"), cri_snapshotter="bootseer", sidecar=False,
                          lazy_config={"fill": {"enabled": False}},
                          snapshotter_config={"docker_config": str(configs["reader"] / "config.json")})
        st = stack.enter_context(running(cfg))
        st.index_signer()  # the stack's key pair: convert signs with it, the snapshotter trusts it
        hdir = Path(st.info.containerd_config).parent / "certs.d" / tls_host
        hdir.mkdir(parents=True)
        (hdir / "ca.pem").write_bytes(ca.read_bytes())
        (hdir / "hosts.toml").write_text(f'server = "https://{tls_host}"\n\n[host."https://{tls_host}"]\n'
                                         'capabilities = ["pull", "resolve", "push"]\nca = "ca.pem"\n')
        yield World(st, ts, host, remote, tls_host, root / "ca", configs)


def _granted(token: str) -> dict[str, set[str]]:
    """repository → actions a token grants (read from its claims; the registry checked its signature)."""
    claims = jwt.decode(token, options={"verify_signature": False})
    return {a["name"]: set(a["actions"]) for a in claims["access"]}


def _secrets_absent(world: World, *texts: str) -> None:
    logs = [Path(p).read_text(errors="replace") for p in world.st.info.logs.values() if Path(p).is_file()]
    for text in (*texts, *logs):
        for pw in PASSWORDS.values():
            assert pw not in text
        for hit in (*world.ts.hits, *world.remote.hits):
            assert not hit.token or hit.token not in text


def test_push_convert_pull_and_lazy_run_with_real_tokens(world: World, small: Path) -> None:
    ref = f"{world.host}/team/small:v1"
    with pytest.raises(RuntimeError, match=r"(?i)unauthorized|authentication required|denied"):
        push(small, "v1", ref)  # anonymous: the registry really wants a token
    pushed = world.skopeo_push(small, ref, "pusher")
    assert pushed.returncode == 0, pushed.stderr

    anonymous = world.cli(None, "convert", "--json", ref)
    assert anonymous.returncode == 1 and "authentication required" in anonymous.stderr.lower(), anonymous.stderr
    start = len(world.ts.hits)
    conv = world.cli("pusher", "convert", "--json", ref)
    assert conv.returncode == 0, conv.stderr
    assert json.loads(conv.stdout)["index"]
    pusher_tokens = [h for h in world.ts.hits[start:] if h.user == "pusher" and h.status == 200]
    assert any(_granted(h.token).get("team/small") == {"pull", "push"} for h in pusher_tokens)  # push scope

    before = len(world.ts.hits)
    assert world.pull_and_run("reader", ref) == images.SMALL_OUTPUT  # read lazily with the node's own credentials
    node = [h for h in world.ts.hits[before:] if h.status == 200]
    assert node and {h.user for h in node} == {"reader"}, node
    assert all(acts == {"pull"} for h in node for acts in _granted(h.token).values())
    _secrets_absent(world, conv.stdout, conv.stderr, anonymous.stderr)


def test_a_read_only_user_gets_a_pull_token_and_cannot_push(world: World, small: Path) -> None:
    ref = f"{world.host}/team/readonly:v1"
    assert world.skopeo_push(small, ref, "reader").returncode != 0
    assert world.skopeo_push(small, ref, "pusher").returncode == 0
    start = len(world.ts.hits)
    conv = world.cli("reader", "convert", "--json", ref)
    assert conv.returncode == 1, conv.stdout
    assert "authentication required" in conv.stderr.lower() or "denied" in conv.stderr.lower(), conv.stderr
    asked = [h for h in world.ts.hits[start:] if h.user == "reader" and h.status == 200
             and any(s.endswith(":pull,push") for s in h.scopes)]
    assert asked, "the conversion asked for push scope"
    assert all(_granted(h.token).get("team/readonly") == {"pull"} for h in asked)  # and got pull only
    client = RegistryClient(credentials={world.host: Credentials("reader", PASSWORDS["reader"])}, plain_http=True)
    manifest = client.get_manifest(ref)
    assert find_index(client, ref, manifest.digest) is None  # nothing was pushed
    _secrets_absent(world, conv.stderr)


def test_the_sidecar_converts_with_a_push_token_of_its_own_user(world: World, small: Path, tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    reg = Registry(tmp_path / "registry", config={"auth": world.ts.registry_auth(),
                                                   "notifications": notifications_config(f"http://{listen}")})
    host = f"127.0.0.1:{reg.port}"
    dcfg = _docker_config(tmp_path / "sidecar-docker", {host: "sidecar"})
    cfg = SidecarConfig(listen=listen, registry=host, state_dir=str(tmp_path / "state"), plain_http=True,
                        docker_config=str(dcfg / "config.json"), signing_key=str(world.st.info.signing_key),
                        retry_base=0.05, retry_max=0.5, max_attempts=3)
    start = len(world.ts.hits)
    with SidecarServer(cfg) as side:
        reg.start()
        try:
            ref = f"{host}/team/side:v1"
            assert world.skopeo_push(small, ref, "pusher").returncode == 0
            reader = RegistryClient(credentials={host: Credentials("reader", PASSWORDS["reader"])}, plain_http=True)
            digest = reader.get_manifest(ref).digest

            def indexed() -> bool:
                jobs = requests.get(f"{side.url}/jobs", timeout=5).json()
                assert not any(j["state"] == "failed" for j in jobs), jobs  # surfaces at once, with its reason
                return find_index(reader, ref, digest) is not None

            wait_for("the sidecar's index", indexed, 300)
        finally:
            reg.stop()
    side_hits = [h for h in world.ts.hits[start:] if h.user == "sidecar" and h.status == 200]
    assert any(_granted(h.token).get("team/side") == {"pull", "push"} for h in side_hits), side_hits


def test_a_token_expiring_mid_session_is_renewed_by_the_lazy_read(world: World, small: Path) -> None:
    ref = f"{world.host}/team/expiring:v1"
    assert world.skopeo_push(small, ref, "pusher").returncode == 0
    assert world.cli("pusher", "convert", "--json", ref).returncode == 0
    big = images.SMALL_BIG[0]
    expected = hashlib.md5(images._big_file()).hexdigest()  # what busybox md5sum prints
    world.ts.ttl = 5  # from here on the registry refuses each token 5 s after it was issued
    ns = "bs-tok-" + secrets.token_hex(3)
    try:
        pulled = world.cli("reader", "pull", "--json", "-a", world.st.info.containerd_socket, "-n", ns, "--control",
                           str(world.st.info.snapshotter_control), ref)
        assert pulled.returncode == 0, pulled.stderr
        assert {lo["mode"] for lo in json.loads(pulled.stdout)["layers"]} == {"lazy"}, pulled.stdout
        run = ("run", "--rm", "--snapshotter", "bootseer", ref)
        assert world.st.ctr(*run, "t1-" + secrets.token_hex(3), *images.SMALL_CMD,
                            namespace=ns).stdout == images.SMALL_OUTPUT  # a session: lazy reads with a token
        held = [h.token for h in world.ts.hits if h.user == "reader" and h.status == 200
                and "repository:team/expiring:pull" in h.scopes]
        assert held, "the node asked for a pull token for the repository"
        layer = RegistryClient(credentials={world.host: Credentials("reader", PASSWORDS["reader"])},
                               plain_http=True).get_manifest(ref).layers[-1].digest

        def refused(token: str) -> bool:
            r = requests.head(f"http://{world.host}/v2/team/expiring/blobs/{layer}", timeout=5,
                              headers={"Authorization": f"Bearer {token}"})
            return r.status_code == 401

        wait_until(lambda: refused(held[-1]), 60, "the registry refusing the node's last token")
        assert all(refused(t) for t in held)  # every token the node holds is now refused
        renewed_from = len(world.ts.hits)
        out = world.st.ctr(*run, "t2-" + secrets.token_hex(3), "/bin/busybox", "md5sum", "/" + big,
                           namespace=ns).stdout
        assert out.split()[0] == expected  # 32 MiB not read before, fetched lazily after the expiry
        renewed = [h for h in world.ts.hits[renewed_from:] if h.user == "reader" and h.status == 200]
        assert renewed, "the lazy read got a new token"
        assert "team/expiring failed" not in Path(world.st.info.logs["snapshotter"]).read_text(errors="replace")
    finally:
        world.ts.ttl = 300
        for item in world.st.ctr("images", "ls", "-q", namespace=ns, check=False).stdout.split():
            world.st.ctr("images", "rm", "--sync", item, namespace=ns, check=False)
        world.st.ctr("namespaces", "rm", ns, check=False)


def test_a_realm_on_another_host_gets_the_registrys_credentials_over_tls(world: World, small: Path) -> None:
    ref = f"{world.tls_host}/team/remote-realm:v1"
    pushed = world.skopeo_push(small, ref, "pusher", tls=True)
    assert pushed.returncode == 0, pushed.stderr
    conv = world.cli("pusher", "convert", "--json", ref)
    assert conv.returncode == 0, conv.stderr
    before = len(world.remote.hits)
    assert world.pull_and_run("reader", ref) == images.SMALL_OUTPUT
    assert [h for h in world.remote.hits[before:] if h.user == "reader" and h.status == 200]
    # the realm saw the registry's credentials only, never the entry for its own host
    assert {h.user for h in world.remote.hits if h.authorization} <= {"pusher", "reader"}
    assert all(h.user != "decoy" for h in world.remote.hits)
    _secrets_absent(world, conv.stdout, conv.stderr)


def test_a_plain_http_realm_on_another_host_gets_no_credentials(tmp_path: Path) -> None:
    with other_host_address() as other, TokenServer(tmp_path / "ts", USERS, host=other) as ts:
        reg = Registry(tmp_path / "registry", config={"auth": ts.registry_auth()}).start()
        try:
            host = f"127.0.0.1:{reg.port}"
            client = RegistryClient(credentials={host: Credentials("reader", PASSWORDS["reader"])},
                                    plain_http=True)
            with pytest.raises(Unauthorized, match="refusing to send credentials to a non-TLS token realm") as exc:
                client.get_manifest(f"{host}/team/anything:v1")
            assert PASSWORDS["reader"] not in str(exc.value)
            assert not any(h.authorization for h in ts.hits), ts.hits  # nothing went out in clear text
        finally:
            reg.stop()


def test_token_server_grants_only_what_a_user_has(tmp_path: Path) -> None:
    with TokenServer(tmp_path / "ts", USERS) as ts:
        def ask(user: str | None, password: str | None, *scopes: str) -> requests.Response:
            auth = (user, password) if user and password else None
            return requests.get(ts.realm, params=[("service", ts.service), *(("scope", s) for s in scopes)],
                                auth=auth, timeout=5)

        r = ask("reader", PASSWORDS["reader"], "repository:team/a:pull,push", "repository:other/b:pull")
        assert r.status_code == 200 and _granted(r.json()["token"]) == {"team/a": {"pull"}, "other/b": set()}
        assert _granted(ask("pusher", PASSWORDS["pusher"], "repository:team/a:pull,push").json()["token"]) == {
            "team/a": {"pull", "push"}}
        assert ask("reader", "wrong", "repository:team/a:pull").status_code == 401
        assert _granted(ask(None, None, "repository:team/a:pull").json()["token"]) == {"team/a": set()}
        header = jwt.get_unverified_header(ask(None, None).json()["token"])
        assert header["alg"] == "ES256" and header["x5c"]

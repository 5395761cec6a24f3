"""Registry endpoints from containerd's ``certs.d`` layout (``hosts.toml``), so BootSeer talks to the same mirrors
(a Dragonfly or Harbor proxy, a pull-through cache) with the same TLS settings as containerd on the node.

Layout: ``<dir>/<host[:port]>/hosts.toml``, falling back to ``<dir>/_default/hosts.toml``; Docker Hub's
directory is ``docker.io``.  A file has an optional ``server`` (the upstream; default ``https://<host>``) and
``[host."<url>"]`` tables tried in file order before it, each with ``capabilities`` (``pull``, ``resolve``,
``push``), ``skip_verify``, ``ca`` (file or list), ``client`` (cert or [cert, key] pairs), ``header`` and
``override_path``.  As in containerd, ``/v2`` is appended to a host's URL unless ``override_path`` is set, and
requests to a mirror carry ``?ns=<registry>`` so a shared mirror knows which upstream is meant.

Without a file: ``https://<host>``, or ``http://`` for loopback hosts and when plain HTTP is asked for
(``--plain-http``).  Docker-style ``*.crt`` / ``*.cert`` + ``*.key`` files in the host directory are used too.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootseer.reference import DEFAULT_REGISTRY, DOCKER_HUB_API, is_loopback

DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")
ALL_CAPABILITIES = frozenset({"pull", "resolve", "push"})


class HostsConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Endpoint:
    """One place to send requests for a registry: a mirror or the upstream itself."""

    base: str  # "https://mirror.example:5000/v2" (API root, no trailing slash)
    capabilities: frozenset[str] = ALL_CAPABILITIES
    verify: bool | str = True  # requests' ``verify``: False, True or a CA bundle path
    client_cert: tuple[str, str] | str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    mirror: bool = False  # requests get ?ns=<registry>
    auth_host: str = ""  # the host credentials are looked up for

    @property
    def host(self) -> str:
        return self.base.split("://", 1)[1].split("/", 1)[0]

    def url(self, path: str, namespace: str | None = None) -> str:
        """``path`` (starting with ``/``, relative to ``/v2``) on this endpoint."""
        out = self.base + path
        if self.mirror and namespace:
            out += ("&" if "?" in out else "?") + "ns=" + namespace
        return out


@dataclass
class HostsResolver:
    """Endpoints for a registry name, read from a certs.d directory (cached per registry)."""

    hosts_dir: Path | None = None
    plain_http: bool = False  # upstream without hosts.toml: http:// instead of https://
    insecure: bool = False  # skip TLS verification for upstreams without hosts.toml
    _cache: dict[str, list[Endpoint]] = field(default_factory=dict)

    def endpoints(self, registry: str, capability: str | None = None) -> list[Endpoint]:
        """Endpoints to try in order for ``registry`` (a reference's registry, e.g. ``docker.io``)."""
        if registry not in self._cache:
            self._cache[registry] = self._load(registry)
        eps = self._cache[registry]
        if capability:
            eps = [e for e in eps if capability in e.capabilities]
        return eps

    # ------------------------------------------------------------------------------------------------
    def _default_server(self, registry: str) -> str:
        host = DOCKER_HUB_API if registry == DEFAULT_REGISTRY else registry
        scheme = "http" if (self.plain_http or is_loopback(host)) else "https"
        return f"{scheme}://{host}"

    def _load(self, registry: str) -> list[Endpoint]:
        hdir = self._host_dir(registry)
        hosts_file = hdir / "hosts.toml" if hdir else None
        doc: dict[str, Any] = {}
        if hosts_file and hosts_file.is_file():
            try:
                doc = tomllib.loads(hosts_file.read_text())
            except (tomllib.TOMLDecodeError, OSError) as e:
                raise HostsConfigError(f"{hosts_file}: {e}") from e
        server = doc.get("server") or self._default_server(registry)
        if registry == DEFAULT_REGISTRY and server.rstrip("/") in ("https://docker.io", "http://docker.io"):
            server = "https://" + DOCKER_HUB_API
        eps: list[Endpoint] = []
        server_table = {k: v for k, v in doc.items() if k not in ("server", "host")}
        for url, table in (doc.get("host") or {}).items():
            if _same_url(url, server):
                # the usual way to give the registry itself a CA or a client certificate: its own [host]
                # entry.  It is the server, not a mirror (no ?ns=), and every request to it — referrers,
                # pushes, lazy blob reads — needs those settings, so they become the server's.
                server_table = {**server_table, **table}
                continue
            eps.append(self._endpoint(url, table, hdir, registry, mirror=True))
        if not doc and not self.plain_http and self.insecure:
            server_table["skip_verify"] = True
        eps.append(self._endpoint(server, server_table, hdir, registry, mirror=False))
        return eps

    def _host_dir(self, registry: str) -> Path | None:
        if self.hosts_dir is None:
            return None
        for name in (registry, "_default"):
            d = self.hosts_dir / name
            if d.is_dir():
                return d
        return None

    def _endpoint(self, url: str, table: dict[str, Any], hdir: Path | None, registry: str, mirror: bool) -> Endpoint:
        if "://" not in url:
            url = "https://" + url
        url = url.rstrip("/")
        if not table.get("override_path", False) and not url.endswith("/v2"):
            url += "/v2"
        caps = table.get("capabilities")
        capabilities = frozenset(caps) if caps is not None else ALL_CAPABILITIES
        if not capabilities <= ALL_CAPABILITIES:
            raise HostsConfigError(f"{url}: unknown capabilities {sorted(capabilities - ALL_CAPABILITIES)}")
        verify: bool | str = not table.get("skip_verify", False)
        ca = table.get("ca")
        if ca and verify:
            cas = [ca] if isinstance(ca, str) else list(ca)
            verify = _resolve(cas[0], hdir)  # requests takes one bundle; the first one wins
        elif verify and hdir is not None:
            crts = sorted(hdir.glob("*.crt"))
            if crts:
                verify = str(crts[0])
        client: tuple[str, str] | str | None = None
        cl = table.get("client")
        if cl:
            first = cl if isinstance(cl, str) else cl[0]
            if isinstance(first, str):
                client = _resolve(first, hdir)
            else:
                client = (_resolve(first[0], hdir), _resolve(first[1], hdir))
        elif hdir is not None:
            certs = sorted(hdir.glob("*.cert"))
            if certs and certs[0].with_suffix(".key").exists():
                client = (str(certs[0]), str(certs[0].with_suffix(".key")))
        headers: list[tuple[str, str]] = []
        for k, v in (table.get("header") or {}).items():
            for item in [v] if isinstance(v, str) else v:
                headers.append((k, str(item)))
        return Endpoint(url, capabilities, verify, client, tuple(headers), mirror,
                        auth_host=url.split("://", 1)[1].split("/", 1)[0])


def default_hosts_dir(given: str | None = None) -> str:
    """Where a CLI finds ``hosts.toml`` files: ``given``, else ``BOOTSEER_HOSTS_DIR``, else the local
    stack's (when one is up: its registry is plain-HTTP loopback), else containerd's ``certs.d``."""
    if given:
        return given
    if os.environ.get("BOOTSEER_HOSTS_DIR"):
        return os.environ["BOOTSEER_HOSTS_DIR"]
    from bootseer.localstack import local_stack_value

    config = local_stack_value("containerd_config")
    d = Path(config).parent / "certs.d" if config else None
    return str(d) if d is not None and d.is_dir() else str(DEFAULT_HOSTS_DIR)


def _same_url(a: str, b: str) -> bool:
    """Whether two ``hosts.toml`` URLs name the same endpoint (scheme defaulting to https, ``/v2`` optional)."""
    def norm(u: str) -> str:
        u = (u if "://" in u else "https://" + u).rstrip("/")
        return u.removesuffix("/v2")

    return norm(a) == norm(b)


def _resolve(p: str, hdir: Path | None) -> str:
    if os.path.isabs(p) or hdir is None:
        return p
    return str(hdir / p)

"""``/etc/bootseer/config.toml`` for ``bootseer snapshotter serve``.  Every key is optional::

    root = "/var/lib/bootseer/snapshotter"
    address = "/run/bootseer/snapshotter.sock"
    log_level = "info"          # debug | info | warning | error
    log_format = "text"         # text | json
    metrics_address = ""        # host:port for Prometheus /metrics; empty = off
    remote_snapshots = false    # lazy layers for images with a BootSeer index (needs FUSE; off: plain overlay)
    control_address = ""        # unix socket for `bootseer status`, recording, prefetch; "" = <address>.ctl
    hosts_dir = "/etc/containerd/certs.d"   # registry mirrors/TLS as containerd's hosts.toml
    plain_http = false          # registries without a hosts.toml over http:// (loopback always is)
    docker_config = ""          # credentials file; "" = ~/.docker/config.json
    access_log = ""             # JSON-lines log of every FUSE read (debugging; recordings use the socket)
    hotblock_prefetch = true    # replay an image's recorded hot blocks at Prepare (bootseer record)
    lookup_timeout = 30.0       # seconds a Prepare waits for the index lookup before the ordinary pull
    lookup_concurrency = 4      # index lookups at once per registry; beyond, Prepares fall back at once
    containerd_address = ""     # containerd's socket: at start, have it collect what it removed while we were
                                # down (snapshotter.reconcile); "" = off
    containerd_snapshotter = "bootseer"     # this daemon's proxy plugin name in containerd's config

    [trust]                     # which indexes lazy layers may come from (docs/security.md)
    mode = "require"            # require: only indexes signed by one of `keys` | prefer | off
    keys = ["/etc/bootseer/index.pub"]      # PEM public keys (cosign's), of the converters' signing keys
    [[trust.rules]]             # per registry or registry/repository prefix; the most specific wins
    scope = "registry.internal:5000/scratch"
    mode = "prefer"             # (keys: the table's unless the rule lists its own)

    [cri]                       # Kubernetes pull secrets for lazy reads (snapshotter.criproxy)
    image_service_socket = ""   # kubelet's --image-service-endpoint: serve the CRI image service here; "" = off
    containerd_cri_socket = "/run/containerd/containerd.sock"   # where every image-service call is forwarded

    [lazy]                      # the data path's knobs, see snapshotter.lazy.manager.LazyConfig
    cache_cap_bytes = 21474836480
    fetch = { read_timeout = 30.0 }

(the same keys may instead sit in a ``[snapshotter]`` table of a config file shared with other daemons,
with ``[snapshotter.lazy]``).
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bootseer.trust import TrustPolicy


@dataclass
class CriConfig:
    """The ``[cri]`` table: the CRI image-service proxy that keeps kubelet's pull secrets for lazy reads."""

    image_service_socket: str = ""  # "" = no proxy: lazy reads use the docker config only
    containerd_cri_socket: str = "/run/containerd/containerd.sock"

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> CriConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"[cri]: unknown keys {', '.join(_with_guess(k, known) for k in unknown)}")
        cfg = cls(**doc)
        for name in known:
            if not isinstance(getattr(cfg, name), str):
                raise ValueError(f"[cri] {name} must be a socket path (a string)")
        if cfg.image_service_socket and not cfg.containerd_cri_socket:
            raise ValueError("[cri] containerd_cri_socket must name containerd's socket when image_service_socket "
                             "is set")
        if cfg.image_service_socket and _socket_path(cfg.image_service_socket) == _socket_path(
                cfg.containerd_cri_socket):
            raise ValueError("[cri] image_service_socket must not be containerd's own socket")
        return cfg


def _socket_path(address: str) -> str:
    return address.removeprefix("unix://")


@dataclass
class Config:
    """The daemon's settings; the defaults are the paths the systemd unit and containerd snippet use."""

    root: Path = Path("/var/lib/bootseer/snapshotter")
    address: Path = Path("/run/bootseer/snapshotter.sock")
    log_level: str = "info"
    log_format: str = "text"
    metrics_address: str = ""
    remote_snapshots: bool = False  # off unless configured: it mounts FUSE under root (see the lazy package)
    control_address: str = ""
    hosts_dir: str = "/etc/containerd/certs.d"
    plain_http: bool = False
    docker_config: str = ""
    access_log: str = ""
    hotblock_prefetch: bool = True
    lookup_timeout: float = 30.0  # a Prepare waits this long for its registry lookup (snapshotter.lazy.lookups)
    lookup_concurrency: int = 4  # lookups at once per registry: what a slow registry can hold
    containerd_address: str = ""  # containerd's socket, for the start-up reconciliation ("" = off)
    containerd_snapshotter: str = "bootseer"  # the proxy plugin's name there
    lazy: dict[str, Any] = field(default_factory=dict)
    trust: dict[str, Any] = field(default_factory=dict)  # bootseer.trust.TrustPolicy; default mode "require"
    cri: CriConfig = field(default_factory=CriConfig)

    @property
    def control_path(self) -> Path:
        """The control socket: ``control_address``, or the gRPC socket's path + ``.ctl``."""
        return Path(self.control_address) if self.control_address else self.address.with_name(
            self.address.name + ".ctl")

    def trust_policy(self) -> TrustPolicy:
        """The ``[trust]`` table as a policy (keys read now)."""
        from bootseer.trust import TrustPolicy

        return TrustPolicy.from_dict(self.trust)

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> Config:
        """Read ``path`` (None: defaults only), then apply non-None ``overrides`` (the CLI flags).  Unknown
        keys are an error: a typo in a config file should not silently fall back to a default."""
        doc: dict[str, Any] = {}
        if path is not None:
            try:
                doc = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ValueError(f"config {path}: {e}") from e
        # one file may configure several BootSeer daemons: other parts' tables are theirs to check, and a
        # [snapshotter] table overrides the top-level keys
        section = doc.get("snapshotter", {})
        tables = {k: doc[k] for k in ("lazy", "trust", "cri") if isinstance(doc.get(k), dict)}
        doc = {k: v for k, v in doc.items() if not isinstance(v, dict)}
        doc.update(tables)
        if isinstance(section, dict):
            doc.update(section)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"config {path}: unknown keys {', '.join(_with_guess(k, known) for k in unknown)}")
        doc.update({k: v for k, v in overrides.items() if v is not None})
        if "cri" in doc:
            if not isinstance(doc["cri"], dict):
                raise ValueError(f"config {path}: cri must be a table")
            try:
                doc["cri"] = CriConfig.from_dict(doc["cri"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"config {path}: {e}") from e
        cfg = cls(**doc)
        cfg.root, cfg.address = Path(cfg.root), Path(cfg.address)
        if cfg.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError(f"log_level must be debug, info, warning or error, not {cfg.log_level!r}")
        if cfg.metrics_address and not cfg.metrics_address.rpartition(":")[2].isdigit():
            raise ValueError(f"metrics_address must be host:port, not {cfg.metrics_address!r}")
        if cfg.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {cfg.log_format!r}")
        if not (isinstance(cfg.lookup_timeout, (int, float)) and cfg.lookup_timeout > 0):
            raise ValueError(f"lookup_timeout must be a positive number of seconds, not {cfg.lookup_timeout!r}")
        if not (isinstance(cfg.lookup_concurrency, int) and cfg.lookup_concurrency >= 1):
            raise ValueError(f"lookup_concurrency must be a positive integer, not {cfg.lookup_concurrency!r}")
        if not (isinstance(cfg.containerd_snapshotter, str) and cfg.containerd_snapshotter):
            raise ValueError("containerd_snapshotter must name the proxy plugin (as in containerd's config)")
        if not isinstance(cfg.lazy, dict):
            raise ValueError("lazy must be a table")
        if not isinstance(cfg.trust, dict):
            raise ValueError("trust must be a table")
        if cfg.remote_snapshots:
            from bootseer.trust import TrustError
            from snapshotter.lazy.manager import LazyConfig  # the data path's own check of its table

            try:
                cfg.trust_policy()
            except TrustError as e:
                raise ValueError(f"config {path}: {e}") from e

            try:
                LazyConfig.from_dict(cfg.lazy)
            except (TypeError, ValueError) as e:
                raise ValueError(f"config {path}: [lazy]: {e}") from e
        return cfg


def _with_guess(key: str, known: set[str]) -> str:
    """``key`` and, when a known key is close to it, ``(did you mean …?)``: most unknown keys are typos."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"{key} (did you mean {close[0]}?)" if close else key

"""containerd configuration for BootSeer: the snippet an operator adds (``bootseer config containerd``)
and the complete file the local stack runs with.  Both come from the same functions so what the tests
prove about the stack holds for the snippet too.

containerd 1.6/1.7 read config ``version = 2`` (CRI under ``io.containerd.grpc.v1.cri``); containerd 2.x
reads ``version = 3``, where the CRI image service moved to ``io.containerd.cri.v1.images`` and pulls that
don't go through CRI use the transfer service's ``unpack_config``.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_SOCKET = "/run/bootseer/snapshotter.sock"
DEFAULT_ROOT = "/var/lib/bootseer/snapshotter"


def _q(s: str | Path) -> str:
    return json.dumps(str(s))  # TOML basic strings accept JSON string escapes


def proxy_plugin(address: str | Path, root: str | Path = DEFAULT_ROOT, name: str = "bootseer") -> str:
    return (
        f"[proxy_plugins.{name}]\n"
        '  type = "snapshot"\n'
        f"  address = {_q(address)}\n"
        f"  [proxy_plugins.{name}.exports]\n"
        f"    root = {_q(root)}\n"
        '    enable_remote_snapshot_annotations = "true"\n'
    )


def snippet(containerd_version: str = "1.6", address: str | Path = DEFAULT_SOCKET,
            root: str | Path = DEFAULT_ROOT, cri: bool = True, platform: str = "linux/amd64") -> str:
    """The lines to merge into ``/etc/containerd/config.toml`` to use BootSeer as a (CRI) snapshotter."""
    major = containerd_version.split(".")[0]
    if major == "1":
        out = "version = 2\n\n" + proxy_plugin(address, root)
        if cri:
            out += (
                '\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
                '  snapshotter = "bootseer"\n'
                "  # CRI must pass the image ref and layer digests to the snapshotter for lazy pull\n"
                "  disable_snapshot_annotations = false\n"
            )
        return out
    if major == "2":
        out = "version = 3\n\n" + proxy_plugin(address, root)
        if cri:
            out += (
                '\n[plugins."io.containerd.cri.v1.images"]\n'
                '  snapshotter = "bootseer"\n'
                "  disable_snapshot_annotations = false\n"
            )
        out += (
            '\n[[plugins."io.containerd.transfer.v1.local".unpack_config]]\n'
            f"  platform = {_q(platform)}\n"
            '  snapshotter = "bootseer"\n'
        )
        return out
    raise ValueError(f"unsupported containerd version {containerd_version!r} (1.6, 1.7 or 2.x)")


def stack_config(
    root: Path,
    socket: Path,
    sandbox_image: str,
    certs_dir: Path,
    snapshotter_socket: Path | None,
    snapshotter_root: Path | None,
    cri_snapshotter: str = "overlayfs",
) -> str:
    """A complete containerd 1.6 config for the local stack: everything under ``root``."""
    lines = [
        "version = 2",
        f"root = {_q(root / 'root')}",
        f"state = {_q(root / 'state')}",
        "disabled_plugins = [",
        '  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",',
        '  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",',
        '  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",',
        "]",
        "",
        "[grpc]",
        f"  address = {_q(socket)}",
        "[ttrpc]",
        f"  address = {_q(str(socket) + '.ttrpc')}",
        "[debug]",
        '  level = "info"',
        "",
        '[plugins."io.containerd.internal.v1.opt"]',
        f"  path = {_q(root / 'opt')}",
        '[plugins."io.containerd.grpc.v1.cri"]',
        f"  sandbox_image = {_q(sandbox_image)}",
        "  disable_apparmor = true",
        "  restrict_oom_score_adj = true",
        '[plugins."io.containerd.grpc.v1.cri".containerd]',
        f"  snapshotter = {_q(cri_snapshotter)}",
        "  disable_snapshot_annotations = false",
        '[plugins."io.containerd.grpc.v1.cri".cni]',
        f"  bin_dir = {_q(root / 'cni' / 'bin')}",
        f"  conf_dir = {_q(root / 'cni' / 'conf')}",
        '[plugins."io.containerd.grpc.v1.cri".registry]',
        f"  config_path = {_q(certs_dir)}",
        "",
    ]
    out = "\n".join(lines)
    if snapshotter_socket is not None:
        out += "\n" + proxy_plugin(snapshotter_socket, snapshotter_root or DEFAULT_ROOT)
    return out


def hosts_toml(registry: str) -> str:
    """certs.d/<host:port>/hosts.toml for a plain-HTTP registry on the loopback / stack network."""
    return (
        f'server = "http://{registry}"\n\n'
        f'[host."http://{registry}"]\n'
        '  capabilities = ["pull", "resolve", "push"]\n'
        "  skip_verify = true\n"
    )

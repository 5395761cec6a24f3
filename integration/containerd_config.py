"""containerd configuration for BootSeer: the snippet an operator adds (``bootseer config containerd``)
and the complete file the local stack runs with.  Both come from the same functions so what the tests
prove about the stack holds for the snippet too.

containerd 1.6/1.7 read config ``version = 2`` (CRI under ``io.containerd.grpc.v1.cri``); containerd 2.x
reads ``version = 3``, where the CRI image service moved to ``io.containerd.cri.v1.images`` and pulls that
don't go through CRI use the transfer service's ``unpack_config``.
"""

from __future__ import annotations

import json
import platform
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


def host_platform() -> str:
    """``linux/<arch>`` of this machine in OCI spelling (what the transfer service matches unpacks against)."""
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
            "riscv64": "riscv64"}.get(platform.machine(), platform.machine())
    return f"linux/{arch}"


def _version(containerd_version: str) -> tuple[int, int]:
    parts = containerd_version.strip().lstrip("v").split(".")
    try:
        major, minor = int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1] != "x" else 0
    except ValueError:
        raise ValueError(f"unsupported containerd version {containerd_version!r} (1.6, 1.7 or 2.x)") from None
    if (major, minor) < (1, 6) or major > 2:
        raise ValueError(f"unsupported containerd version {containerd_version!r} (1.6, 1.7 or 2.x)")
    return major, minor


def _unpack_config(plugin: str, platform_: str, default_snapshotter: str | None) -> str:
    # Pulls through the transfer service (ctr, nerdctl; CRI on 2.1+) unpack with the first entry whose
    # platform matches, unless the client names a snapshotter: BootSeer first, and the stock snapshotter
    # after it so `--snapshotter overlayfs` pulls keep working (an unpack_config list replaces the default).
    out = f'\n[[plugins.{_q(plugin)}.unpack_config]]\n  platform = {_q(platform_)}\n  snapshotter = "bootseer"\n'
    if default_snapshotter:
        out += (f'\n[[plugins.{_q(plugin)}.unpack_config]]\n  platform = {_q(platform_)}\n'
                f"  snapshotter = {_q(default_snapshotter)}\n")
    return out


def snippet(containerd_version: str = "1.6", address: str | Path = DEFAULT_SOCKET,
            root: str | Path = DEFAULT_ROOT, cri: bool = True, platform: str | None = None,
            cri_pull: str = "local", keep_snapshotter: str | None = "overlayfs") -> str:
    """The lines to merge into ``/etc/containerd/config.toml`` to use BootSeer as a (CRI) snapshotter.

    - 1.6: config v2; the proxy plugin, and CRI's ``snapshotter`` with snapshot annotations on (CRI passes
      the image ref and layer digests as labels: what a remote snapshot needs).
    - 1.7: the same, plus the transfer service's ``unpack_config`` (``ctr --local=false`` pulls).
    - 2.x: config v3; CRI's image settings moved to ``io.containerd.cri.v1.images``; ``unpack_config`` for
      the transfer service, which ``ctr`` uses by default.  ``cri_pull="local"`` (default) keeps
      ``disable_snapshot_annotations = false``, which 2.0 needs and which makes 2.1+ pull CRI images
      without the transfer service; ``cri_pull="transfer"`` (2.1+) leaves it out so CRI pulls go through
      the transfer service, where the ``enable_remote_snapshot_annotations`` export of the proxy plugin
      makes containerd pass the same labels.
    """
    major, minor = _version(containerd_version)
    if cri_pull not in ("local", "transfer"):
        raise ValueError(f"cri_pull must be local or transfer, not {cri_pull!r}")
    if cri_pull == "transfer" and (major, minor) < (2, 1):
        raise ValueError("CRI pulls go through the transfer service only from containerd 2.1 on")
    plat = platform or host_platform()
    if major == 1:
        out = "version = 2\n\n" + proxy_plugin(address, root)
        if cri:
            out += (
                '\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
                '  snapshotter = "bootseer"\n'
                "  # CRI must pass the image ref and layer digests to the snapshotter for lazy pull\n"
                "  disable_snapshot_annotations = false\n"
            )
        if minor >= 7:
            out += _unpack_config("io.containerd.transfer.v1.local", plat, keep_snapshotter)
        return out
    out = "version = 3\n\n" + proxy_plugin(address, root)
    if cri:
        out += '\n[plugins."io.containerd.cri.v1.images"]\n  snapshotter = "bootseer"\n'
        if cri_pull == "local":
            out += "  # labels for lazy pull on CRI's own pull path (2.1+: also keeps CRI off the transfer service)\n"
            out += "  disable_snapshot_annotations = false\n"
    out += _unpack_config("io.containerd.transfer.v1.local", plat, keep_snapshotter)
    return out


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

"""Deployment artefacts are accepted by the systems that read them: containerd 1.6 (the generated config),
systemd (the units) and the Kubernetes API schema (the DaemonSet)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bootseer.testkit import free_port
from integration import containerd_config
from integration.stack import unmount_below, wait_for
from tests.conftest import scratch_root

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("unit", sorted((ROOT / "integration" / "systemd").glob("*.service")), ids=lambda p: p.name)
def test_systemd_unit_verifies(unit: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    # systemd-analyze exits 0 on some bad settings and only complains on stderr: both must be clean
    assert proc.returncode == 0 and unit.name not in proc.stderr, proc.stderr


def _unit(name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (ROOT / "integration" / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, value)
    return out


def test_units_put_sockets_and_state_where_containerd_and_the_daemons_look() -> None:
    from registry_sidecar.sidecar import SidecarConfig
    from snapshotter.config import Config

    snap, side = _unit("bootseer-snapshotter.service"), _unit("bootseer-sidecar.service")
    defaults = Config.load(None)
    # /run/<RuntimeDirectory> holds the socket the containerd snippet dials; /var/lib/<StateDirectory> the root
    assert Path(containerd_config.DEFAULT_SOCKET).parent == Path("/run") / snap["RuntimeDirectory"]
    assert defaults.address == Path(containerd_config.DEFAULT_SOCKET)
    assert defaults.root.parent == Path("/var/lib") / snap["StateDirectory"]
    assert Path(SidecarConfig().state_dir) == Path("/var/lib") / side["StateDirectory"]
    assert snap["ExecStart"].split()[1:3] == ["snapshotter", "serve"]
    assert side["ExecStart"].split()[1:3] == ["sidecar", "serve"]


def test_snapshotter_unit_keeps_fuse_alive_across_restarts() -> None:
    unit = (ROOT / "integration" / "systemd" / "bootseer-snapshotter.service").read_text()
    assert "KillMode=process" in unit


@pytest.mark.parametrize("manifest", sorted((ROOT / "integration" / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_pass_the_schema(manifest: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", str(manifest)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _k8s(name: str) -> dict[str, dict]:
    import yaml

    return {d["kind"]: d for d in yaml.safe_load_all((ROOT / "integration" / "k8s" / name).read_text())}


def test_daemonset_gives_the_snapshotter_what_lazy_layers_need(tmp_path: Path) -> None:
    from snapshotter.config import Config

    docs = _k8s("daemonset.yaml")
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["securityContext"]["privileged"] is True  # FUSE, loop devices, erofs/overlay mounts
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    # the lazy layers mounted under /var/lib/bootseer must be visible to containerd on the host
    assert mounts["/var/lib/bootseer"]["mountPropagation"] == "Bidirectional"
    host = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    for path in ("/dev/fuse", "/run/bootseer", "/run/containerd", "/etc/containerd/certs.d"):
        assert host[mounts[path]["name"]] == path
    # the ConfigMap is a config the daemon accepts, serving where the unit, probe and containerd snippet expect
    cfg_file = tmp_path / "config.toml"
    text = docs["ConfigMap"]["data"]["config.toml"]
    # production requires signed indexes, with the key mounted from the bootseer-index-trust ConfigMap
    from bootseer.trust import generate_keypair

    key = mounts["/etc/bootseer-trust"]
    assert {v["name"]: v for v in pod["volumes"]}[key["name"]]["configMap"]["name"] == "bootseer-index-trust"
    generate_keypair(tmp_path / "index.key", tmp_path / "index.pub")
    assert "/etc/bootseer-trust/index.pub" in text
    cfg_file.write_text(text.replace("/etc/bootseer-trust/index.pub", str(tmp_path / "index.pub")))
    cfg = Config.load(cfg_file)
    assert cfg.trust_policy().rule_for("any.registry/any/repo").mode == "require"
    assert str(cfg.address) == containerd_config.DEFAULT_SOCKET and str(cfg.root) == containerd_config.DEFAULT_ROOT
    assert cfg.remote_snapshots and cfg.metrics_address.endswith(f":{c['ports'][0]['containerPort']}")
    assert tomllib.loads(cfg_file.read_text())["events"]["path"].startswith("/var/lib/bootseer/")
    # the CRI image-service proxy (kubelet's pull secrets): its socket on the host's /run/bootseer for kubelet,
    # containerd's CRI socket through the /run/containerd mount
    assert Path(cfg.cri.image_service_socket).parent == Path("/run/bootseer")
    assert Path(cfg.cri.containerd_cri_socket).parent == Path("/run/containerd")


def test_registry_pod_wires_notifications_to_the_sidecar(tmp_path: Path) -> None:
    import yaml

    from registry_sidecar.sidecar import SidecarConfig, notifications_config

    docs = _k8s("registry-sidecar.yaml")
    data = docs["ConfigMap"]["data"]
    registry = yaml.safe_load(data["config.yml"])
    side_file = tmp_path / "sidecar.toml"
    side_file.write_text(data["sidecar.toml"])
    side = SidecarConfig.load(side_file)
    # the sidecar signs every index with a key from a Secret (nodes require the signature)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for c in pod["containers"] if c["name"] == "sidecar" for m in c["volumeMounts"]}
    assert side.signing_key is not None
    vol = {v["name"]: v for v in pod["volumes"]}[mounts[str(Path(side.signing_key).parent)]]
    assert vol["secret"]["secretName"] == "bootseer-index-signing"
    port = side.listen.rpartition(":")[2]
    assert registry["notifications"] == notifications_config(f"http://127.0.0.1:{port}")
    assert side.registry.rpartition(":")[2] == registry["http"]["addr"].rpartition(":")[2]
    containers = {c["name"]: c for c in docs["Deployment"]["spec"]["template"]["spec"]["containers"]}
    assert containers["sidecar"]["args"][:2] == ["sidecar", "serve"]


@pytest.mark.parametrize("version", ["1.6", "1.7", "2.0", "2.1"])
def test_snippet_is_valid_toml_with_the_proxy_plugin(version: str) -> None:
    doc = tomllib.loads(containerd_config.snippet(version, "/run/x.sock", platform="linux/arm64"))
    assert doc["proxy_plugins"]["bootseer"] == {
        "type": "snapshot", "address": "/run/x.sock",
        # the export tells containerd's transfer service to pass the image ref/layer labels (remote snapshots)
        "exports": {"root": containerd_config.DEFAULT_ROOT, "enable_remote_snapshot_annotations": "true"}}
    assert doc["version"] == (3 if version.startswith("2") else 2)
    if version.startswith("2"):
        assert doc["plugins"]["io.containerd.cri.v1.images"] == {"snapshotter": "bootseer",
                                                                 "disable_snapshot_annotations": False}
        assert "io.containerd.grpc.v1.cri" not in doc["plugins"]  # v3 moved CRI's image keys
    else:
        cri = doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
        assert cri == {"snapshotter": "bootseer", "disable_snapshot_annotations": False}
    if version == "1.6":
        assert "io.containerd.transfer.v1.local" not in doc["plugins"]  # 1.6 has no transfer service
    else:
        # bootseer first (the default for transfer pulls), the stock snapshotter kept for explicit requests
        assert doc["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"] == [
            {"platform": "linux/arm64", "snapshotter": "bootseer"},
            {"platform": "linux/arm64", "snapshotter": "overlayfs"}]


def test_snippet_for_cri_pulls_through_the_transfer_service() -> None:
    doc = tomllib.loads(containerd_config.snippet("2.1", cri_pull="transfer"))
    # 2.1+ keeps CRI on its own pull path when disable_snapshot_annotations is set: here it must be absent
    assert doc["plugins"]["io.containerd.cri.v1.images"] == {"snapshotter": "bootseer"}
    unpack = doc["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
    assert unpack[0] == {"platform": containerd_config.host_platform(), "snapshotter": "bootseer"}
    assert doc["proxy_plugins"]["bootseer"]["exports"]["enable_remote_snapshot_annotations"] == "true"
    with pytest.raises(ValueError, match=r"containerd 2\.1"):
        containerd_config.snippet("2.0", cri_pull="transfer")


def test_snippet_without_cri_has_only_the_plugin_and_unpack() -> None:
    doc = tomllib.loads(containerd_config.snippet("2.x", cri=False))
    assert set(doc["plugins"]) == {"io.containerd.transfer.v1.local"} and "bootseer" in doc["proxy_plugins"]


@pytest.mark.parametrize("bad", ["0.9", "1.5", "3.0", "latest", ""])
def test_snippet_rejects_unknown_containerd_version(bad: str) -> None:
    with pytest.raises(ValueError, match="unsupported containerd version"):
        containerd_config.snippet(bad)


def test_cli_reports_a_bad_version_clearly() -> None:
    proc = subprocess.run([sys.executable, "-m", "bootseer.cli", "config", "containerd", "--containerd-version",
                           "9"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unsupported containerd version" in proc.stderr and not proc.stdout


@pytest.mark.parametrize("version", ["1.6", "1.7"])
def test_containerd_16_loads_the_snippet(version: str) -> None:
    """containerd 1.6 started with the printed snippet (via `imports`) registers the proxy snapshotter and
    configures CRI to use it; the 1.7 snippet's transfer keys are ignored by 1.6 (a mixed fleet can share one
    file)."""
    root = scratch_root("cfg")
    root.mkdir()
    sock = root / "c.sock"
    snippet = root / "bootseer.toml"
    proc = subprocess.run([sys.executable, "-m", "bootseer.cli", "config", "containerd", "--containerd-version",
                           version, "--address", str(root / "snap.sock")], capture_output=True, text=True, check=True)
    snippet.write_text(proc.stdout)
    main = root / "config.toml"
    main.write_text(
        f'version = 2\nimports = ["{snippet}"]\nroot = "{root}/root"\nstate = "{root}/state"\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
        f'[plugins."io.containerd.grpc.v1.cri"]\n  stream_server_port = "{free_port()}"\n'
    )
    log = root / "containerd.log"
    with open(log, "wb") as fh:
        daemon = subprocess.Popen(["containerd", "--config", str(main)], stdout=fh, stderr=subprocess.STDOUT)
    try:
        def plugins() -> str:
            return subprocess.run(["ctr", "-a", str(sock), "plugins", "ls"], capture_output=True, text=True,
                                  timeout=5).stdout

        wait_for("containerd", lambda: "bootseer" in plugins(), 30, daemon, log)  # type: ignore[arg-type]
        line = next(ln for ln in plugins().splitlines() if " bootseer " in ln)
        assert line.split()[0] == "io.containerd.snapshotter.v1"
        dump = subprocess.run(["containerd", "--config", str(main), "config", "dump"], capture_output=True,
                              text=True, check=True).stdout
        cri = tomllib.loads(dump)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
        assert cri["snapshotter"] == "bootseer" and cri["disable_snapshot_annotations"] is False
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        unmount_below(root)
        shutil.rmtree(root, ignore_errors=True)

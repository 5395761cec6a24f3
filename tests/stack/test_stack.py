"""The local stack: containerd + registry come up, run the small image, and leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from integration import images
from integration.netns import parse_rate
from integration.stack import Stack, StackConfig, loops_below, mounts_below, running, wait_for
from tests.conftest import scratch_root


def leftovers(st_root: Path, netns: str | None) -> list[str]:
    """Everything a stack at ``st_root`` could leave behind on the machine."""
    out = [f"mount {m}" for m in mounts_below(st_root)]
    out += [f"loop {d}" for d in loops_below(st_root)]
    if netns and netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout:
        out.append(f"netns {netns}")
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(st_root) in cmd:
                out.append(f"process {d.name}: {cmd[:80]}")
    return out


def test_status_lists_every_address(stack: Stack) -> None:
    proc = subprocess.run([sys.executable, "-m", "bootseer.cli", "stack", "status", "--json", "--root",
                           stack.info.root], capture_output=True, text=True, check=True)
    doc = json.loads(proc.stdout)
    assert doc["containerd_socket"] == stack.info.containerd_socket
    assert requests.get(f"http://{doc['registry']}/v2/", timeout=5).status_code == 200
    assert all(doc["running"].values()), doc["running"]
    for log in doc["logs"].values():
        assert Path(log).exists()


def test_pull_and_run_small_image(stack: Stack, small_image: str) -> None:
    stack.ctr("image", "pull", "--plain-http", small_image)
    out = stack.ctr("run", "--rm", small_image, "t-small-" + os.urandom(3).hex()).stdout
    assert out == images.SMALL_OUTPUT


def test_cri_sandbox_image_is_served_by_the_local_registry(stack: Stack) -> None:
    r = requests.get(f"{stack.info.registry_url}/v2/bootseer/pause/tags/list", timeout=5)
    # the sidecar may have attached its index under a referrers-schema tag (sha256-<hex>): not an image tag
    assert [t for t in r.json()["tags"] if not t.startswith("sha256-")] == ["v1"]
    assert f'sandbox_image = "{stack.info.sandbox_image}"' in Path(stack.info.containerd_config).read_text()


def test_down_leaves_nothing_behind_after_running_a_container(small_image: str) -> None:
    root = scratch_root()
    with running(StackConfig(root=root)) as st:
        ref = images.push_small(st.info.registry)
        st.ctr("image", "pull", "--plain-http", ref)
        # a container still running at `down`: its shim, mounts and runc state must go too
        st.ctr("run", "-d", ref, "left-running", "/bin/sleep", "600")
        assert mounts_below(root), "the running container's rootfs should be mounted"
    assert leftovers(root, None) == []
    assert not root.exists()


def test_down_cleans_up_after_up_was_killed() -> None:
    root = scratch_root()
    tmp_before = set(Path(tempfile.gettempdir()).glob("bs-pause-*"))  # `up` builds its sandbox image below root
    proc = subprocess.Popen([sys.executable, "-m", "bootseer.cli", "stack", "up", "--root", str(root),
                             "--rate", "1gbit"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        state = root / "stack.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until `up` has started the registry in its netns
            if state.exists() and "registry" in json.loads(state.read_text() or "{}").get("pids", {}):
                break
            assert proc.poll() is None, "stack up exited before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("stack up never started the registry")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        netns = json.loads(state.read_text())["netns"]
        assert leftovers(root, netns), "the killed `up` should have left something to clean"
    finally:
        subprocess.run([sys.executable, "-m", "bootseer.cli", "stack", "down", "--root", str(root)],
                       check=True, capture_output=True)
    assert leftovers(root, netns) == []
    assert set(Path(tempfile.gettempdir()).glob("bs-pause-*")) <= tmp_before  # nothing left in the temp dir


def test_shaped_registry_link_is_really_shaped() -> None:
    """At 100 Mbit/s a 50 MB blob takes at least 4 s to download."""
    blob = os.urandom(50 * 1000 * 1000)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with running(StackConfig(root=scratch_root(), rate="10gbit")) as st:
        base = f"{st.info.registry_url}/v2/shaping/test"
        loc = requests.post(f"{base}/blobs/uploads/", timeout=10).headers["Location"]
        loc = loc if loc.startswith("http") else st.info.registry_url + loc
        sep = "&" if "?" in loc else "?"
        requests.put(f"{loc}{sep}digest={digest}", data=blob, timeout=60).raise_for_status()
        from integration.netns import ShapedLink

        ShapedLink(st.info.netns_id or "", 0).set_rate(parse_rate("100mbit"))
        t0 = time.monotonic()
        r = requests.get(f"{base}/blobs/{digest}", timeout=120)
        elapsed = time.monotonic() - t0
        assert r.content == blob
        assert elapsed >= 4.0, f"50 MB at 100 Mbit/s arrived in {elapsed:.2f}s: shaping not in effect"

        # the registry in its namespace posts its notifications off the sidecar's loopback, with the stack's
        # token: a pushed image is still converted (without the token the sidecar answers 403 and nothing is)
        ShapedLink(st.info.netns_id or "", 0).set_rate(parse_rate("10gbit"))
        from bootseer.index import find_index
        from bootseer.reference import Reference
        from bootseer.registry import RegistryClient

        ref = images.push_small(st.info.registry)
        client = RegistryClient(plain_http=True)
        digest = client.get_manifest(ref).digest
        wait_for("the sidecar's index of an image pushed across the link",
                 lambda: find_index(client, Reference.parse(ref), digest) is not None, 300,
                 log=Path(st.info.logs["sidecar"]))


def test_parse_rate() -> None:
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("200Mbit") == 200 * 10**6
    with pytest.raises(ValueError):
        parse_rate("fast")

"""The CRI ``runtime.v1`` subset and :mod:`bootseer.cri`, proven against containerd 1.6's CRI plugin.

The stubs are ours (upstream's names and field numbers, written by hand): if any of them were wrong, the
calls below would fail or decode garbage, because containerd speaks upstream's wire format.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootseer.cri import (
    ContainerTimeout,
    CRIClient,
    CRIError,
    ImageNotFound,
    LogRecord,
    join_stream,
    parse_cri_log,
    run_once,
)
from integration import images
from integration.stack import Stack, mounts_below


@pytest.fixture
def cri(stack: Stack) -> Iterator[CRIClient]:
    with CRIClient(stack.info.containerd_socket, timeout=30) as c:
        pods, ctrs = set(c.list_pod_sandboxes()), {x.id for x in c.list_containers()}
        yield c
        # every test must leave the runtime as it found it: no new pods, no new containers
        assert set(c.list_pod_sandboxes()) <= pods
        assert {x.id for x in c.list_containers()} <= ctrs


def _mentions(needle: str) -> list[str]:
    """Processes and mounts whose command line / mount point names ``needle`` (a sandbox or container ID)."""
    out = [m for m in mounts_below(Path("/")) if needle in m]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd:
                out.append(f"process {d.name}: {cmd[:100]}")
    return out


# ------------------------------------------------------------------------------------- log format, offline
def test_parse_cri_log_joins_partial_lines_per_stream() -> None:
    data = (b"2024-01-01T00:00:00.000000001Z stdout F hello\n"
            b"2024-01-01T00:00:00.000000002Z stderr P par\n"
            b"2024-01-01T00:00:00.000000003Z stdout P abc \n"
            b"2024-01-01T00:00:00.000000004Z stderr F tial\n"
            b"2024-01-01T00:00:00.000000005Z stdout F def\n"
            b"2024-01-01T00:00:00.000000006Z stdout F \n"
            b"2024-01-01T00:00:00.000000007Z stdout F unterminated")
    recs = parse_cri_log(data)
    assert recs[0] == LogRecord("2024-01-01T00:00:00.000000001Z", "stdout", False, b"hello")
    assert len(recs) == 6  # the line still being written is not guessed at
    assert join_stream(recs) == b"hello\nabc def\n\n"
    assert join_stream(recs, "stderr") == b"partial\n"


# ------------------------------------------------------------------------------------- against containerd
def test_version_and_status(cri: CRIClient) -> None:
    v = cri.version()
    assert v.runtime_name == "containerd"
    assert v.runtime_version.startswith("1.")
    assert v.runtime_api_version == "v1"
    assert cri.status()["RuntimeReady"] is True


def test_pull_image_and_status(cri: CRIClient, small_image: str) -> None:
    ref = cri.pull_image(small_image)
    assert ref.startswith("sha256:")
    info = cri.image_status(small_image)
    assert info is not None and info.id == ref
    assert small_image in info.repo_tags and info.size > 0
    assert any(i.id == ref for i in cri.list_images())
    assert cri.image_fs_info(), "containerd reports its image filesystem"


def test_remove_image(cri: CRIClient, stack: Stack) -> None:
    ref = images.push_small(stack.info.registry, repo="bootseer/cri-rm", tag="v1")
    cri.pull_image(ref)
    assert cri.image_status(ref) is not None
    cri.remove_image(ref)
    assert cri.image_status(ref) is None
    cri.remove_image(ref)  # idempotent


def test_run_once_returns_exit_code_and_stdout(stack: Stack, small_image: str) -> None:
    sock = stack.info.containerd_socket
    assert run_once(small_image, ["echo", "hello"], 60, address=sock) == (0, "hello\n")
    # the container sees the image's own files (its rootfs is the unpacked image)
    assert run_once(small_image, images.SMALL_CMD, 60, address=sock) == (0, images.SMALL_OUTPUT)


def test_run_separates_streams_keeps_partial_lines_and_cleans_up(cri: CRIClient, small_image: str) -> None:
    r = cri.run(small_image, ["/bin/sh", "-c", "echo out; echo err >&2; printf 'no newline'; exit 3"],
                60, env={"GREETING": "hi"})
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\nno newline", b"err\n")
    assert r.reason == "Error" and r.container.exited
    # nothing of the pod is left: not in CRI, no shim, no mount, no log directory
    assert r.sandbox_id not in cri.list_pod_sandboxes()
    assert _mentions(r.sandbox_id) == [] and _mentions(r.container.id) == []
    assert not Path(r.container.log_path).parent.exists()
    env = cri.run(small_image, ["/bin/sh", "-c", 'echo "$GREETING"'], 60, env={"GREETING": "hi"})
    assert env.stdout == b"hi\n"


def test_step_by_step_with_exec_sync(cri: CRIClient, small_image: str) -> None:
    cri.ensure_image(small_image)
    with cri.sandbox() as sb:
        assert cri.pod_sandbox_state(sb.id) == "SANDBOX_READY"
        cid = cri.create_container(sb, "sleeper", small_image, ["sleep", "60"])
        assert cri.container_status(cid).state == "CONTAINER_CREATED"
        cri.start_container(cid)
        assert cri.wait_container(cid, 30, until=lambda st: st.state == "CONTAINER_RUNNING").state == \
            "CONTAINER_RUNNING"
        assert cri.exec_sync(cid, ["/bin/sh", "-c", "cat /data/keep.txt; exit 4"]) == (4, b"kept\n", b"")
        assert [c.id for c in cri.list_containers(sandbox_id=sb.id)] == [cid]
        cri.stop_container(cid)
        st = cri.wait_container(cid, 30)
        assert st.exited and st.exit_code == 137  # SIGKILL: grace period 0
    assert sb.id not in cri.list_pod_sandboxes()


def test_timeout_stops_the_container_and_cleans_up(cri: CRIClient, small_image: str) -> None:
    with pytest.raises(ContainerTimeout, match="still CONTAINER_RUNNING after 1s"):
        cri.run(small_image, ["sleep", "60"], 1.0)


def test_unknown_image_is_a_clear_error(cri: CRIClient, stack: Stack) -> None:
    missing = f"{stack.info.registry}/bootseer/no-such-image:v1"
    with pytest.raises(ImageNotFound) as ei:
        cri.pull_image(missing)
    assert missing in str(ei.value) and "not found" in str(ei.value)
    with pytest.raises(ImageNotFound):
        cri.run(missing, ["true"], 10)
    # without pulling, CreateContainer is what fails — still a CRIError naming the image, and no pod leaks
    with pytest.raises(CRIError, match=r"CreateContainer.*no-such-image"):
        cri.run(missing, ["true"], 10, pull=False)


def test_cli_run(stack: Stack, small_image: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "bootseer.cli", "cri", "run", "-a", stack.info.containerd_socket,
                           small_image, "--", "/bin/sh", "-c", "echo from-cli; exit 2"],
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "from-cli\n"), proc.stderr
    # without --address it finds the running stack's containerd (BOOTSEER_STACK_DIR names the stack)
    env = {k: v for k, v in os.environ.items() if k != "CONTAINER_RUNTIME_ENDPOINT"}
    env["BOOTSEER_STACK_DIR"] = str(stack.root)
    proc = subprocess.run([sys.executable, "-m", "bootseer.cli", "cri", "run", small_image, "--", "echo", "found"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stdout) == (0, "found\n"), proc.stderr


def test_cli_version_pull_and_env(stack: Stack, small_image: str) -> None:
    """`bootseer cri version`, `cri pull` and `cri run --env`: what an operator types to check a node."""
    def cri(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bootseer.cli", "cri", *args], capture_output=True, text=True,
                              timeout=120)

    version = cri("version", "-a", stack.info.containerd_socket)
    assert version.returncode == 0, version.stderr
    assert re.fullmatch(r"containerd v?\d+\.\d+\.\d+\S* \(CRI v1\S*\)\n", version.stdout), version.stdout
    pulled = cri("pull", "-a", stack.info.containerd_socket, small_image)
    assert pulled.returncode == 0, pulled.stderr
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", pulled.stdout), pulled.stdout
    ran = cri("run", "-a", stack.info.containerd_socket, "--env", "BS_MARK=seen", small_image, "--",
              "/bin/sh", "-c", "echo $BS_MARK")
    assert (ran.returncode, ran.stdout) == (0, "seen\n"), ran.stderr

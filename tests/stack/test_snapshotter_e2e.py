"""End to end: containerd with BootSeer's snapshotter registered as a proxy plugin (the session stack) pulls,
unpacks and runs the small test image through it, and the unpacked tree equals the one containerd's own
``overlayfs`` snapshotter produces, file by file.  Also: the `bootseer snapshotter serve` command line with a
config file and its Prometheus metrics."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests

from bootseer.testkit import free_port
from integration import images
from integration.stack import Stack, wait_for
from tests.snapshotter_fixtures import Client, code_of, tree, tree_diff


@pytest.fixture
def ns(stack: Stack) -> Iterator[str]:
    """A containerd namespace of this test's own, removed with everything in it afterwards."""
    name = "bs-snap-" + secrets.token_hex(3)
    yield name
    for ctr_args in (["containers", "ls", "-q"], ["images", "ls", "-q"]):
        for item in stack.ctr(*ctr_args, namespace=name, check=False).stdout.split():
            kind = ctr_args[0]
            stack.ctr(kind, "rm", *(["--sync"] if kind == "images" else []), item, namespace=name, check=False)
    stack.ctr("namespaces", "rm", name, check=False)


def backend_keys(stack: Stack, ns: str) -> list[str]:
    """What containerd stored in our snapshotter for namespace ``ns`` (containerd prefixes keys with it)."""
    assert stack.info.snapshotter_socket, "the session stack runs without BootSeer's snapshotter"
    c = Client(Path(stack.info.snapshotter_socket), namespace=None)
    try:
        return sorted(i.name for i in c.list() if i.name.startswith(f"{ns}/"))
    finally:
        c.close()


def test_pull_run_and_unpacked_tree_equal_overlayfs(stack: Stack, small_image: str, ns: str, scratch: Path) -> None:
    stack.ctr("image", "pull", "--plain-http", "--snapshotter", "bootseer", small_image, namespace=ns)
    stack.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", small_image, namespace=ns)
    assert len(backend_keys(stack, ns)) == 3  # one committed snapshot per layer

    for sn in ("bootseer", "overlayfs"):
        out = stack.ctr("run", "--rm", "--snapshotter", sn, small_image, f"t-{sn}-{secrets.token_hex(3)}",
                        namespace=ns)
        assert out.stdout == images.SMALL_OUTPUT, sn

    trees = {}
    for sn in ("bootseer", "overlayfs"):
        target = scratch / sn
        target.mkdir()
        stack.ctr("image", "mount", "--snapshotter", sn, small_image, str(target), namespace=ns)
        try:
            assert images.check_small_tree(target) == [], sn
            trees[sn] = tree(target)
        finally:
            stack.ctr("image", "unmount", "--rm", str(target), namespace=ns)
    assert tree_diff(trees["bootseer"], trees["overlayfs"]) == []
    assert len(trees["bootseer"]) > 20

    # removing the image lets containerd's garbage collector remove our snapshots and their directories
    stack.ctr("image", "rm", "--sync", small_image, namespace=ns)
    assert backend_keys(stack, ns) == []
    root = Path(stack.info.snapshotter_root or "")
    assert set(os.listdir(root / "snapshots")) <= {str(i) for i in _record_ids(root)}  # no dir without a record


def _record_ids(root: Path) -> list[int]:
    import sqlite3

    db = sqlite3.connect(f"file:{root / 'metadata.db'}?mode=ro", uri=True)
    try:
        return [int(r[0]) for r in db.execute("SELECT id FROM snapshots")]
    finally:
        db.close()


def test_cli_serves_from_a_config_file_with_metrics(scratch: Path) -> None:
    port = free_port()
    sock = scratch / "run" / "s.sock"
    conf = scratch / "config.toml"
    conf.write_text(f'root = "{scratch / "root"}"\naddress = "{sock}"\nlog_format = "json"\n'
                    f'metrics_address = "127.0.0.1:{port}"\n')
    log = scratch / "log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "bootseer.cli", "snapshotter", "serve", "--config", str(conf)],
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def ready() -> bool:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
            return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=1).ok

        wait_for("snapshotter", ready, 30, proc, log)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        c = Client(sock)
        try:
            c.prepare("k")
            assert code_of(c.prepare, "k") == grpc.StatusCode.ALREADY_EXISTS
        finally:
            c.close()
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'bootseer_snapshotter_grpc_calls_total{code="OK",method="Prepare"} 1.0' in text
        assert 'bootseer_snapshotter_grpc_calls_total{code="ALREADY_EXISTS",method="Prepare"} 1.0' in text
        assert 'bootseer_snapshotter_grpc_seconds_count{method="Prepare"} 2.0' in text
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0  # a clean stop on SIGTERM
    assert not sock.exists()
    first = log.read_text().splitlines()[0]
    assert first.startswith("{") and '"level": "info"' in first  # log_format = "json"

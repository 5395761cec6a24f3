"""``bootseer bench fleet`` end to end with two nodes and the small image: every mode runs, every node's output
is the image's (the benchmark checks it), the nodes' lazy reads go through the real docker-registry proxy when
it is wired in (its storage serves them), and nothing is left behind."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.bench import fleet

_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


@pytest.fixture
def ip_forward() -> Iterator[None]:
    """The benchmark needs the host to route between the fleet's namespaces and leaves the setting to the operator
    (a fresh machine has it off until something like dockerd turns it on); the test turns it on and restores it."""
    before = _FORWARD.read_text().strip()
    _FORWARD.write_text("1\n")
    try:
        yield
    finally:
        _FORWARD.write_text(f"{before}\n")


@pytest.mark.usefixtures("ip_forward")
def test_fleet_bench_two_nodes_small_image(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    rc = fleet.main(["--image", "small", "--nodes", "2", "--runs", "1", "--root", str(tmp_path / "root"),
                     "--json", str(out), "--md", str(tmp_path / "fleet.md"), "--png", str(tmp_path / "fleet.png")])
    assert rc == 0
    res = json.loads(out.read_text())
    runs = {(r["mode"], r["nodes"]): r for r in res["all_runs"]}
    assert set(runs) == {("single", 1), ("direct", 1), ("direct", 2), ("mirror", 1), ("mirror", 2), ("warm", 2)}
    for r in runs.values():
        assert r["settled"] and len(r["starts"]) == r["nodes"] == len(r["local_starts"])
        assert r["origin"]["bytes"] > 0 and r["origin"]["cpu_seconds"] >= 0
    for m in (runs[("mirror", 1)], runs[("mirror", 2)], runs[("warm", 2)]):
        # the mirror served the nodes' ranges from its storage, and only the mirror asked the origin for blobs
        assert m["mirror"]["hits"] >= m["nodes"] and m["origin_from_mirror"]["requests"] == m["origin"]["requests"]
    assert set(res["goals"]) == {"origin_bytes_mirror_vs_one_node", "start_p50_fleet_vs_one_node"}
    assert all(g["verdict"] in ("met", "not met", "inconclusive") for g in res["goals"].values())
    assert "through the pull-through mirror" in (tmp_path / "fleet.md").read_text()
    assert (tmp_path / "fleet.png").stat().st_size > 0
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert len(res["netns"]) == 4 and not set(res["netns"]) & set(left) and not (tmp_path / "root").exists()

"""The fleet benchmark's pure parts: the mirror's configuration and its hosts.toml, the registry access-log
totals, CPU from /proc/<pid>/stat, the ratios with their spreads and verdicts, the Markdown and the chart."""

from __future__ import annotations

import json
from pathlib import Path

from bootseer.hosts import HostsResolver
from integration.bench import fleet
from integration.bench.fleet import FleetRun


def _line(method: str, uri: str, status: int, written: int, peer: str, msg: str = "response completed") -> str:
    return json.dumps({"http.request.method": method, "http.request.uri": uri, "http.response.status": status,
                       "http.response.written": written, "http.request.remoteaddr": f"{peer}:4711", "msg": msg})


def test_mirror_config_and_hosts_toml_as_the_operator_guide_wires_a_mirror(tmp_path: Path) -> None:
    doc = fleet.registry_doc(tmp_path / "s", "10.0.0.2:5000", proxy="http://10.0.0.1:5000")
    assert doc["proxy"] == {"remoteurl": "http://10.0.0.1:5000"} and doc["log"]["accesslog"] == {"disabled": False}
    assert "proxy" not in fleet.registry_doc(tmp_path / "s", "10.0.0.1:5000")
    d = tmp_path / "10.0.0.1:5000"
    d.mkdir()
    (d / "hosts.toml").write_text(fleet.mirror_hosts_toml("10.0.0.1:5000", "10.0.0.2:5000"))
    mirror, server = HostsResolver(tmp_path).endpoints("10.0.0.1:5000")
    assert mirror.base == "http://10.0.0.2:5000/v2" and mirror.mirror and mirror.capabilities == {"pull", "resolve"}
    assert server.base == "http://10.0.0.1:5000/v2" and not server.mirror


def test_log_totals_count_every_answer_and_the_bytes_that_left() -> None:
    blob = "/v2/r/blobs/sha256:" + "a" * 64
    lines = [
        "10.0.0.9 - - [05/Dec/2026] \"GET /v2/ HTTP/1.1\" 200 2",  # the combined access log: not counted twice
        _line("GET", "/v2/", 200, 2, "10.0.0.2"),
        _line("HEAD", blob, 200, 0, "10.0.0.2"),
        _line("GET", blob, 200, 1 << 20, "10.0.0.2"),
        _line("GET", blob, 206, 4096, "10.0.0.5"),
        _line("GET", blob, 500, 65536, "10.0.0.5", "response completed with error"),  # a client hung up
        _line("GET", "/v2/r/manifests/v1", 200, 700, "10.0.0.5"),
        "{not json",
    ]
    t = fleet.log_totals(lines)
    assert t.requests == 6 and t.bytes == 2 + (1 << 20) + 4096 + 65536 + 700
    assert t.by_peer == {"10.0.0.2": [3, 2 + (1 << 20)], "10.0.0.5": [3, 4096 + 65536 + 700]}
    assert (t.blob_gets, t.blob_partial, t.blob_bytes_partial) == (3, 1, 4096)
    t.add(fleet.log_totals(lines[4:5]))
    assert t.requests == 7 and t.by_peer["10.0.0.5"] == [4, 2 * 4096 + 65536 + 700]


def test_cpu_seconds_from_proc_stat() -> None:
    stat = "4242 (docker (registry)) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 12 0 100 1 1"
    assert fleet.cpu_seconds(stat, ticks=100) == 3.0


def _run(mode: str, nodes: int, rnd: int, starts: list[float], origin_bytes: float, requests: int = 100) -> FleetRun:
    origin = {"bytes": origin_bytes, "requests": requests, "cpu_seconds": 1.0}
    return FleetRun(mode, nodes, rnd, starts, dict(origin), origin, {"bytes": 0, "requests": 0},
                    mirror={"hit_rate": 0.9, "bytes_served": 1e9} if mode == "mirror" else {})


def test_ratios_goals_markdown_and_chart(tmp_path: Path) -> None:
    runs = []
    for rnd, (one_mirror, fleet_p50) in enumerate([(4.0, 4.4), (4.2, 5.8), (3.9, 4.3)]):
        runs += [_run("direct", 1, rnd, [3.0], 1000e6), _run("mirror", 1, rnd, [one_mirror], 1050e6),
                 _run("direct", 4, rnd, [6.0, 6.5, 7.0, 8.0], 4000e6, 400),
                 _run("mirror", 4, rnd, [fleet_p50 - 0.1, fleet_p50, fleet_p50, fleet_p50 + 1], 1060e6, 240)]
    res = fleet.summarize(runs, 4, {"image": "realistic", "runs": 3, "command": ["python3", "-c", "1"]})
    r = res["ratio_spreads"]
    assert res["ratios"]["origin_bytes_mirror_vs_one_node"] == 1.06 and r["origin_bytes_mirror_vs_one_node"]["n"] == 3
    assert res["goals"]["origin_bytes_mirror_vs_one_node"]["verdict"] == "met"
    assert res["ratios"]["origin_bytes_direct_vs_one_node"] == 4.0
    assert res["ratios"]["origin_requests_per_node_start"] == 60.0
    assert res["ratios"]["origin_requests_per_node_start_direct"] == 100.0
    # per-round p50 ratios 1.1, 1.38, 1.10: the spread straddles 1.3
    assert res["goals"]["start_p50_fleet_vs_one_node"]["verdict"] == "inconclusive"
    assert res["table"]["mirror_4"]["start_max_seconds"]["median"] == 5.4
    md = fleet.markdown(res)
    assert "| `origin_bytes_mirror_vs_one_node` | 1.060 [1.060–1.060] | ≤ 1.1 (met) |" not in md  # no empty spread
    assert "| `origin_bytes_mirror_vs_one_node` | 1.060 | ≤ 1.1 (met) |" in md
    assert "≤ 1.3 (inconclusive)" in md and "| through the pull-through mirror | 4 |" in md
    fleet.write_png(res, tmp_path / "fleet.png")
    assert (tmp_path / "fleet.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_refuses_fewer_than_two_nodes() -> None:
    assert fleet.main(["--nodes", "1"]) == 2

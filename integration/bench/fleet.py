"""Fleet benchmark: N nodes start the same image at the same moment, straight from the origin registry or
through a pull-through mirror; what the origin pays (bytes, requests, CPU) and how long each node takes.

``bootseer bench fleet [--nodes 4] [--runs 3] [--image realistic|small] [--json FILE] [--md FILE] [--png FILE]``
(or ``python -m integration.bench.fleet``).  ``--render FILE.json`` redraws the table and chart of an earlier
run without running anything.

What runs (all on this machine, each part in its own network namespace, joined through the host):

* the **origin**: docker-registry in the local stack's namespace, behind a veth shaped to ``--origin-rate``
  (its uplink, which every node and the mirror share), with the image indexed by ``bootseer convert`` and its
  hot blocks recorded by ``bootseer record`` (as in the startup benchmark, whose set-up this reuses);
* the **mirror**: docker-registry 2.8 in proxy mode (``proxy: remoteurl:`` the origin), real software, in its
  own namespace behind ``--mirror-rate``, emptied before every run (the fleet's first start of a new image);
* **N nodes**, each its own containerd and BootSeer snapshotter (own state, chunk caches, control socket) in its
  own namespace behind ``--node-rate``, hot-block prefetch on (the recorded manifest).  With the mirror, each
  node's ``certs.d/<origin>/hosts.toml`` names it exactly as docs/operator-guide.md names Dragonfly's proxy
  (a ``[host]`` with ``capabilities = ["pull", "resolve"]`` before the ``server``).

Each run: every node's daemons restarted with their state wiped and the page cache dropped (the startup
benchmark's cold reset), then all nodes pass a barrier at once and each runs ``bootseer pull`` (run here, in the
host's namespace: its manifest and config requests are small) and ``ctr run`` of the image's command, whose
output is checked.  A node's start time runs from the barrier to its output line.  After the last output the
run waits until every node's lazy layers are complete (background fill: a node ends with whole blobs, and so
does a pull-through mirror), so the origin's figures are what a fleet start costs it in all.

Modes per round, rotated: one node straight from the origin, one node through the (cold) mirror, N nodes
straight, N nodes through the mirror.  The origin's bytes and requests come from its access log (JSON
``response completed`` lines, split by whether the mirror or a node asked), its CPU from ``/proc/<pid>/stat``;
the mirror's hit rate from its own log (a node's blob request answered ``206`` was served from its cache; a
``200`` or a broken answer was proxied from the origin).

Ratios (per round, judged on their spread by :mod:`integration.bench.stats`): ``origin_bytes_mirror_vs_one_node``
(origin bytes for N nodes through the mirror over one node's straight from the origin, both until settled;
goal ≤ 1.1), ``start_p50_fleet_vs_one_node`` (median start of N nodes through the mirror over one node alone
through the mirror; goal ≤ 1.3), ``origin_requests_per_node_start`` (origin requests of the N-node mirror run
per node), and the same without the mirror for comparison.  This machine has 2 cores shared with other work:
N containers importing torch at once contend for them, which the start ratios include.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from integration.bench.stats import Spread, ratio_spread, spread, verdict

# single: direct, one range per prefetch request (one node only); warm: the mirror preheated (N nodes only)
MODES = ("single", "direct", "mirror", "warm")
GOALS: dict[str, tuple[Literal["<=", ">="], float]] = {
    "origin_bytes_mirror_vs_one_node": ("<=", 1.1),
    "start_p50_fleet_vs_one_node": ("<=", 1.3),
}
LABELS = {"single": "straight from the origin, no multi-range batching", "direct": "straight from the origin",
          "mirror": "through the pull-through mirror", "warm": "through the mirror, preheated"}


# ----------------------------------------------------------------------------------------- pure parts
def registry_doc(storage: Path, addr: str, proxy: str | None = None) -> dict[str, Any]:
    """docker-registry's configuration (JSON is YAML): JSON logs with the access log, filesystem storage, and,
    with ``proxy``, pull-through mode in front of that URL."""
    doc: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": addr, "secret": secrets.token_hex(16)},
    }
    if proxy:
        doc["proxy"] = {"remoteurl": proxy}
    return doc


def mirror_hosts_toml(origin: str, mirror: str) -> str:
    """``certs.d/<origin>/hosts.toml`` sending pulls to ``mirror`` first (both plain HTTP), laid out as the
    operator guide lays out Dragonfly's proxy."""
    return (f'server = "http://{origin}"\n\n'
            f'[host."http://{mirror}"]\n'
            '  capabilities = ["pull", "resolve"]\n')


@dataclass
class LogTotals:
    """What a registry's access log says about a span of requests."""

    requests: int = 0
    bytes: int = 0  # body bytes written in answers to GETs (also those cut off: what left the registry)
    by_peer: dict[str, list[int]] = field(default_factory=dict)  # peer IP → [requests, bytes]
    blob_gets: int = 0
    blob_partial: int = 0  # blob GETs answered 206 (a range: for a mirror, served from its own storage)
    blob_bytes_partial: int = 0

    def add(self, other: LogTotals) -> None:
        self.requests += other.requests
        self.bytes += other.bytes
        for peer, (n, b) in other.by_peer.items():
            mine = self.by_peer.setdefault(peer, [0, 0])
            mine[0] += n
            mine[1] += b
        self.blob_gets += other.blob_gets
        self.blob_partial += other.blob_partial
        self.blob_bytes_partial += other.blob_bytes_partial


def log_totals(lines: Iterable[str]) -> LogTotals:
    """Totals of docker-registry's JSON request lines (``response completed``, with or without error: a
    client that hangs up mid-body is logged as an error, with the bytes written until then)."""
    out = LogTotals()
    for line in lines:
        if not line.startswith("{") or '"response completed' not in line:
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        method = doc.get("http.request.method")
        written = int(doc.get("http.response.written") or 0) if method == "GET" else 0
        peer = str(doc.get("http.request.remoteaddr") or "").rsplit(":", 1)[0]
        out.requests += 1
        out.bytes += written
        mine = out.by_peer.setdefault(peer, [0, 0])
        mine[0] += 1
        mine[1] += written
        if method == "GET" and "/blobs/sha256:" in str(doc.get("http.request.uri") or ""):
            out.blob_gets += 1
            if doc.get("http.response.status") == 206:
                out.blob_partial += 1
                out.blob_bytes_partial += written
    return out


def cpu_seconds(stat: str, ticks: int | None = None) -> float:
    """User + system CPU seconds of a process from its ``/proc/<pid>/stat`` line."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / (ticks or os.sysconf("SC_CLK_TCK"))


@dataclass
class FleetRun:
    mode: str  # direct | mirror
    nodes: int
    round: int
    starts: list[float]  # seconds from the barrier to each node's output
    origin_to_output: dict[str, float]  # bytes, requests, cpu_seconds until the last output
    origin: dict[str, float]  # the same until every node's layers were complete (or the settle timeout)
    origin_from_mirror: dict[str, float]  # the part of ``origin`` the mirror asked for
    mirror: dict[str, float] = field(default_factory=dict)  # blob_gets, hits, hit_rate, bytes_served
    settled: bool = True
    settle_seconds: float = 0.0
    local_starts: list[float] = field(default_factory=list)  # the command again, layers local, cache dropped
    node_fetch: dict[str, dict[str, float]] = field(default_factory=dict)  # per node (mean): bytes, requests, …

    @property
    def p50(self) -> float:
        return statistics.median(self.starts)


def byte_hit_ratio(r: FleetRun) -> float:
    """The share of the bytes the mirror served that it did not fetch from the origin for it."""
    served = float(r.mirror.get("bytes_served", 0))
    return 1.0 - r.origin_from_mirror["bytes"] / served if served else 0.0


def _per_round(runs: list[FleetRun], mode: str, nodes: int, value: Callable[[FleetRun], float]) -> dict[int, float]:
    return {r.round: value(r) for r in runs if r.mode == mode and r.nodes == nodes}


def _ratio(num: dict[int, float], den: dict[int, float]) -> Spread | None:
    """Ratio of the medians with the per-round ratios' spread (rounds both sides measured)."""
    common = sorted(set(num) & set(den))
    if not common or min(den[i] for i in common) <= 0:
        return None
    return ratio_spread([num[i] for i in common], [den[i] for i in common])


def compute_ratios(runs: list[FleetRun], n: int) -> dict[str, Spread]:
    """Every ratio the benchmark reports (see the module doc), for the N-node runs against the one-node ones."""
    out: dict[str, Spread] = {}

    def put(key: str, s: Spread | None) -> None:
        if s is not None:
            out[key] = s

    origin_bytes = lambda r: float(r.origin["bytes"])  # noqa: E731 - a short selector
    one_direct_bytes = _per_round(runs, "direct", 1, origin_bytes)
    put("origin_bytes_mirror_vs_one_node", _ratio(_per_round(runs, "mirror", n, origin_bytes), one_direct_bytes))
    put("origin_bytes_direct_vs_one_node", _ratio(_per_round(runs, "direct", n, origin_bytes), one_direct_bytes))
    put("origin_bytes_warm_mirror_vs_one_node", _ratio(_per_round(runs, "warm", n, origin_bytes), one_direct_bytes))
    put("origin_bytes_one_node_mirror_vs_direct", _ratio(_per_round(runs, "mirror", 1, origin_bytes),
                                                         one_direct_bytes))
    p50 = lambda r: r.p50  # noqa: E731
    put("start_p50_fleet_vs_one_node", _ratio(_per_round(runs, "mirror", n, p50), _per_round(runs, "mirror", 1, p50)))
    put("start_p50_fleet_vs_one_node_direct", _ratio(_per_round(runs, "direct", n, p50),
                                                     _per_round(runs, "direct", 1, p50)))
    put("start_p50_fleet_warm_mirror_vs_one_node_direct", _ratio(_per_round(runs, "warm", n, p50),
                                                                 _per_round(runs, "direct", 1, p50)))
    put("start_one_node_mirror_vs_direct", _ratio(_per_round(runs, "mirror", 1, p50),
                                                  _per_round(runs, "direct", 1, p50)))
    put("start_p50_fleet_mirror_vs_direct", _ratio(_per_round(runs, "mirror", n, p50),
                                                   _per_round(runs, "direct", n, p50)))
    local = lambda r: statistics.median(r.local_starts) if r.local_starts else 0.0  # noqa: E731
    put("start_local_fleet_vs_one_node", _ratio(_per_round(runs, "mirror", n, local),
                                                _per_round(runs, "mirror", 1, local)))
    beyond = lambda r: r.p50 - local(r) if r.local_starts else 0.0  # noqa: E731
    put("start_beyond_local_fleet_vs_one_node", _ratio(_per_round(runs, "mirror", n, beyond),
                                                       _per_round(runs, "mirror", 1, beyond)))
    requests = lambda r: float(r.origin["requests"])  # noqa: E731
    cpu = lambda r: float(r.origin["cpu_seconds"])  # noqa: E731
    put("origin_requests_batched_vs_single_range", _ratio(_per_round(runs, "direct", 1, requests),
                                                          _per_round(runs, "single", 1, requests)))
    put("origin_cpu_batched_vs_single_range", _ratio(_per_round(runs, "direct", 1, cpu),
                                                     _per_round(runs, "single", 1, cpu)))
    for mode in ("direct", "mirror", "warm"):
        per_node = [r.origin["requests"] / r.nodes for r in runs if r.mode == mode and r.nodes == n]
        if per_node:
            key = "origin_requests_per_node_start" + ("" if mode == "mirror" else f"_{mode}")
            out[key] = spread(per_node)
    return out


def goal_status(ratios: dict[str, Spread]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for k, (op, bound) in GOALS.items():
        s = ratios.get(k)
        out[k] = {"op": op, "bound": bound, "value": None if s is None else round(s.median, 4),
                  "spread": None if s is None else [round(s.lo, 4), round(s.hi, 4)], "n": 0 if s is None else s.n,
                  "verdict": verdict(s, bound, op)}
    return out


def summarize(runs: list[FleetRun], n: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The result document: per (mode, nodes) the figures' spreads over the rounds, the ratios and goals."""
    table: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        for nodes in sorted({1, n}):
            rs = [r for r in runs if r.mode == mode and r.nodes == nodes]
            if not rs:
                continue
            row: dict[str, Any] = {
                "runs": len(rs),
                "start_p50_seconds": spread([r.p50 for r in rs]).as_dict(3),
                "start_max_seconds": spread([max(r.starts) for r in rs]).as_dict(3),
                "local_start_p50_seconds": spread([statistics.median(r.local_starts) if r.local_starts else 0.0
                                                   for r in rs]).as_dict(3),
                "origin_bytes": spread([r.origin["bytes"] for r in rs]).as_dict(0),
                "origin_bytes_to_output": spread([r.origin_to_output["bytes"] for r in rs]).as_dict(0),
                "origin_requests": spread([r.origin["requests"] for r in rs]).as_dict(0),
                "origin_cpu_seconds": spread([r.origin["cpu_seconds"] for r in rs]).as_dict(3),
                "settled": all(r.settled for r in rs),
                "settle_seconds": spread([r.settle_seconds for r in rs]).as_dict(2),
            }
            if mode in ("mirror", "warm"):
                row["mirror_hit_rate"] = spread([r.mirror.get("hit_rate", 0.0) for r in rs]).as_dict(4)
                row["mirror_byte_hit_ratio"] = spread([byte_hit_ratio(r) for r in rs]).as_dict(4)
                row["mirror_bytes_served"] = spread([r.mirror.get("bytes_served", 0) for r in rs]).as_dict(0)
                row["origin_bytes_for_mirror"] = spread([r.origin_from_mirror["bytes"] for r in rs]).as_dict(0)
            table[f"{mode}_{nodes}"] = row
    ratios = compute_ratios(runs, n)
    return {
        "benchmark": "fleet",
        **meta,
        "nodes": n,
        "table": table,
        "ratios": {k: round(s.median, 4) for k, s in ratios.items()},
        "ratio_spreads": {k: s.as_dict() for k, s in ratios.items()},
        "goals": goal_status(ratios),
        "all_runs": [asdict(r) for r in runs],
    }


def markdown(res: dict[str, Any]) -> str:
    n = res["nodes"]
    rows = res["table"]
    out = [f"# Fleet benchmark: {n} nodes at once, {res.get('image', '')}", "",
           f"Command `{shlex.join(res.get('command', []))}` on every node, hot-block prefetch on; median "
           f"[min–max] over {res.get('runs')} rounds.  Links: origin uplink {res.get('origin_rate')}, mirror "
           f"{res.get('mirror_rate')}, each node {res.get('node_rate')}.  Produced by "
           f"`{res.get('command_line', 'bootseer bench fleet')}`.", "",
           "| mode | nodes | start p50 s | start max s | local start p50 s | origin MB (to output) "
           "| origin MB (settled) | origin requests | origin CPU s | mirror hit rate | mirror byte hit ratio |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(d: dict[str, Any] | None, scale: float = 1.0, fmt: str = ".2f") -> str:
        if not d:
            return "–"
        s = Spread(d["median"] / scale, d["min"] / scale, d["max"] / scale, int(d["n"]))
        return s.text(fmt)

    for mode in MODES:
        for nodes in sorted({1, n}):
            r = rows.get(f"{mode}_{nodes}")
            if r is None:
                continue
            hit = cell(r.get("mirror_hit_rate"), fmt=".3f") if mode in ("mirror", "warm") else "–"
            hit += " | " + (cell(r.get("mirror_byte_hit_ratio"), fmt=".3f") if mode in ("mirror", "warm") else "–")
            mb = [cell(r["origin_bytes_to_output"], 1e6, ".0f"), cell(r["origin_bytes"], 1e6, ".0f")]
            out.append(f"| {LABELS[mode]} | {nodes} | {cell(r['start_p50_seconds'])} | {cell(r['start_max_seconds'])} "
                       f"| {cell(r.get('local_start_p50_seconds'))} | {mb[0]} | {mb[1]} "
                       f"| {cell(r['origin_requests'], fmt='.0f')} | {cell(r['origin_cpu_seconds'])} | {hit} |")
    out += ["", "| ratio | median [min–max] | goal |", "|---|---:|---|"]
    spreads = res.get("ratio_spreads", {})
    for k, v in sorted(res.get("ratios", {}).items()):
        sp = spreads.get(k, {})
        g = res.get("goals", {}).get(k)
        vtxt = Spread(v, sp.get("min", v), sp.get("max", v), int(sp.get("n", 1))).text(".3f")
        gtxt = f"≤ {g['bound']} ({g['verdict']})" if g else ""
        out.append(f"| `{k}` | {vtxt} | {gtxt} |")
    out += ["", "Origin figures until settled: until every node's lazy layers were complete (background fill "
            "done), what the fleet's start costs the origin in all; \"to output\" stops at the last node's output. "
            "Local start: the same nodes run the command again at once from their complete layers, page cache "
            "dropped (no registry): what starting N containers together costs this machine.  "
            "Mirror hit rate: the share of the nodes' blob requests the mirror answered with a range from its own "
            "storage (206; whole small blobs, answered 200, count as misses); byte hit ratio: the share of the bytes "
            "it served that it did not fetch from the origin.  A goal is *inconclusive* when the per-round ratios "
            "straddle its bound."]
    if not all(r.get("settled", True) for r in rows.values()):
        out += ["", "**Some runs did not settle** within the timeout: their origin figures stop there."]
    for note in res.get("notes", []):
        out += ["", note]
    return "\n".join(out) + "\n"


def write_png(res: dict[str, Any], path: Path) -> None:
    """Two panels: median start (p50 and max) and origin bytes, per mode and node count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = res["nodes"]
    keys = [(m, k) for m in MODES for k in sorted({1, n}) if f"{m}_{k}" in res["table"]]
    short = {"single": "origin,\nno batching", "direct": "origin", "mirror": "mirror\n(cold)",
             "warm": "mirror\n(preheated)"}
    names = [f"{short[m]}\n{k} node{'s' if k > 1 else ''}" for m, k in keys]
    rows = [res["table"][f"{m}_{k}"] for m, k in keys]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    xs = range(len(keys))
    a.bar([x - 0.27 for x in xs], [r["start_p50_seconds"]["median"] for r in rows], 0.27, label="p50",
          color="#1f77b4")
    a.bar(list(xs), [r["start_max_seconds"]["median"] for r in rows], 0.27, label="max", color="#9ecae1")
    a.bar([x + 0.27 for x in xs], [r.get("local_start_p50_seconds", {}).get("median", 0) for r in rows], 0.27,
          label="p50, layers local (no registry)", color="#2ca02c")
    a.set_xticks(list(xs), names, fontsize=8)
    a.set_ylabel("seconds from the barrier to the output")
    a.legend(fontsize=8)
    a.grid(axis="y", alpha=0.3)
    b.bar(list(xs), [r["origin_bytes"]["median"] / 1e6 for r in rows], 0.6, color="#ff7f0e")
    b.set_xticks(list(xs), names, fontsize=8)
    b.set_ylabel("origin egress, MB (until settled)")
    b.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{n} nodes starting at once ({res.get('runs')} rounds; 2 shared cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------ the machine parts
def _images() -> dict[str, tuple[Callable[[str], str], list[str], str]]:
    from integration import images

    return {"realistic": (images.push_realistic, list(images.REALISTIC_CMD), images.REALISTIC_OUTPUT),
            "small": (images.push_small, list(images.SMALL_CMD), images.SMALL_OUTPUT)}


def _run(*args: str) -> None:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")


def _routed_link(rate: str | None) -> Any:
    """A namespace behind a shaped veth (:class:`integration.netns.ShapedLink`) whose default route is the
    host, so that namespaces reach each other through the host (which must forward IPv4)."""
    from integration.netns import ShapedLink, parse_rate

    link = ShapedLink(secrets.token_hex(3), parse_rate(rate) if rate else 0)
    link.create()
    _run("ip", "netns", "exec", link.ns, "ip", "route", "add", "default", "via", link.host_ip)
    return link


def _add_default_route(ns: str, via: str) -> None:
    _run("ip", "netns", "exec", ns, "ip", "route", "replace", "default", "via", via)


def _node_stack_class() -> Any:
    from integration.stack import Stack

    class NodeStack(Stack):
        """One simulated node: its own containerd and snapshotter (the local stack's, with a root of their
        own), started inside its network namespace.  ``nsenter --net`` (not ``ip netns exec``, which also
        makes a mount namespace): the snapshotter's erofs mounts must be visible to containerd and runc."""

        netns = ""

        def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Any:
            return super()._spawn(name, ["nsenter", f"--net=/run/netns/{self.netns}", *argv], env)

    return NodeStack


class Fleet:
    """The origin (the local stack's registry), the mirror, and N nodes; see the module doc."""

    def __init__(self, st: Any, cfg: Any, args: argparse.Namespace, log: Callable[[str], None]) -> None:
        self.st, self.cfg, self.args, self.log = st, cfg, args, log
        self.root = Path(st.info.root)
        self.links: list[Any] = []
        self.nodes: list[Any] = []  # startup.Bench per node
        self.mirror_link: Any = None
        self.mirror = ""  # host:port
        self.ref = ""
        self.blobs: list[tuple[str, str]] = []  # (repository, digest) of the image's lazy blobs
        self.cmd: list[str] = []
        self.output = ""

    # ----------------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        from integration.bench.startup import Bench, _stop
        from integration.stack import detach_loops_below, unmount_below

        if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "1":
            raise RuntimeError("the fleet's namespaces reach each other through the host: net.ipv4.ip_forward "
                               "must be 1 (this benchmark does not change it)")
        link_id = self.st.info.netns_id
        origin_ns, host_ip = f"bs-{link_id}", self._origin_link().host_ip
        _add_default_route(origin_ns, host_ip)
        push, self.cmd, self.output = _images()[self.args.image]
        bench = Bench(self.st, self.cfg, ["prefetch"], None, self.log)
        bench.cmd, bench.expected = self.cmd, self.output
        bench.reset()
        self.log(f"pushing the {self.args.image} image, indexing and recording its hot blocks ...")
        base = push(self.st.info.registry)
        self.ref = bench._indexed(base, base.rsplit(":", 1)[0] + "-fleet:v1")
        bench._record(self.ref)
        from bootseer.control import Control

        # the blobs the registry serves (index format 3: the wire blob, not the EROFS digest), for the preheat
        self.blobs = [(ly["repository"].split("/", 1)[1], ly["wire_digest"])
                      for ly in Control(self.st.info.snapshotter_control, timeout=30).call("status")["layers"]]
        # the recording's own daemons would go on filling its layers from the origin: stop them for good
        with contextlib.suppress(Exception):
            self.st._kill_tasks()
        _stop(self.st.info.pids.get("containerd"))
        _stop(self.st.info.pids.get("snapshotter"))
        sroot = Path(self.st.info.snapshotter_root)
        unmount_below(sroot)
        detach_loops_below(sroot)
        self.mirror_link = _routed_link(self.args.mirror_rate)
        self.links.append(self.mirror_link)
        self.mirror = f"{self.mirror_link.inner_ip}:5000"
        self.start_mirror()
        for i in range(self.args.nodes):
            self.nodes.append(self._make_node(i))
        self.log(f"{len(self.nodes)} nodes up; origin {self.st.info.registry}, mirror {self.mirror}")

    def _origin_link(self) -> Any:
        from integration.netns import ShapedLink

        return ShapedLink(self.st.info.netns_id, self.st.info.rate_bps or 0)

    def _make_node(self, i: int) -> Any:
        from bootseer.localstack import StackInfo
        from integration.bench.startup import Bench

        link = _routed_link(self.args.node_rate)
        self.links.append(link)
        root = self.root / "nodes" / f"n{i}"
        (root / "logs").mkdir(parents=True, exist_ok=True)
        for name in ("index-signing.key", "index-signing.pub"):  # the nodes trust the origin's index signer
            shutil.copy2(self.root / name, root / name)
        info = StackInfo(root=str(root), containerd_socket=str(root / "containerd.sock"),
                         containerd_config=str(root / "containerd" / "config.toml"), registry=self.st.info.registry,
                         registry_url=self.st.info.registry_url, registry_storage="",
                         sandbox_image=self.st.info.sandbox_image, signing_key=self.st.info.signing_key)
        node = _node_stack_class()(info)
        node.netns = link.ns
        node.save()
        node._start_snapshotter(self.cfg)
        node._start_containerd(self.cfg)
        bench = Bench(node, self.cfg, ["prefetch"], None, self.log)
        bench.cmd, bench.expected = self.cmd, self.output
        bench.refs["prefetch"] = self.ref
        bench.counter = (i + 1) * 1_000_000  # container IDs: runc's state directory is shared by all containerds
        return bench

    def start_mirror(self, wipe: bool = True) -> None:
        """(Re)start the mirror, its storage emptied: every run starts with a cold mirror."""
        import requests

        from integration.bench.startup import _stop
        from integration.stack import wait_for

        _stop(self.st.info.pids.get("mirror"))
        storage = self.root / "mirror-storage"
        if wipe:
            shutil.rmtree(storage, ignore_errors=True)
        storage.mkdir(exist_ok=True)
        conf = self.root / "mirror.yml"
        conf.write_text(json.dumps(registry_doc(storage, self.mirror, proxy=self.st.info.registry_url), indent=1))
        proc = self.st._spawn("mirror", [*self.mirror_link.exec_prefix(), "docker-registry", "serve", str(conf)])
        url = f"http://{self.mirror}/v2/"
        wait_for("mirror", lambda: requests.get(url, timeout=1).status_code == 200, 60, proc,
                 Path(self.st.info.logs["mirror"]))

    def preheat(self, timeout: float = 300) -> None:
        """What an operator does when an image is published: have the mirror copy each lazy blob, and wait until
        it serves ranges of it.  One request per blob starts the copy (closed unread, as the fetcher does), then
        one client asks again, at the fetcher's pace (every whole-blob answer costs the origin a request and what
        the sockets buffered), until the answer is a range."""
        import requests

        def ranged(repo: str, digest: str) -> bool:
            with requests.get(f"http://{self.mirror}/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=0-0"},
                              stream=True, timeout=30) as resp:
                return resp.status_code == 206

        waiting = [(repo, digest) for repo, digest in self.blobs if not ranged(repo, digest)]
        deadline, pause = time.monotonic() + timeout, 0.5
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the mirror has not copied {len(waiting)} blob(s) after {timeout:.0f} s")
            time.sleep(pause)  # the mirror's copy, polled with a deadline
            pause = min(2 * pause, 2.0)
            waiting = [(repo, digest) for repo, digest in waiting if not ranged(repo, digest)]

    def teardown(self) -> None:
        for bench in self.nodes:
            with contextlib.suppress(Exception):
                bench.st.down()
        for link in self.links:
            for pid in link.pids():  # only what this benchmark started in its own namespaces
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            link.destroy()

    # ------------------------------------------------------------------------------------------ runs
    def _hosts(self, bench: Any, mode: str) -> None:
        from integration import containerd_config

        d = Path(bench.st.info.containerd_config).parent / "certs.d" / self.st.info.registry
        d.mkdir(parents=True, exist_ok=True)
        text = mirror_hosts_toml(self.st.info.registry, self.mirror) if mode in ("mirror", "warm") \
            else containerd_config.hosts_toml(self.st.info.registry)
        (d / "hosts.toml").write_text(text)

    def _origin_log(self) -> Path:
        return Path(self.st.info.logs["registry"])

    def _origin_cpu(self) -> float:
        return cpu_seconds(Path(f"/proc/{self.st.info.pids['registry']}/stat").read_text())

    @staticmethod
    def _log_since(path: Path, start: int, end: int | None = None) -> LogTotals:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read() if end is None else fh.read(max(0, end - start))
        return log_totals(data.decode(errors="replace").splitlines())

    def _settled(self, benches: list[Any]) -> bool:
        from bootseer.control import Control

        for b in benches:
            layers = Control(b.st.info.snapshotter_control, timeout=10).call("status")["layers"]
            if not layers or any(ly.get("needs_registry") for ly in layers):
                return False
        return True

    @staticmethod
    def _quiet(log: Path, still: float = 0.5, limit: float = 10.0) -> None:
        """Until ``log`` has not grown for ``still`` seconds (a registry logs a request once its answer is
        written: the last answers of a settled fleet are logged a moment after their bytes arrived)."""
        deadline = time.monotonic() + limit
        size, since = log.stat().st_size, time.monotonic()
        while time.monotonic() - since < still and time.monotonic() < deadline:
            time.sleep(0.1)  # polling a file's size with a deadline
            if log.stat().st_size != size:
                size, since = log.stat().st_size, time.monotonic()

    def _at_once(self, benches: list[Any], fn: Callable[[Any], float]) -> list[float]:
        """Seconds from a common barrier to the output of ``fn(bench)``'s container on each node (``fn`` calls
        ``run_container``; it returns the time of the output line)."""
        barrier = threading.Barrier(len(benches))
        starts: list[float | None] = [None] * len(benches)
        errors: list[str] = []

        def one(i: int) -> None:
            barrier.wait()
            t0 = time.monotonic()
            try:
                starts[i] = fn(benches[i]) - t0
            except Exception as e:  # reported below with the node's number
                errors.append(f"node {i}: {e}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(benches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError("; ".join(errors))
        return [round(s or 0.0, 3) for s in starts]

    def _local_starts(self, benches: list[Any]) -> list[float]:
        """The command once more on the same nodes at once, the image's layers complete on each and the page
        cache dropped: what N containers starting together cost this machine without any registry."""
        from bootseer.testkit import drop_caches

        drop_caches()
        return self._at_once(benches, lambda b: b.run_container("bootseer", self.ref)[0])

    @staticmethod
    def _fetch_counters(benches: list[Any]) -> dict[str, dict[str, float]]:
        """Per node (mean over ``benches``): what its snapshotter fetched, by kind, and its retries by reason."""
        from bootseer.control import Control

        out: dict[str, dict[str, float]] = {"bytes": {}, "requests": {}, "retry_reasons": {}}
        for b in benches:
            for ly in Control(b.st.info.snapshotter_control, timeout=10).call("status")["layers"]:
                got = ly.get("fetched") or {}
                for what in out:
                    for k, v in (got.get(what) or {}).items():
                        out[what][k] = out[what].get(k, 0.0) + float(v) / len(benches)
        return out

    def run_once(self, mode: str, nodes: int, rnd: int) -> FleetRun:
        """One cold start of ``nodes`` nodes at once (see the module doc)."""
        import dataclasses

        benches = self.nodes[:nodes]
        single = dataclasses.replace(self.cfg, lazy_config={"fill": {"prefetch_batch_window": 0}})
        for b in self.nodes:  # "single": prefetch sends one run per request (no multi-range batching)
            b.cfg = single if mode == "single" else self.cfg
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda b: b.reset(), self.nodes))  # every node, so none is still filling
        for b in benches:
            self._hosts(b, mode)
        if mode in ("mirror", "warm"):
            self.start_mirror()
        olog, mlog = self._origin_log(), Path(self.st.info.logs["mirror"])
        o0, m0, cpu0 = olog.stat().st_size, mlog.stat().st_size, self._origin_cpu()
        if mode == "warm":
            self.preheat()  # before the barrier; what it costs the origin is counted

        def start(b: Any) -> float:
            b.pull("prefetch")
            return float(b.run_container("bootseer", self.ref)[0])

        starts = self._at_once(benches, start)
        o1, cpu1 = olog.stat().st_size, self._origin_cpu()
        t_settle = time.monotonic()
        settled = True
        deadline = t_settle + self.args.settle_timeout
        while not self._settled(benches):  # polling the daemons' state with a deadline
            if time.monotonic() > deadline:
                settled = False
                self.log(f"not settled after {self.args.settle_timeout:.0f} s: origin figures stop here")
                break
            time.sleep(0.5)
        settle_s = time.monotonic() - t_settle
        self._quiet(olog)
        cpu2, m1 = self._origin_cpu(), mlog.stat().st_size
        to_out = self._log_since(olog, o0, o1)
        total = self._log_since(olog, o0)
        fetched = self._fetch_counters(benches)
        local = self._local_starts(benches) if settled else []
        mirror_ip = self.mirror.rsplit(":", 1)[0]
        from_mirror = total.by_peer.get(mirror_ip, [0, 0])
        run = FleetRun(mode, nodes, rnd, starts,
                       {"bytes": to_out.bytes, "requests": to_out.requests, "cpu_seconds": round(cpu1 - cpu0, 3)},
                       {"bytes": total.bytes, "requests": total.requests, "cpu_seconds": round(cpu2 - cpu0, 3)},
                       {"bytes": from_mirror[1], "requests": from_mirror[0]}, settled=settled,
                       settle_seconds=round(settle_s, 2), local_starts=local, node_fetch=fetched)
        if mode in ("mirror", "warm"):
            m = self._log_since(mlog, m0, m1)
            run.mirror = {"blob_gets": m.blob_gets, "hits": m.blob_partial,
                          "hit_rate": round(m.blob_partial / m.blob_gets, 4) if m.blob_gets else 0.0,
                          "bytes_served": m.bytes, "bytes_hit": m.blob_bytes_partial, "requests": m.requests}
        return run


# ------------------------------------------------------------------------------------------ driver
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bootseer bench fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4, help="nodes starting at once (≥ 2; 4 or more for results)")
    p.add_argument("--runs", type=int, default=3, help="rounds (each: 1 and N nodes, straight and through the mirror)")
    p.add_argument("--image", choices=("realistic", "small"), default="realistic")
    p.add_argument("--origin-rate", default="1gbit", help="the origin registry's uplink, shared by all")
    p.add_argument("--mirror-rate", default="10gbit", help="the mirror's link")
    p.add_argument("--node-rate", default="1gbit", help="each node's link")
    p.add_argument("--modes", default="single,direct,mirror,warm",
                   help="of single (one node straight from the origin without multi-range batching), direct, "
                        "mirror, warm (N nodes through a preheated mirror)")
    p.add_argument("--settle-timeout", type=float, default=300.0,
                   help="seconds to wait after the last output for every node's layers to be complete")
    p.add_argument("--json", dest="json_path", help="write the result as JSON here")
    p.add_argument("--md", dest="md_path", help="write the Markdown table here")
    p.add_argument("--png", dest="png_path", help="write the chart here")
    p.add_argument("--render", metavar="JSON", help="only redraw --md/--png from an earlier --json result")
    p.add_argument("--root", type=Path, default=None, help="scratch dir (default: a fresh /tmp/bs-fleet-*)")
    return p


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from integration.stack import StackConfig, running

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    root = args.root or Path("/tmp") / f"bs-fleet-{secrets.token_hex(3)}"
    cfg = StackConfig(root=root, rate=args.origin_rate, sidecar=False, snapshotter=True)
    runs: list[FleetRun] = []
    t_start = time.time()
    meta: dict[str, Any] = {"image": args.image, "runs": args.runs, "origin_rate": args.origin_rate,
                            "mirror_rate": args.mirror_rate, "node_rate": args.node_rate,
                            "command_line": getattr(args, "command_line", "bootseer bench fleet"),
                            "cores": os.cpu_count()}

    def result() -> dict[str, Any]:
        meta["wall_seconds"] = round(time.time() - t_start, 1)
        return summarize(runs, args.nodes, meta)

    with running(cfg) as st:
        fleet = Fleet(st, cfg, args, _log)
        try:
            fleet.setup()
            meta["command"] = fleet.cmd
            meta["netns"] = [f"bs-{st.info.netns_id}", *(link.ns for link in fleet.links)]
            plan = [(m, k) for k in (1, args.nodes) for m in modes
                    if (k == 1 and m != "warm") or (k > 1 and m != "single")]
            for i in range(args.runs):
                for mode, nodes in plan[i % len(plan):] + plan[:i % len(plan)]:
                    r = fleet.run_once(mode, nodes, i)
                    runs.append(r)
                    _log(f"round {i + 1}/{args.runs} {mode:6s} ×{nodes}: start p50 {r.p50:6.2f} s max "
                         f"{max(r.starts):6.2f} s; origin {r.origin['bytes'] / 1e6:7.1f} MB "
                         f"({r.origin_to_output['bytes'] / 1e6:.1f} to output), {r.origin['requests']} requests, "
                         f"{r.origin['cpu_seconds']:.2f} s CPU; mirror {r.mirror or '-'}")
                write_outputs(result(), args)
        finally:
            fleet.teardown()
    return result()


def write_outputs(res: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json_path and not args.render:
        Path(args.json_path).write_text(json.dumps(res, indent=1) + "\n")
    if args.md_path:
        Path(args.md_path).write_text(markdown(res))
    if args.png_path:
        write_png(res, Path(args.png_path))


def report(res: dict[str, Any]) -> None:
    spreads = res.get("ratio_spreads", {})
    for k, v in sorted(res.get("ratios", {}).items()):
        g = res["goals"].get(k)
        sp = spreads.get(k, {})
        rng = f" [{sp['min']:.3f}–{sp['max']:.3f}]" if sp.get("n", 0) > 1 else ""
        print(f"  {k} = {v:.3f}{rng}" + (f"  (goal {g['op']} {g['bound']}: {g['verdict']})" if g else ""))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:  # the summary is computed again from the runs: what this version of the code says of them
        res = json.loads(Path(args.render).read_text())
        meta = {k: v for k, v in res.items() if k not in ("benchmark", "nodes", "table", "ratios", "ratio_spreads",
                                                           "goals", "all_runs")}
        res = summarize([FleetRun(**r) for r in res["all_runs"]], int(res["nodes"]), meta)
    else:
        if args.nodes < 2 or args.runs < 1:
            print("error: --nodes must be at least 2 and --runs at least 1", file=sys.stderr)
            return 2
        if os.geteuid() != 0:
            print("error: the fleet benchmark needs root (network namespaces, mounts)", file=sys.stderr)
            return 2
        args.command_line = "bootseer bench fleet " + shlex.join(argv if argv is not None else sys.argv[1:])
        res = run(args)
    write_outputs(res, args)
    print(markdown(res))
    report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

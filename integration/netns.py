"""Bandwidth shaping for the local stack: a network namespace joined to the host by a veth pair, with a
``tc tbf`` qdisc on both ends, so whatever listens inside (the registry) is reached over a link of a given
rate.  Names and the /30 subnet are derived from a short id so several stacks can coexist.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from dataclasses import dataclass


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def parse_rate(rate: str) -> int:
    """'100mbit' / '1gbit' / '200Mbit' / '5000kbit' → bits per second."""
    m = re.fullmatch(r"(?i)\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:bit|bps)?\s*", rate)
    if not m:
        raise ValueError(f"bad rate {rate!r}: use e.g. 100mbit, 1gbit")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


@dataclass(frozen=True)
class ShapedLink:
    """A namespace ``ns`` whose address ``inner_ip`` is reached from the host at ``rate_bps``."""

    ident: str  # 6 hex chars
    rate_bps: int

    @property
    def ns(self) -> str:
        return f"bs-{self.ident}"

    @property
    def host_if(self) -> str:
        return f"bs{self.ident}h"

    @property
    def inner_if(self) -> str:
        return f"bs{self.ident}r"

    @property
    def _net(self) -> ipaddress.IPv4Network:
        n = int(self.ident, 16) % (1 << 14)  # 16384 /30s in 10.213.0.0/16
        return ipaddress.IPv4Network((int(ipaddress.IPv4Address("10.213.0.0")) + 4 * n, 30))

    @property
    def host_ip(self) -> str:
        return str(self._net.network_address + 1)

    @property
    def inner_ip(self) -> str:
        return str(self._net.network_address + 2)

    def _tbf(self, dev: str, netns: str | None) -> None:
        burst = max(self.rate_bps // 8 // 100, 32 * 1024)  # 10 ms worth, at least 32 KiB
        prefix = ["ip", "netns", "exec", netns] if netns else []
        _run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", str(self.rate_bps),
             "burst", str(burst), "latency", "100ms")

    def create(self) -> None:
        self.destroy()
        _run("ip", "netns", "add", self.ns)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.inner_if)
        _run("ip", "link", "set", self.inner_if, "netns", self.ns)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.inner_ip}/30", "dev", self.inner_if)
        _run("ip", "netns", "exec", self.ns, "ip", "link", "set", self.inner_if, "up")
        _run("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        if self.rate_bps:
            self._tbf(self.inner_if, self.ns)  # registry → host (downloads)
            self._tbf(self.host_if, None)  # host → registry (uploads)

    def set_rate(self, rate_bps: int) -> ShapedLink:
        link = ShapedLink(self.ident, rate_bps)
        link._tbf(link.inner_if, link.ns)
        link._tbf(link.host_if, None)
        return link

    def destroy(self) -> None:
        """Remove the namespace and the veth pair (idempotent; deleting one end deletes both)."""
        _run("ip", "link", "del", self.host_if, check=False)
        _run("ip", "netns", "del", self.ns, check=False)

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def pids(self) -> list[int]:
        out = _run("ip", "netns", "pids", self.ns, check=False).stdout
        return [int(p) for p in out.split()]

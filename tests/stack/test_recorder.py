"""``bootseer record`` and hot-block prefetch on the local stack (containerd 1.6, docker-registry, the sidecar
converting each pushed image, BootSeer's snapshotter serving the layers lazily; background fill paused, so
every byte fetched is a demand read or a prefetch).

* the CLI: a recording of the small image's command is pushed as a referrer and ``hotblocks show`` reads it;
  exit codes for a failing command, a ready line that never comes, an unknown image; the ready line stops a
  command that would run on; nothing is left behind (containers, images, namespaces);
* prefetch: after recording the realistic image's ``import torch`` start, a second lazy start (cold caches)
  prefetches the hot set at Prepare and the container's own demand reads that miss stay under a bound;
* a manifest recorded for one command helps an overlapping one and never breaks one reading other files.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from bootseer.control import Control
from bootseer.testkit import drop_caches
from integration import images
from integration.stack import Stack, StackConfig, running, wait_for
from tests.conftest import scratch_root

MiB = 1 << 20
TORCH = ["python3", "-c", "import torch; print(torch.ones(2).sum())"]
NUMPY = ["python3", "-c", "import numpy; print(numpy.ones(3).sum())"]


@dataclass
class World:
    st: Stack
    small: str
    realistic: str | None = None

    @property
    def control(self) -> Control:
        assert self.st.info.snapshotter_control
        return Control(self.st.info.snapshotter_control, timeout=120)

    @property
    def certs(self) -> str:
        return str(Path(self.st.info.containerd_config).parent / "certs.d")

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bootseer.cli", *args], capture_output=True, text=True,
                              timeout=timeout)

    def record(self, image: str, cmd: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
        return self.cli("record", "--json", "-a", self.st.info.containerd_socket, "--control",
                        str(self.st.info.snapshotter_control), "--hosts-dir", self.certs, *extra, image, "--", *cmd)

    def blobs(self, image: str) -> list[str]:
        from bootseer.registry import RegistryClient
        from snapshotter.lazy.index_reader import IndexReader

        client = RegistryClient(hosts_dir=self.certs, plain_http=True)
        man, _ = client.resolve_image(image)
        idx = IndexReader(client).image_index(image, man.digest)
        assert idx is not None
        return [idx.layers[d.digest].blob.digest for d in man.layers if d.digest in idx.layers]

    def status(self, image: str) -> dict[str, dict[str, Any]]:
        mine = set(self.blobs(image))
        return {x["digest"]: x for x in self.control.call("status")["layers"] if x["digest"] in mine}

    def demand_bytes(self, image: str) -> int:
        return sum(int(x.get("fetched", {}).get("bytes", {}).get("demand", 0)) for x in self.status(image).values())

    def prefetch_outcomes(self) -> int:
        text = self.control.call("metrics")
        return int(sum(float(v) for v in re.findall(r'^bootseer_hotblocks_prefetches_total\{[^}]*\} (\S+)$', text,
                                                     re.M)))

    def hot_demand(self) -> dict[str, float]:
        """``bootseer_hotblocks_demand_bytes_total`` by result (reads of recorded ranges: local or not)."""
        text = self.control.call("metrics")
        return {m.group(1): float(m.group(2)) for m in
                re.finditer(r'^bootseer_hotblocks_demand_bytes_total\{result="(\w+)"\} (\S+)$', text, re.M)}

    def page_cache_bytes(self) -> float:
        """``bootseer_hotblocks_page_cache_bytes_total``: prefetched bytes pushed into the page cache."""
        m = re.search(r'^bootseer_hotblocks_page_cache_bytes_total (\S+)$', self.control.call("metrics"), re.M)
        return float(m.group(1)) if m else 0.0

    def namespaces(self) -> set[str]:
        return set(self.st.ctr("namespaces", "ls", "-q").stdout.split())

    def cold(self, image: str, ns: str | None = None) -> None:
        """The image gone from ``ns`` (its snapshots removed, layers released), every unused cache evicted,
        the page cache dropped: the next start fetches everything it reads."""
        if ns is not None:
            for name in self.st.ctr("images", "ls", "-q", namespace=ns, check=False).stdout.split():
                self.st.ctr("images", "rm", "--sync", name, namespace=ns, check=False)
        self.wait_released(image)
        self.control.call("evict", cap=0)
        assert not self.status(image), "caches of the image survived the eviction"
        drop_caches()

    def wait_released(self, image: str) -> None:
        """Until no layer of ``image`` is mounted.  A layer whose mount was still busy when its last snapshot
        went (the container's overlay being torn down) is unmounted by the daemon's next housekeeping."""
        wait_for("the image's lazy layers released",
                 lambda: not [d for d, x in self.status(image).items() if x.get("mounted")], 60)

    def pull(self, image: str, ns: str) -> dict[str, Any]:
        out = self.cli("pull", "--json", "-a", self.st.info.containerd_socket, "-n", ns, "--hosts-dir", self.certs,
                       image, timeout=300)
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def run(self, image: str, ns: str, cmd: list[str]) -> str:
        out = self.st.ctr("run", "--rm", "--snapshotter", "bootseer", image, "r-" + secrets.token_hex(3), *cmd,
                          namespace=ns, check=False, timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def start_with_prefetch(self, image: str, ns: str, cmd: list[str]) -> tuple[str, int, int, float]:
        """Cold start: pull (Prepare starts the prefetch), wait for every layer's prefetch to end, run.
        Returns (output, demand bytes of the mounts, demand bytes of the container's own reads, seconds)."""
        import time

        assert "bootseer_hotblocks_prefetches_total" in self.control.call("metrics"), "no hot-block prefetcher"
        before = self.prefetch_outcomes()
        res = self.pull(image, ns)
        lazy = sum(1 for lo in res["layers"] if lo["mode"] == "lazy")
        assert lazy == len(self.blobs(image)), res
        wait_for("hot-block prefetch of every layer", lambda: self.prefetch_outcomes() >= before + lazy, 300)
        mounts = self.demand_bytes(image)
        t0 = time.monotonic()
        out = self.run(image, ns, cmd)
        took = time.monotonic() - t0
        return out, mounts, self.demand_bytes(image) - mounts, took


def _indexed(st: Stack, repo: str) -> bool:
    assert st.info.sidecar_url
    jobs = requests.get(st.info.sidecar_url + "/jobs", timeout=5).json()
    failed = [j for j in jobs if j["repo"] == repo and j["state"] == "failed"]
    assert not failed, failed
    return any(j["repo"] == repo and j["state"] == "done" for j in jobs)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    cfg = StackConfig(root=scratch_root("rc"), lazy_config={"fill": {"enabled": False}})
    with running(cfg) as st:
        assert st.info.sidecar_url and st.info.snapshotter_control, "the stack runs without sidecar / lazy layers"
        small = images.push_small(st.info.registry)
        wait_for("conversion of the small image", lambda: _indexed(st, "bootseer/small"), 300)
        yield World(st, small)


@pytest.fixture
def realistic(world: World) -> str:
    if world.realistic is None:
        world.realistic = images.push_realistic(world.st.info.registry)
        wait_for("conversion of the realistic image", lambda: _indexed(world.st, "bootseer/realistic"), 900)
    return world.realistic


@pytest.fixture
def ns(world: World) -> Iterator[str]:
    name = "bs-rc-" + secrets.token_hex(3)
    yield name
    for item in world.st.ctr("images", "ls", "-q", namespace=name, check=False).stdout.split():
        world.st.ctr("images", "rm", "--sync", item, namespace=name, check=False)
    world.st.ctr("namespaces", "rm", name, check=False)


def _hot_ranges_fit(summary: dict[str, Any], blobs: list[str]) -> None:
    assert [ly["blob"] for ly in summary["layers"]] == blobs  # every lazy layer, in image order
    for ly in summary["layers"]:
        assert 0 <= ly["hot_bytes"] <= ly["blob_size"]


# -------------------------------------------------------------------------------------------- the CLI
def test_record_pushes_a_manifest_that_show_reads(world: World) -> None:
    before = world.namespaces()
    cmd = ["/bin/sh", "-c", "cat /data/keep.txt; sha256sum /data/big.bin"]
    out = world.record(world.small, cmd)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["stop"] == "exit" and res["exit_code"] == 0 and res["reads"] > 0
    assert res["artifact"].startswith("sha256:") and res["summary"]["commands"] == [cmd]
    assert "kept" in out.stderr  # the command's output went to stderr with the progress
    blobs = world.blobs(world.small)
    _hot_ranges_fit(res["summary"], blobs)
    assert world.namespaces() == before  # the recording's namespace, container and image are gone
    world.wait_released(world.small)  # the snapshots went with the image, so the layers were released

    show = world.cli("hotblocks", "show", "--json", "--hosts-dir", world.certs, world.small)
    assert show.returncode == 0, show.stderr
    doc = json.loads(show.stdout)
    assert doc["artifact"] == res["artifact"] and doc["hot_bytes"] == res["summary"]["hot_bytes"]
    assert doc["spread"][-1]["share"] == 1.0

    # --merge folds a second recording in: the union, two recordings
    out2 = world.record(world.small, ["/bin/sh", "-c", "cat /data/sub/b.txt"], "--merge")
    assert out2.returncode == 0, out2.stderr
    res2 = json.loads(out2.stdout)
    assert res2["merged"] and res2["summary"]["recordings"] == 2
    assert res2["summary"]["hot_bytes"] >= res["summary"]["hot_bytes"]


def test_record_exit_codes_and_ready_line(world: World) -> None:
    before = world.namespaces()
    failing = world.record(world.small, ["/bin/sh", "-c", "cat /data/keep.txt; exit 3"])
    assert failing.returncode == 5, failing.stderr
    assert "exited with code 3" in failing.stderr and json.loads(failing.stdout)["artifact"] is None

    never = world.record(world.small, ["/bin/sh", "-c", "echo starting; sleep 600"], "--ready-line", "^READY$",
                         "--timeout", "3")
    assert never.returncode == 5 and "no line matched" in never.stderr, never.stderr

    # the ready line ends a command that would run on (it is killed, the recording is pushed)
    ready = world.record(world.small, ["/bin/sh", "-c", "cat /data/keep.txt; echo READY; sleep 600"],
                         "--ready-line", "^READY$", "--timeout", "120")
    assert ready.returncode == 0, ready.stderr
    res = json.loads(ready.stdout)
    assert res["stop"] == "ready" and res["exit_code"] is None and res["artifact"]

    # without a ready line the time limit is the readiness signal, not a failure
    timed = world.record(world.small, ["/bin/sh", "-c", "cat /data/keep.txt; sleep 600"], "--timeout", "3",
                         "--no-push")
    assert timed.returncode == 0 and json.loads(timed.stdout)["stop"] == "timeout", timed.stderr

    unknown = world.record(f"{world.st.info.registry}/bootseer/nope:v1", ["true"])
    assert unknown.returncode == 3, unknown.stderr
    bad = world.record(world.small, ["true"], "--ready-line", "(")
    assert bad.returncode == 2
    assert world.namespaces() == before


def test_record_env_and_output_file_that_show_reads(world: World, tmp_path: Path) -> None:
    """``--env`` reaches the recorded command (it fails without it), ``--output`` writes the manifest to a file
    (``--no-push``: nothing is attached to the image), and ``hotblocks show --file`` reads that file."""
    cmd = ["/bin/sh", "-c", '[ "$BS_MARK" = seen ] || exit 7; cat /data/keep.txt']
    assert world.record(world.small, cmd, "--no-push").returncode == 5  # exit 7: the variable is not set
    out_file = tmp_path / "hot.parquet"
    out = world.record(world.small, cmd, "--env", "BS_MARK=seen", "--no-push", "--output", str(out_file))
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["exit_code"] == 0 and res["artifact"] is None and out_file.stat().st_size > 0
    show = world.cli("hotblocks", "show", "--json", "--file", str(out_file))
    assert show.returncode == 0, show.stderr
    doc = json.loads(show.stdout)
    assert doc["hot_bytes"] == res["summary"]["hot_bytes"] > 0
    assert doc["commands"] == [cmd]


# ------------------------------------------------------------------------------------------- prefetch
def test_other_command_still_works_with_a_manifest_that_did_not_record_its_files(world: World, ns: str) -> None:
    rec = world.record(world.small, ["/bin/sh", "-c", "cat /data/keep.txt"])
    assert rec.returncode == 0, rec.stderr
    world.cold(world.small)
    out, _, _, _ = world.start_with_prefetch(world.small, ns, ["sha256sum", "/data/big.bin"])
    assert out.split()[0] == hashlib.sha256(images._big_file()).hexdigest()


def test_second_start_with_prefetch_makes_almost_no_demand_misses(world: World, realistic: str, ns: str) -> None:
    blobs = world.blobs(realistic)
    world.cold(realistic)
    # Two runs, their union kept: the first ran with every chunk coming from the registry, later starts read
    # from local chunks, and the kernel's read-ahead then reaches a few chunks further.
    rec = world.record(realistic, TORCH, "--runs", "2")
    assert rec.returncode == 0, rec.stderr
    res = json.loads(rec.stdout)
    s = res["summary"]
    assert s["recordings"] == 2 and [r["stop"] for r in res["runs"]] == ["exit", "exit"]
    _hot_ranges_fit(s, blobs)
    print(f"recorded {' '.join(TORCH)!r} twice: hot set {s['hot_bytes'] / MiB:.1f} MiB in {s['ranges']} ranges = "
          f"{s['share_of_image'] * 100:.1f}% of "
          f"{s['image_blob_bytes'] / MiB:.1f} MiB of EROFS blobs (the reads asked for {s['read_bytes'] / MiB:.1f} "
          f"MiB; the rest is whole 1 MiB chunks); first reads spread over {s['duration_s']:.1f}s")
    assert s["share_of_image"] < 0.6  # a start-up reads a part of the image, not all of it

    world.cold(realistic)
    demand0, warmed0 = world.hot_demand(), world.page_cache_bytes()
    out, mounts, misses, took = world.start_with_prefetch(realistic, ns, TORCH)
    assert out == images.REALISTIC_OUTPUT
    demand = {k: v - demand0.get(k, 0.0) for k, v in world.hot_demand().items()}
    warmed = world.page_cache_bytes() - warmed0
    # the hot set went into the page cache, so its reads never reached FUSE; those that did were local
    assert warmed >= s["hot_bytes"] * 0.9 and demand["miss"] <= s["hot_bytes"] // 100, (warmed, demand)
    prefetched = sum(int(x["fetched"]["bytes"]["prefetch"]) for x in world.status(realistic).values())
    print(f"second start: prefetched {prefetched / MiB:.1f} MiB ({warmed / MiB:.1f} MiB pushed into the page cache), "
          f"demand misses {misses / MiB:.2f} MiB during the run ({mounts / MiB:.2f} MiB by the mounts before "
          f"prefetch); reads of hot ranges reaching FUSE: {demand['hit'] / MiB:.1f} MiB local, "
          f"{demand['miss'] / MiB:.1f} MiB not yet; run {took:.1f}s")
    # (fetched bytes are wire bytes: an index v3 layer's zstd frames, fewer than the EROFS bytes they inflate to;
    # what prefetch made local is counted in EROFS bytes, as the hot set is)
    local = sum(int(x["bytes_local"]) for x in world.status(realistic).values())
    assert prefetched > 0 and local >= s["hot_bytes"] * 0.9 - mounts, (prefetched, local)
    assert misses <= 2 * MiB + s["hot_bytes"] // 100  # (almost) everything it read was already local


def test_manifest_of_an_overlapping_command_helps(world: World, realistic: str, ns: str) -> None:
    world.cold(realistic)
    rec = world.record(realistic, NUMPY)
    assert rec.returncode == 0, rec.stderr
    numpy_hot = json.loads(rec.stdout)["summary"]["hot_bytes"]

    world.cold(realistic)
    out, _, misses, _ = world.start_with_prefetch(realistic, ns, TORCH)  # numpy's manifest, torch's start
    assert out == images.REALISTIC_OUTPUT
    prefetched = sum(int(x["fetched"]["bytes"]["prefetch"]) for x in world.status(realistic).values())
    assert 0 < prefetched <= numpy_hot  # the newest manifest (numpy's) was the one replayed
    world.st.ctr("images", "rm", "--sync", realistic, namespace=ns, check=False)

    merged = world.record(realistic, TORCH, "--merge")
    assert merged.returncode == 0, merged.stderr
    torch_hot = json.loads(merged.stdout)["summary"]["hot_bytes"]
    print(f"torch start with numpy's manifest ({numpy_hot / MiB:.1f} MiB, {prefetched / MiB:.1f} MiB prefetched): "
          f"{misses / MiB:.1f} MiB demand misses; "
          f"merged hot set {torch_hot / MiB:.1f} MiB")
    assert misses < torch_hot - numpy_hot // 2  # python + numpy came from prefetch

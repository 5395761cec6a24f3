"""Transient registry errors on the local stack (issue 23, item 6): containerd with BootSeer's snapshotter, the
registry with the sidecar's index of the realistic image (Debian + python3 + numpy + torch), and
:class:`~integration.faultproxy.FaultProxy` in front of the registry answering a seeded 20 % of the lazy ranged
blob reads with 503 and cutting another 5 % off half-way through their bodies.  The image is pulled through the
proxy (``bootseer pull``) and run (``ctr run``, no hot-block manifest, background fill on): it must start and
print the right output, the faults must really have been met (and retried, as the snapshotter's metrics say by
reason), and the registry must never have been marked down.  How long such a start takes against a healthy
registry is the benchmark's (``python -m integration.bench.transient``), not this test's."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from integration import images
from integration.faultproxy import FaultProxy
from integration.stack import Stack, StackConfig, running, wait_for
from tests.conftest import scratch_root


@pytest.fixture(scope="module")
def indexed() -> Iterator[tuple[Stack, str]]:
    cfg = StackConfig(root=scratch_root("te"), cri_snapshotter="bootseer",
                      lazy_config={"fetch": {"read_timeout": 30.0}})
    with running(cfg) as st:
        ref = images.push_realistic(st.info.registry)
        assert st.info.sidecar_url, "the stack runs without the registry sidecar"

        def done() -> bool:
            jobs = requests.get(st.info.sidecar_url + "/jobs", timeout=5).json()
            mine = [j for j in jobs if j["repo"] == "bootseer/realistic"]
            assert not [j for j in mine if j["state"] == "failed"], mine
            return any(j["state"] == "done" for j in mine)

        wait_for("conversion of the realistic image", done, 900)
        yield st, ref


@pytest.fixture
def ns(indexed: tuple[Stack, str]) -> Iterator[str]:
    st, _ = indexed
    name = "bs-te-" + secrets.token_hex(3)
    yield name
    for item in st.ctr("containers", "ls", "-q", namespace=name, check=False).stdout.split():
        st.ctr("tasks", "delete", "-f", item, namespace=name, check=False)
        st.ctr("containers", "rm", item, namespace=name, check=False)
    for item in st.ctr("images", "ls", "-q", namespace=name, check=False).stdout.split():
        st.ctr("images", "rm", "--sync", item, namespace=name, check=False)
    st.ctr("namespaces", "rm", name, check=False)


def _metric(text: str, name: str) -> dict[str, float]:
    """{labels: value} of a Prometheus counter in ``text``."""
    out: dict[str, float] = {}
    for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


def test_lazy_start_survives_503s_and_cut_bodies(indexed: tuple[Stack, str], ns: str) -> None:
    st, ref = indexed
    certs = str(Path(st.info.containerd_config).parent / "certs.d")
    with FaultProxy(st.info.registry, seed=23) as proxy:
        proxy.add("status", status=503, rate=0.20, method="GET", path="/blobs/", ranged=True)
        proxy.add("cut", rate=0.05, method="GET", path="/blobs/", ranged=True)
        via = ref.replace(st.info.registry, proxy.address, 1)
        pull = subprocess.run([sys.executable, "-m", "bootseer.cli", "pull", "--json", "-a",
                               st.info.containerd_socket, "-n", ns, "--hosts-dir", certs, via],
                              capture_output=True, text=True, timeout=300)
        assert pull.returncode == 0, pull.stderr
        res = json.loads(pull.stdout)
        assert res["lazy_layers"] == 3 and res["downloaded_bytes"] == 0, res
        t0 = time.monotonic()
        run = st.ctr("run", "--rm", "--snapshotter", "bootseer", via, "te-" + secrets.token_hex(3),
                     *images.REALISTIC_CMD, namespace=ns, check=False, timeout=600)
        took = time.monotonic() - t0
        log = Path(st.info.logs["snapshotter"]).read_text(errors="replace").splitlines()
        if (run.returncode, run.stdout) != (0, images.REALISTIC_OUTPUT):
            keep = os.environ.get("BOOTSEER_TEST_KEEP_LOGS")  # a directory to copy the stack's logs to
            if keep:
                shutil.copytree(Path(st.info.logs["snapshotter"]).parent, Path(keep) / st.root.name)
            pytest.fail(f"exit {run.returncode}, stdout {run.stdout!r}, stderr {run.stderr[-2000:]}\nsnapshotter:\n"
                        + "\n".join(ln for ln in log if "fail" in ln or "down" in ln)[-6000:], pytrace=False)
        served, failed, cut = proxy.count("206"), proxy.count("status 503"), proxy.count("206 cut")
    print(f"through the fault proxy: {served} ranged reads served ({cut} of them cut), {failed} answered 503; "
          f"run took {took:.1f}s")
    assert failed >= 10 and cut >= 2, "too few faults met for the test to mean anything"
    metrics = requests.get(f"http://{st.info.snapshotter_metrics}/metrics", timeout=10).text
    retries = _metric(metrics, "bootseer_lazy_fetch_retries_total")
    assert sum(v for k, v in retries.items() if 'reason="http_503"' in k) >= 1, retries
    assert sum(v for k, v in retries.items() if 'reason="cut"' in k) >= 1, retries
    assert sum(_metric(metrics, "bootseer_lazy_registry_marked_down_total").values()) == 0
    assert not [ln for ln in log if "failed (demand)" in ln], "a demand read failed"

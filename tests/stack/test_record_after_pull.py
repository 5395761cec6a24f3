"""`bootseer record` right after an ordinary `bootseer pull` and `ctr run` of the same image on the node: the
image's committed snapshots hold its layers, swapped to their local files, so their reads would not be seen.
The refusal names those snapshots and the command that releases them; after it, the recording works."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time

from integration import images
from integration.stack import StackConfig, running
from tests.conftest import scratch_root


def _cli(*args: str, root: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "CONTAINERD_ADDRESS",
                                                             "CONTAINER_RUNTIME_ENDPOINT", "BOOTSEER_HOSTS_DIR")}
    env.update(BOOTSEER_STACK_DIR=root, BOOTSEER_EVENTS="off")
    return subprocess.run([sys.executable, "-m", "bootseer.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_record_after_pull_and_run_says_what_holds_the_layers_and_how_to_release_them() -> None:
    root = scratch_root("rec")
    with running(StackConfig(root=root, sidecar=False)) as st:  # converted by hand, below
        ref = images.push_small(st.info.registry, repo=f"bootseer/rec-{secrets.token_hex(3)}")
        conv = _cli("convert", ref, root=str(root))
        assert conv.returncode == 0, conv.stderr
        # off a terminal, convert tells its progress a line per layer phase and per finished layer
        assert re.search(r"^ *[\d.]+s layer sha256:[0-9a-f]{12}: fetch \([\d.]+ MB\)$", conv.stderr, re.M), conv.stderr
        assert len(re.findall(r"^ *[\d.]+s layer sha256:[0-9a-f]{12}: converted, blob [\d.]+ MB$", conv.stderr,
                              re.M)) == 3, conv.stderr
        pulled = _cli("pull", ref, root=str(root))
        assert pulled.returncode == 0 and ": 3 layers, 3 lazy," in pulled.stdout, pulled.stderr
        assert st.ctr("run", "--rm", "--snapshotter", "bootseer", ref, "rec-run").stdout == images.SMALL_OUTPUT
        deadline = time.monotonic() + 120
        while True:  # the background fill completes a layer and swaps it to its local file
            layers = json.loads(_cli("status", "--json", root=str(root)).stdout)["layers"]
            if any(x["swapped"] and x["mounted"] for x in layers):
                break
            assert time.monotonic() < deadline, f"no layer swapped within 120 s: {layers}"
            time.sleep(0.2)  # polling another process's background work, with a deadline

        refused = _cli("record", ref, "--timeout", "60", root=str(root))
        assert refused.returncode == 4, refused.stderr
        text = " ".join(refused.stderr.split())
        assert f"{ref} is pulled in namespace(s) default: its committed snapshots hold them" in text, text
        assert f"ctr -n default image rm {ref}" in text, text

        st.ctr("image", "rm", "--sync", ref)
        recorded = _cli("record", ref, "--timeout", "60", root=str(root))
        assert recorded.returncode == 0, recorded.stderr
        assert "pushed hot-block manifest" in recorded.stderr

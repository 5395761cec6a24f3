"""The real emitters of one job (depsnap resolve on the local stack, a ckptfs read) make one profile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bootseer import events
from tests.unit.test_profile import ROOT, _cli


def test_profile_of_a_job_from_the_real_emitters(stack: object, small_image: str, tmp_path: Path) -> None:
    """A launcher's `bootseer depsnap resolve` and the trainer's ckptfs read, both with the job's id in their
    environment, make one profile with both phases in order."""
    from ckptfs.put import put

    log = tmp_path / "events.jsonl"
    env = {events.ENV_PATH: str(log), events.ENV_JOB: "job-real", "COLUMNS": "200"}
    (tmp_path / "requirements.txt").write_text("numpy==1.26.4\n")
    proc = _cli("depsnap", "resolve", "--base", small_image, "--repo", small_image.rpartition("/")[0] + "/deps",
                "--plain-http", "-r", str(tmp_path / "requirements.txt"), "--run", "pip install -r requirements.txt",
                env=env)
    assert proc.returncode == 0, proc.stderr
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "model.pt").write_bytes(os.urandom(1 << 20))
    put(str(src), f"file://{tmp_path / 'store'}")
    code = ("import ckptfs, sys; f = ckptfs.open(sys.argv[1], 'model.pt'); f.read(); f.close()")
    subprocess.run([sys.executable, "-c", code, f"file://{tmp_path / 'store'}"], check=True, cwd=ROOT,
                   env={**os.environ, **env}, timeout=120)
    proc = _cli("profile", "--events", str(log), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["job"] == "job-real"
    assert [(e["phase"], e["status"]) for e in doc["events"]] == [("dependency_resolve", "ok"),
                                                                   ("checkpoint_load", "ok")]
    resolve, load = doc["events"]
    assert resolve["attrs"]["hit"] is False and resolve["attrs"]["image"] == small_image
    assert load["offset_s"] >= resolve["offset_s"] + resolve["duration"] - 1e-3 and load["attrs"]["bytes"] == 1 << 20

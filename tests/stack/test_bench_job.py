"""``bootseer bench job`` end to end at reduced size (issue 19): a tiny model and checkpoint, one rate, one run
of today's start, BootSeer's and the floor, on the real stack — every phase shows up in the event log, the
phases add up to the measured total, and every run's loss line is the checkpoint's next-step loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from integration.bench import job
from integration.stack import loops_below, mounts_below

TINY = ["--layers", "1", "--d-model", "64", "--heads", "4", "--ff", "128", "--vocab", "500", "--seq", "16"]


def test_job_start_today_bootseer_and_floor_at_reduced_size(tmp_path: Path) -> None:
    out = tmp_path / "job.json"
    root = tmp_path / "root"
    rc = job.main(["--runs", "1", "--rates", "1gbit", "--modes", "baseline,bootseer,floor", "--json", str(out),
                   "--md", str(tmp_path / "job.md"), "--root", str(root), "--cache", str(tmp_path / "cache"),
                   "--stripes", "4", "--chunk-size", "1MiB", *TINY])
    assert rc == 0
    res = json.loads(out.read_text())
    assert not res["partial"] and res["expected_loss"] is not None
    runs = {r["mode"]: r for r in res["all_runs"]}
    assert set(runs) == {"baseline", "bootseer", "floor"}
    for mode, r in runs.items():
        assert r["loss_ok"] and abs(r["loss"] - res["expected_loss"]) < 1e-3 * max(1.0, abs(res["expected_loss"]))
        assert sum(r["phases"].values()) == pytest.approx(r["total_s"], abs=0.01), mode
        assert all(v >= -0.05 for v in r["phases"].values()), (mode, r["phases"])
        assert {"imports_done", "checkpoint_loaded", "first_step_done"} <= set(r["milestones"]), mode
    # today's start: the pull, the install from the index, the one-stream download
    assert {"image_ready", "dependencies_ready"} <= set(runs["baseline"]["milestones"])
    assert {"image_pull", "dependency_install", "checkpoint_download"} <= set(runs["baseline"]["busy_s"])
    assert runs["baseline"]["registry_link_bytes"] > 250e6  # the whole base image crossed the link
    # BootSeer's: a depsnap hit, a lazy pull with the recorded blocks prefetched, the checkpoint through ckptfs
    b = runs["bootseer"]
    # (no `prefetch` line reaches this job's profile yet: the snapshotter's prefetch is not attributed to it)
    assert {"dependency_resolve", "image_pull", "image_mount", "checkpoint_load"} <= set(b["busy_s"])
    lines = [json.loads(ln) for ln in Path(b["events"]).read_text().splitlines()]
    resolve = [ln for ln in lines if ln["phase"] == "dependency_resolve"]
    assert resolve and all(ln["attrs"]["hit"] for ln in resolve)
    assert any(ln["phase"] == "checkpoint_load" and ln["component"] == "ckptfs mount" for ln in lines)
    # lazily pulled: every layer mounted lazily, nothing downloaded whole.  (Not "fewer bytes over the link than
    # today's pull": the background fill completes the layers while the job runs, and LZ4 EROFS blobs are larger
    # than the gzip layers, so on a slow, loaded machine the fill can move more bytes before the loss line.)
    (pull,) = [ln for ln in lines if ln["phase"] == "image_pull" and ln["component"] == "bootseer pull"]
    assert pull["attrs"]["lazy"] == pull["attrs"]["layers"] >= 2 and pull["attrs"]["downloaded_bytes"] == 0
    # the checkpoint mount read model.pt ahead of the trainer (--prefetch), and said so
    assert any(ln["phase"] == "prefetch" and ln["component"] == "ckptfs mount" and ln["status"] == "ok"
               for ln in lines)
    assert {"first_step", "checkpoint_load"} <= set(b["cpu"]) and b["cpu"]["first_step"]["wall_s"] > 0
    # the floor fetched nothing
    assert "image_ready" not in runs["floor"]["milestones"] and runs["floor"]["registry_link_bytes"] < 1e6
    assert set(res["ratios"]) >= {"job_vs_baseline_1g", "job_vs_floor_1g"}
    assert "job_vs_baseline_1g" in (tmp_path / "job.md").read_text()
    # nothing left behind
    assert not mounts_below(root) and not loops_below(root)

"""The ckpt benchmark's statistics: ratios paired per round, goals met / missed / inconclusive by spread."""

from __future__ import annotations

from integration.bench.ckpt import goal_status, run_local_modes


def test_goal_status_follows_the_spread() -> None:
    assert goal_status([0.95, 0.91, 1.2], 0.9) == "met"
    assert goal_status([0.5, 0.89], 0.9) == "missed"
    assert goal_status([0.85, 0.95], 0.9) == "inconclusive"
    assert goal_status([], 0.9) == "not measured"


def test_ratios_are_paired_per_round_and_a_failing_mode_is_reported() -> None:
    raw_secs = iter([1.0, 2.0, 1.0])  # the disk's speed changes from round to round
    api_secs = iter([1.1, 2.2, 1.1])  # the API follows it: the paired ratio is steady

    def raw() -> tuple[int, float]:
        return 1000, next(raw_secs)

    def api() -> tuple[int, float]:
        return 1000, next(api_secs)

    def fuse_parallel() -> int:
        raise OSError("no /dev/fuse")

    res = run_local_modes({"raw_parallel": raw, "api": api, "fuse_parallel": fuse_parallel}, 3, 0, 1000,
                          log=lambda m: None)
    r = res["ratios"]["api_vs_raw_parallel_local"]
    assert [round(x, 3) for x in r["runs"]] == [0.909, 0.909, 0.909]
    assert r["goal"] == 0.9 and r["status"] == "met"  # unpaired, 1000/1100 vs 500/1000 would straddle it
    assert res["modes"]["raw_parallel"]["min"] == 500 and res["modes"]["raw_parallel"]["max"] == 1000
    assert "fuse_vs_raw_parallel_local" not in res["ratios"] and "no /dev/fuse" in res["errors"]["fuse_parallel"]
    assert res["repeats_done"] == 3

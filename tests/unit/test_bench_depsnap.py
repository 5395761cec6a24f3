"""The depsnap benchmark's pure parts: the rotated mode order, medians with their spread, per-round ratios, the
goal's verdict, the run counts actually measured — and the committed doc's table against the committed JSON.
No benchmark runs here."""

from __future__ import annotations

import json
from pathlib import Path

from integration.bench import depsnap

DOCS = Path(__file__).resolve().parents[2] / "docs" / "bench"


def _rounds(per_mode: dict[str, list[float]]) -> list[dict[str, object]]:
    return [{"mode": m, "round": i, "seconds": s} for m, vals in per_mode.items() for i, s in enumerate(vals)]


def test_every_mode_runs_in_every_position_over_the_rounds() -> None:
    modes = list(depsnap.MODES)
    orders = [depsnap.rotation(modes, i) for i in range(len(modes))]
    for pos in range(len(modes)):
        assert sorted(o[pos] for o in orders) == sorted(modes)
    assert all(sorted(o) == sorted(modes) for o in orders)


def test_summary_has_spreads_per_round_ratios_and_actual_counts() -> None:
    runs = {"install": [10.0, 8.0, 12.0, 9.0, 11.0], "hit_lazy": [1.0, 0.8, 1.2, 0.9, 1.1],
            "hit": [2.0, 2.0, 2.4, 1.8, 2.2], "floor": [0.5, 0.4, 0.6, 0.5, 0.5]}
    out = depsnap.summarize(_rounds(runs), 5, list(depsnap.MODES))
    assert out["run_counts"] == {"install": 5, "hit_lazy": 5, "hit": 5, "floor": 5}
    assert out["seconds"]["install"] == {"median": 10.0, "min": 8.0, "max": 12.0, "n": 5}
    assert out["hit_mode"] == "hit_lazy"
    assert out["ratios"]["hit_vs_install"] == 0.1  # ratio of the medians
    assert out["ratio_spreads"]["hit_vs_install"]["min"] == 0.1 and out["ratio_spreads"]["hit_vs_install"]["max"] == 0.1
    assert out["ratio_spreads"]["hit_full_vs_install"]["min"] < out["ratio_spreads"]["hit_full_vs_install"]["max"]
    assert out["goal"]["verdict"] == "not met"  # every round's ratio is above 0.05
    assert set(out["ratios"]) >= {"floor_vs_install", "prep_hit_lazy_vs_install", "prep_hit_vs_install"}


def test_a_goal_whose_rounds_straddle_it_is_inconclusive_and_missing_runs_are_counted() -> None:
    runs = {"install": [10.0, 10.0, 10.0, 10.0, 10.0], "hit_lazy": [0.3, 0.4, 0.6, 0.7, 0.45]}
    rounds = _rounds(runs)
    rounds = [r for r in rounds if not (r["mode"] == "hit_lazy" and r["round"] == 4)]  # one run lost
    out = depsnap.summarize(rounds, 5, list(depsnap.MODES))
    assert out["run_counts"] == {"install": 5, "hit_lazy": 4, "hit": 0, "floor": 0}
    assert out["goal"]["verdict"] == "inconclusive"  # rounds from 0.03 to 0.07 around 0.05
    assert "prep_hit_lazy_vs_install" not in out["ratios"]  # no floor measured: no prep ratio made up
    table = depsnap.render_md({**out, "rate": "1gbit"})
    assert "hit_lazy 4" in table and "of 5 asked" in table and "**inconclusive**" in table


def test_committed_doc_quotes_the_committed_json() -> None:
    result = json.loads((DOCS / "depsnap.json").read_text())
    doc = (DOCS / "depsnap.md").read_text()
    assert depsnap.render_md(result) in doc, "docs/bench/depsnap.md: rerun `bootseer bench depsnap --render`"
    assert all(n >= 5 for n in result["run_counts"].values()), result["run_counts"]

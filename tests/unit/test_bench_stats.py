"""The spread and the verdicts every benchmark prints beside its medians."""

from __future__ import annotations

import pytest

from integration.bench.stats import Spread, ratio_spread, spread, verdict


def test_spread_and_text() -> None:
    s = spread([3.0, 1.0, 2.0])
    assert (s.median, s.lo, s.hi, s.n) == (2.0, 1.0, 3.0, 3)
    assert s.text() == "2.00 [1.00–3.00]" and spread([1.5]).text() == "1.50"
    with pytest.raises(ValueError):
        spread([])


def test_paired_ratio_uses_per_round_ratios() -> None:
    r = ratio_spread([2.0, 3.0, 2.5], [1.0, 2.0, 2.5])  # rounds: 2.0, 1.5, 1.0
    assert r.median == pytest.approx(2.5 / 2.0) and (r.lo, r.hi) == (1.0, 2.0)
    unpaired = ratio_spread([2.0, 3.0], [1.0, 2.0, 4.0], paired=True)  # counts differ: widest interval
    assert (unpaired.lo, unpaired.hi) == (0.5, 3.0)


@pytest.mark.parametrize(("lo", "hi", "op", "want"), [
    (1.0, 1.2, "<=", "met"), (1.4, 1.6, "<=", "not met"), (1.2, 1.4, "<=", "inconclusive"),
    (0.96, 1.1, ">=", "met"), (0.5, 0.9, ">=", "not met"), (0.9, 1.0, ">=", "inconclusive"),
])
def test_verdicts(lo: float, hi: float, op: str, want: str) -> None:
    assert verdict(Spread((lo + hi) / 2, lo, hi, 3), 1.3 if op == "<=" else 0.95, op) == want  # type: ignore[arg-type]
    assert verdict(None, 1.0) == "not measured"

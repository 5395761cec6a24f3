"""Figures with their spread, and goals judged against it: what every benchmark reports.

A median alone hides how far apart the runs were; a goal "met" by a median whose runs straddle the bound is a
coin toss.  So each figure carries (median, min, max, n) and a verdict is one of ``met``, ``not met`` or
``inconclusive`` — the last when the spread straddles the bound (the noise is larger than the distance to the
goal).  A ratio of two modes measured in alternating rounds is judged on its per-round pair ratios; when the
rounds cannot be paired, on the widest interval the two spreads allow.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["met", "not met", "inconclusive", "not measured"]


@dataclass(frozen=True)
class Spread:
    median: float
    lo: float
    hi: float
    n: int

    def as_dict(self, digits: int = 4) -> dict[str, float | int]:
        return {"median": round(self.median, digits), "min": round(self.lo, digits), "max": round(self.hi, digits),
                "n": self.n}

    def text(self, fmt: str = ".2f") -> str:
        """``1.23 [1.10–1.40]`` (one run: just the value)."""
        if self.n <= 1 or self.lo == self.hi:
            return format(self.median, fmt)
        return f"{format(self.median, fmt)} [{format(self.lo, fmt)}–{format(self.hi, fmt)}]"


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("no values to summarise")
    return Spread(statistics.median(values), min(values), max(values), len(values))


def ratio_spread(num: Sequence[float], den: Sequence[float], paired: bool = True) -> Spread:
    """The ratio of the medians, with the spread of the per-round ratios when the runs pair up (same count,
    measured round by round), else the widest interval: min(num)/max(den) to max(num)/min(den)."""
    if not num or not den or min(den) <= 0:
        raise ValueError("a ratio needs values on both sides and a positive denominator")
    med = statistics.median(num) / statistics.median(den)
    if paired and len(num) == len(den):
        pairs = [a / b for a, b in zip(num, den, strict=True)]
        return Spread(med, min(pairs), max(pairs), len(pairs))
    return Spread(med, min(num) / max(den), max(num) / min(den), min(len(num), len(den)))


def verdict(s: Spread | None, bound: float, op: Literal["<=", ">="] = "<=") -> Verdict:
    """``met`` when the whole spread is on the goal's side of ``bound``, ``not met`` when the whole spread is on
    the other side, ``inconclusive`` otherwise.  One run is judged by its value (n=1 is reported beside it)."""
    if s is None:
        return "not measured"
    ok_lo, ok_hi = (s.lo <= bound, s.hi <= bound) if op == "<=" else (s.lo >= bound, s.hi >= bound)
    if ok_lo and ok_hi:
        return "met"
    if not ok_lo and not ok_hi:
        return "not met"
    return "inconclusive"

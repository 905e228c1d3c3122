"""Measured per-layer allocation -- pure math, no modules.

Each prunable unit type of each layer (its attention heads, its FFN channels) has a *cost curve*: the error of
removing 0, 1, 2, ... units along its own greedy path, measured on calibration text. Splitting a parameter
budget over all curves so that the summed error is least is a knapsack; its Lagrangian relaxation is solved
exactly by taking curve segments in order of error per parameter, provided each curve is convex. A measured
curve need not be (a head that is expensive alone can make its neighbours cheap), so every curve is replaced by
its lower convex hull first: the relaxation can only ever choose hull points, and between two hull points the
first unit counts are taken as the budget runs out.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CostCurve:
    """What removing units of one kind from one layer costs.

    counts: the unit counts that may be removed, ascending, starting at 0 (e.g. only multiples of an FFN
    alignment, only head counts tensor parallelism can split); errors: the measured error at each count;
    unit_params: parameters one unit owns."""

    counts: list[int]
    errors: list[float]
    unit_params: int

    def __post_init__(self):
        if not self.counts or self.counts[0] != 0 or len(self.counts) != len(self.errors):
            raise ValueError("a cost curve starts at 0 removed units and has one error per count")
        if any(b <= a for a, b in zip(self.counts, self.counts[1:])):
            raise ValueError("cost curve counts must ascend")


def lower_hull(counts: list[int], errors: list[float]) -> list[int]:
    """Indices of the points of the lower convex hull of (counts, errors), from the first to the last point."""
    hull: list[int] = []
    for i in range(len(counts)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the chord a -> i: it is never the cheapest way to reach its count
            if (errors[b] - errors[a]) * (counts[i] - counts[a]) >= (errors[i] - errors[a]) * (counts[b] - counts[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(curves: list[CostCurve], budget: float) -> list[int]:
    """Units to remove from each curve so that about `budget` parameters go at the least summed error.

    Segments of every curve's convex hull are taken cheapest error-per-parameter first (each curve's segments
    are already in that order, being convex). A segment that would overshoot is taken only for as many of its
    units as still fit, and closes its curve (its later segments would leave a gap); smaller units of other
    curves may still fill what is left. The result never overshoots, and no curve's next allowed count would
    still fit: with FFN channels among the curves it lands within one channel of the budget."""
    segments = []
    for c_idx, c in enumerate(curves):
        hull = lower_hull(c.counts, c.errors)
        for j, (a, b) in enumerate(zip(hull, hull[1:])):
            units = c.counts[b] - c.counts[a]
            ratio = (c.errors[b] - c.errors[a]) / (units * c.unit_params)
            segments.append((ratio, c_idx, j, a, b))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    removed = [0] * len(curves)
    closed = [False] * len(curves)
    left = float(budget)
    for _, c_idx, _, a, b in segments:
        c = curves[c_idx]
        if closed[c_idx] or left < c.unit_params:
            continue
        if (c.counts[b] - removed[c_idx]) * c.unit_params <= left:
            left -= (c.counts[b] - removed[c_idx]) * c.unit_params
            removed[c_idx] = c.counts[b]
            continue
        # part of the segment: the largest allowed count between its ends that still fits
        fits = [k for k in c.counts[a + 1 : b] if (k - removed[c_idx]) * c.unit_params <= left]
        if fits:
            left -= (fits[-1] - removed[c_idx]) * c.unit_params
            removed[c_idx] = fits[-1]
        closed[c_idx] = True
    return removed


def curve_error(curve: CostCurve, removed: int) -> float:
    """The measured error of a curve at an allowed count."""
    return curve.errors[curve.counts.index(removed)]

"""A margin curve: (agents, margin) points sorted by agents, as a search's steps measured them (``slo``:
each verdict's log ratio of how far inside or outside its tier it was), and where it crosses zero.

Why a module of its own: ``policy.CapacitySearch`` started from a twin's prediction steers by the twin's
curve shifted to the margins it measures, and these are plain functions of a curve, no search state.
Linear in log agents between points: the counts a search measures are spread geometrically (it doubles
before it narrows), and a margin is itself a log ratio.
"""

from __future__ import annotations

import math
from typing import Sequence


def margin_at(curve: Sequence[tuple[int, float]], agents: int) -> float:
    """The margin at ``agents`` on a curve of (agents, margin) points sorted by agents: linear in log agents
    between the points around it; below the first, the first's; past the last, along the curve's mean
    slope (as ``last_crossing`` extrapolates)."""
    if agents <= curve[0][0]:
        return curve[0][1]
    for (n0, m0), (n1, m1) in zip(curve, curve[1:]):
        if agents <= n1:
            return m0 + (m1 - m0) * math.log(agents / n0) / math.log(n1 / n0)
    return curve[-1][1] + mean_slope(curve) * math.log(agents / curve[-1][0])


def mean_slope(curve: Sequence[tuple[int, float]]) -> float:
    """The curve's margin per unit of log agents from its first point to its last, at most 0 (0: one point)."""
    (first_n, first_m), (last_n, last_m) = curve[0], curve[-1]
    return min(0.0, (last_m - first_m) / math.log(last_n / first_n)) if last_n > first_n else 0.0


def last_crossing(curve: Sequence[tuple[int, float]], shift: float) -> float | None:
    """Where the curve, shifted up by ``shift``, falls below zero for the last time, interpolated linearly in
    log agents between the points around it (below the first point: half way to 0; past the last, along
    the curve's mean slope from its first point to its last); None when it ends at or above zero on a curve
    that does not fall. The last time, not the first: a margin dips and recovers as batches fill, but
    past the knee it stays below."""
    shifted = [(agents, margin + shift) for agents, margin in curve]
    (first_n, _), (last_n, last_m) = shifted[0], shifted[-1]
    if last_m >= 0:
        slope = mean_slope(curve)
        return last_n * math.exp(min(50.0, last_m / -slope)) if slope < 0 else None
    for (n0, m0), (n1, m1) in zip(reversed(shifted[:-1]), reversed(shifted[1:])):
        if m0 >= 0:
            return n0 * math.exp(math.log(n1 / n0) * m0 / (m0 - m1))
    return first_n / 2

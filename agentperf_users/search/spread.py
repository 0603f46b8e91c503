"""How far a capacity answer could move if the same search ran again: the spread a report states.

Against the simulator the ground truth says where a tier's verdicts flip; against a real server nothing
does, and two runs of one system differ because each step's window saw a sample of its agents' requests.
So each judged step's verdict is resampled over its agents (``slo.pass_fraction``: whole agents, with
replacement) and a count's verdict is **stable** when at least ``STABLE`` of the resamples agree with
it and its margin (``slo``: the binding quantile's log ratio to its limit) is at least ``STABLE_MARGIN``
on its side. The margin is needed because a resample only reshuffles what was seen: where every agent
met the floor by 0.2 %, every resample passes too, yet a rerun that times its requests a little
differently fails. A rerun bisects to where verdicts flip, so it can land anywhere between the highest stable pass at
or below the answer and the count below the lowest stable fail above it:

* ``low``: the largest judged count at or below the answer that passed in ``STABLE`` of the resamples
  (0 when none did: a rerun may find no count that holds);
* ``high``: one below the smallest judged count above the answer that failed in ``STABLE`` of them;
  None when none did (a rerun may find more, up to the search's maximum).

What this does not see: a server whose own speed drifts between runs (a shared machine, thermal limits,
another tenant), which no resampling of one run's records can show. ``benchmarks/engine_capacity.py``
sets the stated spread against repeated runs of a real engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from agentperf_users.search.policy import CapacityStatus

RESAMPLES = 200
"""Resamples per step and tier: a pass share near ``STABLE`` is then known to about ±2 %, and a report
of a dozen steps and three tiers resamples in well under a second."""
STABLE = 0.9
STABLE_MARGIN = 0.03
"""3 % of a limit: on the embedded simulator a live step's judged quantiles differ from the ground truth's
same step by a median 0.5 % (output speed) and 3-4 % (TTFT) (``benchmarks/capacity_accuracy.py``), and a
README run's step at 14 agents passed by 0.2 % where the truth's same step failed."""


@dataclass(frozen=True)
class Spread:
    low: int
    high: int | None  # None: no stable fail above the answer was judged

    def to_dict(self) -> dict:
        return asdict(self)


def capacity_spread(steps: Iterable[tuple[int, float | None, float | None]], capacity: dict) -> Spread | None:
    """The spread of one tier's ``capacity`` (a ``TierCapacity.to_dict()``) from its judged steps as
    (agents, pass share of the resamples, margin: a number, or ``"inf"``/``"-inf"`` as report.json writes
    it); None for a search that located nothing (incomplete)."""
    status = capacity["status"]
    if status not in (CapacityStatus.FOUND, CapacityStatus.NONE_PASSED, CapacityStatus.NEVER_FAILED):
        return None
    answer = 0 if status == CapacityStatus.NONE_PASSED else capacity.get("agents") or 0
    judged = [(agents, share, float(margin)) for agents, share, margin in steps
              if share is not None and margin is not None]
    stable_passes = [agents for agents, share, margin in judged
                     if agents <= answer and share >= STABLE and margin >= STABLE_MARGIN]
    stable_fails = [agents for agents, share, margin in judged
                    if agents > answer and share <= 1 - STABLE and margin <= -STABLE_MARGIN]
    return Spread(max(stable_passes, default=0), min(stable_fails) - 1 if stable_fails else None)


def spread_words(spread: dict | None) -> str:
    """``a rerun may land at 9–12``; empty when the answer has no spread to state."""
    if not spread:
        return ""
    low, high = spread["low"], spread["high"]
    if high is None:
        return f"a rerun may land at {low:,} or more" if low else "no judged verdict held: a rerun may land anywhere"
    return "a rerun lands here too" if low == high else f"a rerun may land at {low:,}–{high:,}"

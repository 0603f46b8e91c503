"""The spread a report states: each step's verdict resampled over its agents (``slo.pass_fraction``), and
where a rerun may land from those shares (``search.spread``)."""

from __future__ import annotations

import math
import random

import pytest

from agentperf_users.measure.records import Status
from agentperf_users.measure.slo import SloTier, evaluate, pass_fraction
from agentperf_users.search.spread import RESAMPLES, STABLE, STABLE_MARGIN, Spread, capacity_spread, spread_words
from tests.test_slo import record

AGENT_TIER = SloTier("a", ttft_max_s=2.0, output_tps_min=20.0, quantile=0.9, scope="agent", agents_passing=0.95,
                     max_error_rate=0.2)
REQUEST_TIER = SloTier("r", ttft_max_s=2.0, output_tps_min=20.0, quantile=0.9, scope="request", agents_passing=0.95,
                       max_error_rate=0.2)

LENIENT_TIER = SloTier("l", ttft_max_s=2.0, output_tps_min=20.0, quantile=0.5, scope="request", agents_passing=0.95,
                       max_error_rate=0.1)  # its median tolerates errors the error rate does not


def random_requests(rng: random.Random, agent: int, n: int) -> list:
    """Fast and slow requests, and errors at a rate that sometimes decides the verdict alone."""
    error_rate = rng.choice([0.0, 0.15, 0.4])
    return [record(agent, ttft_s=rng.uniform(0.1, 3.0), output_tps=rng.uniform(10.0, 60.0),
                   status=Status.HTTP_5XX if rng.random() < error_rate else Status.OK, end=100.0 + i)
            for i in range(n)]


@pytest.mark.parametrize("tier", [AGENT_TIER, REQUEST_TIER, LENIENT_TIER], ids=["agent", "request", "error-rate"])
@pytest.mark.parametrize("seed", range(24))
def test_a_resample_of_identical_agents_is_judged_as_evaluate_judges_the_step(tier, seed):
    """Agents that are copies of one another make every resample the same multiset as the step itself, so
    the share of passing resamples is exactly 1 or 0, and it is evaluate's verdict (both scopes, errors too)."""
    rng = random.Random(seed)
    one = random_requests(rng, 0, rng.randint(1, 12))
    agents = rng.randint(1, 6)
    step = [record(agent, r.ttft_s, r.output_tps, r.status, r.end_epoch_s) for agent in range(agents) for r in one]
    assert pass_fraction(step, tier, RESAMPLES, seed) == (1.0 if evaluate(step, tier).passed else 0.0)


def test_one_failing_agent_in_twenty_passes_only_when_the_resample_draws_it_at_most_once():
    """19 passing agents and one far off: the step passes (19/20 = 95 %), a resample only where it drew the
    failing agent at most once, which Binomial(20, 1/20) puts at 73.6 %."""
    step = [record(agent, ttft_s=0.5, output_tps=50.0) for agent in range(19) for _ in range(3)]
    step += [record(19, ttft_s=9.0, output_tps=5.0) for _ in range(3)]
    assert evaluate(step, AGENT_TIER).passed
    expected = sum(math.comb(20, k) * 0.05**k * 0.95 ** (20 - k) for k in (0, 1))
    share = pass_fraction(step, AGENT_TIER, RESAMPLES, seed=1)
    assert abs(share - expected) < 0.1, (share, expected)  # 200 resamples: a standard error of 0.03
    assert pass_fraction(step, AGENT_TIER, RESAMPLES, seed=1) == share  # seeded: a rebuilt report says the same


def test_no_records_have_no_share():
    assert pass_fraction([], AGENT_TIER, RESAMPLES, seed=0) is None


FOUND = {"status": "found", "agents": 10, "first_failing_agents": 11}
CLEAR = 0.1  # a margin well past STABLE_MARGIN


@pytest.mark.parametrize(("steps", "capacity", "expected"), [
    # stable on both sides of the answer: a rerun lands where this one did
    ([(4, 1.0, CLEAR), (8, 0.97, CLEAR), (16, 0.0, -CLEAR), (12, 0.02, -CLEAR), (10, 0.95, CLEAR), (11, 0.05, -CLEAR)],
     FOUND, Spread(10, 10)),
    # the pass at 10 and the fail at 11 are coin flips: back to the stable pass at 8, up to below the fail at 12
    ([(4, 1.0, CLEAR), (8, 0.97, CLEAR), (16, 0.0, -CLEAR), (12, 0.02, -CLEAR), (10, 0.6, CLEAR), (11, 0.4, -CLEAR)],
     FOUND, Spread(8, 11)),
    # every resample agrees, but by less than STABLE_MARGIN: a rerun timed a little differently may not
    ([(8, 1.0, CLEAR), (10, 1.0, 0.002), (11, 0.0, -0.017), (12, 0.0, "-inf")], FOUND, Spread(8, 11)),
    # a fail above the answer that held in 85 % only does not bound it; no share or no margin counts for nothing
    ([(8, 1.0, CLEAR), (10, 0.9, CLEAR), (11, 0.15, -CLEAR), (16, None, None), (24, 0.0, None), (32, 0.0, -CLEAR)],
     FOUND, Spread(10, 31)),
    ([(8, 1.0, CLEAR), (10, 0.9, CLEAR), (11, 0.15, -CLEAR)], FOUND, Spread(10, None)),
    # none passed: from none up to below the first stable fail
    ([(1, 0.3, -CLEAR), (2, 0.0, -CLEAR)], {"status": "none_passed", "agents": None, "first_failing_agents": 1},
     Spread(0, 1)),
    # never failed: no upper end
    ([(64, 1.0, CLEAR), (128, 0.93, "inf")], {"status": "never_failed", "agents": 128, "first_failing_agents": None},
     Spread(128, None)),
    # an incomplete search states no spread
    ([(4, 1.0, CLEAR)], {"status": "incomplete", "agents": 4, "first_failing_agents": None}, None),
])
def test_a_rerun_lands_between_the_stable_pass_below_and_the_stable_fail_above(steps, capacity, expected):
    assert STABLE == 0.9 and 0.002 < STABLE_MARGIN < CLEAR  # the shares and margins above are placed around them
    assert capacity_spread(steps, capacity) == expected


@pytest.mark.parametrize(("spread", "words"), [
    (None, ""), ({"low": 10, "high": 10}, "a rerun lands here too"), ({"low": 8, "high": 11}, "a rerun may land at 8–11"),
    ({"low": 1_200, "high": None}, "a rerun may land at 1,200 or more"),
    ({"low": 0, "high": None}, "no judged verdict held: a rerun may land anywhere")])
def test_the_spread_is_worded_once(spread, words):
    assert spread_words(spread) == words

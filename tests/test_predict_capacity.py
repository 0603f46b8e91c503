"""``agentperf capacity --predict PROFILE``: the search starts from a twin's prediction, reaches the answer
it reaches without one, and the report sets the prediction against what was measured."""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from dataclasses import replace

import pytest

from agentperf_users.loadgen import replay
from agentperf_users.measure.slo import load_slo
from agentperf_users.search import predicted, truth
from agentperf_users.search.headline import predicted_words
from agentperf_users.search.margin_curve import last_crossing, margin_at
from agentperf_users.search.policy import CapacitySearch, CapacityStatus, SearchParameters, TierCapacity
from agentperf_users.simulator.profile import load_profile
from agentperf_users.workload.readers import load_trajectories
from tests.test_shape import margin_verdict, verdict

KNEES = {"loose": 29, "mid": 8, "strict": 1}  # each tier passes exactly up to its knee


def drive(search: CapacitySearch, knees: dict[str, int]) -> list[int]:
    """Run the policy against tiers that pass exactly up to their knee; the counts it measured, in order."""
    measured = []
    while (agents := search.next_agents()) is not None:
        assert agents not in measured and 1 <= agents <= 256, measured
        measured.append(agents)
        search.record_verdict(agents, verdict(**{tier: agents <= knee for tier, knee in knees.items()}))
        assert len(measured) < 60
    return measured


def prediction_of(knees: dict[str, float]) -> dict[str, TierCapacity]:
    """What a twin that believes in ``knees`` predicts (a knee below 1: the tier holds nobody)."""
    return {tier: TierCapacity(tier, CapacityStatus.FOUND, round(knee), round(knee) + 1) if knee >= 1 else
            TierCapacity(tier, CapacityStatus.NONE_PASSED, None, 1) for tier, knee in knees.items()}


def answers(search: CapacitySearch) -> dict[str, tuple]:
    return {tier: (cap.status, cap.agents, cap.first_failing_agents) for tier, cap in search.capacity().items()}


@pytest.mark.parametrize("off_by", [1.0, 0.5, 2.0, 0.7, 1.4])
def test_the_search_from_a_prediction_reaches_the_same_answer_in_fewer_steps(off_by):
    baseline = CapacitySearch(list(KNEES), start_agents=1, max_agents=256)
    without = drive(baseline, KNEES)
    search = CapacitySearch(list(KNEES), start_agents=1, max_agents=256,
                            predicted=prediction_of({tier: knee * off_by for tier, knee in KNEES.items()}))
    first_phase = search.phase
    steps = drive(search, KNEES)
    assert answers(search) == answers(baseline)
    assert answers(search)["loose"] == (CapacityStatus.FOUND, 29, 30)
    assert steps[0] == round(KNEES["loose"] * off_by) and first_phase == "predict"
    if off_by in (1.0, 0.5, 2.0):
        assert len(steps) < len(without), (steps, without)
    else:  # a twin 30-40 % off: never more steps than without it
        assert len(steps) <= len(without), (steps, without)
    if off_by == 1.0:  # a right twin: each tier verified in two steps, nothing else measured
        assert sorted(steps) == [1, 2, 8, 9, 29, 30]


@pytest.mark.parametrize("predicted_knees", [{"loose": 200, "mid": 150, "strict": 100}, {"loose": 0, "mid": 0,
                                                                                          "strict": 0}])
def test_a_prediction_wrong_by_far_still_finds_the_answer(predicted_knees):
    search = CapacitySearch(list(KNEES), start_agents=1, max_agents=256, predicted=prediction_of(predicted_knees))
    drive(search, KNEES)
    assert answers(search) == answers(drive_plain())


def drive_plain() -> CapacitySearch:
    search = CapacitySearch(list(KNEES), start_agents=1, max_agents=256)
    drive(search, KNEES)
    return search


def test_a_tier_that_never_fails_is_capped_at_max_agents_from_a_prediction():
    search = CapacitySearch(["loose"], start_agents=1, max_agents=40, predicted=prediction_of({"loose": 30}))
    steps = drive(search, {"loose": 1000})
    assert search.capacity()["loose"].status is CapacityStatus.NEVER_FAILED and steps[-1] == 40


@pytest.fixture(scope="module")
def demo_truth():
    """The ground truth's search on the bundled L4 profile and demo set, short windows (under a second)."""
    parser = argparse.ArgumentParser()
    truth.add_arguments(parser)
    args = parser.parse_args(["--profile", "l4-llama3.2-3b", "--trajectories", "demo", "--warmup-s", "5",
                              "--window-s", "15"])
    inputs = (load_profile(args.profile), load_trajectories(args.trajectories, args.trajectory_format),
              load_slo(None), SearchParameters.from_options(args), replay.ReplaySettings.from_options(args))
    return inputs, truth.find_capacity(*inputs)


def test_the_truths_search_from_its_own_prediction_verifies_it_in_fewer_steps(demo_truth):
    inputs, plain = demo_truth
    started = truth.find_capacity(*inputs, predicted=plain.capacity, twin_margins=predicted.margin_curve(plain.steps))
    assert started.capacity == plain.capacity
    assert len(started.steps) < len(plain.steps)
    assert sorted(step.agents for step in started.steps) == sorted(  # each tier's knee and the count past it
        {count for cap in plain.capacity.values() for count in (cap.agents, cap.first_failing_agents) if count})
    assert started.steps[0].agents == plain.capacity["aa-20tps"].agents


@pytest.mark.parametrize("off_by", [0.5, 2.0])
def test_the_truths_search_from_a_prediction_off_by_2x_finds_the_same_answer(demo_truth, off_by):
    inputs, plain = demo_truth
    wrong = {name: replace(cap, agents=max(1, round(cap.agents * off_by)),
                           first_failing_agents=max(1, round(cap.agents * off_by)) + 1) if cap.agents else cap
             for name, cap in plain.capacity.items()}
    assert truth.find_capacity(*inputs, predicted=wrong).capacity == plain.capacity


def test_predict_is_the_truths_search_on_the_twin(demo_truth):
    (profile, trajectories, spec, params, settings), plain = demo_truth
    prediction = predicted.predict("l4-llama3.2-3b", trajectories, spec, params, settings)
    assert prediction.capacity == plain.capacity and prediction.load_steps == len(plain.steps)
    assert prediction.to_dict()["capacity"]["aa-20tps"]["agents"] == plain.capacity["aa-20tps"].agents
    first = plain.steps[0].verdict.tiers[0]  # the twin's margins, which steer the live search, are kept
    assert prediction.to_dict()["margins"][str(plain.steps[0].agents)][first.tier.name] == round(first.margin, 4)


def test_a_repeated_prediction_is_the_median_search_with_the_mean_margins(demo_truth):
    """``--predict-repeats 3``: three searches at seeds 0-2; per tier the lower-median search's answer and
    the range, and the margin curve each count's mean over the searches that measured it."""
    (profile, trajectories, spec, params, settings), plain = demo_truth
    alone = [predicted.predict("l4-llama3.2-3b", trajectories, spec, params, replace(settings, seed=seed))
             for seed in (0, 1, 2)]
    repeated = predicted.predict("l4-llama3.2-3b", trajectories, spec, params, settings, repeats=3)
    assert repeated.repeats == 3 and repeated.load_steps == sum(p.load_steps for p in alone)
    for tier in repeated.capacity:
        counts = sorted((p.capacity[tier].agents or 0, i) for i, p in enumerate(alone))
        assert repeated.capacity[tier] == alone[counts[1][1]].capacity[tier]
        assert repeated.ranges[tier] == (counts[0][0], counts[-1][0])
        assert repeated.to_dict()["capacity"][tier]["range"] == [counts[0][0], counts[-1][0]]
    assert len({p.capacity["aa-20tps"].agents for p in alone}) > 1  # the seeds draw different searches
    shared = set.intersection(*(set(p.margins) for p in alone))
    assert shared
    for agents in shared:
        assert repeated.margins[agents]["aa-20tps"] == pytest.approx(
            sum(p.margins[agents]["aa-20tps"] for p in alone) / 3)


def test_a_speed_spread_prediction_runs_the_searches_on_slowed_and_sped_servers(demo_truth):
    """``--predict-repeats 3 --predict-speed-spread 0.5``: the searches at seeds 0-2 on the twin's profile
    exp(0.5 z) times as slow (z = 0, -0.97, 0.97: 1, 0.62, 1.62); the first is the unspread search at the
    run's seed, the faster server holds more agents than the same seed's unspread search, the slower one
    fewer; the report's words say which servers the range was searched on."""
    (profile, trajectories, spec, params, settings), plain = demo_truth
    alone = [predicted.predict("l4-llama3.2-3b", trajectories, spec, params, replace(settings, seed=seed))
             for seed in (0, 1, 2)]
    spread = predicted.predict("l4-llama3.2-3b", trajectories, spec, params, settings, repeats=3, speed_spread=0.5)
    assert spread.speed_factors == pytest.approx((1.0, math.exp(-0.5 * 0.9674), math.exp(0.5 * 0.9674)), rel=1e-3)
    assert spread.to_dict()["speed_factors"] == [round(factor, 4) for factor in spread.speed_factors]
    middle, fast, slow = [
        truth.find_capacity(profile.slower(factor) if factor != 1 else profile, trajectories, spec, params,
                            replace(settings, seed=seed)).capacity["aa-20tps"].agents or 0
        for seed, factor in zip((0, 1, 2), spread.speed_factors)]
    unspread = [p.capacity["aa-20tps"].agents or 0 for p in alone]
    assert (middle == unspread[0], fast > unspread[1], slow < unspread[2]) == (True, True, True), (middle, fast, slow)
    assert spread.ranges["aa-20tps"] == (min(middle, fast, slow), max(middle, fast, slow))
    tier = spread.to_dict()["capacity"]["aa-20tps"]
    assert tier["range_slower"] == [0.62, 1.62] and tier["range"] == list(spread.ranges["aa-20tps"])
    low, high = spread.ranges["aa-20tps"]
    assert predicted_words(tier).endswith(f"; the twin's searches found {low}-{high} on servers 0.62-1.62x as slow")


def agentperf(*args: str, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentperf_users.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.mark.parametrize("content", [None, "gpu: [not, a, mapping\n", "gpu: {name: x}\n"])
def test_a_bad_prediction_profile_is_one_line_and_starts_nothing(tmp_path, content):
    profile = tmp_path / "twin.yaml"
    if content is not None:
        profile.write_text(content)
    out = tmp_path / "run"
    done = agentperf("capacity", "--predict", str(profile), "--out", str(out), timeout_s=60)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "--predict" in done.stderr and "twin" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists() and "run folder" not in done.stdout


@pytest.mark.parametrize("given, expected", [
    (["--predict-speed-spread", "0.2"], "--predict-speed-spread: needs --predict-repeats 2 or more"),
    (["--predict-repeats", "4", "--predict-speed-spread", "1.5"], "--predict-speed-spread"),
    (["--predict-repeats", "4", "--predict-speed-spread", "wide"], "--predict-speed-spread")])
def test_a_bad_prediction_speed_spread_is_one_line_and_starts_nothing(tmp_path, given, expected):
    out = tmp_path / "run"
    done = agentperf("capacity", "--predict", "l4-llama3.2-3b", *given, "--out", str(out), timeout_s=60)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_capacity_starts_at_the_predicted_knee_and_reports_predicted_against_measured(tmp_path):
    slo = tmp_path / "slo.yaml"
    slo.write_text("tiers:\n  - {name: aa-20tps, ttft_max_s: 10, output_tps_min: 20, scope: request}\n")
    out = tmp_path / "run"
    done = agentperf("capacity", "--profile", "l4-llama3.2-3b", "--predict", "l4-llama3.2-3b", "--trajectories",
                     "demo", "--max-agents", "24", "--warmup-s", "2", "--window-s", "6", "--workers", "1",
                     "--no-truth", "--slo", str(slo), "--out", str(out), "--predict-repeats", "3",
                     "--predict-speed-spread", "0.1", timeout_s=170)
    report = json.loads((out / "report.json").read_text())
    state = json.loads((out / "search.json").read_text())
    tier = report["prediction"]["tiers"]["aa-20tps"]
    knee = state["prediction"]["capacity"]["aa-20tps"]["agents"]
    assert tier["predicted"]["agents"] == knee and tier["measured"] == {
        key: report["capacity"]["aa-20tps"][key] for key in ("status", "agents", "first_failing_agents")}
    assert report["steps"][0]["agents"] == knee == report["prediction"]["first_step_agents"], done.stdout
    assert report["steps"][0]["phase"] == "predict"
    assert tier["measured_over_predicted"] == pytest.approx(report["capacity"]["aa-20tps"]["agents"] / knee)
    low, high = state["prediction"]["capacity"]["aa-20tps"]["range"]  # the median of three searches, and their range
    assert state["prediction"]["repeats"] == 3 and tier["predicted"]["range"] == [low, high] and low <= knee <= high
    line = next(line for line in done.stdout.splitlines() if line.startswith("predicted @ 20 tok/s"))
    found = f"; the twin's searches found {low}" + ("" if low == high else f"-{high}")
    assert f"{found} on servers 0.91-1.10x as slow, measured " in line, line
    assert len(state["prediction"]["speed_factors"]) == 3 and tier["predicted"]["range_slower"] == [0.91, 1.1]
    assert done.returncode in (0, 3), done.stdout + done.stderr
    rebuilt = agentperf("report", str(out), timeout_s=60)
    assert json.loads((out / "report.json").read_text())["prediction"] == report["prediction"], rebuilt.stderr


KNEE_CROSSINGS = {"loose": 29.4, "mid": 8.6, "strict": 1.5}  # capacity 29, 8 and 1


def speed_margins(crossings: dict[str, float]):
    """A monotone margin curve per tier, as a speed ratio falls with agents: ln(crossing / agents)."""
    return lambda tier, agents: math.log(crossings[tier] / agents)


def drive_margins(search: CapacitySearch, margin_of) -> tuple[list[int], dict[int, dict[str, float]]]:
    """Run the policy against ``margin_of(tier, agents)`` (each tier passes while its margin is >= 0): the
    counts it measured, in order, and the margins it saw (a twin's curve, when ``search`` ran on a twin)."""
    measured, seen = [], {}
    while (agents := search.next_agents()) is not None:
        assert agents not in measured and 1 <= agents <= 256, measured
        seen[agents] = {tier: margin_of(tier, agents) for tier in KNEE_CROSSINGS}
        measured.append(agents)
        search.record_verdict(agents, margin_verdict(seen[agents]))
        assert len(measured) < 60
    return measured, seen


def twin_prediction(margin_of) -> tuple[dict[str, TierCapacity], dict[int, dict[str, float]]]:
    """What ``predicted.predict`` gives for a twin whose curve is ``margin_of``: its search's answer and margins."""
    twin = CapacitySearch(list(KNEE_CROSSINGS), start_agents=1, max_agents=256)
    _, margins = drive_margins(twin, margin_of)
    return twin.capacity(), margins


@pytest.mark.parametrize("off_by", [0.6, 0.8, 1.2, 1.4])
def test_a_twin_off_by_20_to_40_percent_is_steered_by_its_margins_to_the_same_answer_in_fewer_steps(off_by):
    """The measured margin set against the twin's at the same count says how far off the twin is (a step
    cost off by a factor shifts every speed margin by its log), so the search moves to the knee instead of
    widening blindly: at most two steps per tier more than a right twin's two."""
    search, steps, without, capacity = off_twin_search(off_by)
    assert answers(search)["loose"] == (CapacityStatus.FOUND, 29, 30)
    assert steps[0] == capacity["loose"].agents
    assert len(steps) < len(without) and len(steps) <= 2 * len(KNEE_CROSSINGS) + 4, (steps, without)
    counts_only = CapacitySearch(list(KNEE_CROSSINGS), 1, 256, predicted=capacity)
    assert len(steps) <= len(drive_margins(counts_only, speed_margins(KNEE_CROSSINGS))[0])


@pytest.mark.parametrize("off_by", [0.1, 8.0])
def test_a_twin_wrong_by_far_costs_a_few_steps_more_than_none_at_most(off_by):
    _, steps, without, _ = off_twin_search(off_by)
    assert len(steps) <= len(without) + 3, (steps, without)


def off_twin_search(off_by: float) -> tuple[CapacitySearch, list[int], list[int], dict]:
    """The search from a twin whose knees are ``off_by`` times the server's, driven by the server's margins:
    (the search, its steps, the unpredicted search's steps, the prediction), its answer checked equal to
    the unpredicted one's."""
    server = speed_margins(KNEE_CROSSINGS)
    baseline = CapacitySearch(list(KNEE_CROSSINGS), start_agents=1, max_agents=256)
    without, _ = drive_margins(baseline, server)
    capacity, margins = twin_prediction(speed_margins({t: c * off_by for t, c in KNEE_CROSSINGS.items()}))
    search = CapacitySearch(list(KNEE_CROSSINGS), 1, 256, predicted=capacity, twin_margins=margins)
    steps, _ = drive_margins(search, server)
    assert answers(search) == answers(baseline)
    return search, steps, without, capacity


def test_margins_that_mislead_still_reach_the_verdicts_answer():
    """Margins whose size is noise (only their sign is right), on the server and on the twin: the
    safeguards (a miss widens geometrically, a bracket halves) bound the cost, and verdicts alone decide."""
    rng = random.Random(7)
    for trial in range(10):
        noise = {n: rng.uniform(0.01, 3.0) for n in range(1, 257)}

        def noisy(tier: str, agents: int, scale: float = 1.0) -> float:
            return noise[agents] if agents <= KNEE_CROSSINGS[tier] * scale else -noise[agents]

        without, _ = drive_margins(CapacitySearch(list(KNEE_CROSSINGS), 1, 256), noisy)
        capacity, margins = twin_prediction(lambda tier, agents: noisy(tier, agents, 1.3))
        search = CapacitySearch(list(KNEE_CROSSINGS), 1, 256, predicted=capacity, twin_margins=margins)
        steps, _ = drive_margins(search, noisy)
        assert {t: c.agents for t, c in search.capacity().items()} == {"loose": 29, "mid": 8, "strict": 1}, trial
        assert len(steps) <= 2 * len(without), (trial, steps, without)


def test_a_margin_curve_crosses_zero_where_it_last_falls_below():
    curve = [(1, 0.8), (2, -0.1), (4, 0.3), (8, -0.3)]  # a dip at 2 agents that recovers, as batches fill
    assert last_crossing(curve, 0.0) == pytest.approx(4 * 2 ** 0.5)  # half way from 4 to 8 in log agents
    assert last_crossing(curve, 1.0) > 8 and margin_at(curve, 16) < margin_at(curve, 8)  # along its mean slope
    assert last_crossing(curve, -1.0) == 0.5  # below its first point
    assert last_crossing([(4, 0.3)], 0.0) is None and margin_at([(4, 0.3)], 8) == 0.3  # one point: no slope

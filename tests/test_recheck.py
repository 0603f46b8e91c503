"""``--recheck``: after the search located its tiers, the first tier's capacity and first failing count
are measured once more (``policy``); the repeat widens the rerun spread where it disagrees and the
report states how far the server's speed moved between the two (``spread``, ``report.build``)."""

from __future__ import annotations

import argparse
import html
import json

import pytest

from agentperf_users.cli import capacity as capacity_cli
from agentperf_users.cli.main import build_parser
from agentperf_users.search import predicted, truth
from agentperf_users.search.policy import RECHECK, CapacitySearch, CapacityStatus, SearchParameters, TierCapacity
from agentperf_users.search.spread import Drift, capacity_drift, capacity_spread, drift_words
from agentperf_users.report.build import capacity_lines
from tests.runs import SLOW, make_run
from tests.test_shape import drive as shape_drive
from tests.test_shape import shape_environment, verdict
from tests.simulator import custom_profile, write_profile
from tests.test_truth import MAX_NUM_SEQS, NO_WAIT, search_params, slo, trajectories  # noqa: F401 (fixtures)

CAPACITIES = {"loose": 37, "strict": 12}


def drive(search: CapacitySearch, passes) -> list[tuple[int, str]]:
    """Every (count, phase) the search measures, each verdict ``passes(tier, agents, phase)``."""
    measured = []
    while (agents := search.next_agents()) is not None:
        phase = search.phase
        measured.append((agents, phase))
        search.record_verdict(agents, verdict(**{tier: passes(tier, agents, phase) for tier in CAPACITIES}))
        assert len(measured) < 100
    return measured


def monotone(tier: str, agents: int, phase: str) -> bool:
    return agents <= CAPACITIES[tier]


def answers(search: CapacitySearch) -> dict:
    return {tier: (cap.status, cap.agents, cap.first_failing_agents) for tier, cap in search.capacity().items()}


def test_the_first_tiers_capacity_and_first_failing_count_are_measured_again_after_the_search():
    plain = CapacitySearch(list(CAPACITIES), start_agents=1, max_agents=256)
    without = drive(plain, monotone)
    search = CapacitySearch(list(CAPACITIES), start_agents=1, max_agents=256, recheck=True)
    measured = drive(search, monotone)
    assert measured == without + [(37, RECHECK), (38, RECHECK)]  # loose, the first tier: passes at 37, fails at 38
    assert RECHECK not in {phase for _, phase in without}
    assert answers(search) == answers(plain) and search.done


@pytest.mark.parametrize("flip", [37, 38])
def test_a_recheck_that_contradicts_the_first_verdict_does_not_move_the_answer(flip):
    """The first verdict at a count decides the bracket, so the answer stays a function of the first
    verdicts (the ground truth, whose repeat is identical, makes the same decisions); the contradiction
    goes to the spread instead."""
    def drifting(tier: str, agents: int, phase: str) -> bool:
        return (not monotone(tier, agents, phase)) if phase == RECHECK and agents == flip else monotone(tier, agents, phase)

    search = CapacitySearch(list(CAPACITIES), start_agents=1, max_agents=256, recheck=True)
    measured = drive(search, drifting)
    assert measured[-2:] == [(37, RECHECK), (38, RECHECK)]
    assert answers(search)["loose"] == (CapacityStatus.FOUND, 37, 38)
    assert search.bracket("loose") == (37, 38)


@pytest.mark.parametrize(("capacities", "rechecked"), [
    ({"loose": 0, "strict": 0}, [1]),  # none passed: only the first failing count
    ({"loose": 1000, "strict": 12}, [64]),  # never failed up to --max-agents: only the maximum
])
def test_a_tier_without_a_pass_or_a_fail_rechecks_the_count_it_has(capacities, rechecked, monkeypatch):
    monkeypatch.setitem(CAPACITIES, "loose", capacities["loose"])
    monkeypatch.setitem(CAPACITIES, "strict", capacities["strict"])
    search = CapacitySearch(list(CAPACITIES), start_agents=4, max_agents=64, recheck=True)
    measured = drive(search, monotone)
    assert [agents for agents, phase in measured if phase == RECHECK] == rechecked
    assert search.done


def test_a_search_started_from_a_prediction_rechecks_too():
    predicted = {"loose": TierCapacity("loose", CapacityStatus.FOUND, 37, 38),
                 "strict": TierCapacity("strict", CapacityStatus.FOUND, 12, 13)}
    search = CapacitySearch(list(CAPACITIES), start_agents=1, max_agents=256, predicted=predicted, recheck=True)
    measured = drive(search, monotone)
    assert measured[0] == (37, "predict") and measured[-2:] == [(37, RECHECK), (38, RECHECK)]
    assert [phase for _, phase in measured].count(RECHECK) == 2 and answers(search)["strict"][1:] == (12, 13)


def test_recheck_auto_is_on_against_a_server_and_off_on_a_virtual_clock():
    """``--recheck auto``: the live search (the shape) measures a server; the ground truth and a
    prediction (``from_options`` without ``live``) run an engine whose speed cannot drift."""
    parsed = build_parser().parse_args(["truth"])
    assert parsed.recheck == "auto"
    assert SearchParameters.from_options(parsed, live=True).recheck is True
    assert SearchParameters.from_options(parsed).recheck is False
    for mode, expected in (("on", True), ("off", False)):
        given = argparse.Namespace(**{**vars(parsed), "recheck": mode})
        assert SearchParameters.from_options(given).recheck is expected
        assert SearchParameters.from_options(given, live=True).recheck is expected


@pytest.mark.parametrize(("argv", "handed"), [
    (["--host", "http://127.0.0.1:9"], "on"), ([], "off"),  # a server; the embedded simulator
    (["--recheck", "on"], "on"), (["--host", "http://127.0.0.1:9", "--recheck", "off"], "off")])
def test_capacity_hands_its_master_a_decided_recheck(argv, handed):
    args = build_parser().parse_args(["capacity", *argv])
    capacity_cli.decide_recheck(args)
    command = capacity_cli._locust_command(args, "http://127.0.0.1:9", capacity_cli.Path("/tmp/run"), "m")
    assert command[command.index("--recheck") + 1] == handed


def test_the_live_search_rechecks_against_a_server(tmp_path):
    """The shape (``--recheck auto`` under Locust: a server) measures the rechecks as steps of their own,
    judged like any other, and its answer is the one without them."""
    environment, shape, clock = shape_environment(tmp_path, early_stop=False, recheck="auto")
    shape_drive(environment, shape, clock)
    assert [(s.agents, s.phase) for s in shape.steps] == [
        (2, "step"), (4, "step"), (6, "step"), (5, "bisect"), (3, "bisect"), (4, RECHECK), (5, RECHECK)]
    assert [s.verdict.tier("loose").passed for s in shape.steps[-2:]] == [True, False]  # as the first time
    assert {t: c.agents for t, c in shape.capacity().items()} == {"loose": 4, "strict": 2}
    environment.events.test_stop.fire(environment=environment)
    summary = json.loads((tmp_path / "capacity.json").read_text())
    assert summary["complete"] and summary["parameters"]["recheck"] is True
    assert [step["phase"] for step in summary["steps"]][-2:] == [RECHECK, RECHECK]


def test_the_ground_truth_rechecks_as_the_live_search_does(tmp_path, trajectories, slo):
    """On the virtual clock a recheck is a second identical step: the same verdict, so no drift, and the
    live run's steps, rechecks included, each get their twin (``measure_steps``, the report's same_steps)."""
    profile = custom_profile(tmp_path, {"engine.max_num_seqs": MAX_NUM_SEQS})
    plain = truth.find_capacity(profile, trajectories, slo, search_params(), NO_WAIT)
    params = search_params(recheck=True)
    rechecked = truth.find_capacity(profile, trajectories, slo, params, NO_WAIT)
    first = {step.agents: step.verdict for step in plain.steps}
    assert [s.agents for s in rechecked.steps] == [s.agents for s in plain.steps] + [MAX_NUM_SEQS, MAX_NUM_SEQS + 1]
    for step in rechecked.steps[-2:]:  # equal but for float rounding at later clock times
        (again,), (once,) = step.verdict.tiers, first[step.agents].tiers
        assert (again.passed, again.requests, again.margin) == (once.passed, once.requests, pytest.approx(once.margin))
    assert rechecked.capacity == plain.capacity
    twins = truth.measure_steps(profile, trajectories, slo, params, [(s.agents, None) for s in rechecked.steps],
                                NO_WAIT)
    assert [(s.agents, s.verdict.passed) for s in twins] == [(s.agents, s.verdict.passed) for s in rechecked.steps]


def test_a_prediction_of_a_rechecking_live_search_is_not_rechecked(tmp_path, trajectories, slo):
    """``capacity --predict`` against a server hands the twin its own (rechecking) options: the twin's
    virtual clock does not drift, so its search stops where the plain truth's does."""
    path = write_profile(tmp_path, {"engine.max_num_seqs": MAX_NUM_SEQS})
    plain = truth.find_capacity(custom_profile(tmp_path, {"engine.max_num_seqs": MAX_NUM_SEQS}), trajectories, slo,
                                search_params(), NO_WAIT)
    prediction = predicted.predict(str(path), trajectories, slo, search_params(recheck=True), NO_WAIT)
    assert prediction.load_steps == len(plain.steps) and prediction.capacity == plain.capacity


CLEAR = 0.1  # a margin well past STABLE_MARGIN
FOUND = {"status": "found", "agents": 10, "first_failing_agents": 11}
SEARCHED = [(4, 1.0, CLEAR), (8, 1.0, CLEAR), (16, 0.0, -CLEAR), (12, 0.0, -CLEAR), (10, 1.0, CLEAR), (11, 0.0, -CLEAR)]


@pytest.mark.parametrize(("rechecks", "expected"), [
    ([(10, 1.0, CLEAR), (11, 0.0, -CLEAR)], (10, 10)),  # both agree: a rerun lands here too
    ([(10, 0.0, -CLEAR), (11, 0.0, -CLEAR)], (8, 10)),  # the capacity failed at its recheck: back to 8
    ([(10, 1.0, CLEAR), (11, 1.0, CLEAR)], (10, 11)),  # the first failing count passed: up to below 12
    ([(10, 1.0, 0.01), (11, 0.0, -CLEAR)], (8, 10)),  # passed again, but too close to its limit to hold
])
def test_a_count_measured_twice_is_stable_only_when_both_measurements_are(rechecks, expected):
    assert capacity_spread(SEARCHED + rechecks, FOUND).to_dict() == {"low": expected[0], "high": expected[1]}


def test_a_recheck_is_set_beside_the_first_measurement_of_its_count():
    steps = [(0, 4, "step", 0.5), (1, 8, "step", -0.2), (2, 6, "bisect", 0.05), (3, 7, "bisect", "-inf"),
             (4, 6, RECHECK, -0.1), (5, 7, RECHECK, -0.3)]
    drifts = capacity_drift(steps)
    assert [(d.agents, d.steps, d.margins) for d in drifts] == [(6, (2, 4), (0.05, -0.1)), (7, (3, 5), ("-inf", -0.3))]
    assert drifts[0].change == pytest.approx(-0.15) and drifts[1].change is None  # no number to subtract from
    assert drifts[0].speed_change == pytest.approx(-0.1393, abs=1e-4)  # exp(-0.15) - 1
    assert capacity_drift(steps[:4]) == []  # nothing rechecked


@pytest.mark.parametrize(("changes", "words"), [
    ([], ""),
    ([(8, -0.51), (9, 0.1)], "the server's speed moved -40 % between two measurements of 8 agents"),
    ([(8, 0.1), (9, -0.51)], "the server's speed moved -40 % between two measurements of 9 agents"),
    ([(8, 0.005)], "the server's speed held within 1 % between two measurements of 8 agents"),
    ([(8, None)], ""),
    ([(16, -0.51), (9, 0.1)], "the server's speed moved +11 % between two measurements of 9 agents"),  # 16: not its own
])
def test_the_largest_drift_at_the_tiers_own_counts_is_worded_once(changes, words):
    drifts = [Drift(agents, (0, 1), (0.0, change), change).to_dict() for agents, change in changes]
    assert drift_words({"status": "found", "agents": 8, "first_failing_agents": 9, "drift": drifts}) == words


@pytest.mark.parametrize(("recheck_speed", "spread", "words"), [
    (0.8, {"low": 4, "high": 7},
     "a rerun may land at 4–7; the server's speed moved -20 % between two measurements of 7 agents"),
    (1.0, {"low": 7, "high": 7},
     "a rerun lands here too; the server's speed held within 1 % between two measurements of 7 agents"),
])
def test_the_report_of_a_run_folder_states_the_drift(tmp_path, recheck_speed, spread, words):
    """A server that holds 7 agents at 20 tok/s (21.5 tok/s there, 18 at 8: ``tests.runs.SLOW``), searched
    2, 4, 8, 7, 1, then 7 and 8 again: served 20 % slower at the rechecks, 7 fails, and the spread goes back
    to the stable pass below it (4); at the same speed nothing moves."""
    report = make_run(tmp_path / "run", SLOW, recheck_speed=recheck_speed)
    assert [(step["agents"], step["phase"]) for step in report["steps"]][-2:] == [(7, RECHECK), (8, RECHECK)]
    cap = report["capacity"]["aa-20tps"]
    assert (cap["agents"], cap["first_failing_agents"], cap["spread"]) == (7, 8, spread)  # the first verdicts decide
    first = {step["agents"]: step["index"] for step in report["steps"][:-2]}
    assert [(d["agents"], d["steps"]) for d in cap["drift"]] == [(7, [first[7], 5]), (8, [first[8], 6])]
    for drift in cap["drift"]:
        assert drift["change"] == pytest.approx(drift["margins"][1] - drift["margins"][0])
        assert drift["speed_change"] == pytest.approx(recheck_speed - 1, abs=1e-9)
    lines = capacity_lines(report)
    assert f"capacity @ 20 tok/s, TTFT ≤ 10 s: 7 agents (fails at 8; {words})" in lines
    assert "capacity @ 60 tok/s, TTFT ≤ 5 s: none (fails already at 1 agent; a rerun lands here too)" in lines
    assert report["capacity"]["example-60tps"]["drift"][0]["agents"] == 7  # its numbers there, not its headline's
    assert html.escape(words[0].upper() + words[1:]) in (tmp_path / "run" / "report.html").read_text()


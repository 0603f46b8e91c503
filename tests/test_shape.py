"""The capacity search: its decisions on scripted verdicts (``search``), and the shape's tick loop on
a real LocalRunner driven by a controlled clock (``shape``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time

import pytest
from locust import User, argument_parser, constant
from locust.env import Environment
from locust.event import Events

from agentperf_users.measure import aggregate
from agentperf_users.measure.slo import SloTier, StepVerdict, TierVerdict
from agentperf_users.search.policy import (
    CapacitySearch,
    CapacityStatus,
    SearchParameters,
    window_end,
)
from agentperf_users.search.shape import STOP_RATE, CapacitySearchShape, format_step
from tests.support import install_agentperf
from tests.test_slo import record


def verdict(**passed: bool) -> StepVerdict:
    """A step verdict with the given pass/fail per tier (numbers are irrelevant to the search)."""
    return StepVerdict(
        tuple(
            TierVerdict(SloTier(name, 1.0, 1.0), ok, 1, 0, 0.0, 1.0, 1.0, None, None, None, () if ok else ("x",))
            for name, ok in passed.items()
        )
    )


def run_search(search: CapacitySearch, true_capacity: dict[str, int]) -> list[int]:
    """Drive the search against tiers that pass exactly up to their true capacity."""
    measured = []
    while (agents := search.next_agents()) is not None:
        assert agents not in measured, "a count is never measured twice"
        measured.append(agents)
        search.record_verdict(agents, verdict(**{t: agents <= cap for t, cap in true_capacity.items()}))
        assert len(measured) < 100
    return measured


def test_steps_up_by_factor_until_every_tier_failed_then_bisects_each():
    search = CapacitySearch(["loose", "strict"], start_agents=1, max_agents=256, step_factor=2.0)
    measured = run_search(search, {"loose": 37, "strict": 12})
    assert measured[:7] == [1, 2, 4, 8, 16, 32, 64]  # strict fails at 16, loose at 64: phase 1 ends
    assert measured[7:] == [48, 40, 36, 38, 37, 12, 14, 13]  # loose in (32, 64), then strict in (8, 16)
    capacity = search.capacity()
    assert (capacity["loose"].status, capacity["loose"].agents, capacity["loose"].first_failing_agents) == (
        CapacityStatus.FOUND, 37, 38)
    assert (capacity["strict"].agents, capacity["strict"].first_failing_agents) == (12, 13)
    assert search.done


def test_bisection_reuses_counts_measured_for_another_tier():
    search = CapacitySearch(["a", "b"], start_agents=10, max_agents=100, step_agents=10)
    measured = run_search(search, {"a": 25, "b": 24})
    assert measured[:3] == [10, 20, 30]
    # a bisects (20, 30): 25 pass, 27 fail, 26 fail; b's bracket is already (20, 25) and then (24, 25).
    assert measured[3:] == [25, 27, 26, 22, 23, 24]
    assert {t: c.agents for t, c in search.capacity().items()} == {"a": 25, "b": 24}


def test_resolution_stops_bisection_early():
    search = CapacitySearch(["a"], start_agents=8, max_agents=1000, resolution_agents=8, step_factor=2.0)
    run_search(search, {"a": 100})
    capacity = search.capacity()["a"]
    assert capacity.status is CapacityStatus.FOUND
    assert capacity.agents <= 100 < capacity.first_failing_agents <= capacity.agents + 8


def test_tier_failing_at_the_start_bisects_down_to_one_agent():
    search = CapacitySearch(["a", "b"], start_agents=8, max_agents=64, step_factor=2.0)
    measured = run_search(search, {"a": 0, "b": 20})
    assert 1 in measured and 4 in measured and 2 in measured
    capacity = search.capacity()
    assert (capacity["a"].status, capacity["a"].agents, capacity["a"].first_failing_agents) == (
        CapacityStatus.NONE_PASSED, None, 1)
    assert capacity["b"].agents == 20


def test_tier_never_failing_is_distinguishable_from_found():
    search = CapacitySearch(["a", "b"], start_agents=4, max_agents=50, step_factor=2.0)
    measured = run_search(search, {"a": 1000, "b": 10})
    assert max(measured) == 50 and measured[:5] == [4, 8, 16, 32, 50]  # the last step is --max-agents
    capacity = search.capacity()
    assert (capacity["a"].status, capacity["a"].agents, capacity["a"].first_failing_agents) == (
        CapacityStatus.NEVER_FAILED, 50, None)
    assert capacity["b"].status is CapacityStatus.FOUND


def test_non_monotone_verdicts_use_the_first_failure():
    search = CapacitySearch(["a", "b"], start_agents=10, max_agents=100, step_agents=10)
    for agents, a, b in [(10, True, True), (20, False, True), (30, True, True), (40, False, False)]:
        assert search.next_agents() == agents
        search.record_verdict(agents, verdict(a=a, b=b))
    assert search.bracket("a") == (10, 20)
    assert search.next_agents() == 15


def test_incomplete_search_and_undecided_tiers():
    search = CapacitySearch(["a", "b"], start_agents=10, max_agents=100, step_agents=10)
    search.record_verdict(10, verdict(a=True, b=True))
    search.record_verdict(20, verdict(a=True, b=False))
    assert search.stepping and search.undecided_tiers(30) == ("a",)
    assert search.undecided_tiers(15) == ("b",)
    assert {c.status for c in search.capacity().values()} == {CapacityStatus.INCOMPLETE}


def margin_verdict(margins: dict[str, float]) -> StepVerdict:
    """A step verdict whose tiers pass exactly when their margin is >= 0, as ``slo.evaluate`` makes them."""
    return StepVerdict(tuple(
        TierVerdict(SloTier(name, 1.0, 1.0), m >= 0, 1, 0, 0.0, 1.0, 1.0, None, None, None, () if m >= 0 else ("x",), m)
        for name, m in margins.items()
    ))


def run_guided(search: CapacitySearch, margin_of) -> list[int]:
    """Drive the search with ``margin_of(tier, agents)``: each tier passes while its margin is >= 0."""
    measured = []
    while (agents := search.next_agents()) is not None:
        assert agents not in measured and 1 <= agents <= search._max
        measured.append(agents)
        search.record_verdict(agents, margin_verdict({t: margin_of(t, agents) for t in ("loose", "strict")}))
        assert len(measured) < 100
    return measured


CROSSINGS = {"loose": 37.4, "strict": 12.6}  # capacity 37 and 12
MARGIN_SHAPES = {
    "linear": lambda tier, n: 0.05 * (CROSSINGS[tier] - n),
    "log": lambda tier, n: math.log(CROSSINGS[tier] / n),  # convex, like a speed ratio
    "cliff": lambda tier, n: 0.3 if n <= CROSSINGS[tier] else -3.0 * (n - CROSSINGS[tier]),  # flat, then a queue
}


@pytest.mark.parametrize("shape", MARGIN_SHAPES)
def test_guided_search_finds_the_same_capacity(shape):
    margin_of = MARGIN_SHAPES[shape]
    counts = {}
    for guided in (True, False):
        search = CapacitySearch(["loose", "strict"], start_agents=1, max_agents=256, guided=guided)
        counts[guided] = run_guided(search, margin_of)
        assert {t: (c.status, c.agents, c.first_failing_agents) for t, c in search.capacity().items()} == {
            "loose": (CapacityStatus.FOUND, 37, 38), "strict": (CapacityStatus.FOUND, 12, 13)}
    saved = {"linear": 2, "log": 1, "cliff": -len(counts[False])}[shape]  # a flat margin says nothing about
    assert len(counts[True]) <= len(counts[False]) - saved  # distance: it may cost, within the 2x safeguard


def test_misleading_margins_cost_at_most_twice_the_bisection():
    """Margins whose size is noise (only their sign is right) must not stall the search: each tier's
    bracket still at least halves every two steps, and verdicts alone decide the answer."""
    rng = random.Random(5)
    for trial in range(20):
        noise = {n: rng.uniform(0.01, 5.0) for n in range(1, 257)}

        def noisy(tier: str, n: int) -> float:
            return noise[n] if n <= CROSSINGS[tier] else -noise[n]

        plain = run_guided(CapacitySearch(["loose", "strict"], 1, 256, guided=False), noisy)
        search = CapacitySearch(["loose", "strict"], 1, 256, guided=True)
        guided = run_guided(search, noisy)
        assert {t: c.agents for t, c in search.capacity().items()} == {"loose": 37, "strict": 12}
        assert len(guided) <= 2 * len(plain) + 1, trial


def test_a_margin_that_contradicts_its_verdict_is_not_used():
    """A tier can fail on its error rate with its quantile criteria met (margin >= 0): the search then
    bisects rather than interpolating from a margin on the wrong side."""
    search = CapacitySearch(["loose"], start_agents=10, max_agents=100, step_agents=10, guided=True)
    search.record_verdict(10, margin_verdict({"loose": 1.0}))
    errors = StepVerdict((TierVerdict(SloTier("loose", 1.0, 1.0), False, 1, 1, 1.0, 1.0, 1.0, None, None, None,
                                      ("error rate",), 0.5),))
    search.record_verdict(20, errors)
    assert search.next_agents() == 15


def test_window_end_waits_for_min_requests_up_to_a_cap():
    params = SearchParameters(start_agents=1, step_agents=0, step_factor=2.0, max_agents=8, resolution_agents=1,
                              spawn_rate=1.0, warmup_s=0.0, window_s=10.0, early_stop=False, min_requests=3)
    assert window_end(100.0, params, [101.0, 102.0, 103.0], seen_until_s=105.0) is None  # planned end not seen
    assert window_end(100.0, params, [101.0, 102.0, 103.0, 150.0], seen_until_s=112.0) == 110.0
    assert window_end(100.0, params, [99.0, 101.0, 102.0], seen_until_s=120.0) is None  # 99 is before the window
    end = window_end(100.0, params, [99.0, 101.0, 102.0, 125.0, 126.0], seen_until_s=130.0)
    assert 125.0 < end < 125.0 + 1e-9  # just past the third request: [100, end) holds exactly three
    assert window_end(100.0, params, [], seen_until_s=139.0) is None
    assert window_end(100.0, params, [141.0], seen_until_s=150.0) == 140.0  # MAX_WINDOW_FACTOR x 10 s
    none_needed = dataclasses.replace(params, min_requests=0)
    assert window_end(100.0, none_needed, [], seen_until_s=110.0) == 110.0


def test_a_window_with_too_few_requests_is_extended(tmp_path):
    """One agent whose turns take 7 s, a 5 s window: the window stays open until 3 requests ended."""
    environment, shape, clock = shape_environment(tmp_path, start_agents=1, max_agents=1, window_s=5.0,
                                                  min_requests=3, early_stop=False)
    log = aggregate.get_record_log(environment)
    ticks = 0
    while (result := shape.tick()) is not None:
        environment.runner.shape_last_tick = result
        if result[0] and ticks % 7 == 0:
            log.add(record(agent=0, ttft_s=0.1, output_tps=50.0, end=clock.now))
        clock.now += 1.0
        ticks += 1
        assert ticks < 500
    step = shape.steps[0]
    assert step.verdict.tiers[0].requests == 3 and step.verdict.passed
    assert 5.0 < step.window_end_epoch_s - step.window_start_epoch_s < 4 * 5.0


class IdleUser(User):
    wait_time = constant(1)


SLO_YAML = """
defaults: {max_error_rate: 0.5}
tiers:
  - {name: loose, ttft_max_s: 0.45, output_tps_min: 10}
  - {name: strict, ttft_max_s: 0.25, output_tps_min: 10}
"""


class Clock:
    """Seconds in the past of the real clock, so that the LocalRunner's real-time report coverage
    is always ahead of the windows the shape measures."""

    def __init__(self) -> None:
        self.now = time.time() - 3600

    def __call__(self) -> float:
        return self.now


def shape_environment(tmp_path, **overrides):
    """A LocalRunner with the search shape; plain bisection unless overridden, so that the counts the
    shape tests expect follow from pass/fail alone (the guided policy has tests of its own)."""
    slo = tmp_path / "slo.yaml"
    slo.write_text(SLO_YAML)
    options = dict(
        records_dir="", run_id="run", slo=str(slo), start_agents=2, step_agents=2, step_factor=2.0, max_agents=8,
        resolution_agents=1, agent_spawn_rate=100.0, warmup_s=2.0, window_s=20.0, early_stop=True,
        restart_agents=True, guided_search=False, min_requests=1, recheck="off",
        capacity_json=str(tmp_path / "capacity.json"),
    )
    options.update(overrides)
    clock = Clock()
    shape = CapacitySearchShape(clock=clock)
    environment = Environment(
        user_classes=[IdleUser], shape_class=shape, events=Events(), parsed_options=argparse.Namespace(**options)
    )
    environment.create_local_runner()
    return environment, shape, clock


def drive(environment, shape, clock) -> list[tuple]:
    """Tick as Locust's shape_worker does, once a (virtual) second; every agent of the current step
    completes one request per second with TTFT 0.1 s × agents and the step index it saw."""
    log = aggregate.get_record_log(environment)
    ticks = []
    while (result := shape.tick()) is not None:
        environment.runner.shape_last_tick = result
        ticks.append(result)
        step = aggregate.current_step(environment)
        for agent in range(result[0]):
            log.add(record(agent=agent, ttft_s=0.1 * step.agents, output_tps=50.0, end=clock.now))
        clock.now += 1.0
        assert len(ticks) < 2000
    return ticks


def test_shape_runs_the_search_on_a_local_runner(tmp_path):
    environment, shape, clock = shape_environment(tmp_path, early_stop=False)
    ticks = drive(environment, shape, clock)
    assert [(s.agents, s.phase) for s in shape.steps] == [
        (2, "step"), (4, "step"), (6, "step"), (5, "bisect"), (3, "bisect")]
    assert [(s.verdict.tier("loose").passed, s.verdict.tier("strict").passed) for s in shape.steps] == [
        (True, True), (True, False), (False, False), (False, False), (True, False)]
    capacity = shape.capacity()
    assert (capacity["loose"].agents, capacity["strict"].agents) == (4, 2)
    for step in shape.steps:
        assert step.window_end_epoch_s - step.window_start_epoch_s == 20.0
        assert step.coverage_complete and not step.early_stop
        assert step.verdict.tiers[0].requests == 20 * step.agents  # one per agent per second of window
    assert {tick[0] for tick in ticks} == {2, 4, 6, 5, 3}
    environment.events.test_stop.fire(environment=environment)
    summary = json.loads((tmp_path / "capacity.json").read_text())
    assert summary["complete"] and summary["capacity"]["loose"] == {
        "tier": "loose", "status": "found", "agents": 4, "first_failing_agents": 5}
    assert [s["agents"] for s in summary["steps"]] == [2, 4, 6, 5, 3]
    assert summary["steps"][1]["verdict"]["tiers"][1]["ttft_quantile_s"] == pytest.approx(0.4)
    assert "step 1 (step): 4 agents, 80 requests, 0 errors | 10 tok/s, TTFT ≤ 0.45 s: pass (TTFT p95 0.4 s" in (
        format_step(shape.steps[1]))


@pytest.mark.parametrize("restart", [True, False])
def test_agents_restart_between_steps(tmp_path, monkeypatch, restart):
    """With --restart-agents every step begins from no agents (stopped at STOP_RATE), so no step inherits
    the queue of the one before; without it the count moves straight from step to step."""
    environment, shape, clock = shape_environment(tmp_path, early_stop=False, restart_agents=restart)
    running = {"users": 0}  # users follow the shape's last tick at once, as with an instant spawn
    monkeypatch.setattr(shape, "get_current_user_count", lambda: running["users"])
    log = aggregate.get_record_log(environment)
    counts = []
    while (result := shape.tick()) is not None:
        environment.runner.shape_last_tick = result
        running["users"] = result[0]
        counts.append(result)
        assert len(counts) < 2000, (counts[:10], counts[-10:], shape._stage)
        for agent in range(result[0]):
            log.add(record(agent=agent, ttft_s=0.1 * aggregate.current_step(environment).agents, output_tps=50.0, end=clock.now))
        clock.now += 1.0
    distinct = [count for index, count in enumerate(counts) if index == 0 or count != counts[index - 1]]
    if restart:
        assert distinct == [(2, 100.0), (0, STOP_RATE), (4, 100.0), (0, STOP_RATE), (6, 100.0), (0, STOP_RATE),
                            (5, 100.0), (0, STOP_RATE), (3, 100.0), (0, STOP_RATE)]
    else:
        assert distinct == [(2, 100.0), (4, 100.0), (6, 100.0), (5, 100.0), (3, 100.0), (0, STOP_RATE)]
    assert [s.agents for s in shape.steps] == [2, 4, 6, 5, 3]


def test_hopeless_steps_end_early_and_only_as_fails(tmp_path):
    environment, shape, clock = shape_environment(tmp_path)
    drive(environment, shape, clock)
    early = [s for s in shape.steps if s.early_stop]
    assert [s.agents for s in early] == [6, 5, 3]  # every tier that still matters fails there by far
    for step in shape.steps:
        length_s = step.window_end_epoch_s - step.window_start_epoch_s
        if step.early_stop:  # after 5 s of window and at least 20 requests, never as a pass
            assert (length_s, step.verdict.passed) == (max(5.0, math.ceil(20 / step.agents)), False)
        else:
            assert length_s == 20.0
    assert {t: c.agents for t, c in shape.capacity().items()} == {"loose": 4, "strict": 2}


def test_bad_options_stop_the_test_with_one_line(tmp_path, caplog):
    environment, shape, _ = shape_environment(tmp_path, max_agents=1, start_agents=4)
    assert shape.tick() is None
    assert environment.process_exit_code == 2
    assert "--max-agents: expected an integer >= --start-agents, got 1" in caplog.text


def test_options_reach_the_web_ui_form_and_locust_conf(tmp_path):
    install_agentperf()
    extra = argument_parser.ui_extra_args_dict([])
    expected = {"slo", "start_agents", "step_agents", "step_factor", "max_agents", "resolution_agents",
                "agent_spawn_rate", "warmup_s", "window_s", "early_stop", "restart_agents", "guided_search", "min_requests", "capacity_json", "records_dir",
                "run_id"}
    assert expected <= set(extra)
    assert (extra["early_stop"]["default_value"], extra["window_s"]["default_value"]) == (True, 90.0)
    conf = tmp_path / "locust.conf"
    conf.write_text("start-agents = 4\nstep-factor = 1.5\nslo = tiers.yaml\n")
    options = argument_parser.get_parser().parse_args(["--config", str(conf)])
    params = SearchParameters.from_options(options)
    assert (params.start_agents, params.step_factor, options.slo) == (4, 1.5, "tiers.yaml")


def test_the_state_file_holds_every_step_as_soon_as_it_is_judged(tmp_path):
    """A run killed at any moment keeps what it judged: the state file is rewritten, whole, after every
    judged step, without waiting for the test to stop."""
    environment, shape, clock = shape_environment(tmp_path, early_stop=False)
    path = tmp_path / "capacity.json"
    log = aggregate.get_record_log(environment)
    written = set()
    while (result := shape.tick()) is not None:
        environment.runner.shape_last_tick = result
        state = json.loads(path.read_text())
        assert [s["agents"] for s in state["steps"]] == [s.agents for s in shape.steps]
        assert state["interrupted"] is False and state["lost_workers"] == []
        written.add(len(state["steps"]))
        for agent in range(result[0]):
            log.add(record(agent=agent, ttft_s=0.1 * aggregate.current_step(environment).agents, output_tps=50.0,
                           end=clock.now))
        clock.now += 1.0
    final = json.loads(path.read_text())  # the tick that judged the last step also ended the search
    written.add(len(final["steps"]))
    assert written == {0, 1, 2, 3, 4, 5} and final["complete"] is True
    assert not list(tmp_path.glob("*.partial"))


def test_a_lost_worker_is_named_in_the_state_with_its_step_and_time(tmp_path, monkeypatch):
    environment, shape, clock = shape_environment(tmp_path, early_stop=False)
    lost_at = []

    def workers(_environment) -> frozenset[str]:  # worker-b goes in the second step's warm-up
        if not lost_at and shape._agents == 4 and shape._stage.name == "warmup":
            lost_at.append(clock.now)
        return frozenset({"worker-a"} if lost_at else {"worker-a", "worker-b"})

    monkeypatch.setattr(aggregate, "active_workers", workers)
    drive(environment, shape, clock)
    assert [s.agents for s in shape.steps] == [2, 4, 6, 5, 3]  # the step measured again, not judged short
    expected = [{"worker": "worker-b", "step": 1, "agents": 4, "epoch_s": lost_at[0]}]
    assert list(shape.summary().lost_workers) == expected
    assert json.loads((tmp_path / "capacity.json").read_text())["lost_workers"] == expected


def test_a_test_stopped_before_the_search_is_done_is_marked_interrupted(tmp_path):
    """However it was stopped (a signal, the web UI's Stop button), with every step judged so far."""
    environment, shape, clock = shape_environment(tmp_path, early_stop=False)
    log = aggregate.get_record_log(environment)
    while len(shape.steps) < 2:
        environment.runner.shape_last_tick = shape.tick()
        for agent in range(environment.runner.shape_last_tick[0]):
            log.add(record(agent=agent, ttft_s=0.1, output_tps=50.0, end=clock.now))
        clock.now += 1.0
    environment.events.test_stop.fire(environment=environment)
    state = json.loads((tmp_path / "capacity.json").read_text())
    assert (state["interrupted"], state["complete"], len(state["steps"])) == (True, False, 2)

"""The ground truth: the capacity search on the simulator's engine, on a virtual clock.

The known-answer case: agents that never pause (no tool wait) always have one request in flight, so
with at most ``max_num_seqs`` agents every request is admitted at the next step (TTFT ≈ one prefill
step, ~40 ms here), and with one more agent every request queues until a running one finishes: on
average a generation time over ``max_num_seqs`` (≥ 130 ms here). A TTFT limit between the two puts the
capacity at exactly ``max_num_seqs``.
"""

from __future__ import annotations

import json

import pytest
import yaml

from agentperf_users.cli.main import main
from agentperf_users.loadgen import replay
from agentperf_users.measure.slo import load_slo
from agentperf_users.search import policy as search
from agentperf_users.search import truth
from agentperf_users.search.policy import SearchParameters
from agentperf_users.simulator.engine import Engine
from agentperf_users.tokens import count_prompt_tokens, tools_tokens
from agentperf_users.workload.readers import load_trajectories
from tests.simulator import custom_profile, write_profile

MAX_NUM_SEQS = 6
OUTPUT_TOKENS = 200
NO_WAIT = replay.ReplaySettings(tool_wait="none")


def search_params(**overrides) -> SearchParameters:
    values = dict(start_agents=2, step_agents=0, step_factor=2.0, max_agents=32, resolution_agents=1,
                  spawn_rate=100.0, warmup_s=5.0, window_s=20.0, early_stop=True)
    return SearchParameters(**{**values, **overrides})


@pytest.fixture
def trajectories(tmp_path):
    """Eight one-turn trajectories of ~100-token prompts (so even simultaneous prefills stay cheap), each generating OUTPUT_TOKENS."""
    document = {"agentperf": 1, "name": "flat", "trajectories": [
        {"id": f"t{i}", "turns": [{"messages": [{"role": "user", "content_tokens": 100}],
                                    "output_tokens": OUTPUT_TOKENS}]}
        for i in range(8)
    ]}
    path = tmp_path / "flat.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_trajectories(str(path))


@pytest.fixture
def slo(tmp_path):
    """TTFT ≤ 0.1 s: above one prefill step, below the queueing delay of one agent too many."""
    path = tmp_path / "slo.yaml"
    path.write_text(yaml.safe_dump({"tiers": [
        {"name": "tight", "ttft_max_s": 0.1, "output_tps_min": 1.0, "scope": "request", "quantile": 0.95},
    ]}))
    return load_slo(path)


def test_capacity_is_max_num_seqs_when_agents_never_pause(tmp_path, trajectories, slo):
    profile = custom_profile(tmp_path, {"engine.max_num_seqs": MAX_NUM_SEQS})
    result = truth.find_capacity(profile, trajectories, slo, search_params(), NO_WAIT)
    capacity = result.capacity["tight"]
    assert capacity.status.value == "found"
    assert capacity.agents == MAX_NUM_SEQS
    assert capacity.first_failing_agents == MAX_NUM_SEQS + 1
    # every agent's first request (its cold join) ended in the warm-up here, and no judged one is a join
    assert not any(r.cold_join for step in result.steps for r in step.records)
    # the search stepped 2, 4, 8 and then bisected between 4 and 8
    assert [step.agents for step in result.steps][:3] == [2, 4, 8]
    assert result.simulated_s > sum(5.0 + 20.0 for _ in result.steps)


def test_step_verdicts_follow_the_profile(tmp_path, trajectories, slo):
    """The same search on a GPU with twice the sequence slots finds twice the capacity."""
    profile = custom_profile(tmp_path, {"engine.max_num_seqs": 2 * MAX_NUM_SEQS})
    result = truth.find_capacity(profile, trajectories, slo, search_params(), NO_WAIT)
    assert result.capacity["tight"].agents == 2 * MAX_NUM_SEQS


def test_truth_is_deterministic(tmp_path, trajectories, slo):
    profile = custom_profile(tmp_path, {"engine.max_num_seqs": MAX_NUM_SEQS})
    first = truth.find_capacity(profile, trajectories, slo, search_params(), NO_WAIT)
    second = truth.find_capacity(profile, trajectories, slo, search_params(), NO_WAIT)
    assert [(s.agents, s.verdict) for s in first.steps] == [(s.agents, s.verdict) for s in second.steps]


def test_tool_waits_raise_capacity(tmp_path, trajectories, slo):
    """Agents that pause between turns leave slots free: more of them fit than agents that never pause."""
    profile = custom_profile(tmp_path, {"engine.max_num_seqs": MAX_NUM_SEQS})
    pausing = replay.ReplaySettings(tool_wait="sampled", tool_wait_median_s=2.0, tool_wait_sigma=0.1)
    result = truth.find_capacity(profile, trajectories, slo, search_params(), pausing)
    assert result.capacity["tight"].agents > MAX_NUM_SEQS


def test_cli_prints_capacity_json(tmp_path, capsys):
    profile = write_profile(tmp_path, {"engine.max_num_seqs": 4}, name="l4-llama3.2-3b")
    code = main(["truth", "--profile", str(profile), "--trajectories", "demo", "--start-agents", "2",
                 "--max-agents", "8", "--warmup-s", "5", "--window-s", "10"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["capacity"]) == {tier.name for tier in load_slo(None).tiers}
    assert all(step["agents"] <= 8 for step in report["steps"])


def test_cli_bad_profile_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpu: [1, 2]\n")
    assert main(["truth", "--profile", str(bad), "--trajectories", "demo"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(bad) in err and "Traceback" not in err


def test_a_short_window_waits_for_min_requests(tmp_path, trajectories, slo):
    """One agent's requests take 1.38 s, back to back from 0.5 s (``replay.JOIN_LEAD_S``); the window
    opens 6.8 s in (a one-batch ramp is seen done at the shape's first tick, 1 s, then 5.8 s of
    warm-up), 0.6 s before one ends. A 0.2 s
    window holds none of them (an empty window proves nothing, and fails), so it is extended until
    --min-requests ended in it, as the live shape does, but never beyond MAX_WINDOW_FACTOR windows."""
    profile = custom_profile(tmp_path, {"engine.max_num_seqs": MAX_NUM_SEQS})
    results = {}
    for min_requests, window_s in ((0, 0.2), (1, 0.2), (2, 1.0), (3, 0.5)):
        params = search_params(start_agents=1, max_agents=1, warmup_s=5.8, window_s=window_s, min_requests=min_requests)
        (step,) = truth.find_capacity(profile, trajectories, slo, params, NO_WAIT).steps
        results[min_requests] = (len(step.records), step.verdict.passed, step.window_end_s - step.window_start_s)
    assert results[0] == (0, False, pytest.approx(0.2))
    assert results[1][:2] == (1, True) and 0.2 < results[1][2] < 1.4
    assert results[2][:2] == (2, True) and 1.4 < results[2][2] < 2 * 1.4
    assert results[3][0] < 3 and results[3][2] == pytest.approx(search.MAX_WINDOW_FACTOR * 0.5)


def test_measure_steps_replays_a_runs_steps_window_for_window(tmp_path, trajectories, slo):
    """The live report's twin steps: the same counts in the same order give the search's own verdicts,
    and a shorter window (a live step that ended early) judges only what ended within it."""
    profile = custom_profile(tmp_path, {"engine.max_num_seqs": MAX_NUM_SEQS})
    params = search_params()
    searched = truth.find_capacity(profile, trajectories, slo, params, NO_WAIT).steps
    lengths = [(s.agents, s.window_end_s - s.window_start_s) for s in searched]
    again = truth.measure_steps(profile, trajectories, slo, params, lengths, NO_WAIT)
    assert [(s.agents, s.verdict) for s in again] == [(s.agents, s.verdict) for s in searched]
    (short,) = truth.measure_steps(profile, trajectories, slo, params, [(searched[0].agents, 5.0)], NO_WAIT)
    assert short.window_end_s - short.window_start_s == pytest.approx(5.0)
    assert 0 < len(short.records) < len(searched[0].records)


def test_verdict_bands_measure_every_count(tmp_path, trajectories, slo):
    """A monotone truth (the known answer: passes up to max_num_seqs, fails above) has a band of one count."""
    profile = custom_profile(tmp_path, {"engine.max_num_seqs": MAX_NUM_SEQS})
    bands = truth.verdict_bands(profile, trajectories, slo, search_params(), MAX_NUM_SEQS + 3, NO_WAIT)
    assert bands["tight"] == truth.VerdictBand(passes_up_to=MAX_NUM_SEQS, fails_above=MAX_NUM_SEQS,
                                               measured_up_to=MAX_NUM_SEQS + 3)


@pytest.mark.parametrize(("count", "rate", "spaced", "starts", "ramp_end"), [
    (5, 2.0, True, [0.5, 1.0, 1.5, 2.0, 2.5], 2.0),  # a restarted step: first requests 1 / rate apart
    (5, 2.0, False, [0.0, 0.0, 1.0, 1.0, 2.0], 2.0),  # agents added to running ones: Locust's batches
    (3, 10.0, True, [0.5, 0.6, 0.7], 1.0),  # one batch: the shape sees it done at its next tick
    (25, 10.0, False, [0.0] * 10 + [1.0] * 10 + [2.0] * 5, 2.0),
])
def test_agents_start_as_the_live_run_starts_them(tmp_path, trajectories, count, rate, spaced, starts, ramp_end):
    profile = custom_profile(tmp_path, {"engine.max_num_seqs": MAX_NUM_SEQS})
    world = truth._World(Engine(profile), trajectories, NO_WAIT)
    world.now_s = 100.0
    assert world.set_agents(count, rate, spaced=spaced) == pytest.approx(100.0 + ramp_end)
    assert sorted(at_s - 100.0 for at_s, _, _ in world.wakes) == pytest.approx(starts)


def test_no_tools_counts_prompts_without_tool_definitions(tmp_path, slo):
    """With ``--no-tools`` the truth's prompts are what a request without ``tools`` costs the simulator
    (``count_prompt_tokens(messages)``): fewer tokens, by exactly the tool definitions'."""
    profile = custom_profile(tmp_path, {"engine.max_num_seqs": MAX_NUM_SEQS})
    demo = load_trajectories("demo")
    params = search_params(start_agents=2, max_agents=2, warmup_s=0.0, window_s=30.0)
    prompts = {}
    for tools in (True, False):
        settings = replay.ReplaySettings(tool_wait="none", start_turn="first", tools=tools)
        (step,) = truth.measure_steps(profile, demo, slo, params, [(2, None)], settings)
        prompts[tools] = {(r.trajectory, r.turn): r.prompt_tokens for r in step.records}
    by_id = {demo.trajectory_id(i): demo.trajectory(i) for i in range(len(demo))}
    common = prompts[True].keys() & prompts[False].keys()
    assert len(common) >= 4
    for label, turn_index in common:
        turn = by_id[label].turns[turn_index]
        assert prompts[True][label, turn_index] == turn.prompt_tokens == count_prompt_tokens(turn.messages, turn.tools)
        assert prompts[False][label, turn_index] == count_prompt_tokens(turn.messages)
        assert prompts[False][label, turn_index] == turn.prompt_tokens - len(tools_tokens(turn.tools)) < turn.prompt_tokens

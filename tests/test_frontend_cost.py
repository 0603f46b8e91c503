"""The front-end cost of a CPU server (``efficiency.frontend_ms`` and ``frontend_ms_per_1k_tokens``): the
simulator charges it on the engine's clock, the fit recovers it from noisy points, and calibrate measures
it through HTTP from a simulator that has one.

Tolerance of the calibrate test (measured on the shared 2-core dev machine, 3 runs of the quick design):
the fixed term came back 3.6-4.7 ms above the hidden 60 ms (the simulator's own HTTP parsing and
tokenizing, which is front-end time too, so it belongs in the measurement) and the per-token term 1-5 %
above the hidden 10 ms per 1K tokens. The test allows 0 to +10 ms and 15 %, as a loaded CI machine
stalls a few requests (the slowest are set aside, not all). With 30 ms + 4 ms per 1K hidden, the
machine's noise moved the per-token term by up to 90 % in one run of four: large hidden costs keep the
test about the fit, not the machine.
"""

from __future__ import annotations

import json
import random

import pytest

from agentperf_users.cli.main import main
from agentperf_users.errors import AgentperfError
from agentperf_users.simulator.engine import Engine, EngineRequest
from agentperf_users.simulator.profile import load_profile
from agentperf_users.tokens import count_prompt_tokens
from agentperf_users.twin.fit import MIN_FRONT_END_POINTS, fit_front_end
from agentperf_users.twin.probe_run import PREFILL_HISTOGRAM, QUEUE_HISTOGRAM, Measured, agent_front_end
from tests.simulator import custom_profile, make_prompt, simulator, write_profile

FRONTEND = {"efficiency.frontend_ms": 60.0, "efficiency.frontend_ms_per_1k_tokens": 10.0}


def lone_request(profile, prompt_tokens: int) -> EngineRequest:
    """One request on an idle engine, run to its end on a virtual clock that starts at 1 s."""
    engine = Engine(profile)
    request = EngineRequest("r", make_prompt(prompt_tokens), 4, arrival_s=1.0)
    engine.submit(request)
    now_s = 1.0
    while (step := engine.step(now_s)) is not None:
        now_s += step.duration_s
    return request


def test_an_idle_engine_adds_exactly_the_front_end_cost_to_ttft_and_none_to_queue_or_prefill(tmp_path):
    plain, costed = custom_profile(tmp_path, {}), custom_profile(tmp_path, FRONTEND)
    assert plain.frontend_s(3000) == 0.0
    assert costed.frontend_s(3000) == pytest.approx(0.060 + 0.010 * 3)
    before, after = lone_request(plain, 3000), lone_request(costed, 3000)
    ttft_growth = (after.first_token_s - after.arrival_s) - (before.first_token_s - before.arrival_s)
    assert ttft_growth == pytest.approx(costed.frontend_s(3000), abs=1e-12)
    # vLLM's queue histogram starts after the front end, and its prefill time does not hold it
    assert after.queued_s == pytest.approx(after.arrival_s + costed.frontend_s(3000))
    assert after.scheduled_s - after.queued_s == pytest.approx(0.0)
    assert after.first_token_s - after.scheduled_s == pytest.approx(before.first_token_s - before.scheduled_s)
    assert before.queued_s == before.arrival_s  # without the fields nothing moves


def decode_run(profile, arrival_every_s: float) -> tuple[float, float, int]:
    """8 long decodes while short requests (one token each) arrive every ``arrival_every_s`` on the virtual
    clock from 0: their tokens per second, when the last finished, and how many short ones arrived."""
    engine = Engine(profile)
    long = [EngineRequest(f"long{i}", make_prompt(512, i), 300, 0.0) for i in range(8)]
    for request in long:
        engine.submit(request)
    now_s, next_arrival_s, arrivals = 0.0, 0.0, 0
    while any(r.finished_s is None for r in long):
        while next_arrival_s <= now_s:
            engine.submit(EngineRequest(f"short{arrivals}", make_prompt(64, 100 + arrivals), 1, next_arrival_s))
            arrivals += 1
            next_arrival_s += arrival_every_s
        now_s += engine.step(now_s).duration_s
    end_s = max(r.finished_s for r in long)
    return sum(r.generated for r in long) / end_s, end_s, arrivals


def test_a_busy_front_end_costs_decode_throughput(tmp_path):
    plain, costed = custom_profile(tmp_path, {}), custom_profile(tmp_path, FRONTEND)
    every_s = 0.2  # a 60 ms front end per arrival: about 30 % of the engine's time
    base, _, _ = decode_run(plain, every_s)
    slowed, _, arrivals = decode_run(costed, every_s)
    assert arrivals > 10
    assert slowed < 0.8 * base, (slowed, base)
    # all at once at 0 (one short arrival): the front end's work is one stretch before the first step, so
    # everything ends later by exactly the 9 requests' front-end cost
    _, quiet_plain_s, _ = decode_run(plain, 1e9)
    _, quiet_costed_s, _ = decode_run(costed, 1e9)
    assert quiet_costed_s - quiet_plain_s == pytest.approx(8 * costed.frontend_s(512) + costed.frontend_s(64))


def test_a_request_aborted_in_the_front_end_leaves_no_work(tmp_path):
    engine = Engine(custom_profile(tmp_path, FRONTEND))
    engine.submit(EngineRequest("gone", make_prompt(100), 4, 0.0))
    assert engine.has_work()
    engine.abort("gone")
    assert not engine.has_work() and engine.step(0.0) is None


@pytest.mark.parametrize("value", [-3, 0, "fast", 1e12])
def test_a_bad_front_end_value_is_one_line_naming_the_field_exit_2(tmp_path, capsys, value):
    bad = write_profile(tmp_path, {"efficiency.frontend_ms_per_1k_tokens": value})
    assert main(["predict", "--profile", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "efficiency.frontend_ms_per_1k_tokens: expected a positive number" in err


def synthetic_points(fixed_s: float, per_token_s: float, noise_s: float, seed: int) -> list[tuple[int, float]]:
    """What the standard design's agent requests measure: each length twice, with noise and two stalls."""
    rng = random.Random(seed)
    lengths = [1500, 2300, 3300, 5300, 9500]
    points = [(n, fixed_s + per_token_s * n + rng.gauss(0, noise_s)) for n in lengths for _ in range(2)]
    points[3] = (points[3][0], points[3][1] + 0.150)  # another process took the core
    return points


@pytest.mark.parametrize("seed", range(4))
def test_the_fit_recovers_known_front_end_constants_from_noisy_points(seed):
    found = fit_front_end(synthetic_points(0.040, 5e-6, 0.002, seed))
    assert found is not None
    assert found.fixed_s == pytest.approx(0.040, abs=0.006)
    assert found.per_token_s == pytest.approx(5e-6, rel=0.25)
    assert 3 in found.spikes  # the stall is set aside, not fitted


def test_the_fit_needs_points_at_two_lengths():
    assert fit_front_end([(1000, 0.05)] * 10) is None
    assert fit_front_end([(1000, 0.05), (2000, 0.06)] * ((MIN_FRONT_END_POINTS - 1) // 2)) is None


@pytest.mark.slow
def test_calibrate_measures_the_front_end_of_a_simulator(tmp_path, capsys):
    hidden = write_profile(tmp_path, {**FRONTEND, "engine.max_num_seqs": 64})
    out = tmp_path / "twin.yaml"
    with simulator("--profile", str(hidden)) as sim:
        code = main(["calibrate", "--host", sim.url, "--out", str(out), "--design", "quick", "--max-num-seqs", "64",
                     "--max-residual", "0.5"])
    err = capsys.readouterr().err
    assert code == 0, err
    efficiency = load_profile(out).efficiency
    assert 60.0 <= efficiency.frontend_ms <= 70.0
    assert efficiency.frontend_ms_per_1k_tokens == pytest.approx(10.0, rel=0.15)
    sidecar = json.loads((tmp_path / "twin.probe.json").read_text())
    assert len(sidecar["agent_front_end_s"]) == 9  # the quick design's 3 lengths, cold and twice cached
    assert "front-end cost per request" in err
    assert "max_num_seqs 64 from --max-num-seqs;" in out.read_text()  # given: no burst


class StubClient:
    """A probe client whose server has no queue or prefill histograms, or refuses ``tools`` (HTTP 400)."""

    def __init__(self, histograms: bool, takes_tools: bool) -> None:
        self.histograms, self.takes_tools, self.sent_tools = histograms, takes_tools, []

    def send_messages(self, messages, tools, output_tokens):
        self.sent_tools.append(bool(tools))
        if tools and not self.takes_tools:
            raise AgentperfError("answered a probe request with HTTP 400")
        ours = count_prompt_tokens(messages, tools)
        return Measured(ours, ours, None, 0.0, (0.050 + ours * 1e-5,))

    def engine_timed(self, send, *histograms):
        assert set(histograms) == {QUEUE_HISTOGRAM, PREFILL_HISTOGRAM}
        return send(), (0.010 if self.histograms else None)


def test_a_server_without_the_histograms_keeps_the_front_end_at_0_and_says_why():
    points, why = agent_front_end(StubClient(histograms=False, takes_tools=True), (256, 2048), lambda line: None)
    assert points == () and QUEUE_HISTOGRAM in why and "stays 0" in why


def test_a_server_without_tool_calling_is_probed_without_tools_and_says_so():
    client = StubClient(histograms=True, takes_tools=False)
    points, note = agent_front_end(client, (256, 2048), lambda line: None)
    assert len(points) == 6 and "without them" in note
    assert client.sent_tools[0] and not any(client.sent_tools[1:])  # one refused try, then no tools
    assert all(seconds == pytest.approx(0.040 + tokens * 1e-5) for tokens, seconds in points)

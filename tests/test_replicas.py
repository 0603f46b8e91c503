"""``--replicas N --router R``: N copies of a profiled server behind a router, on the truth's virtual clock.

One replica is the single engine exactly; two round-robin replicas of a server bounded by its sequence
slots hold about twice the agents; prefix affinity keeps a conversation's turns where its prefix is
cached, which round-robin does not (asserted on the replicas' recorded prefix-cache hit ratios); a
router sheds conversations from an overloaded replica; bad values are one line, exit 2.

Live (``agentperf simulate --replicas N --router R``): two replicas run twice the sequences at once, their
``/metrics`` series are labelled by engine and add up, and the routers place requests as on the clock.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from agentperf_users.cli.main import main
from agentperf_users.loadgen import replay
from agentperf_users.measure.server_metrics import parse_exposition
from agentperf_users.measure.slo import load_slo
from agentperf_users.search import truth
from agentperf_users.search.policy import CapacityStatus
from agentperf_users.simulator.engine import Engine, EngineRequest
from agentperf_users.simulator.fleet import BALANCE_SLACK, PREFIX_AFFINITY, ROUND_ROBIN, Fleet
from agentperf_users.workload.readers import load_trajectories
from tests.simulator import custom_profile, make_prompt, scrape, simulator, write_profile
from tests.support import wait_for
from tests.test_truth import search_params

MAX_NUM_SEQS = 4
NO_WAIT = replay.ReplaySettings(tool_wait="none")
SEARCH = ["--tool-wait", "none", "--start-agents", "2", "--max-agents", "32", "--warmup-s", "5", "--window-s", "20",
          "--agent-spawn-rate", "100"]


def write_tight_slo(folder: Path) -> Path:
    """TTFT <= 0.1 s: above one prefill step, below the queueing delay of one agent more than the slots."""
    path = folder / "slo.yaml"
    path.write_text(yaml.safe_dump({"tiers": [
        {"name": "tight", "ttft_max_s": 0.1, "output_tps_min": 1.0, "scope": "request", "quantile": 0.95}]}))
    return path


def write_flat_set(folder: Path) -> Path:
    """One-turn trajectories of ~100-token prompts: capacity is the sequence slots, per replica."""
    path = folder / "flat.yaml"
    path.write_text(yaml.safe_dump({"agentperf": 1, "name": "flat", "trajectories": [
        {"id": f"t{i}", "turns": [{"messages": [{"role": "user", "content_tokens": 100}], "output_tokens": 100}]}
        for i in range(8)]}))
    return path


@pytest.fixture
def slo(tmp_path):
    return write_tight_slo(tmp_path)


@pytest.fixture
def flat(tmp_path):
    return write_flat_set(tmp_path)


@pytest.fixture
def conversations(tmp_path):
    """Four-turn conversations, each turn adding 1,500 tokens to its own context (a shared 300-token system
    prompt first): every turn after the first can hit the blocks its previous turn left, where that was,
    and a turn that lands elsewhere finds at most an older, much shorter prefix of its conversation."""
    lines = []
    for i in range(16):
        turns = [{"messages": [{"role": "system", "content_tokens": 300, "seed": "system"},
                               {"role": "user", "content_tokens": 1500 + i}], "output_tokens": 20}]
        turns += [{"messages": [{"role": "assistant", "content_tokens": 20},
                                {"role": "tool", "content_tokens": 1480, "tool_call_id": f"c{t}"}], "output_tokens": 20}
                  for t in range(1, 4)]
        lines.append(json.dumps({"id": f"c{i}", "turns": turns}))
    path = tmp_path / "conversations.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def predict_json(capsys, *options: str) -> dict:
    assert main(["predict", *options, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_one_replica_is_the_single_engine_exactly(tmp_path, capsys, flat, slo):
    profile = write_profile(tmp_path, {"engine.max_num_seqs": MAX_NUM_SEQS})
    options = ["--profile", str(profile), "--trajectories", str(flat), "--slo", str(slo), *SEARCH]
    single = predict_json(capsys, *options)
    for router in (ROUND_ROBIN, PREFIX_AFFINITY):
        one = predict_json(capsys, *options, "--replicas", "1", "--router", router)
        assert {k: one[k] for k in ("capacity", "steps", "simulated_s", "bands")} == \
            {k: single[k] for k in ("capacity", "steps", "simulated_s", "bands")}  # the band's ladder too
        assert "fleet" not in one


def test_two_round_robin_replicas_hold_twice_the_agents(tmp_path, capsys, flat, slo):
    profile = write_profile(tmp_path, {"engine.max_num_seqs": MAX_NUM_SEQS, "gpu.count": 2})
    options = ["--profile", str(profile), "--trajectories", str(flat), "--slo", str(slo), *SEARCH]
    agents, fleets = {}, {}
    for replicas in (1, 2, 4):
        predicted = predict_json(capsys, *options, "--replicas", str(replicas), "--no-band")
        assert predicted["capacity"]["tight"]["status"] == CapacityStatus.FOUND.value
        agents[replicas], fleets[replicas] = predicted["capacity"]["tight"]["agents"], predicted.get("fleet")
    assert agents[1] == MAX_NUM_SEQS
    assert 1.75 * agents[1] <= agents[2] <= 2 * agents[1] <= agents[4] <= 4 * agents[1]
    fleet = fleets[2]
    assert fleet["accelerators"] == 4  # the profile's 2 per replica, times 2
    assert fleet["agents_per_accelerator"]["tight"] == pytest.approx(agents[2] / 4, abs=1e-3)
    assert main(["predict", *options, "--replicas", "2", "--no-band"]) == 0
    out = capsys.readouterr().out
    assert f"{agents[2] / 4:.2f} per accelerator" in out and "2 replicas" in out


def test_prefix_affinity_keeps_conversations_where_their_prefix_is(tmp_path, conversations, slo):
    profile = custom_profile(tmp_path, {"engine.max_num_seqs": 8})
    spec, trajectories = load_slo(slo), load_trajectories(str(conversations))
    params = search_params(start_agents=8, max_agents=8)  # one step, the same agents for both routers
    results = {router: truth.find_capacity(profile, trajectories, spec, params, NO_WAIT, 2, router)
               for router in (ROUND_ROBIN, PREFIX_AFFINITY)}
    ratios = {router: [stats.hit_ratio for stats in result.fleet.replicas] for router, result in results.items()}
    # measured: prefix-affinity 0.62 on both replicas (the ideal: every turn hits all of its previous turn,
    # 10,200 of 16,200 prompt tokens), round-robin 0.53-0.54
    assert min(ratios[PREFIX_AFFINITY]) > max(ratios[ROUND_ROBIN]) + 0.05, ratios
    assert min(ratios[PREFIX_AFFINITY]) > 0.95 * 10_200 / 16_200, ratios
    assert all(stats.routed > 0 for result in results.values() for stats in result.fleet.replicas)
    cached = {router: sum(r.cached_tokens or 0 for s in result.steps for r in s.records)
              for router, result in results.items()}
    assert cached[PREFIX_AFFINITY] > cached[ROUND_ROBIN]  # the judged requests' own usage says the same


def _request(name: str, conversation: int, tokens: int = 64) -> EngineRequest:
    return EngineRequest(name, make_prompt(tokens, conversation), 50, 0.0)


def test_prefix_affinity_sends_a_turn_home_unless_home_is_overloaded(tmp_path):
    profile = custom_profile(tmp_path, {})
    engines = [Engine(profile), Engine(profile)]
    fleet = Fleet(engines, PREFIX_AFFINITY)
    fleet.submit(_request("a1", conversation=1))  # both empty: the least loaded, then the lowest index
    fleet.start_steps(0.0)
    fleet.end_steps(fleet.next_step_end_s())  # a1's prompt blocks are cached on replica 0 now
    assert engines[0].cached_prefix_tokens(make_prompt(64, 1)) == 48 and engines[1].cached_prefix_tokens(
        make_prompt(64, 1)) == 0
    fleet.submit(_request("b1", conversation=2))  # no hit anywhere: to the less loaded replica 1
    fleet.submit(_request("a2", conversation=1))  # home, although replica 0 is as loaded as 1
    assert [s.routed for s in fleet.stats()] == [2, 1]
    for n in range(2):  # load replica 0 up to the bound with conversation 1's turns
        fleet.submit(_request(f"a{n + 3}", conversation=1))
    loads = [e.counters.num_running + e.counters.num_waiting for e in engines]
    assert [s.routed for s in fleet.stats()] == [4, 1] and loads == [4, 1]
    assert loads[0] >= math.ceil((1 + BALANCE_SLACK) * (sum(loads) + 1) / 2)  # one more would pass the bound
    fleet.submit(_request("a9", conversation=1))
    assert [s.routed for s in fleet.stats()] == [4, 2]  # shed to replica 1 despite its cold cache


@pytest.mark.parametrize(("option", "value"), [("--replicas", "0"), ("--replicas", "two"), ("--replicas", "-1"),
                                               ("--router", "random")])
def test_bad_fleet_options_are_one_line(tmp_path, capsys, option, value):
    profile = write_profile(tmp_path, {})
    assert main(["predict", "--profile", str(profile), option, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0] and "Traceback" not in err[0]


def _open_stream(url: str, text: str) -> http.client.HTTPConnection:
    """A long streamed request to a live simulator, left open (closing the connection aborts it)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": text}], "stream": True, "max_tokens": 5000, "ignore_eos": True}),
        {"Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    return conn


def _cached_tokens(url: str, text: str) -> int:
    """A one-token request's cached prompt tokens (the server's usage)."""
    body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 1}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize("replicas", [1, 2])
def test_live_replicas_each_run_their_own_sequence_slots(tmp_path, replicas):
    """Four long streams at a server of two sequence slots: one replica runs two and queues two, two round-robin
    replicas run two each with none waiting; the engines' series add up in the harness's reading."""
    profile = write_profile(tmp_path, {"engine.max_num_seqs": 2})
    text = " ".join(["the same long prompt"] * 40)
    with simulator("--profile", str(profile), "--replicas", str(replicas)) as sim:
        first, again = _cached_tokens(sim.url, text), _cached_tokens(sim.url, text)
        assert first == 0 and (again > 0) == (replicas == 1)  # round-robin sent the repeat to the other replica
        streams = [_open_stream(sim.url, f"stream {i}") for i in range(4)]
        try:
            reading = wait_for(lambda: _settled(sim.url, running=2 * replicas), 10, "the streams admitted")
            samples = scrape(sim.url)
        finally:
            for conn in streams:
                conn.close()
    assert reading.values["requests_waiting"] == 4 - 2 * replicas
    running = {s.labels.get("engine", "-"): s.value for s in samples["vllm:num_requests_running"]}
    assert running == ({"-": 2} if replicas == 1 else {"0": 2, "1": 2})
    blocks = [s.labels["num_gpu_blocks"] for s in samples["vllm:cache_config_info"]]
    assert len(blocks) == replicas and len(set(blocks)) == 1  # each replica its own KV cache of the profile's size


def _settled(url: str, running: int):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        reading = parse_exposition(response.read().decode(), time.time())
    return reading if reading and reading.values["requests_running"] == running else None


def test_live_prefix_affinity_sends_a_repeated_prompt_where_it_is_cached(tmp_path):
    profile = write_profile(tmp_path, {})
    text = " ".join(["a prompt worth caching"] * 40)
    with simulator("--profile", str(profile), "--replicas", "2", "--router", PREFIX_AFFINITY) as sim:
        assert _cached_tokens(sim.url, text) == 0
        assert _cached_tokens(sim.url, text) > 0 and _cached_tokens(sim.url, text) > 0
        hits = {s.labels["engine"]: s.value for s in scrape(sim.url)["vllm:prefix_cache_hits_total"]}
    assert sorted(hits.values())[0] == 0 < sorted(hits.values())[1]  # every hit on the replica that cached it

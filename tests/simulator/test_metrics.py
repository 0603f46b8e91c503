"""``GET /metrics``: vLLM names that move as requests are served, their values against the engine's own
timestamps, and the simulated power gauge."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from agentperf_users.simulator.engine import Engine, EngineRequest
from agentperf_users.simulator.metrics import POWER_WINDOW_S, PowerModel, PowerSpec
from agentperf_users.simulator.profile import load_profile
from agentperf_users.tokens import BLOCK_SIZE
from tests.simulator import (
    custom_profile,
    make_prompt,
    scrape,
    simulator,
    write_profile,
)

PROFILE = load_profile()
MODEL = PROFILE.model.name


def value(samples: dict, name: str) -> float:
    (sample,) = samples[name]
    assert sample.labels.get("model_name") == MODEL
    return sample.value


def test_counters_and_histograms_move_as_requests_are_served():
    with simulator() as sim, OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0) as sdk:
        before = scrape(sim.url)
        assert value(before, "vllm:num_requests_running") == 0
        assert value(before, "vllm:num_requests_waiting") == 0
        messages = [{"role": "user", "content": "count these words " * 200}]
        replies = [sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                               extra_body={"ignore_eos": True}) for _ in range(2)]
        after = scrape(sim.url)
    generated = sum(r.usage.completion_tokens for r in replies)
    assert value(after, "vllm:generation_tokens_total") - value(before, "vllm:generation_tokens_total") == generated
    assert value(after, "vllm:prompt_tokens_total") > value(before, "vllm:prompt_tokens_total")
    queries = value(after, "vllm:prefix_cache_queries_total") - value(before, "vllm:prefix_cache_queries_total")
    hits = value(after, "vllm:prefix_cache_hits_total") - value(before, "vllm:prefix_cache_hits_total")
    assert queries > 0 and hits >= replies[1].usage.prompt_tokens_details.cached_tokens > 0
    assert value(after, "vllm:time_to_first_token_seconds_count") == 2
    assert value(after, "vllm:e2e_request_latency_seconds_count") == 2
    ttft_sum = value(after, "vllm:time_to_first_token_seconds_sum")
    assert 0 < ttft_sum < value(after, "vllm:e2e_request_latency_seconds_sum")
    buckets = {s.labels["le"] for s in after["vllm:time_to_first_token_seconds_bucket"]}
    assert {"0.001", "10.0", "2560.0", "+Inf"} <= buckets  # vLLM's bucket edges
    (success,) = after["vllm:request_success_total"]
    assert success.labels["finished_reason"] == "length" and success.value == 2
    assert 0 <= value(after, "vllm:kv_cache_usage_perc") <= 1
    assert "vllm:num_preemptions_total" in after


def test_power_gauge_per_gpu_between_idle_and_tdp_and_rises_with_load():
    name = "4xh100-llama3.1-70b"
    profile = load_profile(name)
    gpu = profile.gpu
    with simulator("--profile", name) as sim, OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0) as sdk:
        idle = scrape(sim.url)["DCGM_FI_DEV_POWER_USAGE"]
        sdk.chat.completions.create(model=profile.model.name, messages=[{"role": "user", "content": "go"}],
                                    max_tokens=40, extra_body={"ignore_eos": True})
        loaded = scrape(sim.url)["DCGM_FI_DEV_POWER_USAGE"]
    assert sorted(s.labels["gpu"] for s in loaded) == [str(i) for i in range(gpu.count)]
    assert all(s.labels["modelName"] == gpu.name for s in loaded)
    assert all(s.value == pytest.approx(gpu.idle_w) for s in idle)
    assert all(gpu.idle_w < s.value <= gpu.tdp_w for s in loaded)


def test_power_model_uses_busy_share_of_the_recent_window():
    clock, busy = [0.0], [0.0]
    power = PowerModel(PowerSpec(gpu_count=1, gpu_name="X", idle_w=100, tdp_w=500), lambda: busy[0], lambda: clock[0])
    clock[0], busy[0] = 2.0, 1.0  # busy half the time since start
    assert power.watts() == pytest.approx(100 + 400 * 0.5)
    clock[0], busy[0] = 4.0, 3.0  # busy throughout since the last scrape; 3 of 4 s since start
    assert power.watts() == pytest.approx(100 + 400 * 0.75)
    clock[0] = 4.0 + POWER_WINDOW_S + 2.0  # idle for longer than the window: back to idle power
    assert power.watts() == pytest.approx(100 + 400 * 0.0, abs=1e-9)
    clock[0], busy[0] = clock[0] + 1.0, busy[0] + 50.0  # more busy time than wall time is clipped at TDP
    assert power.watts() == pytest.approx(500)


# --- vLLM 0.32's per-request timing histograms, the cached-token counter, the cache config -----------------

ITL_EDGES = {"0.01", "0.025", "0.05", "0.075", "0.1", "0.15", "0.2", "0.3", "0.4", "0.5", "0.75", "1.0", "2.5",
             "5.0", "7.5", "10.0", "20.0", "40.0", "80.0", "+Inf"}  # vLLM's, for inter_token_latency_seconds
REQUEST_EDGES = {"0.3", "0.5", "0.8", "1.0", "1.5", "2.0", "2.5", "5.0", "10.0", "15.0", "20.0", "30.0", "40.0",
                 "50.0", "60.0", "120.0", "240.0", "480.0", "960.0", "1920.0", "7680.0", "+Inf"}


def chat(url: str, content: str, max_tokens: int) -> dict:
    """One whole (non-streamed) completion with the engine's own timestamps in its usage."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "ignore_eos": True, "agentperf_timing": True}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["usage"]


def histogram(samples: dict, name: str) -> tuple[float, float, dict[str, float]]:
    """A histogram's sum, count and cumulative count by ``le``."""
    buckets = {s.labels["le"]: s.value for s in samples[f"{name}_bucket"]}
    return value(samples, f"{name}_sum"), value(samples, f"{name}_count"), buckets


def at_most(values: list[float], edges: set[str]) -> dict[str, float]:
    """The cumulative bucket counts Prometheus would give ``values``."""
    return {le: float(sum(v <= float(le) for v in values)) for le in edges}


def test_timing_histograms_and_cached_tokens_equal_the_engines_own_timestamps(tmp_path):
    """One sequence at a time, so requests queue; a shared prefix, so later ones hit the prefix cache."""
    profile = write_profile(tmp_path, {"engine.max_num_seqs": 1})
    prefix = "the agent reads the repository and the failing test output " * 60
    with simulator("--profile", str(profile)) as sim:
        with ThreadPoolExecutor(4) as pool:
            usages = list(pool.map(lambda i: chat(sim.url, f"{prefix} task {i}", 40), range(4)))
        samples = scrape(sim.url)
    timings = sorted((u["agentperf_timing"] for u in usages), key=lambda t: t["token_times"][0])
    arrivals = [t["arrival"] for t in timings]
    firsts = [t["token_times"][0] for t in timings]
    lasts = [t["token_times"][-1] for t in timings]
    gaps = [b - a for t in timings for a, b in zip(t["token_times"], t["token_times"][1:])]
    assert all(len(t["token_times"]) == 40 for t in timings)

    queue_sum, queue_count, _ = histogram(samples, "vllm:request_queue_time_seconds")
    prefill_sum, prefill_count, prefill_buckets = histogram(samples, "vllm:request_prefill_time_seconds")
    decode_sum, decode_count, decode_buckets = histogram(samples, "vllm:request_decode_time_seconds")
    itl_sum, itl_count, itl_buckets = histogram(samples, "vllm:inter_token_latency_seconds")
    assert queue_count == prefill_count == decode_count == 4
    assert itl_count == len(gaps) == 4 * 39
    # Queue and prefill split arrival -> first token at the first admission; decode is first -> last token.
    ttft = [f - a for f, a in zip(firsts, arrivals)]
    assert queue_sum + prefill_sum == pytest.approx(sum(ttft), rel=1e-12)
    assert value(samples, "vllm:time_to_first_token_seconds_sum") == pytest.approx(sum(ttft), rel=1e-12)
    decodes = [last - first for first, last in zip(firsts, lasts)]
    assert decode_sum == pytest.approx(sum(decodes), rel=1e-12)
    assert decode_buckets == at_most(decodes, REQUEST_EDGES)
    assert itl_sum == pytest.approx(sum(gaps), rel=1e-12)
    assert itl_buckets == at_most(gaps, ITL_EDGES)  # the same floats the engine subtracted: exact
    assert set(prefill_buckets) == REQUEST_EDGES
    # With one sequence slot a request is admitted no earlier than the step after its predecessor's last token.
    must_wait = [max(0.0, previous_last - arrival) for previous_last, arrival in zip(lasts, arrivals[1:])]
    assert sum(must_wait) > 0, "the requests did not overlap, so none had to queue: the test proves nothing"
    assert queue_sum >= sum(must_wait) - 1e-9
    assert prefill_sum <= sum(ttft) - sum(must_wait) + 1e-9

    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert sum(cached) > 0
    assert value(samples, "vllm:prompt_tokens_cached_total") == sum(cached)
    assert value(samples, "vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)


def test_cache_config_info_labels_the_kv_cache():
    with simulator() as sim:
        samples = scrape(sim.url)
    (info,) = samples["vllm:cache_config_info"]
    assert info.value == 1
    assert info.labels["num_gpu_blocks"] == str(PROFILE.kv_capacity_blocks)
    assert info.labels["block_size"] == str(PROFILE.engine.block_size) == str(BLOCK_SIZE)


def test_engine_timestamps_follow_vllms_first_scheduling_across_preemption(tmp_path):
    """Queue time ends at the first admission (a preempted request keeps it, and its first cache hit), and
    each token carries its own and its previous token's time, from which the server takes the gaps."""
    profile = custom_profile(tmp_path, {"engine.gpu_memory_utilization": (14.99 + 5.65 + 0.75) / 79.2,
                                        "model.max_context_tokens": 4096})  # 6144 tokens of KV: both prompts
    engine = Engine(profile)                                                # fit, their outputs do not
    older = EngineRequest("older", make_prompt(3000), 1000, 0.0)
    newer = EngineRequest("newer", make_prompt(3000, conversation=1), 1000, 0.5)
    engine.submit(older)
    engine.submit(newer)
    now_s, times = 0.0, {older: [], newer: []}
    while (step := engine.step(now_s)) is not None:  # the first step starts before newer arrived
        now_s += step.duration_s
        for req in step.emitted:
            assert req.previous_token_s == (times[req][-1] if times[req] else None)
            assert req.last_token_s == now_s
            times[req].append(now_s)
    assert newer.preemptions == 1
    assert older.scheduled_s == 0.0
    assert newer.scheduled_s == 0.5  # admitted in a step that started before it arrived: not queued before arrival
    assert newer.cached_tokens == 0  # its re-admission hit its own blocks; vLLM keeps the first admission's count
    assert engine.counters.prompt_tokens_cached_total == 0
    for req in (older, newer):
        assert (times[req][0], times[req][-1]) == (req.first_token_s, req.finished_s)
    longest_gap = {req: max(b - a for a, b in zip(t, t[1:])) for req, t in times.items()}
    assert longest_gap[newer] > 100 * longest_gap[older]  # from before its preemption to after its recompute


def test_a_faulted_reply_has_token_latencies_but_no_request_phases():
    """Like ``e2e_request_latency_seconds``, the phase histograms hold only requests that completed normally."""
    with simulator("--fault", "malformed-sse") as sim:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 5,
                           "ignore_eos": True, "stream": True}).encode()
        request = urllib.request.Request(sim.url + "/v1/chat/completions", body, {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.read().endswith(b"data: [DONE]\n\n")  # the engine generated every token
        samples = scrape(sim.url)
    assert value(samples, "vllm:time_to_first_token_seconds_count") == 1
    assert value(samples, "vllm:inter_token_latency_seconds_count") == 4
    for name in ("e2e_request_latency", "request_queue_time", "request_prefill_time", "request_decode_time"):
        assert value(samples, f"vllm:{name}_seconds_count") == 0

"""``GET /metrics``: vLLM names that move as requests are served, and the simulated power gauge."""

from __future__ import annotations

import pytest
from openai import OpenAI

from agentperf_users.simulator.metrics import POWER_WINDOW_S, PowerModel, PowerSpec
from agentperf_users.simulator.profile import load_profile
from tests.simulator import scrape, simulator

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

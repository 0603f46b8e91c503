"""The server-metrics reader: vLLM 0.32's and SGLang's expositions understood through one mapping table,
a window's numbers from the readings (a server restart included), the not-available paths, and the
sampler against a local HTTP server and against the embedded simulator."""

from __future__ import annotations

import http.server
import itertools
import json
import logging
import socket
import threading
import time
from typing import Callable

import pytest
from openai import OpenAI

import agentperf_users.measure.scrape as scrape_module
from agentperf_users.errors import AgentperfError
from agentperf_users.measure.server_metrics import (
    NOT_AVAILABLE,
    SERVER_METRICS_FILE,
    HistogramValue,
    ServerSample,
    describe,
    histogram_increase,
    increase,
    parse_exposition,
    read_samples,
    server_metrics_sampler,
    window_summary,
)
from agentperf_users.simulator.profile import load_profile
from tests.simulator import scrape, simulator

# What vLLM 0.32 serves on /metrics with two data-parallel engines (labels engine, model_name; counters
# with their _created series; histograms with _sum, _bucket, _count, _created), trimmed to fewer buckets
# and beside a few of the other families it also exports.
VLLM_032 = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 1.0
vllm:num_requests_waiting{engine="1",model_name="tiny"} 0.0
# HELP vllm:num_requests_waiting_by_reason Number of requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.75
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 4096.0
vllm:prefix_cache_queries_total{engine="1",model_name="tiny"} 1024.0
vllm:prefix_cache_queries_created{engine="0",model_name="tiny"} 1.7647e+09
vllm:prefix_cache_queries_created{engine="1",model_name="tiny"} 1.7647e+09
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 2048.0
vllm:prefix_cache_hits_total{engine="1",model_name="tiny"} 512.0
vllm:prefix_cache_hits_created{engine="0",model_name="tiny"} 1.7647e+09
vllm:prefix_cache_hits_created{engine="1",model_name="tiny"} 1.7647e+09
# HELP vllm:num_preemptions_total Cumulative number of preemptions from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="tiny"} 0.0
vllm:num_preemptions_total{engine="1",model_name="tiny"} 2.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny"} 1.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 10.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="tiny"} 0.0
vllm:request_success_total{engine="1",finished_reason="length",model_name="tiny"} 4.0
vllm:request_success_created{engine="0",finished_reason="stop",model_name="tiny"} 1.7647e+09
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",enable_prefix_caching="True",engine="0",num_gpu_blocks="32768"} 1.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny"} 1.5
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="tiny"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.25",model_name="tiny"} 10.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"} 11.0
vllm:time_to_first_token_seconds_created{engine="0",model_name="tiny"} 1.7647e+09
vllm:time_to_first_token_seconds_sum{engine="1",model_name="tiny"} 0.5
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.1",model_name="tiny"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.25",model_name="tiny"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="tiny"} 4.0
vllm:time_to_first_token_seconds_count{engine="1",model_name="tiny"} 4.0
# HELP vllm:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_sum{engine="0",model_name="tiny"} 6.3
vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="tiny"} 600.0
vllm:inter_token_latency_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 630.0
vllm:inter_token_latency_seconds_count{engine="0",model_name="tiny"} 630.0
# HELP vllm:request_queue_time_seconds Histogram of time spent in WAITING phase for request.
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_sum{engine="0",model_name="tiny"} 0.3
vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 11.0
vllm:request_queue_time_seconds_count{engine="0",model_name="tiny"} 11.0
# HELP vllm:request_prefill_time_seconds Histogram of time spent in PREFILL phase for request.
# TYPE vllm:request_prefill_time_seconds histogram
vllm:request_prefill_time_seconds_sum{engine="0",model_name="tiny"} 1.1
vllm:request_prefill_time_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 11.0
vllm:request_prefill_time_seconds_count{engine="0",model_name="tiny"} 11.0
# HELP vllm:request_decode_time_seconds Histogram of time spent in DECODE phase for request.
# TYPE vllm:request_decode_time_seconds histogram
vllm:request_decode_time_seconds_sum{engine="0",model_name="tiny"} 6.6
vllm:request_decode_time_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 11.0
vllm:request_decode_time_seconds_count{engine="0",model_name="tiny"} 11.0
# HELP http_requests_total Total number of requests by method, status and handler.
# TYPE http_requests_total counter
http_requests_total{handler="/v1/chat/completions",method="POST",status="2xx"} 15.0
"""

# What SGLang serves with --enable-metrics, two data-parallel ranks of two tensor-parallel ranks each: the
# scheduler's series carry tp_rank/pp_rank/dp_rank (every tensor-parallel rank reports the same batch),
# the tokenizer manager's only model_name.
SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 7.0
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 7.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 5.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 5.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 2.0
sglang:num_queue_reqs{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 2.0
sglang:num_queue_reqs{dp_rank="1",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 1.0
sglang:num_queue_reqs{dp_rank="1",engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 1.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 0.5
sglang:token_usage{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 0.5
sglang:token_usage{dp_rank="1",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 0.96
sglang:token_usage{dp_rank="1",engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 0.96
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 0.0
# HELP sglang:num_retracted_requests_total Total number of retracted requests.
# TYPE sglang:num_retracted_requests_total counter
sglang:num_retracted_requests_total{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 3.0
sglang:num_retracted_requests_total{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 3.0
sglang:num_retracted_requests_created{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 1.7e+09
# HELP sglang:queue_time_seconds Histogram of queueing time in seconds.
# TYPE sglang:queue_time_seconds histogram
sglang:queue_time_seconds_bucket{dp_rank="0",engine_type="unified",le="0.0",model_name="m",pp_rank="0",tp_rank="0"} 1.0
sglang:queue_time_seconds_bucket{dp_rank="0",engine_type="unified",le="1.0",model_name="m",pp_rank="0",tp_rank="0"} 5.0
sglang:queue_time_seconds_bucket{dp_rank="0",engine_type="unified",le="+Inf",model_name="m",pp_rank="0",tp_rank="0"} 6.0
sglang:queue_time_seconds_count{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 6.0
sglang:queue_time_seconds_sum{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 3.0
sglang:queue_time_seconds_created{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 1.7e+09
sglang:queue_time_seconds_count{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 6.0
sglang:queue_time_seconds_sum{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 3.0
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="m"} 8000.0
sglang:prompt_tokens_created{model_name="m"} 1.7e+09
# HELP sglang:cached_tokens_total Number of cached prompt tokens.
# TYPE sglang:cached_tokens_total counter
sglang:cached_tokens_total{model_name="m"} 6000.0
# HELP sglang:generation_tokens_total Number of generation tokens processed.
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="m"} 900.0
# HELP sglang:num_requests_total Number of requests processed.
# TYPE sglang:num_requests_total counter
sglang:num_requests_total{model_name="m"} 6.0
# HELP sglang:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE sglang:time_to_first_token_seconds histogram
sglang:time_to_first_token_seconds_sum{model_name="m"} 4.2
sglang:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 0.0
sglang:time_to_first_token_seconds_bucket{le="1.0",model_name="m"} 5.0
sglang:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 6.0
sglang:time_to_first_token_seconds_count{model_name="m"} 6.0
# HELP sglang:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE sglang:inter_token_latency_seconds histogram
sglang:inter_token_latency_seconds_sum{model_name="m"} 18.0
sglang:inter_token_latency_seconds_bucket{le="0.02",model_name="m"} 800.0
sglang:inter_token_latency_seconds_bucket{le="+Inf",model_name="m"} 900.0
sglang:inter_token_latency_seconds_count{model_name="m"} 900.0
"""

DCGM_ONLY = """\
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{gpu="0"} 301.5
"""


def test_vllm_032_series_are_summed_over_engines_and_the_fullest_engines_kv_usage_taken():
    sample = parse_exposition(VLLM_032, 100.0)
    assert sample is not None and sample.server == "vllm" and sample.epoch_s == 100.0
    assert sample.values == {
        "requests_running": 5.0, "requests_waiting": 1.0, "kv_cache_usage": 0.75,
        "prefix_cache_queries": 5120.0, "prefix_cache_hits": 2560.0, "preemptions": 2.0,
        "requests_finished": 15.0,  # every finished_reason of both engines; no _created value added
    }
    ttft = sample.histograms["ttft"]
    assert (ttft.sum, ttft.count) == (2.0, 15.0)
    assert ttft.buckets == ((0.1, 6.0), (0.25, 14.0), (float("inf"), 15.0))
    assert set(sample.histograms) == {"ttft", "inter_token_latency", "queue_time", "prefill_time", "decode_time"}
    assert sample.histograms["inter_token_latency"].mean == pytest.approx(0.01)


def test_sglang_counts_one_tensor_parallel_rank_and_sums_the_data_parallel_ones():
    sample = parse_exposition(SGLANG, 5.0)
    assert sample is not None and sample.server == "sglang"
    assert sample.values == {
        "requests_running": 12.0, "requests_waiting": 3.0, "kv_cache_usage": 0.96, "preemptions": 3.0,
        "prefix_cache_queries": 8000.0, "prefix_cache_hits": 6000.0,  # cached / prompt tokens
        "prompt_tokens": 8000.0, "generation_tokens": 900.0, "requests_finished": 6.0,
    }
    assert sample.histograms["queue_time"] == HistogramValue(3.0, 6.0, ((0.0, 1.0), (1.0, 5.0), (float("inf"), 6.0)))
    assert sample.histograms["ttft"].mean == pytest.approx(0.7)
    assert "prefill_time" not in sample.histograms and "decode_time" not in sample.histograms  # SGLang has none


def test_older_vllm_and_sglang_names_are_read_when_the_current_ones_are_absent():
    older = """\
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
vllm:time_per_output_token_seconds_sum{model_name="m"} 2.0
vllm:time_per_output_token_seconds_count{model_name="m"} 100.0
"""
    sample = parse_exposition(older, 1.0)
    assert sample.values == {"kv_cache_usage": 0.5}
    assert sample.histograms["inter_token_latency"].mean == pytest.approx(0.02)
    older_sglang = """\
sglang:num_running_reqs{name="google/gemma-2-9b-it"} 4.0
sglang:time_per_output_token_seconds_sum{name="google/gemma-2-9b-it"} 3.0
sglang:time_per_output_token_seconds_count{name="google/gemma-2-9b-it"} 300.0
"""
    sample = parse_exposition(older_sglang, 1.0)
    assert sample.server == "sglang" and sample.values == {"requests_running": 4.0}
    assert sample.histograms["inter_token_latency"].mean == pytest.approx(0.01)


@pytest.mark.parametrize("text", [DCGM_ONLY, "", "<html><body>404 Not Found</body></html>", "vllm:x{ 1"])
def test_an_unknown_server_or_no_exposition_is_not_available(text):
    assert parse_exposition(text, 1.0) is None


def reading(epoch_s: float, histograms: dict | None = None, **values: float) -> ServerSample:
    return ServerSample(epoch_s, "vllm", values, histograms or {})


def hist(total: float, count: float) -> HistogramValue:
    return HistogramValue(total, count, ((1.0, count), (float("inf"), count)))


def test_a_window_averages_gauges_inside_it_and_takes_counter_and_histogram_increases():
    samples = [
        reading(9.0, {"ttft": hist(1.0, 2), "queue_time": hist(0.2, 2)}, requests_waiting=9.0,
                prefix_cache_queries=100.0, prefix_cache_hits=50.0, preemptions=1.0),  # the start's anchor
        reading(10.5, {"ttft": hist(3.0, 4), "queue_time": hist(1.0, 4)}, requests_waiting=2.0, requests_running=4.0,
                kv_cache_usage=0.5, prefix_cache_queries=300.0, prefix_cache_hits=100.0, preemptions=1.0),
        reading(11.5, {"ttft": hist(9.0, 6), "queue_time": hist(5.2, 6)}, requests_waiting=4.0, requests_running=6.0,
                kv_cache_usage=0.9, prefix_cache_queries=500.0, prefix_cache_hits=250.0, preemptions=3.0,
                requests_finished=3.0),  # a labelled counter's first series: none before, so from 0
        reading(12.5, {"ttft": hist(99.0, 60)}, requests_waiting=50.0, prefix_cache_queries=9e9),  # after the end
    ]
    window = window_summary(samples, 10.0, 12.0)
    assert window.server == "vllm" and window.readings == 2
    assert (window.requests_waiting_mean, window.requests_waiting_max) == (3.0, 4.0)
    assert (window.requests_running_mean, window.requests_running_max) == (5.0, 6.0)
    assert (window.kv_cache_usage_mean, window.kv_cache_usage_max) == (pytest.approx(0.7), 0.9)
    assert window.prefix_cache_hit_ratio == pytest.approx(200 / 400)
    assert window.preemptions == 2.0 and window.requests_finished == 3.0
    assert window.ttft_mean_s == pytest.approx(8.0 / 4)
    assert window.queue_time_mean_s == pytest.approx(5.0 / 4)
    assert window.prefill_time_mean_s is None and window.inter_token_latency_mean_s is None  # not exported
    assert window.available
    text = describe(window)
    assert text.startswith("server: 5 running (max 6), 3 waiting (max 4), KV 70 % (max 90 %), prefix hits 50 %")
    assert "queue 1.25 s" in text and "TTFT 2 s" in text and "ITL" not in text


def test_the_simulators_lost_time_is_a_share_of_the_window_and_absent_from_other_servers():
    samples = [reading(9.0, {"simulator_write_late": hist(0.01, 10)}, simulator_clock_slip=1.0),
               reading(11.0, {"simulator_write_late": hist(0.05, 30)}, simulator_clock_slip=1.5),
               reading(13.0, {"simulator_write_late": hist(0.09, 50)}, simulator_clock_slip=1.9)]
    window = window_summary(samples, 9.0, 13.0)
    assert window.simulator_time_lost_share == pytest.approx(0.9 / 4.0)  # seconds lost per second of window
    assert window.simulator_write_late_mean_s == pytest.approx(0.08 / 40)
    vllm = window_summary([reading(9.0, preemptions=0.0), reading(11.0, preemptions=0.0)], 9.0, 11.0)
    assert vllm.simulator_time_lost_share is None and vllm.simulator_write_late_mean_s is None


def test_a_server_restart_in_the_window_counts_what_it_did_after_restarting():
    # Counters 100 -> 160, restart (0) -> 30 -> 45: the window saw 60 + 45 more.
    assert increase([100.0, 160.0, 30.0, 45.0]) == 105.0
    assert increase([5.0]) is None  # one reading says nothing about what came after it
    samples = [reading(0.0, {"ttft": hist(10.0, 10)}, preemptions=7.0, prefix_cache_queries=1000.0,
                       prefix_cache_hits=900.0),
               reading(1.0, {"ttft": hist(12.0, 12)}, preemptions=8.0, prefix_cache_queries=1100.0,
                       prefix_cache_hits=950.0),
               reading(2.0, {"ttft": hist(0.5, 1)}, preemptions=0.0, prefix_cache_queries=100.0,
                       prefix_cache_hits=0.0),  # restarted
               reading(3.0, {"ttft": hist(1.5, 3)}, preemptions=1.0, prefix_cache_queries=300.0,
                       prefix_cache_hits=100.0)]
    window = window_summary(samples, 0.5, 3.5)
    assert window.preemptions == 1.0 + 0.0 + 1.0
    assert window.prefix_cache_hit_ratio == pytest.approx((50 + 0 + 100) / (100 + 100 + 200))
    change = histogram_increase(samples, "ttft")
    assert (change.sum, change.count) == (pytest.approx(2.0 + 0.5 + 1.0), 2 + 1 + 2)
    assert change.buckets == ((1.0, 5.0), (float("inf"), 5.0))
    assert window.ttft_mean_s == pytest.approx(3.5 / 5)


def test_windows_without_readings_before_or_in_them_are_not_available():
    samples = [reading(10.5, {"ttft": hist(1.0, 1)}, requests_running=2.0, preemptions=0.0),
               reading(11.5, {"ttft": hist(2.0, 2)}, requests_running=4.0, preemptions=1.0)]
    late = window_summary(samples, 10.0, 12.0)  # the reader's first reading came after the window's start
    assert late.requests_running_mean == 3.0
    assert late.preemptions is None and late.ttft_mean_s is None  # their increase cannot be known
    assert window_summary(samples, 0.0, 5.0) == NOT_AVAILABLE
    assert window_summary([], 0.0, 5.0) == NOT_AVAILABLE and not NOT_AVAILABLE.available
    assert describe(NOT_AVAILABLE) == "server metrics: not available"
    assert set(NOT_AVAILABLE.to_dict()) >= {"ttft_mean_s", "kv_cache_usage_max", "prefix_cache_hit_ratio"}


def test_a_histograms_quantile_is_interpolated_inside_its_bucket():
    histogram = HistogramValue(0.0, 10.0, ((0.1, 2.0), (0.5, 6.0), (1.0, 10.0), (float("inf"), 10.0)))
    assert histogram.quantile(0.5) == pytest.approx(0.1 + 0.4 * (5 - 2) / 4)
    assert histogram.quantile(0.1) == pytest.approx(0.05)
    overflow = HistogramValue(0.0, 4.0, ((1.0, 2.0), (float("inf"), 4.0)))
    assert overflow.quantile(0.9) == 1.0  # in +Inf: the highest finite bound, as Prometheus says
    assert HistogramValue(0.0, 0.0, ()).quantile(0.5) is None


def test_the_file_round_trips_skips_a_torn_last_line_and_names_a_bad_one(tmp_path):
    path = tmp_path / SERVER_METRICS_FILE
    sample = parse_exposition(VLLM_032, 7.25)
    path.write_text(sample.to_json() + "\n" + sample.to_json()[:40])
    assert read_samples(path) == [sample]
    path.write_text('{"epoch_s": 1.0}\n' + sample.to_json() + "\n")
    with pytest.raises(AgentperfError, match=r"server_metrics\.jsonl:1: not a server-metrics reading"):
        read_samples(path)
    assert read_samples(tmp_path / "none.jsonl") == []


# --- the sampler ----------------------------------------------------------------------------------

class Endpoint:
    """A local /metrics that answers each GET with the next of ``bodies`` (status, text); the last repeats."""

    def __init__(self, bodies: list[tuple[int, str]]) -> None:
        self.bodies, self.served = bodies, 0
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, text = endpoint.bodies[min(endpoint.served, len(endpoint.bodies) - 1)]
                endpoint.served += 1
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> Endpoint:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll ``condition`` until it holds (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def lines(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_the_sampler_writes_known_readings_and_logs_a_bad_endpoint_once(tmp_path, caplog):
    path = tmp_path / SERVER_METRICS_FILE
    bodies = [(200, VLLM_032), (200, SGLANG), (404, "not found"), (200, DCGM_ONLY), (200, VLLM_032)]
    with caplog.at_level(logging.INFO, logger="agentperf_users.measure.scrape"):
        with Endpoint(bodies) as endpoint, server_metrics_sampler(endpoint.url, path, interval_s=0.05) as sampler:
            wait_for(lambda: len(lines(path)) >= 4, "four readings")
    written = lines(path)
    assert [line["server"] for line in written[:3]] == ["vllm", "sglang", "vllm"]  # nothing for the 404 and DCGM
    assert all(a["epoch_s"] <= b["epoch_s"] for a, b in itertools.pairwise(written))
    assert written[0]["histograms"]["ttft"]["buckets"] == {"0.1": 6.0, "0.25": 14.0, "+Inf": 15.0}
    assert sampler.misses == 2 and sampler.readings == len(written)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "HTTP 404" in warnings[0] and endpoint.url in warnings[0]


def test_an_unknown_servers_endpoint_writes_nothing_and_says_so_once(tmp_path, caplog):
    path = tmp_path / SERVER_METRICS_FILE
    with caplog.at_level(logging.WARNING, logger="agentperf_users.measure.scrape"):
        with Endpoint([(200, DCGM_ONLY)]) as endpoint, \
                server_metrics_sampler(endpoint.url, path, interval_s=0.05) as sampler:
            wait_for(lambda: sampler.misses >= 3, "three readings")
    assert read_samples(path) == [] and sampler.readings == 0
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "no vLLM or SGLang metrics" in warning


def test_an_oversized_exposition_is_not_read(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(scrape_module, "MAX_EXPOSITION_BYTES", len(VLLM_032) - 1)
    path = tmp_path / SERVER_METRICS_FILE
    with caplog.at_level(logging.WARNING, logger="agentperf_users.measure.scrape"):
        with Endpoint([(200, VLLM_032)]) as endpoint, \
                server_metrics_sampler(endpoint.url, path, interval_s=0.05) as sampler:
            wait_for(lambda: sampler.misses >= 2, "two readings")
    assert read_samples(path) == []
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"an exposition over {len(VLLM_032) - 1} bytes" in warning


def test_an_unreachable_endpoint_writes_nothing_and_says_so_once(tmp_path, caplog):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / SERVER_METRICS_FILE
    with caplog.at_level(logging.WARNING, logger="agentperf_users.measure.scrape"):
        with server_metrics_sampler(f"http://user:secret@127.0.0.1:{port}/metrics", path, interval_s=0.05) as sampler:
            wait_for(lambda: sampler.misses >= 3, "three failed readings")
    assert read_samples(path) == []
    assert window_summary(read_samples(path), 0.0, time.time()) == NOT_AVAILABLE
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "not reachable" in warning and "secret" not in warning


def test_the_sampler_against_the_simulator_matches_its_own_counters(tmp_path):
    profile = load_profile()
    path = tmp_path / SERVER_METRICS_FILE
    messages = [{"role": "user", "content": "count these words " * 300}]
    with simulator() as sim, server_metrics_sampler(f"{sim.url}/metrics", path, interval_s=0.2), \
            OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0) as sdk:
        wait_for(lambda: len(lines(path)) >= 1, "a first reading")
        before, start = scrape(sim.url), time.time()  # nothing runs: equal to the reading before start
        replies = [sdk.chat.completions.create(model=profile.model.name, messages=messages, max_tokens=16,
                                               extra_body={"ignore_eos": True}) for _ in range(3)]
        after, done = scrape(sim.url), time.time()
        wait_for(lambda: lines(path)[-1]["epoch_s"] > done, "a reading after the requests")
    samples = read_samples(path)
    end = next(s.epoch_s for s in samples if s.epoch_s > done)
    window = window_summary(samples, start, end)

    def delta(name: str) -> float:
        return sum(s.value for s in after[name]) - sum(s.value for s in before.get(name, ()))  # labelled: none before

    assert window.server == "vllm" and window.readings >= 1
    assert window.requests_finished == delta("vllm:request_success_total") == len(replies)
    cached = sum(reply.usage.prompt_tokens_details.cached_tokens for reply in replies)
    assert cached > 0  # the second and third requests reuse the first one's prefix
    assert window.prefix_cache_hit_ratio == pytest.approx(
        delta("vllm:prefix_cache_hits_total") / delta("vllm:prefix_cache_queries_total"))
    assert window.preemptions == delta("vllm:num_preemptions_total") == 0
    assert window.ttft_mean_s == pytest.approx(
        delta("vllm:time_to_first_token_seconds_sum") / delta("vllm:time_to_first_token_seconds_count"))
    assert 0 <= window.kv_cache_usage_max <= 1 and window.requests_waiting_max >= 0
    assert window.simulator_write_late_mean_s == pytest.approx(
        delta("agentperf_sim_write_late_seconds_sum") / delta("agentperf_sim_write_late_seconds_count"))
    assert window.simulator_time_lost_share == pytest.approx(
        delta("agentperf_sim_clock_slip_seconds_total") / (end - start))

"""Why a step failed: each cause from constructed verdicts, client numbers and server windows, the order
of precedence between them, the not-available path, and the load generator's CPU meter."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from agentperf_users.measure.diagnose import (
    KV_USAGE_PRESSURE,
    LOADGEN_CPU_BUSY,
    LONE_RUNNING,
    SIMULATOR_TIME_LOST_SHARE,
    SIMULATOR_WRITE_LATE_S,
    Cause,
    ClientWindow,
    CpuReading,
    LoadGenerator,
    client_window,
    cpu_fraction,
    diagnose,
    read_cpu,
)
from agentperf_users.measure.records import RequestRecord, Status
from agentperf_users.measure.server_metrics import NOT_AVAILABLE, ServerWindow
from agentperf_users.measure.slo import SloTier, evaluate

TIER = SloTier(name="aa-20tps", ttft_max_s=10.0, output_tps_min=20.0, scope="request")


def record(ttft_s: float = 1.0, tps: float = 40.0, status: Status = Status.OK, agent: int = 0,
           prompt: int = 1000, cached: int = 900) -> RequestRecord:
    ok = status is Status.OK
    return RequestRecord(
        run_id="run", worker_id="w1", agent=agent, trajectory="t", turn=1, load_step=0,
        scheduled_start_epoch_s=0.0, start_epoch_s=0.0, end_epoch_s=1.0, ttfb_s=ttft_s if ok else None,
        ttft_s=ttft_s if ok else None, e2e_s=ttft_s + 5.0, itl_p50_s=None, itl_p95_s=None, itl_max_s=None,
        output_tokens=100, output_tokens_estimated=False, prompt_tokens=prompt, cached_tokens=cached,
        output_tps=tps if ok else None, status=status)


# TTFT fails (p95 12 s > 10 s) with a mean of 5.7 s; speed fails (p5 15 tok/s < 20); both pass.
SLOW_FIRST_TOKENS = [record(ttft_s=5.0)] * 90 + [record(ttft_s=12.0)] * 10
SLOW_TOKENS = [record(ttft_s=1.0, tps=40.0)] * 90 + [record(ttft_s=1.0, tps=15.0)] * 10
GOOD = [record()] * 100

SERVER = replace(
    NOT_AVAILABLE, server="vllm", readings=20, requests_running_mean=8.0, requests_running_max=10.0,
    requests_waiting_mean=0.0, requests_waiting_max=0.0, kv_cache_usage_mean=0.6, kv_cache_usage_max=0.8,
    prefix_cache_hit_ratio=0.9, preemptions=0.0, requests_finished=100.0, queue_time_mean_s=0.1,
    prefill_time_mean_s=0.5, decode_time_mean_s=4.0, ttft_mean_s=0.7, inter_token_latency_mean_s=0.02,
)
SLOW_SERVER = replace(SERVER, ttft_mean_s=5.5, queue_time_mean_s=1.0, prefill_time_mean_s=1.0)  # no phase is most
QUEUEING = replace(SERVER, requests_waiting_mean=3.2, requests_waiting_max=6.0, queue_time_mean_s=4.1,
                   prefill_time_mean_s=1.0, ttft_mean_s=5.3)
PREFILL = replace(SERVER, requests_waiting_mean=0.1, queue_time_mean_s=0.2, prefill_time_mean_s=4.8, ttft_mean_s=5.3,
                  prefix_cache_hit_ratio=0.05)
DECODE = replace(SERVER, requests_running_mean=14.2, requests_running_max=16.0, inter_token_latency_mean_s=0.048,
                 ttft_mean_s=0.9)


def why(records: list[RequestRecord], server: ServerWindow, loadgen: LoadGenerator | None = None,
        tier: SloTier = TIER):
    verdict = evaluate(records, tier)
    assert not verdict.passed
    return diagnose(verdict, client_window(records), server, loadgen)


def test_queueing_when_requests_wait_and_queue_time_is_most_of_ttft():
    diagnosis = why(SLOW_FIRST_TOKENS, QUEUEING)
    assert diagnosis.cause is Cause.QUEUEING and diagnosis.about_capacity and diagnosis.tier == "aa-20tps"
    assert diagnosis.text == "why: queueing — 3.2 requests waiting on average, queue time 77 % of TTFT (4.1 s of 5.3 s)"
    assert dict(diagnosis.evidence) == {"requests_waiting_mean": 3.2, "queue_time_mean_s": 4.1,
                                        "server_ttft_mean_s": 5.3}
    assert why(SLOW_FIRST_TOKENS, replace(QUEUEING, requests_waiting_mean=0.0)).cause is not Cause.QUEUEING


def test_prefill_when_it_is_most_of_ttft_with_cold_contexts():
    diagnosis = why(SLOW_FIRST_TOKENS, PREFILL)
    assert diagnosis.cause is Cause.PREFILL
    assert diagnosis.text == ("why: prefill — prefill time 91 % of TTFT (4.8 s of 5.3 s), "
                              "prefix-cache hits 5 % (cold contexts)")


def test_sglang_has_no_prefill_histogram_so_prefill_is_ttft_less_queue_time():
    sglang = replace(PREFILL, server="sglang", prefill_time_mean_s=None, queue_time_mean_s=0.5)
    diagnosis = why(SLOW_FIRST_TOKENS, sglang)
    assert diagnosis.cause is Cause.PREFILL
    assert "prefill time (TTFT − queue time) 91 % of TTFT (4.8 s of 5.3 s)" in diagnosis.text
    assert dict(diagnosis.evidence)["prefill_time_mean_s"] == pytest.approx(4.8)


def test_kv_cache_pressure_comes_before_the_queueing_it_causes():
    full = replace(QUEUEING, kv_cache_usage_max=0.97, kv_cache_usage_mean=0.91, preemptions=14.0)
    diagnosis = why(SLOW_FIRST_TOKENS, full)
    assert diagnosis.cause is Cause.KV_CACHE and diagnosis.also == (Cause.QUEUEING,)
    assert diagnosis.text == "why: KV-cache pressure — KV cache 97 % full at most (mean 91 %), 14 preemptions"
    at_limit = replace(SLOW_SERVER, kv_cache_usage_max=KV_USAGE_PRESSURE)
    assert why(SLOW_FIRST_TOKENS, at_limit).cause is Cause.KV_CACHE
    assert why(SLOW_FIRST_TOKENS, replace(SLOW_SERVER, preemptions=1.0)).cause is Cause.KV_CACHE
    below = why(SLOW_FIRST_TOKENS, replace(SLOW_SERVER, kv_cache_usage_max=0.94))
    assert below.cause is Cause.NOT_IDENTIFIED
    assert below.text == "why: not identified — no cause reached its threshold (TTFT p95 12 s > 10 s)"


def test_decode_batch_when_the_speed_floor_fails_with_a_slow_batch():
    diagnosis = why(SLOW_TOKENS, DECODE)
    assert diagnosis.cause is Cause.DECODE_BATCH
    assert diagnosis.text == ("why: decode batch — inter-token latency 48 ms (the 20 tok/s floor allows 50 ms) "
                              "with 14.2 requests running on average (max 16)")
    fast_server = replace(DECODE, inter_token_latency_mean_s=0.01)  # the server decodes fast: not its batch
    alone = replace(DECODE, requests_running_mean=1.0, requests_running_max=1.0)
    assert why(SLOW_TOKENS, fast_server).cause is Cause.NOT_IDENTIFIED
    assert why(SLOW_TOKENS, alone).cause is Cause.DECODE_SPEED  # no batch: the server's own speed
    assert why(SLOW_TOKENS, QUEUEING).cause is Cause.NOT_IDENTIFIED  # queueing is a TTFT cause, not speed's


def test_decode_speed_when_a_request_decoding_alone_is_slower_than_the_floor():
    """One agent on a server whose single stream decodes at ~33 tok/s against a 60 tok/s floor: no count of
    agents passes, and the diagnosis says so rather than "not identified"."""
    tier = SloTier(name="60tps", ttft_max_s=5.0, output_tps_min=60.0, scope="agent", agents_passing=0.95)
    records = [record(tps=33.0)] * 20
    one_agent = replace(SERVER, requests_running_mean=0.93, requests_running_max=1.0, inter_token_latency_mean_s=0.0303)
    diagnosis = why(records, one_agent, tier=tier)
    assert diagnosis.cause is Cause.DECODE_SPEED and diagnosis.about_capacity and diagnosis.also == ()
    assert diagnosis.text == ("why: decode speed — inter-token latency 30.3 ms (the 60 tok/s floor allows 16.7 ms) "
                              "with 0.93 requests running on average: the server decodes a request alone slower "
                              "than the floor, so no agent count can pass this tier on this server")
    assert dict(diagnosis.evidence) == {"inter_token_latency_mean_s": 0.0303,
                                        "floor_inter_token_latency_s": pytest.approx(1 / 60),
                                        "requests_running_mean": 0.93}
    # Just below two requests running it is still the server's own speed, but not a lone request's: a lower
    # count may pass, and the words do not say that none can; at two, a batch shares the steps.
    few = why(records, replace(one_agent, requests_running_mean=1.9), tier=tier)
    assert few.cause is Cause.DECODE_SPEED and "no agent count" not in few.text
    assert few.text.endswith("with 1.9 requests running on average: the server's own decode steps are too slow for "
                             "the floor even with so few requests sharing them; only fewer agents, if any, can pass "
                             "this tier")
    assert "no agent count" in why(records, replace(one_agent, requests_running_mean=LONE_RUNNING), tier=tier).text
    assert why(records, replace(one_agent, requests_running_mean=2.0), tier=tier).cause is Cause.DECODE_BATCH
    # A single stream that decodes well within the floor's gap is not what failed the floor.
    quick = replace(one_agent, inter_token_latency_mean_s=0.8 / 60 * 0.99)
    assert why(records, quick, tier=tier).cause is Cause.NOT_IDENTIFIED


def streams(tps: float, gap_s: float, count: int) -> list[RequestRecord]:
    return [replace(record(tps=tps), itl_p50_s=gap_s)] * count


def test_decode_stalls_when_the_slow_requests_steady_gap_meets_the_floor_but_pauses_do_not():
    """The real vLLM's failing steps (issue 11): the floor failed at the tail while the mean inter-token latency
    was well inside it, "not identified" before. The slow requests' own median gap (30 ms) meets the 20 tok/s
    floor's 50 ms; at 15 tok/s they spent 1 - 0.030 x 15 = 55 % of their decode time in longer pauses."""
    stalled = streams(40.0, 0.024, 90) + streams(15.0, 0.030, 10)
    fast_mean = replace(SERVER, inter_token_latency_mean_s=0.028)  # the mean hides the pauses
    diagnosis = why(stalled, fast_mean)
    assert diagnosis.cause is Cause.DECODE_STALLS and diagnosis.about_capacity
    assert diagnosis.text == ("why: decode stalls — 10 requests under the 20 tok/s floor streamed at a median gap of "
                              "30 ms (the floor allows 50 ms) but spent 55 % of their decode time in longer pauses; "
                              "the server prefilled other requests meanwhile (500 ms per prefill on average): a "
                              "prefill in the step pauses every request decoding")
    assert dict(diagnosis.evidence)["stalled_share"] == pytest.approx(0.55)
    assert why(stalled, replace(fast_mean, prefill_time_mean_s=None)).text.endswith("in longer pauses")
    # Before the batch: a batch's slow mean is there too, but the client saw pauses, not slow steps.
    assert why(stalled, DECODE).cause is Cause.DECODE_STALLS and why(stalled, DECODE).also == (Cause.DECODE_BATCH,)


def test_a_steady_slow_gap_is_not_stalls():
    steady = streams(40.0, 0.024, 90) + streams(15.0, 0.066, 10)  # 1 - 0.066 x 15 = 1 %: no pauses, slow steps
    assert why(steady, DECODE).cause is Cause.DECODE_BATCH
    at_the_gap = streams(40.0, 0.024, 90) + streams(15.0, 0.050, 10)  # 25 % paused, but the gap is the floor's
    assert why(at_the_gap, DECODE).cause is Cause.DECODE_BATCH
    assert why(streams(40.0, 0.024, 90) + streams(15.0, 0.030, 10), replace(SERVER, prefill_time_mean_s=None)
               ).cause is Cause.DECODE_STALLS  # 55 % paused: the same with no prefill to name
    assert why(streams(40.0, 0.024, 90) + streams(18.0, 0.0395, 10), replace(SERVER, inter_token_latency_mean_s=0.01)
               ).cause is Cause.NOT_IDENTIFIED  # 1 - 0.0395 x 18 = 29 % paused, a gap under 80 % of 50 ms: neither
    assert why(SLOW_TOKENS, replace(SERVER, inter_token_latency_mean_s=0.01)).cause is Cause.NOT_IDENTIFIED  # no gaps


def test_a_slow_tail_that_the_servers_mean_hides_is_decode_batch_by_the_slow_requests_own_gap():
    """The real vLLM's 13-agent step (seed 1 of benchmarks/engine_capacity.py, "not identified" before): one
    request at 18.8 tok/s decoding at a median gap of 41.7 ms, 83 % of the floor's 50 ms, among requests at
    ~25 tok/s, while the server's mean over all of them was 35.8 ms (72 %); 22 % of its time paused."""
    tail = streams(25.0, 0.032, 9) + streams(18.8, 0.0417, 1)  # one in ten under the floor: fewer than 95 % meet it
    server = replace(SERVER, inter_token_latency_mean_s=0.0358, requests_running_mean=11.3, requests_running_max=13.0)
    diagnosis = why(tail, server)
    assert diagnosis.cause is Cause.DECODE_BATCH
    assert diagnosis.text == ("why: decode batch — the 1 request under the floor decoded at a median gap of 41.7 ms "
                              "(the 20 tok/s floor allows 50 ms) with 11.3 requests running on average (max 13)")
    assert dict(diagnosis.evidence)["slow_median_gap_s"] == 0.0417 and "inter_token_latency_mean_s" not in dict(
        diagnosis.evidence)
    alone = replace(server, requests_running_mean=1.0)
    assert why(tail, alone).cause is Cause.DECODE_SPEED  # the same tail with no batch: the server's own speed
    assert " with 1 request running on average: " in why(tail, alone).text


def test_a_ttft_failing_at_one_agent_with_nothing_waiting_is_prefill():
    """The TTFT counterpart of decode speed needs no cause of its own: with nothing waiting, queue time is
    near zero and prefill is most of the server's TTFT."""
    alone = replace(SERVER, requests_running_mean=0.9, requests_running_max=1.0, requests_waiting_mean=0.0,
                    queue_time_mean_s=0.002, prefill_time_mean_s=5.1, ttft_mean_s=5.2, prefix_cache_hit_ratio=0.8)
    diagnosis = why(SLOW_FIRST_TOKENS, alone)
    assert diagnosis.cause is Cause.PREFILL and diagnosis.text.endswith("prefix-cache hits 80 %")


def test_decode_batch_is_considered_when_too_few_agents_pass_but_the_pooled_quantiles_do():
    tier = SloTier(name="per-agent", ttft_max_s=10.0, output_tps_min=20.0, scope="agent", agents_passing=0.95)
    records = [record(agent=a, tps=10.0 if a < 2 and r == 0 else 40.0) for a in range(20) for r in range(10)]
    verdict = evaluate(records, tier)
    assert not verdict.passed and verdict.output_tps_quantile >= 20.0  # 18 of 20 agents; pooled p5 passes
    # The pooled speed (p5 40 tok/s, twice the floor) came closer to its limit than TTFT (1 s, a tenth): speed.
    prefill_most = replace(DECODE, prefill_time_mean_s=0.8)
    diagnosis = diagnose(verdict, client_window(records), prefill_most)
    assert diagnosis.cause is Cause.DECODE_BATCH and diagnosis.also == ()


def test_most_requests_failing_is_a_failing_server_before_anything_else():
    records = [record(status=Status.HTTP_5XX)] * 60 + [record()] * 40
    full = replace(QUEUEING, kv_cache_usage_max=0.99)
    diagnosis = why(records, full, LoadGenerator((("w1", 0.97),)))
    assert diagnosis.cause is Cause.SERVER_ERRORS and not diagnosis.about_capacity
    assert diagnosis.text == ("why: server errors — 60 % of 100 requests failed (http_5xx 60): "
                              "a failing server, not a capacity verdict")
    assert diagnosis.also == (Cause.LOAD_GENERATOR, Cause.KV_CACHE, Cause.QUEUEING)  # errors listed once


def test_requests_the_server_rejects_are_its_configuration_not_its_capacity():
    records = [record(status=Status.HTTP_4XX)] * 5 + [record()] * 95
    diagnosis = why(records, SERVER)
    assert diagnosis.cause is Cause.SERVER_ERRORS and not diagnosis.about_capacity
    assert "5 % of 100 requests failed (http_4xx 5): the server rejected them" in diagnosis.text


def test_a_few_timeouts_over_the_tiers_error_rate_are_a_capacity_fail_after_the_load_generator():
    records = [record(status=Status.TIMEOUT)] * 3 + [record()] * 97
    diagnosis = why(records, SERVER)
    assert diagnosis.cause is Cause.SERVER_ERRORS and diagnosis.about_capacity
    assert diagnosis.text == "why: server errors — 3 % of 100 requests failed (timeout 3), more than the tier's 1 %"
    busy = why(records, SERVER, LoadGenerator((("w1", 0.2), ("w2", LOADGEN_CPU_BUSY))))
    assert busy.cause is Cause.LOAD_GENERATOR and busy.also == (Cause.SERVER_ERRORS,)


def test_a_busy_worker_makes_the_verdict_not_about_the_server():
    diagnosis = why(SLOW_FIRST_TOKENS, QUEUEING, LoadGenerator((("w1", 0.4), ("w2", 0.96))))
    assert diagnosis.cause is Cause.LOAD_GENERATOR and not diagnosis.about_capacity
    assert diagnosis.text == ("why: the load generator — worker w2 used 96 % of a core: "
                              "the verdict is not about the server")
    assert diagnosis.also == (Cause.QUEUEING,)
    assert why(SLOW_FIRST_TOKENS, QUEUEING, LoadGenerator((("w1", 0.89),))).cause is Cause.QUEUEING


def test_a_simulator_that_fell_behind_real_time_makes_the_verdict_not_about_the_modelled_server():
    behind = replace(QUEUEING, simulator_time_lost_share=SIMULATOR_TIME_LOST_SHARE, simulator_write_late_mean_s=0.031)
    diagnosis = why(SLOW_FIRST_TOKENS, behind)
    assert diagnosis.cause is Cause.SIMULATOR and not diagnosis.about_capacity
    assert diagnosis.text == ("why: the simulator's host — agentperf's simulator lost 10 % of its engine time to "
                              "falling behind real time and wrote its tokens 31 ms after their steps on average: "
                              "the verdict is about the machine it runs on, not the modelled server")
    assert dict(diagnosis.evidence) == {"simulator_time_lost_share": SIMULATOR_TIME_LOST_SHARE,
                                        "simulator_write_late_mean_s": 0.031}
    assert diagnosis.also == (Cause.QUEUEING,)
    # Late tokens without a clock jump are the host too, named before the load generator (whose client TTFT
    # far above the server's is what late tokens would look like).
    late = replace(QUEUEING, simulator_time_lost_share=0.0, simulator_write_late_mean_s=SIMULATOR_WRITE_LATE_S)
    found = why(SLOW_FIRST_TOKENS, late, LoadGenerator((("w1", 0.96),)))
    assert (found.cause, found.also) == (Cause.SIMULATOR, (Cause.LOAD_GENERATOR, Cause.QUEUEING))
    # A simulator that kept up, or a server without these metrics (a vLLM: None), leaves it to the server.
    kept_up = replace(behind, simulator_time_lost_share=SIMULATOR_TIME_LOST_SHARE * 0.99,
                      simulator_write_late_mean_s=SIMULATOR_WRITE_LATE_S * 0.99)
    assert why(SLOW_FIRST_TOKENS, kept_up).cause is Cause.QUEUEING
    assert why(SLOW_FIRST_TOKENS, QUEUEING).cause is Cause.QUEUEING


def test_client_ttft_far_above_the_servers_is_the_load_generator():
    quick_server = replace(SERVER, ttft_mean_s=0.3)  # the client's mean is 5.7 s
    diagnosis = why(SLOW_FIRST_TOKENS, quick_server)
    assert diagnosis.cause is Cause.LOAD_GENERATOR and not diagnosis.about_capacity
    assert "client TTFT 5.7 s against the server's own 300 ms (means)" in diagnosis.text
    # What HTTP and the front end add (a client mean 10 % above the server's) is not "far above".
    assert why(SLOW_FIRST_TOKENS, replace(QUEUEING, ttft_mean_s=5.2)).cause is Cause.QUEUEING


def test_without_server_metrics_only_the_clients_numbers_name_a_cause():
    diagnosis = why(SLOW_FIRST_TOKENS, NOT_AVAILABLE)
    assert diagnosis.cause is Cause.NOT_AVAILABLE and diagnosis.about_capacity
    assert diagnosis.text == "why: not available — the server gave no metrics; the client saw TTFT p95 12 s > 10 s"
    failing = [record(status=Status.HTTP_5XX)] * 70 + [record()] * 30
    assert why(failing, NOT_AVAILABLE).cause is Cause.SERVER_ERRORS
    assert why(SLOW_FIRST_TOKENS, NOT_AVAILABLE, LoadGenerator((("w1", 1.3),))).cause is Cause.LOAD_GENERATOR


def test_a_passing_tier_has_no_diagnosis_and_a_failing_ones_dict_is_json():
    verdict = evaluate(GOOD, TIER)
    assert verdict.passed and diagnose(verdict, client_window(GOOD), SERVER) is None
    data = why(SLOW_FIRST_TOKENS, replace(QUEUEING, preemptions=2.0)).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["cause"] == "KV-cache pressure" and data["also"] == ["queueing"] and data["about_capacity"] is True
    assert data["evidence"]["preemptions"] == 2.0 and data["text"].startswith("why: KV-cache pressure — ")


def test_the_client_window_counts_failures_by_status_and_leaves_cancelled_requests_out():
    records = [record(ttft_s=2.0, prompt=1000, cached=250), record(ttft_s=4.0, prompt=3000, cached=750),
               record(status=Status.TIMEOUT), record(status=Status.HTTP_5XX), record(status=Status.HTTP_5XX),
               record(status=Status.CANCELLED)]
    client = client_window(records)
    assert client == ClientWindow(requests=5, errors_by_status=(("http_5xx", 2), ("timeout", 1)), ttft_mean_s=3.0,
                                  cached_fraction=pytest.approx((250 + 750 + 3 * 900) / (1000 + 3000 + 3 * 1000)))
    assert client.errors == 3 and client.error_rate == pytest.approx(0.6)
    assert client_window([]) == ClientWindow(0, (), None, None)


def test_cpu_fraction_is_cpu_time_over_wall_time():
    assert cpu_fraction(CpuReading(10.0, 1.0), CpuReading(12.0, 2.5)) == pytest.approx(0.75)
    assert cpu_fraction(CpuReading(10.0, 1.0), CpuReading(10.0, 1.5)) is None
    assert LoadGenerator((("w1", 0.5), ("w2", 0.7))).busiest() == ("w2", 0.7)
    assert LoadGenerator(()).busiest() is None


def test_a_busy_process_reads_a_positive_cpu_fraction():
    before = read_cpu()
    deadline = time.monotonic() + 30.0
    while time.process_time() - before.cpu_s < 0.05:  # spin: this process burns CPU time
        assert time.monotonic() < deadline, "no CPU time in 30 s"
    after = read_cpu()
    assert after.cpu_s - before.cpu_s >= 0.05 and after.wall_s > before.wall_s
    assert cpu_fraction(before, after) > 0

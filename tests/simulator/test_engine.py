"""The engine on a virtual clock: step times, batching, chunked prefill, prefix reuse, preemption, limits."""

from __future__ import annotations

import pytest

from agentperf_users.simulator.engine import (
    ContextLengthError,
    Engine,
    EngineRequest,
    EngineStep,
    QueueFullError,
)
from agentperf_users.simulator.profile import (
    DEFAULT_PROFILE,
    Profile,
    SimulatorError,
    attention_pairs,
    load_profile,
)
from agentperf_users.tokens import BLOCK_SIZE, PromptEncoder
from tests.simulator import custom_profile, make_prompt


@pytest.fixture(scope="module")
def profile() -> Profile:
    return load_profile(DEFAULT_PROFILE)


def drain(engine: Engine, now_s: float = 0.0) -> tuple[list[EngineStep], float]:
    """Step until idle on a virtual clock; the steps and the clock at the end."""
    steps = []
    while (result := engine.step(now_s)) is not None:
        steps.append(result)
        now_s += result.duration_s
    return steps, now_s


def request(request_id: str, num_tokens: int, output_tokens: int, conversation: int = 0,
            arrival_s: float = 0.0) -> EngineRequest:
    return EngineRequest(request_id, make_prompt(num_tokens, conversation), output_tokens, arrival_s)


def test_step_times_equal_the_profile_formula_for_the_scheduled_work(profile):
    engine = Engine(profile)
    req = request("r", 1000, 4)
    engine.submit(req)
    steps, end_s = drain(engine)
    assert [s.prefill_tokens for s in steps] == [1000, 0, 0, 0]
    assert [s.decode_batch for s in steps] == [0, 1, 1, 1]
    assert steps[0].duration_s == profile.step_time_s(1000, 0, attention_pairs(1000, 0), 0, 0)
    for i, step in enumerate(steps[1:]):  # each decode attends over the prompt, earlier outputs and itself
        assert step.duration_s == profile.step_time_s(decode_batch=1, decode_context_tokens=1000 + i + 1)
    assert req.first_token_s == steps[0].duration_s
    assert req.finished_s == end_s
    assert req.generated == 4
    assert [s.start_s for s in steps[1:]] == pytest.approx([sum(x.duration_s for x in steps[:i]) for i in range(1, 4)])
    assert engine.counters.busy_s_total == pytest.approx(end_s)
    assert engine.counters.generation_tokens_total == 4
    assert engine.counters.prompt_tokens_total == 1000


def test_batching_raises_per_token_latency_as_the_profile_predicts(profile):
    def decode_step(concurrency: int) -> tuple[EngineStep, int]:
        """The first pure-decode step of ``concurrency`` requests, and the context they attend over."""
        engine = Engine(profile)
        requests = [request(f"r{i}", 2048, 200, conversation=i) for i in range(concurrency)]
        for req in requests:
            engine.submit(req)
        now_s = 0.0
        while not all(req.generated for req in requests):
            now_s += engine.step(now_s).duration_s
        # A decoding sequence attends over its prompt, the outputs so far (the last one is being fed) ...
        context = sum(req.prompt.num_tokens + req.generated for req in requests)
        return engine.step(now_s), context

    (single, single_context), (batch, batch_context) = decode_step(1), decode_step(64)
    assert (single.decode_batch, batch.decode_batch) == (1, 64)
    assert single.duration_s == profile.step_time_s(decode_batch=1, decode_context_tokens=single_context)
    assert batch.duration_s == profile.step_time_s(decode_batch=64, decode_context_tokens=batch_context)
    assert batch_context == pytest.approx(64 * 2048, rel=0.01)
    assert batch.duration_s / single.duration_s == pytest.approx(
        profile.decode_step_s(64) / profile.decode_step_s(1), rel=0.01)
    assert batch.duration_s > 1.5 * single.duration_s  # slower per step ...
    assert batch.duration_s / 64 < single.duration_s / 10  # ... but far more tokens per second in aggregate


def test_chunked_prefill_respects_the_token_budget(profile):
    budget = profile.engine.max_num_batched_tokens
    engine = Engine(profile)
    assert budget == 8192
    long, short = request("long", 20000, 2), request("short", 6000, 2, conversation=1)
    engine.submit(long)
    engine.submit(short)
    steps, _ = drain(engine)
    assert all(s.prefill_tokens + s.decode_batch <= budget for s in steps)
    # 20000 = 8192 + 8192 + 3616; the short request takes the 4576 left in step 3, then its last 1424.
    assert [s.prefill_tokens for s in steps[:4]] == [8192, 8192, 8192, 1424]
    assert steps[2].emitted == (long,)  # the step computing the last prompt token emits the first token
    assert long.first_token_s == steps[2].start_s + steps[2].duration_s
    assert steps[3].emitted == (short, long) and steps[3].decode_batch == 1
    assert short.first_token_s == steps[3].start_s + steps[3].duration_s
    assert steps[2].duration_s == profile.step_time_s(
        8192, 16384 + 0, attention_pairs(3616, 16384) + attention_pairs(4576, 0), 0, 0)
    # Chunk 2 attends over chunk 1: its cost includes the pairs with the prior context.
    assert steps[1].duration_s == profile.step_time_s(budget, budget, attention_pairs(budget, budget), 0, 0)


def test_shared_prefix_is_served_from_the_cache(profile):
    encoder = PromptEncoder()
    system = {"role": "system", "content": "You are a coding agent. " * 400}
    turn1 = [system, {"role": "user", "content": "Fix the failing test in module alpha. " * 50}]
    turn2 = turn1 + [{"role": "assistant", "content": "Looking at the test now. " * 20},
                     {"role": "user", "content": "Tool result: the test output follows. " * 100}]
    first_prompt, second_prompt = encoder.encode(turn1), encoder.encode(turn2)
    shared_blocks = first_prompt.num_tokens // BLOCK_SIZE
    assert second_prompt.block_hashes[:shared_blocks] == first_prompt.block_hashes

    engine = Engine(profile)
    first = EngineRequest("t1", first_prompt, 5, 0.0)
    engine.submit(first)
    _, now_s = drain(engine)
    second = EngineRequest("t2", second_prompt, 5, now_s)
    engine.submit(second)
    steps, _ = drain(engine, now_s)
    assert first.cached_tokens == 0
    assert second.cached_tokens >= shared_blocks * BLOCK_SIZE
    assert steps[0].prefill_tokens == second_prompt.num_tokens - second.cached_tokens
    cold = Engine(profile)
    cold_second = EngineRequest("cold", second_prompt, 5, 0.0)
    cold.submit(cold_second)
    cold_steps, _ = drain(cold)
    assert cold_steps[0].prefill_tokens == second_prompt.num_tokens
    assert second.first_token_s - second.arrival_s < cold_second.first_token_s - cold_second.arrival_s
    assert engine.counters.prefix_hits_tokens == second.cached_tokens
    assert engine.counters.prefix_queries_tokens == first_prompt.num_tokens + second_prompt.num_tokens


def test_identical_prompt_recomputes_only_its_last_block(profile):
    engine = Engine(profile)
    engine.submit(request("a", 3200, 1))
    drain(engine)
    again = request("b", 3200, 1)
    engine.submit(again)
    steps, _ = drain(engine)
    assert again.cached_tokens == 3200 - BLOCK_SIZE
    assert steps[0].prefill_tokens == BLOCK_SIZE


def test_without_prefix_caching_an_identical_prompt_is_prefilled_whole(tmp_path):
    """``engine.enable_prefix_caching: false`` (a vLLM run so): the same prompt again is no hit, its whole
    length is prefilled, and the server says so on its cache info."""
    engine = Engine(custom_profile(tmp_path, {"engine.enable_prefix_caching": False}))
    engine.submit(request("a", 3200, 1))
    drain(engine)
    again = request("b", 3200, 1)
    engine.submit(again)
    steps, _ = drain(engine)
    assert again.cached_tokens == 0 and sum(step.prefill_tokens for step in steps) == 3200
    assert engine.counters.prefix_hits_tokens == 0 and engine.counters.prefix_queries_tokens == 6400


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_prefix_caching_is_true_or_false_in_one_line(tmp_path, value):
    with pytest.raises(SimulatorError) as raised:
        custom_profile(tmp_path, {"engine.enable_prefix_caching": value})
    assert "engine.enable_prefix_caching: expected true or false" in str(raised.value)


def small_kv_profile(tmp_path, kv_gib: float = 1.0, **changes) -> Profile:
    """Default profile with ``kv_gib`` of KV cache (8192 tokens per GiB) and a 4K context: easy to exhaust."""
    utilisation = (14.99 + 5.65 + kv_gib) / 79.2
    return custom_profile(tmp_path, {"engine.gpu_memory_utilization": utilisation, "model.max_context_tokens": 4096,
                                     **changes})


def test_kv_exhaustion_preempts_and_every_request_still_completes(tmp_path):
    profile = small_kv_profile(tmp_path)
    assert 8000 <= profile.kv_capacity_tokens <= 8200
    engine = Engine(profile)
    requests = [request(f"r{i}", 1500, 1000, conversation=i) for i in range(8)]  # 8 x 2500 tokens > 8K
    for req in requests:
        engine.submit(req)
    steps, _ = drain(engine)
    assert engine.counters.preemptions_total > 0
    assert engine.counters.preemptions_total == sum(req.preemptions for req in requests)
    assert all(req.generated == 1000 and req.finished_s is not None for req in requests)
    assert engine.counters.generation_tokens_total == sum(len(s.emitted) for s in steps) == 8 * 1000
    assert engine.counters.requests_finished_total == 8
    assert engine.counters.kv_usage == 0.0 and not engine.has_work()
    assert max(s.decode_batch for s in steps) * 1500 <= profile.kv_capacity_tokens
    # A preempted request recomputed its prompt and what it had generated: more prefill than prompts alone.
    assert sum(s.prefill_tokens for s in steps) > 8 * 1500


def test_recompute_preemption_victim_is_the_most_recently_admitted(tmp_path):
    profile = small_kv_profile(tmp_path, kv_gib=0.75)  # 6144 tokens: both prompts fit, their outputs do not
    engine = Engine(profile)
    older, newer = request("older", 3000, 1000), request("newer", 3000, 1000, conversation=1)
    engine.submit(older)
    engine.submit(newer)
    engine.step(0.0)
    assert engine.counters.num_running == 2
    while not (newer.preemptions or older.preemptions):
        engine.step(0.0)
    assert newer.preemptions == 1 and older.preemptions == 0
    assert engine.counters.num_running == 1 and engine.counters.num_waiting == 1
    drain(engine)
    assert older.finished_s < newer.finished_s


def test_max_num_seqs_caps_the_batch(tmp_path):
    engine = Engine(custom_profile(tmp_path, {"engine.max_num_seqs": 4}))
    for i in range(10):
        engine.submit(request(f"r{i}", 100, 5, conversation=i))
    steps, _ = drain(engine)
    assert max(s.decode_batch + (s.prefill_tokens > 0) for s in steps) <= 4
    assert max(s.decode_batch for s in steps) == 4


def test_full_waiting_queue_raises_queue_full(tmp_path):
    engine = Engine(custom_profile(tmp_path, {"engine.max_waiting_requests": 3}))
    for i in range(3):
        engine.submit(request(f"r{i}", 100, 5, conversation=i))
    with pytest.raises(QueueFullError) as info:
        engine.submit(request("r3", 100, 5))
    assert isinstance(info.value, SimulatorError)
    engine.step(0.0)  # admits the three: the queue has room again
    engine.submit(request("r3", 100, 5))
    assert engine.counters.num_waiting == 1 and engine.counters.num_running == 3


def test_context_limit_raises_with_the_numbers(profile):
    engine = Engine(profile)
    with pytest.raises(ContextLengthError) as info:
        engine.submit(request("big", 131000, 100))
    message = str(info.value)
    assert all(str(n) in message for n in (131072, 131100, 131000, 100))
    assert "\n" not in message
    engine.submit(request("fits", 131000, 72))
    assert engine.has_work()


def test_abort_frees_blocks_of_running_and_waiting_requests(tmp_path):
    engine = Engine(small_kv_profile(tmp_path, **{"engine.max_num_seqs": 1}))
    running, waiting = request("running", 3000, 500), request("waiting", 1000, 10, conversation=1)
    engine.submit(running)
    engine.submit(waiting)
    engine.step(0.0)
    assert engine.counters.kv_usage > 0 and engine.counters.num_waiting == 1
    engine.abort("running")
    engine.abort("waiting")
    engine.abort("never-submitted")
    assert engine.counters.kv_usage == 0.0
    assert not engine.has_work() and engine.step(1.0) is None


def test_same_submits_at_same_steps_give_identical_runs(profile):
    def run() -> list[tuple]:
        engine = Engine(profile, seed=11)
        trace, now_s = [], 0.0
        for round_ in range(40):
            for i in range(3):
                tokens = engine.sample_output_tokens(300)
                engine.submit(request(f"{round_}-{i}", 2000 + 500 * round_, tokens, conversation=i, arrival_s=now_s))
            for _ in range(5):
                result = engine.step(now_s)
                if result is None:
                    break
                now_s += result.duration_s
                trace.append((result.start_s, result.duration_s, tuple(r.request_id for r in result.emitted),
                              tuple(r.request_id for r in result.finished)))
        return trace + [drain(engine, now_s)[1]]

    assert run() == run()


def test_invalid_requests_are_rejected(profile):
    engine = Engine(profile)
    engine.submit(request("dup", 100, 1))
    with pytest.raises(ValueError):
        engine.submit(request("dup", 100, 1))
    with pytest.raises(ValueError):
        engine.submit(request("zero", 100, 0))


def test_sliding_window_layers_hold_a_constant_block_share_per_request():
    profile = load_profile("h100-gpt-oss-120b")
    engine = Engine(profile)
    engine.submit(request("a", 1600, 50))
    engine.submit(request("b", 160, 50, conversation=1))
    engine.step(0.0)
    window_blocks = profile.window_blocks_per_request
    assert window_blocks == 9
    assert engine.counters.kv_usage == pytest.approx((100 + 10 + 2 * window_blocks) / profile.kv_capacity_blocks)
    drain(engine)
    assert engine.counters.kv_usage == 0.0

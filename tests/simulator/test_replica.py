"""The live replica's ticker keeps the engine's clock on step boundaries and counts how far behind real
time it fell: the write lateness of each step's tokens and the modelled time a clock jump lost."""

from __future__ import annotations

import asyncio
import time

from agentperf_users.simulator import replica as replica_module
from agentperf_users.simulator.engine import EngineRequest
from agentperf_users.simulator.metrics import WRITE_LATE_BUCKETS_S
from agentperf_users.simulator.profile import load_profile
from agentperf_users.simulator.replica import MAX_CLOCK_SLIP_S, EngineReplica
from tests.simulator import make_prompt

STALL_S = 3 * MAX_CLOCK_SLIP_S  # past the slip limit and inside the last finite write-late bucket
assert WRITE_LATE_BUCKETS_S[-2] < STALL_S <= WRITE_LATE_BUCKETS_S[-1]


class ShiftedClock:
    """``time.monotonic`` moved forward by ``offset_s`` (a stall the loop never had), and running ``rate``
    times as fast as the real one (a host too slow for the modelled steps)."""

    def __init__(self, rate: float = 1.0):
        self.offset_s, self.rate = 0.0, rate
        self._start = time.monotonic()

    def monotonic(self) -> float:
        now = time.monotonic()
        return now + (now - self._start) * (self.rate - 1.0) + self.offset_s


class CollectingReply:
    """What the ticker drives of a reply: the engine time of each token, and the end."""

    def __init__(self, request: EngineRequest, done: asyncio.Event):
        self.request, self._done_event = request, done
        self.token_times: list[float] = []
        self.done = False

    def add_token(self, t_s: float) -> None:
        self.token_times.append(t_s)
        self.done = len(self.token_times) >= self.request.max_output_tokens

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        self._done_event.set()

    def fail(self, error) -> None:
        raise AssertionError(f"the reply failed: {error}")


def serve_one_request(monkeypatch, stall_after_steps: int | None, clock_rate: float = 1.0,
                      beside=None) -> tuple[EngineReplica, CollectingReply, list[float]]:
    """One 20-token request through a replica; after ``stall_after_steps`` steps the clock jumps
    :data:`STALL_S` ahead, as if the server had been descheduled that long. Also the steps' durations.
    ``beside``: a coroutine function run on the same loop meanwhile, given the replica."""
    clock = ShiftedClock(clock_rate)
    monkeypatch.setattr(replica_module, "time", clock)
    replica = EngineReplica(load_profile(), seed=0, model_name="m")
    durations: list[float] = []
    step = replica.engine.step

    def counting_step(start_s):
        result = step(start_s)
        durations.append(result.duration_s)
        if len(durations) == stall_after_steps:
            clock.offset_s += STALL_S
        return result

    replica.engine.step = counting_step

    async def run() -> CollectingReply:
        done = asyncio.Event()
        replica.start()
        request = EngineRequest("r", make_prompt(256), 20, clock.monotonic())
        replica.engine.submit(request)
        reply = CollectingReply(request, done)
        replica.add(reply)
        side = asyncio.get_running_loop().create_task(beside(replica)) if beside else None
        await asyncio.wait_for(done.wait(), timeout=30)
        if side is not None:
            side.cancel()
        replica._ticker.cancel()
        return reply

    return replica, asyncio.run(run()), durations


def exported(replica: EngineReplica) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.name + str(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(replica.metrics.render().decode())
            for sample in family.samples}


def test_a_stall_past_the_slip_limit_is_counted_as_lost_engine_time(monkeypatch):
    replica, reply, durations = serve_one_request(monkeypatch, stall_after_steps=5)
    metrics = exported(replica)
    lost = metrics["agentperf_sim_clock_slip_seconds_total[]"]
    # The jump came while the fifth step ran, so that step's own duration hid part of it.
    assert lost >= STALL_S - durations[4]
    # The step that saw the stall wrote its tokens at least STALL_S after the step's modelled end.
    late_above_slip = (metrics["agentperf_sim_write_late_seconds_count[]"]
                       - metrics[f"agentperf_sim_write_late_seconds_bucket[('le', '{WRITE_LATE_BUCKETS_S[-2]}')]"])
    assert late_above_slip >= 1
    assert metrics["agentperf_sim_write_late_seconds_count[]"] == len(durations)  # one per step
    assert_steps_back_to_back_but_for_the_slip(reply, durations, lost)


def test_a_replica_that_keeps_up_keeps_its_steps_back_to_back(monkeypatch):
    replica, reply, durations = serve_one_request(monkeypatch, stall_after_steps=None)
    metrics = exported(replica)
    assert metrics["agentperf_sim_write_late_seconds_count[]"] == len(durations) == len(reply.token_times)
    # A loaded machine may still stall the loop past the limit; then the slip says by how much.
    assert_steps_back_to_back_but_for_the_slip(reply, durations, metrics["agentperf_sim_clock_slip_seconds_total[]"])


def assert_steps_back_to_back_but_for_the_slip(reply: CollectingReply, durations: list[float], lost_s: float) -> None:
    """Each step makes one token of the one request, so from the first token to the last the engine spent
    every later step's duration, and the clock lost exactly what the slip counter says."""
    assert len(reply.token_times) == len(durations) == reply.request.max_output_tokens
    spent = reply.token_times[-1] - reply.token_times[0]
    assert abs(spent - (sum(durations[1:]) + lost_s)) < 1e-6


def test_a_replica_behind_real_time_still_lets_the_loop_serve_others(monkeypatch):
    """A clock running 1,000 times fast: every step is over before it is computed, so the ticker never
    sleeps. It must still yield each step, or the loop could read no request and no scrape (and tick no
    other replica) until the engine ran out of work."""
    seen_while_running = []

    async def watch(replica: EngineReplica) -> None:
        while True:
            seen_while_running.append(bool(replica.replies))
            await asyncio.sleep(0)

    replica, reply, durations = serve_one_request(monkeypatch, stall_after_steps=None, clock_rate=1000.0, beside=watch)
    assert len(reply.token_times) == len(durations) == reply.request.max_output_tokens
    assert sum(seen_while_running) >= len(durations) // 2  # the loop ran other work while the reply streamed

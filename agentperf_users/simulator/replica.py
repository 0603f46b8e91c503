"""One replica of the live simulator: an engine, its metrics, the replies it streams, and its one ticker.

Why one ticker: one Python core must sustain tens of thousands of streamed tokens a second, and a timer
per stream caps a core near 20K chunks/s. Here a single coroutine steps the engine, sleeps until the
step's tokens exist (step start plus duration, on ``time.monotonic()``), and writes each stream's bytes
for that step with one ``transport.write``. Chunk bytes are pre-encoded per stream (:mod:`.reply`) and
built while the ticker waits, so at the step's end only the writes remain.

The engine's clock is the step boundary, not the moment the server gets round to the next step: while
the engine has work, a step starts where the previous one ended, so the server's own overhead does not
slow the modelled GPU. If the server falls more than ``MAX_CLOCK_SLIP_S`` behind, the clock jumps to now.
Both are counted (:mod:`.metrics`: how late each step's tokens were written, and the modelled time a jump
lost), so a run can tell a modelled server's limit from its simulator's host falling behind.

With ``agentperf simulate --replicas N`` the server (:mod:`.server`) holds N of these on one event loop,
each stepping on its own boundaries as data-parallel engines do, and routes every request to one of them
with :mod:`.fleet`'s routers (a replica is :class:`~agentperf_users.simulator.fleet.Routed`).
"""

from __future__ import annotations

import asyncio
import sys
import time
import traceback
from collections import deque

from agentperf_users.simulator.engine import Engine, EngineRequest, EngineStep
from agentperf_users.simulator.faults import FaultyReply
from agentperf_users.simulator.fleet import engine_load
from agentperf_users.simulator.metrics import CacheInfo, PowerModel, PowerSpec, SimulatorMetrics
from agentperf_users.simulator.profile import Profile
from agentperf_users.simulator.reply import Reply
from agentperf_users.simulator.wire import ApiError

MAX_CLOCK_SLIP_S = 0.25
IDLE_RETRY_S = 0.001  # the engine has work but scheduled nothing this step


class EngineReplica:
    """An engine and the replies in flight on it, stepped by its ticker on the running event loop."""

    def __init__(self, profile: Profile, seed: int, model_name: str, fault_kinds: tuple[str, ...] = ()):
        self.engine = Engine(profile, seed=seed)
        gpu, counters = profile.gpu, self.engine.counters
        power = PowerModel(PowerSpec(gpu.count, gpu.name, gpu.idle_w, gpu.tdp_w), lambda: counters.busy_s_total)
        cache = CacheInfo(profile.kv_capacity_blocks, profile.engine.block_size, profile.engine.gpu_memory_utilization,
                          profile.engine.enable_prefix_caching)
        self.metrics = SimulatorMetrics(model_name, counters, power, cache, fault_kinds)
        self.replies: dict[EngineRequest, Reply] = {}
        # Replies whose last token is written; their usage chunk and [DONE] go out in the next step's
        # slack so that building them (a timing report is thousands of floats) never delays a token.
        self._finishing: deque[Reply] = deque()
        self._wake: asyncio.Event | None = None
        self._ticker: asyncio.Task | None = None

    @property
    def load(self) -> int:
        return engine_load(self.engine)

    def start(self) -> None:
        """Start the ticker on the running event loop."""
        self._wake = asyncio.Event()
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    def add(self, reply: Reply) -> None:
        """Stream ``reply``, whose request the engine holds, as its steps produce its tokens."""
        self.replies[reply.request] = reply
        self._wake.set()

    def drop(self, request: EngineRequest) -> None:
        """Its client went away: stop streaming it and free its place in the engine (nothing if not here)."""
        if self.replies.pop(request, None) is not None:
            self.engine.abort(request.request_id)

    def close(self, error: ApiError) -> None:
        """Stop the ticker; finish what is finished and end every other reply with ``error``."""
        self._ticker.cancel()
        self._finish_all()
        self._fail_all(error)

    async def _tick_forever(self) -> None:
        end_s = None
        finishing = self._finishing
        while True:
            if not self.engine.has_work():
                self._finish_all()
                self._wake.clear()
                await self._wake.wait()
                end_s = None
            now_s = time.monotonic()
            if end_s is not None and now_s - end_s < MAX_CLOCK_SLIP_S:
                start_s = end_s
            else:
                if end_s is not None:  # fell too far behind: the jump to now is engine time lost
                    self.metrics.count_clock_slip(now_s - end_s)
                start_s = now_s
            try:
                result = self.engine.step(start_s)
            except Exception:  # an engine bug must not hang every stream: fail them and go on
                traceback.print_exc(file=sys.stderr)
                self._fail_all(ApiError(500, "simulator engine error; see the server log"))
                end_s = None
                continue
            if result is None or result.prefill_tokens + result.decode_batch == 0:
                self._finish_all()
                end_s = None
                await asyncio.sleep(IDLE_RETRY_S)
                continue
            end_s = result.start_s + result.duration_s
            ready = self._prepare(result, end_s)
            while finishing and time.monotonic() < end_s:  # bookkeeping uses the slack, never the deadline
                finishing.popleft().finish()
            slept = False
            while (delay_s := end_s - time.monotonic()) > 0:  # uvloop timers round to whole ms
                await asyncio.sleep(delay_s)
                slept = True
            self.metrics.observe_write_late(-delay_s)
            for reply in ready:
                reply.flush()
            for reply in ready:
                if reply.done:
                    self.replies.pop(reply.request, None)
                    if reply.request.finished_s is None:  # an injected fault cut it short: free its blocks
                        self.engine.abort(reply.request.request_id)
                    finishing.append(reply)
            if not slept:  # behind real time: still let the loop read requests, scrapes and the other replicas
                await asyncio.sleep(0)

    def _finish_all(self) -> None:
        while self._finishing:
            self._finishing.popleft().finish()

    def _prepare(self, result: EngineStep, end_s: float) -> list[Reply]:
        """Build every emitted token's bytes ahead of ``end_s`` and observe the step's latencies; returns the
        replies to flush then.

        A reply's planned length is the engine request's ``max_output_tokens``, so a reply is done
        exactly when the engine lists its request as finished. Each token after a request's first is one
        inter-token gap, ``end_s`` minus its previous token's time. Nearly all of a step's tokens follow
        one at the previous step's end, so the gaps are counted in runs of equal previous times and each
        run is observed in one call: per token only a comparison and an addition.
        """
        ready = []
        replies = self.replies
        previous_s, gaps = None, 0  # the current run: tokens whose previous token came at previous_s
        observe_gaps = self.metrics.observe_token_gaps
        for request in result.emitted:
            reply = replies.get(request)
            if reply is not None:  # None: its client went away during the step
                if request.previous_token_s != previous_s:
                    if previous_s is not None:
                        observe_gaps(end_s - previous_s, gaps)
                    previous_s, gaps = request.previous_token_s, 0
                gaps += 1  # a first token (previous_s None) counts in a run that is never observed
                reply.add_token(end_s)
                ready.append(reply)
        if previous_s is not None:
            observe_gaps(end_s - previous_s, gaps)
        for request in result.finished:
            reply = replies.get(request)
            # The requests the e2e histogram counts: a faulted reply never completes normally (FaultyReply).
            if reply is not None and not isinstance(reply, FaultyReply):
                self.metrics.observe_phases(request)
        return ready

    def _fail_all(self, error: ApiError) -> None:
        """End every reply in flight with ``error`` and drop its request from the engine."""
        for request, reply in list(self.replies.items()):
            self.engine.abort(request.request_id)
            reply.fail(error)
        self.replies.clear()

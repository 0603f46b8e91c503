"""The simulated inference engine: vLLM V1 continuous batching, one discrete step at a time.

The engine never looks at a clock. ``step(now_s)`` schedules one batch the way vLLM V1's scheduler does,
prices it with the profile's roofline (:meth:`Profile.step_time_s`), and reports which requests got a
token at ``now_s + duration_s``. The real-time server sleeps until then and streams; the ground-truth
search just adds ``duration_s`` to a virtual clock. Same submits at the same step boundaries give the
same decisions and times, so the "known capacity" is exactly reproducible.

Scheduling (vLLM V1 ``Scheduler.schedule``):

* Running requests first, in admission order: a decode gets one token, a request mid-prefill its next
  chunk, all within ``max_num_batched_tokens``. When a block cannot be allocated the most recently
  admitted running request is preempted (recompute: blocks freed, progress reset, back to the front of
  the waiting queue); if that is the request being scheduled, scheduling of running requests stops.
* Then, unless something was preempted this step, waiting requests in FCFS order while
  ``max_num_seqs``, the token budget and free blocks allow. Leading prompt blocks found in the prefix
  cache are skipped; the rest is prefilled in chunks that fit the remaining budget.
* The step that computes a request's last prompt token emits its first output token; every later step
  emits one more. A preempted request re-prefills its prompt *and* the tokens it already generated.
* Where the profile prices a front end (``Profile.frontend_s``: a CPU server's API process rendering the
  chat template and tokenizing on the engine's cores), a submitted request first waits in a front-end
  queue; the next step begins with that work for every request in it, in order, and only then schedules.
  So the work delays the request's admission and, as the step is that much longer, every running
  sequence's next token: at high request rates it costs decode throughput. Without one, nothing changes.

Cost: per step, a few integer operations per running request plus per-block work for new blocks; never
per token, and never proportional to total context.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

from agentperf_users.simulator.kvcache import KVCache
from agentperf_users.simulator.profile import Profile, SimulatorError, attention_pairs
from agentperf_users.tokens import BLOCK_SIZE, EncodedPrompt


class QueueFullError(SimulatorError):
    """The waiting queue is at ``max_waiting_requests`` (the server answers 429)."""


class ContextLengthError(SimulatorError):
    """Prompt plus requested output exceed the model's context (the server answers 400)."""


def context_overflow_message(max_context: int, prompt_tokens: int, output_tokens: int) -> str:
    """vLLM's text for a request over the context, which clients match on; the engine and server both send it."""
    return (f"This model's maximum context length is {max_context} tokens. However, you requested "
            f"{prompt_tokens + output_tokens} tokens ({prompt_tokens} in the messages, {output_tokens} in "
            "the completion). Please reduce the length of the messages or completion.")


@dataclass(eq=False, slots=True)
class EngineRequest:
    """One generation request as the engine sees it; the engine fills in the fields after ``arrival_s``.

    The timestamps are vLLM's per-request events on the engine clock (``vllm/v1/metrics/stats.py``):
    queued (``arrival_s``), first scheduled, first token, each later token, finished; the server's
    queue, prefill, decode and inter-token histograms are differences of these. Slots: the engine
    writes two of its fields per token, which slots make about half as costly as a ``__dict__``.
    """

    request_id: str
    prompt: EncodedPrompt
    max_output_tokens: int
    """Tokens to generate, already resolved by the caller (a request limit or a sampled length)."""
    arrival_s: float
    """Engine-clock time it arrived."""
    queued_s: float | None = None
    """When it joined the engine's waiting queue: ``arrival_s``, or after its front-end work where the
    profile prices one (vLLM's QUEUED event, which its front end's template and tokenizer precede)."""
    cached_tokens: int = 0
    """Prefix-cache hit tokens at its first admission (vLLM's ``num_cached_tokens``, which a preemption keeps)."""
    generated: int = 0
    scheduled_s: float | None = None
    """Start of the step that first admitted it, never before ``arrival_s`` (vLLM's first SCHEDULED event;
    a re-admission after preemption keeps it)."""
    first_token_s: float | None = None
    finished_s: float | None = None
    preemptions: int = 0
    last_token_s: float | None = None
    """When its newest token exists."""
    previous_token_s: float | None = None
    """When the token before its newest existed (None until its second token): ``last_token_s`` minus this
    is vLLM's inter-token latency."""


@dataclass(frozen=True)
class EngineStep:
    start_s: float
    duration_s: float
    emitted: tuple[EngineRequest, ...]
    """Requests that got one new token, which exists at ``start_s + duration_s``."""
    finished: tuple[EngineRequest, ...]
    """Requests whose last token was emitted this step (a subset of ``emitted``)."""
    prefill_tokens: int
    decode_batch: int


@dataclass(eq=False)
class EngineCounters:
    """Live totals for metrics; updated by the engine, read by anyone (no callbacks)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries_tokens: int = 0
    """Prompt tokens looked up in the prefix cache at admission (vLLM ``prefix_cache_queries``)."""
    prefix_hits_tokens: int = 0
    preemptions_total: int = 0
    prompt_tokens_total: int = 0
    """Prompt tokens of requests that got their first token."""
    prompt_tokens_cached_total: int = 0
    """Their ``cached_tokens`` (vLLM ``prompt_tokens_cached``): the sum of what their usages report."""
    generation_tokens_total: int = 0
    requests_finished_total: int = 0
    busy_s_total: float = 0.0
    """Sum of step durations: the simulated GPU's busy time (for utilisation and power)."""


class _Seq:
    """Engine-private progress of one request."""

    __slots__ = ("req", "hashes", "target", "computed", "blocks", "capacity", "window_blocks", "num_hashed", "running")

    def __init__(self, req: EngineRequest) -> None:
        self.req = req
        self.hashes = req.prompt.block_hashes
        self.target = req.prompt.num_tokens  # tokens to prefill: prompt, plus generated ones after preemption
        self.computed = 0  # tokens whose KV exists
        self.blocks: list[int] = []  # token blocks, index-aligned with the prompt's block hashes
        self.capacity = 0  # tokens the token blocks hold: BLOCK_SIZE * len(blocks)
        self.window_blocks: list[int] = []  # constant per-request share of sliding-window layers
        self.num_hashed = 0  # leading blocks registered in the prefix cache
        self.running = False


class Engine:
    """vLLM-V1-like engine over a :class:`Profile`; see the module docstring for the policy."""

    def __init__(self, profile: Profile, seed: int = 0) -> None:
        self.profile = profile
        self.counters = EngineCounters()
        self._kv = KVCache(profile.kv_capacity_blocks, profile.engine.enable_prefix_caching)
        self._rng = random.Random(seed)
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._by_id: dict[str, _Seq] = {}
        # (queue head, KV version, token budget) of the last failed admission: retrying it is pointless until
        # blocks are freed or cached, or a smaller budget asks for a smaller first chunk.
        self._blocked: tuple[_Seq, int, int] | None = None
        self._window_blocks = profile.window_blocks_per_request
        self._max_seqs = profile.engine.max_num_seqs
        self._token_budget = profile.engine.max_num_batched_tokens
        self._output_mu = math.log(profile.output_tokens.median_tokens)
        self._output_sigma = profile.output_tokens.sigma
        self._prices_frontend = profile.frontend_s(0) > 0 or profile.frontend_s(1000) > 0
        self._frontend: deque[_Seq] = deque()  # submitted, front-end work not yet done (only when priced)

    def sample_output_tokens(self, limit: int) -> int:
        """A reply length from the profile's seeded lognormal, in ``[1, limit]``."""
        return max(1, min(limit, round(self._rng.lognormvariate(self._output_mu, self._output_sigma))))

    def submit(self, request: EngineRequest) -> None:
        """Queue a request (FCFS). Raises :class:`ContextLengthError` or :class:`QueueFullError`."""
        prompt_tokens, output_tokens = request.prompt.num_tokens, request.max_output_tokens
        if output_tokens < 1 or prompt_tokens < 1 or request.request_id in self._by_id:
            raise ValueError(f"request {request.request_id!r}: needs a unique id, a prompt and >= 1 output token")
        max_context = self.profile.model.max_context_tokens
        if prompt_tokens + output_tokens > max_context:
            raise ContextLengthError(context_overflow_message(max_context, prompt_tokens, output_tokens))
        needed_blocks = -(-(prompt_tokens + output_tokens) // BLOCK_SIZE) + self._window_blocks
        if needed_blocks > self._kv.num_blocks:
            raise ContextLengthError(
                f"The request needs {prompt_tokens + output_tokens} tokens of KV cache but the cache holds only "
                f"{self._kv.num_blocks * BLOCK_SIZE}. Please reduce the length of the messages or completion.")
        if len(self._waiting) >= self.profile.engine.max_waiting_requests:
            raise QueueFullError(f"The server is overloaded: {len(self._waiting)} requests are already waiting.")
        seq = _Seq(request)
        self._by_id[request.request_id] = seq
        if self._prices_frontend:
            self._frontend.append(seq)
            return
        request.queued_s = request.arrival_s
        self._waiting.append(seq)
        self.counters.num_waiting = len(self._waiting)

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away) and free its blocks; unknown or finished ids are ignored."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return
        if seq.running:
            self._running.remove(seq)
            self._release(seq)
        elif seq.req.queued_s is None:  # still in the front end
            self._frontend.remove(seq)
        else:
            self._waiting.remove(seq)
        self._sync_counters()

    def cached_prefix_tokens(self, prompt: EncodedPrompt) -> int:
        """Leading prompt tokens its prefix cache holds now (what a cache-aware router asks; nothing counted)."""
        return len(self._kv.longest_cached_prefix(prompt.block_hashes, prompt.num_tokens)) * BLOCK_SIZE

    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._frontend)

    def step(self, now_s: float) -> EngineStep | None:
        """Schedule and price one step starting at ``now_s``; ``None`` when there is nothing to do."""
        if not self._running and not self._waiting and not self._frontend:
            return None
        frontend_s = self._front_end(now_s) if self._frontend else 0.0
        step = self._schedule(now_s + frontend_s)
        if not frontend_s:
            return step
        return EngineStep(now_s, frontend_s + step.duration_s, step.emitted, step.finished, step.prefill_tokens,
                          step.decode_batch)

    def _front_end(self, now_s: float) -> float:
        """Do the front-end work of every request waiting for it, in order, from ``now_s``; each joins the
        waiting queue as its own work ends. Returns the seconds it took (the engine's core was busy)."""
        done_s = now_s
        while self._frontend:
            seq = self._frontend.popleft()
            done_s += self.profile.frontend_s(seq.req.prompt.num_tokens)
            seq.req.queued_s = done_s
            self._waiting.append(seq)
        return done_s - now_s

    def _schedule(self, now_s: float) -> EngineStep:
        """The step's scheduling and pricing proper, starting at ``now_s`` (after any front-end work)."""
        kv, running = self._kv, self._running
        budget = self._token_budget
        prefills: list[_Seq] = []
        decodes: list[_Seq] = []
        work = [0, 0, 0, 0]  # prefill tokens, prefill context tokens, attention pairs, decode context tokens
        decode_context = 0
        preempted = False
        index = 0
        while index < len(running) and budget > 0:
            seq = running[index]
            computed = seq.computed
            remaining = seq.target - computed
            new = min(remaining, budget) if remaining > 0 else 1  # decodes take one token
            if computed + new > seq.capacity:  # needs new blocks (about one step in 16 for a decode)
                missing = (computed + new - seq.capacity + BLOCK_SIZE - 1) // BLOCK_SIZE
                while missing > kv.num_free_blocks:
                    victim = running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                if not seq.running:  # it was the most recently admitted: nothing left to preempt
                    break
                seq.blocks += kv.allocate(missing)
                seq.capacity += missing * BLOCK_SIZE
            budget -= new
            if remaining > 0:
                self._prefill(seq, new, work, prefills)
            else:
                decode_context += computed + 1
                seq.computed = computed + 1
                decodes.append(seq)
            index += 1
        work[3] = decode_context
        if not preempted:
            self._admit(now_s, budget, work, prefills)
        return self._finish_step(now_s, work, prefills, decodes)

    def _admit(self, now_s: float, budget: int, work: list[int], prefills: list[_Seq]) -> None:
        """Admit waiting requests in FCFS order while sequence slots, budget and blocks allow."""
        kv, waiting, running = self._kv, self._waiting, self._running
        while waiting and budget > 0 and len(running) < self._max_seqs:
            seq = waiting[0]
            blocked = self._blocked
            if blocked and blocked[0] is seq and blocked[1] == kv.version and budget >= blocked[2]:
                break
            hits = kv.longest_cached_prefix(seq.hashes, seq.target)
            hit_tokens = len(hits) * BLOCK_SIZE
            new = min(seq.target - hit_tokens, budget)
            missing = (hit_tokens + new + BLOCK_SIZE - 1) // BLOCK_SIZE - len(hits)
            if not kv.can_allocate(missing + self._window_blocks, hits):
                self._blocked = (seq, kv.version, budget)
                break
            kv.acquire(hits, seq.target)
            seq.blocks = hits + kv.allocate(missing)
            seq.capacity = len(seq.blocks) * BLOCK_SIZE
            seq.window_blocks = kv.allocate(self._window_blocks)
            seq.num_hashed = len(hits)
            seq.computed = hit_tokens
            req = seq.req
            if req.scheduled_s is None:  # first admission; a re-admission after preemption keeps both
                # Not before arrival: the server's step may start on an engine clock a little behind the
                # wall clock that stamped the arrival (see replica.MAX_CLOCK_SLIP_S).
                req.scheduled_s = now_s if now_s > req.arrival_s else req.arrival_s
                req.cached_tokens = hit_tokens
            seq.running = True
            waiting.popleft()
            running.append(seq)
            budget -= new
            self._prefill(seq, new, work, prefills)

    def _prefill(self, seq: _Seq, new: int, work: list[int], prefills: list[_Seq]) -> None:
        """Account a prefill chunk of ``new`` tokens and register prompt blocks it completes."""
        computed = seq.computed
        work[0] += new
        work[1] += computed
        work[2] += attention_pairs(new, computed)
        seq.computed = computed = computed + new
        full = min(computed // BLOCK_SIZE, len(seq.hashes))
        if full > seq.num_hashed:
            kv, blocks, hashes = self._kv, seq.blocks, seq.hashes
            for i in range(seq.num_hashed, full):
                kv.cache(blocks[i], hashes[i])
            seq.num_hashed = full
        if computed == seq.target:
            prefills.append(seq)

    def _finish_step(self, now_s: float, work: list[int], prefills: list[_Seq], decodes: list[_Seq]) -> EngineStep:
        """Price the step, emit its tokens, retire finished requests, refresh the counters."""
        prefill_tokens, prefill_context, pairs, decode_context = work
        duration_s = self.profile.step_time_s(prefill_tokens, prefill_context, pairs, len(decodes), decode_context)
        end_s = now_s + duration_s
        counters = self.counters
        emitted = [seq.req for seq in prefills] + [seq.req for seq in decodes]
        for seq in prefills:
            req = seq.req
            if req.first_token_s is None:
                req.first_token_s = end_s
                counters.prompt_tokens_total += req.prompt.num_tokens
                counters.prompt_tokens_cached_total += req.cached_tokens
        finished = []
        for req in emitted:
            req.generated += 1
            req.previous_token_s = req.last_token_s
            req.last_token_s = end_s
            if req.generated >= req.max_output_tokens:
                req.finished_s = end_s
                finished.append(req)
        if finished:
            by_id = self._by_id
            for req in finished:
                self._release(by_id.pop(req.request_id))
            self._running = [seq for seq in self._running if seq.running]
        counters.generation_tokens_total += len(emitted)
        counters.requests_finished_total += len(finished)
        counters.busy_s_total += duration_s
        self._sync_counters()
        return EngineStep(now_s, duration_s, tuple(emitted), tuple(finished), prefill_tokens, len(decodes))

    def _preempt(self, seq: _Seq) -> None:
        """Recompute preemption: free everything, restart from the prompt plus generated tokens."""
        self._release(seq)
        seq.target = seq.req.prompt.num_tokens + seq.req.generated
        seq.req.preemptions += 1
        self.counters.preemptions_total += 1
        self._waiting.appendleft(seq)

    def _release(self, seq: _Seq) -> None:
        self._kv.free(seq.blocks)
        self._kv.free(seq.window_blocks)
        seq.blocks, seq.window_blocks = [], []
        seq.computed = seq.num_hashed = seq.capacity = 0
        seq.running = False

    def _sync_counters(self) -> None:
        counters, kv = self.counters, self._kv
        counters.num_running = len(self._running)
        counters.num_waiting = len(self._waiting)
        counters.kv_usage = kv.usage
        counters.prefix_queries_tokens = kv.prefix_queries_tokens
        counters.prefix_hits_tokens = kv.prefix_hits_tokens

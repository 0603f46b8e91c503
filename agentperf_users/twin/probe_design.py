"""What ``agentperf calibrate`` sends: a designed probe, each part chosen for the step constants it pins.

* Cold prefills of rising length, one at a time on an idle server (a fresh first block each, so nothing
  is a prefix-cache hit): short ones are memory-bound steps (weight read plus request latency), long ones
  compute-bound (cost per token, and the attention pairs that grow with the square of the length).
* Groups of N concurrent decodes at a fixed prompt length C: every request of a group decodes in the
  same steps once all have their first token, so the median gap between tokens is one step of batch N
  over N x C tokens of KV (the weight read, the KV read per token, and the per-step overhead).
* A shared-prefix pair: one prompt twice; whether the second is a prefix-cache hit (its usage's
  ``cached_tokens``, or a much shorter TTFT) tells whether the server caches prefixes, and its TTFT is a
  prefill after a cached context.
* Agent-shaped requests of rising conversation length, each three times (cold, then cached), with the coding
  tools' schemas: client TTFT minus the server's queue and prefill time is the front end's work per
  request (chat template, tokenizer), fitted as a fixed cost plus a cost per prompt token.

Two designs: ``standard`` (a minute or two on a GPU server, a few minutes on the tiny CPU vLLM) and
``quick`` (seconds; the tests'). Lengths that do not fit the server's context or KV cache are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from agentperf_users.errors import AgentperfError


TOOLS_ROOM_TOKENS = 2048
"""Room an agent-shaped probe leaves beside its conversation for the tool schemas (about 1K tokens)."""


@dataclass(frozen=True)
class ProbeDesign:
    name: str
    prefill_tokens: tuple[int, ...]  # cold prompt lengths (agentperf's token count)
    prefill_repeats: int  # each length is sent this many times; the median TTFT is the observation
    decode_batches: tuple[int, ...]  # N: concurrent requests per decode group
    decode_contexts: tuple[int, ...]  # C: the prompt length of every request of a group
    decode_output_tokens: int  # tokens each decode request generates (ignore_eos)
    prefix_tokens: int  # the shared-prefix pair's prompt length
    warmup_requests: int = 2  # sent first and not measured (a server's first requests pay lazy setup)
    agent_tokens: tuple[int, ...] = ()  # agent conversations' lengths (tools aside): sent cold, then cached twice

    def fitted_to(self, max_context_tokens: int, kv_capacity_tokens: int, max_num_seqs: int) -> ProbeDesign:
        """This design without the lengths and groups the server cannot hold: every prompt plus its output
        within half the context (a server's tokenizer may count up to ~1.3x agentperf's), every group's KV
        within half the cache (no preemption), no group larger than the sequences it runs at once (a larger
        one never decodes all together)."""
        room = max_context_tokens // 2 - self.decode_output_tokens
        prefills = tuple(n for n in self.prefill_tokens if n <= room)
        contexts = tuple(c for c in self.decode_contexts if c <= room)
        batches = tuple(b for b in self.decode_batches if b * (max(contexts, default=0) + self.decode_output_tokens)
                        <= kv_capacity_tokens // 2 and b <= max_num_seqs)
        if len(prefills) < 3 or not contexts or not batches:
            raise AgentperfError(f"the server's context ({max_context_tokens} tokens) or KV cache ({kv_capacity_tokens} "
                                 f"tokens) is too small for the {self.name!r} probe design: nothing to calibrate from")
        agents = tuple(n for n in self.agent_tokens if n + TOOLS_ROOM_TOKENS <= room)
        return replace(self, prefill_tokens=prefills, decode_contexts=contexts, decode_batches=batches,
                       prefix_tokens=min(self.prefix_tokens, room), agent_tokens=agents)


DESIGNS = {
    # The 16K and 32K prefills pin the attention term: agents' contexts run to 131K (mean ~27K), and at 8K
    # attention is a tenth of a prefill's time. Without them it came out up to 6 % off, and the twins' worst
    # step-time errors were 0.6-3.0 %; with them 0.3-0.5 % (benchmarks/twin_accuracy.py part a, docs/twin.md).
    # fitted_to drops them where the server's context is shorter.
    "standard": ProbeDesign("standard", prefill_tokens=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                                        32768),
                            prefill_repeats=3, decode_batches=(1, 2, 4, 8, 16), decode_contexts=(128, 1024, 4096),
                            decode_output_tokens=48, prefix_tokens=2048, agent_tokens=(256, 1024, 2048, 4096, 8192)),
    "quick": ProbeDesign("quick", prefill_tokens=(16, 64, 256, 1024, 4096), prefill_repeats=1,
                         decode_batches=(1, 4, 16), decode_contexts=(128, 1024, 4096), decode_output_tokens=48,
                         prefix_tokens=1024, warmup_requests=1, agent_tokens=(256, 2048, 8192)),
}

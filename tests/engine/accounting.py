"""vLLM's own token and request accounting, read from its ``/metrics``, to check agentperf's records against.

Counters only move forward, so a run's share is the difference of two reads: one before the run, one after
the engine has finished or aborted every request it held (its running and waiting gauges are 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

from agentperf_users.measure.records import RequestRecord, Status
from tests.simulator import requests_in_engine, scrape

# vLLM's request_success_total is labelled by why a request finished: "stop" and "length" are requests
# that ran to their end; "abort" are requests the client went away from (the rest do not occur here).
COMPLETED_REASONS = frozenset({"stop", "length"})


@dataclass(frozen=True)
class EngineCounters:
    prompt_tokens: int  # vllm:prompt_tokens_total
    generation_tokens: int  # vllm:generation_tokens_total
    prefix_cache_hits: int  # vllm:prefix_cache_hits_total (tokens)
    finished: tuple[tuple[str, int], ...]  # vllm:request_success_total by finished_reason, sorted

    @property
    def tokens(self) -> tuple[int, int, int]:
        """(prompt, generation, prefix-cache hits): what agentperf's records call (prompt, output, cached)."""
        return self.prompt_tokens, self.generation_tokens, self.prefix_cache_hits

    @property
    def completed(self) -> int:
        return sum(count for reason, count in self.finished if reason in COMPLETED_REASONS)

    @property
    def all_finished(self) -> int:
        return sum(count for _, count in self.finished)

    def minus(self, before: "EngineCounters") -> "EngineCounters":
        earlier = dict(before.finished)
        return EngineCounters(
            self.prompt_tokens - before.prompt_tokens, self.generation_tokens - before.generation_tokens,
            self.prefix_cache_hits - before.prefix_cache_hits,
            tuple((reason, count - earlier.get(reason, 0)) for reason, count in self.finished))


def read_counters(url: str) -> EngineCounters:
    """One read of the counters (summed over the engine and model labels: one engine here)."""
    samples = scrape(url)

    def total(name: str) -> int:
        return int(sum(sample.value for sample in samples[name]))

    finished: dict[str, int] = {}
    for sample in samples["vllm:request_success_total"]:
        reason = sample.labels["finished_reason"]
        finished[reason] = finished.get(reason, 0) + int(sample.value)
    return EngineCounters(total("vllm:prompt_tokens_total"), total("vllm:generation_tokens_total"),
                          total("vllm:prefix_cache_hits_total"), tuple(sorted(finished.items())))


def wait_idle(url: str, timeout_s: float = 120.0) -> None:
    """Until the engine holds no request (running + waiting = 0), polled; an error after ``timeout_s``. An
    aborted request leaves the gauges only after the engine has processed the abort."""
    deadline = time.monotonic() + timeout_s
    while (held := requests_in_engine(url)) > 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"vLLM still holds {held} requests after {timeout_s:.0f} s")
        time.sleep(0.2)


@dataclass(frozen=True)
class RecordTotals:
    """What agentperf's records say, in the counters' terms."""

    records: int
    by_status: tuple[tuple[str, int], ...]
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int

    @property
    def tokens(self) -> tuple[int, int, int]:
        """(prompt, output, cached), in the order of :attr:`EngineCounters.tokens`."""
        return self.prompt_tokens, self.output_tokens, self.cached_tokens

    @property
    def ok(self) -> int:
        return dict(self.by_status).get(Status.OK.value, 0)


def record_totals(records: Iterable[RequestRecord]) -> RecordTotals:
    records = list(records)
    statuses: dict[str, int] = {}
    for record in records:
        statuses[record.status.value] = statuses.get(record.status.value, 0) + 1
    return RecordTotals(len(records), tuple(sorted(statuses.items())),
                        sum(r.prompt_tokens or 0 for r in records), sum(r.output_tokens for r in records),
                        sum(r.cached_tokens or 0 for r in records))

"""Measure a server's ``max_num_seqs``: a burst of short requests, and the server's own queue gauges.

vLLM does not state its sequence limit (a recent SGLang does: :mod:`~agentperf_users.twin.server_limits`),
and a twin that queues at the wrong count predicts the wrong capacity. So ``agentperf calibrate`` (where
neither ``--max-num-seqs`` nor the server gives it) sends :data:`BURST_REQUESTS`
requests at once, each a short prompt and an output long enough to keep the burst in the engine for
many scrapes, and reads the server's ``/metrics`` meanwhile, every :data:`POLL_S`: the requests running
(``vllm:num_requests_running``, SGLang's ``num_running_reqs``) and waiting (``num_requests_waiting``,
``num_queue_reqs``; the names of :mod:`agentperf_users.measure.server_metrics`). While requests wait,
the engine runs all it may: the most running seen in a reading with requests waiting is
``max_num_seqs``.

Requests also wait for a moment as they arrive, between two steps, below the limit. So the client's
own timings decide whether the burst queued at all: where every request had its first token before the
first one ended, none waited for a sequence slot, and the burst shows only that the limit is at least
its size (the option's value is kept, and calibrate says so). A server without those gauges: nothing
is measured, and calibrate says so in one line.

The burst is capped so that its KV fits in half the cache (:func:`burst_size`): a cache that ran out
would hold requests waiting below the sequence limit and read as a smaller one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Sequence

from agentperf_users.measure.server_metrics import parse_exposition
from agentperf_users.twin.probe_run import Measured, ProbeClient

BURST_REQUESTS = 64
"""Requests of the burst: above every small limit a twin would get wrong (vLLM's default is 256, which a
burst this size reads as "at least 64", keeping the option's 256)."""
BURST_PROMPT_TOKENS = 16
BURST_OUTPUT_TOKENS = 48  # per request: a limit of 8 out of 64 runs 8 waves of 48 decode steps
POLL_S = 0.02  # between reads of /metrics while the burst runs
TOKENIZER_SLACK = 1.3  # a server's tokenizer may count up to ~1.3x agentperf's tokens (as probe_design)
MIN_BURST = 2


@dataclass(frozen=True)
class Gauges:
    """One reading of the server's queue gauges."""

    running: float
    waiting: float


@dataclass(frozen=True)
class SeqsMeasure:
    """What the burst showed: ``value`` is the measured limit (None: not measured, ``note`` says why)."""

    value: int | None
    note: str  # for the progress line and the profile's comment block


def burst_size(kv_capacity_tokens: int, limit: int = BURST_REQUESTS) -> int:
    """The burst's requests: at most ``limit``, and all of them within half the KV cache (module docstring)."""
    per_request = int((BURST_PROMPT_TOKENS + BURST_OUTPUT_TOKENS) * TOKENIZER_SLACK) + 1
    return max(0, min(limit, kv_capacity_tokens // 2 // per_request))


def read_limit(readings: Sequence[Gauges], burst: int, started: int) -> SeqsMeasure:
    """``max_num_seqs`` from the readings taken during a burst of ``burst`` requests, of which ``started``
    had their first token before the first one ended (module docstring)."""
    if not readings:
        return SeqsMeasure(None, "not measured: the server's /metrics has no gauges of requests running and waiting")
    queued = [r.running for r in readings if r.waiting > 0]
    if started >= burst or not queued:
        return SeqsMeasure(None, f"a burst of {burst} requests never queued (each had its first token before "
                                 f"one ended): the limit is at least {burst}")
    value = int(max(queued))
    return SeqsMeasure(value if value >= 1 else None,
                       f"a burst of {burst} requests: at most {value} running while others waited "
                       f"({len(queued)} of {len(readings)} readings of /metrics; the client saw {started} start "
                       "before the first ended)")


def started_before_first_end(streams: Sequence[Measured]) -> int:
    """How many of ``streams`` had their first token before any of them had its last."""
    first_end_s = min(s.token_times[-1] for s in streams)
    return sum(1 for s in streams if s.token_times[0] < first_end_s)


def measure_max_num_seqs(client: ProbeClient, kv_capacity_tokens: int) -> SeqsMeasure:
    """Send the burst and read the gauges while it runs; see the module docstring."""
    burst = burst_size(kv_capacity_tokens)
    if burst < MIN_BURST:
        return SeqsMeasure(None, f"not measured: a KV cache of {kv_capacity_tokens} tokens holds no burst")
    if _gauges(client) is None:
        return read_limit((), burst, 0)
    readings: list[Gauges] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            if (reading := _gauges(client)) is not None:
                readings.append(reading)
            done.wait(POLL_S)

    poller = threading.Thread(target=poll, name="agentperf-seqs-poll", daemon=True)
    poller.start()
    try:
        streams = client.group(burst, BURST_PROMPT_TOKENS, BURST_OUTPUT_TOKENS)
    finally:
        done.set()
        poller.join()
    return read_limit(readings, burst, started_before_first_end(streams))


def _gauges(client: ProbeClient) -> Gauges | None:
    """The running and waiting requests the server reports now; None where it reports neither."""
    text = client.metrics_text()
    sample = parse_exposition(text, time.time()) if text is not None else None
    if sample is None or "requests_running" not in sample.values or "requests_waiting" not in sample.values:
        return None
    return Gauges(sample.values["requests_running"], sample.values["requests_waiting"])

"""Injected faults (``agentperf simulate --fault KIND[:RATE]``): every failure a client must survive, on demand.

Why: a load generator's verdict is only as good as its handling of a server that breaks, and a healthy
simulator never breaks. With ``--fault`` the tests, and users rehearsing their alerts, can make each
failure happen, reproducibly. What the client sees, per kind (``N`` = ``TOKENS_BEFORE_FAULT`` = 2):

``429``, ``503``
    No stream: that status with a ``Retry-After: <--fault-retry-after>`` header (seconds, default 1) and
    an OpenAI-style JSON error body (``{"error": {"message", "type", "param", "code"}}``).
``500``
    The same without ``Retry-After``.
``reset-before-headers``
    The request is read, then the connection is reset (TCP RST): not one byte of a response.
``reset-mid-stream``
    Status 200 and the first N token chunks, then a TCP RST (no last chunk, no usage, no ``[DONE]``).
``stall``
    Status 200 and the first N token chunks, then silence on a connection that stays open until the
    client closes it (or the simulator stops).
``drip``
    The first token at once, then one token chunk every ``DRIP_INTERVAL_S`` (1 s), then the usage chunk
    (if asked for) and ``[DONE]``: it ends, but only after about ``max_tokens`` seconds.
``malformed-sse``
    After the first N token chunks one extra event that is neither JSON nor UTF-8 (``MALFORMED_EVENT``),
    then the rest of the answer, the usage chunk (if asked for) and ``[DONE]``.
``wrong-shape-json``
    Likewise one extra event of valid JSON in the wrong shape (``{"choices": 5}``, ``"delta": "str"``,
    ``"tool_calls": 7``, ...): the i-th request that draws this kind gets ``WRONG_SHAPES[i % 7]``.
``absurd-usage``
    The whole answer, then a usage chunk (sent even if not asked for) claiming ``completion_tokens``
    ``ABSURD_COMPLETION_TOKENS`` (100000), then ``[DONE]``.
``missing-usage``
    The whole answer and ``[DONE]`` but no usage chunk, even with ``stream_options.include_usage``.
``missing-done``
    The whole answer and the usage chunk (sent even if not asked for), then the response ends cleanly
    (HTTP's last chunk) without ``data: [DONE]``.

How they combine: each chat completion request that passes validation (known model, fits the context)
draws at most one fault, one uniform number per request, in arrival order, from a generator seeded with
``--seed``; so which request gets which fault depends only on the seed and the arrival order. The kinds
take consecutive slices of [0, 1) in the order of ``KINDS`` (not the command line's), each as wide as
its rate, so a rate is exactly the share of requests that get that kind; the rates must add up to at
most 1. A kind given without a rate gets an equal share of what the given rates leave: ``--fault stall``
alone faults every request, ``--fault 429 --fault 500`` half and half, ``--fault 429:0.1 --fault 500``
10 % and 90 %.

A request the engine refuses anyway (a full waiting queue, 429; a context overflow, 400) gets that regular
answer instead, and so does a non-streamed request that drew a mid-stream kind (everything after the 503
above); both still spend their draw and are not counted as faults. Faults are counted by kind in
``agentperf_sim_faults_total{kind}`` when injected; a faulted request never counts in
``vllm:request_success_total`` (which keeps meaning "completed normally") or the e2e latency histogram.
A request cut short (``reset-mid-stream``, ``stall``) is aborted in the engine at the cut, exactly as a
client disconnect is, so its KV blocks are freed while a stalled connection stays open.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from agentperf_users.simulator.httpserver import HttpConnection, chunk
from agentperf_users.simulator.profile import SimulatorError
from agentperf_users.simulator.reply import DONE_EVENT, Reply
from agentperf_users.simulator.wire import ApiError

KINDS = (
    "429", "500", "503", "reset-before-headers", "reset-mid-stream", "stall", "drip", "malformed-sse",
    "wrong-shape-json", "absurd-usage", "missing-usage", "missing-done",
)
BEFORE_HEADERS = frozenset({"429", "500", "503", "reset-before-headers"})
"""Kinds answered on arrival: the request never reaches the engine."""
CUT_SHORT = frozenset({"reset-mid-stream", "stall"})
"""Kinds that stop an answer after ``TOKENS_BEFORE_FAULT`` tokens (its engine request is aborted)."""
TOKENS_BEFORE_FAULT = 2
DRIP_INTERVAL_S = 1.0
ABSURD_COMPLETION_TOKENS = 100_000
DEFAULT_RETRY_AFTER_S = 1
MAX_RETRY_AFTER_S = 86_400
MALFORMED_EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"\xff\xfe\n\n'
"""Truncated JSON with bytes that are not UTF-8: no SSE client can turn it into a chunk."""
WRONG_SHAPES: tuple[Any, ...] = (
    {"choices": 5},
    {"choices": [{"index": 0, "delta": "str", "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": 7}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": 5}, "finish_reason": None}]},
    {"choices": [5]},
    {"choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": None}},
    ["not", "an", "object"],
)
"""Valid JSON that no chat completion chunk looks like; objects get the stream's id, created and model."""
_SYNTAX = f"expected KIND[:RATE] with KIND one of {', '.join(KINDS)} and RATE in (0, 1]"


@dataclass(frozen=True)
class FaultSpec:
    """One ``--fault`` after :func:`parse_faults`: a kind and the share of requests that get it."""

    kind: str
    rate: float


@dataclass(frozen=True)
class Fault:
    """The fault one request drew; ``ordinal`` counts the earlier requests that drew the same kind."""

    kind: str
    ordinal: int


def parse_faults(values: Iterable[str]) -> tuple[FaultSpec, ...]:
    """``--fault`` values to specs in ``KINDS`` order, rates resolved; raises :class:`SimulatorError` (one line)."""
    given: dict[str, float | None] = {}
    for value in values:
        kind, colon, rate_text = value.partition(":")
        if kind not in KINDS:
            raise SimulatorError(f"--fault {value!r}: unknown kind {kind!r}; {_SYNTAX}")
        if kind in given:
            raise SimulatorError(f"--fault {value!r}: {kind} is given twice; {_SYNTAX}")
        given[kind] = _rate(value, rate_text) if colon else None
    stated = math.fsum(rate for rate in given.values() if rate is not None)
    if stated > 1 + 1e-9:
        raise SimulatorError(f"--fault: the rates add up to {stated:g}, over 1 (a request gets at most one fault); "
                             f"{_SYNTAX}")
    unstated = [kind for kind, rate in given.items() if rate is None]
    share = (1 - stated) / len(unstated) if unstated else 0.0
    if unstated and share <= 1e-9:
        raise SimulatorError(f"--fault: the given rates leave no share for {', '.join(unstated)}; {_SYNTAX}")
    return tuple(FaultSpec(kind, given[kind] or share) for kind in KINDS if kind in given)


def _rate(value: str, text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not 0 < rate <= 1:  # NaN fails too
        raise SimulatorError(f"--fault {value!r}: rate {text!r} is not a number in (0, 1]; {_SYNTAX}")
    return rate


class FaultPlan:
    """Which request gets which fault: one draw per request, in arrival order, from a seeded generator."""

    def __init__(self, specs: Sequence[FaultSpec], seed: int):
        # A string seed is hashed with SHA-512: the same sequence in every process and Python version.
        self._rng = random.Random(f"agentperf-faults:{seed}")
        order = {kind: i for i, kind in enumerate(KINDS)}
        self._slices: list[tuple[float, str]] = []
        upper = 0.0
        for spec in sorted(specs, key=lambda s: order[s.kind]):
            upper += spec.rate
            self._slices.append((upper, spec.kind))
        self._drawn = dict.fromkeys(order, 0)

    def draw(self) -> Fault | None:
        """The next request's fault, or ``None`` for a normal answer."""
        u = self._rng.random()
        for upper, kind in self._slices:
            if u < upper:
                ordinal = self._drawn[kind]
                self._drawn[kind] = ordinal + 1
                return Fault(kind, ordinal)
        return None


def answer_before_headers(conn: HttpConnection, kind: str, retry_after_s: int) -> None:
    """Answer a request that drew one of ``BEFORE_HEADERS`` instead of starting it."""
    if kind == "reset-before-headers":
        return conn.reset()
    status = int(kind)
    retry = ((("retry-after", str(retry_after_s)),) if status in (429, 503) else ())
    message = f"simulated fault {kind} (agentperf simulate --fault)" + (f"; retry after {retry_after_s} s" if retry else "")
    conn.respond(status, ApiError(status, message).payload(), headers=retry)


def wrong_shape_event(ordinal: int, envelope: dict) -> bytes:
    """The ``wrong-shape-json`` event of the ``ordinal``-th request that drew it (see ``WRONG_SHAPES``)."""
    shape = WRONG_SHAPES[ordinal % len(WRONG_SHAPES)]
    value = {**envelope, **shape} if isinstance(shape, dict) else shape
    return b"data: %s\n\n" % json.dumps(value).encode()


class FaultyReply(Reply):
    """A streamed answer that breaks as its :class:`Fault` says (see the module docstring for each kind).

    The server treats it like any reply; the differences live in the hooks: a cut-short kind marks the
    reply done early (the server then aborts its engine request), ``drip`` holds tokens back and writes
    one per ``DRIP_INTERVAL_S``, the other kinds add an event or change the ending.
    """

    def __init__(self, *args: Any, fault: Fault):
        super().__init__(*args)
        self.fault = fault
        self._held: deque[bytes] = deque()  # drip: token chunks waiting for their turn
        self._drip_timer: asyncio.TimerHandle | None = None
        self._finish_after_drip = False

    def _count_finished(self, t_s: float) -> None:
        """A faulted answer is not a success: it stays out of ``vllm:request_success`` and the e2e histogram."""

    def add_token(self, t_s: float) -> None:
        super().add_token(t_s)
        if self.sent != min(TOKENS_BEFORE_FAULT, self.plan.output_tokens):
            return
        kind = self.fault.kind
        if kind in CUT_SHORT:
            self.done = True
        elif kind == "malformed-sse":
            self.pending += chunk(MALFORMED_EVENT)
        elif kind == "wrong-shape-json":
            self.pending += chunk(wrong_shape_event(self.fault.ordinal, self.envelope))

    def flush(self) -> None:
        if self.fault.kind != "drip" or self.sent <= 1 or self.conn.closed:
            return super().flush()
        self._held.append(self.pending)
        self.pending, self.pending_tokens = b"", 0
        if self._drip_timer is None:
            self._drip_timer = asyncio.get_running_loop().call_later(DRIP_INTERVAL_S, self._drip)

    def _drip(self) -> None:
        self._drip_timer = None
        if self.conn.closed:
            self._held.clear()
            return
        self.conn.send(self._held.popleft())
        if self.token_times is not None:
            self.send_times.append(time.monotonic())
        if self._held:
            self._drip_timer = asyncio.get_running_loop().call_later(DRIP_INTERVAL_S, self._drip)
        elif self._finish_after_drip:
            super().finish()

    def finish(self) -> None:
        kind = self.fault.kind
        if self.conn.closed or kind == "stall":  # a stalled stream stays open and silent
            return
        if kind == "reset-mid-stream":
            return self.conn.reset()
        if kind == "drip" and self._held:
            self._finish_after_drip = True
            return
        if kind == "absurd-usage":
            usage = self._usage()
            usage["completion_tokens"] = ABSURD_COMPLETION_TOKENS
            usage["total_tokens"] = usage["prompt_tokens"] + ABSURD_COMPLETION_TOKENS
            return self.conn.end_stream(self._usage_event(usage) + DONE_EVENT)
        if kind == "missing-usage":
            return self.conn.end_stream(DONE_EVENT)
        if kind == "missing-done":
            return self.conn.end_stream(self._usage_event(self._usage()))
        super().finish()

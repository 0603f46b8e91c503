"""One chat completion's answer: what it says (:class:`ReplyPlan`) and its bytes on the wire (:class:`Reply`).

Why pre-encoded bytes: at tens of thousands of tokens a second, a ``json.dumps`` per chunk would cost
more than the rest of the server. The JSON around a stream's token text is fixed (id, created, model),
so :class:`Reply` splits it once into a head and a tail and each token only fills in a delta picked
from tables built at import. The ticker (:mod:`.server`) builds a step's chunks while it waits for the
step to end, so only the writes remain at the deadline.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from agentperf_users.simulator.engine import EngineRequest
from agentperf_users.simulator.httpserver import HttpConnection, chunk
from agentperf_users.simulator.metrics import SimulatorMetrics
from agentperf_users.simulator.wire import ApiError, ChatParams

# Output text: words that are one token each in the simulator's tokenizer and in cl100k/o200k.
WORDS = tuple(
    " " + w
    for w in "the model reads each file and then writes a short patch for the failing test so that "
    "every check passes before it runs the build again with more logging".split()
)
_COMPACT = (",", ":")
_CONTENT_DELTAS = tuple(json.dumps({"content": w}, separators=_COMPACT).encode() for w in WORDS)
_REASONING_DELTAS = tuple(json.dumps({"reasoning_content": w, "reasoning": w}, separators=_COMPACT).encode() for w in WORDS)


def _arguments_delta(fragment: str) -> bytes:
    return json.dumps({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}, separators=_COMPACT).encode()


_ARGUMENT_DELTAS = tuple(_arguments_delta(w) for w in WORDS)
_ARGUMENTS_OPEN, _ARGUMENTS_CLOSE, _ARGUMENTS_EMPTY = '{"command":"', '"}', "{}"
DONE_EVENT = b"data: [DONE]\n\n"


def _choice_tail(finish_reason: str | None) -> bytes:
    """What follows a chunk's delta: the rest of its choice, and the null usage."""
    return b',"logprobs":null,"finish_reason":%s}],"usage":null}\n\n' % json.dumps(finish_reason).encode()


@dataclass(frozen=True)
class ReplyPlan:
    """What the answer will be, decided on arrival: its length and how it is split."""

    output_tokens: int
    reasoning_tokens: int  # the leading tokens that are reasoning deltas
    tool_name: str | None  # the rest is a call of this tool, or content when None
    word_offset: int
    finish_reason: str

    def word(self, i: int) -> int:
        return (self.word_offset + i) % len(WORDS)

    def argument_fragment(self, i: int) -> str:
        """Token ``i``'s piece of the tool call's arguments: ``{"command":"`` words ``"}``."""
        slots, j = self.output_tokens - self.reasoning_tokens - 1, i - self.reasoning_tokens - 1
        if slots == 1:
            return _ARGUMENTS_EMPTY
        return _ARGUMENTS_OPEN if j == 0 else _ARGUMENTS_CLOSE if j == slots - 1 else WORDS[self.word(i)]

    def texts(self, count: int) -> tuple[str, str, str]:
        """Reasoning, content and tool arguments of the first ``count`` tokens (for a whole response)."""
        first = min(count, self.reasoning_tokens)
        reasoning = "".join(WORDS[self.word(i)] for i in range(first))
        if self.tool_name is None:
            return reasoning, "".join(WORDS[self.word(i)] for i in range(first, count)), ""
        return reasoning, "", "".join(self.argument_fragment(i) for i in range(first + 1, count))


class Reply:
    """One chat completion in flight: the pre-encoded bytes around its tokens and what awaits writing."""

    def __init__(self, conn: HttpConnection, request: EngineRequest, params: ChatParams, plan: ReplyPlan,
                 model: str, metrics: SimulatorMetrics):
        self.conn, self.request, self.plan, self.metrics = conn, request, plan, metrics
        self.stream = params.stream
        self.with_usage = params.include_usage or params.timing
        self.sent = 0  # tokens prepared so far
        self.pending = b""  # framed chunks prepared for the next flush
        self.pending_tokens = 0
        self.done = False
        self.token_times: list[float] | None = [] if params.timing else None
        self.send_times: list[float] = []
        self.tool_call_id = f"call_{request.request_id[-24:]}"
        self.envelope = {"id": request.request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": model}
        prefix = json.dumps(self.envelope, separators=_COMPACT)[:-1]
        self.head = f'data: {prefix},"choices":[{{"index":0,"delta":'.encode()
        self.tail = _choice_tail(None)

    def add_token(self, t_s: float) -> None:
        """Prepare the next token, which exists at engine time ``t_s``: its framed chunk waits in ``pending``."""
        i, plan = self.sent, self.plan
        self.sent = i + 1
        self.pending_tokens += 1
        if self.token_times is not None:
            self.token_times.append(t_s)
        if i == 0:
            self.metrics.observe_first_token(t_s - self.request.arrival_s)
        last = self.sent >= plan.output_tokens
        if last:
            self.done = True
            self._count_finished(t_s)
        if self.stream:
            self.pending += chunk(self.head + self._delta(i) + (_choice_tail(plan.finish_reason) if last else self.tail))

    def _count_finished(self, t_s: float) -> None:
        """The last token exists at ``t_s``: a request completed normally (a faulted reply overrides this)."""
        self.metrics.observe_finished(t_s - self.request.arrival_s, self.plan.finish_reason)

    def _delta(self, i: int) -> bytes:
        plan = self.plan
        if i < plan.reasoning_tokens:
            delta = _REASONING_DELTAS[plan.word(i)]
        elif plan.tool_name is None:
            delta = _CONTENT_DELTAS[plan.word(i)]
        elif i == plan.reasoning_tokens:
            arguments = _ARGUMENTS_EMPTY if plan.output_tokens == i + 1 else ""
            function = {"name": plan.tool_name, "arguments": arguments}
            call = {"index": 0, "id": self.tool_call_id, "type": "function", "function": function}
            delta = json.dumps({"content": None, "tool_calls": [call]}, separators=_COMPACT).encode()
        else:
            fragment = plan.argument_fragment(i)
            delta = _ARGUMENT_DELTAS[plan.word(i)] if fragment == WORDS[plan.word(i)] else _arguments_delta(fragment)
        return b'{"role":"assistant",' + delta[1:] if i == 0 else delta

    def flush(self) -> None:
        """Write the prepared tokens in one write (a whole response waits for :meth:`finish`)."""
        if self.conn.closed:
            return
        if self.token_times is not None:
            self.send_times.extend([time.monotonic()] * self.pending_tokens)
        self.pending_tokens = 0
        if self.stream:
            self.conn.transport.write(self.pending)
            self.pending = b""

    def finish(self) -> None:
        """After the last token's flush: the usage chunk and ``[DONE]``, or the whole response."""
        if self.conn.closed:
            return
        if not self.stream:
            return self.conn.respond(200, self._whole_response())
        self.conn.end_stream((self._usage_event(self._usage()) if self.with_usage else b"") + DONE_EVENT)

    def _usage_event(self, usage: dict) -> bytes:
        """The stream's usage chunk: no choices, ``usage`` filled in."""
        return b"data: %s\n\n" % json.dumps({**self.envelope, "choices": [], "usage": usage}, separators=_COMPACT).encode()

    def fail(self, error: ApiError) -> None:
        """End the response with ``error``: in-band once a stream's headers have gone out."""
        self.done = True
        if self.conn.closed:
            return
        if not self.stream:
            return self.conn.respond(error.status, error.payload())
        self.conn.end_stream(b"data: %s\n\n%s" % (error.payload(), DONE_EVENT))

    def _usage(self) -> dict:
        prompt = self.request.prompt.num_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": self.sent,
            "total_tokens": prompt + self.sent,
            "prompt_tokens_details": {"cached_tokens": self.request.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": min(self.sent, self.plan.reasoning_tokens)},
        }
        if self.token_times is not None:
            usage["agentperf_timing"] = {
                "arrival": self.request.arrival_s, "token_times": self.token_times, "send_times": self.send_times,
            }
        return usage

    def _whole_response(self) -> bytes:
        reasoning, content, arguments = self.plan.texts(self.sent)
        message: dict[str, Any] = {"role": "assistant", "content": content if self.plan.tool_name is None else None}
        if reasoning:
            message["reasoning_content"] = message["reasoning"] = reasoning
        if self.plan.tool_name is not None:
            function = {"name": self.plan.tool_name, "arguments": arguments}
            message["tool_calls"] = [{"id": self.tool_call_id, "type": "function", "function": function}]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.plan.finish_reason}
        body = {**self.envelope, "object": "chat.completion", "choices": [choice], "usage": self._usage()}
        return json.dumps(body).encode()

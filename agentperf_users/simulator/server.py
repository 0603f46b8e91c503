"""The simulator's OpenAI-compatible HTTP server: chat completions (SSE or whole), models, health, metrics.

Why a raw ``asyncio.Protocol`` and one engine ticker: one Python core must sustain tens of thousands of
streamed tokens a second. A framework's per-write overhead and a timer per stream cap a core near 20K
chunks/s, so here a single coroutine steps the engine, sleeps until the step's tokens exist (step start
plus duration, on ``time.monotonic()``), and writes each stream's bytes for that step with one
``transport.write``. Chunk bytes are pre-encoded per stream (the JSON around the token text is fixed) and
built while the ticker waits, so at the step's end only the writes remain.

The engine's clock is the step boundary, not the moment the server gets round to the next step: while
the engine has work, a step starts where the previous one ended, so the server's own overhead does not
slow the modelled GPU. If the server falls more than ``MAX_CLOCK_SLIP_S`` behind, the clock jumps to now.

Wire format: vLLM's OpenAI server. Errors use OpenAI's shape with vLLM's types; one raised after a
stream's headers went out is sent in-band as ``data: {"error": ...}`` then ``data: [DONE]``.
Request fields beyond OpenAI's:

``ignore_eos`` (vLLM)
    Generate exactly the limit (``max_completion_tokens``, else ``max_tokens``, else the context room
    left). Without it the length is ``engine.sample_output_tokens(limit)``.
``agentperf_timing``
    The usage chunk (sent even without ``stream_options.include_usage``), or a whole response's
    ``usage``, carries ``agentperf_timing: {arrival, token_times, send_times}``: ``time.monotonic()``
    seconds of the arrival, of each token's intended (engine) time, and of when its bytes were written.
``agentperf_reasoning_share``
    Share (0-1) of the output tokens streamed first as ``reasoning_content`` (and ``reasoning``) deltas;
    defaults to ``ServerOptions.reasoning_share``.
``tool_choice``
    With ``tools``: ``"required"`` or a named function makes the answer a tool call, ``"none"`` never,
    ``"auto"`` (the default) with probability ``ServerOptions.tool_call_probability``. A tool call
    streams a header delta (index, id, type, function name, empty arguments), then argument fragments,
    and ends with ``finish_reason: tool_calls``. One output token is one delta in every case.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import itertools
import json
import random
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from agentperf_users.simulator.engine import ContextLengthError, Engine, EngineRequest, QueueFullError, StepResult
from agentperf_users.simulator.metrics import PowerModel, PowerSpec, SimulatorMetrics
from agentperf_users.simulator.profile import Profile
from agentperf_users.simulator.tokenizer import PromptEncoder

MAX_CLOCK_SLIP_S = 0.25
IDLE_RETRY_S = 0.001  # the engine has work but scheduled nothing this step
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024
API_KEY_ENV = "AGENTPERF_SIM_API_KEY"
MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Output text: words that are one token each in the simulator's tokenizer and in cl100k/o200k.
WORDS = tuple(
    " " + w
    for w in "the model reads each file and then writes a short patch for the failing test so that "
    "every check passes before it runs the build again with more logging".split()
)
_CONTENT_DELTAS = tuple(json.dumps({"content": w}, separators=(",", ":")).encode() for w in WORDS)
_REASONING_DELTAS = tuple(
    json.dumps({"reasoning_content": w, "reasoning": w}, separators=(",", ":")).encode() for w in WORDS
)


def _arguments_delta(fragment: str) -> bytes:
    return json.dumps({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}, separators=(",", ":")).encode()


_ARGUMENT_DELTAS = tuple(_arguments_delta(w) for w in WORDS)
_ARGUMENTS_OPEN, _ARGUMENTS_CLOSE, _ARGUMENTS_EMPTY = '{"command":"', '"}', "{}"
_STATUS_TEXT = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
    411: "Length Required", 413: "Content Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 429: "RateLimitError"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def payload(self) -> bytes:
        kind = _ERROR_TYPES.get(self.status, "BadRequestError" if self.status < 500 else "InternalServerError")
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.status}
        return json.dumps({"error": error}).encode()


@dataclass(frozen=True)
class ServerOptions:
    """How the server presents the profile's model and shapes answers (see the module docstring)."""

    served_model_names: tuple[str, ...] = ()  # empty: the profile's model name
    api_key: str | None = None  # required as "Authorization: Bearer <key>" on /v1 routes when set
    tool_call_probability: float = 0.0
    reasoning_share: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


class HttpConnection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies; one request at a time per connection.

    The handler answers through :meth:`respond`, or :meth:`start_stream` / :meth:`send` / :meth:`end`
    for a chunked response; data that arrives meanwhile waits in the buffer.
    """

    def __init__(self, handle: Callable[["HttpConnection", HttpRequest], None], lost: Callable[["HttpConnection"], None]):
        self._handle, self._lost = handle, lost
        self._buffer = bytearray()
        self._busy = False
        self._keep_alive = True
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reply: Reply | None = None  # the chat completion in flight on this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._busy:
            self._next_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._lost(self)

    def _next_request(self) -> None:
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._reject(ApiError(431, "request head too large"))
            return
        try:
            lines = bytes(self._buffer[:head_end]).decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return self._reject(ApiError(400, "malformed HTTP request head"))
        if "chunked" in headers.get("transfer-encoding", ""):
            return self._reject(ApiError(411, "send the request body with a Content-Length header"))
        if length > MAX_BODY_BYTES:
            return self._reject(ApiError(413, f"request body over {MAX_BODY_BYTES} bytes"))
        body_end = head_end + 4 + length
        if len(self._buffer) < body_end:
            if headers.get("expect", "").lower() == "100-continue" and len(self._buffer) == head_end + 4:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        body = bytes(self._buffer[head_end + 4 : body_end])
        del self._buffer[:body_end]
        connection = headers.get("connection", "").lower()
        self._keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
        self._busy = True
        self._handle(self, HttpRequest(method, target.split("?", 1)[0], headers, body))

    def _reject(self, error: ApiError) -> None:
        self._keep_alive = False
        self.respond(error.status, error.payload())

    def _head(self, status: int, headers: tuple[tuple[str, str], ...]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Unknown')}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if not self._keep_alive:
            lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def respond(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        head = self._head(status, (("content-type", content_type), ("content-length", str(len(body)))))
        self.send(head + body)
        self.end()

    def start_stream(self, headers: tuple[tuple[str, str], ...]) -> None:
        self.send(self._head(200, headers + (("transfer-encoding", "chunked"),)))

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def end(self) -> None:
        """The response is complete: read the next request, or close."""
        self.reply = None
        self._busy = False
        if self.closed:
            return
        if not self._keep_alive:
            self.transport.close()
        elif self._buffer:
            asyncio.get_running_loop().call_soon(self._next_request)


def _chunk(payload: bytes) -> bytes:
    """One chunk of chunked transfer-encoding."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


@dataclass(frozen=True)
class ChatParams:
    """The fields of a chat completion request the simulator acts on, validated."""

    model: str | None
    messages: tuple[dict, ...]
    tools: tuple[dict, ...]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    ignore_eos: bool
    tool_choice: str | None  # "none", "auto", "required", or the name of a forced function
    timing: bool
    reasoning_share: float | None

    @classmethod
    def parse(cls, body: bytes) -> "ChatParams":
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty array", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in MESSAGE_ROLES:
                raise ApiError(400, f"messages[{i}] must be an object with a role in {sorted(MESSAGE_ROLES)}", "messages")
        tools = _optional(data, "tools", list)
        for i, tool in enumerate(tools or ()):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ApiError(400, f"tools[{i}] must be an object with function.name", "tools")
        choice = data.get("tool_choice")
        if isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
            choice = choice["function"]["name"]
        names = [tool["function"]["name"] for tool in tools or ()]
        if choice not in (None, "none", "auto", "required", *names) or (choice == "required" and not names):
            raise ApiError(400, 'tool_choice must be "none", "auto", "required" or a function named in tools', "tool_choice")
        limit_key = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = data.get(limit_key)
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
            raise ApiError(400, f"{limit_key} must be a positive integer, got {max_tokens!r}", limit_key)
        if data.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", "n")
        share = _optional(data, "agentperf_reasoning_share", (int, float))
        if share is not None and not 0 <= share <= 1:
            raise ApiError(400, "agentperf_reasoning_share must be between 0 and 1", "agentperf_reasoning_share")
        stream_options = _optional(data, "stream_options", dict) or {}
        return cls(
            model=_optional(data, "model", str),
            messages=tuple(messages),
            tools=tuple(tools or ()),
            stream=bool(_optional(data, "stream", bool)),
            include_usage=bool(_optional(stream_options, "include_usage", bool)),
            max_tokens=max_tokens,
            ignore_eos=bool(_optional(data, "ignore_eos", bool)),
            tool_choice=choice,
            timing=bool(_optional(data, "agentperf_timing", bool)),
            reasoning_share=share,
        )


def _optional(data: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        names = kind.__name__ if isinstance(kind, type) else "number"
        raise ApiError(400, f"{key} must be of type {names}", key)
    return value


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
        self.conn, self.request, self.plan, self.model, self.metrics = conn, request, plan, model, metrics
        self.stream = params.stream
        self.with_usage = params.include_usage or params.timing
        self.created_s = int(time.time())
        self.sent = 0  # tokens prepared so far
        self.pending = b""  # framed chunks prepared for the next flush
        self.pending_tokens = 0
        self.done = False
        self.token_times: list[float] | None = [] if params.timing else None
        self.send_times: list[float] = []
        self.tool_call_id = f"call_{request.request_id[-24:]}"
        envelope = {"id": request.request_id, "object": "chat.completion.chunk", "created": self.created_s, "model": model}
        prefix = json.dumps(envelope, separators=(",", ":"))[:-1]
        self.head = f'data: {prefix},"choices":[{{"index":0,"delta":'.encode()
        self.tail = b',"logprobs":null,"finish_reason":null}],"usage":null}\n\n'

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
            self.metrics.observe_finished(t_s - self.request.arrival_s, plan.finish_reason)
        if self.stream:
            tail = b',"logprobs":null,"finish_reason":"%s"}],"usage":null}\n\n' % plan.finish_reason.encode() if last else self.tail
            data = self.head + self._delta(i) + tail
            self.pending += b"%x\r\n%s\r\n" % (len(data), data)

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
            delta = json.dumps({"content": None, "tool_calls": [call]}, separators=(",", ":")).encode()
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
        if self.stream:
            closing = b"data: %s\n\ndata: [DONE]\n\n" % self._usage_chunk() if self.with_usage else b"data: [DONE]\n\n"
            self.conn.send(_chunk(closing) + b"0\r\n\r\n")
            self.conn.end()
        else:
            self.conn.respond(200, self._whole_response())

    def fail(self, error: ApiError) -> None:
        """End the response with ``error``: in-band once a stream's headers have gone out."""
        self.done = True
        if self.conn.closed:
            return
        if not self.stream:
            return self.conn.respond(error.status, error.payload())
        self.conn.send(_chunk(b"data: %s\n\ndata: [DONE]\n\n" % error.payload()) + b"0\r\n\r\n")
        self.conn.end()

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

    def _usage_chunk(self) -> bytes:
        body = {"id": self.request.request_id, "object": "chat.completion.chunk", "created": self.created_s,
                "model": self.model, "choices": [], "usage": self._usage()}
        return json.dumps(body, separators=(",", ":")).encode()

    def _whole_response(self) -> bytes:
        reasoning, content, arguments = self.plan.texts(self.sent)
        message: dict[str, Any] = {"role": "assistant", "content": content if self.plan.tool_name is None else None}
        if reasoning:
            message["reasoning_content"] = message["reasoning"] = reasoning
        if self.plan.tool_name is not None:
            function = {"name": self.plan.tool_name, "arguments": arguments}
            message["tool_calls"] = [{"id": self.tool_call_id, "type": "function", "function": function}]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.plan.finish_reason}
        return json.dumps({"id": self.request.request_id, "object": "chat.completion", "created": self.created_s,
                           "model": self.model, "choices": [choice], "usage": self._usage()}).encode()


class SimulatorServer:
    """The engine, its ticker, and the HTTP routes in front of them, on the running event loop."""

    def __init__(self, profile: Profile, options: ServerOptions = ServerOptions()):
        self.profile = profile
        self.options = options
        self.engine = Engine(profile, seed=options.seed)
        self.model_names = options.served_model_names or (profile.model.name,)
        self._rng = random.Random(options.seed)
        self._encoder = PromptEncoder()
        self._ids = itertools.count()
        self._id_prefix = f"{self._rng.getrandbits(48):012x}"
        gpu, counters = profile.gpu, self.engine.counters
        power = PowerModel(PowerSpec(gpu.count, gpu.name, gpu.idle_w, gpu.tdp_w), lambda: counters.busy_s_total)
        self.metrics = SimulatorMetrics(self.model_names[0], counters, power)
        self._replies: dict[EngineRequest, Reply] = {}
        # Replies whose last token is written; their usage chunk and [DONE] go out in the next step's
        # slack so that building them (a timing report is thousands of floats) never delays a token.
        self._finishing: deque[Reply] = deque()
        self._connections: set[HttpConnection] = set()
        self._wake: asyncio.Event | None = None
        self._ticker: asyncio.Task | None = None
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 picks a free port) and start the ticker; returns the bound port."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._server = await loop.create_server(self._connect, host, port)
        self._ticker = loop.create_task(self._tick_forever())
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop: streams in flight get an in-band error, then every connection closes."""
        self._ticker.cancel()
        self._server.close()
        self._finish_all()
        for reply in list(self._replies.values()):
            reply.fail(ApiError(503, "the simulator is shutting down"))
        self._replies.clear()
        for conn in list(self._connections):
            conn.transport.close()
        await self._server.wait_closed()

    # --- engine ticker -------------------------------------------------------------------------
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
            start_s = end_s if end_s is not None and now_s - end_s < MAX_CLOCK_SLIP_S else now_s
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
            while (delay_s := end_s - time.monotonic()) > 0:  # uvloop timers round to whole ms
                await asyncio.sleep(delay_s)
            for reply in ready:
                reply.flush()
            for reply in ready:
                if reply.done:
                    self._replies.pop(reply.request, None)
                    finishing.append(reply)

    def _finish_all(self) -> None:
        while self._finishing:
            self._finishing.popleft().finish()

    def _prepare(self, result: StepResult, end_s: float) -> list[Reply]:
        """Build every emitted token's bytes ahead of ``end_s``; returns the replies to flush then.

        A reply's planned length is the engine request's ``max_output_tokens``, so a reply is done
        exactly when the engine lists its request as finished.
        """
        ready = []
        replies = self._replies
        for request in result.emitted:
            reply = replies.get(request)
            if reply is not None:  # None: its client went away during the step
                reply.add_token(end_s)
                ready.append(reply)
        return ready

    def _fail_all(self, error: ApiError) -> None:
        for request, reply in list(self._replies.items()):
            self.engine.abort(request.request_id)
            reply.fail(error)
        self._replies.clear()

    # --- HTTP routes ---------------------------------------------------------------------------
    def _connect(self) -> HttpConnection:
        conn = HttpConnection(self._handle, self._lost)
        self._connections.add(conn)
        return conn

    def _lost(self, conn: HttpConnection) -> None:
        self._connections.discard(conn)
        reply = conn.reply
        if reply is not None and self._replies.pop(reply.request, None) is not None:
            self.engine.abort(reply.request.request_id)

    def _handle(self, conn: HttpConnection, request: HttpRequest) -> None:
        try:
            route = (request.method, request.path)
            if route == ("POST", "/v1/chat/completions"):
                self._authorize(request)
                return self._chat(conn, ChatParams.parse(request.body))
            if route == ("GET", "/v1/models"):
                self._authorize(request)
                return conn.respond(200, self._models())
            if route == ("GET", "/health"):
                return conn.respond(200, b"")
            if route == ("GET", "/metrics"):
                return conn.respond(200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
            known = request.path in ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
            raise ApiError(405 if known else 404, f"{request.method} {request.path} is not served here")
        except ApiError as error:
            conn.respond(error.status, error.payload())
        except Exception:  # a bug: answer 500 and keep serving
            traceback.print_exc(file=sys.stderr)
            conn.respond(500, ApiError(500, "internal simulator error; see the server log").payload())

    def _authorize(self, request: HttpRequest) -> None:
        key = self.options.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "missing or invalid API key (expected Authorization: Bearer <key>)")

    def _models(self) -> bytes:
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "agentperf", "root": self.model_names[0],
                 "max_model_len": self.profile.model.max_context_tokens} for name in self.model_names]
        return json.dumps({"object": "list", "data": data}).encode()

    def _chat(self, conn: HttpConnection, params: ChatParams) -> None:
        if params.model is not None and params.model not in self.model_names:
            raise ApiError(404, f"The model `{params.model}` does not exist.", "model")
        prompt = self._encoder.encode(params.messages, params.tools)
        context = self.profile.model.max_context_tokens
        limit = params.max_tokens if params.max_tokens is not None else context - prompt.num_tokens
        if prompt.num_tokens + max(limit, 1) > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{prompt.num_tokens + max(limit, 1)} tokens ({prompt.num_tokens} in the messages, "
                                f"{max(limit, 1)} in the completion). Please reduce the length of the messages or completion.",
                           "messages")
        output_tokens = limit if params.ignore_eos else self.engine.sample_output_tokens(limit)
        plan = self._plan(params, output_tokens, limit)
        request_id = f"chatcmpl-{self._id_prefix}{next(self._ids):012x}"
        request = EngineRequest(request_id=request_id, prompt=prompt, max_output_tokens=output_tokens,
                                arrival_s=time.monotonic())
        try:
            self.engine.submit(request)
        except QueueFullError as exc:
            raise ApiError(429, f"the server's waiting queue is full: {exc}") from None
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), "messages") from None
        reply = Reply(conn, request, params, plan, params.model or self.model_names[0], self.metrics)
        self._replies[request] = reply
        conn.reply = reply
        if params.stream:
            conn.start_stream((("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")))
        self._wake.set()

    def _plan(self, params: ChatParams, output_tokens: int, limit: int) -> ReplyPlan:
        share = self.options.reasoning_share if params.reasoning_share is None else params.reasoning_share
        reasoning = min(output_tokens, int(share * output_tokens))
        tool_name = None
        if params.tools and reasoning < output_tokens and params.tool_choice != "none":
            names = [tool["function"]["name"] for tool in params.tools]
            if params.tool_choice in names:
                tool_name = params.tool_choice
            elif params.tool_choice == "required" or self._rng.random() < self.options.tool_call_probability:
                tool_name = names[0]
        finish = "tool_calls" if tool_name else "length" if output_tokens >= limit else "stop"
        return ReplyPlan(output_tokens, reasoning, tool_name, self._rng.randrange(len(WORDS)), finish)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (about twice the writes per core), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def run_server(profile: Profile, host: str, port: int, options: ServerOptions, stop: asyncio.Event,
                     started: Callable[[SimulatorServer, str], None]) -> None:
    """Serve on the running loop until ``stop`` is set; ``started(server, url)`` once listening."""
    server = SimulatorServer(profile, options)
    bound = await server.start(host, port)
    started(server, _url(host, bound))
    await stop.wait()
    await server.close()


def serve(profile: Profile, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          options: ServerOptions = ServerOptions()) -> None:
    """Serve until SIGINT/SIGTERM. Prints one line with the URL once listening (``port`` 0 picks one).

    Raises ``OSError`` when the address cannot be bound.
    """
    if api_key is not None:
        options = dataclasses.replace(options, api_key=api_key)

    def started(server: SimulatorServer, url: str) -> None:
        print(f"agentperf simulator: serving {server.model_names[0]} ({profile.name}) on {url}", flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        await run_server(profile, host, port, options, stop, started)

    loop = new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


class ServerThread:
    """A :class:`SimulatorServer` on its own event loop in a daemon thread, for tests and in-process tools.

    ``with ServerThread(profile) as sim: OpenAI(base_url=sim.url + "/v1")``.
    """

    def __init__(self, profile: Profile, host: str = "127.0.0.1", port: int = 0, options: ServerOptions = ServerOptions()):
        self._args = (profile, host, port, options)
        self._ready = threading.Event()
        self._loop = new_event_loop()
        self._stop = asyncio.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="agentperf-simulator", daemon=True)
        self.server: SimulatorServer | None = None
        self.url = ""

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()

    def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the server's loop (the engine is not thread-safe) and return its result."""
        async def run() -> Any:
            return function()
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def _started(self, server: SimulatorServer, url: str) -> None:
        self.server, self.url = server, url
        self._ready.set()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(run_server(*self._args, self._stop, self._started))
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()
            self._loop.close()

"""The simulator's OpenAI-compatible server: routes, request lifecycle, and the one engine ticker.

Why one ticker: one Python core must sustain tens of thousands of streamed tokens a second, and a timer
per stream caps a core near 20K chunks/s. Here a single coroutine steps the engine, sleeps until the
step's tokens exist (step start plus duration, on ``time.monotonic()``), and writes each stream's bytes
for that step with one ``transport.write``. Chunk bytes are pre-encoded per stream (:mod:`.reply`) and
built while the ticker waits, so at the step's end only the writes remain. HTTP framing lives in
:mod:`.httpserver`, request validation and the error shape in :mod:`.wire`.

The engine's clock is the step boundary, not the moment the server gets round to the next step: while
the engine has work, a step starts where the previous one ended, so the server's own overhead does not
slow the modelled GPU. If the server falls more than ``MAX_CLOCK_SLIP_S`` behind, the clock jumps to now.

Routes: ``POST /v1/chat/completions`` (SSE or whole), ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

With ``ServerOptions.faults`` some chat completions break on purpose (:mod:`.faults`): a request draws its
fault on arrival; one answered before any stream never reaches the engine, and one cut short mid-stream
is aborted in the engine at the cut, as a client disconnect is.
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
import time
import traceback
from collections import deque
from dataclasses import dataclass

from agentperf_users.simulator.engine import (
    ContextLengthError,
    Engine,
    EngineRequest,
    EngineStep,
    QueueFullError,
    context_overflow_message,
)
from agentperf_users.simulator.faults import (
    BEFORE_HEADERS,
    DEFAULT_RETRY_AFTER_S,
    FaultPlan,
    FaultSpec,
    FaultyReply,
    answer_before_headers,
)
from agentperf_users.simulator.httpserver import HttpConnection, HttpRequest
from agentperf_users.simulator.metrics import (
    CacheInfo,
    PowerModel,
    PowerSpec,
    SimulatorMetrics,
)
from agentperf_users.simulator.profile import Profile
from agentperf_users.simulator.reply import WORDS, Reply, ReplyPlan
from agentperf_users.simulator.wire import ApiError, ChatParams
from agentperf_users.tokens import PromptEncoder

MAX_CLOCK_SLIP_S = 0.25
IDLE_RETRY_S = 0.001  # the engine has work but scheduled nothing this step
API_KEY_ENV = "AGENTPERF_SIM_API_KEY"


@dataclass(frozen=True)
class ServerOptions:
    """How the server presents the profile's model and shapes answers (see :mod:`.wire` for the request fields)."""

    served_model_names: tuple[str, ...] = ()  # empty: the profile's model name
    api_key: str | None = None  # required as "Authorization: Bearer <key>" on /v1 routes when set
    tool_call_probability: float = 0.0
    reasoning_share: float = 0.0
    seed: int = 0
    faults: tuple[FaultSpec, ...] = ()  # injected failures (see :mod:`.faults`); empty: none
    retry_after_s: int = DEFAULT_RETRY_AFTER_S  # the Retry-After of injected 429 and 503 answers


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
        cache = CacheInfo(profile.kv_capacity_blocks, profile.engine.block_size, profile.engine.gpu_memory_utilization)
        self.metrics = SimulatorMetrics(self.model_names[0], counters, power, cache, [f.kind for f in options.faults])
        self._faults = FaultPlan(options.faults, options.seed) if options.faults else None
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
        self._fail_all(ApiError(503, "the simulator is shutting down"))
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
                    if reply.request.finished_s is None:  # an injected fault cut it short: free its blocks
                        self.engine.abort(reply.request.request_id)
                    finishing.append(reply)

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
        replies = self._replies
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
        if prompt.num_tokens + max(limit, 1) > context:  # vLLM checks the requested limit, not the sampled length
            raise ApiError(400, context_overflow_message(context, prompt.num_tokens, max(limit, 1)), "messages")
        fault = self._faults.draw() if self._faults is not None else None
        if fault is not None and fault.kind in BEFORE_HEADERS:
            self.metrics.count_fault(fault.kind)
            return answer_before_headers(conn, fault.kind, self.options.retry_after_s)
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
        reply_args = (conn, request, params, plan, params.model or self.model_names[0], self.metrics)
        if fault is not None and params.stream:  # mid-stream kinds need a stream (see .faults)
            reply = FaultyReply(*reply_args, fault=fault)
            self.metrics.count_fault(fault.kind)
        else:
            reply = Reply(*reply_args)
        self._replies[request] = reply
        conn.reply = reply
        if params.stream:
            conn.start_stream((("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")))
        self._wake.set()

    def _plan(self, params: ChatParams, output_tokens: int, limit: int) -> ReplyPlan:
        share = self.options.reasoning_share if params.reasoning_share is None else params.reasoning_share
        reasoning = min(output_tokens, int(share * output_tokens))
        tool_name = None
        names = params.tool_names
        if names and reasoning < output_tokens and params.tool_choice != "none":
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


def serve(profile: Profile, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          options: ServerOptions = ServerOptions()) -> None:
    """Serve until SIGINT/SIGTERM. Prints one line with the URL once listening (``port`` 0 picks one).

    Raises ``OSError`` when the address cannot be bound. Tests and tools that need a server run it as a
    child process (:class:`agentperf_users.simulator.cli.SimulatorProcess`), never as a thread of their
    own: a process that imported locust is monkey-patched by gevent, which turns threads into greenlets.
    """
    if api_key is not None:
        options = dataclasses.replace(options, api_key=api_key)

    async def main() -> None:
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        server = SimulatorServer(profile, options)
        bound = await server.start(host, port)
        url = _url(host, bound)
        print(f"agentperf simulator: serving {server.model_names[0]} ({profile.name}) on {url}", flush=True)
        await stop.wait()
        await server.close()

    loop = new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


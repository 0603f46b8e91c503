"""The simulator's OpenAI-compatible server: routes and the request lifecycle, in front of its engines.

The engines, each stepped by its one ticker, are :class:`~agentperf_users.simulator.replica.EngineReplica`
s: one, or ``ServerOptions.replicas`` behind ``ServerOptions.router`` (the routers of :mod:`.fleet`, which
the truth's virtual clock uses too), each request routed when it arrives. HTTP framing lives in
:mod:`.httpserver`, request validation and the error shape in :mod:`.wire`.

Routes: ``POST /v1/chat/completions`` (SSE or whole), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(with replicas, every series labelled by its ``engine``: :class:`~agentperf_users.simulator.metrics.FleetMetrics`).

With ``ServerOptions.faults`` some chat completions break on purpose (:mod:`.faults`): a request draws its
fault on arrival; one answered before any stream never reaches an engine (it is counted in the first
replica's metrics), and one cut short mid-stream is aborted in its engine at the cut, as a client
disconnect is.
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
from dataclasses import dataclass

from agentperf_users.simulator.engine import (
    ContextLengthError,
    EngineRequest,
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
from agentperf_users.simulator.fleet import ROUND_ROBIN, make_router, replica_count
from agentperf_users.simulator.httpserver import HttpConnection, HttpRequest
from agentperf_users.simulator.metrics import FleetMetrics
from agentperf_users.simulator.profile import Profile
from agentperf_users.simulator.replica import EngineReplica
from agentperf_users.simulator.reply import WORDS, Reply, ReplyPlan
from agentperf_users.simulator.wire import ApiError, ChatParams
from agentperf_users.tokens import PromptEncoder

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
    replicas: int = 1  # data-parallel engines of the profile behind ``router``
    router: str = ROUND_ROBIN  # one of :data:`~agentperf_users.simulator.fleet.ROUTERS`


class SimulatorServer:
    """The engines (replicas), their router, and the HTTP routes in front of them, on the running event loop."""

    def __init__(self, profile: Profile, options: ServerOptions = ServerOptions()):
        self.profile = profile
        self.options = options
        self.model_names = options.served_model_names or (profile.model.name,)
        kinds = tuple(f.kind for f in options.faults)
        # Every engine of one seed, and every reply length drawn from the first's: as the truth's Fleet.
        self.replicas = [EngineReplica(profile, options.seed, self.model_names[0], kinds)
                         for _ in range(replica_count(options.replicas))]
        self._route = make_router(options.router)
        self.metrics = FleetMetrics([replica.metrics for replica in self.replicas])
        self._rng = random.Random(options.seed)
        self._encoder = PromptEncoder()
        self._ids = itertools.count()
        self._id_prefix = f"{self._rng.getrandbits(48):012x}"
        self._faults = FaultPlan(options.faults, options.seed) if options.faults else None
        self._connections: set[HttpConnection] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 picks a free port) and start the tickers; returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connect, host, port)
        for replica in self.replicas:
            replica.start()
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop: streams in flight get an in-band error, then every connection closes."""
        self._server.close()
        for replica in self.replicas:
            replica.close(ApiError(503, "the simulator is shutting down"))
        for conn in list(self._connections):
            conn.transport.close()
        await self._server.wait_closed()

    # --- HTTP routes ---------------------------------------------------------------------------
    def _connect(self) -> HttpConnection:
        conn = HttpConnection(self._handle, self._lost)
        self._connections.add(conn)
        return conn

    def _lost(self, conn: HttpConnection) -> None:
        self._connections.discard(conn)
        if conn.reply is not None:
            for replica in self.replicas:
                replica.drop(conn.reply.request)

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
        first = self.replicas[0]
        if fault is not None and fault.kind in BEFORE_HEADERS:
            first.metrics.count_fault(fault.kind)
            return answer_before_headers(conn, fault.kind, self.options.retry_after_s)
        output_tokens = limit if params.ignore_eos else first.engine.sample_output_tokens(limit)
        plan = self._plan(params, output_tokens, limit)
        request_id = f"chatcmpl-{self._id_prefix}{next(self._ids):012x}"
        request = EngineRequest(request_id=request_id, prompt=prompt, max_output_tokens=output_tokens,
                                arrival_s=time.monotonic())
        replica = self.replicas[self._route(self.replicas, request)] if len(self.replicas) > 1 else first
        try:
            replica.engine.submit(request)
        except QueueFullError as exc:
            raise ApiError(429, f"the server's waiting queue is full: {exc}") from None
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), "messages") from None
        reply_args = (conn, request, params, plan, params.model or self.model_names[0], replica.metrics)
        if fault is not None and params.stream:  # mid-stream kinds need a stream (see .faults)
            reply = FaultyReply(*reply_args, fault=fault)
            first.metrics.count_fault(fault.kind)
        else:
            reply = Reply(*reply_args)
        conn.reply = reply
        if params.stream:
            conn.start_stream((("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")))
        replica.add(reply)

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
        fleet = f", {options.replicas} replicas behind {options.router}" if options.replicas > 1 else ""
        print(f"agentperf simulator: serving {server.model_names[0]} ({profile.name}{fleet}) on {url}", flush=True)
        await stop.wait()
        await server.close()

    loop = new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


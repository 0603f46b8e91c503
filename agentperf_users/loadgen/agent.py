"""``AgentUser``: one Locust user is one coding agent replaying trajectories, turn by turn.

Each turn sends the whole conversation so far (the turn's messages) as one streaming chat request,
records it, then waits the tool time before the next turn: *scheduled* start = previous end + tool
wait, and both that and the actual start are recorded, so a load generator that falls behind shows up
instead of hiding in the numbers (coordinated omission).

Which trajectory an agent plays: the master deals *sessions* (``replay.Dealer``, custom messages
``agentperf_claim`` / ``agentperf_claimed``; a LocalRunner answers itself in-process). A new agent
also gets the next global agent index, and its first session starts at ``--start-turn``. Session ``s``
plays trajectory ``s mod len(set)`` in pass ``s div len(set)``, so no two agents on any worker replay
the same trajectory until the whole set is in play, and a later pass gets a fresh cache namespace
(``--cache-namespace``); its records name the trajectory ``<id>#<pass>``. A capacity step that
restarts the agents is dealt from the start again (see ``Dealer``), and its agents' first requests
are spaced one per ``1 / spawn rate`` seconds from the ramp's start (``replay.join_offset_s``), not
sent in Locust's once-a-second batches. Why not
``worker_index`` arithmetic: a worker does not know how many workers there are, Locust's dispatcher
spreads users unevenly, and indices of reconnected workers grow; one counter on the master is right
whatever the dispatch. A claim is one round trip per trajectory (minutes of load), never per request.

Options are Locust custom arguments (command line, ``locust.conf``, ``LOCUST_*`` variables, the web
UI's start form); workers receive them with the test start, so everything that depends on them (the
trajectory set, the model name) is set up in ``test_start``. The API key is read from the environment
variable named by ``--api-key-env`` and goes nowhere but the Authorization header.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import requests
from gevent import GreenletExit
from gevent.event import AsyncResult
from locust import FastHttpUser, constant, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

from agentperf_users import options
from agentperf_users.client.chat import (
    ChatResult,
    ChatStreamClient,
    api_url,
    redact,
    redact_url,
)
from agentperf_users.errors import AgentperfError
from agentperf_users.loadgen.body import ChatBodyEncoder
from agentperf_users.loadgen.probe import ProbeTarget, qualify
from agentperf_users.loadgen.replay import (
    Dealer,
    ReplaySettings,
    agent_rng,
    chat_params,
    join_offset_s,
    namespace_marker,
    request_tools,
    session_trajectory,
    start_turn,
    tool_wait_s,
)
from agentperf_users.measure import aggregate
from agentperf_users.measure.records import RequestRecord, Status
from agentperf_users.tokens import tools_tokens
from agentperf_users.workload.readers import load_trajectories
from agentperf_users.workload.trajectory import (
    Trajectory,
    TrajectorySet,
)

CLAIM_MESSAGE = "agentperf_claim"
CLAIMED_MESSAGE = "agentperf_claimed"
ERROR_MESSAGE = "agentperf_worker_error"  # a worker's one-line reason for stopping, for the master's console
CLAIM_TIMEOUT_S = 30.0  # a master that does not answer a claim in this long is gone
BACKOFF_FIRST_S = 0.5  # the extra pause after a second failure in a row, doubling with each one more
BACKOFF_MAX_S = 8.0
RETRY_AFTER_MAX_S = 30.0  # a server's Retry-After is honoured up to this: a step's window is 20-60 s
MODELS_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 30.0
_ENV_ATTRIBUTE = "agentperf_agents"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentSettings:
    """The agent options of one test, read from Locust's parsed options."""

    trajectories: str
    trajectory_format: str
    model: str
    api_key_env: str
    request_timeout_s: float
    stall_timeout_s: float
    replay: ReplaySettings  # the rules the ground truth shares (agentperf_users/loadgen/replay.py)

    @classmethod
    def from_options(cls, parsed: argparse.Namespace) -> AgentSettings:
        """Settings from Locust's options (the web UI may have replaced any of them with a string), each
        checked against its declaration (``agentperf_users.options``)."""
        return cls(
            trajectories=options.value(parsed, "trajectories"),
            trajectory_format=options.value(parsed, "trajectory_format"),
            model=options.value(parsed, "model"),
            api_key_env=options.value(parsed, "api_key_env"),
            request_timeout_s=options.value(parsed, "request_timeout"),
            stall_timeout_s=options.value(parsed, "stall_timeout"),
            replay=ReplaySettings.from_options(parsed),
        )


@dataclass(frozen=True)
class Claim:
    """What the master dealt: the agent's global index (on its first claim), a session number, the
    load step it was dealt for (``replay.Dealer``) and, for an agent of a step that started from no
    agents, when its first request is due (epoch seconds; 0: at once)."""

    agent: int | None
    session: int
    step: int = 0
    start_epoch_s: float = 0.0


@dataclass
class _ProcessState:
    """This process's agent state, kept on the Environment (one per test process)."""

    settings: AgentSettings | None = None
    trajectories: TrajectorySet | None = None
    model: str = ""
    api_key: str | None = None
    error: str | None = None  # why this test cannot run (users stop the test with it)
    dealer: Dealer = field(default_factory=Dealer)  # used on the master or a LocalRunner
    tickets: itertools.count = field(default_factory=itertools.count)
    pending: dict[int, AsyncResult] = field(default_factory=dict)  # claims awaiting the master's answer
    started_with: tuple[str, str] | None = None  # (--api-key-env, --host) when the process started (see install)


def _state(environment: Environment) -> _ProcessState:
    state = getattr(environment, _ENV_ATTRIBUTE, None)
    if state is None:
        state = _ProcessState()
        setattr(environment, _ENV_ATTRIBUTE, state)
    return state


def install(environment: Environment, **_: Any) -> None:
    """Register the claim messages on this process's runner (Locust's ``init`` event), the master's ear for
    its workers' errors, and note where the API key comes from and may go (``_check_key_source``)."""
    runner = environment.runner
    state = _state(environment)
    parsed = environment.parsed_options
    state.started_with = (str(getattr(parsed, "api_key_env", "")), environment.host or "")
    if not isinstance(runner, WorkerRunner):  # the dealer: master or LocalRunner
        runner.register_message(CLAIM_MESSAGE, lambda msg, **_: _deal(environment, state, msg))
    if isinstance(runner, MasterRunner):
        runner.register_message(ERROR_MESSAGE, lambda msg, **_: _worker_failed(environment, msg))
    if not isinstance(runner, MasterRunner):
        runner.register_message(CLAIMED_MESSAGE, lambda msg, **_: _claimed(state, msg.data))


def _deal(environment: Environment, state: _ProcessState, msg: Any) -> None:
    # The test is stopping with its one line: deal nothing, so an agent of a worker that started before the
    # master's quit reached it sends nothing before it is stopped.
    if state.error:
        return
    step = aggregate.current_step(environment)
    if step.fresh_agents:
        state.dealer.restart(step.index, step.agents)
    agent, session = state.dealer.deal(bool(msg.data["new_agent"]))
    start_epoch_s = 0.0
    if step.fresh_agents and agent is not None and step.spawn_rate > 0:
        start_epoch_s = step.ramp_start_epoch_s + join_offset_s(agent, step.spawn_rate)
    environment.runner.send_message(
        CLAIMED_MESSAGE, {"ticket": msg.data["ticket"], "agent": agent, "session": session, "step": state.dealer.step,
                          "start_epoch_s": start_epoch_s},
        msg.node_id)


def _claimed(state: _ProcessState, data: dict) -> None:
    result = state.pending.pop(data["ticket"], None)
    if result is not None:
        result.set(Claim(data["agent"], data["session"], data["step"], data.get("start_epoch_s", 0.0)))


def claim(environment: Environment, new_agent: bool) -> Claim:
    """Ask the master (or this LocalRunner) for the next session, and an agent index if ``new_agent``.
    A master that does not answer stops the test (and this agent)."""
    state = _state(environment)
    ticket = next(state.tickets)
    result = state.pending[ticket] = AsyncResult()
    environment.runner.send_message(CLAIM_MESSAGE, {"ticket": ticket, "new_agent": new_agent})
    try:
        return result.get(timeout=CLAIM_TIMEOUT_S)
    except gevent.Timeout:
        state.pending.pop(ticket, None)
        stop_test(environment, f"agentperf: the master did not deal a trajectory within {CLAIM_TIMEOUT_S:g} s")
        raise StopUser() from None


def on_test_start(environment: Environment, **_: Any) -> None:
    """Load this test's settings and trajectory set (and find the model) once per process, and on the
    master or a LocalRunner probe the server (``_qualify``); on bad input or a server that cannot serve
    the run, stop the test with a one-line error."""
    state = _state(environment)
    state.dealer = Dealer()
    try:
        state.settings = settings = AgentSettings.from_options(environment.parsed_options)
        if not isinstance(environment.runner, WorkerRunner):
            _check_key_source(state, settings.api_key_env, environment.host or "")
        # Seconds of CPU for a large set: on the event loop, a worker would miss Locust's heartbeats (the
        # master drops a worker silent for 3 s, and with it the whole step). A native thread keeps the loop,
        # and so the heartbeats, running meanwhile.
        state.trajectories = gevent.get_hub().threadpool.apply(
            load_trajectories, (settings.trajectories, settings.trajectory_format))
        state.api_key = os.environ.get(settings.api_key_env) or None
        if not isinstance(environment.runner, MasterRunner):
            state.model = settings.model or _served_model(environment.host, state.api_key)
        if not isinstance(environment.runner, WorkerRunner):
            _qualify(environment, state)
        state.error = None
    except AgentperfError as exc:
        state.error = f"agentperf: {exc}"
        stop_test(environment, state.error)
        return
    # Keep everything loaded so far (Locust, the set) out of the garbage collector's full passes: on a
    # loaded worker one took ~30 ms, long enough for a stream's next chunks to pile up behind a read.
    gc.collect()
    gc.freeze()


def _qualify(environment: Environment, state: _ProcessState) -> None:
    """The qualification probe (``probe.qualify``) of a plain Locust run, on the master or a LocalRunner once
    the set is loaded: Locust fires ``test_start`` there before it spawns or dispatches a user, so a server
    that cannot serve the run (an option it rejects, a context past its ``max_model_len``, ...) stops the
    test with the probe's one line (``AgentperfError``, exit 2) before any agent sends (a worker's agents,
    already dispatched, are dealt nothing: ``_deal``). ``agentperf capacity`` probes in its own process
    before it starts Locust, and passes ``--no-probe``."""
    if not options.value(environment.parsed_options, "probe"):
        return
    if not environment.host:
        raise AgentperfError("no --host given, so there is no server to probe")
    settings = state.settings
    qualification = qualify(ProbeTarget(environment.host, state.api_key, settings.model, settings.api_key_env),
                            state.trajectories, settings.replay)
    logger.info(qualification.summary())
    for warning in qualification.warnings:
        logger.warning(warning)


def _check_key_source(state: _ProcessState, api_key_env: str, host: str) -> None:
    """The API key goes only where the process was started to send it. Locust's web UI lets anyone who
    reaches it set any option and the host for the next test (even options not shown in its form), so
    without this check a visitor could have the value of any environment variable (a database password)
    sent as a bearer token to a host of their choosing. Workers take the master's (so checked) values."""
    key_env, start_host = state.started_with or (api_key_env, host)
    if api_key_env != key_env:
        raise AgentperfError(f"--api-key-env {api_key_env!r}: the API key's source is fixed when the process starts "
                             f"({key_env!r}); restart with the variable you want")
    if os.environ.get(key_env) and host.rstrip("/") != start_host.rstrip("/"):
        raise AgentperfError(f"host {redact_url(host)!r}: with an API key (${key_env}) set, requests go only to the "
                             f"host given at start ({redact_url(start_host) or 'none'}); restart with --host")


def on_test_stop(environment: Environment, **_: Any) -> None:
    gc.unfreeze()  # what the next test start no longer needs can be collected again


def stop_test(environment: Environment, message: str) -> None:
    """Log ``message`` as one line and end the test as Locust ends one on ``StopTest`` (quit when
    headless or on a worker, stop in the web UI), exiting with ``AgentperfError.exit_code``. Runs the stop
    in its own greenlet: this may be called from inside the runner's start."""
    logger.error(message)
    environment.process_exit_code = AgentperfError.exit_code
    runner = environment.runner
    if isinstance(runner, WorkerRunner):  # its log may be on another host: the master says it too, and stops
        runner.send_message(ERROR_MESSAGE, message)
    headless = bool(getattr(environment.parsed_options, "headless", False))
    gevent.spawn(runner.quit if headless or isinstance(runner, WorkerRunner) else runner.stop)


def _worker_failed(environment: Environment, msg: Any) -> None:
    """A worker stopped with a one-line error (a trajectory set it cannot read, a server it cannot ask):
    the master logs it, once per reason, where the user is looking, and stops the test, since the step
    would otherwise run on with fewer agents than it names."""
    state = _state(environment)
    text = str(msg.data)
    if text != state.error:
        state.error = text
        stop_test(environment, f"{text} (worker {msg.node_id})")


def _served_model(host: str | None, api_key: str | None) -> str:
    """The first model of ``{host}/v1/models`` (used when ``--model`` is empty)."""
    if not host:
        raise AgentperfError("no --host given, so there is no server to ask for a model")
    url = api_url(host, "models")
    try:
        response = requests.get(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {}, timeout=MODELS_TIMEOUT_S)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as exc:
        reason = redact(f"{type(exc).__name__}: {exc}", (api_key or "",))
        raise AgentperfError(f"--model not given and {url} did not name one ({reason})") from None


class AgentUser(FastHttpUser):
    """One coding agent: plays a dealt trajectory turn by turn, then the next one it is dealt."""

    wait_time = constant(0)  # pacing is the tool wait, applied as a scheduled start

    def __init__(self, environment: Environment) -> None:
        state = _state(environment)
        self._process = state
        if state.settings is not None:  # (None: the test is stopping with a one-line error)
            self.network_timeout = state.settings.request_timeout_s  # response headers must come within it
            self.connection_timeout = min(CONNECT_TIMEOUT_S, state.settings.request_timeout_s)
        super().__init__(environment)
        self.stream = ChatStreamClient(
            self.client, api_key=state.api_key,
            request_timeout_s=self.network_timeout, stall_timeout_s=getattr(state.settings, "stall_timeout_s", 0.0),
        )
        self._encoder = ChatBodyEncoder()
        self.agent = -1
        self._rng: random.Random | None = None  # seeded per agent when it joins
        self._trajectory: Trajectory | None = None
        self._label = ""
        self._turn = 0
        self._cold_join = False  # the next request is this agent's first since it joined
        self._untooled_tokens = 0  # what the session's tool definitions add to a turn's count, when not sent
        self._failures_in_a_row = 0
        self._scheduled_perf_s = self._scheduled_epoch_s = 0.0

    def _join(self) -> None:
        """Become an agent: take a global index, a first session and when to start from the master."""
        first = claim(self.environment, new_agent=True)
        self.agent = first.agent
        self._rng = agent_rng(self._process.settings.replay.seed, self.agent)
        now_perf_s, now_epoch_s = time.perf_counter(), time.time()
        delay_s = max(0.0, first.start_epoch_s - now_epoch_s)
        self._scheduled_perf_s, self._scheduled_epoch_s = now_perf_s + delay_s, now_epoch_s + delay_s
        self._cold_join = True
        self._begin(first, first_session=True)

    def _begin(self, dealt: Claim, first_session: bool = False) -> None:
        trajectories, replay = self._process.trajectories, self._process.settings.replay
        session = dealt.session
        index, rounds = session_trajectory(session, len(trajectories))
        trajectory = trajectories.trajectory(index)
        marker = namespace_marker(replay.cache_namespace, aggregate.run_id(self.environment), session,
                                  len(trajectories), dealt.step)
        self._trajectory = trajectory.with_namespace(marker) if marker else trajectory
        self._label = trajectory.id if rounds == 0 else f"{trajectory.id}#{rounds}"
        self._turn = start_turn(replay.start_turn, replay.seed, session, len(trajectory.turns)) if first_session else 0
        # a turn's prompt_tokens counts its tools; under --no-tools the request carries none (one tuple per trajectory)
        self._untooled_tokens = 0 if replay.tools else len(tools_tokens(trajectory.turns[0].tools))
        self._encoder.clear()

    @task
    def turn(self) -> None:
        """Send the next turn at its scheduled start, record it, and schedule the one after."""
        if self._process.error or self._process.settings is None:
            raise StopUser()  # quietly: the test is stopping and its error was logged once
        if self._trajectory is None:
            self._join()
        while (delay_s := self._scheduled_perf_s - time.perf_counter()) > 0:  # a loop timer may fire a bit early
            gevent.sleep(delay_s)
        turn = self._trajectory.turns[self._turn]
        settings = self._process.settings
        params = chat_params(self._process.model, turn.output_tokens, settings.replay)
        load_step = aggregate.current_load_step(self.environment)
        body = self._encoder.body(params, turn.messages, request_tools(turn.tools, settings.replay))
        log = aggregate.get_record_log(self.environment)
        ticket = log.begin(time.time())  # held here, then at what has arrived (progress), until its record is added
        try:
            result = self.stream.post(body, {"agent": self.agent}, max_tokens=turn.output_tokens,
                                      progress=functools.partial(log.progress, ticket))
            log.add(self._record(result, load_step), ticket)
        finally:
            log.end(ticket)
        if result.status is Status.CANCELLED:
            raise GreenletExit  # the kill that cut the request: Locust is stopping this agent
        self._cold_join = False
        replay = settings.replay
        wait_s = tool_wait_s(replay.tool_wait, turn.tool_wait_s, self._rng, replay.tool_wait_median_s, replay.tool_wait_sigma)
        wait_s = max(wait_s, self._backoff_s(result))
        self._scheduled_perf_s, self._scheduled_epoch_s = result.end_perf_s + wait_s, result.end_epoch_s + wait_s
        self._turn += 1
        if self._turn == len(self._trajectory.turns):
            self._begin(claim(self.environment, new_agent=False))

    def _backoff_s(self, result: ChatResult) -> float:
        """The least pause before the next request after ``result``. A server's Retry-After (429, 503) is
        honoured, capped; otherwise the second failure in a row waits ``BACKOFF_FIRST_S``, doubling up to
        ``BACKOFF_MAX_S``, so an agent facing a server that rejects everything (a 400 for an option it was
        not started with, a refused port) does not spin out failures as fast as the server answers. A
        single failure adds nothing: one rejected request among good ones is replayed as the ground truth
        replays it. The failures still count against every tier; the next success resets the count."""
        if result.status is Status.OK:
            self._failures_in_a_row = 0
            return 0.0
        self._failures_in_a_row += 1
        if result.retry_after_s is not None:
            return min(result.retry_after_s, RETRY_AFTER_MAX_S)
        if self._failures_in_a_row < 2:
            return 0.0
        return min(BACKOFF_FIRST_S * 2 ** (self._failures_in_a_row - 2), BACKOFF_MAX_S)

    def _record(self, result: ChatResult, load_step: int) -> RequestRecord:
        return RequestRecord(
            run_id=aggregate.run_id(self.environment),
            worker_id=aggregate.process_id(self.environment),
            agent=self.agent,
            trajectory=self._label,
            turn=self._turn,
            load_step=load_step,
            scheduled_start_epoch_s=self._scheduled_epoch_s,
            start_epoch_s=result.start_epoch_s,
            end_epoch_s=result.end_epoch_s,
            ttfb_s=result.ttfb_s,
            ttft_s=result.ttft_s,
            e2e_s=result.e2e_s,
            itl_p50_s=result.itl_p50_s,
            itl_p95_s=result.itl_p95_s,
            itl_max_s=result.itl_max_s,
            output_tokens=result.output_tokens,
            output_tokens_estimated=result.output_tokens_estimated,
            prompt_tokens=result.prompt_tokens,
            cached_tokens=result.cached_tokens,
            output_tps=result.output_tps,
            status=result.status,
            message=result.message,
            cold_join=self._cold_join,
            counted_prompt_tokens=self._trajectory.turns[self._turn].prompt_tokens - self._untooled_tokens,
        )

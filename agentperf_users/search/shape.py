"""The live capacity search: a LoadTestShape around ``search.CapacitySearch`` (the decision policy).

``CapacitySearchShape`` is the thin LoadTestShape around it. Per step: stop every agent of the previous
step (``--restart-agents``, the default), ramp to the count, warm up for ``--warmup-s`` (cold caches,
agents mid-first-turn: excluded from the verdict), measure for ``--window-s`` (longer when fewer
than ``--min-requests`` requests ended in it: ``search.window_end``), then wait (at most
``COVERAGE_TIMEOUT_S``) until every active worker has reported records up to the window's end, and
judge the records that ended inside the window. At the end it stops all agents and waits for their
last records, so the master's union is complete.

Why restart: a step below an overloaded one would otherwise inherit its queue (requests waiting
tens of seconds that no warm-up drains), so its verdict would depend on the path the search took. A
stopped agent's request in flight is aborted by its closed connection, as with a real client; the
restarted step's agents are dealt the same sessions as at any other time the search visits that
count, with a cache namespace of the step's own (``replay.Dealer``), and start at random turns
(``--start-turn``). So each step starts from the same state and measures the steady state of its
count, whatever the search measured before: the question the ground truth answers.

With ``--predict PROFILE`` the search first predicts (``predicted``: the ground truth's search on the
twin, seconds to minutes) in a native thread, so the master's greenlets (worker heartbeats, reports)
go on meanwhile, then starts from the prediction (``policy``); the prediction is kept in the state.

A worker lost during a step (killed, or its host gone: Locust marks it missing after a few silent
heartbeats) takes its agents with it, and Locust does not hand them to the other workers; the step is
then started again from no agents on the workers left, rather than judged with fewer agents than it
names. A lost worker's records stay in its file, and those it reported in the master's; the state file
names it, with the step and the time.

The server's own numbers for each step come from ``--server-metrics-file``, which ``agentperf capacity``
writes; a master run by plain Locust (the web UI, a Kubernetes master) reads ``--server-metrics-url``
(default: the target's ``/metrics``) itself, from each search's start to its stop, into a file of its own
that it removes after, so its steps carry the same numbers and diagnoses.

The search's state (``--capacity-json``) is written whole after every judged step and at the end, so a
run stopped at any moment keeps every step it judged. SIGTERM (Kubernetes, ``docker stop``,
``agentperf capacity`` stopping its master) ends the search as Ctrl-C does, marked ``interrupted``;
Locust would otherwise die of it, since a headless run installs its own SIGTERM handler only after the
shape returns. A second signal exits at once (the state on disk is already whole).

Early stop (never as a pass): once at least ``EARLY_STOP_MIN_S`` and ``EARLY_STOP_MIN_FRACTION`` of
the window are covered by reports and ``EARLY_STOP_MIN_REQUESTS`` requests completed, the step ends
when every tier this count still matters for fails ``slo.surely_fails``: it would fail even if the
rest of the window, at ``EARLY_STOP_RATE_SLACK`` times the completion rate seen so far, brought only
requests that meet it. The step is then judged on the covered part of its window, which is the
window it records.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from typing import Callable

import gevent
from locust import LoadTestShape
from locust.runners import STATE_CLEANUP, STATE_STOPPED, STATE_STOPPING, WorkerRunner

from agentperf_users.errors import AgentperfError
from agentperf_users.measure import aggregate
from agentperf_users.measure.diagnose import (
    Cause,
    Diagnosis,
    LoadGenerator,
    common_error,
    diagnose_step,
    not_about_capacity,
)
from agentperf_users.measure.records import RequestRecord
from agentperf_users.measure.server_metrics import (
    NOT_AVAILABLE,
    SERVER_METRICS_FILE,
    ServerWindow,
    describe,
    read_samples,
    server_metrics_sampler,
    window_summary,
)
from agentperf_users.measure.slo import (
    SloSpec,
    StepVerdict,
    evaluate_step,
    load_slo,
    speed_text,
    surely_fails,
    ttft_text,
)
from agentperf_users.search import predicted, progress
from agentperf_users.search.headline import capacity_words
from agentperf_users.search.policy import (
    CapacitySearch,
    SearchParameters,
    SearchStopped,
    TierCapacity,
    window_end,
)
from agentperf_users.search.state import SearchState

logger = logging.getLogger(__name__)
steps_logger = logging.getLogger(progress.STEPS_LOGGER)  # the full line of each judged step: locust.log only

COVERAGE_TIMEOUT_S = 10.0  # longest wait for workers' reports covering a window (reports come every 3 s)
RAMP_GRACE_S = 15.0  # beyond |agents changed| / spawn rate, before measuring anyway
STOP_RATE = 100.0  # agents stopped per second between steps and at the end (Locust warns above 100)
EARLY_STOP_MIN_S = 5.0
EARLY_STOP_MIN_FRACTION = 0.25
EARLY_STOP_MIN_REQUESTS = 20
EARLY_STOP_RATE_SLACK = 2.0
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by Ctrl-C


@dataclass(frozen=True)
class StepResult:
    """One measured load step, as the report shows it."""

    index: int
    agents: int
    phase: str  # "step" (phase 1), "bisect", "predict" or "recheck" (``CapacitySearch.phase``)
    window_start_epoch_s: float
    window_end_epoch_s: float  # the end of the window judged (earlier than planned after an early stop)
    verdict: StepVerdict
    early_stop: bool
    coverage_complete: bool  # False: judged after COVERAGE_TIMEOUT_S without every worker's reports
    server: ServerWindow = NOT_AVAILABLE  # the server's own numbers over the window (``server_metrics``)
    diagnoses: tuple[Diagnosis, ...] = ()  # why each failing tier failed (``diagnose``)
    load_generator: LoadGenerator | None = None  # each worker's CPU over the window (``loadgen_cpu``)

    def to_dict(self) -> dict:
        nested = ("verdict", "server", "diagnoses", "load_generator")
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in nested}
        return {**plain, "verdict": self.verdict.to_dict(), "server": self.server.to_dict(),
                "diagnoses": [found.to_dict() for found in self.diagnoses],
                "load_generator": self.load_generator and self.load_generator.to_dict()}


def format_step(step: StepResult) -> str:
    """The live progress line of a finished step."""
    parts = []
    for verdict in step.verdict.tiers:
        agents = f", {verdict.agents_passed}/{verdict.agents_judged} agents" if verdict.agents_judged else ""
        outcome = "pass" if verdict.passed else "FAIL"
        parts.append(f"{verdict.tier.label}: {outcome} (TTFT {ttft_text(verdict)}, "
                     f"output speed {speed_text(verdict)}{agents})")
    first = step.verdict.tiers[0]
    early = ", ended early" if step.early_stop else ""
    partial = ", without every worker's reports" if not step.coverage_complete else ""
    line = (f"step {step.index} ({step.phase}{early}{partial}): {step.agents} agents, {first.requests} requests, "
            f"{first.errors} errors | " + " | ".join(parts))
    if step.server.available:
        line += f" | {describe(step.server)}"
    if step.load_generator is not None and step.load_generator.worker_cpu:
        worker, cpu = step.load_generator.busiest()
        line += (f" | load generator: {cpu * 100:.0f} % of a core at most ({worker}, "
                 f"{len(step.load_generator.worker_cpu)} worker(s))")
    texts = {found.text for found in step.diagnoses}
    if len(texts) == 1 and len(step.diagnoses) == len(step.verdict.tiers) > 1:  # one cause for every tier: said once
        return line + f" | every tier {texts.pop()}"
    return line + "".join(f" | {found.tier} {found.text}" for found in step.diagnoses)


@dataclass(frozen=True)
class LostWorker:
    """A worker that left during a step: the step was measured again without it."""

    worker: str
    step: int  # the index the step would have had
    agents: int
    epoch_s: float


@dataclass
class _Stage:
    """Where the shape is within the current step (internal, mutable)."""

    name: str  # restart, ramp, warmup, window; at the end: stop, flush, finished
    since_epoch_s: float
    deadline_epoch_s: float


class CapacitySearchShape(LoadTestShape):
    """Steps agents up, then bisects per tier; see the module docstring. Runs on the master (or in
    a LocalRunner). After the run: ``steps`` (one ``StepResult`` per measured step), ``capacity()``
    per tier, and ``summary()`` as plain data (also written to ``--capacity-json`` after every judged
    step and at test stop)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._clock = clock
        self._listening = False
        self.spec: SloSpec | None = None
        self.params: SearchParameters | None = None
        self.search: CapacitySearch | None = None
        self.steps: list[StepResult] = []
        self.lost_workers: list[LostWorker] = []
        self.stopped: SearchStopped | None = None
        self.prediction: predicted.Prediction | None = None
        self._predicting = None  # the prediction's thread (gevent's threadpool), while it runs
        self._doubted_agents: int | None = None  # a count whose failure was put down to the load generator once
        self.interrupted = False  # by SIGINT or SIGTERM before the search was done
        self._signalled = False
        self._stage = _Stage("finished", 0.0, 0.0)
        self._agents = 0
        self._phase = "step"
        self._window = (math.nan, math.nan)
        self._workers: frozenset[str] = frozenset()  # the workers the step in progress was ramped on
        self._step_started = 0.0  # when the step in progress began its ramp
        self._last_progress = -math.inf  # when its last live progress event was logged
        self._server_reader = ExitStack()  # the master's own reader of the server's metrics, if it runs one
        self._server_metrics_path = ""

    @property
    def environment(self):
        return self.runner.environment

    @property
    def _progress_events(self) -> bool:
        """Whether a console reads this master's progress events (``agentperf capacity`` asks for them)."""
        return bool(getattr(self.environment.parsed_options, "progress_events", False))

    def tick(self) -> tuple[int, float] | None:
        now = self._clock()
        if self.runner.shape_last_tick is None and not self._begin(now):  # a fresh shape test
            return None
        while self._advance(now):
            pass
        self._live_progress(now)
        if self._stage.name == "finished":
            return None
        if self._stage.name in ("restart", "stop"):
            return 0, max(self.params.spawn_rate, STOP_RATE)
        return self._agents, self.params.spawn_rate

    def capacity(self) -> dict[str, TierCapacity]:
        return self.search.capacity() if self.search else {}

    def summary(self) -> SearchState:
        spec, params = self.spec, self.params
        tiers = [{**asdict(tier), "label": tier.label} for tier in spec.tiers] if spec else []
        return SearchState(
            run_id=aggregate.run_id(self.environment),
            slo={"source": spec.source, "tiers": tiers} if spec else None,
            parameters=asdict(params) if params else None,
            prediction=self.prediction.to_dict() if self.prediction else None,
            steps=tuple(step.to_dict() for step in self.steps),
            capacity={name: capacity.to_dict() for name, capacity in self.capacity().items()},
            complete=bool(self.search and self.search.done),
            interrupted=self.interrupted,
            lost_workers=tuple(asdict(lost) for lost in self.lost_workers),
            stopped=asdict(self.stopped) if self.stopped else None,
        )

    def _begin(self, now: float) -> bool:
        options = self.environment.parsed_options
        try:
            self.params = SearchParameters.from_options(options, live=True)
            self.spec = load_slo(options.slo or None)
        except AgentperfError as exc:
            logger.error("agentperf: %s", exc)
            self.environment.process_exit_code = 2
            return False
        self.search, self.prediction = None, None
        self.steps, self.lost_workers, self.interrupted, self.stopped = [], [], False, None
        self._doubted_agents = None
        if not self._listening:
            self.environment.events.test_stop.add_listener(self._on_test_stop)
            self._listening = True
        self._read_server_metrics()
        if getattr(options, "predict", ""):
            logger.info("agentperf: predicting the capacity on the twin %s (the ground truth's search, virtual "
                        "clock) before the first step", options.predict)
            pool = gevent.get_hub().threadpool
            self._predicting = pool.spawn(predicted.from_options, options, self.spec, self.params)
            self._agents = 0
            return self._enter("predict", now, math.inf)
        self._start_search(now)
        return True

    def _start_search(self, now: float) -> bool:
        """The policy, from the prediction if there is one, and its first step."""
        capacity, margins = (self.prediction.capacity, self.prediction.margins) if self.prediction else (None, None)
        self.search = CapacitySearch.from_parameters([tier.name for tier in self.spec.tiers], self.params, capacity,
                                                     margins)
        self._next_step(now)
        self._write_summary(self.environment)
        return True

    def _predicted(self, now: float) -> bool:
        """The prediction is ready: log it and start the search from it (without it, after a warning,
        should the twin's search have failed: the live search still finds the answer, only slower)."""
        job, self._predicting = self._predicting, None
        try:
            self.prediction = job.get()
        except Exception as exc:  # noqa: BLE001 (any failure of the twin must not cost the live run)
            logger.warning("agentperf: --predict: no prediction (%s); stepping up from --start-agents", exc)
            return self._start_search(now)
        logger.info("agentperf: predicted in %.1f s (%d load steps on the virtual clock)", self.prediction.wall_s,
                    self.prediction.load_steps)
        for capacity in self.prediction.capacity.values():
            logger.info("predicted capacity %s: %s", self.spec.tier(capacity.tier).label,
                        capacity_words(capacity.to_dict()))
        return self._start_search(now)

    def _enter(self, name: str, now: float, deadline_epoch_s: float) -> bool:
        self._stage = _Stage(name, now, deadline_epoch_s)
        return True

    def _ramp_deadline(self, now: float, agents: int, rate: float | None = None) -> float:
        return now + abs(agents - self.get_current_user_count()) / (rate or self.params.spawn_rate) + RAMP_GRACE_S

    def _next_step(self, now: float) -> bool:
        agents = None if self.stopped else self.search.next_agents()
        if agents is None:
            for capacity in self.search.capacity().values():  # agentperf capacity's console ends with its headline
                steps_logger.info("capacity %s: %s", self.spec.tier(capacity.tier).label,
                                  capacity_words(capacity.to_dict()))
            self._agents = 0
            return self._enter("stop", now, self._ramp_deadline(now, 0, STOP_RATE))
        self._phase = self.search.phase
        self._agents = agents
        if self.params.restart_agents and self.get_current_user_count() > 0:
            return self._enter("restart", now, self._ramp_deadline(now, 0, STOP_RATE))
        return self._ramp(now)

    def _ramp(self, now: float) -> bool:
        """Announce the step (after any restart, so no stopping agent is dealt its agents) and ramp."""
        step = aggregate.LoadStep(index=len(self.steps), agents=self._agents, fresh_agents=self.params.restart_agents,
                                  ramp_start_epoch_s=now, spawn_rate=self.params.spawn_rate)
        aggregate.announce_step(self.environment, step)
        self._workers = aggregate.active_workers(self.environment)
        self._step_started = now
        return self._enter("ramp", now, self._ramp_deadline(now, self._agents))

    def _live_progress(self, now: float) -> None:
        """Every ``progress.LIVE_INTERVAL_S`` of a step: its stage, seconds elapsed and expected, and in its
        window the requests so far with each tier's verdict on them (``progress``: the console's live line)."""
        stage = self._stage.name
        if (not self._progress_events or stage not in ("ramp", "warmup", "window")
                or now - self._last_progress < progress.LIVE_INTERVAL_S):
            return
        self._last_progress = now
        records = []
        if stage == "window":
            aggregator = aggregate.aggregator(self.environment)
            records = aggregator.records_between(self._window[0], min(aggregator.covered_until(), now))
        expected = self._agents / self.params.spawn_rate + self.params.warmup_s + self.params.window_s
        logger.info(progress.live_event(len(self.steps), self._phase, self._agents, stage, now - self._step_started,
                                        expected, len(records), evaluate_step(records, self.spec) if records else None))

    def _lost_a_worker(self, now: float) -> bool:
        """A worker lost during a step took its agents with it (Locust does not hand them to the others),
        so the step would be judged with fewer agents than it names: start it again, from no agents, on
        the workers left. Its records so far stay in the files; they are just not judged."""
        lost = self._workers - aggregate.active_workers(self.environment)
        if not lost or self._stage.name not in ("ramp", "warmup", "window"):
            return False
        logger.warning("agentperf: step %d: lost %d worker(s) (%s); measuring its %d agents again on the others",
                       len(self.steps), len(lost), ", ".join(sorted(lost)), self._agents)
        self.lost_workers.extend(LostWorker(worker, len(self.steps), self._agents, now) for worker in sorted(lost))
        self._write_summary(self.environment)
        return self._enter("restart", now, self._ramp_deadline(now, 0, STOP_RATE))

    def _advance(self, now: float) -> bool:
        """Move to the next stage when the current one is over; True if it moved."""
        stage, params = self._stage, self.params
        aggregator = aggregate.aggregator(self.environment)
        over = now >= stage.deadline_epoch_s
        if stage.name == "predict":
            return self._predicted(now) if self._predicting is not None and self._predicting.ready() else False
        if self._lost_a_worker(now):
            return True
        if stage.name == "restart" and (over or self.get_current_user_count() == 0):
            return self._ramp(now)
        if stage.name == "ramp" and (over or self.get_current_user_count() == self._agents):
            return self._enter("warmup", now, now + params.warmup_s)
        if stage.name == "warmup" and over:
            self._window = (stage.deadline_epoch_s, stage.deadline_epoch_s + params.window_s)
            return self._enter("window", now, math.inf)
        if stage.name == "window":
            return self._end_window(now, aggregator) or self._stop_early(now, aggregator)
        if stage.name == "stop" and (over or self.get_current_user_count() == 0):
            return self._enter("flush", now, now + COVERAGE_TIMEOUT_S)
        if stage.name == "flush" and (over or aggregator.covered_until() >= stage.since_epoch_s):
            self._stage = _Stage("finished", now, now)
        return False

    def _end_window(self, now: float, aggregator: aggregate.Aggregator) -> bool:
        """Judge the step once its window's end is known (``search.window_end``) and every active worker
        has reported up to it; a worker that does not report is waited for ``COVERAGE_TIMEOUT_S``."""
        start = self._window[0]
        covered = aggregator.covered_until()
        seen = max(min(covered, now), now - COVERAGE_TIMEOUT_S)
        ends = [record.end_epoch_s for record in aggregator.records_between(start, math.inf)]
        end = window_end(start, self.params, ends, seen)
        if end is None:
            return False
        self._finish_step(end, early=False, complete=covered >= end)
        return self._next_step(now)

    def _stop_early(self, now: float, aggregator: aggregate.Aggregator) -> bool:
        start, planned_end = self._window
        covered = min(aggregator.covered_until(), now)
        elapsed = covered - start
        min_elapsed = max(EARLY_STOP_MIN_S, EARLY_STOP_MIN_FRACTION * self.params.window_s)
        if not self.params.early_stop or elapsed < min_elapsed:
            return False
        records = aggregator.records_between(start, covered)
        if len(records) < EARLY_STOP_MIN_REQUESTS:
            return False
        extra_fraction = EARLY_STOP_RATE_SLACK * (planned_end - covered) / elapsed
        tiers = [self.spec.tier(name) for name in self.search.undecided_tiers(self._agents)]
        if not tiers or not all(surely_fails(records, tier, self._agents, extra_fraction) for tier in tiers):
            return False
        self._finish_step(covered, early=True, complete=True)
        return self._next_step(now)

    def _finish_step(self, end_epoch_s: float, early: bool, complete: bool) -> None:
        start = self._window[0]
        aggregator = aggregate.aggregator(self.environment)
        records = aggregator.records_between(start, end_epoch_s)
        verdict = evaluate_step(records, self.spec)
        server = self._server_window(start, end_epoch_s)
        loadgen = aggregator.load_generator(start, end_epoch_s)
        diagnoses = diagnose_step(verdict, records, server, loadgen)
        step = StepResult(len(self.steps), self._agents, self._phase, start, end_epoch_s, verdict, early, complete,
                          server, diagnoses, loadgen)
        self.steps.append(step)
        steps_logger.info(format_step(step))
        if self._progress_events:
            logger.info(progress.judged_event(step.index, step.phase, step.agents, verdict,
                                              list(dict.fromkeys(found.cause.value for found in diagnoses))))
        doubt = not_about_capacity(diagnoses)
        if doubt is None:
            self.search.record_verdict(self._agents, verdict)
        else:
            self._not_a_verdict(step, doubt, records)
        self._write_summary(self.environment)

    def _read_server_metrics(self) -> None:
        """Where no ``--server-metrics-file`` is kept for this master, read the server's metrics itself
        (module docstring) until the test stops; a URL that is not http(s) is said once and not read."""
        self._server_reader.close()
        options = self.environment.parsed_options
        self._server_metrics_path = getattr(options, "server_metrics_file", "")
        host = getattr(options, "host", "") or getattr(self.environment, "host", "") or ""
        url = getattr(options, "server_metrics_url", "") or (f"{host.rstrip('/')}/metrics" if host else "")
        if self._server_metrics_path or not url:
            return
        if not url.startswith(("http://", "https://")):
            logger.warning("agentperf: --server-metrics-url: expected an http:// or https:// URL; the steps' server "
                           "numbers are not available")
            return
        folder = tempfile.mkdtemp(prefix="agentperf-server-metrics-")
        self._server_reader.callback(shutil.rmtree, folder, ignore_errors=True)
        self._server_metrics_path = os.path.join(folder, SERVER_METRICS_FILE)
        self._server_reader.enter_context(server_metrics_sampler(url, self._server_metrics_path))

    def _server_window(self, start_epoch_s: float, end_epoch_s: float) -> ServerWindow:
        """The server's numbers over a window, from the file ``agentperf capacity`` keeps or this master's
        own reader writes (one line a second, so reading it whole once a step is cheap); not available
        without either."""
        path = self._server_metrics_path
        if not path:
            return NOT_AVAILABLE
        try:
            return window_summary(read_samples(path), start_epoch_s, end_epoch_s)
        except AgentperfError as exc:  # a file being written is read up to its last whole line
            logger.warning("agentperf: %s", exc)
            return NOT_AVAILABLE

    def _not_a_verdict(self, step: StepResult, doubt: Diagnosis, records: list[RequestRecord]) -> None:
        """A failure that is not about capacity is not recorded as the tier failing at this count. A
        failing server (most requests failed, or the server rejects them) ends the search: no count can
        be located against it, and "none" would say the server is merely slow. The load generator, or the
        machine of agentperf's own simulator, is given one more measurement of the same count (the busy
        moment may pass); twice, and the search ends, naming it, rather than report that machine's limit as
        the server's."""
        if doubt.cause in (Cause.LOAD_GENERATOR, Cause.SIMULATOR) and self._doubted_agents != step.agents:
            self._doubted_agents = step.agents
            logger.warning("agentperf: step %d: %s; measuring %d agents again", step.index, doubt.text, step.agents)
            return
        self.stopped = SearchStopped(step.index, step.agents, doubt.cause.value, doubt.text, common_error(records))
        logger.error("agentperf: %s", self.stopped.line())

    def _on_test_stop(self, environment, **_) -> None:
        """A test stopped before the search was done was interrupted, whoever stopped it: a signal, the
        web UI's Stop button, Locust's own SIGTERM handler (installed at once in a web UI run); not one that
        the search itself stopped (``stopped``: a failing server, the load generator), which ended as it meant to."""
        if self.search is not None and not self.search.done and self.stopped is None:
            self.interrupted = True
        self._server_reader.close()
        self._write_summary(environment)

    def _write_summary(self, environment, **_) -> None:
        """The state file, whole (``files.atomic_write``): after every judged step, so a run killed at
        any moment keeps what it judged, and at test stop."""
        path = getattr(environment.parsed_options, "capacity_json", "")
        if not path or self.params is None:
            return
        try:
            self.summary().write(path)
        except OSError as exc:
            logger.error("agentperf: %s: cannot write the capacity summary: %s", path, exc.strerror)

    def interrupt(self, signum: int) -> None:
        """SIGINT or SIGTERM, in a greenlet of its own (``_on_signal``): end the search as Locust ends a
        test on Ctrl-C, by raising KeyboardInterrupt where its main greenlet waits (a headless run then
        stops the test, which writes the state, marked interrupted, and quits its workers; the web UI
        shuts down). Before the search has begun a headless master is still waiting for its workers, in
        a loop with no way out: it quits them and exits. A second signal exits at once."""
        name = signal.Signals(signum).name
        if self._signalled:
            logger.warning("agentperf: %s again: exiting now (the search's state on disk is whole)", name)
            logging.shutdown()
            os._exit(EXIT_INTERRUPTED)
        runner, options = self.runner, self.environment.parsed_options
        headless = bool(getattr(options, "headless", False))
        if headless and runner.state in (STATE_STOPPING, STATE_STOPPED, STATE_CLEANUP):
            return  # the search is over and Locust is shutting down (with its own SIGTERM handler by now)
        self._signalled = True
        self.interrupted = self.search is not None and not self.search.done
        if self.environment.process_exit_code is None and (self.interrupted or self.search is None):
            self.environment.process_exit_code = EXIT_INTERRUPTED
        main = gevent.get_hub().parent
        if headless and self.search is None:
            waiting = "predicting on the twin" if self._predicting is not None else "waiting for workers"
            logger.warning("agentperf: %s while %s: quitting", name, waiting)
            runner.quit()
            main.throw(SystemExit(EXIT_INTERRUPTED))
        logger.warning("agentperf: %s: ending the search; every judged step is kept (%d)", name, len(self.steps))
        main.throw(KeyboardInterrupt())


def _on_signal(shape: CapacitySearchShape, signum: int, _frame) -> None:
    """The Python-level handler: it may run in any greenlet (the shape's own, mid-verdict), so it only
    starts the interruption in a greenlet of its own."""
    gevent.spawn(shape.interrupt, signum)


def install_signal_handlers(environment, **_) -> None:
    """On a master or a local runner running this search (workers keep Locust's own SIGTERM handling)."""
    shape = environment.shape_class
    if not isinstance(shape, CapacitySearchShape) or isinstance(environment.runner, WorkerRunner):
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, functools.partial(_on_signal, shape))

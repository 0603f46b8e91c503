"""``agentperf capacity``: the whole capacity search in one command.

It starts the embedded simulator when no ``--host`` is given, a real Locust master with ``--workers``
local worker processes running ``locustfiles/capacity.py`` headless (the same processes a distributed
run uses, on one machine) and waits for ``--remote-workers`` more from other hosts (docker compose, the
Helm chart), streams the search's progress lines, and writes a run folder: ``report.json``,
``report.html``, ``steps.csv``, ``records.jsonl`` (the merged records), the per-process record files
under ``records/`` (the master's holds a copy of every record its workers reported, so remote workers'
records are there too), ``power.jsonl`` (power readings: ``power``), ``search.json`` (the live search)
``locust.log`` and ``run.json`` (the run's context and ground truth: with the records and
``search.json``, all that ``agentperf report`` needs to rebuild the report).
Against the embedded simulator the report also carries the ground truth from the same engine on a
virtual clock (``agentperf truth``): the search's own answer there, and the same steps as the live run
(its agent counts, in its order) measured without a load generator, step beside step.

Exit codes: 0 every tier located; 3 some tier fails already at the smallest count or never fails up
to ``--max-agents`` (no capacity located); 4 the search did not finish (a Locust error, a lost master);
130 interrupted by Ctrl-C or SIGTERM (the report is still written from every record taken); 2 bad input.

Interruptions: the first SIGINT or SIGTERM stops the Locust master (SIGTERM: it ends the search and
writes its state, every judged step marked interrupted, and tells its workers to quit), then any worker
still there, then the embedded simulator, so no request is cut by the server going first; then the
report. A second signal kills every child and exits at once: the files already written are whole, and
``agentperf report`` rebuilds the report from them. The children run in sessions of their own (a
terminal's Ctrl-C reaches only this process, which stops them in that order) and are asked by the
kernel to stop when this process dies (``PR_SET_PDEATHSIG``), so none outlives it, even under SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import IO, Callable, Sequence

import agentperf_users
from agentperf_users import files, options
from agentperf_users.bounded import short
from agentperf_users.client.chat import redact_url
from agentperf_users.errors import AgentperfError
from agentperf_users.loadgen.probe import ProbeTarget, qualify
from agentperf_users.loadgen.replay import ReplaySettings
from agentperf_users.measure import power, server_metrics
from agentperf_users.measure.slo import load_slo
from agentperf_users.options import Group, add_options
from agentperf_users.report.build import (
    RunContext,
    capacity_lines,
    lost_worker_lines,
    read_search_state,
    step_stats,
    write_context,
    write_report,
)
from agentperf_users.search import predicted
from agentperf_users.search.policy import CapacityStatus, SearchParameters
from agentperf_users.search.progress import ConsoleProgress, expected_duration_words
from agentperf_users.search.state import SearchState
from agentperf_users.workload.readers import load_trajectories

LOCUSTFILE = Path(agentperf_users.__file__).parent / "locustfiles" / "capacity.py"
PROGRESS_MARKERS = ("/agentperf_users.", "/ERROR/", "/CRITICAL/")  # master log lines shown live
MASTER_EXIT_GRACE_S = 30.0
WORKER_EXIT_GRACE_S = 5.0  # after the master: its quit message reaches them at once
DEFAULT_MASTER_PORT = 5557  # Locust's, where remote workers look by default
EXPECT_WORKERS_MAX_WAIT_S = 60
EXIT_NOT_LOCATED = 3
EXIT_INCOMPLETE = 4
EXIT_INTERRUPTED = 130
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The options `agentperf capacity` takes and hands its Locust master as they are; the run's files and host it sets.
FORWARDED_GROUPS = (Group.WORKLOAD, Group.AGENT, Group.REPLAY, Group.SLO, Group.METRICS, Group.SEARCH, Group.PREDICT)


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "capacity",
        help="find how many concurrent agents each SLO tier holds (embedded simulator unless --host)",
        description="Step the number of agents up, then bisect, judging every step against the SLO tiers on exact "
        "numbers from all workers; write a capacity report. Options not listed here are passed to Locust.",
    )
    parser.add_argument("--host", default="", help="OpenAI-compatible server; empty: start the embedded simulator")
    parser.add_argument("--profile", default="", help="simulator profile (embedded target only; default: the simulator's)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="local Locust worker processes")
    parser.add_argument("--remote-workers", type=int, default=0,
                        help="workers started elsewhere (locust -f locustfiles/capacity.py --worker --master-host "
                        "THIS-HOST) that the search also waits for")
    parser.add_argument("--master-bind-host", default="",
                        help="interface the master listens on; default: 127.0.0.1, or all with --remote-workers")
    parser.add_argument("--master-bind-port", type=int, default=0,
                        help="port the master listens on; default: a free one, or 5557 with --remote-workers")
    parser.add_argument("--out", default="", help="run folder; default: a new timestamped folder under ./agentperf-runs/")
    parser.add_argument("--accelerators", type=int, default=0, help="accelerators serving the target (normalisation)")
    parser.add_argument("--power-watts", type=float, default=0.0,
                        help="power drawn by the target, watts, where none is measured (--power-metrics-url)")
    parser.add_argument("--power-metrics-url", default="",
                        help="Prometheus endpoint with the accelerators' power (a DCGM exporter's /metrics), read "
                        "every second; default: the embedded simulator's own, none against --host")
    parser.add_argument("--power-metric", default=power.DEFAULT_METRIC,
                        help=f"the power metric there, watts, summed over its series (default: {power.DEFAULT_METRIC})")
    parser.add_argument("--simulator-fault", action="append", default=[], metavar="KIND[:RATE]",
                        help="make the embedded simulator fail so (repeatable; agentperf simulate --help lists the "
                        "kinds): to rehearse what a failing server looks like")
    parser.add_argument("--truth", default=True, action=argparse.BooleanOptionalAction,
                        help="compute the ground truth on the simulator's engine (embedded simulator only)")
    add_options(parser, FORWARDED_GROUPS)
    parser.set_defaults(func=run, passes_unknown_options=True)


def run(args: argparse.Namespace, locust_args: Sequence[str] = ()) -> int:
    spec = load_slo(args.slo or None)  # every input is checked before anything starts
    trajectories = load_trajectories(args.trajectories, args.trajectory_format)
    decide_recheck(args)
    params = SearchParameters.from_options(args)
    if args.workers < 0 or args.remote_workers < 0 or args.workers + args.remote_workers < 1:
        raise AgentperfError(f"--workers and --remote-workers: expected integers >= 0, at least one worker in all, "
                             f"got {args.workers} and {args.remote_workers}")
    profile = None
    if not args.host:
        from agentperf_users.simulator.profile import (
            DEFAULT_PROFILE,
            SimulatorError,
            load_profile,
        )

        try:
            profile = load_profile(args.profile or DEFAULT_PROFILE)
        except SimulatorError as exc:
            raise AgentperfError(str(exc)) from None
    elif args.profile:
        raise AgentperfError("--profile describes the embedded simulator; it cannot be combined with --host")
    if args.predict:  # the master predicts from it; a bad one is said here, before anything starts
        predicted.check_profile(args.predict)
        predicted.check_speed_spread(options.value(args, "predict_speed_spread"), options.value(args, "predict_repeats"),
                                     ("--predict-speed-spread", "--predict-repeats"))
        if Path(args.predict).is_file():
            args.predict = str(Path(args.predict).resolve())
    check_locust_args(locust_args)
    for option, url in (("--power-metrics-url", args.power_metrics_url), ("--server-metrics-url", args.server_metrics_url),
                        ("--host", args.host)):
        if url and not url.startswith(("http://", "https://")):
            raise AgentperfError(f"{option}: expected an http:// or https:// URL, got {short(redact_url(url))}")
    if args.simulator_fault:
        if args.host:
            raise AgentperfError("--simulator-fault makes the embedded simulator fail; it cannot be combined with --host")
        from agentperf_users.simulator.faults import parse_faults

        try:
            parse_faults(args.simulator_fault)
        except ValueError as exc:
            raise AgentperfError(f"--simulator-fault: {exc}") from None
    out = files.claim_run_folder(Path(args.out)) if args.out else files.new_run_folder()
    print(f"agentperf: run folder {out}", flush=True)
    defaults = all(getattr(args, name) == options.BY_DEST[name].default for name in ("warmup_s", "window_s"))
    print(expected_duration_words(params.warmup_s, params.window_s, suggest_demo=defaults and profile is not None),
          flush=True)
    _interrupt_on_signals()

    interrupted, master_code, children = False, None, []
    with contextlib.ExitStack() as stack:
        host = args.host
        if profile is not None:
            from agentperf_users.simulator.cli import SimulatorProcess

            faults = [part for fault in args.simulator_fault for part in ("--fault", fault)]
            simulator = stack.enter_context(SimulatorProcess(
                ["--profile", args.profile or profile.name, "--port", "0", "--seed", str(args.seed), *faults],
                start_new_session=True, preexec_fn=_dies_with_parent()))
            children.append(simulator.process)
            host = simulator.url
            injected = f", failing on purpose: {', '.join(args.simulator_fault)}" if faults else ""
            print(f"agentperf: embedded simulator ({profile.name}) at {host}{injected}", flush=True)
        model = _qualify(args, host, trajectories, out)
        power_url = args.power_metrics_url or (f"{host}/metrics" if profile is not None else "")
        measured_from = None
        if power_url:
            modelled = "" if args.power_metrics_url else " (the simulator's power model)"
            measured_from = f"{args.power_metric} at {power.endpoint_name(power_url)}{modelled}"
        context = _context(args, profile, host, measured_from, model)
        write_context(out, context)
        if power_url:
            stack.enter_context(power.PowerSampler(power_url, out / power.POWER_FILE, args.power_metric))
            print(f"agentperf: reading power every {power.SAMPLE_INTERVAL_S:g} s: {measured_from}", flush=True)
        server_url = args.server_metrics_url or f"{host.rstrip('/')}/metrics"
        stack.enter_context(server_metrics.server_metrics_sampler(server_url, out / server_metrics.SERVER_METRICS_FILE))
        print(f"agentperf: reading the server's metrics every {server_metrics.SAMPLE_INTERVAL_S:g} s at "
              f"{power.endpoint_name(server_url)}", flush=True)
        try:
            master_code = _run_locust(_locust_command(args, host, out, model), locust_args, args, out, children)
        except KeyboardInterrupt:
            _exit_at_once_on_a_second_signal(children, out)
            interrupted = True
    return _report(args, out, spec, params, trajectories, profile, interrupted, master_code, context)


# Locust's own parser, in a process of its own: importing Locust monkey-patches the threads this one runs.
# Only the options are named, never the values after them (a key pasted after a mistyped option stays unsaid).
_LOCUST_ARGS_CHECK = """
import sys
from locust.argument_parser import get_parser
_, unknown = get_parser(default_config_files=()).parse_known_args(sys.argv[1:])
if unknown:
    named = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")] or ["a value without its option"]
    sys.exit("unrecognized arguments (neither agentperf's nor Locust's): " + " ".join(named))
"""


def check_locust_args(locust_args: Sequence[str]) -> None:
    """Options agentperf does not know go to Locust as they are (``--loglevel``, ``--stop-timeout``, ...); one
    that Locust does not know either would end the run only after its qualification and ground truth, with a
    report of no steps. Locust's parser reads them first, so a typo is one line, before anything starts."""
    if not locust_args:
        return
    done = subprocess.run([sys.executable, "-c", _LOCUST_ARGS_CHECK, *locust_args], capture_output=True, text=True,
                          timeout=120)
    if done.returncode:
        said = [line for line in done.stderr.splitlines() if line.strip()]
        words = said[-1].split("error: ", 1)[-1] if said else f"Locust's parser exited {done.returncode}"
        raise AgentperfError(words[:300])


def _qualify(args: argparse.Namespace, host: str, trajectories, out: Path) -> str:
    """The qualification probe (``probe.qualify``) before the first step: a server that cannot serve this
    run (unreachable, not OpenAI-compatible, a wrong key, an option it rejects, contexts past its
    max_model_len) ends it here with one line, and the run folder, still empty, is removed. Returns the
    model, so workers do not ask the server for it again."""
    target = ProbeTarget(host, os.environ.get(args.api_key_env) or None, args.model, args.api_key_env)
    try:
        qualification = qualify(target, trajectories, ReplaySettings.from_options(args))
    except AgentperfError:
        with contextlib.suppress(OSError):
            out.rmdir()
        raise
    print(qualification.summary(), flush=True)
    for warning in qualification.warnings:
        print(f"agentperf: warning: {warning}", flush=True)
    return qualification.model


def _context(args: argparse.Namespace, profile, host: str, measured_from: str | None, model: str) -> RunContext:
    """What the report says besides the records (``run.json``); power samples are read from their file."""
    accelerators = args.accelerators or (profile.gpu.count if profile else None)
    power_w, power_source = (args.power_watts, "--power-watts") if args.power_watts else (None, None)
    if not power_w and profile is not None:
        power_w, power_source = profile.gpu.tdp_w * profile.gpu.count, "simulator profile TDP (nameplate)"
    return RunContext(
        target={"host": redact_url(host) if not profile else "embedded simulator", "model": model or None,
                "simulator_profile": profile.name if profile else None},
        trajectories=args.trajectories, accelerators=accelerators, power_watts=power_w,
        power_source=power_source, interrupted=False, power_measured_from=measured_from,
        server_metrics_from=power.endpoint_name(args.server_metrics_url or f"{host.rstrip('/')}/metrics"))


def _interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM (what Kubernetes and ``docker stop`` send) both end the run as an interrupt:
    Locust stops and the report is written from every record taken. SIGINT is set explicitly because a
    shell starts a background job with it ignored, and a Python started so keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _exit_at_once_on_a_second_signal(children: Sequence[subprocess.Popen], out: Path) -> None:
    """After the first signal a person (or an orchestrator) who signals again wants it over now: every
    child killed, no report written. Whatever is on disk is whole (``files.atomic_write``)."""
    def exit_now(signum: int, _frame) -> None:
        for child in children:
            if child.poll() is None:
                child.kill()
        print(f"agentperf: {signal.Signals(signum).name} again: stopped every process; `agentperf report {out}` "
              "rebuilds the report from what was kept", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, exit_now)


def _dies_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child ``signum`` when this process dies, however it
    dies (SIGKILL included), so no master, worker or simulator outlives the run (Linux only; elsewhere
    None). SIGTERM, so a master still ends its search as interrupted and tells its workers to quit. The
    kernel ties the signal to the thread that started the child: they are all started from the main
    thread, which lives as long as this process. The prctl function is looked up here, in the parent, so
    the child between fork and exec only makes that call and getppid (nothing that takes a lock another
    thread of ours might have held at the fork). A parent that died before the call is caught by
    comparing the parent's pid."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)

    return in_child


def _locust_command(args: argparse.Namespace, host: str, out: Path, model: str) -> list[str]:
    """The master's command: every option of the forwarded groups by construction (``options.forward``), the
    model the probe settled on, and the run folder's files; it logs the search's progress as events for the
    console (``--progress-events``)."""
    run_files = ["--host", host, "--records-dir", str(out / "records"), "--run-id", out.name,
                 "--capacity-json", str(out / "search.json"),
                 "--server-metrics-file", str(out / server_metrics.SERVER_METRICS_FILE), "--progress-events",
                 "--no-probe"]  # probed already (_qualify)
    forwarded = options.forward(argparse.Namespace(**{**vars(args), "model": model}), FORWARDED_GROUPS)
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--exit-code-on-error", "0",
            *run_files, *forwarded]


def _run_locust(command: list[str], locust_args: Sequence[str], args: argparse.Namespace, out: Path,
                children: list[subprocess.Popen]) -> int:
    """A master and ``--workers`` local worker processes (``--remote-workers`` more connect from other
    hosts); progress lines to the console, all lines to locust.log. Options passed on to Locust come last,
    so they win (``--expect-workers-max-wait``, say). Children get their own session, so a Ctrl-C reaches
    only us and we stop them in order, and die with us (``_dies_with_parent``); each is added to
    ``children`` as it starts."""
    remote = args.remote_workers > 0
    bind_host = args.master_bind_host or ("*" if remote else "127.0.0.1")
    port = args.master_bind_port or (DEFAULT_MASTER_PORT if remote else _free_port())
    master_command = command + [
        "--master", "--master-bind-host", bind_host, "--master-bind-port", str(port),
        "--expect-workers", str(args.workers + args.remote_workers), "--expect-workers-max-wait",
        str(EXPECT_WORKERS_MAX_WAIT_S), *locust_args]
    worker_command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker",
                      "--master-host", "127.0.0.1", "--master-port", str(port)]
    master, workers, tail = None, [], None
    console = ConsoleProgress(sys.stdout)
    log = open(out / "locust.log", "w", encoding="utf-8")
    try:
        master = subprocess.Popen(master_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True, preexec_fn=_dies_with_parent())
        children.append(master)
        tail = threading.Thread(target=_tail, args=(master.stdout, log, console), daemon=True)
        tail.start()
        if remote:
            print(f"agentperf: waiting for {args.remote_workers} remote worker(s): locust -f locustfiles/capacity.py "
                  f"--worker --master-host <this host> --master-port {port}", flush=True)
        for _ in range(args.workers):
            workers.append(subprocess.Popen(worker_command, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_dies_with_parent()))
            children.append(workers[-1])
        return master.wait()
    except KeyboardInterrupt:
        _exit_at_once_on_a_second_signal(children, out)
        console.end()
        print("agentperf: interrupted; stopping the test and keeping every judged step and record", flush=True)
        if master is not None:
            master.send_signal(signal.SIGTERM)
            _wait(master, MASTER_EXIT_GRACE_S)
        raise
    finally:
        for worker in workers:  # the master's quit has reached them; one it could not reach is stopped
            _wait(worker, WORKER_EXIT_GRACE_S, terminate_after=True)
        if tail is not None:
            tail.join(timeout=5)
        console.end()
        log.close()


def _tail(stream: IO[str], log: IO[str], console: ConsoleProgress) -> None:
    """Every master line to locust.log; the search's own to the console (progress events compactly)."""
    for line in stream:
        log.write(line)
        log.flush()
        if any(marker in line for marker in PROGRESS_MARKERS):
            message = line.split(": ", 1)[1] if "] " in line and ": " in line else line
            if not console.message(message.rstrip()):
                console.line(f"  {message.rstrip()}")


def _wait(process: subprocess.Popen, timeout_s: float, terminate_after: bool = False) -> None:
    """Wait ``timeout_s`` for ``process`` to exit; then SIGTERM and as long again (``terminate_after``),
    then SIGKILL."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout_s)
        return
    if terminate_after:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout_s)
            return
    process.kill()
    process.wait()


def decide_recheck(args: argparse.Namespace) -> None:
    """``--recheck auto``, decided here, where the target is known: on against ``--host``, off against the
    embedded simulator, whose speed does not drift (and the README's demo stays two steps shorter). The
    master is handed the decision, since it cannot tell the embedded simulator from a server."""
    if args.recheck == "auto":
        args.recheck = "on" if args.host else "off"


def _report(args, out: Path, spec, params, trajectories, profile, interrupted: bool, master_code: int | None,
            context: RunContext) -> int:
    """The report from the run folder alone (``report.write_report``, as ``agentperf report`` makes it),
    after ``run.json`` is rewritten with how the run ended and the ground truth."""
    summary = read_search_state(out, missing_ok=True)
    truth = None
    if profile is not None and args.truth and not interrupted:
        print("agentperf: computing the ground truth on the simulator's engine (virtual clock)", flush=True)
        try:
            truth = _ground_truth(profile, trajectories, spec, params, ReplaySettings.from_options(args), summary)
        except KeyboardInterrupt:
            _exit_at_once_on_a_second_signal((), out)
            print("agentperf: interrupted; writing the report without the ground truth", flush=True)
            interrupted = True
    write_context(out, replace(context, interrupted=interrupted), truth)
    report = write_report(out, spec)
    print(f"agentperf: report {out / 'report.html'}", flush=True)
    for line in lost_worker_lines(report) + capacity_lines(report):  # the headline: the last lines
        print(line, flush=True)
    if interrupted:
        return EXIT_INTERRUPTED
    if report.get("stopped"):  # its line, the server's words, was printed with the capacity lines
        return EXIT_INCOMPLETE
    if master_code not in (0, None) or not summary.complete:
        print(f"agentperf: the search did not finish (Locust exit code {master_code}); see {out / 'locust.log'}",
              file=sys.stderr)
        return EXIT_INCOMPLETE
    located = all(cap["status"] == CapacityStatus.FOUND for cap in report["capacity"].values())
    return 0 if located else EXIT_NOT_LOCATED


def _ground_truth(profile, trajectories, spec, params, settings, summary: SearchState) -> dict:
    """The truth's search, its verdict band per tier (every count up to where a located tier failed, live
    or in the truth) and the live steps' twins (``same_steps``, which the report puts beside them)."""
    from agentperf_users.search import truth as truth_module

    truth = truth_module.find_capacity(profile, trajectories, spec, params, settings).to_dict(spec)
    located = [cap["first_failing_agents"] for caps in (summary.capacity or {}, truth["capacity"])
               for cap in caps.values() if cap["status"] == CapacityStatus.FOUND]
    if located:
        bands = truth_module.verdict_bands(profile, trajectories, spec, params, max(located), settings)
        truth["bands"] = {name: band.to_dict() for name, band in bands.items()}
    truth["same_steps"] = [
        {"agents": step.agents, **step_stats(step.records, step.window_end_s - step.window_start_s),
         "passed": {verdict.tier.name: verdict.passed for verdict in step.verdict.tiers}}
        for step in truth_module.measure_steps(profile, trajectories, spec, params, twin_windows(summary), settings)
    ]
    return truth


def twin_windows(summary: SearchState) -> list[tuple[int, float | None]]:
    """The live steps as ``truth.measure_steps`` replays them: (agents, window). A step that ended early
    gets its actual window (the truth has no early stop); any other gets None, the truth's own window
    rule, so that a window the live run extended for ``--min-requests`` is extended by the same rule in
    the truth, until *its* requests ended, not cut at the live length, where a request that ended a few
    milliseconds later in the truth would leave it empty."""
    return [(step["agents"], step["window_end_epoch_s"] - step["window_start_epoch_s"] if step["early_stop"] else None)
            for step in summary.steps]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

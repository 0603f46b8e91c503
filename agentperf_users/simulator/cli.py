"""``agentperf simulate`` (also ``python -m agentperf_users.simulator``): serve, describe or list profiles.

The simulator imports nothing from the harness, so :func:`run` turns its own errors (a bad profile, a
port in use) into one line on stderr and an exit code itself. :class:`SimulatorProcess` starts the
server as a child process and reads the URL from its startup line, for the harness, tests and benchmarks.

Injected faults (``--fault KIND[:RATE]``, repeatable; ``--fault-retry-after SECONDS``, default 1), for
tests and for rehearsing alerts. What a client sees, per kind (N = 2 token chunks):

=======================  ===============================================================================
``429`` / ``503``        that status, ``Retry-After: SECONDS``, an OpenAI-style JSON error body; no stream
``500``                  that status and JSON error body, no ``Retry-After``
``reset-before-headers`` the request is read, then a TCP RST: no response byte at all
``reset-mid-stream``     200, N token chunks, then a TCP RST (no usage, no ``[DONE]``)
``stall``                200, N token chunks, then silence; the connection stays open
``drip``                 200, one token chunk per second, ending (usage, ``[DONE]``) after ~max_tokens s
``malformed-sse``        after N token chunks one event that is neither JSON nor UTF-8; then a normal end
``wrong-shape-json``     after N token chunks one event of valid JSON in the wrong shape (``{"choices": 5}``,
                         ``"delta": "str"``, ``"tool_calls": 7``, ...: the i-th such request gets shape i
                         mod 7); then a normal end
``absurd-usage``         the whole answer, then usage with ``completion_tokens: 100000``, then ``[DONE]``
``missing-usage``        the whole answer and ``[DONE]``, no usage chunk even if asked for
``missing-done``         the whole answer and the usage chunk, then the response ends without ``[DONE]``
=======================  ===============================================================================

Each validated chat completion request draws at most one fault, in arrival order, from a generator
seeded with ``--seed``: a RATE is the share of requests that get that kind (rates add up to at most 1;
a kind without a rate gets an equal share of what the given rates leave, so ``--fault stall`` faults
every request). Mid-stream kinds apply to streamed requests only. Injected faults are counted in
``agentperf_sim_faults_total{kind}`` and never in ``vllm:request_success_total``. The details are in
:mod:`agentperf_users.simulator.faults`.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from agentperf_users.simulator.faults import (
    DEFAULT_RETRY_AFTER_S,
    KINDS,
    MAX_RETRY_AFTER_S,
    parse_faults,
)
from agentperf_users.simulator.fleet import ROUND_ROBIN, ROUTERS, make_router, replica_count
from agentperf_users.simulator.profile import (
    DEFAULT_PROFILE,
    Profile,
    SimulatorError,
    list_profiles,
    load_profile,
)
from agentperf_users.simulator.server import API_KEY_ENV, ServerOptions, serve

STARTUP_PREFIX = "agentperf simulator: serving "
STARTUP_TIMEOUT_S = 30.0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=DEFAULT_PROFILE, metavar="NAME|FILE",
                        help=f"bundled profile name or profile YAML file (default: {DEFAULT_PROFILE})")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer <key>' on /v1 routes (default: ${API_KEY_ENV}; prefer the "
                             "variable, since a key on the command line shows in ps)")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="model name(s) to accept and report; the first is reported (default: the profile's model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the engine and of reply lengths (default: 0)")
    parser.add_argument("--tool-call-probability", type=float, default=0.0, metavar="P",
                        help="chance that an answer to a request with tools and tool_choice auto is a tool call")
    parser.add_argument("--reasoning-share", type=float, default=0.0, metavar="S",
                        help="share of each answer's tokens streamed first as reasoning deltas (default: 0)")
    parser.add_argument("--fault", action="append", default=[], metavar="KIND[:RATE]",
                        help="inject a failure into RATE (0-1] of the chat completion requests, drawn per request "
                             "in arrival order from --seed; repeatable, a request gets at most one fault; a kind "
                             "without RATE gets an equal share of what the given rates leave (one --fault alone: "
                             f"every request). KIND: {', '.join(KINDS)}. 429/503 carry Retry-After; the stream "
                             "kinds act after 2 token chunks (reset-mid-stream: TCP RST; stall: silence, connection "
                             "open; malformed-sse / wrong-shape-json: one bad event, then a normal end), drip sends 1 "
                             "token/s, absurd-usage claims 100000 completion tokens, missing-usage drops the usage "
                             "chunk, missing-done drops [DONE]. Counted in agentperf_sim_faults_total{kind}")
    parser.add_argument("--fault-retry-after", type=int, default=DEFAULT_RETRY_AFTER_S, metavar="SECONDS",
                        help=f"Retry-After of injected 429 and 503 answers (default: {DEFAULT_RETRY_AFTER_S})")
    parser.add_argument("--replicas", default="1", metavar="N",
                        help="serve N data-parallel copies of the profile's engine behind --router, as agentperf "
                             "truth and predict --replicas model them on the virtual clock; /metrics labels each "
                             "copy's series engine=\"i\" (default: 1)")
    parser.add_argument("--router", default=ROUND_ROBIN, metavar="|".join(ROUTERS),
                        help="how requests are spread over --replicas: round-robin, or prefix-affinity (each to the "
                             "replica caching the longest prefix of its prompt, within a bounded load)")
    parser.add_argument("--describe", nargs="?", const="", default=None, metavar="PROFILE",
                        help="print the derived capacity numbers of PROFILE (default: --profile) and exit")
    parser.add_argument("--json", action="store_true", help="with --describe: print JSON")
    parser.add_argument("--list-profiles", action="store_true", help="print the bundled profile names and exit")


def register_cli(subparsers: Any) -> None:
    """Add ``simulate`` to the ``agentperf`` command."""
    parser = subparsers.add_parser(
        "simulate", help="run the simulated OpenAI-compatible inference server",
        description="Serve a simulated LLM engine (continuous batching, prefix cache, finite KV) over the "
                    "OpenAI chat completions API, with vLLM-named Prometheus metrics at /metrics.")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Carry out ``simulate``; returns the exit code, and never lets a user error out as a traceback."""
    try:
        return _simulate(args)
    except SimulatorError as exc:
        print(f"agentperf simulate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # before the server installed its own SIGINT handler
        return EXIT_INTERRUPTED


def _simulate(args: argparse.Namespace) -> int:
    if args.list_profiles:
        print("\n".join(list_profiles()))
        return 0
    for name, value in (("--tool-call-probability", args.tool_call_probability),
                        ("--reasoning-share", args.reasoning_share)):
        if not 0 <= value <= 1:
            raise SimulatorError(f"{name}: expected a number between 0 and 1, got {value}")
    if not 0 <= args.fault_retry_after <= MAX_RETRY_AFTER_S:
        raise SimulatorError(f"--fault-retry-after: expected whole seconds from 0 to {MAX_RETRY_AFTER_S}, "
                             f"got {args.fault_retry_after}")
    faults = parse_faults(args.fault)
    replicas = replica_count(args.replicas)
    make_router(args.router)  # an unknown name is one line here, before anything listens
    try:
        profile = load_profile(args.describe or args.profile)
    except OSError as exc:
        raise SimulatorError(f"{args.profile}: cannot read the profile: {exc.strerror or exc}") from None
    if args.describe is not None:
        try:
            print(json.dumps(profile.describe(), indent=2) if args.json else describe_text(profile), flush=True)
        except BrokenPipeError:  # `| head` closed the pipe: not an error of ours
            sys.stderr.close()
        return 0
    options = ServerOptions(
        served_model_names=tuple(args.served_model_name or ()),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        tool_call_probability=args.tool_call_probability,
        reasoning_share=args.reasoning_share,
        seed=args.seed,
        faults=faults,
        retry_after_s=args.fault_retry_after,
        replicas=replicas,
        router=args.router,
    )
    try:
        serve(profile, args.host, args.port, options=options)
    except OSError as exc:  # binding is the only OSError serve() lets out
        raise SimulatorError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0


def describe_text(profile: Profile) -> str:
    """The numbers a capacity planner checks first, as aligned lines."""
    d = profile.describe()
    lines = [
        ("profile", f"{d['profile']}: {d['model']} on {d['gpu']}"),
        ("KV cache", f"{d['kv_cache_gib']} GiB = {d['kv_capacity_tokens']:,} tokens ({d['kv_capacity_blocks']:,} blocks); "
                     f"{d['max_concurrency_at_max_context']}x the max context"),
        ("decode", f"{d['decode_step_b1_ms']} ms/step at batch 1 ({d['decode_tok_s_b1']:,} tok/s), "
                   f"{d['decode_step_b64_ms']} ms/step at batch 64 ({d['decode_tok_s_b64']:,} tok/s); "
                   f"{d['decode_context_tokens']}-token contexts"),
        ("prefill", f"{d['prefill_tok_s']:,} tok/s"),
        ("power", f"{d['power_idle_w']:g} W idle, {d['power_tdp_w']:g} W at full load "
                  "(/metrics DCGM_FI_DEV_POWER_USAGE scales between them with the engine's busy share)"),
    ]
    for key, anchor in d["anchors"].items():
        lines.append(("anchor", f"{key} {anchor:,g} (derived {d[key]:,}, {d[key] / anchor:.2f}x)"))
    if d["anchor_source"]:
        lines.append(("source", d["anchor_source"]))
    return "\n".join(f"{label:<9} {text}" for label, text in lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agentperf_users.simulator``: the ``simulate`` options as a standalone command."""
    parser = argparse.ArgumentParser(prog="python -m agentperf_users.simulator",
                                     description="Serve the agentperf simulated inference engine.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


class SimulatorProcess:
    """The simulator in a child process, stopped on exit: ``with SimulatorProcess(["--port", "0"]) as sim``.

    ``cli_args`` are ``simulate`` options; ``cpus`` pins the child to those CPUs. The URL comes from the
    startup line, so ``--port 0`` works. The child's stderr is inherited.
    """

    def __init__(self, cli_args: Sequence[str] = ("--port", "0"), cpus: set[int] | None = None,
                 env: dict[str, str] | None = None, start_new_session: bool = False,
                 preexec_fn: Callable[[], None] | None = None):
        self._command = [sys.executable, "-m", "agentperf_users.simulator", *cli_args]
        self._cpus = cpus
        self._env = env
        self._start_new_session = start_new_session  # a Ctrl-C to the terminal's group must not reach it
        self._preexec_fn = preexec_fn  # e.g. the harness's parent-death signal
        self.process: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "SimulatorProcess":
        cpus, setup = self._cpus, self._preexec_fn

        def in_child() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)
            if setup:
                setup()

        self.process = subprocess.Popen(
            self._command, stdout=subprocess.PIPE, text=True, env=self._env,
            start_new_session=self._start_new_session, preexec_fn=in_child if cpus or setup else None)
        try:
            self.url = self._read_url()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _read_url(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.process.stdout], [], [], 0.1)
            if readable:
                line = self.process.stdout.readline()
                if line.startswith(STARTUP_PREFIX):
                    return line.rsplit(" on ", 1)[1].strip()
                if not line and self.process.poll() is not None:
                    break
        code = self.process.poll()
        raise SimulatorError(f"simulator did not start ({'exit code ' + str(code) if code is not None else 'timed out'}); "
                             "see its stderr")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the server closes its streams with an in-band error), SIGKILL after ``timeout_s``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()

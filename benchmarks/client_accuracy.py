"""How exactly does agentperf's streaming client time tokens, and how many can one worker core stream?

Ground truth is the simulator's own record of when it wrote each token (a request with
``"agentperf_timing": true`` gets ``send_times`` in ``time.monotonic()`` seconds in its usage chunk). The
client stamps arrivals with ``time.perf_counter()``, which on Linux is the same CLOCK_MONOTONIC (checked
below, with an offset applied otherwise), so on one host the difference *is* the client's error:

* TTFT error = client arrival of the first token - server send time of the first token;
* gap error = client inter-token gap - server inter-token gap, for every later token.

On Linux the agentperf client stamps arrivals with the kernel's receive time (SO_TIMESTAMPNS), so its
error comes from loopback delivery plus the reads that pick up several chunks at once (a stamp is the
last packet's): that happens when the process falls more than an inter-token gap behind, from its own
load or from other processes taking its CPU (the "wait" column: time it was runnable but not running).

The client runs as ONE gevent process, exactly as in a Locust worker (monkey-patched, FastHttpSession,
every request fired into a Locust ``RequestStats``), with rising numbers of concurrent agents; the
simulator runs in its own process on another CPU. Streamed tokens per client CPU-second is the
per-core saturation throughput; the TTFT target (p99 <= 2 ms) applies up to 80 % of it. A large-context
phase sends ~100K-token (~500 KB) requests, where a buffering client inflates TTFT.

Baseline (when ``aiohttp`` is installed): the same workload through an asyncio/aiohttp client written
the way vLLM's benchmark request function is (line iteration over ``response.content``, JSON per line).

    python benchmarks/client_accuracy.py [--levels 8,16,32,64,128,256,384] [--level-s 4] [--no-baseline]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WARMUP_S = 1.0
SETTLE_S = 1.0  # between levels, so the simulator finishes the aborted requests
TTFT_TARGET_MS = 2.0
LOAD_SHARE = 0.8  # the TTFT target applies up to this share of the saturation throughput
CLIENT_CPU, SIMULATOR_CPU = 0, 1


def _request_body(prompt_tokens: int, output_tokens: int, model: str) -> bytes:
    words = " ".join(["word"] * prompt_tokens)  # one token per word in the simulator's tokenizer
    return json.dumps({
        "model": model, "messages": [{"role": "user", "content": words}], "stream": True,
        "stream_options": {"include_usage": True}, "max_completion_tokens": output_tokens,
        "max_tokens": output_tokens, "ignore_eos": True, "agentperf_timing": True,
    }).encode()


def _quantiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    ordered = sorted(values)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _freeze_heap() -> None:
    """As AgentUser's test start does: what is loaded by now stays out of full garbage collections."""
    gc.collect()
    gc.freeze()


def _cpu_clocks() -> tuple[float, float]:
    """(CPU seconds used, seconds spent runnable but waiting for a CPU) of this process. The second
    says how much other processes on the machine disturbed a level (Linux schedstat; 0 elsewhere)."""
    try:
        with open("/proc/self/schedstat") as handle:
            waited_s = int(handle.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        waited_s = 0.0
    return time.process_time(), waited_s


def _summary(samples: list[tuple[float, float, list[float], dict | None]], window: tuple[float, float],
             clocks: tuple[float, float], offset_s: float) -> dict:
    """``samples``: (client start, client end, token arrivals, server timing) of every request of the
    level. Throughput counts the tokens that arrived inside the window; accuracy uses the requests
    that ran entirely inside it (under the level's full load)."""
    start, end = window
    ttft_err, gap_err, tokens, judged = [], [], 0, 0
    for began, ended, arrivals, timing in samples:
        tokens += sum(start <= t < end for t in arrivals)
        if not (start <= began and ended <= end and timing and len(timing["send_times"]) == len(arrivals) > 0):
            continue
        judged += 1
        sends = timing["send_times"]
        arrivals = [t - offset_s for t in arrivals]
        ttft_err.append(abs(arrivals[0] - sends[0]) * 1000)
        gap_err.extend(abs((arrivals[i] - arrivals[i - 1]) - (sends[i] - sends[i - 1])) * 1000 for i in range(1, len(sends)))
    window_s = end - start
    cpu_s, waited_s = clocks
    ttft50, ttft99 = _quantiles(ttft_err)
    gap50, gap99 = _quantiles(gap_err)
    return {"requests": judged, "tok_s": tokens / window_s, "cpu_share": cpu_s / window_s, "wait_share": waited_s / window_s,
            "tok_per_cpu_s": tokens / cpu_s if cpu_s > 0 else None, "ttft_err_p50_ms": ttft50,
            "ttft_err_p99_ms": ttft99, "gap_err_p50_ms": gap50, "gap_err_p99_ms": gap99}


# ---- the agentperf client (one gevent process, as a Locust worker) ----------------------------------


def run_agentperf(url: str, phases: list[tuple[int, bytes, float]], offset_s: float) -> None:
    import gevent
    import locust  # noqa: F401  (monkey-patches the process, as in a Locust worker)
    from locust.contrib.fasthttp import FastHttpSession
    from locust.event import EventHook
    from locust.stats import RequestStats

    from agentperf_users.client import ChatStreamClient
    from agentperf_users.records import Status

    _freeze_heap()
    stats = RequestStats()
    hook = EventHook()
    hook.add_listener(lambda request_type, name, response_time, response_length, exception=None, **_:
                      stats.log_request(request_type, name, response_time, response_length))

    for agents, body, level_s in phases:
        clients = [ChatStreamClient(FastHttpSession(url, request_event=hook, user=None, network_timeout=120.0),
                                    api_key=None) for _ in range(agents)]
        warm = time.perf_counter() + WARMUP_S
        end = warm + level_s
        samples: list = []

        def agent(client: ChatStreamClient) -> None:
            while time.perf_counter() < end:  # the request in flight at the end finishes
                result = client.post(body)
                if result.status is Status.OK:
                    samples.append((result.start_perf_s, result.end_perf_s, result.token_times_perf_s, result.server_timing))

        greenlets = [gevent.spawn(agent, client) for client in clients]
        gevent.sleep(max(0.0, warm - time.perf_counter()))
        before = _cpu_clocks()
        gevent.sleep(max(0.0, end - time.perf_counter()))
        clocks = tuple(b - a for a, b in zip(before, _cpu_clocks()))
        gevent.joinall(greenlets)
        print(json.dumps({"agents": agents, "body_bytes": len(body), **_summary(samples, (warm, end), clocks, offset_s)}), flush=True)
        gevent.sleep(SETTLE_S)


# ---- baseline: asyncio + aiohttp, in the style of vLLM's benchmark request function -----------------


def run_aiohttp(url: str, phases: list[tuple[int, bytes, float]], offset_s: float) -> None:
    import asyncio

    import aiohttp

    async def request(session: Any, body: bytes) -> tuple[float, float, list[float], dict | None]:
        start, arrivals, timing = time.perf_counter(), [], None
        async with session.post(url + "/v1/chat/completions", data=body,
                                headers={"Content-Type": "application/json"}) as response:
            async for line in response.content:
                line = line.strip()
                if not line or line.startswith(b":"):
                    continue
                payload = line.decode("utf-8").removeprefix("data: ")
                if payload == "[DONE]":
                    continue
                chunk = json.loads(payload)
                if chunk.get("choices"):
                    if chunk["choices"][0]["delta"].get("content"):
                        arrivals.append(time.perf_counter())
                elif chunk.get("usage"):
                    timing = chunk["usage"].get("agentperf_timing")
        return start, time.perf_counter(), arrivals, timing

    async def level(agents: int, body: bytes, level_s: float) -> dict:
        timeout = aiohttp.ClientTimeout(total=6 * 3600)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            warm = time.perf_counter() + WARMUP_S
            end = warm + level_s
            samples: list = []

            async def agent() -> None:
                while time.perf_counter() < end:  # the request in flight at the end finishes
                    samples.append(await request(session, body))

            tasks = [asyncio.create_task(agent()) for _ in range(agents)]
            await asyncio.sleep(max(0.0, warm - time.perf_counter()))
            before = _cpu_clocks()
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            clocks = tuple(b - a for a, b in zip(before, _cpu_clocks()))
            await asyncio.gather(*tasks)
        return _summary(samples, (warm, end), clocks, offset_s)

    _freeze_heap()
    for agents, body, level_s in phases:
        summary = asyncio.run(level(agents, body, level_s))
        print(json.dumps({"agents": agents, "body_bytes": len(body), **summary}), flush=True)
        time.sleep(SETTLE_S)


CLIENTS: dict[str, Callable[[str, list, float], None]] = {"agentperf": run_agentperf, "aiohttp": run_aiohttp}


# ---- orchestration --------------------------------------------------------------------------------


def _phases(args: argparse.Namespace, model: str) -> list[tuple[int, bytes, float]]:
    small = _request_body(args.prompt_tokens, args.output_tokens, model)
    phases = [(agents, small, args.level_s) for agents in args.levels]
    if args.large_tokens:
        phases.append((args.large_agents, _request_body(args.large_tokens, args.output_tokens, model), args.level_s))
    return phases


def _worker(args: argparse.Namespace) -> None:
    same_clock = time.get_clock_info("perf_counter").implementation == time.get_clock_info("monotonic").implementation
    offset_s = 0.0 if same_clock else time.perf_counter() - time.monotonic()
    CLIENTS[args.role](args.url, _phases(args, args.model), offset_s)


def _run_client(kind: str, url: str, model: str, argv: list[str], pin: bool) -> list[dict]:
    command = [sys.executable, __file__, "--role", kind, "--url", url, "--model", model, *argv]
    preexec = (lambda: os.sched_setaffinity(0, {CLIENT_CPU})) if pin else None
    completed = subprocess.run(command, capture_output=True, text=True, preexec_fn=preexec, timeout=900)
    if completed.returncode != 0:
        raise SystemExit(f"{kind} client failed:\n{completed.stderr[-3000:]}")
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _report(kind: str, rows: list[dict], small_bytes: int) -> None:
    level_rows = [r for r in rows if r["body_bytes"] == small_bytes]
    busiest = max(level_rows, key=lambda r: r["cpu_share"])
    saturation = busiest["tok_per_cpu_s"]  # tokens/s one fully busy client core streams
    print(f"\n{kind}: saturation ~ {_fmt(saturation, ',.0f')} streamed tok/s per client core "
          f"(from the busiest level: {busiest['agents']} agents at {busiest['cpu_share']:.0%} of a core"
          f"{'' if busiest['cpu_share'] > 0.9 else '; the client never saturated, so this extrapolates'})")
    print(f"{'agents':>6} {'body KB':>8} {'reqs':>6} {'tok/s':>8} {'% sat':>6} {'CPU':>5} {'wait':>5} {'tok/CPU-s':>9} "
          f"{'|TTFT err| p50':>14} {'p99 ms':>7} {'|gap err| p50':>13} {'p99 ms':>7}")
    for r in rows:
        share = r["tok_s"] / saturation if saturation else None
        print(f"{r['agents']:>6} {r['body_bytes'] / 1000:>8.1f} {r['requests']:>6} {r['tok_s']:>8,.0f} "
              f"{_fmt(share and share * 100, '.0f'):>6} {r['cpu_share']:>5.0%} {r['wait_share']:>5.0%} "
              f"{_fmt(r['tok_per_cpu_s'], ',.0f'):>9} "
              f"{_fmt(r['ttft_err_p50_ms'], '.3f'):>14} {_fmt(r['ttft_err_p99_ms'], '.3f'):>7} "
              f"{_fmt(r['gap_err_p50_ms'], '.3f'):>13} {_fmt(r['gap_err_p99_ms'], '.3f'):>7}")
    judged = [r for r in rows if saturation and r["tok_s"] <= LOAD_SHARE * saturation and r["ttft_err_p99_ms"] is not None]
    if judged:
        worst = max(r["ttft_err_p99_ms"] for r in judged)
        verdict = "meets" if worst <= TTFT_TARGET_MS else "MISSES"
        print(f"up to {LOAD_SHARE:.0%} of saturation: worst |TTFT err| p99 = {worst:.3f} ms, "
              f"{verdict} the {TTFT_TARGET_MS:g} ms target")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="h200-llama3.1-8b", help="simulator profile (fast decode, big batch)")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64, 128, 256, 384])
    parser.add_argument("--level-s", type=float, default=4.0, help="measured seconds per level (after 1 s warm-up)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--large-tokens", type=int, default=100_000, help="prompt of the large-context phase; 0: skip")
    parser.add_argument("--large-agents", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="skip the aiohttp baseline")
    parser.add_argument("--role", choices=sorted(CLIENTS), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return _worker(args)

    from agentperf_users.simulator.cli import SimulatorProcess

    pin = len(os.sched_getaffinity(0)) >= 2
    worker_argv = [a for a in sys.argv[1:] if a != "--no-baseline"]
    kinds = ["agentperf"]
    try:
        import aiohttp  # noqa: F401

        kinds += [] if args.no_baseline else ["aiohttp"]
    except ImportError:
        print("(aiohttp is not installed: no baseline)")
    with SimulatorProcess(["--profile", args.profile, "--port", "0"], cpus={SIMULATOR_CPU} if pin else None) as simulator:
        import urllib.request

        with urllib.request.urlopen(simulator.url + "/v1/models", timeout=10) as response:
            model = json.loads(response.read())["data"][0]["id"]
        print(f"simulator {args.profile} at {simulator.url}; client pinned to CPU {CLIENT_CPU}, simulator to CPU "
              f"{SIMULATOR_CPU}" if pin else "(one CPU: client and simulator share it)")
        print(f"requests: {args.prompt_tokens}-token prompt, {args.output_tokens} output tokens (ignore_eos), "
              f"closed loop; large phase: {args.large_agents} agents x {args.large_tokens}-token prompts")
        small_bytes = len(_request_body(args.prompt_tokens, args.output_tokens, model))
        if args.large_tokens:  # prefill the large prompt once, so the phase measures streaming, not prefill
            warm = urllib.request.Request(simulator.url + "/v1/chat/completions", method="POST",
                                          data=_request_body(args.large_tokens, 1, model),
                                          headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(warm, timeout=300) as response:
                response.read()
        for kind in kinds:
            _report(kind, _run_client(kind, simulator.url, model, worker_argv, pin), small_bytes)


if __name__ == "__main__":
    main()

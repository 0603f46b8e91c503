"""Streamed tokens per second the simulator's server sustains on one core, and how late it sends them.

N concurrent streaming chat completions run on loopback against (1) the real server (``python -m
agentperf_users.simulator``) and (2) a naive baseline defined here: an asyncio-streams server with one
timer (``asyncio.sleep``) and one ``json.dumps`` per token per stream. Each server runs in its own
process pinned to one CPU, and the client, on another CPU, uses raw asyncio protocols that only collect
bytes, so the client is not the bottleneck. Both servers report, per token, the intended time (the
engine step's end) and when the bytes were written (``agentperf_timing``), both ``time.monotonic()``.

The real server gets a profile whose engine step takes a constant ``streams / --target-tok-s`` seconds
(the per-step overhead, with bandwidth and FLOPs set so high that the roofline adds nothing), so the
engine asks for ``--target-tok-s`` tokens a second; the baseline paces each stream with the same period.
Requests start evenly over ``--ramp-s``; throughput is counted while every stream runs, lag over every
token. Lag also depends on what else runs on the server's CPU: on a shared machine, compare runs.

    PYTHONPATH=. python benchmarks/simulator_throughput.py --streams 200     # 50K tok/s asked for
    PYTHONPATH=. python benchmarks/simulator_throughput.py --streams 1000 --target-tok-s 50000

Target for the real server: keep pace with at least 50,000 tokens/s with send lag p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from agentperf_users.simulator.cli import SimulatorProcess
from agentperf_users.simulator.profile import PROFILES_DIR
from agentperf_users.simulator.reply import WORDS
from agentperf_users.simulator.server import new_event_loop

MODEL = "bench-model"
TARGET_TOK_S, TARGET_LAG_P99_MS = 50_000, 5.0
KEPT_PACE = 0.995  # measured / asked rate that counts as keeping pace (the window's edges blur the count)
UNLIMITED = 1e7  # the most a profile accepts (simulator/profile.py); the fixed step overhead still dominates
TERMINATOR = b"0\r\n\r\n"
LAST_CHUNK_RE = re.compile(rb'data: (\{"id".*?)\n\n', re.S)


@dataclass(frozen=True)
class LoadResult:
    intended_s: list[list[float]]  # per stream, per token: the engine's time for it
    sent_s: list[list[float]]  # per stream, per token: when its bytes were written
    server_cpu_s: float  # CPU time the server process used during the load

    @property
    def tokens(self) -> int:
        return sum(len(times) for times in self.sent_s)

    @property
    def lags_ms(self) -> list[float]:
        return [(s - t) * 1e3 for ts, ss in zip(self.intended_s, self.sent_s) for t, s in zip(ts, ss)]

    @property
    def cpu_us_per_token(self) -> float:
        """Robust to other processes sharing the core, unlike the lag: what one token costs the server."""
        return self.server_cpu_s / self.tokens * 1e6

    @property
    def tok_s(self) -> float:
        """Tokens written per second while every stream was running (after the ramp, before any ended)."""
        return _rate(self.sent_s)

    @property
    def paced(self) -> float:
        """The same rate on the engine's clock: what the engine produced, whether or not it was sent on time."""
        return _rate(self.intended_s)

    def lag_ms(self, q: float) -> float:
        ordered = sorted(self.lags_ms)  # every token, the ramp's included
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def write_profile(directory: Path, step_ms: float, streams: int) -> Path:
    """The default profile with a constant step time and room for every stream in one batch."""
    data = yaml.safe_load((PROFILES_DIR / "h100-llama3.1-8b.yaml").read_text())
    data["gpu"].update(bandwidth_gb_s=UNLIMITED, bf16_tflops=UNLIMITED)
    data["model"]["name"] = MODEL
    data["efficiency"]["step_overhead_ms"] = step_ms
    data["engine"].update(max_num_seqs=max(streams, 1024), max_num_batched_tokens=65536,
                          max_waiting_requests=max(streams, 1000))
    data.pop("anchors", None)
    path = directory / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class _StreamClient(asyncio.Protocol):
    """Sends one request and keeps the response bytes; done when the terminating chunk arrives."""

    def __init__(self, request: bytes, done: asyncio.Future):
        self._request, self._done = request, done
        self._parts: list[bytes] = []
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send(self) -> None:
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._parts.append(data)
        self._tail = (self._tail + data)[-len(TERMINATOR):]
        if self._tail == TERMINATOR and not self._done.done():
            self._done.set_result(b"".join(self._parts))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(ConnectionError(f"closed before the end of the stream: {exc}"))


def _request(host: str, index: int, tokens: int) -> bytes:
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": tokens, "ignore_eos": True, "agentperf_timing": True,
                       "messages": [{"role": "user", "content": f"stream number {index} please"}]}).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n" \
           f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_load(url: str, streams: int, tokens: int, ramp_s: float, server_pid: int) -> LoadResult:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    loop = asyncio.get_running_loop()
    clients, futures = [], []
    for i in range(streams):
        future = loop.create_future()
        _, client = await loop.create_connection(lambda: _StreamClient(_request(host, i, tokens), future), host, int(port))
        clients.append(client)
        futures.append(future)
    cpu_before_s = cpu_seconds(server_pid)
    for i, client in enumerate(clients):
        loop.call_later(ramp_s * i / streams, client.send)
    responses = await asyncio.wait_for(asyncio.gather(*futures), timeout=60 + tokens)
    server_cpu_s = cpu_seconds(server_pid) - cpu_before_s
    intended, sent = [], []
    for response in responses:
        usage = json.loads(LAST_CHUNK_RE.findall(response)[-1])["usage"]
        timing = usage["agentperf_timing"]
        assert usage["completion_tokens"] == tokens == len(timing["send_times"])
        intended.append(timing["token_times"])
        sent.append(timing["send_times"])
    return LoadResult(intended, sent, server_cpu_s)


def _rate(times: list[list[float]]) -> float:
    """Tokens per second within the window where every stream had started and none had ended."""
    start_s, end_s = max(t[0] for t in times), min(t[-1] for t in times)
    if end_s <= start_s:
        raise SystemExit("no moment had every stream running: use a longer --seconds or a shorter --ramp-s")
    return sum(start_s <= x <= end_s for t in times for x in t) / (end_s - start_s)


# --- the naive baseline server -------------------------------------------------------------------
async def _naive_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, step_s: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
            body = json.loads(await reader.readexactly(length))
            arrival, created = time.monotonic(), int(time.time())
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            token_times, send_times = [], []
            for i in range(body["max_tokens"]):
                due = arrival + (i + 1) * step_s
                await asyncio.sleep(due - time.monotonic())
                chunk = {"id": "chatcmpl-naive", "object": "chat.completion.chunk", "created": created, "model": MODEL,
                         "choices": [{"index": 0, "delta": {"content": WORDS[i % len(WORDS)]}, "logprobs": None,
                                      "finish_reason": None}], "usage": None}
                data = f"data: {json.dumps(chunk)}\n\n".encode()
                token_times.append(due)
                send_times.append(time.monotonic())
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
            n = len(token_times)
            usage = {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n,
                     "agentperf_timing": {"arrival": arrival, "token_times": token_times, "send_times": send_times}}
            data = f"data: {json.dumps({'id': 'chatcmpl-naive', 'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data) + TERMINATOR)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def _naive_server_process(cpu: int, step_s: float, port_pipe) -> None:
    os.sched_setaffinity(0, {cpu})

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: _naive_connection(r, w, step_s), "127.0.0.1", 0)
        port_pipe.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    new_event_loop().run_until_complete(main())


def _run(url: str, args: argparse.Namespace, tokens: int, server_pid: int) -> LoadResult:
    loop = new_event_loop()
    try:
        return loop.run_until_complete(run_load(url, args.streams, tokens, args.ramp_s, server_pid))
    finally:
        loop.close()


def _line(name: str, result: LoadResult, asked_tok_s: float) -> str:
    return (f"{name:<8} {result.tok_s:>10,.0f} {result.paced / asked_tok_s:>9.2f} "
            f"{result.lag_ms(0.5):>9.2f} {result.lag_ms(0.99):>9.2f} {max(result.lags_ms):>9.2f} "
            f"{result.cpu_us_per_token:>9.1f} {1e6 / result.cpu_us_per_token:>12,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams (default 200)")
    parser.add_argument("--target-tok-s", type=float, default=TARGET_TOK_S,
                        help=f"tokens/s the engine asks for (default {TARGET_TOK_S})")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each stream (default 3)")
    parser.add_argument("--ramp-s", type=float, default=0.25,
                        help="spread the requests' start evenly over this time, as a load tester's spawn rate "
                             "would (default 0.25; 0 sends all at once, and the server then needs ~100 us per "
                             "request to take them in before it catches up with the engine clock)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    args = parser.parse_args()
    step_s = args.streams / args.target_tok_s
    tokens = max(2, int(args.seconds / step_s))
    os.sched_setaffinity(0, {args.client_cpu})
    print(f"{args.streams} streams x {tokens} tokens started over {args.ramp_s} s, engine step {step_s * 1e3:.2f} ms "
          f"(asks for {args.target_tok_s:,.0f} tok/s); server on CPU {args.server_cpu}, client on CPU {args.client_cpu}")
    with tempfile.TemporaryDirectory() as directory:
        profile = write_profile(Path(directory), step_s * 1e3, args.streams)
        with SimulatorProcess(["--profile", str(profile), "--port", "0"], cpus={args.server_cpu}) as sim:
            real = _run(sim.url, args, tokens, sim.process.pid)
    receiver, sender = multiprocessing.Pipe(duplex=False)
    naive_process = multiprocessing.Process(target=_naive_server_process, args=(args.server_cpu, step_s, sender), daemon=True)
    naive_process.start()
    try:
        naive = _run(f"http://127.0.0.1:{receiver.recv()}", args, tokens, naive_process.pid)
    finally:
        naive_process.terminate()
        naive_process.join()
    print(f"{'server':<8} {'tok/s':>10} {'paced':>9} {'lag p50':>9} {'lag p99':>9} {'lag max':>9} {'cpu us/tok':>9} "
          f"{'tok/s/core':>12}")
    print("  (lag: ms written after the engine's token time; paced: engine-time rate / asked rate; "
          "tok/s/core: 1 / server CPU per token)")
    print(_line("real", real, args.target_tok_s))
    print(_line("naive", naive, args.target_tok_s))
    print(f"ratio real/naive: {real.tok_s / naive.tok_s:.2f}x tokens/s, "
          f"{naive.cpu_us_per_token / real.cpu_us_per_token:.2f}x less CPU per token, "
          f"lag p99 {naive.lag_ms(0.99) / max(real.lag_ms(0.99), 1e-3):.1f}x lower")
    kept_pace = real.tok_s >= KEPT_PACE * args.target_tok_s
    met = kept_pace and args.target_tok_s >= TARGET_TOK_S and real.lag_ms(0.99) <= TARGET_LAG_P99_MS
    print(f"real server {'kept' if kept_pace else 'did not keep'} pace with {args.target_tok_s:,.0f} tok/s; "
          f"it {'meets' if met else 'misses'} the target (>= {TARGET_TOK_S:,} tok/s with lag p99 <= {TARGET_LAG_P99_MS} ms)")


if __name__ == "__main__":
    main()

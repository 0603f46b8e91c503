"""The streaming client against a real HTTP/1.1 server on loopback (this file run as a script in a
subprocess) that streams canned SSE with controlled delays: what counts as a token, the timings derived
from arrival times, each way a request can fail, and that the API key is sent but never reported."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

API_KEY = "sk-test-5ecret-v4lue-0123456789"
ROLE_TO_FIRST_TOKEN_S = 0.15
TOKEN_GAP_S = 0.05
CLOSE_GAP_S = 0.08


def _sse(payload) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def _delta(**delta) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


USAGE = {"prompt_tokens": 120, "completion_tokens": 6, "prompt_tokens_details": {"cached_tokens": 64}}


class _Handler(BaseHTTPRequestHandler):
    """Streams the scenario named in the request body's "scenario" field; GET /last returns what the
    last chat request carried (its Authorization header and body size)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as a real server does: small SSE writes go out at once
    last: dict = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._send_json(200, _Handler.last)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        arrival = time.monotonic()
        request = json.loads(body)
        _Handler.last = {"authorization": self.headers.get("Authorization"), "body_bytes": len(body)}
        getattr(self, "scenario_" + request["scenario"])(request, arrival)

    def _send_json(self, code: int, payload: dict) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _write(self, data: bytes, delay_s: float = 0.0) -> float:
        """Send one HTTP chunk; return the time.monotonic() just before it left."""
        if delay_s:
            time.sleep(delay_s)
        sent = time.monotonic()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
        return sent

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def scenario_ok(self, request, arrival) -> None:
        self._start_stream()
        self._write(_sse(_delta(role="assistant", content="")))
        self._write(_sse(_delta(reasoning_content="hm")), ROLE_TO_FIRST_TOKEN_S)
        self._write(_sse(_delta(reasoning="so")), TOKEN_GAP_S)
        for text in ("a", "b"):
            self._write(_sse(_delta(content=text)), TOKEN_GAP_S)
        self._write(_sse(_delta(tool_calls=[{"index": 0, "function": {"name": "bash", "arguments": ""}}])), TOKEN_GAP_S)
        self._write(_sse(_delta(tool_calls=[{"index": 0, "function": {"arguments": "{}"}}])), TOKEN_GAP_S)
        self._write(_sse({"choices": [], "usage": USAGE}) + b": keep-alive\n\n" + _sse(b"[DONE]"))
        self._end()

    def scenario_no_usage(self, request, arrival) -> None:
        self._start_stream()
        for text in ("a", "b", "c"):
            self._write(_sse(_delta(content=text)), TOKEN_GAP_S)
        self._write(_sse(b"[DONE]"))
        self._end()

    def scenario_large(self, request, arrival) -> None:
        """First token right away, the rest after a pause (a client that waits to fill a read buffer
        would see the first token only then); the usage chunk says when it was sent (time.monotonic)."""
        self._start_stream()
        sent = self._write(_sse(_delta(content="x")))
        timing = {"arrival": arrival, "send_times": [sent]}
        usage = {**USAGE, "completion_tokens": 1}  # one token streamed: more would be (rightly) not believed
        self._write(_sse({"choices": None, "usage": usage, "agentperf_timing": timing}), delay_s=0.3)
        self._write(_sse(b"[DONE]"))
        self._end()

    def scenario_spaced(self, request, arrival) -> None:
        """Three tokens at known times (the client blocks its own loop over the second)."""
        self._start_stream()
        sends = [self._write(_sse(_delta(content=w)), delay) for w, delay in (("a", 0.0), ("b", 0.15), ("c", 0.45))]
        self._write(_sse({"choices": [], "usage": {**USAGE, "completion_tokens": 3}, "agentperf_timing": {"send_times": sends}}))
        self._write(_sse(b"[DONE]"))
        self._end()

    def scenario_token_with_headers(self, request, arrival) -> None:
        """The headers and the first token leave in one write (one packet), the rest later."""
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        first = _sse(_delta(content="a"))
        self.wfile.write(head + b"%x\r\n%s\r\n" % (len(first), first))
        self._write(_sse(_delta(content="b")), TOKEN_GAP_S)
        self._write(_sse(b"[DONE]"))
        self._end()

    def scenario_close_pair(self, request, arrival) -> None:
        """The first token, then the next ones one short engine step apart (the client blocks its loop
        over all of them, so unread segments pile up in its socket)."""
        self._start_stream()
        self._write(_sse(_delta(role="assistant", content="")))
        sends = [self._write(_sse(_delta(content=w)), delay) for w, delay in (("a", 0.1), ("b", CLOSE_GAP_S), ("c", CLOSE_GAP_S))]
        self._write(_sse({"choices": [], "usage": {**USAGE, "completion_tokens": 3}, "agentperf_timing": {"send_times": sends}}))
        self._write(_sse(b"[DONE]"))
        self._end()

    def scenario_http_400(self, request, arrival) -> None:
        self._send_json(400, {"error": {"message": f"Incorrect API key provided: {self.headers['Authorization'][7:]}"}})

    def scenario_http_503(self, request, arrival) -> None:
        self._send_json(503, {"error": {"message": "engine overloaded"}})

    def scenario_inband_error(self, request, arrival) -> None:
        self._start_stream()
        self._write(_sse(_delta(content="a")))
        self._write(_sse({"error": {"message": "KV cache exhausted", "code": 500}}) + _sse(b"[DONE]"), TOKEN_GAP_S)
        self._end()

    def scenario_early_close(self, request, arrival) -> None:
        self._start_stream()
        self._write(_sse(_delta(content="a")) + b"data: {\"cho")
        self.close_connection = True  # no terminating chunk: the client sees EOF mid-message

    def scenario_stall(self, request, arrival) -> None:
        self._start_stream()
        self._write(_sse(_delta(content="a")))
        time.sleep(float(request["sleep_s"]))
        self.close_connection = True

    def scenario_slow_first(self, request, arrival) -> None:
        self._start_stream()
        self._write(_sse(_delta(role="assistant", content="")))  # bytes, but no token
        time.sleep(float(request["sleep_s"]))
        self.close_connection = True

    def scenario_http_429(self, request, arrival) -> None:
        raw = json.dumps({"error": {"message": "rate limited"}}).encode()
        self.send_response(429)
        self.send_header("Retry-After", "7")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def scenario_wrong_shape(self, request, arrival) -> None:
        """Valid JSON, wrong shape: once crashed the tally (no record, and the agent retried at once)."""
        self._start_stream()
        self._write(_sse(_delta(content="a")))
        self._write(_sse({"choices": [{"index": 0, "delta": "str"}]}), TOKEN_GAP_S)
        self._write(_sse(b"[DONE]"))
        self._end()

    def scenario_absurd_usage(self, request, arrival) -> None:
        self._start_stream()
        for text in ("a", "b"):
            self._write(_sse(_delta(content=text)), TOKEN_GAP_S)
        self._write(_sse({"choices": [], "usage": {**USAGE, "completion_tokens": 100000}}) + _sse(b"[DONE]"))
        self._end()

    def scenario_no_done(self, request, arrival) -> None:
        """Tokens, a finish_reason and the usage, then the end of the body without [DONE]."""
        self._start_stream()
        for text in ("a", "b"):
            self._write(_sse(_delta(content=text)), TOKEN_GAP_S)
        self._write(_sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
        self._write(_sse({"choices": [], "usage": {**USAGE, "completion_tokens": 2}}))
        self._end()

    def scenario_split_done(self, request, arrival) -> None:
        """[DONE] in two chunks a token gap apart: the event is dated by the first, the stream ends on the second."""
        self._start_stream()
        for text in ("a", "b"):
            self._write(_sse(_delta(content=text)), TOKEN_GAP_S)
        self._write(_sse({"choices": [], "usage": {**USAGE, "completion_tokens": 2}}) + b"data: [DO")
        self._write(b"NE]\n\n", TOKEN_GAP_S)
        self._end()

    def scenario_drip(self, request, arrival) -> None:
        """A token every 0.1 s, never silent for long: only the request timeout can end it."""
        self._start_stream()
        for _ in range(int(request["tokens"])):
            self._write(_sse(_delta(content="a")), 0.1)
        self.close_connection = True

    def scenario_not_sse(self, request, arrival) -> None:
        self._send_json(200, {"choices": [{"message": {"content": "hi"}}]})


def serve() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    serve()
    sys.exit(0)

# ---- tests (locust is imported only here: importing it monkey-patches the process for gevent) ----

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from locust.contrib.fasthttp import FastHttpSession  # noqa: E402
from locust.event import EventHook  # noqa: E402

from agentperf_users.client.chat import ChatStreamClient, bucket_response_time_3sig  # noqa: E402
from agentperf_users.client.timed_io import (  # noqa: E402
    KERNEL_STAMPS,
    SO_TIMESTAMPNS,
    StampingSocket,
    stamp_connections,
)
from agentperf_users.errors import AgentperfError  # noqa: E402
from agentperf_users.loadgen.body import ChatBodyEncoder  # noqa: E402
from agentperf_users.measure.records import Status  # noqa: E402


@pytest.fixture(scope="module")
def server_url():
    process = subprocess.Popen([sys.executable, __file__], stdout=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


class _Fired:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, **kwargs) -> None:
        self.events.append(kwargs)


def _client(url, fired=None, *, api_key=API_KEY, request_timeout_s=10.0, stall_timeout_s=10.0) -> ChatStreamClient:
    hook = EventHook()
    if fired is not None:
        hook.add_listener(fired)
    session = FastHttpSession(url, request_event=hook, user=None, network_timeout=request_timeout_s, connection_timeout=5.0)
    return ChatStreamClient(session, api_key=api_key, request_timeout_s=request_timeout_s, stall_timeout_s=stall_timeout_s)


def _post(client, scenario, **extra):
    body = ChatBodyEncoder().body({"model": "m", "stream": True, "scenario": scenario, **extra}, [{"role": "user", "content": "hi"}])
    return client.post(body)


def test_ttft_skips_the_role_chunk_and_counts_reasoning_and_tool_calls(server_url):
    fired = _Fired()
    result = _post(_client(server_url, fired), "ok")
    assert result.status is Status.OK and result.message == ""
    # Six token chunks: reasoning_content, reasoning, two contents, tool-call name, tool-call arguments.
    assert len(result.token_times_perf_s) == 6
    assert result.ttft_s >= ROLE_TO_FIRST_TOKEN_S  # the role chunk came at once; it is not the first token
    assert result.ttfb_s < result.ttft_s
    assert result.output_tokens == 6 and not result.output_tokens_estimated
    assert (result.prompt_tokens, result.cached_tokens) == (120, 64)
    times = result.token_times_perf_s
    assert result.ttft_s == pytest.approx(times[0] - result.start_perf_s)
    assert result.output_tps == pytest.approx(5 / (times[-1] - times[0]))
    assert result.itl_p50_s == pytest.approx(TOKEN_GAP_S, abs=0.02)
    assert result.itl_max_s == max(b - a for a, b in zip(times, times[1:]))
    assert result.itl_p50_s <= result.itl_p95_s <= result.itl_max_s
    assert result.e2e_s >= result.ttft_s + 5 * TOKEN_GAP_S
    assert result.end_epoch_s == pytest.approx(result.start_epoch_s + result.e2e_s)
    # Locust sees the request exactly once, as end-to-end milliseconds with the token count as its length.
    [event] = fired.events
    assert event["name"] == "chat turn" and event["exception"] is None
    assert event["response_time"] == pytest.approx(result.e2e_s * 1000)
    assert event["response_length"] == 6


def test_connection_is_reused_and_tokens_are_counted_without_usage(server_url):
    client = _client(server_url)
    first = _post(client, "no_usage")
    second = _post(client, "no_usage")
    for result in (first, second):
        assert result.status is Status.OK
        assert (result.output_tokens, result.output_tokens_estimated) == (3, True)
        assert result.prompt_tokens is None and result.cached_tokens is None
    pool = client._http
    assert pool._connection_pool._socket_queue.qsize() == 1  # one kept-alive connection served both


def test_large_body_adds_no_client_side_buffering_to_ttft(server_url):
    """~500 KB of messages (a ~100K-token context): the client's first-token time must match the
    server's send time, not lag it as a buffering client would (the 50 ms bound only catches gross lag;
    benchmarks/client_accuracy.py measures the real error)."""
    messages = [{"role": "user", "content": ("word " * 1000)[:4999] + str(i)} for i in range(100)]
    body = ChatBodyEncoder().body({"model": "m", "stream": True, "scenario": "large"}, messages)
    assert len(body) > 500_000
    result = _client(server_url).post(body)
    assert result.status is Status.OK
    sent = result.server_timing["send_times"][0]
    arrived = result.token_times_perf_s[0]  # perf_counter is CLOCK_MONOTONIC on Linux, as time.monotonic
    assert 0 <= arrived - sent < 0.05
    assert result.start_perf_s < result.server_timing["arrival"] < sent


def _post_with_the_loop_blocked(url, scenario, block_s):
    """Post ``scenario`` on a connection that already has SO_TIMESTAMPNS set, while another greenlet
    blocks the event loop with CPU-bound work from 50 ms after the request is out for ``block_s``."""
    client = _client(url)
    assert _post(client, "no_usage").status is Status.OK

    def hog_the_loop() -> None:
        gevent.sleep(0.05)
        until = time.perf_counter() + block_s
        while time.perf_counter() < until:
            pass

    hog = gevent.spawn(hog_the_loop)
    result = _post(client, scenario)
    hog.join()
    return result


@pytest.mark.skipif(not KERNEL_STAMPS, reason="kernel receive timestamps are used on Linux only")
def test_connections_are_sockets_that_keep_the_kernels_receive_stamps(server_url):
    """geventhttpclient's socket hook is an internal: if an upgrade stopped calling it, reads would be dated by
    the event loop without any other sign. The connection the pool kept is ours, with stamps on."""
    import socket

    client = _client(server_url)
    assert _post(client, "ok").status is Status.OK
    pool = client._http._connection_pool
    kept = [pool._socket_queue.get(block=False) for _ in range(pool._socket_queue.qsize())]
    assert len(kept) == 1 and isinstance(kept[0], StampingSocket), kept
    assert kept[0].getsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS) == 1
    assert kept[0].arrival_realtime_s is not None  # the last read's kernel stamp


def test_a_geventhttpclient_without_the_socket_hook_is_an_error_not_a_silent_fallback():
    class RenamedPool:
        def _create_socket_for(self, *args):  # an upstream rename
            raise AssertionError("never called")

    with pytest.raises(AgentperfError, match="no ConnectionPool._create_tcp_socket: kernel timestamps would be lost"):
        stamp_connections(RenamedPool())


@pytest.mark.skipif(not KERNEL_STAMPS, reason="kernel receive timestamps are used on Linux only")
def test_a_first_token_in_the_headers_packet_is_dated_with_them(server_url):
    """Both are the arrival of one packet (its kernel stamp, where there is one): the first token is never
    dated before the headers, as a headers time read after parsing them would make it."""
    client = _client(server_url)
    for _ in range(2):  # a new connection and a reused one
        result = _post(client, "token_with_headers")
        assert result.status is Status.OK and result.output_tokens == 2
        assert result.ttfb_s == result.ttft_s
        assert result.token_times_perf_s[1] - result.token_times_perf_s[0] >= TOKEN_GAP_S * 0.9


@pytest.mark.skipif(not KERNEL_STAMPS, reason="kernel receive timestamps are used on Linux only")
@pytest.mark.parametrize("scenario", ["ok", "split_done", "no_done", "early_close", "http_400", "absurd_usage"])
def test_progress_is_never_past_the_end_the_result_gets(server_url, scenario):
    """What the client says of a request in flight (``progress``: a time it cannot end before) lets a step's
    window close while requests still stream across its end (``RecordLog.progress``); a stamp past the
    record's end would let a window close without that record."""
    stamps: list[float] = []
    body = ChatBodyEncoder().body({"model": "m", "stream": True, "scenario": scenario}, [{"role": "user", "content": "hi"}])
    result = _client(server_url).post(body, progress=stamps.append)
    assert stamps and stamps == sorted(stamps), stamps
    assert result.start_epoch_s <= stamps[0] and stamps[-1] <= result.end_epoch_s, (stamps, result.end_epoch_s)
    if scenario in ("ok", "split_done"):  # the end itself once known (split: [DONE] dated by the read it began in)
        assert result.status is Status.OK and stamps[-1] == result.end_epoch_s


def test_tokens_are_stamped_when_they_arrived_not_when_a_busy_client_read_them(server_url):
    result = _post_with_the_loop_blocked(server_url, "spaced", 0.3)
    assert result.status is Status.OK
    sends = result.server_timing["send_times"]
    late_ms = [(arrived - sent) * 1000 for arrived, sent in zip(result.token_times_perf_s, sends)]
    # "b" arrived at +150 ms while the loop was blocked until ~+350 ms: it is still stamped on arrival.
    # Never before it was sent (10 us: the clock conversion's own bound), whatever else loads the machine.
    assert all(-0.01 <= late < 20 for late in late_ms), late_ms


@pytest.mark.skipif(not KERNEL_STAMPS, reason="kernel receive timestamps are used on Linux only")
def test_the_first_token_keeps_its_stamp_when_the_next_arrives_before_the_loop_reads(server_url):
    """Linux merges a segment into the unread one before it and keeps the later stamp; the first token is
    read off the socket by a thread, so a blocked loop does not let that happen to it."""
    result = _post_with_the_loop_blocked(server_url, "close_pair", 0.4)  # tokens at +100, +180, +260 ms
    assert result.status is Status.OK
    sends = result.server_timing["send_times"]
    first_late_ms = (result.token_times_perf_s[0] - sends[0]) * 1000
    assert -0.01 <= first_late_ms < CLOSE_GAP_S * 1000 / 2, first_late_ms  # merged, it would be >= 80 ms late


@pytest.mark.parametrize(
    "scenario, status, message",
    [
        ("http_400", Status.HTTP_4XX, "HTTP 400: Incorrect API key provided: ***"),
        ("http_503", Status.HTTP_5XX, "HTTP 503: engine overloaded"),
        ("inband_error", Status.BAD_STREAM, "in-band error: KV cache exhausted"),
        ("early_close", Status.DISCONNECT, "the stream ended before [DONE]"),
        ("not_sse", Status.BAD_STREAM, "expected text/event-stream, got application/json"),
        ("wrong_shape", Status.BAD_STREAM,
         "a stream chunk of the wrong shape: choices[0].delta is a string, expected an object"),
        ("absurd_usage", Status.BAD_STREAM, "usage.completion_tokens 100000 > what arrived (2 text chunks, 2 bytes)"),
    ],
)
def test_failures_are_classified_with_a_redacted_message(server_url, caplog, scenario, status, message):
    caplog.set_level(logging.DEBUG)
    fired = _Fired()
    result = _post(_client(server_url, fired), scenario)
    assert (result.status, result.message) == (status, message)
    [event] = fired.events
    assert str(event["exception"]) == f"{status.value}: {message}"
    assert event["response_time"] == pytest.approx(result.e2e_s * 1000)
    if scenario in ("inband_error", "early_close", "wrong_shape"):
        assert result.ttft_s is not None and result.output_tokens == 1 and result.output_tokens_estimated
    everything = repr(result) + repr(event) + caplog.text
    assert API_KEY not in everything
    assert requests_last(server_url)["authorization"] == f"Bearer {API_KEY}"


def test_usage_beyond_the_requested_maximum_is_not_believed(server_url):
    body = ChatBodyEncoder().body({"model": "m", "stream": True, "scenario": "ok"}, [{"role": "user", "content": "hi"}])
    result = _client(server_url).post(body, max_tokens=5)  # the server's usage claims 6
    assert (result.status, result.message) == (Status.BAD_STREAM, "usage.completion_tokens 6 > the 5 requested")
    assert (result.output_tokens, result.output_tokens_estimated) == (6, True)  # the six text chunks, counted
    assert _client(server_url).post(body, max_tokens=6).status is Status.OK


def test_a_body_that_ends_after_the_usage_without_done_is_complete(server_url):
    result = _post(_client(server_url), "no_done")
    assert (result.status, result.output_tokens, result.output_tokens_estimated) == (Status.OK, 2, False)
    assert result.e2e_s >= result.ttft_s + (result.token_times_perf_s[1] - result.token_times_perf_s[0])


def test_retry_after_of_a_429_is_read(server_url):
    result = _post(_client(server_url), "http_429")
    assert (result.status, result.http_status, result.retry_after_s) == (Status.HTTP_4XX, 429, 7.0)
    assert _post(_client(server_url), "http_400").retry_after_s is None


def test_a_request_cut_by_the_end_of_its_step_is_a_cancelled_result_with_what_arrived(server_url, monkeypatch):
    """Locust kills an agent's greenlet when its step or run ends: the request in flight still becomes a
    result (so a record), cancelled, with the tokens that had arrived, and no failure in Locust's table."""
    from agentperf_users.client import sse

    first_token = gevent.event.Event()
    add = sse.StreamTally.add

    def add_and_signal(tally, event, arrived_at):
        add(tally, event, arrived_at)
        if tally.token_times:
            first_token.set()

    monkeypatch.setattr(sse.StreamTally, "add", add_and_signal)
    fired = _Fired()
    client = _client(server_url, fired)
    results = []
    posting = gevent.spawn(lambda: results.append(_post(client, "stall", sleep_s=30)))
    assert first_token.wait(timeout=10)
    posting.kill(block=True, timeout=10)
    [result] = results
    assert (result.status, result.output_tokens, result.output_tokens_estimated) == (Status.CANCELLED, 1, True)
    assert result.ttft_s is not None and result.e2e_s >= result.ttft_s
    assert fired.events == []


def test_a_silent_stream_is_a_stall_and_a_missing_first_token_a_timeout(server_url):
    fired = _Fired()
    client = _client(server_url, fired, stall_timeout_s=0.3)
    stalled = _post(client, "stall", sleep_s=1.5)
    assert (stalled.status, stalled.message) == (Status.STALL, "no bytes for 0.3 s")
    assert stalled.ttft_s is not None and stalled.e2e_s >= 0.3 + stalled.ttft_s
    assert stalled.e2e_s < 1.5  # by its own timestamps it gave up, it did not wait for the server's 1.5 s
    timed_out = _post(_client(server_url, fired, request_timeout_s=0.4), "slow_first", sleep_s=1.5)
    assert (timed_out.status, timed_out.message) == (Status.TIMEOUT, "no first token within the request timeout")
    assert timed_out.ttft_s is None and timed_out.e2e_s == pytest.approx(0.4, abs=0.1)
    assert [event["exception"] is not None for event in fired.events] == [True, True]


def test_a_drip_that_never_stalls_ends_at_the_request_timeout(server_url):
    result = _post(_client(server_url, request_timeout_s=1.0, stall_timeout_s=0.5), "drip", tokens=100)
    assert (result.status, result.message) == (Status.TIMEOUT, "the response did not end within 1 s")
    assert 1 < result.output_tokens < 100 and result.output_tokens_estimated
    assert result.token_times_perf_s[-1] - result.start_perf_s < result.e2e_s  # it ended after its last token


def test_refused_connection_is_a_disconnect():
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _post(_client(f"http://127.0.0.1:{port}"), "ok")
    assert result.status is Status.DISCONNECT
    assert result.message.startswith("connection error: ConnectionRefusedError")


def requests_last(server_url) -> dict:
    import urllib.request

    with urllib.request.urlopen(server_url + "/last", timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("ms", [0.4, 99.6, 456.7, 1234.5, 9999.0, 58760.0, 123456.0, 3_600_000.0])
def test_fine_bucketing_is_within_half_a_percent(ms):
    bucket = bucket_response_time_3sig(ms)
    assert isinstance(bucket, int)
    assert abs(bucket - ms) <= max(0.5, 0.005 * ms)

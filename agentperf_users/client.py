"""Streaming chat requests on a FastHttpUser's session, timed from raw socket reads.

Why not ``FastResponse.iter_content`` or ``iter_lines``: geventhttpclient's ``read(n)`` waits until ``n``
bytes have arrived, so a small SSE event would sit in its buffer until later ones fill it, and every
timestamp after it would be late. Here each ``recv`` returns whatever the kernel holds; the response's
own C parser strips the HTTP framing; every event a read completed gets that read's arrival time, which
on Linux is the kernel's receive timestamp (see :class:`_StampingSocket`), so a busy or descheduled
client does not add its own delay. A large request body is sent in one ``sendall`` and the reply is read
the same way, so a 100K-token context adds no client-side buffering to TTFT (tests/test_client.py and
benchmarks/client_accuracy.py check this against the server's own send times).

The measurement comes back as a :class:`ChatResult`; every request is also reported once to Locust's
``request`` event (end-to-end milliseconds, output tokens as the length, an exception when it failed),
and TTFT is never fired as a pseudo-request, as it would pollute Locust's "Aggregated" row.
"""

from __future__ import annotations

import json
import math
import platform
import re
import socket
import struct
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, NamedTuple, Sequence

import gevent
import gevent.socket
from geventhttpclient.response import HTTPConnectionClosed, HTTPParseError
from geventhttpclient.url import URL

from agentperf_users.records import Status

RECV_BYTES = 64 * 1024  # at most this much per socket read; a read returns what is there, never waits to fill
MAX_SSE_LINE_BYTES = 16 * 1024 * 1024  # a longer line without a newline is a broken stream, not a big chunk
ERROR_BODY_BYTES = 16 * 1024  # how much of an HTTP error body is read to find its message
DRAIN_TIMEOUT_S = 1.0  # after [DONE], how long to wait for the end of the HTTP message (keeps the connection)
MESSAGE_CHARS = 200  # records and logs carry at most this much of a server's error text
DEFAULT_REQUEST_TIMEOUT_S = 600.0
DEFAULT_STALL_TIMEOUT_S = 120.0
LOCUST_REQUEST_NAME = "chat turn"
# Kernel receive timestamps: SO_TIMESTAMPNS is 35 in Linux's asm-generic socket.h (x86 and arm), which
# the socket module does not export; the control message carries a struct timespec (CLOCK_REALTIME).
SO_TIMESTAMPNS = 35
_KERNEL_STAMPS = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64", "arm64")
_TIMESPEC = struct.Struct("@ll")
_ANCILLARY_BYTES = socket.CMSG_SPACE(_TIMESPEC.size) if _KERNEL_STAMPS else 0
_JSON_DECODER = json.JSONDecoder()
_SECRET_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}|Bearer\s+\S+", re.IGNORECASE)


class SSEEvent(NamedTuple):
    """One dispatched server-sent event: its ``event:`` type ("" when absent) and joined ``data:`` bytes."""

    event: str
    data: bytes


class SSEParser:
    """Incremental ``text/event-stream`` parser (WHATWG rules) over raw bytes.

    Bytes may be cut anywhere, including inside a CRLF pair or a multibyte UTF-8 character: lines are
    reassembled as bytes and only a complete event's data is ever decoded. ``data:``
    lines of one event are joined with ``\\n``; comment lines (``:``) and ``id``/``retry`` fields are
    ignored; an event is dispatched at a blank line, and one left without it when the stream ends is
    dropped, as the spec says (see :attr:`has_partial_event`).
    """

    def __init__(self) -> None:
        self._pending: list[bytes] = []  # bytes of an unterminated line
        self._pending_len = 0
        self._after_cr = False  # the last line ended with CR: a leading LF of the next read belongs to it
        self._data: list[bytes] = []
        self._event = ""

    @property
    def has_partial_event(self) -> bool:
        return bool(self._pending or self._data or self._event)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        if b"\n" not in chunk and b"\r" not in chunk:
            self._pending.append(chunk)
            self._pending_len += len(chunk)
            if self._pending_len > MAX_SSE_LINE_BYTES:
                raise ValueError(f"an SSE line longer than {MAX_SSE_LINE_BYTES} bytes")
            return []
        if self._pending:
            self._pending.append(chunk)
            chunk = b"".join(self._pending)
            self._pending, self._pending_len = [], 0
        if b"\r" in chunk:
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if tail:
            self._pending, self._pending_len = [tail], len(tail)
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(SSEEvent(self._event, b"\n".join(self._data)))
                self._data, self._event = [], ""
                continue
            field, _, value = line.partition(b":")
            if not field:
                continue  # a comment / keep-alive line
            if value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                self._data.append(value)
            elif field == b"event":
                self._event = value.decode("utf-8", "replace")
        return events


class StreamTally:
    """What one OpenAI chat-completions stream said so far, fed event by event with arrival times.

    A *token chunk* carries generated text: ``content``, ``reasoning_content``/``reasoning`` or
    tool-call name/arguments. A role-only or empty delta is not one (it is no token), and neither is the
    usage chunk (``choices`` empty or null). Its arrival times give TTFT and the inter-token gaps.
    """

    def __init__(self) -> None:
        self.token_times: list[float] = []
        self.usage: Mapping[str, Any] | None = None
        self.server_timing: Mapping[str, Any] | None = None
        self.done_at: float | None = None
        self.error: str | None = None

    def add(self, event: SSEEvent, arrived_at: float) -> None:
        if self.done_at is not None or self.error is not None:
            return
        data = event.data.strip()
        if not data:
            return
        if data == b"[DONE]":
            self.done_at = arrived_at
            return
        try:  # raw_decode on str skips json.loads' encoding sniffing and trailing-space regex: 2.5x faster
            text = data.decode()
            chunk, end = _JSON_DECODER.raw_decode(text)
            if end != len(text):
                raise ValueError("trailing data")
        except ValueError:
            self.error = "unparseable JSON in the stream"
            return
        if not isinstance(chunk, dict):
            self.error = "a stream chunk that is not a JSON object"
            return
        if event.event == "error" or chunk.get("error"):
            self.error = "in-band error: " + _error_text(chunk.get("error") or chunk)
            return
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if delta and _carries_text(delta):
                self.token_times.append(arrived_at)
                break
        usage = chunk.get("usage")
        if usage and isinstance(usage, dict):
            self.usage = usage
            self.server_timing = chunk.get("agentperf_timing") or usage.get("agentperf_timing")


def _carries_text(delta: Mapping[str, Any]) -> bool:
    if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
        return True
    for call in delta.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if function and (function.get("arguments") or function.get("name")):
            return True
    return False


def _count(value: Any) -> int | None:
    """A token count from ``usage``, or None when the server sent none (or something else)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail") or error.get("type") or json.dumps(error)
    return str(error)


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` on one line, at most ``MESSAGE_CHARS`` long, with the given secrets and anything that
    looks like a key or bearer token masked: safe for records, logs and the web UI."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _SECRET_LIKE.sub("***", " ".join(text.split()))
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of a non-empty sorted sequence."""
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass(frozen=True)
class ChatResult:
    """The client's measurement of one request. ``*_perf_s`` are ``time.perf_counter()`` stamps (on Linux
    the same clock as ``time.monotonic()``); durations are seconds from the start of the send."""

    status: Status
    message: str  # redacted; "" when ok
    http_status: int | None
    start_epoch_s: float
    end_epoch_s: float
    start_perf_s: float
    end_perf_s: float
    ttfb_s: float | None  # response headers received
    ttft_s: float | None  # first token chunk received
    e2e_s: float
    itl_p50_s: float | None
    itl_p95_s: float | None
    itl_max_s: float | None
    output_tokens: int
    output_tokens_estimated: bool  # no usage.completion_tokens: token chunks were counted
    prompt_tokens: int | None
    cached_tokens: int | None
    output_tps: float | None  # (output_tokens - 1) / (last token chunk - first token chunk)
    token_times_perf_s: tuple[float, ...]  # arrival of every token chunk
    server_timing: Mapping[str, Any] | None  # the simulator's "agentperf_timing", when asked for


class ChatRequestFailed(Exception):
    """What Locust's failure table shows for a failed request: the status and a bounded, redacted reason."""


class _Failure(Exception):
    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


class ChatBodyEncoder:
    """Builds request bodies by joining per-message JSON encoded once.

    An agent resends its whole conversation every turn, and consecutive turns share their message
    objects, so each message dict is encoded the first time it is seen (keyed by identity; the cache
    keeps the object alive, so an identity is never reused while cached) and a turn costs one join.
    Call :meth:`clear` when the agent starts another trajectory.
    """

    def __init__(self) -> None:
        self._encoded: dict[int, tuple[Any, bytes]] = {}

    def clear(self) -> None:
        self._encoded.clear()

    def _encode(self, value: Any) -> bytes:
        hit = self._encoded.get(id(value))
        if hit is None or hit[0] is not value:
            hit = (value, json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
            self._encoded[id(value)] = hit
        return hit[1]

    def body(self, params: Mapping[str, Any], messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] = ()) -> bytes:
        """``params`` (model, stream, limits, ...) plus ``messages`` and, when given, ``tools``."""
        head = json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode()
        parts = [head[:-1], b"," if len(head) > 2 else b"", b'"messages":[', b",".join(map(self._encode, messages)), b"]"]
        if tools:
            parts += [b',"tools":', self._encode(tools)]
        parts.append(b"}")
        return b"".join(parts)


def api_url(base_url: str, endpoint: str) -> str:
    """``{base}/v1/{endpoint}``, accepting a base that already ends in ``/v1`` (the OpenAI SDK style)."""
    base = base_url.rstrip("/")
    return f"{base}/{endpoint}" if base.endswith("/v1") else f"{base}/v1/{endpoint}"


class ChatStreamClient:
    """Streams chat completions over one FastHttpSession's connection pool (one per agent)."""

    def __init__(
        self,
        session: Any,  # locust.contrib.fasthttp.FastHttpSession
        *,
        api_key: str | None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        name: str = LOCUST_REQUEST_NAME,
    ) -> None:
        self._event = session.request_event
        self._url_text = api_url(session.base_url, "chat/completions")
        url = URL(self._url_text)
        self._uri = getattr(url, "quoted_uri", url.request_uri)
        self._http = session.client.clientpool.get_client(url)  # the agent's own pool: one kept-alive connection
        if _KERNEL_STAMPS and not self._http.ssl:
            self._http._connection_pool._create_tcp_socket = _stamping_socket  # geventhttpclient's socket hook
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream", "Accept-Encoding": "identity"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        elif session.auth_header:
            self._headers["Authorization"] = session.auth_header
        self._secrets = (api_key,) if api_key else ()
        self._request_timeout_s = request_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._name = name

    def post(self, body: bytes, context: Mapping[str, Any] | None = None) -> ChatResult:
        """Send one streaming request; never raises for a failed request (the result says how it ended)."""
        start_epoch = time.time()
        start = time.perf_counter()
        tally = StreamTally()
        ttfb = end = http_status = None
        try:
            response = self._http.request("POST", self._uri, body=body, headers=self._headers)
            ttfb = time.perf_counter() - start
            http_status = response.status_code
            end = self._read(response, tally, start)
            status, message = Status.OK, ""
        except _Failure as failure:
            status, message = failure.status, redact(str(failure), self._secrets)
        except TimeoutError:
            status, message = Status.TIMEOUT, f"no response within {self._request_timeout_s:g} s"
        except HTTPConnectionClosed:
            status, message = Status.DISCONNECT, "connection closed before the response ended"
        except HTTPParseError:
            status, message = Status.BAD_STREAM, "malformed HTTP response"
        except OSError as exc:
            status, message = Status.DISCONNECT, f"connection error: {type(exc).__name__}"
        result = self._result(tally, status, message, http_status, start_epoch, start, ttfb, end or time.perf_counter())
        self._event.fire(
            request_type="POST",
            name=self._name,
            response_time=result.e2e_s * 1000.0,
            response_length=result.output_tokens,
            exception=None if status is Status.OK else ChatRequestFailed(f"{status.value}: {message}"),
            context=context or {},
            response=None,
            url=self._url_text,
            start_time=start_epoch,
        )
        return result

    def _read(self, response: Any, tally: StreamTally, start: float) -> float:
        """Read the body as it arrives; return the arrival time of [DONE]."""
        sock = response._sock  # None when the whole response came with the headers
        original_timeout = sock.gettimeout() if sock is not None else None
        deadline = None
        try:
            if response.status_code >= 400:
                raise _Failure(*self._http_error(response, sock))
            if response.status_code != 200:
                raise _Failure(Status.BAD_STREAM, f"unexpected HTTP {response.status_code}")
            content_type = response.get("content-type")
            if isinstance(content_type, str) and "text/event-stream" not in content_type:
                raise _Failure(Status.BAD_STREAM, f"expected text/event-stream, got {content_type.split(';')[0]}")
            if sock is not None:
                sock.settimeout(None)  # the deadline below bounds the waits
            deadline = _Deadline(start + self._request_timeout_s, Status.TIMEOUT, "no first token within the request timeout")
            parser = SSEParser()
            reader = _BodyReader(response, sock)
            while tally.done_at is None and tally.error is None:
                data, arrived_at = reader.read()
                if not data:
                    raise _Failure(Status.DISCONNECT, "the stream ended before [DONE]")
                try:
                    events = parser.feed(data)
                except ValueError as exc:
                    raise _Failure(Status.BAD_STREAM, str(exc)) from None
                for event in events:
                    tally.add(event, arrived_at)
                if tally.token_times:
                    if deadline.status is Status.STALL:
                        deadline.at_s = arrived_at + self._stall_timeout_s
                    else:
                        deadline.rearm(arrived_at + self._stall_timeout_s, Status.STALL, f"no bytes for {self._stall_timeout_s:g} s")
            deadline.cancel()
            if tally.error is not None:
                raise _Failure(Status.BAD_STREAM, tally.error)
            with suppress(Exception):  # the request is complete; reading the HTTP end lets the connection be reused
                sock.settimeout(DRAIN_TIMEOUT_S)
                while reader.read()[0]:
                    pass
            return tally.done_at
        finally:
            if deadline is not None:
                deadline.cancel()
            if sock is not None:
                with suppress(OSError):
                    sock.settimeout(original_timeout)
            response.release()  # returns a completed connection to the pool, closes an interrupted one

    def _http_error(self, response: Any, sock: Any) -> tuple[Status, str]:
        body, reader = bytearray(), _BodyReader(response, sock)
        with suppress(Exception):
            if sock is not None:
                sock.settimeout(self._stall_timeout_s)
            while len(body) < ERROR_BODY_BYTES and (data := reader.read()[0]):
                body += data
        try:
            parsed = json.loads(body)
            text = _error_text(parsed.get("error") or parsed)
        except (ValueError, AttributeError):
            text = body.decode("utf-8", "replace").strip()
        code = response.status_code
        return (Status.HTTP_4XX if code < 500 else Status.HTTP_5XX), f"HTTP {code}" + (f": {text}" if text else "")

    def _result(self, tally, status, message, http_status, start_epoch, start, ttfb, end) -> ChatResult:
        times = tally.token_times
        usage = tally.usage or {}
        completion = _count(usage.get("completion_tokens"))
        estimated = completion is None
        tokens = len(times) if estimated else completion
        gaps = sorted(b - a for a, b in zip(times, times[1:]))
        details = usage.get("prompt_tokens_details")
        span = times[-1] - times[0] if times else 0.0
        return ChatResult(
            status=status,
            message=message,
            http_status=http_status,
            start_epoch_s=start_epoch,
            end_epoch_s=start_epoch + (end - start),
            start_perf_s=start,
            end_perf_s=end,
            ttfb_s=ttfb,
            ttft_s=times[0] - start if times else None,
            e2e_s=end - start,
            itl_p50_s=quantile(gaps, 0.5) if gaps else None,
            itl_p95_s=quantile(gaps, 0.95) if gaps else None,
            itl_max_s=gaps[-1] if gaps else None,
            output_tokens=tokens,
            output_tokens_estimated=estimated,
            prompt_tokens=_count(usage.get("prompt_tokens")),
            cached_tokens=_count(details.get("cached_tokens")) if isinstance(details, dict) else None,
            output_tps=(tokens - 1) / span if tokens > 1 and span > 0 else None,
            token_times_perf_s=tuple(times),
            server_timing=tally.server_timing,
        )


class _StampingSocket(gevent.socket.socket):
    """A gevent TCP socket whose every ``recv`` keeps the kernel's receive time of the data it returned.

    On Linux, ``SO_TIMESTAMPNS`` makes ``recvmsg`` report when the (last) packet of a read reached this
    host, so a token that waits in the socket while this process is busy with other streams, or not
    scheduled at all, is still stamped when it arrived. Overriding ``recv`` (rather than reading with
    ``recvmsg`` only in this module) stamps the header read that geventhttpclient does as well, which
    under load often carries the first token too.
    """

    arrival_realtime_s: float | None = None

    def recv(self, size: int, flags: int = 0) -> bytes:
        data, ancillary, _, _ = self.recvmsg(size, _ANCILLARY_BYTES, flags)
        self.arrival_realtime_s = None
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= _TIMESPEC.size:
                seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                self.arrival_realtime_s = seconds + nanoseconds * 1e-9
        return data


def _stamping_socket(family: int, socktype: int, protocol: int) -> _StampingSocket:
    """geventhttpclient's ``ConnectionPool._create_tcp_socket`` hook: every new connection stamps reads."""
    sock = _StampingSocket(family, socktype, protocol)
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    return sock


class _BodyReader:
    """A response's body bytes as they arrive, with the time they reached this host (``perf_counter``).

    The time is the kernel's receive stamp where the socket has one (:class:`_StampingSocket`), else the
    moment the read returned. The reader waits for readability before reading: the next token is usually
    an engine step away, so gevent's read-first ``recv`` would fail with EAGAIN nearly every time, and
    that failed call and its exception cost about a fifth of a stream's CPU. Not on TLS sockets, where
    decrypted bytes can wait in the SSL object while the socket shows none.
    """

    def __init__(self, response: Any, sock: Any) -> None:
        self._response = response
        self._sock = sock
        plain = sock is not None and not hasattr(sock, "pending") and hasattr(sock, "_wait")
        self._wait_readable = partial(sock._wait, sock._read_event) if plain else None
        # Body bytes that came with the headers arrived with the header read's last packet.
        self._kernel_s = getattr(sock, "arrival_realtime_s", None) if response._body_buffer else None

    def read(self) -> tuple[bytes, float]:
        """(body bytes, their arrival); b"" when the body ended."""
        response, buffer = self._response, self._response._body_buffer
        kernel_s, self._kernel_s = self._kernel_s, None
        while not buffer:
            if response.message_complete or response._sock is None:
                return b"", time.perf_counter()
            if self._wait_readable is not None:
                self._wait_readable()
            data = self._sock.recv(RECV_BYTES)
            if not data:
                return b"", time.perf_counter()
            kernel_s = getattr(self._sock, "arrival_realtime_s", None)
            response.feed(data)
        now_s = time.perf_counter()
        data = bytes(buffer)
        del buffer[:]
        if kernel_s is None:
            return data, now_s
        return data, min(now_s, kernel_s - (time.time() - now_s))  # the realtime stamp on the monotonic clock


class _Deadline:
    """Bounds a stream's reads with one event-loop timer per request.

    A gevent socket timeout arms and cancels a timer on every wait, a sizeable share of the CPU a stream
    costs. Here the deadline is an attribute: before the first token it is the start plus the request
    timeout (a miss is a ``timeout``); after it, the last read plus the stall timeout (a miss is a
    ``stall``), moved forward by a plain assignment per read. The timer fires at the earliest deadline and,
    when the deadline has moved on, re-arms for the rest; otherwise it throws the failure into the
    reading greenlet, which is then waiting in ``recv``.
    """

    def __init__(self, at_s: float, status: Status, message: str) -> None:
        self._greenlet = gevent.getcurrent()
        self._loop = gevent.get_hub().loop
        self._timer = None
        self.rearm(at_s, status, message)

    def rearm(self, at_s: float, status: Status, message: str) -> None:
        self.at_s, self.status, self._message = at_s, status, message
        self._start(at_s - time.perf_counter())

    def _start(self, delay_s: float) -> None:
        self.cancel()
        self._timer = self._loop.timer(max(delay_s, 0.0))
        self._timer.start(self._check)

    def _check(self) -> None:
        left_s = self.at_s - time.perf_counter()
        if left_s > 0:
            self._start(left_s)
        else:
            self.cancel()
            self._greenlet.throw(_Failure(self.status, self._message))

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None


def bucket_response_time_3sig(response_time: float) -> int:
    """Replacement for ``locust.stats.bucket_response_time``: 3 significant digits (whole ms below 1 s)
    instead of 2, so Locust's own percentiles of multi-second LLM latencies are within 0.5 % rather than
    5 %. Keys stay bounded: at most 900 per decade of milliseconds."""
    if response_time < 1000:
        return round(response_time)
    step = 10 ** (int(math.log10(response_time)) - 2)
    return int(round(response_time / step) * step)

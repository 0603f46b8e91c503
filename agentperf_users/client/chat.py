"""Streaming chat requests on a FastHttpUser's session, and the measurement each one yields.

One job: send a request, read its stream with :mod:`agentperf_users.client.timed_io` (bytes stamped on arrival,
one deadline timer), let :mod:`agentperf_users.client.sse` say what the bytes mean, and turn the tally into a
:class:`ChatResult`. A large request body is sent in one ``sendall`` and the reply is read as it
arrives, so a 100K-token context adds no client-side buffering to TTFT (tests/test_client.py and
benchmarks/client_accuracy.py check this against the server's own send times).

Every request is also reported once to Locust's ``request`` event (end-to-end milliseconds, output
tokens as the length, an exception when it failed), and TTFT is never fired as a pseudo-request, as it
would pollute Locust's "Aggregated" row.
"""

from __future__ import annotations

import json
import math
import re
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from gevent import GreenletExit
from geventhttpclient.response import HTTPConnectionClosed, HTTPParseError
from geventhttpclient.url import URL

from agentperf_users import options
from agentperf_users.client.outcome import Status
from agentperf_users.client.sse import (
    SSEParser,
    StreamTally,
    error_text,
    implausible_usage,
)
from agentperf_users.client.timed_io import (
    KERNEL_STAMPS,
    BodyReader,
    Deadline,
    StampingSocket,
    StreamFailure,
    realtime_offset_s,
    stamp_connections,
)
from agentperf_users.stats import interpolated_quantile

ERROR_BODY_BYTES = 16 * 1024  # how much of an HTTP error body is read to find its message
DRAIN_TIMEOUT_S = 1.0  # after [DONE], how long to wait for the end of the HTTP message (keeps the connection)
MESSAGE_CHARS = 200  # records and logs carry at most this much of a server's error text
RETRY_AFTER_STATUSES = (429, 503)  # the statuses whose Retry-After header an agent honours
DEFAULT_REQUEST_TIMEOUT_S = options.BY_DEST["request_timeout"].default
DEFAULT_STALL_TIMEOUT_S = options.BY_DEST["stall_timeout"].default
LOCUST_REQUEST_NAME = "chat turn"
_SECRET_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}|Bearer\s+\S+", re.IGNORECASE)


def _count(value: Any) -> int | None:
    """A token count from ``usage``, or None when the server sent none (or something else)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


SECRET_SLICE_CHARS = 4  # a server that echoes a key partly ("sk-SECR****2345") echoes slices this long or longer
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` on one line, at most ``MESSAGE_CHARS`` long, with the given secrets masked (and every slice of
    them of ``SECRET_SLICE_CHARS`` or more characters, as a server's partial echo of a key), anything that
    looks like a key or bearer token, and credentials in a URL: safe for records, logs and the web UI."""
    text = " ".join(text.split())
    for secret in secrets:
        text = _mask_slices(text, secret)
    text = _URL_CREDENTIALS.sub("***@", _SECRET_LIKE.sub("***", text))
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def _mask_slices(text: str, secret: str) -> str:
    """``text`` with every character that belongs to a slice of ``secret`` at least ``SECRET_SLICE_CHARS``
    long masked: any such slice is covered by the secret's windows of exactly that length."""
    width = SECRET_SLICE_CHARS
    if len(secret) < width:
        return text.replace(secret, "***") if secret else text
    hidden = bytearray(len(text))
    for window in {secret[i:i + width] for i in range(len(secret) - width + 1)}:
        start = text.find(window)
        while start >= 0:
            hidden[start:start + width] = b"\x01" * width
            start = text.find(window, start + 1)
    if not any(hidden):
        return text
    return re.sub(r"\x00+", "***", "".join("\x00" if flag else char for char, flag in zip(text, hidden)))


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced: a --host may carry credentials, logs and reports may not."""
    return _URL_CREDENTIALS.sub("***@", url)


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
    ttfb_s: float | None  # the response headers arrived
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
    retry_after_s: float | None = None  # a 429 or 503's Retry-After, seconds (HTTP-date forms are not read)


class ChatRequestFailed(Exception):
    """What Locust's failure table shows for a failed request: the status and a bounded, redacted reason."""


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
        if KERNEL_STAMPS and not self._http.ssl:
            stamp_connections(self._http._connection_pool)
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream", "Accept-Encoding": "identity"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        elif session.auth_header:
            self._headers["Authorization"] = session.auth_header
        self._secrets = (api_key,) if api_key else ()
        self._request_timeout_s = request_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._name = name

    def post(self, body: bytes, context: Mapping[str, Any] | None = None, max_tokens: int | None = None,
             progress: Callable[[float], None] | None = None) -> ChatResult:
        """Send one streaming request and measure it. It never raises for anything the server or the network
        does: every response becomes one result (and so one record) that says how it ended. ``max_tokens`` is
        what the request asked for, the ceiling of a believable ``usage.completion_tokens``.

        ``progress`` is given, as an epoch time, the arrival of the headers and of every read of the body
        once it has been taken in: the result's ``end_epoch_s`` is never before the last of them, so whoever
        waits for this request's record knows it cannot end before that time (``RecordLog.progress``: a
        step's window is known complete as soon as the requests still streaming are past its end, not
        only once they end).

        A kill of the calling greenlet (Locust stopping the agent at the end of a step or run) is the one
        exception: the result then has status ``CANCELLED`` and what had arrived, the caller records it
        and re-raises ``GreenletExit`` (:meth:`AgentUser.turn`), and Locust's request event is not fired,
        as the server did nothing wrong."""
        start_epoch = time.time()
        start = time.perf_counter()
        realtime_offset = realtime_offset_s()
        tally = StreamTally()
        ttfb = end = http_status = retry_after = None
        try:
            response = self._http.request("POST", self._uri, body=body, headers=self._headers)
            reader = BodyReader(response, realtime_offset)
            ttfb = reader.headers_arrived_s - start
            if progress is not None:
                progress(start_epoch + ttfb)
            http_status = response.status_code
            if http_status in RETRY_AFTER_STATUSES:
                retry_after = _retry_after_s(response.get("retry-after"))
            end = self._read(response, reader, tally, start,
                             progress and (lambda arrived_s: progress(start_epoch + (arrived_s - start))))
            status, message = Status.OK, ""
        except StreamFailure as failure:
            status, message = failure.status, redact(str(failure), self._secrets)
        except TimeoutError:
            status, message = Status.TIMEOUT, f"no response within {self._request_timeout_s:g} s"
        except HTTPConnectionClosed:
            status, message = Status.DISCONNECT, "connection closed before the response ended"
        except HTTPParseError:
            status, message = Status.BAD_STREAM, "malformed HTTP response"
        except OSError as exc:
            status, message = Status.DISCONNECT, f"connection error: {type(exc).__name__}"
        except GreenletExit:
            status, message = Status.CANCELLED, "cancelled by the end of its load step or run"
        except Exception as exc:  # noqa: BLE001 -- whatever a server sends must end as a record, not a retry loop
            status, message = Status.BAD_STREAM, redact(f"unreadable response ({type(exc).__name__}: {exc})", self._secrets)
        result = self._result(tally, status, message, http_status, start_epoch, start, ttfb, end or time.perf_counter(),
                              max_tokens, retry_after)
        if result.status is not Status.CANCELLED:
            self._event.fire(
                request_type="POST",
                name=self._name,
                response_time=result.e2e_s * 1000.0,
                response_length=result.output_tokens,
                exception=None if result.status is Status.OK else ChatRequestFailed(f"{result.status.value}: {result.message}"),
                context=context or {},
                response=None,
                url=self._url_text,
                start_time=start_epoch,
            )
        return result

    def _read(self, response: Any, reader: BodyReader, tally: StreamTally, start: float,
              progress: Callable[[float], None] | None) -> float:
        """Read the body as it arrives; return the arrival time of [DONE]. ``progress`` is given each read's
        arrival (``perf_counter``) once the read is taken in."""
        sock = response._sock  # None when the whole response came with the headers
        original_timeout = sock.gettimeout() if sock is not None else None
        deadline = None
        try:
            if response.status_code >= 400:
                raise StreamFailure(*self._http_error(response, reader, sock))
            if response.status_code != 200:
                raise StreamFailure(Status.BAD_STREAM, f"unexpected HTTP {response.status_code}")
            content_type = response.get("content-type")
            if isinstance(content_type, str) and "text/event-stream" not in content_type:
                raise StreamFailure(Status.BAD_STREAM, f"expected text/event-stream, got {content_type.split(';')[0]}")
            if sock is not None:
                sock.settimeout(None)  # the deadline below bounds the waits
            end_by = start + self._request_timeout_s  # the whole request, however its tokens come
            deadline = Deadline(end_by, Status.TIMEOUT, "no first token within the request timeout")
            capped = False  # the deadline is end_by for good: stall checks no longer matter
            parser = SSEParser()
            partial_since = None  # arrival of the read in which the parser's unfinished event began
            while tally.done_at is None and tally.error is None:
                data, arrived_at = reader.read()
                if not data:
                    if tally.usage is not None or tally.finished:
                        return arrived_at  # complete but for [DONE], which some servers and proxies leave out
                    raise StreamFailure(Status.DISCONNECT, "the stream ended before [DONE]")
                try:
                    events = parser.feed(data)
                except ValueError as exc:
                    raise StreamFailure(Status.BAD_STREAM, str(exc)) from None
                for event in events:  # an event is dated by the read it began in
                    tally.add(event, arrived_at if partial_since is None else partial_since)
                    partial_since = None
                if not parser.has_partial_event:
                    partial_since = None
                elif events or partial_since is None:
                    partial_since = arrived_at
                if progress is not None:  # the end, once known; else no event to come is dated before this
                    progress(tally.done_at if tally.done_at is not None
                             else arrived_at if partial_since is None else partial_since)
                if tally.token_times and not capped:
                    stall_at = arrived_at + self._stall_timeout_s
                    if deadline.status is not Status.STALL:  # the first token: from here on, plain reads (see StampingSocket)
                        _first_token_reads(sock, False)
                    if stall_at >= end_by:  # a drip that never stalls still ends with the request timeout
                        deadline.rearm(end_by, Status.TIMEOUT, f"the response did not end within {self._request_timeout_s:g} s")
                        capped = True
                    elif deadline.status is Status.STALL:
                        deadline.at_s = stall_at
                    else:
                        deadline.rearm(stall_at, Status.STALL, f"no bytes for {self._stall_timeout_s:g} s")
            deadline.cancel()
            if tally.error is not None:
                raise StreamFailure(Status.BAD_STREAM, tally.error)
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
                _first_token_reads(sock, True)  # the connection's next request waits for a first token again
            response.release()  # returns a completed connection to the pool, closes an interrupted one

    def _http_error(self, response: Any, reader: BodyReader, sock: Any) -> tuple[Status, str]:
        body = bytearray()
        with suppress(Exception):
            if sock is not None:
                sock.settimeout(self._stall_timeout_s)
            while len(body) < ERROR_BODY_BYTES and (data := reader.read()[0]):
                body += data
        try:
            parsed = json.loads(body)
            text = error_text(parsed.get("error") or parsed)
        except (ValueError, AttributeError):
            text = body.decode("utf-8", "replace").strip()
        code = response.status_code
        return (Status.HTTP_4XX if code < 500 else Status.HTTP_5XX), f"HTTP {code}" + (f": {text}" if text else "")

    def _result(self, tally, status, message, http_status, start_epoch, start, ttfb, end, max_tokens=None,
                retry_after=None) -> ChatResult:
        times = tally.token_times
        usage = tally.usage or {}
        completion = _count(usage.get("completion_tokens"))
        if completion is not None and (doubt := implausible_usage(completion, tally, max_tokens)) is not None:
            completion = None  # not believed: the chunks that arrived are counted instead
            if status is Status.OK:
                status, message = Status.BAD_STREAM, doubt
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
            itl_p50_s=interpolated_quantile(gaps, 0.5) if gaps else None,
            itl_p95_s=interpolated_quantile(gaps, 0.95) if gaps else None,
            itl_max_s=gaps[-1] if gaps else None,
            output_tokens=tokens,
            output_tokens_estimated=estimated,
            prompt_tokens=_count(usage.get("prompt_tokens")),
            cached_tokens=_count(details.get("cached_tokens")) if isinstance(details, dict) else None,
            output_tps=(tokens - 1) / span if tokens > 1 and span > 0 else None,
            token_times_perf_s=tuple(times),
            server_timing=tally.server_timing,
            retry_after_s=retry_after,
        )


def _retry_after_s(value: Any) -> float | None:
    """A ``Retry-After`` header's delay in seconds (RFC 9110: a non-negative integer; a decimal is accepted),
    or None when absent or not a number."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _first_token_reads(sock: Any, on: bool) -> None:
    if isinstance(sock, StampingSocket):
        sock.first_token_reads = on


def bucket_response_time_3sig(response_time: float) -> int:
    """Replacement for ``locust.stats.bucket_response_time``: 3 significant digits (whole ms below 1 s)
    instead of 2, so Locust's own percentiles of multi-second LLM latencies are within 0.5 % rather than
    5 %. Keys stay bounded: at most 900 per decade of milliseconds."""
    if response_time < 1000:
        return round(response_time)
    step = 10 ** (int(math.log10(response_time)) - 2)
    return int(round(response_time / step) * step)

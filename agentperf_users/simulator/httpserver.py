"""A minimal HTTP/1.1 server side on a raw ``asyncio.Protocol``: keep-alive, Content-Length bodies, chunked replies.

Why not a framework: the simulator must stream tens of thousands of tokens a second from one core, and a
framework's per-write overhead caps a core near 20K chunks/s. This layer only frames requests and
responses; what a request means is the handler's business (:mod:`.server`). Malformed requests are
answered here in OpenAI's error shape, like every other error the simulator sends.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from typing import Any, Callable

from agentperf_users.simulator.wire import ApiError

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024
_LAST_CHUNK = b"0\r\n\r\n"
_STATUS_TEXT = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
    411: "Length Required", 413: "Content Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


def chunk(payload: bytes) -> bytes:
    """One chunk of chunked transfer-encoding."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class HttpConnection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies; one request at a time per connection.

    The handler answers through :meth:`respond`, or :meth:`start_stream` / :meth:`send` /
    :meth:`end_stream` for a chunked response; data that arrives meanwhile waits in the buffer.
    """

    def __init__(self, handle: Callable[["HttpConnection", HttpRequest], None], lost: Callable[["HttpConnection"], None]):
        self._handle, self._lost = handle, lost
        self._buffer = bytearray()
        self._busy = False
        self._keep_alive = True
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # The server's answer in flight on this connection (its Reply): kept here so that a lost connection
        # finds it; the framing only clears it, and so does not import the layer above it.
        self.reply: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._busy:
            self._next_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._lost(self)

    def _next_request(self) -> None:
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._reject(ApiError(431, "request head too large"))
            return
        try:
            lines = bytes(self._buffer[:head_end]).decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return self._reject(ApiError(400, "malformed HTTP request head"))
        if "chunked" in headers.get("transfer-encoding", ""):
            return self._reject(ApiError(411, "send the request body with a Content-Length header"))
        if length > MAX_BODY_BYTES:
            return self._reject(ApiError(413, f"request body over {MAX_BODY_BYTES} bytes"))
        body_end = head_end + 4 + length
        if len(self._buffer) < body_end:
            if headers.get("expect", "").lower() == "100-continue" and len(self._buffer) == head_end + 4:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        body = bytes(self._buffer[head_end + 4 : body_end])
        del self._buffer[:body_end]
        connection = headers.get("connection", "").lower()
        self._keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
        self._busy = True
        self._handle(self, HttpRequest(method, target.split("?", 1)[0], headers, body))

    def _reject(self, error: ApiError) -> None:
        self._keep_alive = False
        self.respond(error.status, error.payload())

    def _head(self, status: int, headers: tuple[tuple[str, str], ...]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Unknown')}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if not self._keep_alive:
            lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def respond(self, status: int, body: bytes, content_type: str = "application/json",
                headers: tuple[tuple[str, str], ...] = ()) -> None:
        head = self._head(status, (("content-type", content_type), ("content-length", str(len(body))), *headers))
        self.send(head + body)
        self.end()

    def start_stream(self, headers: tuple[tuple[str, str], ...]) -> None:
        self.send(self._head(200, headers + (("transfer-encoding", "chunked"),)))

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def end_stream(self, payload: bytes) -> None:
        """Send ``payload`` as the chunked response's last data chunk, then its terminator."""
        self.send(chunk(payload) + _LAST_CHUNK)
        self.end()

    def reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed server or proxy does, not a FIN."""
        if self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.closed = True
        self.transport.abort()

    def end(self) -> None:
        """The response is complete: read the next request, or close."""
        self.reply = None
        self._busy = False
        if self.closed:
            return
        if not self._keep_alive:
            self.transport.close()
        elif self._buffer:
            asyncio.get_running_loop().call_soon(self._next_request)

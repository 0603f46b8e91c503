"""Response body bytes read as they arrive, stamped with when they reached this host.

Why not ``FastResponse.iter_content`` or ``iter_lines``: geventhttpclient's ``read(n)`` waits until ``n``
bytes have arrived, so a small SSE event would sit in its buffer until later ones fill it, and every
timestamp after it would be late. Here each ``recv`` returns whatever the kernel holds; the response's
own C parser strips the HTTP framing; every read gets its arrival time, which on Linux is the kernel's
receive timestamp (see :class:`StampingSocket`), so a busy or descheduled client does not add its own
delay. The waits are bounded by a :class:`Deadline`, one event-loop timer per request, because a socket
timeout per read costs a large share of a stream's CPU.
"""

from __future__ import annotations

import math
import os
import platform
import select
import socket
import struct
import sys
import time
from collections import deque
from contextlib import suppress
from functools import partial
from importlib.metadata import version as _version
from typing import Any

import gevent
import gevent.monkey
import gevent.socket
from gevent.hub import Waiter

from agentperf_users.client.outcome import Status
from agentperf_users.errors import AgentperfError

OFFSET_READS = 3  # at most this many bracketed clock reads per conversion (realtime_offset_s)
OFFSET_GOOD_WIDTH_S = 10e-6  # a bracket this tight needs no further read
RECV_BYTES = 64 * 1024  # at most this much per socket read; a read returns what is there, never waits to fill
# Before a request's first token, reads are cut this short (see StampingSocket). A token chunk's event is
# longer: {"id","object","created","model","choices":[{"index","delta"}]} alone is about 100 bytes.
FIRST_TOKEN_READ_BYTES = 96
# Kernel receive timestamps: SO_TIMESTAMPNS is 35 in Linux's asm-generic socket.h (x86 and arm), which
# the socket module does not export; the control message carries a struct timespec (CLOCK_REALTIME).
SO_TIMESTAMPNS = 35
KERNEL_STAMPS = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64", "arm64")
_TIMESPEC = struct.Struct("@ll")
_ANCILLARY_BYTES = socket.CMSG_SPACE(_TIMESPEC.size) if KERNEL_STAMPS else 0


class StreamFailure(Exception):
    """How a request failed, as a record status and a message (not yet redacted)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


class StampingSocket(gevent.socket.socket):
    """A gevent TCP socket whose every ``recv`` keeps the kernel's receive time of the data it returned.

    On Linux, ``SO_TIMESTAMPNS`` makes ``recvmsg`` report when a packet of the read reached this host,
    so a token that waits in the socket while this process is busy with other streams, or not scheduled
    at all, is still stamped when it arrived. Overriding ``recv`` (rather than reading with ``recvmsg``
    only in this module) stamps the header read that geventhttpclient does as well, which under load
    often carries the first token too.

    A stamp is exact only if its packet is read before the next one arrives: Linux merges a TCP segment
    into the unread one before it and keeps the *later* stamp. For the first token that would cost a whole
    engine step of TTFT whenever one event-loop iteration (a step's tokens for hundreds of streams)
    outlasts an engine step. So until a request's first token (``first_token_reads``, set by the client)
    the socket is read by :class:`FirstTokenReader`'s OS thread, which no loop iteration delays, and
    ``recv`` hands out what it read, in order and with each read's stamp. Its reads are cut to
    ``FIRST_TOKEN_READ_BYTES``, less than any token chunk's event, so the read holding an event's first
    byte ends inside that event's packet and carries its stamp (the client dates each event by the read
    it began in), not the stamp of the headers' or a later packet's.
    """

    arrival_realtime_s: float | None = None
    _first_token_reads = True
    _watched = False  # read by the FirstTokenReader thread (which alone changes it back to False)
    _waiter: Any = None  # the greenlet waiting in recv for the thread's reads

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._thread_reads: deque[tuple[bytes | OSError, float | None]] = deque()

    @property
    def first_token_reads(self) -> bool:
        return self._first_token_reads

    @first_token_reads.setter
    def first_token_reads(self, on: bool) -> None:
        """Set by the client: True once a request's response begins, False at its first token. The
        reader thread starts reading at the next ``recv`` (when a request is out), not while the
        connection idles in the pool, where geventhttpclient checks for a closed one itself."""
        self._first_token_reads = on
        if self._watched:
            FirstTokenReader.get().unwatch(self)

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self._first_token_reads and not self._watched and not flags:
            FirstTokenReader.get().watch(self)
        if self._thread_has_read():
            return self._take_thread_read(size)
        data, ancillary, _, _ = self.recvmsg(size, _ANCILLARY_BYTES, flags)
        self.arrival_realtime_s = _kernel_stamp(ancillary)
        return data

    def wait_readable(self) -> None:
        """Wait until a read would return data (or the socket timeout passes, as gevent's reads do)."""
        if not self._thread_has_read():
            self._wait(self._read_event)

    def close(self) -> None:
        if self._watched:
            FirstTokenReader.get().unwatch(self)  # before the descriptor can be reused
        super().close()

    def read_available(self) -> bool:
        """Called on the reader thread: queue what the kernel holds; True when the stream has ended."""
        while True:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(FIRST_TOKEN_READ_BYTES, _ANCILLARY_BYTES)
            except BlockingIOError:
                return False
            except OSError as exc:
                self._thread_reads.append((exc, None))
                return True
            self._thread_reads.append((data, _kernel_stamp(ancillary)))
            if not data:
                return True

    def _thread_has_read(self) -> bool:
        """Whether the reader thread left data (or the stream's end) to hand out; while it still reads
        this socket, wait for that. False: read the socket directly."""
        while self._watched and not self._thread_reads:
            self._wait_for_thread()
        return bool(self._thread_reads)

    def _take_thread_read(self, size: int) -> bytes:
        data, stamp = self._thread_reads[0]
        if isinstance(data, OSError):
            self._thread_reads.popleft()
            raise data
        if len(data) > size:
            self._thread_reads[0] = (data[size:], stamp)
            data = data[:size]
        else:
            self._thread_reads.popleft()
        self.arrival_realtime_s = stamp
        return data

    def _wait_for_thread(self) -> None:
        waiter = self._waiter = Waiter()
        try:
            if self._thread_reads or not self._watched:  # it read (or stopped) since the caller looked
                return
            timeout_s = self.gettimeout()
            if timeout_s is None:
                waiter.get()
            else:
                with gevent.Timeout(timeout_s, TimeoutError("timed out")):
                    waiter.get()
        finally:
            self._waiter = None


class FirstTokenReader:
    """One OS thread per process that reads the sockets whose request still waits for its first token.

    A greenlet reads a socket only when the event loop gets round to it, which under load is after a
    whole iteration of other streams; a real thread blocked in ``epoll`` runs as soon as data arrives
    (Python hands it the interpreter lock within ``sys.getswitchinterval()``, 5 ms, well inside an engine
    step), so the first token's packet is read, and keeps its own kernel stamp, before the next step's
    packet could be merged into it. It only reads and queues; parsing and timing stay on the loop, which
    one ``async`` watcher wakes. The lock keeps a socket from being read by the thread and the loop at
    once: ``unwatch`` returns only when the thread is not inside that socket's read.
    """

    _instance: FirstTokenReader | None = None

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._epoll = gevent.monkey.get_original("select", "epoll")()
        self._lock = gevent.monkey.get_original("_thread", "allocate_lock")()
        self._sockets: dict[int, StampingSocket] = {}
        self._ready: deque[StampingSocket] = deque()
        self._wakeup = gevent.get_hub().loop.async_(ref=False)
        self._wakeup.start(self._wake_readers)
        gevent.monkey.get_original("_thread", "start_new_thread")(self._run, ())

    @classmethod
    def get(cls) -> FirstTokenReader:
        """This process's reader (a forked child, as with ``locust --processes``, starts its own)."""
        if cls._instance is None or cls._instance._pid != os.getpid():
            cls._instance = cls()
        return cls._instance

    def watch(self, sock: StampingSocket) -> None:
        fd = sock.fileno()
        with self._lock:
            self._sockets[fd] = sock
            sock._watched = True
            try:
                self._epoll.register(fd, select.EPOLLIN)
            except FileExistsError:  # the descriptor's last socket was closed without unwatch
                self._epoll.modify(fd, select.EPOLLIN)

    def unwatch(self, sock: StampingSocket) -> None:
        with self._lock:
            self._stop(sock)
        if sock._waiter is not None:  # another greenlet waits for this socket's reads: it reads it itself now
            self._ready.append(sock)
            self._wakeup.send()

    def _stop(self, sock: StampingSocket) -> None:
        fd = sock.fileno()
        if sock._watched and self._sockets.get(fd) is sock:
            del self._sockets[fd]
            with suppress(OSError):
                self._epoll.unregister(fd)
        sock._watched = False

    def _run(self) -> None:
        while True:
            events = self._epoll.poll()
            with self._lock:
                for fd, _ in events:
                    sock = self._sockets.get(fd)
                    if sock is not None:
                        if sock.read_available():
                            self._stop(sock)  # at the end of the stream the socket stays readable
                        self._ready.append(sock)
            self._wakeup.send()

    def _wake_readers(self) -> None:
        while self._ready:
            waiter = self._ready.popleft()._waiter
            if waiter is not None:
                waiter.switch(None)


def _kernel_stamp(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(value)
            return seconds + nanoseconds * 1e-9
    return None


def stamping_socket(family: int, socktype: int, protocol: int) -> StampingSocket:
    """geventhttpclient's ``ConnectionPool._create_tcp_socket`` hook: every new connection stamps reads."""
    sock = StampingSocket(family, socktype, protocol)
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    return sock


SOCKET_HOOK = "_create_tcp_socket"


def stamp_connections(pool: Any) -> None:
    """Make every new connection of a geventhttpclient ``ConnectionPool`` a :class:`StampingSocket`.

    The hook and ``response._sock`` are geventhttpclient internals, pinned in pyproject.toml to the versions
    tested. Setting a hook the pool no longer calls would silently date tokens by the event loop instead of
    the kernel, so a pool without it is an error, not a fallback."""
    if not callable(getattr(type(pool), SOCKET_HOOK, None)):
        raise AgentperfError(f"geventhttpclient {_version('geventhttpclient')} has no ConnectionPool.{SOCKET_HOOK}: "
                             "kernel timestamps would be lost; install the version pyproject.toml pins")
    setattr(pool, SOCKET_HOOK, stamping_socket)


class BodyReader:
    """A response's body bytes as they arrive, with the time they reached this host (``perf_counter``).

    The time is the kernel's receive stamp where the socket has one (:class:`StampingSocket`), else the
    moment the read returned; the headers are dated the same way, so a first token that came in the
    headers' packet has their time, never an earlier one. Kernel stamps are on the realtime clock and
    are converted with one offset per response (``realtime_offset_s``): NTP slews both clocks alike, so
    the offset moves only when the clock is stepped, and one packet's stamp always converts to one time.
    The reader waits for readability before reading: the next token is usually an engine step away, so
    gevent's read-first ``recv`` would fail with EAGAIN nearly every time, and that failed call and its
    exception cost about a fifth of a stream's CPU. Not on TLS sockets, where decrypted bytes can wait in
    the SSL object while the socket shows none.
    """

    def __init__(self, response: Any, realtime_offset: float) -> None:
        self._response = response
        self._sock = sock = response._sock  # None when the whole response came with the headers
        self._realtime_offset = realtime_offset
        plain = sock is not None and not hasattr(sock, "pending") and hasattr(sock, "_wait")
        self._wait_readable = (getattr(sock, "wait_readable", None) or partial(sock._wait, sock._read_event)) if plain else None
        self.headers_arrived_s = self._last_read_arrival_s()
        # Body bytes that came with the headers arrived when the headers did.
        self._buffered_arrived_s = self.headers_arrived_s if response._body_buffer else None

    def read(self) -> tuple[bytes, float]:
        """(body bytes, their arrival); b"" when the body ended."""
        response, buffer = self._response, self._response._body_buffer
        arrived_s, self._buffered_arrived_s = self._buffered_arrived_s, None
        while not buffer:
            if response.message_complete or response._sock is None:
                return b"", time.perf_counter()
            if self._wait_readable is not None:
                self._wait_readable()
            data = self._sock.recv(RECV_BYTES)
            if not data:
                return b"", time.perf_counter()
            arrived_s = None
            response.feed(data)
        data = bytes(buffer)
        del buffer[:]
        return data, self._last_read_arrival_s() if arrived_s is None else arrived_s

    def _last_read_arrival_s(self) -> float:
        now_s = time.perf_counter()
        kernel_s = getattr(self._sock, "arrival_realtime_s", None)
        return now_s if kernel_s is None else min(now_s, kernel_s - self._realtime_offset)  # on the perf_counter clock


def realtime_offset_s() -> float:
    """``time.time() - time.perf_counter()``, read so that being descheduled between the two reads
    (common on a loaded machine) cannot skew it: the realtime read is bracketed by two perf_counter
    reads, and the tightest of a few brackets gives the offset, off by at most half its width."""
    best_width, best_offset = math.inf, 0.0
    for _ in range(OFFSET_READS):
        before = time.perf_counter()
        real = time.time()
        after = time.perf_counter()
        if after - before < best_width:
            best_width, best_offset = after - before, real - (before + after) / 2
        if best_width < OFFSET_GOOD_WIDTH_S:
            break
    return best_offset


class Deadline:
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
            self._greenlet.throw(StreamFailure(self.status, self._message))

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None

"""How a request ended, as the client classifies it. It is decided here, where the response is read (the
socket layer's deadlines carry one), and carried unchanged into the request's record."""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """How a request ended. Anything but ``OK`` counts as a miss for every SLO tier, except ``CANCELLED``:
    the load generator cut the request itself (its step or run ended), so it says nothing of the server and
    no window judges it (``slo.records_in_window``); it is kept so that every request the server saw has a
    record."""

    OK = "ok"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    TIMEOUT = "timeout"  # no response or no first token within the request timeout
    STALL = "stall"  # the stream went silent for longer than the stall timeout
    DISCONNECT = "disconnect"  # the connection closed before [DONE]
    BAD_STREAM = "bad_stream"  # unparseable SSE/JSON, a chunk of the wrong shape, impossible usage, an in-band error
    CANCELLED = "cancelled"  # cut by the end of its load step or of the run, with what had arrived by then

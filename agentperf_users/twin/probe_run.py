"""Send a :class:`~agentperf_users.twin.probe_design.ProbeDesign` to a server and turn what came back into
:class:`~agentperf_users.twin.fit.Observation` s.

Requests are plain streaming chat completions (``replay.chat_params``: usage included, ``ignore_eos`` so
output lengths are exact), one user message of filler text (``textgen.filler``) behind a nonce, so no
two probe prompts share a first block unless the shared-prefix pair means them to. Token arrival times
are taken as the bytes arrive (``sse.StreamTally``), and the server's own ``usage.prompt_tokens`` is the
prompt length the fit uses: the server's tokenizer may count the filler differently from agentperf's.
A decode group runs its requests on threads released together by a barrier.

Agent-shaped requests (``ProbeDesign.agent_tokens``) carry what a coding agent's turn carries: the
built-in coding tools' schemas and a conversation of alternating messages, each length sent three times so
the later ones are prefix-cache hits, as most agent turns are. Their client TTFT minus the server's own queue and
prefill time (``vllm:request_queue_time_seconds``, ``vllm:request_prefill_time_seconds``) is the front
end's work, which :func:`agentperf_users.twin.fit.fit_front_end` turns into the profile's
``efficiency.frontend_ms`` and ``frontend_ms_per_1k_tokens``.
"""

from __future__ import annotations

import json
import secrets
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import requests
from prometheus_client.parser import text_string_to_metric_families

from agentperf_users.client.chat import api_url, redact
from agentperf_users.client.sse import SSEParser, StreamTally
from agentperf_users.errors import AgentperfError
from agentperf_users.loadgen import replay
from agentperf_users.loadgen.probe import ProbeTarget
from agentperf_users.simulator.profile import attention_pairs
from agentperf_users.tokens import count_prompt_tokens
from agentperf_users.twin.fit import Observation, StepWork, token_scale
from agentperf_users.twin.probe_design import ProbeDesign
from agentperf_users.workload.synth import CODING_TOOLS
from agentperf_users.workload.textgen import filler

PREFILL_OUTPUT_TOKENS = 2  # a first token is all a prefill probe needs; a second shows the stream goes on
MIN_DECODE_GAPS = 5  # gaps inside a group's all-decoding window needed to take its median
CONNECT_TIMEOUT_S = 10.0
PREFILL_HISTOGRAM = "vllm:request_prefill_time_seconds"
QUEUE_HISTOGRAM = "vllm:request_queue_time_seconds"
AGENT_TURN_TOKENS = 200  # agentperf tokens per message of an agent-shaped probe's conversation
METRICS_SETTLE_S = 2.0  # how long a finished request may take to show in the server's histograms


@dataclass(frozen=True)
class Measured:
    """One probe request as the client saw it."""

    prompt_tokens: int  # the server's count (usage), or agentperf's when the server reports none
    our_tokens: int  # agentperf's count of the same request (the simulator's tokenizer and template)
    cached_tokens: int | None  # usage.prompt_tokens_details.cached_tokens; None: not reported
    sent_s: float  # monotonic time the request was sent
    token_times: tuple[float, ...]  # monotonic arrival time of each token chunk

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.sent_s


@dataclass(frozen=True)
class ProbeData:
    observations: tuple[Observation, ...]
    prefix_caching: str  # "on", "off" or "unknown"
    token_scale: float  # the server's prompt tokens per agentperf token (the slope over the cold prefills)
    front_end_s: tuple[tuple[int, float], ...] = ()
    """(prompt tokens, client TTFT minus the engine's prefill time) of each cold prefill length, where the
    server tells its prefill time: what happens outside the engine's steps (HTTP, chat template, tokenizer,
    the hop to the engine); kept for the planner to see. The profile's front-end cost is fitted to
    ``agent_front_end_s`` instead: one-message prompts without tools under-measure an agent's front end."""
    agent_front_end_s: tuple[tuple[int, float], ...] = ()
    """(prompt tokens, client TTFT minus the server's queue and prefill time) of each agent-shaped request
    (tools and a conversation, cold then cached): the points the front-end cost is fitted to. Empty where
    the server does not expose both histograms."""
    front_end_note: str = ""
    """Why ``agent_front_end_s`` is empty, or what was sent instead (no tools), for the profile's header."""


class ProbeClient:
    """Streams probe requests to one model of one server; one ``requests.Session`` per thread."""

    def __init__(self, target: ProbeTarget, model: str) -> None:
        self._target = target
        self._model = model
        self._url = api_url(target.host, "chat/completions")
        self._metrics_url = target.host.rstrip("/").removesuffix("/v1") + "/metrics"
        self._local = threading.local()

    def send(self, prompt_tokens: int, output_tokens: int, text: str | None = None) -> Measured:
        """A request of about ``prompt_tokens`` (agentperf's count) of fresh text, or of ``text``."""
        text = text or fresh_text(prompt_tokens)
        return self.send_messages([{"role": "user", "content": text}], (), output_tokens)

    def send_messages(self, messages: Sequence[dict], tools: Sequence[dict], output_tokens: int) -> Measured:
        """One streaming chat request of these messages and tool definitions."""
        messages = list(messages)
        body = {**replay.chat_params(self._model, output_tokens, replay.ReplaySettings()), "messages": messages,
                **({"tools": list(tools)} if tools else {})}
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._target.api_key:
            headers["Authorization"] = f"Bearer {self._target.api_key}"
        session = self._session()
        sent_s = time.monotonic()
        try:
            with session.post(self._url, data=json.dumps(body), headers=headers, stream=True,
                              timeout=(CONNECT_TIMEOUT_S, self._target.timeout_s)) as response:
                if response.status_code != 200:
                    raise self._error(f"answered a probe request with HTTP {response.status_code} "
                                      f"({self._redact(response.text)})")
                tally, parser = StreamTally(), SSEParser()
                for data in response.iter_content(chunk_size=None):
                    for event in parser.feed(data):
                        tally.add(event, time.monotonic())
                    if tally.error is not None or tally.done_at is not None:
                        break
        except requests.RequestException as exc:
            raise self._error(f"stopped answering during the probe ({type(exc).__name__})") from None
        if tally.error is not None or not tally.token_times:
            raise self._error(f"sent a stream without tokens or not OpenAI's chunks ({tally.error or 'no tokens'})")
        usage = tally.usage or {}
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        prompt = usage.get("prompt_tokens")
        ours = count_prompt_tokens(messages, tools)
        return Measured(prompt if isinstance(prompt, int) and prompt > 0 else ours, ours,
                        cached if isinstance(cached, int) else None, sent_s, tuple(tally.token_times))

    def prefill_clock(self) -> tuple[float, int] | None:
        """(sum, count) of the server's ``vllm:request_prefill_time_seconds`` histogram (each request's time
        from its first scheduled step to its first token, on the engine's clock); None where it has none."""
        return self.histogram_clock(PREFILL_HISTOGRAM)

    def histogram_clock(self, *names: str) -> tuple[float, int] | None:
        """(sum of the sums, count of the first) of the server's histograms ``names``; None where it lacks one."""
        wanted = {f"{name}_{part}" for name in names for part in ("sum", "count")}
        text = self.metrics_text()
        if text is None:
            return None
        try:
            found = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in wanted:
                        found[sample.name] = found.get(sample.name, 0.0) + sample.value
        except ValueError:
            return None
        if len(found) != len(wanted):
            return None
        return sum(found[f"{name}_sum"] for name in names), int(found[f"{names[0]}_count"])

    def metrics_text(self) -> str | None:
        """The server's ``/metrics`` exposition now; None where it has none (or did not answer)."""
        try:
            response = self._session().get(self._metrics_url, timeout=CONNECT_TIMEOUT_S)
        except requests.RequestException:
            return None
        return response.text if response.status_code == 200 else None

    def send_prefill(self, prompt_tokens: int, text: str | None = None) -> tuple[Measured, float | None]:
        """A lone request and its prefill time on the engine's clock (None where the server does not tell
        it): the difference of the prefill histogram's sum around it, once its count has moved by one."""
        return self.engine_timed(lambda: self.send(prompt_tokens, PREFILL_OUTPUT_TOKENS, text), PREFILL_HISTOGRAM)

    def engine_timed(self, send: Callable[[], Measured], *histograms: str) -> tuple[Measured, float | None]:
        """A lone request (``send``) and the server's own time for it in ``histograms`` (summed; None where
        the server lacks one): the difference of their sums around it, once their count moved by one."""
        before = self.histogram_clock(*histograms)
        measured = send()
        if before is None:
            return measured, None
        deadline = time.monotonic() + METRICS_SETTLE_S
        while ((after := self.histogram_clock(*histograms)) is not None and after[1] == before[1]
               and time.monotonic() < deadline):
            time.sleep(0.01)
        if after is None or after[1] != before[1] + 1:
            return measured, None
        return measured, after[0] - before[0]

    def group(self, count: int, prompt_tokens: int, output_tokens: int) -> list[Measured]:
        """``count`` requests sent at once from threads (a barrier releases them together)."""
        barrier = threading.Barrier(count)
        results: list[Measured | BaseException | None] = [None] * count

        def one(index: int) -> None:
            try:
                barrier.wait()
                results[index] = self.send(prompt_tokens, output_tokens)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
                results[index] = exc

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.trust_env = False
        return session

    def _redact(self, text: str) -> str:
        return redact(text, (self._target.api_key,) if self._target.api_key else ())

    def _error(self, what: str) -> AgentperfError:
        return AgentperfError(f"{redact(self._url)} {what}: calibrate needs an idle OpenAI-compatible streaming "
                              "server; see its log and run calibrate again")


def fresh_text(prompt_tokens: int) -> str:
    """Filler text of ``prompt_tokens`` behind a random nonce, so its first block is nobody's prefix."""
    nonce = secrets.token_hex(8)
    return f"probe {nonce}\n" + filler(max(1, prompt_tokens - 4), nonce)


def prefill_steps(new_tokens: int, cached_tokens: int, budget_tokens: int) -> tuple[StepWork, ...]:
    """The steps that prefill ``new_tokens`` after ``cached_tokens`` in chunks of at most ``budget_tokens``."""
    steps, done = [], cached_tokens
    while done < cached_tokens + new_tokens:
        chunk = min(budget_tokens, cached_tokens + new_tokens - done)
        steps.append(StepWork(chunk, done, attention_pairs(chunk, done)))
        done += chunk
    return tuple(steps)


def decode_observation(streams: Sequence[Measured], label: str) -> Observation | None:
    """One decode step of the whole group: while every request of the group is decoding (after the last
    first token, before the first last token), each stream's mean gap between tokens, and the median of
    those; None if that window is too short. A mean over the window, not a median of gaps: a server (or
    client) that falls behind and catches up squeezes many gaps and stretches one, which a median of
    gaps would read as faster steps."""
    start_s = max(s.token_times[0] for s in streams)
    end_s = min(s.token_times[-1] for s in streams)
    means = []
    for stream in streams:
        inside = [t for t in stream.token_times if start_s <= t <= end_s]
        if len(inside) > MIN_DECODE_GAPS:
            means.append((inside[-1] - inside[0]) / (len(inside) - 1))
    if len(means) < len(streams):
        return None
    middle_s = (start_s + end_s) / 2
    context = sum(s.prompt_tokens + sum(1 for t in s.token_times if t <= middle_s) for s in streams)
    return Observation("itl", label, (StepWork(decode_batch=len(streams), decode_context_tokens=context),),
                       statistics.median(means))


def run_probe(client: ProbeClient, design: ProbeDesign, budget_tokens: int,
              progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> ProbeData:
    """Send the whole design; the observations for the fit, and whether the server caches prefixes."""
    for _ in range(design.warmup_requests):
        client.send(64, 4)
    observations, sizes, front_end = [], [], []
    for tokens in design.prefill_tokens:
        runs = [client.send_prefill(tokens) for _ in range(design.prefill_repeats)]
        sizes.append((runs[0][0].our_tokens, runs[0][0].prompt_tokens))
        if all(seconds is not None for _, seconds in runs):
            front_end.append((runs[0][0].prompt_tokens, statistics.median(m.ttft_s - s for m, s in runs)))
        found = _prefill_observation(runs, 0, budget_tokens, "cold prefill")
        observations.append(found)
        progress(f"agentperf calibrate: {found.label}: {found.measured_s * 1e3:.1f} ms "
                 f"({'engine clock' if found.kind == 'prefill' else 'TTFT'})")
    for context in design.decode_contexts:
        for batch in design.decode_batches:
            streams = client.group(batch, context, design.decode_output_tokens)
            found = decode_observation(streams, f"decode {batch} x {streams[0].prompt_tokens}")
            if found is None:
                progress(f"agentperf calibrate: {batch} decodes at {context} tokens: no all-decoding window, skipped")
                continue
            observations.append(found)
            progress(f"agentperf calibrate: {batch} concurrent decodes at {streams[0].prompt_tokens} tokens: "
                     f"{found.measured_s * 1e3:.2f} ms per step")
    caching, pair = _prefix_pair(client, design.prefix_tokens, budget_tokens)
    observations += pair
    progress(f"agentperf calibrate: shared-prefix pair of {design.prefix_tokens} tokens: prefix caching {caching}")
    agent_points, note = agent_front_end(client, design.agent_tokens, progress)
    scale = token_scale(sizes)
    if scale != 1.0:
        progress(f"agentperf calibrate: the server counts {scale:.3f} tokens per agentperf token; the profile is "
                 "priced in agentperf's tokens, as the simulator counts them")
    return ProbeData(tuple(observations), caching, scale, tuple(front_end), agent_points, note)


def agent_conversation(prompt_tokens: int, nonce: str) -> list[dict]:
    """A coding agent's conversation of about ``prompt_tokens`` (agentperf's count, tools aside): a system
    prompt, then user and assistant messages in turn, ending on a user message; ``nonce`` makes it fresh."""
    count = max(2, round(prompt_tokens / AGENT_TURN_TOKENS))
    size = max(8, prompt_tokens // count)
    messages = [{"role": "system", "content": f"agent {nonce}\n" + filler(size, nonce)}]
    for index in range(1, count):
        role = "user" if (count - index) % 2 == 1 else "assistant"
        messages.append({"role": role, "content": filler(size, f"{nonce}-{index}")})
    return messages


def agent_front_end(client: ProbeClient, lengths: Sequence[int],
                    progress: Callable[[str], None]) -> tuple[tuple[tuple[int, float], ...], str]:
    """Agent-shaped requests, each conversation three times (cold, then prefix-cache hits, as most agent turns
    are; the front end's work is the same for both); for each, (the server's
    prompt tokens, client TTFT minus the server's queue and prefill time). Without the coding tools where
    the server refuses tools; no points (and why) where it lacks the histograms."""
    if not lengths:
        return (), "the probe design sends no agent-shaped requests"
    tools: Sequence[dict] = CODING_TOOLS
    note = ""
    points = []
    for tokens in lengths:
        messages = agent_conversation(tokens, secrets.token_hex(8))
        for turn in ("cold", "cached", "cached again"):
            try:
                measured, engine_s = client.engine_timed(
                    lambda: client.send_messages(messages, tools, PREFILL_OUTPUT_TOKENS), QUEUE_HISTOGRAM, PREFILL_HISTOGRAM)
            except AgentperfError:
                if not tools:
                    raise
                tools, note = (), "the server refused requests with tools (no tool calling): agent probes sent without them"
                progress(f"agentperf calibrate: {note}")
                measured, engine_s = client.engine_timed(
                    lambda: client.send_messages(messages, tools, PREFILL_OUTPUT_TOKENS), QUEUE_HISTOGRAM, PREFILL_HISTOGRAM)
            if engine_s is None:
                why = (f"the server exposes no {QUEUE_HISTOGRAM} and {PREFILL_HISTOGRAM}: the front-end cost cannot be "
                       "told from the engine's and stays 0 in the profile")
                progress(f"agentperf calibrate: {why}")
                return (), why
            points.append((measured.prompt_tokens, measured.ttft_s - engine_s))
            progress(f"agentperf calibrate: agent request of {measured.prompt_tokens} tokens ({turn}): front end "
                     f"{(measured.ttft_s - engine_s) * 1e3:.1f} ms")
    return tuple(points), note


def _prefix_pair(client: ProbeClient, tokens: int, budget_tokens: int) -> tuple[str, list[Observation]]:
    """The same prompt twice: is the second a prefix-cache hit? Both prefills are observations where known."""
    text = fresh_text(tokens)
    first = client.send_prefill(tokens, text)
    second = client.send_prefill(tokens, text)
    found = [_prefill_observation([first], 0, budget_tokens, "cold prefill (pair)")]
    cached = second[0].cached_tokens
    if cached is None:
        return ("on" if second[0].ttft_s < 0.5 * first[0].ttft_s else "off") + " (by TTFT, no cached_tokens)", found
    if second[0].prompt_tokens > cached:
        found.append(_prefill_observation([second], cached, budget_tokens, f"prefill after {cached} cached"))
    return ("on" if cached > 0 else "off"), found


def _prefill_observation(runs: Sequence[tuple[Measured, float | None]], cached_tokens: int, budget_tokens: int,
                         what: str) -> Observation:
    """The median of lone prefills of one prompt length: on the engine's clock where every run has it (no
    request latency in it), else the client's TTFT."""
    prompt = runs[0][0].prompt_tokens
    engine = [seconds for _, seconds in runs]
    kind, values = ("prefill", engine) if all(s is not None for s in engine) else ("ttft", [m.ttft_s for m, _ in runs])
    return Observation(kind, f"{what} of {prompt - cached_tokens} tokens",
                       prefill_steps(prompt - cached_tokens, cached_tokens, budget_tokens), statistics.median(values))

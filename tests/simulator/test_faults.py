"""``agentperf simulate --fault``: what a raw HTTP client sees for each kind, determinism, counters, no leaks.

The client here is ``http.client`` on loopback, never agentperf's own, so these tests pin the bytes on
the wire that the harness's client tests are written against. Stall and drip are read for a bounded
time with short socket timeouts; the assertions are on what arrived, not on how long it took.
"""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from agentperf_users.simulator.faults import (
    ABSURD_COMPLETION_TOKENS,
    KINDS,
    TOKENS_BEFORE_FAULT,
    WRONG_SHAPES,
    FaultPlan,
    FaultSpec,
    parse_faults,
)
from agentperf_users.simulator.profile import SimulatorError, load_profile
from tests.simulator import requests_in_engine, scrape, simulator
from tests.simulator.test_cli import assert_one_line_error, simulate

MODEL = load_profile().model.name
ENVELOPE_KEYS = ("id", "object", "created", "model")


@dataclass
class Seen:
    """What the client got: status and headers (``None`` when no response came), the de-chunked body bytes,
    and how reading ended: ``complete`` (the last chunk), ``reset`` (ECONNRESET), ``eof`` (a FIN mid-body),
    ``timeout`` (nothing more within the socket timeout), ``stopped`` (the test stopped reading)."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    ending: str
    conn: http.client.HTTPConnection = field(repr=False)

    @property
    def events(self) -> list[bytes]:
        return [event for event in self.body.split(b"\n\n") if event]

    def chunks(self) -> list:
        """Each event's JSON (``"[DONE]"`` as is); an event that is not JSON raises."""
        return [event[6:].decode() if event == b"data: [DONE]" else json.loads(event.removeprefix(b"data: "))
                for event in self.events]

    @property
    def tokens(self) -> int:
        """Token chunks: one choice whose delta has content."""
        return sum(1 for c in self.parsable() if isinstance(c, dict) and isinstance(c.get("choices"), list)
                   and len(c["choices"]) == 1 and isinstance(c["choices"][0], dict)
                   and isinstance(c["choices"][0].get("delta"), dict) and isinstance(c["choices"][0]["delta"].get("content"), str))

    def parsable(self) -> list:
        out = []
        for event in self.events:
            try:
                out.append(json.loads(event.removeprefix(b"data: ")))
            except ValueError:
                pass
        return out

    @property
    def usage(self) -> dict | None:
        """The last event's ``usage`` that has one (a wrong-shape event may carry a bogus one before it)."""
        usages = [c["usage"] for c in self.parsable() if isinstance(c, dict) and c.get("usage")]
        return usages[-1] if usages else None

    @property
    def done(self) -> bool:
        return b"data: [DONE]" in self.events


def chat(max_tokens: int = 6, stream: bool = True) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Fix the failing test in util.py."}],
            "stream": stream, "max_tokens": max_tokens, "ignore_eos": True, "stream_options": {"include_usage": True}}


def exchange(sim, body: dict, timeout_s: float = 10.0, read_for_s: float | None = None) -> Seen:
    """POST ``body`` and read what comes, until the response ends, breaks, times out or ``read_for_s`` passed.

    The connection is left open (a stalled stream must stay open while the test looks at the engine).
    """
    host, port = sim.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    try:
        response = conn.getresponse()
    except ConnectionResetError as exc:
        return Seen(None, {}, b"", "reset" if type(exc) is ConnectionResetError else "eof", conn)
    headers = {name.lower(): value for name, value in response.getheaders()}
    data, ending = bytearray(), "complete"
    stop_at = time.monotonic() + read_for_s if read_for_s is not None else None
    try:
        while piece := response.read1(65536):
            data += piece
            if stop_at is not None and time.monotonic() >= stop_at:
                ending = "stopped"
                break
    except TimeoutError:
        ending = "timeout"
    except ConnectionResetError:
        ending = "reset"
    except http.client.IncompleteRead:
        ending = "eof"
    return Seen(response.status, headers, bytes(data), ending, conn)


def wait_until_engine_empty(sim, timeout_s: float = 10.0) -> int:
    """Poll the engine's running+waiting gauges until 0 or ``timeout_s``; returns the last count."""
    deadline = time.monotonic() + timeout_s
    while (left := requests_in_engine(sim.url)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def counted(sim) -> tuple[dict[str, float], float]:
    """``agentperf_sim_faults_total`` by kind, and ``vllm:request_success_total`` summed over reasons."""
    samples = scrape(sim.url)
    faults = {s.labels["kind"]: s.value for s in samples.get("agentperf_sim_faults_total", [])}
    return faults, sum(s.value for s in samples.get("vllm:request_success_total", []))


def generated_tokens(sim) -> float:
    return sum(s.value for s in scrape(sim.url)["vllm:generation_tokens_total"])


def run_faulted(kind: str, bodies: list[dict], *extra: str, **exchange_args) -> tuple[list[Seen], float]:
    """Send ``bodies`` in turn to a simulator with ``--fault KIND`` (every request faulted) and check the
    bookkeeping every kind shares: each request counted once under its kind, none as a success, and the
    engine empty afterwards (checked before the client closes, so a stalled stream is still open).
    Returns what the client saw and the tokens the engine generated."""
    with simulator("--fault", kind, *extra) as sim:
        seen = [exchange(sim, body, **exchange_args) for body in bodies]
        try:
            assert wait_until_engine_empty(sim) == 0
            faults, successes = counted(sim)
            assert faults == {kind: len(bodies)} and successes == 0
            return seen, generated_tokens(sim)
        finally:
            for s in seen:
                s.conn.close()


# --- answers before any stream -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, error_type, retry_after", [
    ("429", "RateLimitError", "7"), ("503", "InternalServerError", "7"), ("500", "InternalServerError", None),
])
def test_error_statuses_carry_an_openai_error_body_and_retry_after(kind, error_type, retry_after):
    seen, generated = run_faulted(kind, [chat(), chat(stream=False)], "--fault-retry-after", "7")
    assert generated == 0  # answered on arrival: the engine never saw them
    for s in seen:
        assert s.status == int(kind) and s.ending == "complete"
        assert s.headers.get("retry-after") == retry_after
        assert s.headers["content-type"] == "application/json"
        error = json.loads(s.body)["error"]
        assert error["type"] == error_type and error["code"] == int(kind) and "--fault" in error["message"]


def test_reset_before_headers_sends_no_byte_of_a_response():
    seen, generated = run_faulted("reset-before-headers", [chat(), chat(stream=False)])
    assert generated == 0
    assert [(s.status, s.body, s.ending) for s in seen] == [(None, b"", "reset")] * 2


# --- streams that break --------------------------------------------------------------------------------

def test_reset_mid_stream_cuts_after_two_tokens_with_an_rst():
    (seen,), generated = run_faulted("reset-mid-stream", [chat(max_tokens=5000)])
    assert seen.status == 200 and seen.ending == "reset"
    assert seen.tokens == TOKENS_BEFORE_FAULT == len(seen.events)
    assert seen.usage is None and not seen.done
    assert generated == TOKENS_BEFORE_FAULT  # aborted in the engine at the cut, not left to run to 5000


def test_stall_sends_two_tokens_then_nothing_on_an_open_connection():
    (seen,), generated = run_faulted("stall", [chat(max_tokens=5000)], timeout_s=1.0)
    assert seen.status == 200 and seen.ending == "timeout"  # neither the end nor a reset or close: silence
    assert seen.tokens == TOKENS_BEFORE_FAULT == len(seen.events)
    assert seen.usage is None and not seen.done
    assert generated == TOKENS_BEFORE_FAULT  # the engine freed it although the connection is still open


def test_drip_keeps_sending_slowly_and_still_ends_within_max_tokens():
    with simulator("--fault", "drip") as sim:
        long = exchange(sim, chat(max_tokens=40), timeout_s=5.0, read_for_s=2.5)
        try:
            assert long.status == 200 and long.ending == "stopped"  # still sending when the test stopped
            assert 1 <= long.tokens < 40 and not long.done and long.usage is None
            assert wait_until_engine_empty(sim) == 0  # the engine finished its 40 tokens long ago
        finally:
            long.conn.close()
        short = exchange(sim, chat(max_tokens=2), timeout_s=10.0)  # one held-back token: ends after one interval
        short.conn.close()
        assert short.ending == "complete" and short.done
        assert short.tokens == 2 and short.usage["completion_tokens"] == 2
        assert counted(sim) == ({"drip": 2}, 0)


def test_malformed_sse_is_one_unreadable_event_in_an_otherwise_whole_stream():
    (seen,), _ = run_faulted("malformed-sse", [chat(max_tokens=5)])
    assert seen.status == 200 and seen.ending == "complete" and seen.done
    bad = [i for i, event in enumerate(seen.events) if event not in (b"data: [DONE]",) and not _is_json(event)]
    assert bad == [TOKENS_BEFORE_FAULT]
    with pytest.raises(UnicodeDecodeError):
        seen.events[TOKENS_BEFORE_FAULT].decode()
    assert seen.tokens == 5 and seen.usage["completion_tokens"] == 5


def test_wrong_shape_json_cycles_through_the_documented_shapes():
    seen, _ = run_faulted("wrong-shape-json", [chat(max_tokens=4) for _ in WRONG_SHAPES])
    for i, s in enumerate(seen):
        assert s.status == 200 and s.ending == "complete" and s.done
        assert s.tokens == 4 and s.usage["completion_tokens"] == 4
        odd = json.loads(s.events[TOKENS_BEFORE_FAULT].removeprefix(b"data: "))
        if isinstance(odd, dict):
            assert odd["id"] == json.loads(s.events[0].removeprefix(b"data: "))["id"]
            odd = {k: v for k, v in odd.items() if k not in ENVELOPE_KEYS}
        assert odd == WRONG_SHAPES[i]


def test_absurd_usage_claims_far_more_tokens_than_were_streamed():
    body = {**chat(max_tokens=5), "stream_options": {"include_usage": False}}  # sent even when not asked for
    (seen,), _ = run_faulted("absurd-usage", [body])
    assert seen.ending == "complete" and seen.done and seen.tokens == 5
    usage = seen.usage
    assert usage["completion_tokens"] == ABSURD_COMPLETION_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + ABSURD_COMPLETION_TOKENS


def test_missing_usage_ends_with_done_but_no_usage_chunk():
    (seen,), _ = run_faulted("missing-usage", [chat(max_tokens=5)])
    assert seen.ending == "complete" and seen.tokens == 5 and seen.usage is None
    assert seen.events[-1] == b"data: [DONE]"


def test_missing_done_ends_the_response_cleanly_after_the_usage_chunk():
    (seen,), _ = run_faulted("missing-done", [chat(max_tokens=5)])
    assert seen.ending == "complete" and not seen.done  # HTTP's last chunk came, [DONE] did not
    assert seen.tokens == 5 and seen.usage["completion_tokens"] == 5
    assert json.loads(seen.events[-1].removeprefix(b"data: "))["usage"] == seen.usage


def test_a_whole_response_is_answered_normally_for_stream_kinds():
    with simulator("--fault", "stall") as sim:
        seen = exchange(sim, chat(max_tokens=3, stream=False))
        seen.conn.close()
        assert seen.status == 200 and json.loads(seen.body)["usage"]["completion_tokens"] == 3
        assert counted(sim) == ({"stall": 0}, 1)


def _is_json(event: bytes) -> bool:
    try:
        json.loads(event.removeprefix(b"data: "))
    except ValueError:
        return False
    return True


# --- which request gets which fault -------------------------------------------------------------------------

MIX = ("429:0.25", "reset-before-headers:0.2", "missing-usage:0.25")


def outcome(seen: Seen) -> str | None:
    """The fault a request of the mix got, from the client's side alone (``None``: a normal answer)."""
    if seen.status is None:
        return "reset-before-headers"
    if seen.status != 200:
        return str(seen.status)
    assert seen.done and seen.tokens == 3
    return None if seen.usage else "missing-usage"


def outcomes(seed: int, count: int = 16) -> tuple[list[str | None], tuple[dict[str, float], float]]:
    args = [arg for fault in MIX for arg in ("--fault", fault)]
    with simulator(*args, "--seed", str(seed)) as sim:
        assert counted(sim) == ({"429": 0, "reset-before-headers": 0, "missing-usage": 0}, 0)  # exported at 0
        seen = [exchange(sim, chat(max_tokens=3)) for _ in range(count)]
        for s in seen:
            s.conn.close()
        assert wait_until_engine_empty(sim) == 0
        return [outcome(s) for s in seen], counted(sim)


def test_faults_follow_the_seed_and_arrival_order_and_are_counted_by_kind():
    first, counts = outcomes(seed=7)
    plan = FaultPlan(parse_faults(MIX), seed=7)
    expected = [fault.kind if (fault := plan.draw()) else None for _ in first]
    assert first == expected
    assert len(set(first)) == 4  # every kind of the mix and normal answers occur in these 16
    assert outcomes(seed=7)[0] == first
    assert outcomes(seed=8)[0] != first
    faults, successes = counts
    tally = Counter(first)
    assert faults == {kind: tally[kind] for kind in ("429", "reset-before-headers", "missing-usage")}
    assert successes == tally[None]


# --- parsing and combining ----------------------------------------------------------------------------------

def test_rates_are_shares_and_unrated_kinds_split_what_is_left():
    assert parse_faults(["stall"]) == (FaultSpec("stall", 1.0),)
    assert parse_faults(["500", "429"]) == (FaultSpec("429", 0.5), FaultSpec("500", 0.5))  # KINDS order
    specs = parse_faults(["drip", "429:0.1", "500"])
    assert [s.kind for s in specs] == ["429", "500", "drip"]
    assert [s.rate for s in specs] == pytest.approx([0.1, 0.45, 0.45])
    plan = FaultPlan(parse_faults(["429:0.1", "500:0.3"]), seed=1)
    tally = Counter(f.kind if (f := plan.draw()) else None for _ in range(20_000))
    assert tally["429"] / 20_000 == pytest.approx(0.1, abs=0.01)
    assert tally["500"] / 20_000 == pytest.approx(0.3, abs=0.01)
    assert tally[None] / 20_000 == pytest.approx(0.6, abs=0.01)


def test_the_command_line_order_of_kinds_does_not_matter():
    draws = []
    for values in (["429:0.3", "stall:0.3"], ["stall:0.3", "429:0.3"]):
        plan = FaultPlan(parse_faults(values), seed=5)
        draws.append([plan.draw() for _ in range(50)])
    assert draws[0] == draws[1]


@pytest.mark.parametrize("values, fragment", [
    (["bogus"], "unknown kind 'bogus'"),
    (["429:0"], "rate '0'"),
    (["429:1.5"], "rate '1.5'"),
    (["429:nan"], "rate 'nan'"),
    (["429:"], "rate ''"),
    (["stall", "stall:0.5"], "given twice"),
    (["429:0.7", "500:0.6"], "add up to 1.3"),
    (["429:1", "drip"], "no share for drip"),
])
def test_bad_fault_values_are_one_line_naming_the_option_and_the_kinds(values, fragment):
    args = [arg for value in values for arg in ("--fault", value)]
    result = simulate(*args, "--port", "0")
    assert result.returncode == 2
    assert_one_line_error(result, "--fault", fragment, ", ".join(KINDS))
    with pytest.raises(SimulatorError):
        parse_faults(values)


def test_bad_retry_after_is_one_line():
    result = simulate("--fault", "429", "--fault-retry-after", "-1", "--port", "0")
    assert result.returncode == 2
    assert_one_line_error(result, "--fault-retry-after", "-1")

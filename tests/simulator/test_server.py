"""The simulator's HTTP API against real clients (the official OpenAI SDK, raw HTTP) on loopback.

Each server is a child process (:func:`tests.simulator.simulator`), so Locust's gevent monkey-patching
of the test process, once any test imports locust, cannot reach the server's event loop.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time

import openai
import pytest
from openai import OpenAI

from agentperf_users.simulator.profile import load_profile
from agentperf_users.simulator.server import API_KEY_ENV
from agentperf_users.tokens import (
    BLOCK_SIZE,
    PromptEncoder,
    count_prompt_tokens,
    count_tokens,
)
from tests.simulator import requests_in_engine, simulator, write_profile

PROFILE = load_profile()
MODEL = PROFILE.model.name
TOOLS = [{"type": "function", "function": {"name": "bash", "description": "run a command",
                                            "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}]


def conversation(user_text: str, system_words: int = 400) -> list[dict]:
    system = "You are a coding agent working in a large repository. " + " ".join(f"rule{i}" for i in range(system_words))
    return [{"role": "system", "content": system}, {"role": "user", "content": user_text}]


@pytest.fixture(scope="module")
def sim():
    with simulator("--served-model-name", MODEL, "alias-8b") as server:
        yield server


@pytest.fixture
def client(sim):
    with OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0, timeout=30) as sdk:
        yield sdk


def raw_request(sim, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = sim.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def test_streamed_completion_with_ignore_eos_has_exact_length_and_usage(client):
    messages = conversation("Fix the failing test.")
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, max_completion_tokens=25,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == 25  # one delta per output token
    assert token_chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in token_chunks] == [None] * 24 + ["length"]
    assert all(c.usage is None for c in token_chunks)
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage.completion_tokens == 25
    assert usage.prompt_tokens == count_prompt_tokens(messages)
    assert usage.total_tokens == usage.prompt_tokens + 25
    text = "".join(c.choices[0].delta.content for c in token_chunks)
    assert count_tokens(text) == 25
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == MODEL


def test_whole_completion_and_sampled_length(client):
    messages = conversation("Explain the bug.")
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, extra_body={"ignore_eos": True})
    assert whole.object == "chat.completion"
    assert whole.usage.completion_tokens == 40 == count_tokens(whole.choices[0].message.content)
    assert whole.choices[0].finish_reason == "length"
    lengths = []
    for _ in range(4):  # without ignore_eos the engine samples a length up to the limit
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=30)
        lengths.append(reply.usage.completion_tokens)
        assert count_tokens(reply.choices[0].message.content) == reply.usage.completion_tokens
        assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == 30 else "stop")
    assert all(1 <= n <= 30 for n in lengths)


def test_shared_prefix_is_reported_as_cached_tokens(client):
    first, second = conversation("Read main.py", 900), conversation("Now read util.py instead", 900)
    encoder = PromptEncoder()
    a, b = encoder.encode(first), encoder.encode(second)
    shared_blocks = next(i for i, (x, y) in enumerate(zip(a.block_hashes, b.block_hashes)) if x != y)
    assert shared_blocks > 10
    client.chat.completions.create(model=MODEL, messages=first, max_tokens=2)
    reply = client.chat.completions.create(model=MODEL, messages=second, max_tokens=2)
    assert reply.usage.prompt_tokens_details.cached_tokens >= shared_blocks * BLOCK_SIZE
    assert reply.usage.prompt_tokens_details.cached_tokens < reply.usage.prompt_tokens


def test_tool_call_and_reasoning_deltas_parse_in_the_sdk(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=conversation("List the files."), tools=TOOLS, tool_choice="required", stream=True,
        max_completion_tokens=16, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "agentperf_reasoning_share": 0.25})
    reasoning, calls, finish, usage = "", [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        assert extra.get("reasoning_content") == extra.get("reasoning")
        reasoning += extra.get("reasoning_content") or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert count_tokens(reasoning) == 4  # the leading quarter of 16 tokens
    assert calls[0].id and calls[0].function.name == "bash" and calls[0].function.arguments == ""
    assert len(calls) == 12  # header + 11 argument fragments: one delta per token
    arguments = json.loads("".join(c.function.arguments or "" for c in calls))
    assert isinstance(arguments["command"], str)
    assert finish == "tool_calls"
    assert usage.completion_tokens == 16 and usage.completion_tokens_details.reasoning_tokens == 4

    whole = client.chat.completions.create(model=MODEL, messages=conversation("Again."), tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "bash"}},
                                           max_completion_tokens=8, extra_body={"ignore_eos": True})
    call = whole.choices[0].message.tool_calls[0]
    assert call.function.name == "bash" and "command" in json.loads(call.function.arguments)
    assert whole.choices[0].message.content is None and whole.choices[0].finish_reason == "tool_calls"


def test_timing_report_gives_intended_and_send_times(client):
    before = time.monotonic()
    stream = client.chat.completions.create(
        model=MODEL, messages=conversation("Time me."), stream=True, max_completion_tokens=10,
        extra_body={"ignore_eos": True, "agentperf_timing": True})
    chunks = list(stream)
    timing = chunks[-1].usage.model_extra["agentperf_timing"]
    intended, sent = timing["token_times"], timing["send_times"]
    assert before <= timing["arrival"] < intended[0] < time.monotonic()
    assert len(intended) == len(sent) == 10
    assert intended == sorted(intended) and sent == sorted(sent)
    assert all(s >= t for t, s in zip(intended, sent))  # never written before the engine made it
    steps = [b - a for a, b in zip(intended, intended[1:])]
    assert min(steps) >= PROFILE.decode_step_s(1, 0) * 0.9  # paced by the engine's step time


def test_raw_wire_format_is_chunked_sse_ending_in_done(sim):
    body = json.dumps({"model": MODEL, "messages": conversation("hi"), "stream": True, "max_tokens": 3,
                       "ignore_eos": True}).encode()
    conn, response = raw_request(sim, "POST", "/v1/chat/completions", body)
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    assert response.getheader("Transfer-Encoding") == "chunked"
    events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert len(chunks) == 3  # no usage chunk unless asked for
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    # keep-alive: the same connection serves the next request
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


def test_models_and_health(sim, client):
    assert [m.id for m in client.models.list()] == [MODEL, "alias-8b"]
    reply = client.chat.completions.create(model="alias-8b", messages=conversation("x"), max_tokens=1)
    assert reply.model == "alias-8b"
    _, response = raw_request(sim, "GET", "/health")
    assert response.status == 200


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (json.dumps({"model": MODEL, "messages": []}).encode(), "messages"),
    (json.dumps({"model": MODEL, "messages": [{"content": "no role"}]}).encode(), "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(),
     "max_tokens"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": "9"}).encode(),
     "max_completion_tokens"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}).encode(),
     "tools"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                 "tool_choice": {"type": "function", "function": {"name": "undefined_tool"}}}).encode(), "tool_choice"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}).encode(), "stream"),
])
def test_malformed_requests_get_400_in_openai_shape(sim, body, param):
    _, response = raw_request(sim, "POST", "/v1/chat/completions", body)
    error = json.loads(response.read())["error"]
    assert response.status == 400
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["param"] == param
    assert error["message"]


def test_context_overflow_and_unknown_model(client):
    context = PROFILE.model.max_context_tokens
    messages = conversation("too long")
    prompt = count_prompt_tokens(messages)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=context)
    message = exc.value.body["message"]
    assert str(context) in message and str(prompt) in message and str(prompt + context) in message
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-nonexistent", messages=messages, max_tokens=1)
    assert exc.value.body["param"] == "model" and "gpt-nonexistent" in exc.value.body["message"]


def test_full_waiting_queue_answers_429(tmp_path):
    profile = write_profile(tmp_path, {"engine.max_num_seqs": 1, "engine.max_waiting_requests": 1})
    with simulator("--profile", str(profile)) as sim, OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0) as sdk:
        streams = []
        for text in ("one", "two"):  # the first runs, the second waits
            streams.append(sdk.chat.completions.create(model=MODEL, messages=conversation(text), stream=True,
                                                       max_completion_tokens=2000, extra_body={"ignore_eos": True}))
        with pytest.raises(openai.RateLimitError) as exc:
            sdk.chat.completions.create(model=MODEL, messages=conversation("three"), max_tokens=1)
        assert exc.value.status_code == 429 and exc.value.body["type"] == "RateLimitError"
        for stream in streams:
            stream.close()


def test_api_key_is_required_when_set():
    key = "sk-test-secret-123"
    with simulator(env={**os.environ, API_KEY_ENV: key}) as sim:
        with OpenAI(base_url=sim.url + "/v1", api_key="wrong", max_retries=0) as sdk:
            with pytest.raises(openai.AuthenticationError) as exc:
                sdk.chat.completions.create(model=MODEL, messages=conversation("x"), max_tokens=1)
            assert key not in json.dumps(exc.value.body)
        with OpenAI(base_url=sim.url + "/v1", api_key=key, max_retries=0) as sdk:
            assert sdk.chat.completions.create(model=MODEL, messages=conversation("x"), max_tokens=1).usage
        _, response = raw_request(sim, "GET", "/metrics")  # like vLLM, only /v1 routes need the key
        assert response.status == 200


def test_shutdown_mid_stream_sends_in_band_error_then_done():
    sim = simulator().__enter__()
    body = json.dumps({"model": MODEL, "messages": conversation("long"), "stream": True, "max_tokens": 5000,
                       "ignore_eos": True}).encode()
    conn, response = raw_request(sim, "POST", "/v1/chat/completions", body)
    assert response.status == 200
    first = response.fp.readline()  # the first chunk-size line: streaming has begun
    assert first.strip()
    sim.stop()  # SIGTERM
    events = (first + response.fp.read()).decode()
    assert '"error": {"message": "the simulator is shutting down"' in events
    assert events.rstrip().endswith("0")  # terminating chunk after the error and [DONE]
    assert "data: [DONE]" in events
    conn.close()


def test_client_disconnect_aborts_the_engine_request(sim):
    body = json.dumps({"model": MODEL, "messages": conversation("abandon me"), "stream": True, "max_tokens": 5000,
                       "ignore_eos": True}).encode()
    conn, response = raw_request(sim, "POST", "/v1/chat/completions", body)
    response.fp.readline()
    assert requests_in_engine(sim.url) > 0
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 5
    while requests_in_engine(sim.url) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert requests_in_engine(sim.url) == 0


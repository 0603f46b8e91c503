"""The qualification probe against the embedded simulator and against small servers that answer as
vLLM without tool calling, the OpenAI API (no ``ignore_eos``), a wrong key, a web server, a silent
server or a server with a small context would: each ends in one line that names the cause and the fix,
and never shows the API key.

The small servers are this file run as a script in a subprocess (as in tests/test_client.py: once
locust is imported, a server thread here would be a greenlet). One server plays every scenario: the
first path segment of the ``--host`` given to the probe says what it does, e.g.
``http://127.0.0.1:PORT/tools=reject,len=32768`` (the probe asks ``.../tools=reject,len=32768/v1/models``).
Whatever the scenario, it answers 400 to a chat request that is not of the run's shape (streaming,
``stream_options.include_usage``, both token limits equal), so every probe that qualifies here sent one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agentperf_users.tokens import count_prompt_tokens

MODEL = "served/model-a"
OTHER_MODEL = "served/model-b"
CANARY_KEY = "sk-Zq7xW9vK3pJ2mT8rCanary"
VLLM_TOOLS_MESSAGE = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
OPENAI_IGNORE_EOS_MESSAGE = "Unrecognized request argument supplied: ignore_eos"
SILENT_S = 5.0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _scenario(self) -> tuple[dict[str, str], str]:
        first, _, rest = self.path.lstrip("/").partition("/")
        return dict(item.split("=", 1) for item in first.split(",") if "=" in item), "/" + rest

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, param: str | None = None) -> None:
        kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}.get(status, "Error")
        self._send(status, json.dumps({"error": {"message": message, "type": kind, "param": param,
                                                 "code": status}}).encode())

    def _refuses(self, scenario: dict[str, str]) -> bool:
        """The scenarios that answer every route alike."""
        if "silent" in scenario:
            time.sleep(float(scenario["silent"]))
            self.close_connection = True
            return True
        if scenario.get("auth") == "echo":  # a server that quotes the credentials it refused
            self._error(401, f"Incorrect API key provided: {self.headers.get('Authorization')}")
            return True
        if scenario.get("web") == "html":
            self._send(404, b"<html><body><h1>Not Found</h1></body></html>", "text/html; charset=utf-8")
            return True
        return False

    def do_GET(self) -> None:
        scenario, route = self._scenario()
        if self._refuses(scenario):
            return
        if route != "/v1/models":
            return self._error(404, f"{route} not found")
        entries = [{"id": MODEL, "object": "model"}, {"id": OTHER_MODEL, "object": "model"}]
        if "len" in scenario:  # vLLM's extension; the OpenAI API and others do not say
            for entry in entries:
                entry["max_model_len"] = int(scenario["len"])
        listing = {"status": "ok", "models": 2} if scenario.get("models") == "other" else {"object": "list", "data": entries}
        self._send(200, json.dumps(listing).encode())

    def do_POST(self) -> None:
        scenario, route = self._scenario()
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if self._refuses(scenario):
            return
        if route != "/v1/chat/completions":
            return self._error(404, f"{route} not found")
        limit = body.get("max_completion_tokens")
        if (body.get("stream") is not True or body.get("stream_options") != {"include_usage": True}
                or not isinstance(limit, int) or body.get("max_tokens") != limit):
            return self._error(400, f"not the run's shape: {sorted(body)}")
        if body.get("model") not in (MODEL, OTHER_MODEL):
            return self._error(404, f"The model `{body.get('model')}` does not exist.", "model")
        if "tools" in body and scenario.get("tools") == "reject":
            return self._error(400, VLLM_TOOLS_MESSAGE)
        if "ignore_eos" in body and scenario.get("ignore_eos") == "reject":
            return self._error(400, OPENAI_IGNORE_EOS_MESSAGE)
        if scenario.get("stream_options") == "reject":
            return self._error(400, "1 validation error: stream_options: Extra inputs are not permitted")
        if scenario.get("odd") == "422":  # another framework's shape and words, quoting the key
            return self._send(422, json.dumps({"detail": f"cannot process this with {self.headers.get('Authorization')}"
                                                         " today"}).encode())
        prompt = self._prompt_tokens(body, scenario)
        if prompt + limit > int(scenario.get("context", 10**9)):  # vLLM >= 0.16's words
            return self._error(400, f"You passed {prompt} input tokens and requested {limit} output tokens. However, "
                                    f"the model's context length is only {scenario['context']} tokens.", "input_tokens")
        if scenario.get("stream") == "json":
            return self._send(200, json.dumps({"choices": [{"message": {"content": "hi"}}]}).encode())
        self._stream(prompt, scenario, limit)

    @staticmethod
    def _prompt_tokens(body: dict, scenario: dict[str, str]) -> int:
        """As a server with another tokenizer (``ratio``) and a chat template's preamble (``overhead``) counts."""
        return round(count_prompt_tokens(body["messages"], body.get("tools")) * float(scenario.get("ratio", 1.0))
                     + int(scenario.get("overhead", 0)))

    def _stream(self, prompt: int, scenario: dict[str, str], limit: int) -> None:
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
        chunks += [{"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]} for i in range(limit)]
        if scenario.get("chunks") == "wrong":
            chunks.insert(1, {"choices": 5})
        if scenario.get("usage") != "none":
            completion = 100_000 if scenario.get("usage") == "absurd" else limit
            chunks.append({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                    "total_tokens": prompt + completion}})
        payload = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
        if scenario.get("done") != "none":
            payload += b"data: [DONE]\n\n"
        self._send(200, payload, "text/event-stream")


def serve() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    serve()
    sys.exit(0)

# ---- tests ----

import os  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.request import urlopen  # noqa: E402

from agentperf_users.errors import AgentperfError  # noqa: E402
from agentperf_users.loadgen.probe import (  # noqa: E402
    CONTEXT_MARGIN,
    CONTEXT_MARGIN_UNMEASURED,
    NAMESPACE_ALLOWANCE_TOKENS,
    ProbeTarget,
    qualify,
)
from agentperf_users.loadgen.replay import ReplaySettings  # noqa: E402
from agentperf_users.measure.records import Status, read_records  # noqa: E402
from agentperf_users.simulator.profile import DEFAULT_PROFILE, load_profile  # noqa: E402
from agentperf_users.workload.readers import load_trajectories  # noqa: E402
from tests.simulator import simulator  # noqa: E402
from tests.support import free_port, wait_for  # noqa: E402

RUN_SHAPE = ReplaySettings()  # tools and ignore_eos on: what a run sends by default


@pytest.fixture(scope="module")
def server_url():
    process = subprocess.Popen([sys.executable, __file__], stdout=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


@pytest.fixture(scope="module")
def demo():
    return load_trajectories("demo")


def largest_turn(trajectories) -> tuple[str, int, int]:
    """(trajectory id, turn, prompt + output tokens) of the set's largest turn, by agentperf's count."""
    return max(((trajectories.trajectory_id(i), turn, shape.prompt_tokens + shape.output_tokens)
                for i in range(len(trajectories)) for turn, shape in enumerate(trajectories.shapes(i))),
               key=lambda entry: entry[2])


def largest_prompt_turn_as_counted(trajectories, ratio: float, overhead: int) -> int:
    """The largest turn's prompt + output as a server counts it whose tokenizer counts ``ratio`` times
    agentperf's and whose template adds ``overhead`` (a run's cache-namespace marker included)."""
    return max(round((shape.prompt_tokens + NAMESPACE_ALLOWANCE_TOKENS) * ratio + overhead) + shape.output_tokens
               for i in range(len(trajectories)) for shape in trajectories.shapes(i))


def assert_no_key(text: str) -> None:
    """Neither the key nor any 4-character slice of it (a partial echo) is in ``text``."""
    slices = {CANARY_KEY[i:i + 4] for i in range(len(CANARY_KEY) - 3)}
    assert not [s for s in slices if s in text], text


def refused(target: ProbeTarget, trajectories, settings: ReplaySettings = RUN_SHAPE) -> str:
    """The one line the probe stops with (the key absent from it)."""
    with pytest.raises(AgentperfError) as caught:
        qualify(target, trajectories, settings)
    line = str(caught.value)
    assert "\n" not in line and line.strip() == line
    assert_no_key(line)
    return line


def scenario(server_url: str, spec: str, **fields) -> ProbeTarget:
    return ProbeTarget(f"{server_url}/{spec}", api_key=CANARY_KEY, api_key_env="AGENTPERF_TEST_KEY", **fields)


# -- the embedded simulator --------------------------------------------------------------------------


def test_qualifies_against_the_simulator_and_learns_its_context(demo):
    """The simulator lists its model with vLLM's ``max_model_len`` (the profile's context), reports
    usage with cached tokens, and counts prompts as agentperf does (a tokenizer ratio of exactly 1)."""
    profile = load_profile(DEFAULT_PROFILE)
    with simulator() as sim:
        result = qualify(ProbeTarget(sim.url), demo, RUN_SHAPE)
    assert result.model == profile.model.name
    assert result.max_model_len == profile.model.max_context_tokens
    assert result.usage_reported and result.cached_tokens_reported
    assert result.token_scale.exact
    assert result.warnings == ()
    trajectory, turn, tokens = largest_turn(demo)
    assert (result.largest_turn.trajectory, result.largest_turn.turn) == (trajectory, turn)
    assert result.largest_turn.tokens == tokens + NAMESPACE_ALLOWANCE_TOKENS
    assert result.summary() == (f"agentperf: server qualified: model {profile.model.name}, max_model_len "
                                f"{profile.model.max_context_tokens}, usage reported, prefix-cache details reported")


def test_the_model_must_be_served_else_the_served_ones_are_listed(demo):
    with simulator("--served-model-name", "alpha", "beta") as sim:
        assert qualify(ProbeTarget(sim.url), demo, RUN_SHAPE).model == "alpha"  # none given: the first
        assert qualify(ProbeTarget(sim.url, model="beta"), demo, RUN_SHAPE).model == "beta"
        line = refused(ProbeTarget(sim.url, model="gamma"), demo)
    assert "--model 'gamma' is not served" in line and "'alpha', 'beta'" in line


def test_a_wrong_key_is_named_and_never_shown(demo):
    with simulator("--api-key", CANARY_KEY) as sim:
        assert qualify(ProbeTarget(sim.url, api_key=CANARY_KEY), demo, RUN_SHAPE).model
        wrong = refused(ProbeTarget(sim.url, api_key="sk-wrong-key-000000", api_key_env="MY_KEY"), demo)
        missing = refused(ProbeTarget(sim.url, api_key_env="MY_KEY"), demo)
    assert "refused the API key (HTTP 401" in wrong and "$MY_KEY" in wrong and "sk-wrong-key" not in wrong
    assert "no API key was sent: set it in $MY_KEY" in missing
    assert CANARY_KEY not in repr(ProbeTarget(sim.url, api_key=CANARY_KEY))


# -- servers that cannot take the run --------------------------------------------------------------------


def test_vllm_without_tool_calling_is_told_its_flags_or_no_tools(server_url, demo):
    line = refused(scenario(server_url, "tools=reject,len=32768"), demo)
    assert "HTTP 400" in line and VLLM_TOOLS_MESSAGE in line
    assert "--enable-auto-tool-choice --tool-call-parser" in line and "--no-tools" in line
    result = qualify(scenario(server_url, "tools=reject,len=32768"), demo, ReplaySettings(tools=False))
    assert result.model == MODEL and result.max_model_len == 32768  # the same server takes requests without tools


def test_a_server_without_ignore_eos_is_told_no_ignore_eos(server_url, demo):
    line = refused(scenario(server_url, "ignore_eos=reject"), demo)
    assert OPENAI_IGNORE_EOS_MESSAGE in line and "--no-ignore-eos" in line
    result = qualify(scenario(server_url, "ignore_eos=reject"), demo, ReplaySettings(ignore_eos=False))
    assert result.max_model_len is None and result.largest_turn is None  # no max_model_len: no context check
    assert "max_model_len not reported" in result.summary()


def test_a_server_rejecting_stream_options_says_so(server_url, demo):
    line = refused(scenario(server_url, "stream_options=reject"), demo)
    assert "stream_options" in line and "Extra inputs are not permitted" in line


def test_an_unfamiliar_rejection_is_quoted_redacted(server_url, demo):
    """A server that words its error otherwise (FastAPI's ``detail``, HTTP 422) and quotes the
    credentials: its message is shown with the key masked, and what agentperf sends is listed."""
    line = refused(scenario(server_url, "odd=422"), demo)
    assert "HTTP 422: cannot process this with *** today" in line
    assert "agentperf sends model, messages, stream" in line and "ignore_eos, tools" in line


def test_a_server_echoing_the_key_in_a_401_is_redacted(server_url, demo):
    line = refused(scenario(server_url, "auth=echo"), demo)
    assert "refused the API key (HTTP 401: Incorrect API key provided: ***)" in line
    assert "$AGENTPERF_TEST_KEY" in line


@pytest.mark.parametrize(("spec", "words"), [
    ("web=html", "answered HTTP 404 with an HTML page: --host must be an OpenAI-compatible server"),
    ("models=other", "answered a 200 response that is not an OpenAI model list"),
])
def test_a_server_that_is_not_openai_compatible_is_named(server_url, demo, spec, words):
    assert words in refused(scenario(server_url, spec), demo)


def test_a_closed_port_is_connection_refused(demo):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    line = refused(ProbeTarget(f"http://127.0.0.1:{port}", api_key=CANARY_KEY), demo)
    assert f"nothing accepts connections at http://127.0.0.1:{port}/v1/models (connection refused)" in line


def test_an_unresolvable_host_is_named_without_asking_a_resolver(demo, monkeypatch):
    def no_such_host(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    line = refused(ProbeTarget(f"http://user:{CANARY_KEY}@no-such-host.invalid:8000", api_key=CANARY_KEY), demo)
    assert line == "cannot resolve the host name of http://no-such-host.invalid:8000/v1/models: check --host"


def test_a_silent_server_times_out(server_url, demo):
    line = refused(scenario(server_url, f"silent={SILENT_S}", timeout_s=0.5), demo)
    assert "did not answer within 0.5 s" in line


def test_a_bad_host_is_named(demo):
    assert "expected a URL such as http://HOST:PORT" in refused(ProbeTarget("localhost:8000"), demo)


def test_a_response_that_is_not_a_stream_is_refused(server_url, demo):
    line = refused(scenario(server_url, "stream=json"), demo)
    assert "with application/json, not text/event-stream" in line


def test_a_stream_without_usage_is_a_warning(server_url, demo):
    result = qualify(scenario(server_url, "usage=none"), demo, RUN_SHAPE)
    assert not result.usage_reported and not result.cached_tokens_reported and result.token_scale is None
    (warning,) = result.warnings
    assert warning.startswith("agentperf: warning:") and "output tokens will be counted from chunks" in warning
    assert "no usage, no prefix-cache details" in result.summary()
    assert_no_key(result.summary() + "".join(result.warnings))


def test_a_stream_cut_before_done_without_usage_or_finish_is_refused(server_url, demo):
    """What the client would record as cut off (a disconnect) for every request; with the usage
    before the end, a missing [DONE] is complete, as the client takes it."""
    line = refused(scenario(server_url, "usage=none,done=none"), demo)
    assert "ended its stream before data: [DONE], with neither usage nor a finish_reason" in line
    assert qualify(scenario(server_url, "done=none"), demo, RUN_SHAPE).warnings == ()


def test_a_stream_of_the_wrong_shape_is_refused(server_url, demo):
    line = refused(scenario(server_url, "chunks=wrong"), demo)
    assert "a stream that is not OpenAI's chat-completion chunks" in line and "choices" in line


def test_usage_that_cannot_be_true_is_a_warning(server_url, demo):
    result = qualify(scenario(server_url, "usage=absurd"), demo, RUN_SHAPE)
    (warning,) = result.warnings
    assert "usage cannot be believed (usage.completion_tokens 100000 > the 4 requested)" in warning


# -- the context check -----------------------------------------------------------------------------------


def test_a_context_larger_than_max_model_len_is_refused(server_url, demo):
    trajectory, turn, tokens = largest_turn(demo)
    line = refused(scenario(server_url, "len=2048"), demo)
    assert line.startswith(f"trajectory {trajectory} turn {turn} needs ~{tokens + NAMESPACE_ALLOWANCE_TOKENS:,} tokens")
    assert "more than the server's max_model_len 2,048" in line
    assert "agentperf trajectories synth --max-context" in line and "--max-model-len" in line


def test_the_context_check_counts_as_the_server_counts(server_url, demo):
    """A server whose tokenizer counts 1.3x agentperf's and whose chat template adds 500 tokens to every
    request: the line through the two probes predicts its count of the largest turn (to the rounding of whole
    token counts), so a
    limit the set fits by agentperf's count but not by the server's is refused, one within the margin
    above the server's count is a warning, and one beyond it is clear. Without usage (no line) the wider
    margin applies to agentperf's own count."""
    _, _, tokens = largest_turn(demo)
    theirs = largest_prompt_turn_as_counted(demo, ratio=1.3, overhead=500)
    measured = qualify(scenario(server_url, "ratio=1.3,overhead=500,len=32768"), demo, RUN_SHAPE)
    assert measured.token_scale.slope == pytest.approx(1.3, abs=0.01)
    assert measured.largest_turn.tokens == pytest.approx(theirs, rel=0.003)  # whole-token counts: a slope to ~0.2 %
    line = refused(scenario(server_url, f"ratio=1.3,overhead=500,len={tokens + 100}"), demo)
    assert "counted as the server counts: 1.30 of its tokens per agentperf token" in line
    assert f"max_model_len {tokens + 100:,}" in line
    warned = qualify(scenario(server_url, f"ratio=1.3,overhead=500,len={int(theirs / (1 - CONTEXT_MARGIN / 2))}"),
                     demo, RUN_SHAPE)
    (warning,) = warned.warnings
    assert f"within {CONTEXT_MARGIN:.0%} of the server's max_model_len" in warning
    clear = qualify(scenario(server_url, f"ratio=1.3,overhead=500,len={int(theirs / (1 - CONTEXT_MARGIN)) + 10}"),
                    demo, RUN_SHAPE)
    assert clear.warnings == ()
    unmeasured = qualify(scenario(server_url, f"usage=none,len={int(tokens / (1 - CONTEXT_MARGIN))}"), demo, RUN_SHAPE)
    assert any(f"within {CONTEXT_MARGIN_UNMEASURED:.0%}" in w for w in unmeasured.warnings)


def test_a_set_of_one_turn_trajectories_is_measured_by_a_ratio(server_url, tmp_path):
    """No later turn to draw a line with: the first turn's count, through the origin."""
    path = tmp_path / "flat.yaml"
    path.write_text(json.dumps({"agentperf": 1, "name": "flat", "trajectories": [
        {"id": f"t{i}", "turns": [{"messages": [{"role": "user", "content_tokens": 300 + 100 * i}],
                                   "output_tokens": 50}]} for i in range(4)]}))
    flat = load_trajectories(str(path))
    result = qualify(scenario(server_url, "ratio=1.3,len=32768"), flat, RUN_SHAPE)
    assert result.token_scale.slope == pytest.approx(1.3, abs=0.01)
    assert result.largest_turn.trajectory == "t3"
    assert result.largest_turn.prompt_tokens == pytest.approx(1.3 * (flat.shapes(3)[0].prompt_tokens
                                                                     + NAMESPACE_ALLOWANCE_TOKENS), abs=2)


def test_a_context_rejected_by_a_server_that_does_not_list_it_is_named(server_url, demo):
    """A server that does not give max_model_len (no check before) but rejects the probe's turn."""
    line = refused(scenario(server_url, "context=2048"), demo)
    assert "the model's context length is only 2048 tokens" in line
    assert "longer than the server's context" in line and "--max-model-len" in line


def test_no_tools_takes_the_tool_definitions_off_the_context(server_url, demo):
    """With ``--no-tools`` the requests are smaller by the tools' tokens, and so is the largest turn."""
    with_tools = qualify(scenario(server_url, "len=32768"), demo, RUN_SHAPE).largest_turn
    without = qualify(scenario(server_url, "len=32768"), demo, ReplaySettings(tools=False)).largest_turn
    trajectory = next(demo.trajectory(i) for i in range(len(demo)) if demo.trajectory_id(i) == without.trajectory)
    turn = trajectory.turns[without.turn]
    assert without.prompt_tokens == count_prompt_tokens(turn.messages) + NAMESPACE_ALLOWANCE_TOKENS
    assert without.prompt_tokens < with_tools.prompt_tokens


# -- a plain Locust run probes at test start ---------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
AGENTS_LOCUSTFILE = str(REPO / "locustfiles" / "agents.py")
CAPACITY_LOCUSTFILE = str(REPO / "locustfiles" / "capacity.py")
LOCUST_TIMEOUT_S = 120


def plain_locust(tmp_path, host: str, *args: str, locustfile: str = AGENTS_LOCUSTFILE) -> tuple[int, str, list]:
    """A headless ``locust -f locustfiles/agents.py`` (two agents, a run time far longer than a probe) against
    ``host``: (exit code, its output, its records)."""
    tmp_path.mkdir(exist_ok=True)
    completed = subprocess.run(
        [sys.executable, "-m", "locust", "-f", locustfile, "--host", host, "--headless", "-u", "2", "-r", "10",
         "-t", "60s", "--stop-timeout", "0", "--trajectories", "demo", "--records-dir", str(tmp_path / "records"),
         "--api-key-env", "AGENTPERF_TEST_KEY", *args],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "AGENTPERF_TEST_KEY": CANARY_KEY},
        capture_output=True, text=True, timeout=LOCUST_TIMEOUT_S)
    output = completed.stdout + completed.stderr
    assert_no_key(output)
    records = tmp_path / "records"  # made when the first record is written
    return completed.returncode, output, read_records([records]) if records.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize(("locustfile", "processes"), [
    (AGENTS_LOCUSTFILE, []), (AGENTS_LOCUSTFILE, ["--processes", "1"]), (CAPACITY_LOCUSTFILE, [])],
    ids=["local", "master-and-worker", "capacity-search"])
def test_a_plain_locust_run_against_a_server_rejecting_tools_stops_at_its_start(server_url, tmp_path, locustfile,
                                                                                 processes):
    """vLLM without tool calling: the run ends at its start (long before its 60 s) with the probe's one line
    at error level and exit 2, no traceback, and no agent's request (no record): on a LocalRunner, on a
    master whose worker's agents were already dispatched, and in the capacity search's shape (whose first
    tick comes before the test starts)."""
    code, output, records = plain_locust(tmp_path, f"{server_url}/tools=reject,len=32768", *processes,
                                         locustfile=locustfile)
    assert code == 2, output[-3000:]
    lines = [line for line in output.splitlines() if VLLM_TOOLS_MESSAGE in line]
    assert len(lines) == 1 and "ERROR" in lines[0] and "--no-tools" in lines[0], output[-3000:]
    assert "Traceback" not in output
    assert records == []


@pytest.mark.slow
def test_a_plain_locust_run_the_server_can_serve_is_qualified_and_runs(server_url, tmp_path):
    """The same server with ``--no-tools``: the probe qualifies it, says so, and the agents send; with
    ``--no-probe`` the run is not probed (and its agents' requests with tools fail, as the server says)."""
    code, output, records = plain_locust(tmp_path / "qualified", f"{server_url}/tools=reject,len=32768", "--no-tools",
                                         "-t", "3s")
    assert code == 0, output[-3000:]
    assert f"agentperf: server qualified: model {MODEL}, max_model_len 32768" in output
    assert records and all(record.ok for record in records if record.status is not Status.CANCELLED)
    code, output, records = plain_locust(tmp_path / "unprobed", f"{server_url}/tools=reject,len=32768", "--no-probe",
                                         "-t", "3s", "--exit-code-on-error", "0")
    assert code == 0 and "server qualified" not in output, output[-3000:]
    assert records and {record.status for record in records} <= {Status.HTTP_4XX, Status.CANCELLED}


@pytest.mark.slow
def test_in_the_web_ui_the_run_stops_with_the_reason_in_its_log(server_url, tmp_path):
    """A web UI run (started at once, ``--autostart``) against the same server: the test is stopped, not the
    UI, and the probe's line is in the master's log that the UI's Logs tab shows."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", AGENTS_LOCUSTFILE, "--host", f"{server_url}/tools=reject,len=32768",
         "--web-host", "127.0.0.1", "--web-port", str(port), "--autostart", "-u", "2", "-r", "10",
         "--trajectories", "demo"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def page(path: str):
            try:
                with urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                    return json.loads(response.read())
            except OSError:
                return None

        stats = wait_for(lambda: (stats := page("/stats/requests")) and stats["state"] == "stopped" and stats, 60,
                         "the test stopped", process)
        logs = page("/logs")["master"]
    finally:
        process.kill()
        process.wait()
    lines = [line for line in logs if VLLM_TOOLS_MESSAGE in line]
    assert len(lines) == 1 and "ERROR" in lines[0] and "--no-tools" in lines[0], logs
    assert not any("Traceback" in line for line in logs)
    assert [row["num_requests"] for row in stats["stats"] if row["name"] == "Aggregated"] == [0]  # no agent sent

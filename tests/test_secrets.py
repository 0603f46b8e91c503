"""Secrets stay where they belong: the API key's source and destination are fixed when the process starts,
whatever the web UI is sent, and a key (or a slice of it) or a URL's password never reaches a message.

The web UI test runs a real ``locust`` with its web UI and posts to ``/swarm`` as a visitor would; two
echo servers (this file run as a script) log every Authorization header they receive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CANARY_KEY = "sk-canary-7hx2Kq9ZpL4mW8"
DB_PASSWORD = "hunter2-database-secret"


class _Echo(BaseHTTPRequestHandler):
    """Logs each request's Authorization to the file named in argv[1]; answers as a one-model server that
    rejects every chat request (the test is about what is sent, not what comes back)."""

    def log_message(self, *args) -> None:
        pass

    def _log(self) -> None:
        with open(sys.argv[1], "a", encoding="utf-8") as log:
            log.write(json.dumps({"path": self.path, "authorization": self.headers.get("Authorization")}) + "\n")

    def _answer(self, code: int, payload: dict) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self._log()
        self._answer(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._log()
        auth = str(self.headers.get("Authorization"))
        if sys.argv[2:] != ["leaky"]:
            self._answer(400, {"error": {"message": "echo: " + auth}})
            return
        with _Echo.lock:
            _Echo.served += 1
            served = _Echo.served
        partial = f"{auth[7:14]}****{auth[-4:]}"  # the partial echo of a key ("sk-SECR****2345")
        if served > 2 and served % 4 == 1:  # (the probe's two requests pass)
            self._answer(401, {"error": {"message": f"Incorrect API key provided: {partial}"}})
            return
        tokens = min(int(json.loads(body).get("max_tokens") or 4), 5)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Echo-Authorization", auth)  # a server that echoes headers
        self.end_headers()
        chunks = [{"choices": [{"index": 0, "delta": {"content": f"tok {partial if i == 0 else ''} "}}]}
                  for i in range(tokens)]
        if served > 2 and served % 4 == 3:
            chunks.append({"error": {"message": f"engine failed for {auth}", "code": 500}})
        else:
            chunks.append({"choices": [], "usage": {"prompt_tokens": len(body) // 4, "completion_tokens": tokens,
                                                    "echo": auth}})
        for chunk in chunks:
            data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        done = b"data: [DONE]\n\n"
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))


_Echo.protocol_version = "HTTP/1.1"
_Echo.lock = threading.Lock()
_Echo.served = 0


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    print(server.server_address[1], flush=True)
    server.serve_forever()

# ---- tests ----

import requests  # noqa: E402

from agentperf_users.client.chat import redact, redact_url  # noqa: E402
from tests.support import free_port, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 60.0


def _echo_server(log: Path, *mode: str):
    process = subprocess.Popen([sys.executable, __file__, str(log), *mode], stdout=subprocess.PIPE, text=True)
    return process, f"http://127.0.0.1:{int(process.stdout.readline())}"


@pytest.mark.slow
def test_the_web_ui_cannot_choose_the_keys_variable_or_send_the_key_elsewhere(tmp_path):
    target_log, other_log, locust_log = tmp_path / "target.jsonl", tmp_path / "other.jsonl", tmp_path / "locust.log"
    target, target_url = _echo_server(target_log)
    other, other_url = _echo_server(other_log)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "AGENTPERF_TEST_KEY": CANARY_KEY, "MY_DB_PASSWORD": DB_PASSWORD}
    web = f"http://127.0.0.1:{port}"
    with open(locust_log, "w") as log:
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(REPO / "locustfiles" / "agents.py"), "--host", target_url,
             "--web-host", "127.0.0.1", "--web-port", str(port), "--api-key-env", "AGENTPERF_TEST_KEY",
             "--trajectories", "demo", "--records-dir", str(tmp_path / "records")],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _get(web), WAIT_S, "the web UI")
        form = {"user_count": 1, "spawn_rate": 1, "host": target_url, "api_key_env": "MY_DB_PASSWORD"}
        requests.post(f"{web}/swarm", data=form, timeout=10)
        wait_for(lambda: "the API key's source is fixed" in locust_log.read_text(), WAIT_S, "the key-source refusal")
        requests.post(f"{web}/swarm", data={**form, "api_key_env": "AGENTPERF_TEST_KEY", "host": other_url}, timeout=10)
        wait_for(lambda: "requests go only to the host given at start" in locust_log.read_text(), WAIT_S, "the host refusal")
        # The honest start still works: the key goes to the target, and only there.
        requests.post(f"{web}/swarm", data={**form, "api_key_env": "AGENTPERF_TEST_KEY"}, timeout=10)
        wait_for(lambda: target_log.exists() and "chat/completions" in target_log.read_text(), WAIT_S, "a chat request")
    finally:
        locust.terminate()
        locust.wait(30)
        for process in (target, other):
            process.kill()
            process.wait()
    sent = [json.loads(line) for line in target_log.read_text().splitlines()]
    assert {entry["authorization"] for entry in sent} == {f"Bearer {CANARY_KEY}"}
    assert not other_log.exists()  # nothing at all went to the host a visitor chose
    output = locust_log.read_text()
    assert DB_PASSWORD not in output and CANARY_KEY not in output and CANARY_KEY[3:11] not in output


def _get(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def _leaks(text: str, key: str) -> list[str]:
    """Every slice of ``key`` of 4 or more characters found in ``text`` (its 4-character windows cover them)."""
    return sorted({key[i:i + 4] for i in range(len(key) - 3) if key[i:i + 4] in text})


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_canary_key_echoed_by_a_failing_server_reaches_no_output(tmp_path):
    """A server that echoes the key in a header, a 401's message, an in-band error, a partial echo in the
    text and an unknown usage field; a capacity search and a web UI run against it; then every output
    (console, logs, records, reports, CSVs, /metrics, every web UI page and JSON endpoint) is searched for
    the key and every 4-character slice of it."""
    key = "sk-Zq7XvB2m9KtR4wPd"
    env = {**os.environ, "PYTHONPATH": str(REPO), "AGENTPERF_CANARY": key}
    server, url = _echo_server(tmp_path / "seen.jsonl", "leaky")
    outputs: dict[str, str] = {}
    metrics_port, web_port = free_port(), free_port()
    try:
        run = tmp_path / "run"
        capacity = subprocess.Popen(
            [sys.executable, "-m", "agentperf_users.cli.main", "capacity", "--host", url, "--api-key-env", "AGENTPERF_CANARY",
             "--trajectories", "demo", "--workers", "1", "--start-agents", "2", "--max-agents", "2", "--warmup-s", "1",
             "--window-s", "4", "--recheck", "off", "--out", str(run), "--metrics-port", str(metrics_port)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        outputs["/metrics"] = wait_for(lambda: _text(f"http://127.0.0.1:{metrics_port}/metrics", "agentperf_requests"),
                                       WAIT_S, "the master's metrics with requests", capacity)
        outputs["capacity console"] = capacity.communicate(timeout=180)[0]
        for path in run.rglob("*"):
            if path.is_file():
                outputs[str(path.relative_to(tmp_path))] = path.read_text(errors="replace")
        web = tmp_path / "web"
        web.mkdir()
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(REPO / "locustfiles" / "agents.py"), "--host", url,
             "--web-host", "127.0.0.1", "--web-port", str(web_port), "--autostart", "-u", "2", "-r", "2",
             "--api-key-env", "AGENTPERF_CANARY", "--trajectories", "demo", "--records-dir", str(web / "records"),
             "--csv", str(web / "stats"), "--csv-full-history", "--logfile", str(web / "locust.log"),
             "--no-probe"],  # its requests fail on purpose: the probe would stop the run before they are seen
            cwd=web, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        base = f"http://127.0.0.1:{web_port}"
        wait_for(lambda: "http_4xx" in _text(f"{base}/stats/requests", "") and "bad_stream" in
                 _text(f"{base}/stats/requests", ""), WAIT_S, "failures of both kinds in the web UI", locust)
        for page in ("/", "/stats/requests", "/stats/report", "/stats/requests/csv", "/stats/requests_full_history/csv",
                     "/stats/failures/csv", "/exceptions", "/exceptions/csv", "/tasks", "/logs", "/worker-count"):
            outputs[f"web UI {page}"] = _text(base + page, "")
        assert outputs["web UI /stats/requests"] and outputs["web UI /stats/report"]
        requests.post(f"{base}/stop", timeout=10)
        locust.terminate()
        outputs["locust console"] = locust.communicate(timeout=60)[0]
        for path in web.rglob("*"):
            if path.is_file():
                outputs[str(path.relative_to(tmp_path))] = path.read_text(errors="replace")
    finally:
        for process in (server, *(p for p in (locals().get("capacity"), locals().get("locust")) if p)):
            if process.poll() is None:
                process.kill()
            process.wait()
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    # the key went with every API request (and was echoed back); the server-metrics reader's /metrics goes without
    assert {entry["authorization"] for entry in seen if entry["path"].startswith("/v1/")} == {f"Bearer {key}"}
    assert {entry["authorization"] for entry in seen if not entry["path"].startswith("/v1/")} <= {None}
    assert any("http_4xx" in text for text in outputs.values()) and any("in-band error" in text for text in outputs.values())
    assert any(name.endswith("report.json") for name in outputs) and any(name.endswith(".csv") for name in outputs)
    leaks = {name: _leaks(text, key) for name, text in outputs.items() if _leaks(text, key)}
    assert not leaks, leaks


def _text(url: str, must_contain: str) -> str:
    """The body at ``url`` if it contains ``must_contain`` (and the server answered), else ""."""
    try:
        text = requests.get(url, timeout=5).text
    except requests.RequestException:
        return ""
    return text if must_contain in text else ""


def test_a_key_a_partial_echo_of_it_and_a_urls_password_are_redacted():
    text = (f"rejected {CANARY_KEY}; you sent {CANARY_KEY[:7]}****{CANARY_KEY[-4:]}; "
            "proxy http://admin:pa55word@10.0.0.1:8000/v1; Bearer abc.def")
    masked = redact(text, [CANARY_KEY])
    for start in range(len(CANARY_KEY) - 3):  # no slice of 4 or more characters survives
        assert CANARY_KEY[start:start + 4] not in masked
    assert "pa55word" not in masked and "abc.def" not in masked
    assert masked.startswith("rejected *** ; you sent ***") or masked.startswith("rejected ***; you sent ***")
    assert redact_url("http://user:PASS@host:8000/v1") == "http://***@host:8000/v1"
    assert redact_url("http://host:8000/v1") == "http://host:8000/v1"

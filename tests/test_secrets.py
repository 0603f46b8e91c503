"""Secrets stay where they belong: the API key's source and destination are fixed when the process starts,
whatever the web UI is sent, and a key (or a slice of it) or a URL's password never reaches a message.

The web UI test runs a real ``locust`` with its web UI and posts to ``/swarm`` as a visitor would; two
echo servers (this file run as a script) log every Authorization header they receive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._log()
        self._answer(400, {"error": {"message": "echo: " + str(self.headers.get("Authorization"))}})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    print(server.server_address[1], flush=True)
    server.serve_forever()

# ---- tests ----

import requests  # noqa: E402

from tests.support import free_port, wait_for  # noqa: E402

from agentperf_users.client import redact, redact_url  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 60.0


def _echo_server(log: Path):
    process = subprocess.Popen([sys.executable, __file__, str(log)], stdout=subprocess.PIPE, text=True)
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

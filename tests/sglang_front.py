"""An SGLang-shaped front for the embedded simulator, run as a child process by the tests: ``/v1/*`` is passed
to the simulator as it is (streams re-chunked as they come), ``/metrics`` is what an SGLang server states of
its limits (``sglang:max_total_num_tokens``, ``sglang:max_running_requests``; names from SGLang's
``python/sglang/srt/metrics/collector.py``) and none of vLLM's names, and ``/v1/models`` without
``max_model_len`` when ``--context-len`` is given, which ``sglang:context_len`` then states.

No SGLang can run here; the engine behind is the simulator, so what a calibration finds can be checked
against its profile.

    python -m tests.sglang_front --upstream http://127.0.0.1:PORT --port 0 --kv-tokens N --max-running N
        [--context-len N]    (prints ``listening on http://127.0.0.1:PORT``)
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "transfer-encoding", "content-length", "keep-alive"}


def exposition(kv_tokens: int, max_running: int, context_len: int | None) -> str:
    labels = 'dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"'
    lines = ["# TYPE sglang:max_total_num_tokens gauge", f"sglang:max_total_num_tokens{{{labels}}} {kv_tokens}.0",
             "# TYPE sglang:max_running_requests gauge",
             f'sglang:max_running_requests{{cap_source="server_args",{labels}}} {max_running}.0']
    if context_len:
        lines += ["# TYPE sglang:context_len gauge", f"sglang:context_len{{{labels}}} {context_len}.0"]
    return "\n".join(lines) + "\n"


def make_handler(upstream: str, metrics: str, hide_context: bool):
    target = urlsplit(upstream)

    class Front(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, "text/plain; version=0.0.4", metrics.encode())
            else:
                self._forward(None)

        def do_POST(self) -> None:
            self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def _send(self, status: int, kind: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self, body: bytes | None) -> None:
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=600)
            headers = {key: value for key, value in self.headers.items() if key.lower() not in HOP_HEADERS | {"host"}}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            if self.path.startswith("/v1/models") and hide_context and response.status == 200:
                listed = json.loads(response.read())
                for model in listed.get("data", []):
                    model.pop("max_model_len", None)
                self._send(200, "application/json", json.dumps(listed).encode())
                return
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in HOP_HEADERS:
                    self.send_header(key, value)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while chunk := response.read1(65536):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            connection.close()

    return Front


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that closed its connection (a stream it stopped reading) is no error of the front's."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--kv-tokens", type=int, required=True)
    parser.add_argument("--max-running", type=int, required=True)
    parser.add_argument("--context-len", type=int, default=0)
    args = parser.parse_args()
    handler = make_handler(args.upstream, exposition(args.kv_tokens, args.max_running, args.context_len),
                           bool(args.context_len))
    server = QuietServer(("127.0.0.1", args.port), handler)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

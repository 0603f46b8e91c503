"""Reading a Prometheus endpoint every second into a JSONL file of the run folder, and reading such a file
back: what the power reader (``power``) and the server-metrics reader (``server_metrics``) share."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import requests

from agentperf_users.errors import AgentperfError

SAMPLE_INTERVAL_S = 1.0
SCRAPE_TIMEOUT_S = 2.0
MAX_EXPOSITION_BYTES = 16 * 1024 * 1024
"""A real engine's exposition is a few hundred KB (vLLM's histograms included); a larger one is not read
into memory every second, it is a miss."""

logger = logging.getLogger(__name__)


def endpoint_name(url: str) -> str:
    """The URL without credentials or query, for logs and the report."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class ScrapeSampler:
    """Reads ``url`` every ``interval_s`` on a thread, from entering the context until leaving it, and
    appends the line ``reading(text, epoch_s)`` makes of each exposition to ``path`` (flushed per line, so
    an interrupted run keeps what it read). A failed reading, or one that ``reading`` finds nothing in
    (``None``: the server lacks ``wanted``), is counted in ``misses`` and logged once, at the first, with
    why: a metrics endpoint is an extra, so its absence never stops a run.

    """

    def __init__(self, url: str, path: str | os.PathLike, reading: Callable[[str, float], str | None],
                 what: str, wanted: str, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self._url, self._path, self._reading, self._what, self._wanted = url, Path(path), reading, what, wanted
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"agentperf-{what.replace(' ', '-')}", daemon=True)
        self.misses = 0
        self.readings = 0

    def __enter__(self) -> ScrapeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(SCRAPE_TIMEOUT_S + 1.0)
        if self.misses:
            logger.info("agentperf: %d of %d %s readings of %s gave nothing", self.misses,
                        self.misses + self.readings, self._what, endpoint_name(self._url))

    def _run(self) -> None:
        with open(self._path, "a", encoding="utf-8") as file:
            while True:
                line, why = self._read()
                if line is None:
                    if not self.misses:
                        logger.warning("agentperf: %s at %s: %s; its numbers are not available while it is so",
                                       self._what, endpoint_name(self._url), why)
                    self.misses += 1
                else:
                    self.readings += 1
                    file.write(line + "\n")
                    file.flush()
                if self._stop.wait(self._interval_s):
                    return

    def _read(self) -> tuple[str | None, str]:
        try:
            with requests.get(self._url, timeout=SCRAPE_TIMEOUT_S, stream=True) as response:
                response.raise_for_status()
                body = response.raw.read(MAX_EXPOSITION_BYTES + 1, decode_content=True)
                encoding = response.encoding or "utf-8"
        except (requests.RequestException, OSError, ValueError) as exc:  # urllib3's read errors included
            status = getattr(getattr(exc, "response", None), "status_code", None)
            return None, f"HTTP {status}" if status else f"not reachable ({type(exc).__name__})"
        if len(body) > MAX_EXPOSITION_BYTES:
            return None, f"an exposition over {MAX_EXPOSITION_BYTES} bytes"
        line = self._reading(body.decode(encoding, errors="replace"), time.time())
        return line, "" if line is not None else f"no {self._wanted}"



def read_jsonl(path: str | os.PathLike, parse: Callable[[dict], object], what: str) -> list:
    """``parse`` of each line of a JSONL file (none when it does not exist). A torn last line, as a killed
    run may leave, is skipped; any other malformed line is a one-line error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    parsed = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            parsed.append(parse(json.loads(line)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if number == len(lines):
                continue  # torn final write of a killed run
            raise AgentperfError(f"{path}:{number}: not {what} ({exc})") from None
    return parsed

"""A real vLLM (the CPU build) serving the tiny model, started and stopped by the tests and benchmarks.

``.ci/install-vllm`` puts vLLM in a venv of its own (``$AGENTPERF_VLLM_VENV``, default ``/opt/agentperf-vllm``)
and builds the tiny model into it (``tiny-llama/``). :class:`VllmServer` runs its OpenAI server on
127.0.0.1 on a free port, waits for ``/health`` and stops it afterwards.

CPU pinning: on the 2-core CI machine the engine runs on CPU 1 (:data:`ENGINE_CPUS`, all of its processes:
the API server, the engine core and the worker) and the load generator on CPU 0 (:data:`LOAD_CPUS`), as
``taskset -c`` would, so the two do not take turns on one core and a latency the client measures is not the
engine's scheduling delay. Results from this engine are on those pinned cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import psutil
import pytest

from tests.support import free_port

DEFAULT_VENV = "/opt/agentperf-vllm"
MODEL_NAME = "tiny-llama"  # the folder under the venv and the served model name
MAX_MODEL_LEN = 32768
ENGINE_CPUS = frozenset({1})
LOAD_CPUS = frozenset({0})
START_TIMEOUT_S = 300.0  # measured 33-43 s alone; CI's two cores may be shared with other processes
STOP_TIMEOUT_S = 30.0  # SIGTERM ends every process within ~3 s

# Without VLLM_HOST_IP vLLM binds its internal sockets to a non-loopback address; without the offline
# switches transformers tries the hub. The KV cache is 1 GiB (262,144 tokens for the 2-layer model: the
# test replays hold a few 6K-token contexts at once; less memory when a second server runs beside).
# The engine is pinned to one CPU, so none is reserved for the front end (it shares that CPU).
SERVER_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
# Agent deployments serve tool calls: without these flags vLLM answers any request carrying ``tools`` with
# HTTP 400. The chat template of the tiny model renders Hermes-style <tool_call> blocks.
TOOL_FLAGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
# The tests' engine runs at most this many sequences at once (vLLM's default is 256): far above the few agents
# the replays run, and below the burst calibrate measures max_num_seqs with, so that it has a limit to find.
FIXTURE_MAX_NUM_SEQS = 16


@dataclass(frozen=True)
class VllmInstall:
    """Where ``.ci/install-vllm`` put vLLM and the model."""

    python: Path
    model: Path


def find_install() -> VllmInstall | str:
    """The install, or why there is none (a sentence naming what is missing and how to get it)."""
    venv = Path(os.environ.get("AGENTPERF_VLLM_VENV", DEFAULT_VENV))
    install = VllmInstall(python=venv / "bin" / "python", model=venv / MODEL_NAME)
    if not install.python.exists():
        return f"no vLLM venv at {venv} (run .ci/install-vllm, or set AGENTPERF_VLLM_VENV)"
    if not (install.model / "model.safetensors").exists():
        return f"no tiny model in {install.model} (run .ci/install-vllm)"
    return install


def require_install() -> VllmInstall:
    """The install; a test without it is skipped, or fails where ``AGENTPERF_REQUIRE_ENGINE=1`` (CI, so a
    broken install cannot pass as a skip)."""
    found = find_install()
    if isinstance(found, VllmInstall):
        return found
    if os.environ.get("AGENTPERF_REQUIRE_ENGINE") == "1":
        pytest.fail(f"AGENTPERF_REQUIRE_ENGINE=1 but {found}", pytrace=False)
    pytest.skip(f"real engine not installed: {found}")


def pin(cpus: frozenset[int]):
    """A ``preexec_fn`` that pins a child (and what it starts) to ``cpus``, like ``taskset -c``; ``None``
    where this machine does not have them (then the processes share every core, unpinned)."""
    if not cpus <= os.sched_getaffinity(0):
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (vLLM's API server, engine core, worker)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class VllmServer:
    """vLLM's OpenAI server on 127.0.0.1, a free port, pinned to :data:`ENGINE_CPUS`: ``with VllmServer(...)``.

    Prefix caching and ``--enable-prompt-tokens-details`` are on (without the latter vLLM sends no
    ``cached_tokens``); ``--enforce-eager`` skips torch.compile (starts in ~40 s instead of 50-90 s).
    ``tool_calling=False`` starts it as a server that was not set up for agents (HTTP 400 on ``tools``).
    The server gets a temp folder of its own (``TMPDIR``), removed on stop with the ``vllm_dist_*`` folders
    every start leaves there; its output goes to ``log`` in that folder (the tail is shown if it fails).
    """

    def __init__(self, install: VllmInstall, tool_calling: bool = True, extra_args: Sequence[str] = ()):
        self._install = install
        self._tool_calling = tool_calling
        self._extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.start_s = 0.0  # seconds from launch to a healthy /health
        self._tmp: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        return MODEL_NAME

    def rss_bytes(self) -> int:
        return tree_rss_bytes(self.process.pid) if self.process else 0

    def command(self) -> list[str]:
        # The ``vllm`` console script fails here (its metadata is under the name vllm-cpu); the OpenAI
        # entrypoint module takes the same ``serve`` options.
        return [str(self._install.python), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self._install.model), "--served-model-name", MODEL_NAME,
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16",
                "--max-model-len", str(MAX_MODEL_LEN), "--enable-prefix-caching",
                "--enable-prompt-tokens-details", "--enforce-eager",
                *(TOOL_FLAGS if self._tool_calling else ()), *self._extra_args]

    def __enter__(self) -> "VllmServer":
        self._tmp = Path(tempfile.mkdtemp(prefix="agentperf-vllm-"))
        self.port = free_port()
        env = {**os.environ, **SERVER_ENV, "TMPDIR": str(self._tmp)}
        env.pop("PYTHONPATH", None)  # the venv's own packages only, not the checkout's
        started = time.monotonic()
        with open(self._tmp / "log", "wb") as log:
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=env, cwd=self._tmp,
                                            start_new_session=True, preexec_fn=pin(ENGINE_CPUS))
        try:
            self._wait_healthy(started + START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - started
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        path = self._tmp / "log" if self._tmp else None
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_healthy(self, deadline: float) -> None:
        """Poll ``/health`` (bounded); fail at once with the log's tail if the server exits first."""
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"vLLM exited with code {code} before it was healthy:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"vLLM was not healthy within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after :data:`STOP_TIMEOUT_S`; then its temp folder
        (with the ``vllm_dist_*`` folders) goes."""
        if self.process is not None and self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        if self.process is not None:
            self._signal_group(signal.SIGKILL)  # any child left behind by the server's own shutdown
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

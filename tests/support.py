"""What many tests need around the real processes they start: a free loopback port, and a bounded wait
for a condition (never a fixed sleep: these machines are shared and noisy); and agentperf installed in
this process's Locust, for the tests that build Locust's own option parser."""

from __future__ import annotations

import functools
import socket
import subprocess
import time
from typing import Callable

import pytest


@functools.cache
def install_agentperf() -> None:
    """agentperf's options and listeners on ``locust.events``, once per test process, as a locustfile does
    (no module registers anything when imported)."""
    import locust

    from agentperf_users.locustfiles.plugin import install

    install(locust.events, search=True)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, process: subprocess.Popen | None = None,
             describe: Callable[[], str] = lambda: "", interval_s: float = 0.2):
    """Poll ``condition`` (a truthy value when met) until ``timeout_s``; its value, or a test failure naming
    ``what`` (and ``describe()``), early if ``process`` ended first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process ended first (exit code {process.returncode})")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:g} s{describe()}")
        time.sleep(interval_s)

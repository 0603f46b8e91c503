"""Fixtures for the real-engine tests: one vLLM with tool calling for this folder's tests (a start costs ~40 s;
it stops after them, so the container tests that follow do not share the machine with it).

Every test here is marked ``engine`` (skip them locally with ``-m 'not engine'``); without the vLLM venv
they are skipped, or fail where ``AGENTPERF_REQUIRE_ENGINE=1`` (CI).
"""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.engine.vllm_server import FIXTURE_MAX_NUM_SEQS, VllmInstall, VllmServer, require_install


@pytest.fixture(scope="session")
def vllm_install() -> VllmInstall:
    return require_install()


@pytest.fixture(scope="package")
def vllm(vllm_install: VllmInstall) -> Iterator[VllmServer]:
    """The session's vLLM, set up as agent deployments are (tool calling on), pinned to the engine's CPU, with
    ``--max-num-seqs`` :data:`~tests.engine.vllm_server.FIXTURE_MAX_NUM_SEQS`."""
    with VllmServer(vllm_install, extra_args=("--max-num-seqs", str(FIXTURE_MAX_NUM_SEQS))) as server:
        print(f"\nvLLM healthy after {server.start_s:.1f} s, RSS {server.rss_bytes() / 2**30:.2f} GiB")
        yield server
        print(f"\nvLLM RSS at the end {server.rss_bytes() / 2**30:.2f} GiB")

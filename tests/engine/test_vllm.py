"""agentperf against a real vLLM, checked against the engine's own accounting.

A headless Locust replay of a small synthetic set (agents pinned to CPU 0, the engine to CPU 1): the records'
token sums must equal vLLM's counter deltas exactly, and the records must account for every request vLLM
finished. A server started without tool calling must show up in the records as what it is: HTTP 400s that
carry the server's own explanation. calibrate's burst reads the engine's ``--max-num-seqs``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agentperf_users.loadgen.probe import ProbeTarget
from agentperf_users.measure.records import RequestRecord, Status
from agentperf_users.twin.server_limits import read_told_limits
from agentperf_users.twin.probe_run import ProbeClient
from agentperf_users.twin.probe_seqs import measure_max_num_seqs
from tests.engine.accounting import (
    EngineCounters,
    RecordTotals,
    read_counters,
    record_totals,
    wait_idle,
)
from tests.engine.vllm_server import FIXTURE_MAX_NUM_SEQS, MAX_MODEL_LEN, VllmServer
from tests.engine.workload import replay

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(900)]


def measured_replay(server: VllmServer, tmp: Path, agents: int, run_s: int, *extra: str) \
        -> tuple[list[RequestRecord], RecordTotals, EngineCounters]:
    """A replay between two reads of vLLM's counters, the second once vLLM holds no request (an aborted
    request leaves its gauges only after the engine processed the abort); the records, their totals and
    the counters' deltas."""
    wait_idle(server.url)
    before = read_counters(server.url)
    records = replay(server.url, tmp, agents, run_s, *extra)
    wait_idle(server.url)
    engine = read_counters(server.url).minus(before)
    ours = record_totals(records)
    print(f"\nrecords: {ours}\nvLLM's deltas: {engine}\nvLLM RSS {server.rss_bytes() / 2**30:.2f} GiB")
    assert ours.ok >= 10, ours  # the replay did real work: the comparisons are not 0 == 0
    assert any(r.cached_tokens for r in records), "no prefix-cache hit: cached tokens would not be compared"
    assert all(r.prompt_tokens is None or r.prompt_tokens < MAX_MODEL_LEN for r in records)
    return records, ours, engine


def test_a_drained_replay_equals_vllms_counters_exactly(vllm: VllmServer, tmp_path: Path) -> None:
    """Agents stopped with time to finish their turn (``--stop-timeout``) leave no request cut off: every
    request vLLM completed has an ok record and nothing else, and the records' prompt, output and cached
    tokens are vLLM's prompt, generation and prefix-cache-hit counters to the token."""
    _, ours, engine = measured_replay(vllm, tmp_path, 2, 30, "--stop-timeout", "60")
    assert dict(ours.by_status) == {Status.OK.value: engine.completed}, engine.finished
    assert ours.tokens == engine.tokens


def test_a_replay_cut_by_its_end_accounts_for_every_request_vllm_completed(vllm: VllmServer, tmp_path: Path) -> None:
    """The end of a run cuts the requests in flight (``--stop-timeout 0``, Locust's default). Each cut
    request has a ``cancelled`` record, at most one per agent (its last), and every other record is ok.
    vLLM counts a cut request's tokens (its prefill, the tokens generated before the abort) but not the
    request (a client's abort is not in ``request_success_total``: vLLM 0.32's abort path records no
    finished-request stats), so the ok records are the requests vLLM completed, plus at most the cut ones
    it had just completed when the client went (the last bytes of a stream, a race of milliseconds). A
    cancelled record lacks the usage that comes only at a stream's end, so the records' tokens may fall
    short of the counters by the cut requests' share, never the other way, and by nothing when no
    request was cut."""
    records, ours, engine = measured_replay(vllm, tmp_path, 2, 20)
    cancelled = [r for r in records if r.status is Status.CANCELLED]
    diagnosis = (f"records by status {dict(ours.by_status)}; vLLM finished {dict(engine.finished)}; "
                 f"records minus vLLM's (prompt, output, cached): "
                 f"{tuple(a - b for a, b in zip(ours.tokens, engine.tokens))}")
    assert ours.ok + len(cancelled) == ours.records, diagnosis
    assert ours.ok <= engine.completed <= ours.ok + len(cancelled), diagnosis
    assert all(r.start_epoch_s == max(o.start_epoch_s for o in records if o.agent == r.agent) for r in cancelled)
    shortfall = [engine_sum - our_sum for our_sum, engine_sum in zip(ours.tokens, engine.tokens)]
    assert all(missing >= 0 for missing in shortfall), diagnosis
    if not cancelled:
        assert shortfall == [0, 0, 0], diagnosis


def test_a_server_without_tool_calling_answers_400_and_the_records_say_why(vllm_install, tmp_path: Path) -> None:
    """vLLM started without ``--enable-auto-tool-choice`` rejects every request that carries ``tools``; the
    records must say http_4xx and carry vLLM's own message, which names the flag to start it with."""
    with VllmServer(vllm_install, tool_calling=False) as server:
        records = replay(server.url, tmp_path, agents=1, run_s=5)
    assert records, "no request was recorded"
    assert {r.status for r in records} == {Status.HTTP_4XX}
    assert all("--enable-auto-tool-choice" in r.message for r in records), records[0].message
    assert all(r.ttft_s is None and r.output_tokens == 0 for r in records)


def test_the_calibrate_burst_reads_the_engines_max_num_seqs(vllm: VllmServer) -> None:
    """A burst of 64 short requests at an engine started with ``--max-num-seqs 16``: its own gauges show 16
    running while the rest wait (measured by hand: 8 read as 8 in 6.7 s; vLLM's default 256 as "at least
    64" in 3.1 s, benchmarks/max_num_seqs.py)."""
    wait_idle(vllm.url)
    target = ProbeTarget(vllm.url, timeout_s=300)
    told = read_told_limits(vllm.url, target)  # the cache it states, and no sequence limit: vLLM states none
    assert told.sources["kv_capacity_tokens"].startswith("vllm:cache_config_info") and "max_num_seqs" not in told.values
    found = measure_max_num_seqs(ProbeClient(target, vllm.model), told.get("kv_capacity_tokens"))
    assert found.value == FIXTURE_MAX_NUM_SEQS, found.note

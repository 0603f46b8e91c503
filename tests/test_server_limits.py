"""The limits a server states on /metrics (``twin.server_limits``) and how calibrate takes them: vLLM's cache
info, SGLang's KV pool, running-request limit and context (expositions shaped as SGLang's collector writes
them, no SGLang here), an option before either, and one line where a limit the twin needs is nowhere."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from agentperf_users.cli.main import main
from agentperf_users.errors import AgentperfError
from agentperf_users.loadgen.probe import ProbeTarget
from agentperf_users.twin.calibrate import DEFAULT_MAX_NUM_SEQS, Source, _context_within_cache, _limits
from agentperf_users.twin.probe_run import ProbeData
from agentperf_users.twin.server_limits import ToldLimits, read_told_limits, told_limits
from agentperf_users.simulator.profile import load_profile
from tests.simulator import simulator, write_profile
from tests.support import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent

VLLM = """# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",num_gpu_blocks="55112"} 1.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 0.0
"""

SGLANG = """# HELP sglang:max_total_num_tokens Maximum total number of tokens in the KV cache pool.
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 471258.0
sglang:max_total_num_tokens{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 471258.0
sglang:max_total_num_tokens{dp_rank="1",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 468992.0
# HELP sglang:max_running_requests The maximum number of running requests.
# TYPE sglang:max_running_requests gauge
sglang:max_running_requests{cap_source="server_args",dp_rank="0",model_name="m",tp_rank="0"} 48.0
sglang:max_running_requests{cap_source="server_args",dp_rank="1",model_name="m",tp_rank="0"} 48.0
# HELP sglang:context_len Context length
# TYPE sglang:context_len gauge
sglang:context_len{model_name="m"} 32768.0
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",model_name="m",pp_rank="0",tp_rank="0"} 3.0
"""


def test_vllm_states_its_cache_and_no_sequence_limit():
    told = told_limits(VLLM)
    assert told.values == {"kv_capacity_tokens": 55112 * 16}
    assert told.sources["kv_capacity_tokens"].startswith("vllm:cache_config_info")


def test_sglang_states_its_pool_its_running_limit_and_context_per_engine():
    """Each series is one engine's or rank's view; the twin models one engine: the smallest."""
    told = told_limits(SGLANG)
    assert told.values == {"kv_capacity_tokens": 468992, "max_num_seqs": 48, "max_context_tokens": 32768}
    assert told.sources == {"kv_capacity_tokens": "sglang:max_total_num_tokens",
                            "max_num_seqs": "sglang:max_running_requests", "max_context_tokens": "sglang:context_len"}


@pytest.mark.parametrize("text", [
    "", "not an exposition {{{", "sglang:max_total_num_tokens NaN\n", "sglang:max_running_requests 0.0\n",
    "sglang:max_total_num_tokens +Inf\n", "# TYPE x gauge\nx 1\n",
    'vllm:cache_config_info{block_size="16",num_gpu_blocks="0"} 1.0\n',
    'vllm:cache_config_info{block_size="sixteen",num_gpu_blocks="10"} 1.0\n'])
def test_nothing_usable_states_nothing(text):
    assert told_limits(text) == ToldLimits()


def test_an_invalid_series_beside_valid_ones_is_passed_over():
    told = told_limits(SGLANG + "sglang:max_running_requests{dp_rank=\"2\"} NaN\n")
    assert told.get("max_num_seqs") == 48


def test_the_limits_are_read_from_the_servers_metrics_beside_v1(tmp_path):
    """A static server whose /metrics is SGLang's exposition; a closed port and a server without /metrics
    state nothing (calibrate then asks for an option, below)."""
    (tmp_path / "metrics").write_text(SGLANG)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: read_told_limits(url, ProbeTarget(url)).values, 30, "the static server", server)
        assert read_told_limits(f"{url}/v1", ProbeTarget(url)) == told_limits(SGLANG)
        (tmp_path / "metrics").unlink()
        assert read_told_limits(url, ProbeTarget(url)) == ToldLimits()  # 404
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert read_told_limits(url, ProbeTarget(url)) == ToldLimits()  # nothing listens


def options(**given) -> argparse.Namespace:
    defaults = {"host": "http://127.0.0.1:9", "kv_cache_tokens": 0, "max_model_len": 0, "max_num_seqs": None,
                "max_num_batched_tokens": None}
    return argparse.Namespace(**{**defaults, **given})


def test_calibrate_takes_what_sglang_states_and_says_where_each_limit_came_from():
    limits, sources = _limits(options(), None, told_limits(SGLANG))
    assert (limits.kv_capacity_tokens, limits.max_num_seqs, limits.max_context_tokens) == (468992, 48, 32768)
    assert sources["max_num_seqs"] == "sglang:max_running_requests"
    assert sources["max_context_tokens"] == "sglang:context_len"
    assert sources["kv_capacity_tokens"] == "sglang:max_total_num_tokens"


def test_an_option_or_v1_models_comes_before_what_metrics_state():
    limits, sources = _limits(options(kv_cache_tokens=100_000, max_num_seqs=8, max_model_len=4096), 16384,
                              told_limits(SGLANG))
    assert (limits.kv_capacity_tokens, limits.max_num_seqs, limits.max_context_tokens) == (100_000, 8, 16384)
    assert sources["kv_capacity_tokens"] == "--kv-cache-tokens" and sources["max_num_seqs"] == "--max-num-seqs"
    assert sources["max_context_tokens"] == "/v1/models max_model_len"


def test_vllm_states_no_sequence_limit_so_its_default_stands_until_measured():
    limits, sources = _limits(options(), 2048, told_limits(VLLM))
    assert limits.max_num_seqs == DEFAULT_MAX_NUM_SEQS and "not given" in sources["max_num_seqs"]


def test_a_server_stating_no_kv_cache_is_one_line_naming_both_metrics_and_the_option():
    with pytest.raises(AgentperfError) as raised:
        _limits(options(), 2048, ToldLimits())
    said = str(raised.value)
    assert "vllm:cache_config_info" in said and "sglang:max_total_num_tokens" in said and "--kv-cache-tokens" in said
    assert "\n" not in said


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_calibrate_takes_an_sglang_servers_stated_limits_and_measures_no_burst(tmp_path, capsys):
    """Calibrate against an SGLang-shaped front (``tests.sglang_front``: the simulator's API, SGLang's
    /metrics with none of vLLM's names, /v1/models without max_model_len): the KV pool, the running-request
    limit and the context are the ones its /metrics states (set apart from the simulator's own so that the
    source shows), no burst is sent, and the probe still fits without vLLM's prefill histograms."""
    hidden = write_profile(tmp_path, {"engine.max_num_seqs": 12})
    truth = load_profile(hidden)
    stated = {"kv": truth.kv_capacity_tokens // 32 * 16,  # half, in whole 16-token blocks as a profile holds it
              "running": 12, "context": truth.model.max_context_tokens // 4}
    out = tmp_path / "twin.yaml"
    with simulator("--profile", str(hidden)) as sim:
        front = subprocess.Popen([sys.executable, "-m", "tests.sglang_front", "--upstream", sim.url, "--kv-tokens",
                                  str(stated["kv"]), "--max-running", str(stated["running"]), "--context-len",
                                  str(stated["context"])], stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            url = front.stdout.readline().strip().removeprefix("listening on ")
            assert url.startswith("http://127.0.0.1:"), url
            code = main(["calibrate", "--host", url, "--out", str(out), "--design", "quick", "--max-residual", "0.5"])
        finally:
            front.terminate()
            front.wait(timeout=30)
    err = capsys.readouterr().err
    assert code == 0, err
    twin, header = load_profile(out), out.read_text()
    assert (twin.kv_capacity_tokens, twin.engine.max_num_seqs, twin.model.max_context_tokens) == (
        stated["kv"], stated["running"], stated["context"])
    assert "measuring max_num_seqs" not in err and "burst" not in header
    for source in ("sglang:max_total_num_tokens", "sglang:max_running_requests", "sglang:context_len"):
        assert source in header, header[:2000]
    assert abs(twin.decode_step_s(1) / truth.decode_step_s(1) - 1) < 0.3  # priced from client timings alone


def test_a_context_longer_than_the_cache_is_capped_at_the_cache_and_says_so():
    """An SGLang pool smaller than its context_len: no request runs past the cache, and a profile's context
    must fit it; a context that fits is left as stated."""
    limits, sources = _limits(options(), 131072, told_limits(SGLANG))
    fits = Source("s", "m", "quick", limits, sources, ProbeData((), "on", 1.0))
    assert _context_within_cache(fits) == fits
    small = told_limits(SGLANG.replace("471258.0", "100000.0").replace("468992.0", "100000.0"))
    limits, sources = _limits(options(), 131072, small)
    capped = _context_within_cache(Source("s", "m", "quick", limits, sources, ProbeData((), "on", 1.0)))
    assert capped.limits.max_context_tokens == 100000 and capped.limits.kv_capacity_tokens == 100000
    assert capped.sources["max_context_tokens"] == ("/v1/models max_model_len 131072, capped at the KV cache's "
                                                    "100000 tokens (no request holds more)")

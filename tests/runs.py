"""Synthetic run folders, as ``agentperf capacity`` leaves them, made in milliseconds: the capacity
search's own policy (``search.CapacitySearch``) picks the steps, each step's records follow a known
speed per agent count, and the power drawn grows with the agents, so the answer is known beforehand."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from agentperf_users.measure.slo import SloSpec, evaluate_step, load_slo
from agentperf_users.report.build import RunContext, write_context, write_report
from agentperf_users.search.policy import RECHECK, CapacitySearch, SearchParameters
from tests.test_report import record

START_EPOCH_S = 1_796_000_000.0  # 2026-11-30: clock times a reader would see, not 1970's
STEP_S = 60.0
WINDOW_S = 30.0
REQUESTS_PER_AGENT = 5
PARAMETERS = SearchParameters(start_agents=2, step_agents=0, step_factor=2.0, max_agents=16, resolution_agents=1,
                              spawn_rate=10.0, warmup_s=10.0, window_s=WINDOW_S, early_stop=True)


@dataclasses.dataclass(frozen=True)
class System:
    """A served system: its per-request output speed and TTFT at a count, its accelerators and power."""

    name: str
    speed_at: Callable[[int], float]  # tok/s per request at that many agents
    accelerators: int
    idle_w: float
    watts_per_agent: float
    ttft_at: Callable[[int], float] = lambda agents: 0.2 + 0.05 * agents


SLOW = System("slow", lambda agents: 46.0 - 3.5 * agents, accelerators=1, idle_w=300.0, watts_per_agent=40.0)
"""Holds 7 agents at 20 tok/s (21.5 tok/s at 7, 18 at 8), none at the stricter tiers."""
FAST = System("fast", lambda agents: 80.0 - 4.0 * agents, accelerators=2, idle_w=900.0, watts_per_agent=60.0)
"""Holds 15 agents at 20 tok/s and 5 at 60 tok/s."""


def make_run(folder: Path, system: System, spec: SloSpec | None = None, trajectories: str = "demo",
             recheck_speed: float | None = None) -> dict:
    """The run folder of ``system`` under the bundled default SLO, its report written; returns report.json.
    ``recheck_speed``: searched with ``--recheck``, the system serving the rechecks at that multiple of
    its speed (a server whose speed drifted)."""
    spec = spec or load_slo(None)
    params = dataclasses.replace(PARAMETERS, recheck=recheck_speed is not None)
    search = CapacitySearch.from_parameters([tier.name for tier in spec.tiers], params)
    records, steps, samples = [], [], []
    while not search.done:
        agents = search.next_agents()
        start = START_EPOCH_S + len(steps) * STEP_S
        count = agents * REQUESTS_PER_AGENT  # spread over the window, none past its end
        phase = search.phase
        speed = system.speed_at(agents) * (recheck_speed if phase == RECHECK else 1.0)
        judged = [record(i % agents, system.ttft_at(agents), speed,
                         end_epoch_s=start + 1 + i * (WINDOW_S - 2) / count, prompt_tokens=2000, cached_tokens=1500,
                         output_tokens=200) for i in range(count)]
        records += judged
        samples += [{"epoch_s": start + s, "watts": system.idle_w + system.watts_per_agent * agents}
                    for s in range(int(WINDOW_S))]
        verdict = evaluate_step(judged, spec)
        steps.append({"index": len(steps), "agents": agents, "phase": phase,
                      "window_start_epoch_s": start, "window_end_epoch_s": start + WINDOW_S, "early_stop": False,
                      "verdict": json.loads(json.dumps(verdict.to_dict()))})
        search.record_verdict(agents, verdict)
    summary = {"run_id": folder.name, "slo": {"source": spec.source, "tiers": [
        {**dataclasses.asdict(tier), "label": tier.label} for tier in spec.tiers]},
        "parameters": dataclasses.asdict(params), "steps": steps, "complete": True, "interrupted": False,
        "lost_workers": [], "stopped": None,
        "capacity": {name: cap.to_dict() for name, cap in search.capacity().items()}}
    (folder / "records").mkdir(parents=True)
    (folder / "records" / "records-master.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    (folder / "search.json").write_text(json.dumps(summary))
    (folder / "power.jsonl").write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    context = RunContext(target={"host": f"http://{system.name}.example:8000", "model": "test-model",
                                 "simulator_profile": None}, trajectories=trajectories,
                         accelerators=system.accelerators, power_watts=None, power_source=None, interrupted=False,
                         power_measured_from=f"DCGM_FI_DEV_POWER_USAGE at http://{system.name}-dcgm:9400/metrics")
    write_context(folder, context)
    return write_report(folder)

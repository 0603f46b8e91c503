"""``agentperf predict``: the capacity per SLO tier a (calibrated) profile predicts, from the virtual clock.

It is the ground-truth search (:mod:`agentperf_users.search.truth`, the same options, the same search) with a
planner's output: one line per tier instead of the truth's JSON (``--json`` gives that). Questions a
measured search would need hours of held hardware for become one command each: another ``--slo``,
another ``--trajectories`` set, another ``--max-num-seqs`` in the profile, ``--replicas N`` copies of the
server behind a ``--router`` (:mod:`agentperf_users.simulator.fleet`). Agents per accelerator count every
replica's accelerators (the profile's GPU count times N).
"""

from __future__ import annotations

import json

from agentperf_users.search.policy import CapacityStatus, TierCapacity
from agentperf_users.search.truth import add_arguments, capacity_from_args

STATUS_TEXT = {
    CapacityStatus.FOUND: "{agents} agents (fails at {first_failing_agents})",
    CapacityStatus.NONE_PASSED: "none (fails already at {first_failing_agents})",
    CapacityStatus.NEVER_FAILED: "at least {agents} agents (never failed up to --max-agents)",
    CapacityStatus.INCOMPLETE: "unresolved (the search stopped first)",
}


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="capacity per SLO tier predicted from a (calibrated) simulator profile",
        description="Run the capacity search on the simulator's engine with a virtual clock (as agentperf truth "
                    "does) and print the predicted capacity per SLO tier. Calibrate the profile from a real server "
                    "with agentperf calibrate.")
    add_arguments(parser, profile_default=None)
    parser.add_argument("--json", action="store_true", help="print the search's JSON (as agentperf truth does)")
    parser.set_defaults(func=run)


def capacity_line(label: str, capacity: TierCapacity, accelerators: int | None = None) -> str:
    line = f"{label:<28} {STATUS_TEXT[capacity.status].format(**capacity.to_dict())}"
    if accelerators and capacity.agents:
        line += f", {capacity.agents / accelerators:.2f} per accelerator"
    return line


def run(args) -> int:
    spec, result = capacity_from_args(args)
    if args.json:
        print(json.dumps(result.to_dict(spec), indent=2))
        return 0
    fleet = result.fleet
    served = (f"{len(fleet.replicas)} replicas of {args.profile} behind {fleet.router} ({fleet.accelerators} "
              "accelerators)" if fleet else str(args.profile))
    print(f"predicted capacity of {served} ({len(result.steps)} load steps, {result.simulated_s:,.0f} s "
          f"simulated in {result.wall_s:.1f} s):")
    for name, capacity in result.capacity.items():
        print(capacity_line(spec.tier(name).label, capacity, fleet.accelerators if fleet else None))
    if fleet:
        print("prefix cache hit ratio per replica (over the search): "
              + ", ".join(f"{stats.hit_ratio:.1%} of {stats.routed} requests" for stats in fleet.replicas))
    return 0

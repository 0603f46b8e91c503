"""``agentperf truth``: the capacity search run against the simulator's engine on a virtual clock
(``search.truth``), printed as JSON: what a live search on the embedded simulator should find."""

from __future__ import annotations

import argparse
import json

from agentperf_users.errors import AgentperfError
from agentperf_users.loadgen.replay import ReplaySettings
from agentperf_users.measure.slo import load_slo
from agentperf_users.options import Group, add_options
from agentperf_users.search.policy import SearchParameters
from agentperf_users.search.truth import find_capacity
from agentperf_users.simulator.profile import (
    DEFAULT_PROFILE,
    SimulatorError,
    load_profile,
)
from agentperf_users.workload.readers import load_trajectories

GROUPS = (Group.WORKLOAD, Group.REPLAY, Group.SLO, Group.SEARCH)


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "truth",
        help="the true capacity per SLO tier, from the simulator's engine on a virtual clock",
        description="Run the capacity search against the simulator's engine on a virtual clock (no HTTP, no "
        "client) and print the capacity per tier as JSON.",
    )
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="simulator profile name or YAML file")
    add_options(parser, GROUPS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = load_slo(args.slo or None)
    try:
        profile = load_profile(args.profile)
    except SimulatorError as exc:
        raise AgentperfError(str(exc)) from None
    result = find_capacity(profile, load_trajectories(args.trajectories, args.trajectory_format), spec,
                           SearchParameters.from_options(args), ReplaySettings.from_options(args))
    print(json.dumps(result.to_dict(spec), indent=2))
    return 0

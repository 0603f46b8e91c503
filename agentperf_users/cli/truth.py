"""``agentperf truth``: the capacity search run against the simulator's engine on a virtual clock
(``search.truth``), printed as JSON: what a live search on the embedded simulator should find."""

from __future__ import annotations

import argparse
import json

from agentperf_users.search.truth import add_arguments, capacity_from_args


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "truth",
        help="the true capacity per SLO tier, from the simulator's engine on a virtual clock",
        description="Run the capacity search against the simulator's engine on a virtual clock (no HTTP, no "
        "client) and print the capacity per tier as JSON.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec, result = capacity_from_args(args)
    print(json.dumps(result.to_dict(spec), indent=2))
    return 0

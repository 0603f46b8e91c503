"""The ``agentperf`` command. Each subcommand lives in the module that owns its job and registers
itself through ``register_cli(subparsers)``; this module only dispatches and turns ``AgentperfError``
into one line on stderr with a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from agentperf_users.errors import AgentperfError

SUBCOMMAND_MODULES = (
    "agentperf_users.simulator.cli",  # agentperf simulate
    "agentperf_users.workload.synth",  # agentperf trajectories {synth,stats}
    "agentperf_users.cli.capacity",  # agentperf capacity
    "agentperf_users.report.build",  # agentperf report
    "agentperf_users.report.compare",  # agentperf compare
    "agentperf_users.cli.truth",  # agentperf truth
    "agentperf_users.twin.calibrate",  # agentperf calibrate
    "agentperf_users.twin.predict",  # agentperf predict
)


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, as agentperf's own are: a mistyped number among forty
    options is said without the forty-line usage above it (``--help`` still prints it). Its subcommands'
    parsers are of this class too (argparse makes them of their parent's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="agentperf",
        description="How many concurrent coding agents can an LLM serving system hold within its SLOs?",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "passes_unknown_options", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int((args.func(args, unknown) if unknown else args.func(args)) or 0)
    except AgentperfError as exc:
        print(f"agentperf: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("agentperf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

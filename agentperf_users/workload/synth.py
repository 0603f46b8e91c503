"""Synthetic coding-agent trajectories with AA-AgentPerf's published statistics, and set statistics.

``agentperf trajectories synth`` writes a set in the compact format; ``agentperf trajectories stats``
summarises any set (file, folder or bundled name) from its structure, without generating text.

The model of one trajectory: tool definitions and a system prompt (the same for every trajectory, as
one agent harness sends them, so they are a prefix shared across agents), a task (first user
message), then per turn the model's output and, unless it is the last turn, a tool wait; the next turn
appends an assistant message of that output's size (a short explanation plus one tool call) and the
tool's result. A trajectory ends at its sampled turn count, or before the turn whose prompt plus
output would pass the context cap. Sizes are lognormal. The defaults are fitted so the per-request
statistics over a set match AA-AgentPerf's published ones: input ~5K-131K tokens with mean ~27K,
output median ~150 and P95 ~2K, tool wait median 1 s, up to 200 turns (see ``trajectories/README.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from agentperf_users.bounded import is_single_line_text, short
from agentperf_users.errors import AgentperfError
from agentperf_users.stats import interpolated_quantile
from agentperf_users.tokens import TEMPLATE_OVERHEAD, count_tokens, tools_tokens
from agentperf_users.workload.readers import FORMATS, load_trajectories
from agentperf_users.workload.readers.common import REPLY_TOKENS
from agentperf_users.workload.textgen import ARGUMENTS_OVERHEAD_TOKENS
from agentperf_users.workload.trajectory import (
    MAX_CONTEXT_TOKENS,
    MAX_ID_CHARS,
    MAX_OUTPUT_TOKENS,
    MAX_TOOL_WAIT_S,
    TrajectorySet,
)

Z_95 = 1.6448536269514722
"""Standard normal 95th percentile: a lognormal's sigma is ln(p95 / median) / Z_95."""
ARGUMENTS_SHARE = 0.6
"""Share of an assistant message's tokens in its tool call's arguments (the rest is explanation)."""
WAIT_DECIMALS = 3


def _tool(name: str, description: str, properties: dict[str, str], required: Sequence[str]) -> dict:
    schema = {name: {"type": "string", "description": text} for name, text in properties.items()}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": schema, "required": list(required)}}}


CODING_TOOLS: tuple[dict, ...] = (
    _tool("bash", "Run a shell command in the repository and return its output. Use it to build, run "
          "tests, and inspect the environment. Long running commands are stopped after the timeout.",
          {"command": "The command to run.", "timeout": "Seconds before the command is stopped.",
           "description": "A short description of what the command does."}, ["command"]),
    _tool("read", "Read a file from the repository. Returns numbered lines. Read a file before you edit it.",
          {"path": "Path of the file, relative to the repository root.", "offset": "First line to read.",
           "limit": "Number of lines to read."}, ["path"]),
    _tool("edit", "Replace an exact string in a file with another string. The old string must occur "
          "exactly once unless replace_all is set.",
          {"path": "Path of the file to edit.", "old_string": "The exact text to replace.",
           "new_string": "The replacement text.", "replace_all": "Replace every occurrence."},
          ["path", "old_string", "new_string"]),
    _tool("write", "Write a file, replacing it if it exists. Prefer edit for changes to existing files.",
          {"path": "Path of the file to write.", "content": "The full content of the file."}, ["path", "content"]),
    _tool("grep", "Search file contents with a regular expression and return matching lines with their paths.",
          {"pattern": "The regular expression to search for.", "path": "Folder to search in.",
           "include": "Glob of the files to search, for example *.py."}, ["pattern"]),
    _tool("glob", "Find files whose paths match a glob pattern, newest first.",
          {"pattern": "The glob pattern, for example src/**/*.ts.", "path": "Folder to search in."}, ["pattern"]),
    _tool("list", "List the files and folders in a folder, as a tree.",
          {"path": "The folder to list.", "ignore": "Glob patterns to leave out."}, ["path"]),
    _tool("todo", "Write the task list for the current work: items with a status of pending, in progress "
          "or done. Keep exactly one item in progress.",
          {"todos": "The full list of items as JSON."}, ["todos"]),
)
"""Tool definitions in the style of a coding-agent harness (OpenCode-like), written for agentperf."""


_POSITIVE = frozenset({"count", "max_context", "tool_count", "task_median", "turns_median", "min_turns",
                       "output_median", "output_min", "tool_wait_median_s", "tool_result_median"})
"""Parameters that must be above zero (counts, and medians, whose logarithm is taken)."""
_MAXIMA = {"count": 100_000, "max_turns": 10_000, "min_turns": 10_000, "tool_count": len(CODING_TOOLS),
           "output_median": MAX_OUTPUT_TOKENS, "output_p95": MAX_OUTPUT_TOKENS, "output_min": MAX_OUTPUT_TOKENS,
           "output_max": MAX_OUTPUT_TOKENS, "tool_wait_median_s": MAX_TOOL_WAIT_S, "tool_wait_max_s": MAX_TOOL_WAIT_S,
           "task_sigma": 10, "turns_sigma": 10, "tool_wait_sigma": 10, "tool_result_sigma": 10}
"""Largest sensible value of each parameter; the others (token counts) are at most ``MAX_CONTEXT_TOKENS``.
Without them ``--count 1e9`` would write for days and ``--tool-wait-sigma inf`` would write infinities."""


@dataclass(frozen=True)
class SynthParams:
    """Every knob of the generator; each field is a ``synth`` flag (underscores as dashes)."""

    count: int = 400
    seed: int = 0
    name: str = "synthetic"
    max_context: int = 131_072
    system_tokens: int = 3_200
    tool_count: int = len(CODING_TOOLS)
    task_median: int = 300
    task_sigma: float = 0.8
    turns_median: float = 14.5
    turns_sigma: float = 0.9
    min_turns: int = 1
    max_turns: int = 200
    output_median: int = 150
    output_p95: int = 2_000
    output_min: int = 16
    output_max: int = 8_192
    tool_wait_median_s: float = 1.0
    tool_wait_sigma: float = 1.0
    tool_wait_max_s: float = 30.0
    tool_result_median: int = 300
    tool_result_sigma: float = 1.2
    tool_result_max: int = 16_384

    def check(self) -> None:
        """Raise ``AgentperfError`` naming the first flag whose value makes no sense."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "seed" or not isinstance(value, (int, float)):
                continue
            flag, high = f"--{f.name.replace('_', '-')}", _MAXIMA.get(f.name, MAX_CONTEXT_TOKENS)
            if not (0 < value if f.name in _POSITIVE else 0 <= value):  # NaN fails here too
                raise AgentperfError(f"{flag} must be {'> 0' if f.name in _POSITIVE else '>= 0'}, got {value}")
            if not value <= high:
                raise AgentperfError(f"{flag} must be at most {high:g}, got {value}")
        if not is_single_line_text(self.name, MAX_ID_CHARS - 5):
            raise AgentperfError(f"--name must be one printable line of at most {MAX_ID_CHARS - 5} characters, "
                                 f"got {short(self.name)}")
        if not self.min_turns <= self.max_turns:
            raise AgentperfError(f"--min-turns ({self.min_turns}) must not exceed --max-turns ({self.max_turns})")
        if not self.output_min <= self.output_median <= self.output_p95 <= self.output_max:
            raise AgentperfError("need --output-min <= --output-median <= --output-p95 <= --output-max, got "
                                 f"{self.output_min}, {self.output_median}, {self.output_p95}, {self.output_max}")


def _lognormal(rng: random.Random, median: float, sigma: float, low: float, high: float) -> float:
    return min(high, max(low, rng.lognormvariate(math.log(median), sigma)))


def synthesize(params: SynthParams) -> tuple[dict, list[dict]]:
    """The compact-format header and trajectory objects of a synthetic set (deterministic in params).

    Trajectory ``i`` is seeded by ``(seed, i)`` alone, so a smaller ``count`` gives a prefix of the set.
    """
    params.check()
    tools = CODING_TOOLS[: params.tool_count]
    first_prompt = len(tools_tokens(tools)) + TEMPLATE_OVERHEAD + params.system_tokens + REPLY_TOKENS
    if first_prompt + TEMPLATE_OVERHEAD + 1 + params.output_min > params.max_context:
        raise AgentperfError(f"--max-context {params.max_context} leaves no room for a first turn "
                             f"(tools and system prompt alone are {first_prompt} tokens)")
    header = {"agentperf": 1, "name": params.name, "generator": {"command": "agentperf trajectories synth",
                                                                 "parameters": asdict(params)}, "tools": list(tools)}
    names = [tool["function"]["name"] for tool in tools]
    trajectories = [_trajectory(i, params, names, first_prompt) for i in range(params.count)]
    return header, trajectories


def _trajectory(index: int, p: SynthParams, tool_names: list[str], first_prompt: int) -> dict:
    rng = random.Random(f"{p.seed}:{index}")
    output_sigma = math.log(p.output_p95 / p.output_median) / Z_95
    room_for_task = p.max_context - first_prompt - TEMPLATE_OVERHEAD - p.output_min
    task = round(_lognormal(rng, p.task_median, p.task_sigma, 1, room_for_task))
    n_turns = round(_lognormal(rng, p.turns_median, p.turns_sigma, p.min_turns, p.max_turns))
    new: list[dict] = [{"role": "system", "content_tokens": p.system_tokens, "seed": f"{p.name}-system"},
                       {"role": "user", "content_tokens": task}]
    prompt = first_prompt + TEMPLATE_OVERHEAD + task
    turns: list[dict] = []
    for k in range(n_turns):
        output = round(_lognormal(rng, p.output_median, output_sigma, p.output_min, p.output_max))
        if prompt + output > p.max_context:
            if turns:
                break
            output = p.max_context - prompt
        wait = round(_lognormal(rng, p.tool_wait_median_s, p.tool_wait_sigma, 0.0, p.tool_wait_max_s), WAIT_DECIMALS)
        turns.append({"messages": new, "output_tokens": output, "tool_wait_s": wait})
        assistant, assistant_tokens = _assistant(output, k, rng.choice(tool_names))
        result = round(_lognormal(rng, p.tool_result_median, p.tool_result_sigma, 1, p.tool_result_max))
        new = [assistant, {"role": "tool", "content_tokens": result}]
        prompt += assistant_tokens + TEMPLATE_OVERHEAD + result
    del turns[-1]["tool_wait_s"]  # the final answer: no tool runs after it
    return {"id": f"{p.name}-{index:04d}", "turns": turns}


def _assistant(output_tokens: int, turn: int, tool_name: str) -> tuple[dict, int]:
    """The assistant message recording a turn's output (explanation + one tool call) and its prompt tokens."""
    name_tokens = count_tokens(tool_name)
    arguments = max(ARGUMENTS_OVERHEAD_TOKENS, round(output_tokens * ARGUMENTS_SHARE))
    content = max(0, output_tokens - arguments - name_tokens)
    message: dict[str, Any] = {"role": "assistant"}
    if content:
        message["content_tokens"] = content
    message["tool_calls"] = [{"id": f"call_{turn}", "name": tool_name, "arguments_tokens": arguments}]
    return message, TEMPLATE_OVERHEAD + content + name_tokens + arguments


def write_set(path: Path, header: dict, trajectories: list[dict]) -> None:
    """Write a compact set: YAML for ``.yaml``/``.yml``, else JSONL (header line, one trajectory a line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump({**header, "trajectories": trajectories}, sort_keys=False), encoding="utf-8")
        return
    with path.open("w", encoding="utf-8") as handle:
        for obj in (header, *trajectories):
            handle.write(json.dumps(obj, separators=(",", ":")) + "\n")


# --- statistics -------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks; 0 when empty."""
    return interpolated_quantile(sorted_values, q / 100) if sorted_values else 0.0


def _summary(values: list[float], quantiles: Sequence[int]) -> dict[str, float]:
    ordered = sorted(values)
    out = {f"p{q}": percentile(ordered, q) for q in quantiles}
    out["mean"] = statistics.fmean(ordered) if ordered else 0.0
    out["max"] = ordered[-1] if ordered else 0.0
    return out


def set_stats(trajectories: TrajectorySet) -> dict[str, Any]:
    """Per-request statistics of a set, from turn shapes (no text is generated)."""
    turn_counts, inputs, outputs, waits = [], [], [], []
    for index in range(len(trajectories)):
        shapes = trajectories.shapes(index)
        turn_counts.append(len(shapes))
        inputs += [s.prompt_tokens for s in shapes]
        outputs += [s.output_tokens for s in shapes]
        waits += [s.tool_wait_s for s in shapes[:-1]]  # the last turn's answer is not followed by a tool
    return {
        "name": trajectories.name,
        "trajectories": len(trajectories),
        "requests": len(inputs),
        "turns": _summary(turn_counts, (50,)),
        "input_tokens": _summary(inputs, (5, 50, 95)),
        "output_tokens": _summary(outputs, (50, 95)),
        "tool_wait_s": _summary(waits, (50, 95)),
        "total_input_tokens": sum(inputs),
        "total_output_tokens": sum(outputs),
    }


def format_stats(stats: dict[str, Any]) -> str:
    def row(label: str, summary: dict[str, float], unit: str = "", digits: int = 0) -> str:
        cells = ", ".join(f"{k} {v:,.{digits}f}{unit}" for k, v in summary.items())
        return f"{label:<22} {cells}"

    return "\n".join([
        f"set                    {stats['name']}: {stats['trajectories']:,} trajectories, {stats['requests']:,} requests",
        row("turns/trajectory", stats["turns"], digits=1),
        row("input tokens/request", stats["input_tokens"]),
        row("output tokens/request", stats["output_tokens"]),
        row("tool wait", stats["tool_wait_s"], unit=" s", digits=2),
        f"{'total tokens':<22} input {stats['total_input_tokens']:,}, output {stats['total_output_tokens']:,}",
    ])


# --- command line -----------------------------------------------------------------------------------

_FLAG_HELP = {
    "count": "trajectories to write",
    "seed": "seed; trajectory i depends only on (seed, i)",
    "name": "set name, also the prefix of trajectory ids and the shared system prompt's seed (default: --out's stem)",
    "max_context": "context cap in tokens: no request's prompt plus output exceeds it",
    "system_tokens": "system prompt tokens (the same prompt in every trajectory)",
    "tool_count": f"how many of the {len(CODING_TOOLS)} built-in coding tools to define",
    "task_median": "first user message (the task) tokens, lognormal median",
    "task_sigma": "task size lognormal sigma",
    "turns_median": "turns per trajectory, lognormal median",
    "turns_sigma": "turns lognormal sigma",
    "min_turns": "fewest turns per trajectory",
    "max_turns": "most turns per trajectory",
    "output_median": "output tokens per request, median",
    "output_p95": "output tokens per request, 95th percentile (sets the lognormal sigma)",
    "output_min": "smallest output per request",
    "output_max": "largest output per request",
    "tool_wait_median_s": "tool wait after a turn, lognormal median in seconds",
    "tool_wait_sigma": "tool wait lognormal sigma",
    "tool_wait_max_s": "longest tool wait in seconds",
    "tool_result_median": "tool result message tokens, lognormal median",
    "tool_result_sigma": "tool result lognormal sigma",
    "tool_result_max": "largest tool result in tokens",
}


def register_cli(subparsers: Any) -> None:
    """Add ``trajectories {synth,stats}`` to the ``agentperf`` command."""
    parser = subparsers.add_parser("trajectories", help="synthesise trajectory sets or print their statistics")
    commands = parser.add_subparsers(dest="trajectories_command", required=True, metavar="SUBCOMMAND")
    synth = commands.add_parser("synth", help="write a synthetic coding-agent trajectory set",
                                description="Write synthetic coding-agent trajectories in agentperf's compact "
                                            "format. Defaults match AA-AgentPerf's published statistics.")
    synth.add_argument("--out", required=True, type=Path, metavar="FILE", help="output file (.jsonl, or .yaml)")
    defaults = SynthParams()
    for f in fields(SynthParams):
        default = getattr(defaults, f.name)
        kind = type(default)
        synth.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None if f.name == "name" else default,
                           help=f"{_FLAG_HELP[f.name]} (default: {default})" if f.name != "name" else _FLAG_HELP[f.name])
    synth.set_defaults(func=_run_synth)
    stats = commands.add_parser("stats", help="print the per-request statistics of a trajectory set")
    stats.add_argument("spec", metavar="FILE|SET", help="trajectory file, folder, manifest or bundled set name")
    stats.add_argument("--format", default="auto", choices=FORMATS, help="trajectory format (default: auto, sniffed)")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument("--allow-outside-manifest", action="store_true",
                       help="let a manifest list trace files outside its own folder (refused by default)")
    stats.set_defaults(func=_run_stats)


def _run_synth(args: argparse.Namespace) -> int:
    values = {f.name: getattr(args, f.name) for f in fields(SynthParams)}
    values["name"] = values["name"] or args.out.name.split(".")[0]
    header, trajectories = synthesize(SynthParams(**values))
    try:
        write_set(args.out, header, trajectories)
    except OSError as exc:
        raise AgentperfError(f"{args.out}: cannot write ({exc.strerror or exc})") from None
    turns = sum(len(t["turns"]) for t in trajectories)
    print(f"wrote {len(trajectories)} trajectories ({turns} turns) to {args.out}")
    return 0


def _run_stats(args: argparse.Namespace) -> int:
    stats = set_stats(load_trajectories(args.spec, args.format, allow_outside=args.allow_outside_manifest or None))
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0
